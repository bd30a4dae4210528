//! Tokenizers built from GGUF metadata (`tokenizer.ggml.*`).
//!
//! The result is expressed as a Hugging Face `tokenizer.json` document, so that the GGUF path and
//! the `tokenizer.json` path run the same `tokenizers` code:
//! * `gpt2`: byte-level BPE from `tokens` + `merges`, no prefix space, the split regex that
//!   `tokenizer.ggml.pre` names (llama.cpp's `llama-vocab.cpp` list, written as the original
//!   Hugging Face tokenizers write it), ByteLevel decoder.
//! * `llama`: SentencePiece-style BPE with byte fallback (`<0xNN>` tokens), `▁` for spaces and a
//!   space prefix per `add_space_prefix` (default true), as transformers' legacy Llama
//!   conversion does; merges are derived from the vocabulary and scores when the file has none.
//! * `llama` in a Gemma file (`general.architecture` `gemma`, `gemma2`, `gemma3`): transformers'
//!   `gemma_tokenizer` (`integrations/gguf/gguf_tokenizer_mapping.py`) and `GemmaTokenizer`. Tokens
//!   made only of whitespace with a space in them (`"  "`) are respelled as that many `▁`; the merges
//!   are rebuilt from the vocabulary in file order (the scores do not follow Gemma's merge order);
//!   spaces become `▁` with no prefix space (`add_space_prefix` is not consulted, as in
//!   transformers), byte fallback, BOS added unless `add_bos_token` is false.
//!
//! Control (3) and unknown (2) tokens become special added tokens, user-defined (4) tokens plain
//! added tokens (transformers' special / non-special added tokens; llama.cpp writes them so), so
//! that their text is parsed as one token.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::io::gguf::GgufFile;
use crate::{Error, Result};

/// GGUF token types (`tokenizer.ggml.token_type`).
pub const TOKEN_TYPE_NORMAL: i32 = 1;
pub const TOKEN_TYPE_UNKNOWN: i32 = 2;
pub const TOKEN_TYPE_CONTROL: i32 = 3;
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;
pub const TOKEN_TYPE_UNUSED: i32 = 5;
pub const TOKEN_TYPE_BYTE: i32 = 6;

/// The tokenizer metadata of a GGUF file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GgufTokenizerSpec {
    /// `tokenizer.ggml.model`: "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE with byte
    /// fallback).
    pub model: String,
    /// `tokenizer.ggml.pre`: "default", "smollm", "llama3"/"llama-bpe", "qwen2", "gpt-2", ...
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    /// 6 byte.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.scores`.
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.merges`, each "left right".
    pub merges: Option<Vec<String>>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix`.
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

/// Llama 3 (`llama3`, `llama-bpe`, `dbrx`, `smaug-bpe`).
pub(crate) const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2 (`qwen2`, `stablelm2`, `hunyuan`, `deepseek-r1-qwen`).
pub(crate) const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a `gpt2` tokenizer splits text before BPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PreSplit {
    /// The GPT-2 regex.
    Gpt2,
    /// Every digit on its own, then the GPT-2 regex (llama.cpp's starcoder/smollm family).
    Gpt2Digits,
    Llama3,
    Qwen2,
}

impl PreSplit {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            PreSplit::Gpt2 => "GPT-2 regex",
            PreSplit::Gpt2Digits => "single digits + GPT-2 regex",
            PreSplit::Llama3 => "Llama 3 regex",
            PreSplit::Qwen2 => "Qwen 2 regex + NFC",
        }
    }
}

/// The pre-tokenizer that llama.cpp uses for `tokenizer.ggml.pre`. `None` for names it does not
/// know here (the caller then falls back to the GPT-2 regex, as transformers does for every GGUF).
pub(crate) fn pre_split_for(pre: &str) -> Option<PreSplit> {
    Some(match pre {
        "default" | "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" | "trillion" | "phi-2" => {
            PreSplit::Gpt2
        }
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            PreSplit::Gpt2Digits
        }
        "llama3" | "llama-v3" | "llama-bpe" | "dbrx" | "smaug-bpe" | "falcon3" => PreSplit::Llama3,
        "qwen2" | "stablelm2" | "hunyuan" | "deepseek-r1-qwen" => PreSplit::Qwen2,
        _ => return None,
    })
}

/// What the builder decided, for `describe()`.
#[derive(Debug, Clone)]
pub(crate) struct GgufBuildInfo {
    pub kind: String,
    pub note: Option<String>,
}

fn added_token(id: usize, content: &str, special: bool) -> Value {
    json!({
        "id": id,
        "content": content,
        "single_word": false,
        "lstrip": false,
        "rstrip": false,
        "normalized": false,
        "special": special,
    })
}

/// The architectures whose `llama` vocabulary transformers builds as a Gemma tokenizer.
pub const GEMMA_ARCHITECTURES: [&str; 3] = ["gemma", "gemma2", "gemma3"];

impl GgufTokenizerSpec {
    /// The tokenizer metadata of an open GGUF file: `tokenizer.ggml.*` and
    /// `tokenizer.chat_template`. Absent optional keys are `None`; a key of the wrong type is an
    /// error naming the file and the key.
    pub fn from_gguf(gguf: &GgufFile) -> Result<GgufTokenizerSpec> {
        let path = gguf.path();
        let has = |key: &str| gguf.get(key).is_some();
        let opt_u32 =
            |key: &str| -> Result<Option<u32>> { has(key).then(|| gguf.get_u32(key)).transpose() };
        let opt_bool = |key: &str| -> Result<Option<bool>> {
            has(key).then(|| gguf.get_bool(key)).transpose()
        };
        let opt_strings = |key: &str| -> Result<Option<Vec<String>>> {
            has(key)
                .then(|| {
                    gguf.get_str_array(key)
                        .map(|v| v.into_iter().map(str::to_owned).collect())
                })
                .transpose()
        };
        let tokens = opt_strings("tokenizer.ggml.tokens")?.ok_or_else(|| {
            Error::config(
                path,
                "tokenizer.ggml.tokens",
                "missing: the file has no tokenizer",
            )
        })?;
        let token_types = match has("tokenizer.ggml.token_type") {
            false => None,
            true => Some(
                gguf.get_i64_array("tokenizer.ggml.token_type")?
                    .into_iter()
                    .map(|t| {
                        i32::try_from(t).map_err(|_| {
                            Error::config(
                                path,
                                "tokenizer.ggml.token_type",
                                format!("token type {t} is out of range"),
                            )
                        })
                    })
                    .collect::<Result<Vec<i32>>>()?,
            ),
        };
        let scores = has("tokenizer.ggml.scores")
            .then(|| gguf.get_f32_array("tokenizer.ggml.scores"))
            .transpose()?;
        let opt_str = |key: &str| -> Result<Option<String>> {
            has(key)
                .then(|| gguf.get_str(key).map(str::to_owned))
                .transpose()
        };
        Ok(GgufTokenizerSpec {
            model: gguf.get_str("tokenizer.ggml.model")?.to_owned(),
            pre: opt_str("tokenizer.ggml.pre")?,
            tokens,
            token_types,
            scores,
            merges: opt_strings("tokenizer.ggml.merges")?,
            bos_id: opt_u32("tokenizer.ggml.bos_token_id")?,
            eos_id: opt_u32("tokenizer.ggml.eos_token_id")?,
            unk_id: opt_u32("tokenizer.ggml.unknown_token_id")?,
            pad_id: opt_u32("tokenizer.ggml.padding_token_id")?,
            add_bos: opt_bool("tokenizer.ggml.add_bos_token")?,
            add_space_prefix: opt_bool("tokenizer.ggml.add_space_prefix")?,
            chat_template: opt_str("tokenizer.chat_template")?,
        })
    }
}

/// Builds the `tokenizer.json` document for `spec`. `architecture` (`general.architecture`)
/// picks transformers' builder where it has one per architecture (Gemma); `None` builds by
/// `tokenizer.ggml.model` alone.
pub(crate) fn tokenizer_json(
    spec: &GgufTokenizerSpec,
    architecture: Option<&str>,
    source: &Path,
) -> Result<(Value, GgufBuildInfo)> {
    let n = spec.tokens.len();
    if n == 0 {
        return Err(Error::config(source, "tokenizer.ggml.tokens", "no tokens"));
    }
    if let Some(types) = &spec.token_types {
        if types.len() != n {
            return Err(Error::config(
                source,
                "tokenizer.ggml.token_type",
                format!("{} entries for {} tokens", types.len(), n),
            ));
        }
    }
    if let Some(scores) = &spec.scores {
        if scores.len() != n {
            return Err(Error::config(
                source,
                "tokenizer.ggml.scores",
                format!("{} entries for {} tokens", scores.len(), n),
            ));
        }
    }
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", spec.bos_id),
        ("tokenizer.ggml.eos_token_id", spec.eos_id),
        ("tokenizer.ggml.unknown_token_id", spec.unk_id),
        ("tokenizer.ggml.padding_token_id", spec.pad_id),
    ] {
        if let Some(id) = id {
            if id as usize >= n {
                return Err(Error::config(
                    source,
                    key,
                    format!("id {id} is outside the vocabulary of {n} tokens"),
                ));
            }
        }
    }

    let model_name = spec.model.as_str();
    let gemma =
        model_name == "llama" && architecture.is_some_and(|a| GEMMA_ARCHITECTURES.contains(&a));
    let (add_bos_default, mut doc, info) = match model_name {
        "llama" if gemma => (true, gemma_doc(spec)?, GgufBuildInfo {
            kind: format!(
                "SentencePiece-BPE with byte fallback (GGUF llama, {} vocabulary, no space prefix)",
                architecture.unwrap_or("gemma")
            ),
            note: Some("merges rebuilt from the vocabulary in file order, as transformers does for Gemma".to_string()),
        }),
        "gpt2" => {
            let (vocab, added) = plain_vocab_and_added(spec);
            let merges = parse_merges(spec, source)?;
            let (split, note) = match spec.pre.as_deref() {
                None => (PreSplit::Gpt2, None),
                Some(p) => match pre_split_for(p) {
                    Some(s) => (s, None),
                    None => (
                        PreSplit::Gpt2,
                        Some(format!(
                            "tokenizer.ggml.pre '{p}' is not known to lorakit; using the GPT-2 regex (as transformers does)"
                        )),
                    ),
                },
            };
            let byte_level = |use_regex: bool| {
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
            };
            let split_regex = |re: &str| {
                json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false})
            };
            let (normalizer, pre_tokenizer) = match split {
                PreSplit::Gpt2 => (Value::Null, byte_level(true)),
                PreSplit::Gpt2Digits => (
                    Value::Null,
                    json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Digits", "individual_digits": true},
                        byte_level(true),
                    ]}),
                ),
                PreSplit::Llama3 => (
                    Value::Null,
                    json!({"type": "Sequence", "pretokenizers": [split_regex(LLAMA3_REGEX), byte_level(false)]}),
                ),
                PreSplit::Qwen2 => (
                    json!({"type": "NFC"}),
                    json!({"type": "Sequence", "pretokenizers": [split_regex(QWEN2_REGEX), byte_level(false)]}),
                ),
            };
            let doc = json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": normalizer,
                "pre_tokenizer": pre_tokenizer,
                "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {
                    "type": "BPE",
                    "dropout": null,
                    "unk_token": null,
                    "continuing_subword_prefix": null,
                    "end_of_word_suffix": null,
                    "fuse_unk": false,
                    "byte_fallback": false,
                    "ignore_merges": split == PreSplit::Llama3,
                    "vocab": vocab,
                    "merges": merges,
                },
            });
            let info = GgufBuildInfo {
                kind: format!("BPE byte-level (GGUF gpt2, pre '{}': {})", spec.pre.as_deref().unwrap_or("none"), split.describe()),
                note,
            };
            (false, doc, info)
        }
        "llama" => {
            let (vocab, added) = plain_vocab_and_added(spec);
            let merges = match &spec.merges {
                Some(m) if !m.is_empty() => parse_merges(spec, source)?,
                _ => derive_spm_merges(spec, source)?,
            };
            let add_prefix = spec.add_space_prefix.unwrap_or(true);
            let unk = spec
                .unk_id
                .map(|id| spec.tokens[id as usize].clone())
                .or_else(|| spec.tokens.iter().any(|t| t == "<unk>").then(|| "<unk>".to_string()));
            let mut norm = Vec::new();
            if add_prefix {
                norm.push(json!({"type": "Prepend", "prepend": "▁"}));
            }
            norm.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
            let mut dec = vec![
                json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_prefix {
                dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let doc = json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": norm},
                "pre_tokenizer": null,
                "post_processor": null,
                "decoder": {"type": "Sequence", "decoders": dec},
                "model": {
                    "type": "BPE",
                    "dropout": null,
                    "unk_token": unk,
                    "continuing_subword_prefix": null,
                    "end_of_word_suffix": null,
                    "fuse_unk": true,
                    "byte_fallback": true,
                    "ignore_merges": false,
                    "vocab": vocab,
                    "merges": merges,
                },
            });
            let info = GgufBuildInfo {
                kind: format!(
                    "SentencePiece-BPE with byte fallback (GGUF llama, space prefix {})",
                    if add_prefix { "on" } else { "off" }
                ),
                note: spec
                    .merges
                    .as_ref()
                    .is_none_or(|m| m.is_empty())
                    .then(|| "merges derived from the vocabulary scores".to_string()),
            };
            (true, doc, info)
        }
        other => {
            return Err(Error::unsupported(
                source,
                format!("tokenizer.ggml.model '{other}' (lorakit builds tokenizers for 'gpt2' and 'llama' only)"),
            ))
        }
    };

    if spec.add_bos.unwrap_or(add_bos_default) {
        if let Some(bos) = spec.bos_id {
            let t = &spec.tokens[bos as usize];
            doc["post_processor"] = json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [
                    {"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": t, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
                ],
                "special_tokens": {t.as_str(): {"id": t, "ids": [bos], "tokens": [t]}},
            });
        }
    }
    Ok((doc, info))
}

/// The vocabulary as the file spells it and the added tokens (control and unknown tokens
/// special, user-defined ones plain) of the `gpt2` and `llama` builders.
fn plain_vocab_and_added(spec: &GgufTokenizerSpec) -> (serde_json::Map<String, Value>, Vec<Value>) {
    let n = spec.tokens.len();
    // Vocabulary: a later duplicate wins, as in transformers' `{tok: i for i, tok in ...}`.
    let mut vocab = serde_json::Map::with_capacity(n);
    for (i, t) in spec.tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }

    let token_type = |i: usize| {
        spec.token_types
            .as_ref()
            .map(|t| t[i])
            .unwrap_or(TOKEN_TYPE_NORMAL)
    };
    let mut added = Vec::new();
    for (i, t) in spec.tokens.iter().enumerate() {
        if t.is_empty() {
            continue;
        }
        match token_type(i) {
            TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => added.push(added_token(i, t, true)),
            TOKEN_TYPE_USER_DEFINED => added.push(added_token(i, t, false)),
            _ => {}
        }
    }
    // Without token types, at least the declared special ids are special.
    if spec.token_types.is_none() {
        let mut ids: Vec<u32> = [spec.bos_id, spec.eos_id, spec.unk_id, spec.pad_id]
            .into_iter()
            .flatten()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            let t = &spec.tokens[id as usize];
            if !t.is_empty() {
                added.push(added_token(id as usize, t, true));
            }
        }
    }
    (vocab, added)
}

/// Python's `str.isspace` (Unicode White_Space plus the separators U+001C..U+001F), for the
/// respelling rule that transformers writes with `t.strip()`.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The `tokenizer.json` of transformers' GGUF Gemma tokenizer: `gemma_tokenizer` (respelled
/// whitespace tokens, merges in file order), `GemmaTokenizer` (normalizer, pre-tokenizer, decoder,
/// BPE options) and `add_gguf_special_tokens` (control tokens special, user-defined tokens plain,
/// each only where the respelled vocabulary has it). Without the post-processor.
fn gemma_doc(spec: &GgufTokenizerSpec) -> Result<Value> {
    let n = spec.tokens.len();
    // "  " is stored as real spaces, but GemmaTokenizer looks it up as "▁▁".
    let tokens: Vec<Cow<'_, str>> = spec
        .tokens
        .iter()
        .map(|t| {
            if t.contains(' ') && t.chars().all(py_isspace) {
                Cow::Owned("▁".repeat(t.chars().count()))
            } else {
                Cow::Borrowed(t.as_str())
            }
        })
        .collect();
    // {token: index}: a later duplicate wins.
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(n);
    for (i, t) in tokens.iter().enumerate() {
        index.insert(t, i);
    }
    let mut vocab = serde_json::Map::with_capacity(n);
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }

    // transformers' `generate_merges(vocab, {token: -index})`: every split of every token into two
    // tokens, best score first, i.e. the tokens in the order of their (last) index, and within one
    // token by the length of the left piece, longest first.
    let mut merges: Vec<[&str; 2]> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if index.get(t.as_ref()) != Some(&i) {
            continue;
        }
        let cuts: Vec<usize> = t.char_indices().skip(1).map(|(b, _)| b).collect();
        for &b in cuts.iter().rev() {
            let (l, r) = t.split_at(b);
            if index.contains_key(l) && index.contains_key(r) {
                merges.push([l, r]);
            }
        }
    }

    // Control tokens are special, user-defined ones plain added tokens, both matched as the
    // file spells them and only if the (respelled) vocabulary has that spelling; the declared
    // bos/eos/unk/pad tokens are special too (transformers' special-token attributes).
    let token_type = |i: usize| {
        spec.token_types
            .as_ref()
            .map(|t| t[i])
            .unwrap_or(TOKEN_TYPE_NORMAL)
    };
    let mut added: std::collections::BTreeMap<usize, Value> = Default::default();
    for (i, t) in spec.tokens.iter().enumerate() {
        if t.is_empty() {
            continue;
        }
        let special = match token_type(i) {
            TOKEN_TYPE_CONTROL => true,
            TOKEN_TYPE_USER_DEFINED => false,
            _ => continue,
        };
        if let Some(&id) = index.get(t.as_str()) {
            added
                .entry(id)
                .or_insert_with(|| added_token(id, t, special));
        }
    }
    for id in [spec.bos_id, spec.eos_id, spec.unk_id, spec.pad_id]
        .into_iter()
        .flatten()
    {
        let t = &spec.tokens[id as usize];
        if let Some(&id) = index.get(t.as_str()).filter(|_| !t.is_empty()) {
            added.insert(id, added_token(id, t, true));
        }
    }
    let unk = spec
        .unk_id
        .map(|id| spec.tokens[id as usize].as_str())
        .unwrap_or("<unk>");
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added.into_values().collect::<Vec<Value>>(),
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

fn parse_merges(spec: &GgufTokenizerSpec, source: &Path) -> Result<Vec<[String; 2]>> {
    let Some(merges) = &spec.merges else {
        return Err(Error::config(
            source,
            "tokenizer.ggml.merges",
            format!("missing (a '{}' tokenizer needs its merges)", spec.model),
        ));
    };
    merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok([a.to_string(), b.to_string()]),
            _ => Err(Error::config(
                source,
                "tokenizer.ggml.merges",
                format!("entry {i} {m:?} is not 'left right'"),
            )),
        })
        .collect()
}

/// transformers' `GGUFTokenizerSkeleton` merges for a SentencePiece vocabulary without merges:
/// every split of every token into two tokens, ordered by the merged token's score (stable), and
/// within one token by the scores of its two halves (descending).
fn derive_spm_merges(spec: &GgufTokenizerSpec, source: &Path) -> Result<Vec<[String; 2]>> {
    let Some(scores) = &spec.scores else {
        return Err(Error::config(
            source,
            "tokenizer.ggml.scores",
            "missing: a 'llama' tokenizer without merges needs scores to derive them",
        ));
    };
    // {token: score}, a later duplicate overriding the score but keeping the first position.
    let mut order: Vec<&str> = Vec::with_capacity(spec.tokens.len());
    let mut score: HashMap<&str, f32> = HashMap::with_capacity(spec.tokens.len());
    for (t, s) in spec.tokens.iter().zip(scores) {
        if score.insert(t.as_str(), *s).is_none() {
            order.push(t.as_str());
        }
    }
    let present: HashSet<&str> = order.iter().copied().collect();
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for &tok in &order {
        let piece_score = score[tok];
        let mut local: Vec<(&str, &str, f32)> = Vec::new();
        for (idx, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(idx);
            if present.contains(l) && present.contains(r) {
                local.push((l, r, piece_score));
            }
        }
        // sorted(key=(vocab[l], vocab[r]), reverse=True): stable, descending.
        local.sort_by(|a, b| {
            let ka = (score[a.0], score[a.1]);
            let kb = (score[b.0], score[b.1]);
            kb.partial_cmp(&ka).unwrap_or(std::cmp::Ordering::Equal)
        });
        merges.extend(local);
    }
    merges.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap_or(std::cmp::Ordering::Equal));
    Ok(merges
        .into_iter()
        .map(|(l, r, _)| [l.to_string(), r.to_string()])
        .collect())
}
