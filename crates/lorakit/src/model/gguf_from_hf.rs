//! The GGUF form of a model loaded from an HF directory, as llama.cpp's `convert_hf_to_gguf.py`
//! writes it: the `{arch}.*` keys from the config, the tokenizer from `tokenizer.json`
//! (llama.cpp's "gpt2" byte-level BPE vocabulary: tokens, token types, merges, special ids,
//! the pre-tokenizer's name), the chat template, and the tensor directory in llama.cpp's names.
//!
//! Covered: the Llama architecture without sliding windows or RoPE scaling (Llama, SmolLM2,
//! TinyLlama), with byte-level BPE tokenizers whose pre-tokenizer llama.cpp knows.
//! Everything else is refused by name (the architecture, the RoPE scaling, the tokenizer model or
//! its pre-tokenizer): a file llama.cpp would tokenise or run differently is worse than none.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::gguf::GgufValue;
use crate::model::arch::{self, Slot, EMBED, FINAL_NORM, HEAD};
use crate::model::config::{Arch, Config};
use crate::model::decoder::Decoder;
use crate::model::spec::RopeScaling;
use crate::tokenize::Tokenizer;

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const UNUSED: i32 = 5;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// llama.cpp's architecture name for `c`, or why it has no GGUF form here.
fn gguf_arch(c: &Config, dir: &Path) -> Result<&'static str> {
    let refuse = |what: String| {
        Err(Error::unsupported(
            dir.join("config.json"),
            format!("{what}; merge --out FILE.gguf from an HF directory covers Llama-architecture models (merge from a GGUF base keeps any architecture's metadata)"),
        ))
    };
    // Only what llama.cpp has been seen to run from these files (the tests); the other
    // families' keys differ in ways worth a test each.
    let name = match c.arch {
        Arch::Llama => "llama",
        other => return refuse(format!("a GGUF of architecture {}", other.name())),
    };
    if c.layers.iter().any(|l| l.window.is_some()) {
        return refuse("a sliding attention window".into());
    }
    if c.ropes
        .iter()
        .any(|r| !matches!(r.scaling, RopeScaling::None))
    {
        return refuse("RoPE scaling (rope_scaling / rope_parameters)".into());
    }
    Ok(name)
}

/// Whether the model of `dir` (config `c`) has a GGUF form here: an error naming config.json
/// and what is missing otherwise.
pub fn check_convertible(c: &Config, dir: &Path) -> Result<()> {
    gguf_arch(c, dir).map(|_| ())
}

/// The `{arch}.*` and `general.*` keys of `c`.
fn arch_keys(c: &Config, arch: &str, name: &str) -> Vec<(String, GgufValue)> {
    let k = |key: &str| format!("{arch}.{key}");
    let u = |v: usize| GgufValue::U32(v as u32);
    let mut kv = vec![
        (
            "general.architecture".into(),
            GgufValue::String(arch.into()),
        ),
        ("general.type".into(), GgufValue::String("model".into())),
        ("general.name".into(), GgufValue::String(name.into())),
        (k("block_count"), u(c.num_layers)),
        (k("context_length"), u(c.max_position_embeddings)),
        (k("embedding_length"), u(c.hidden_size)),
        (k("feed_forward_length"), u(c.intermediate_size)),
        (k("attention.head_count"), u(c.num_heads)),
        (k("attention.head_count_kv"), u(c.num_kv_heads)),
        (k("rope.freq_base"), GgufValue::F32(c.ropes[0].theta as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(c.rms_norm_eps),
        ),
    ];
    if c.head_dim * c.num_heads != c.hidden_size {
        kv.push((k("attention.key_length"), u(c.head_dim)));
        kv.push((k("attention.value_length"), u(c.head_dim)));
    }
    kv.push((k("vocab_size"), u(c.vocab_size)));
    kv.push((k("rope.dimension_count"), u(c.head_dim)));
    kv
}

/// llama.cpp's name for the pre-tokenizer of `tokenizer.json` (`tokenizer.ggml.pre`): the
/// splitting rules it implements, recognised by their structure and regular expression.
fn pre_tokenizer_name(pre: &Value, path: &Path) -> Result<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    fn kind(v: &Value) -> &str {
        v.get("type").and_then(Value::as_str).unwrap_or("")
    }
    fn split_regex(v: &Value) -> Option<&str> {
        (kind(v) == "Split")
            .then(|| v.pointer("/pattern/Regex").and_then(Value::as_str))
            .flatten()
    }
    let byte_level = |v: &Value, regex: bool| {
        kind(v) == "ByteLevel" && v.get("use_regex").and_then(Value::as_bool) == Some(regex)
    };
    let parts: Vec<&Value> = match kind(pre) {
        "Sequence" => pre
            .get("pretokenizers")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        _ => vec![pre],
    };
    let digits = |v: &Value| {
        kind(v) == "Digits" && v.get("individual_digits").and_then(Value::as_bool) == Some(true)
    };
    let name = match parts.as_slice() {
        [b] if byte_level(b, true) => Some("gpt-2"),
        [d, b] if digits(d) && byte_level(b, true) => Some("smollm"),
        [s, b] if byte_level(b, false) => match split_regex(s) {
            Some(LLAMA3) => Some("llama-bpe"),
            Some(QWEN2) => Some("qwen2"),
            _ => None,
        },
        _ => None,
    };
    name.ok_or_else(|| {
        Error::unsupported(
            path,
            format!(
                "the pre_tokenizer {} (llama.cpp knows the GPT-2, SmolLM, Llama 3 and Qwen2 rules); a GGUF with another would tokenise differently",
                serde_json::to_string(pre).unwrap_or_default()
            ),
        )
    })
}

/// The `tokenizer.*` keys for the byte-level BPE tokenizer of `dir/tokenizer.json`.
fn tokenizer_keys(c: &Config, dir: &Path, tok: &Tokenizer) -> Result<Vec<(String, GgufValue)>> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let j: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
    let model = j
        .get("model")
        .ok_or_else(|| Error::config(&path, "model", "missing"))?;
    if model.get("type").and_then(Value::as_str) != Some("BPE")
        || model.get("byte_fallback").and_then(Value::as_bool) == Some(true)
    {
        return Err(Error::unsupported(
            &path,
            "a tokenizer other than byte-level BPE (model.type BPE without byte_fallback) as GGUF",
        ));
    }
    let pre = pre_tokenizer_name(j.get("pre_tokenizer").unwrap_or(&Value::Null), &path)?;
    let mut tokens = vec![None::<(String, i32)>; c.vocab_size];
    let mut place = |id: u64, token: &str, kind: i32, key: &str| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            Error::config(
                &path,
                key,
                format!(
                    "token {token:?} has id {id}, past the model's {} rows",
                    c.vocab_size
                ),
            )
        })?;
        *slot = Some((token.to_owned(), kind));
        Ok(())
    };
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::config(&path, "model.vocab", "missing or not an object"))?;
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| Error::config(&path, "model.vocab", format!("{token:?}: not an id")))?;
        place(id, token, NORMAL, "model.vocab")?;
    }
    for t in j
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            t.get("id").and_then(Value::as_u64),
            t.get("content").and_then(Value::as_str),
        ) else {
            return Err(Error::config(
                &path,
                "added_tokens",
                "an entry without id or content",
            ));
        };
        let special = t.get("special").and_then(Value::as_bool) == Some(true);
        place(
            id,
            content,
            if special { CONTROL } else { USER_DEFINED },
            "added_tokens",
        )?;
    }
    let (texts, types): (Vec<GgufValue>, Vec<GgufValue>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let (s, kind) = t.unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED));
            (GgufValue::String(s), GgufValue::I32(kind))
        })
        .unzip();
    let merges = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::config(&path, "model.merges", "missing"))?
        .iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(pair) if pair.len() == 2 => match (pair[0].as_str(), pair[1].as_str()) {
                (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                _ => Err(Error::config(
                    &path,
                    "model.merges",
                    "a pair that is not two strings",
                )),
            },
            _ => Err(Error::config(
                &path,
                "model.merges",
                "an entry that is not a merge",
            )),
        })
        .map(|m| m.map(GgufValue::String))
        .collect::<Result<Vec<_>>>()?;
    let add_prefix_space = j
        .get("pre_tokenizer")
        .and_then(|p| {
            p.get("add_prefix_space")
                .or_else(|| p.pointer("/pretokenizers/1/add_prefix_space"))
        })
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut kv: Vec<(String, GgufValue)> = vec![
        (
            "tokenizer.ggml.model".into(),
            GgufValue::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), GgufValue::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), GgufValue::Array(texts)),
        ("tokenizer.ggml.token_type".into(), GgufValue::Array(types)),
        ("tokenizer.ggml.merges".into(), GgufValue::Array(merges)),
    ];
    for (key, id) in [
        ("bos_token_id", tok.bos_id()),
        ("eos_token_id", tok.eos_id()),
        ("unknown_token_id", tok.unk_id()),
        ("padding_token_id", tok.pad_id()),
    ] {
        if let Some(id) = id {
            kv.push((format!("tokenizer.ggml.{key}"), GgufValue::U32(id)));
        }
    }
    kv.push((
        "tokenizer.ggml.add_bos_token".into(),
        GgufValue::Bool(tok.adds_bos()),
    ));
    kv.push((
        "tokenizer.ggml.add_space_prefix".into(),
        GgufValue::Bool(add_prefix_space),
    ));
    if let Some(t) = tok.chat_template() {
        kv.push((
            "tokenizer.chat_template".into(),
            GgufValue::String(t.into()),
        ));
    }
    Ok(kv)
}

/// The metadata of the GGUF form of `model`, loaded from the HF directory `dir` with `tok`.
pub fn hf_gguf_metadata(
    model: &Decoder,
    dir: &Path,
    tok: &Tokenizer,
) -> Result<Vec<(String, GgufValue)>> {
    let c = &model.config;
    let arch = gguf_arch(c, dir)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let mut kv = arch_keys(c, arch, &name);
    kv.extend(tokenizer_keys(c, dir, tok)?);
    Ok(kv)
}

/// llama.cpp's tensor directory for `model`: (GGUF name, row-major shape), in the order
/// `convert_hf_to_gguf.py` writes them.
pub fn gguf_tensor_list(model: &Decoder) -> Vec<(String, Vec<usize>)> {
    let c = &model.config;
    let table = arch::weights(c.arch);
    let mut out = vec![(EMBED.1.to_owned(), vec![c.vocab_size, c.hidden_size])];
    for (i, l) in model.layers.iter().enumerate() {
        for &(slot, _, gguf) in table.linears.iter().chain(table.norms) {
            let name = |suffix: &str| format!("blk.{i}.{gguf}.{suffix}");
            match slot {
                Slot::Linear(kind) => {
                    if let Some(lin) = l.linear(kind) {
                        let shape = vec![lin.out_features, lin.in_features];
                        out.push((name("weight"), shape));
                        if lin.bias.is_some() {
                            out.push((name("bias"), vec![lin.out_features]));
                        }
                    }
                }
                Slot::Norm(ns) => {
                    if let Some(n) = l.norm(ns) {
                        out.push((name("weight"), vec![n.weight.len()]));
                        if let Some(b) = n.bias {
                            out.push((name("bias"), vec![b.len()]));
                        }
                    }
                }
            }
        }
    }
    out.push((FINAL_NORM.1.to_owned(), vec![c.hidden_size]));
    if model.lm_head.is_some() {
        out.push((HEAD.1.to_owned(), vec![c.vocab_size, c.hidden_size]));
    }
    out
}
