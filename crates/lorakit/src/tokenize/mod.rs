//! Tokenizers (from tokenizer.json or GGUF metadata) and chat templates.
//!
//! Both sources end up as a Hugging Face `tokenizers` tokenizer, so encoding and decoding are
//! byte-exact with `transformers` (`tokenizer(text)`, `tokenizer.decode(ids)` with
//! `clean_up_tokenization_spaces=False`). Special-token text in the input (`<|im_start|>`) is
//! parsed as the special token, as transformers does. Chat templates are rendered as
//! transformers renders them (see [`template`]).

mod gguf;
pub mod ollama;
mod template;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use minijinja::value::Value;
use serde::{Deserialize, Serialize};

pub use gguf::{
    GgufTokenizerSpec, GEMMA_ARCHITECTURES, TOKEN_TYPE_BYTE, TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_UNUSED, TOKEN_TYPE_USER_DEFINED,
};

use crate::{Error, Result};
use template::ChatTemplate;

/// One message of a conversation, as in transformers' `messages=[{"role": ..., "content": ...}]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Texts of end-of-turn / end-of-generation tokens (llama.cpp's list): when the vocabulary has
/// one of them as a special token, generation stops on it as on EOS.
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<|return|>",
    "<｜end▁of▁sentence｜>",
];

/// A tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// "BPE byte-level (...)", "SentencePiece-BPE with byte fallback (...)", ...
    kind: String,
    /// Anything the user should know about how this tokenizer was built.
    note: Option<String>,
    source: PathBuf,
    vocab_size: usize,
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
    pad: Option<(String, u32)>,
    unk: Option<(String, u32)>,
    eos_ids: Vec<u32>,
    adds_bos: bool,
    template: Option<ChatTemplate>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("kind", &self.kind)
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eos_ids", &self.eos_ids)
            .field("chat_template", &self.template)
            .finish()
    }
}

impl Clone for Tokenizer {
    fn clone(&self) -> Self {
        Tokenizer {
            inner: self.inner.clone(),
            kind: self.kind.clone(),
            note: self.note.clone(),
            source: self.source.clone(),
            vocab_size: self.vocab_size,
            bos: self.bos.clone(),
            eos: self.eos.clone(),
            pad: self.pad.clone(),
            unk: self.unk.clone(),
            eos_ids: self.eos_ids.clone(),
            adds_bos: self.adds_bos,
            template: self
                .template
                .as_ref()
                .map(|t| ChatTemplate::new(t.source().to_string())),
        }
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))
}

/// `"<s>"`, `{"content": "<s>", ...}` or null, as tokenizer_config.json writes special tokens.
fn special_token_text(cfg: &serde_json::Value, key: &str, path: &Path) -> Result<Option<String>> {
    match cfg.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Object(o)) => match o.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::config(
                path,
                key,
                "an object without a string 'content'",
            )),
        },
        Some(other) => Err(Error::config(
            path,
            key,
            format!("expected a string, got {other}"),
        )),
    }
}

/// `eos_token_id` of config.json / generation_config.json: a number or a list of numbers.
fn ids_of(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl Tokenizer {
    /// tokenizer.json (+ tokenizer_config.json for bos/eos/pad tokens, chat_template either
    /// inside tokenizer_config.json or in chat_template.jinja) from an HF model directory.
    /// generation_config.json / config.json `eos_token_id`s are added to [`Tokenizer::eos_ids`].
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer> {
        let tok_path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&tok_path).map_err(|e| Error::io(&tok_path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            Error::format(
                &tok_path,
                format!("not a valid Hugging Face tokenizer.json: {e}"),
            )
        })?;
        drop(bytes);

        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.is_file() {
            read_json(&cfg_path)?
        } else {
            serde_json::Value::Object(Default::default())
        };
        let lookup = |key: &str| -> Result<Option<(String, u32)>> {
            let Some(text) = special_token_text(&cfg, key, &cfg_path)? else {
                return Ok(None);
            };
            match inner.token_to_id(&text) {
                Some(id) => Ok(Some((text, id))),
                None => Err(Error::config(
                    &cfg_path,
                    key,
                    format!("{text:?} is not a token of {}", tok_path.display()),
                )),
            }
        };
        let bos = lookup("bos_token")?;
        let eos = lookup("eos_token")?;
        // A pad or unk token that the vocabulary lacks is ignored (it is not needed to
        // tokenize, and some configs name one that was never added).
        let pad = lookup("pad_token").ok().flatten();
        let unk = lookup("unk_token").ok().flatten();

        // The chat template: chat_template.jinja wins over tokenizer_config.json's (as in
        // transformers); a list of named templates gives its "default" one.
        let jinja_path = dir.join("chat_template.jinja");
        let template_src = if jinja_path.is_file() {
            Some(std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?)
        } else {
            match cfg.get("chat_template") {
                None | Some(serde_json::Value::Null) => {
                    let json_path = dir.join("chat_template.json");
                    if json_path.is_file() {
                        match read_json(&json_path)?.get("chat_template") {
                            Some(serde_json::Value::String(s)) => Some(s.clone()),
                            _ => {
                                return Err(Error::config(
                                    &json_path,
                                    "chat_template",
                                    "expected a string",
                                ))
                            }
                        }
                    } else {
                        None
                    }
                }
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(list)) => {
                    let named = |name: &str| {
                        list.iter()
                            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
                    };
                    let chosen = named("default").or(list.first());
                    match chosen
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str())
                    {
                        Some(s) => Some(s.to_string()),
                        None => {
                            return Err(Error::config(
                                &cfg_path,
                                "chat_template",
                                "a list without a {name, template} entry",
                            ))
                        }
                    }
                }
                Some(other) => {
                    return Err(Error::config(
                        &cfg_path,
                        "chat_template",
                        format!("expected a string or a list, got {other}"),
                    ))
                }
            }
        };

        let mut extra_eos = Vec::new();
        for name in ["generation_config.json", "config.json"] {
            let p = dir.join(name);
            if p.is_file() {
                if let Ok(v) = read_json(&p) {
                    extra_eos.extend(ids_of(v.get("eos_token_id")));
                }
            }
        }

        let kind = describe_kind(&inner);
        Ok(Tokenizer::assemble(
            inner,
            kind,
            None,
            tok_path,
            None,
            [bos, eos, pad, unk],
            extra_eos,
            template_src,
        ))
    }

    /// Build from GGUF tokenizer metadata. `source` (the GGUF file) only names the file in
    /// errors.
    pub fn from_gguf_spec(spec: GgufTokenizerSpec, source: &Path) -> Result<Tokenizer> {
        Self::from_gguf_spec_for(spec, None, source)
    }

    /// The tokenizer of an open GGUF file, built as transformers builds it for the file's
    /// `general.architecture` (Gemma files get Gemma's tokenizer; see [`GgufTokenizerSpec`]).
    pub fn from_gguf(gguf: &crate::io::gguf::GgufFile) -> Result<Tokenizer> {
        let spec = GgufTokenizerSpec::from_gguf(gguf)?;
        let arch = gguf.get("general.architecture").and_then(|v| v.as_str());
        Self::from_gguf_spec_for(spec, arch, gguf.path())
    }

    /// [`Tokenizer::from_gguf_spec`] for a file of architecture `architecture`
    /// (`general.architecture`), which picks transformers' per-architecture builder where it has
    /// one (`gemma`, `gemma2`, `gemma3`); `None` builds by `tokenizer.ggml.model` alone.
    pub fn from_gguf_spec_for(
        spec: GgufTokenizerSpec,
        architecture: Option<&str>,
        source: &Path,
    ) -> Result<Tokenizer> {
        let (doc, info) = gguf::tokenizer_json(&spec, architecture, source)?;
        let text = serde_json::to_vec(&doc).map_err(|e| Error::Tokenizer(e.to_string()))?;
        drop(doc);
        let inner = tokenizers::Tokenizer::from_bytes(&text).map_err(|e| {
            Error::format(
                source,
                format!(
                    "cannot build a '{}' tokenizer from the GGUF metadata: {e}",
                    spec.model
                ),
            )
        })?;
        let named = |id: Option<u32>| id.map(|id| (spec.tokens[id as usize].clone(), id));
        let specials = [
            named(spec.bos_id),
            named(spec.eos_id),
            named(spec.pad_id),
            named(spec.unk_id),
        ];
        let n = spec.tokens.len();
        Ok(Tokenizer::assemble(
            inner,
            info.kind,
            info.note,
            source.to_path_buf(),
            Some(n),
            specials,
            Vec::new(),
            spec.chat_template,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        inner: tokenizers::Tokenizer,
        kind: String,
        note: Option<String>,
        source: PathBuf,
        vocab_size: Option<usize>,
        [bos, eos, pad, unk]: [Option<(String, u32)>; 4],
        extra_eos: Vec<u32>,
        template_src: Option<String>,
    ) -> Tokenizer {
        let vocab_size = vocab_size.unwrap_or_else(|| inner.get_vocab_size(true));
        let mut eos_ids: Vec<u32> = eos.iter().map(|(_, id)| *id).collect();
        eos_ids.extend(extra_eos);
        let added = inner.get_added_tokens_decoder();
        let mut specials: Vec<(u32, &tokenizers::AddedToken)> = added
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (*id, t))
            .collect();
        specials.sort_by_key(|(id, _)| *id);
        for text in END_OF_TURN_TOKENS {
            if let Some((id, _)) = specials.iter().find(|(_, t)| t.content == *text) {
                eos_ids.push(*id);
            }
        }
        let mut seen = std::collections::HashSet::new();
        eos_ids.retain(|id| seen.insert(*id));

        let adds_bos = match &bos {
            Some((_, id)) => inner
                .encode_fast("", true)
                .map(|e| e.get_ids().first() == Some(id))
                .unwrap_or(false),
            None => false,
        };
        Tokenizer {
            inner,
            kind,
            note,
            source,
            vocab_size,
            bos,
            eos,
            pad,
            unk,
            eos_ids,
            adds_bos,
            template: template_src.map(ChatTemplate::new),
        }
    }

    /// Token ids of `text`. With `add_special_tokens`, whatever the tokenizer's post-processor
    /// adds (a BOS for Llama-style tokenizers; nothing for SmolLM2). Special-token text in
    /// `text` is parsed as the special token.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("encoding {} bytes of text: {e}", text.len())))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`; with `skip_special_tokens`, special tokens are left out. Ids outside
    /// the vocabulary are an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(Error::Tokenizer(format!(
                "token id {bad} is not in the vocabulary ({} tokens)",
                self.vocab_size
            )));
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("decoding {} ids: {e}", ids.len())))
    }

    /// The number of token ids (the model's embedding rows for a GGUF tokenizer).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    /// The token's vocabulary string (byte-level form, e.g. `"Ġworld"`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|(_, id)| *id)
    }

    /// Whether `encode(text, true)` starts with the BOS token.
    pub fn adds_bos(&self) -> bool {
        self.adds_bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|(_, id)| *id)
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad.as_ref().map(|(_, id)| *id)
    }

    pub fn unk_id(&self) -> Option<u32> {
        self.unk.as_ref().map(|(_, id)| *id)
    }

    /// EOS first, then every other id that ends a turn: `eos_token_id`s of the HF configs and
    /// the vocabulary's special end-of-turn tokens (`<|im_end|>`, `<|eot_id|>`,
    /// `<|endoftext|>`, `<end_of_turn>`, ...). Generation stops on any of them.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|(t, _)| t.as_str())
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|(t, _)| t.as_str())
    }

    /// Whether `id` is a special (added) token, which `decode(.., true)` leaves out.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_vocabulary()
            .simple_id_to_token(id)
            .is_some_and(|t| self.inner.get_added_vocabulary().is_special_token(&t))
    }

    /// The chat template's Jinja source.
    pub fn chat_template(&self) -> Option<&str> {
        self.template.as_ref().map(|t| t.source())
    }

    /// Renders the chat template as `tokenizer.apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` does. The result already holds any BOS the template writes:
    /// encode it with `add_special_tokens = false` unless the tokenizer adds none anyway.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_object(template::OrderedMap(vec![
                    (Value::from("role"), Value::from(m.role.as_str())),
                    (Value::from("content"), Value::from(m.content.as_str())),
                ]))
            })
            .collect();
        self.render_template(Value::from(msgs), add_generation_prompt, BTreeMap::new())
    }

    /// Like [`Tokenizer::apply_chat_template`] for messages of any shape (tool calls, content
    /// lists, ...) and extra template variables (`tools`, `documents`, `enable_thinking`, ...).
    /// JSON objects keep their key order.
    pub fn apply_chat_template_json(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let extra = extra
            .iter()
            .map(|(k, v)| (k.clone(), template::json_to_value(v)))
            .collect();
        self.render_template(
            template::json_to_value(messages),
            add_generation_prompt,
            extra,
        )
    }

    fn render_template(
        &self,
        messages: Value,
        add_generation_prompt: bool,
        extra: BTreeMap<String, Value>,
    ) -> Result<String> {
        let Some(t) = &self.template else {
            return Err(Error::Template(format!(
                "{} has no chat template",
                self.source.display()
            )));
        };
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        for (key, tok) in [
            ("bos_token", &self.bos),
            ("eos_token", &self.eos),
            ("pad_token", &self.pad),
            ("unk_token", &self.unk),
        ] {
            if let Some((text, _)) = tok {
                ctx.insert(key.to_string(), Value::from(text.as_str()));
            }
        }
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        ctx.extend(extra);
        ctx.insert("messages".into(), messages);
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        t.render(ctx)
    }

    /// One line for `lorakit inspect`: kind, vocabulary size, special tokens, chat template.
    pub fn describe(&self) -> String {
        let mut s = format!("{}, vocab {}", self.kind, self.vocab_size);
        let tok = |t: &Option<(String, u32)>| t.as_ref().map(|(t, id)| format!("{t:?} ({id})"));
        if let Some(b) = tok(&self.bos) {
            s += &format!(
                ", bos {b}{}",
                if self.adds_bos {
                    " added by encode"
                } else {
                    " not added by encode"
                }
            );
        }
        if let Some(e) = tok(&self.eos) {
            s += &format!(", eos {e}");
        }
        if self.eos_ids.len() > 1 {
            s += &format!(", stop ids {:?}", self.eos_ids);
        }
        if let Some(p) = tok(&self.pad) {
            s += &format!(", pad {p}");
        }
        if let Some(u) = tok(&self.unk) {
            s += &format!(", unk {u}");
        }
        let added = self.inner.get_added_tokens_decoder();
        let mut specials: Vec<(u32, String)> = added
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (*id, t.content.clone()))
            .collect();
        specials.sort();
        const SHOW: usize = 6;
        let shown: Vec<String> = specials
            .iter()
            .take(SHOW)
            .map(|(id, t)| format!("{t}={id}"))
            .collect();
        s += &format!(
            ", {} special tokens [{}{}]",
            specials.len(),
            shown.join(" "),
            if specials.len() > SHOW { " ..." } else { "" }
        );
        let other_added = added.len() - specials.len();
        if other_added > 0 {
            s += &format!(", {other_added} added tokens");
        }
        match &self.template {
            Some(t) => s += &format!(", chat template ({} chars)", t.source().len()),
            None => s += ", no chat template",
        }
        if let Some(n) = &self.note {
            s += &format!("; note: {n}");
        }
        s
    }

    /// The underlying Hugging Face tokenizer.
    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// "BPE byte-level", "SentencePiece-BPE with byte fallback", ... from a tokenizer.json.
fn describe_kind(tok: &tokenizers::Tokenizer) -> String {
    use tokenizers::models::ModelWrapper;
    let has = |v: Option<String>, what: &str| v.is_some_and(|s| s.contains(&format!("\"{what}\"")));
    let pre = tok
        .get_pre_tokenizer()
        .and_then(|p| serde_json::to_string(p).ok());
    let dec = tok
        .get_decoder()
        .and_then(|d| serde_json::to_string(d).ok());
    let norm = tok
        .get_normalizer()
        .and_then(|n| serde_json::to_string(n).ok());
    let byte_level = has(pre.clone(), "ByteLevel") || has(dec.clone(), "ByteLevel");
    let metaspace = has(pre, "Metaspace") || has(norm, "Prepend") || has(dec, "ByteFallback");
    match tok.get_model() {
        ModelWrapper::BPE(bpe) if bpe.byte_fallback => {
            "SentencePiece-BPE with byte fallback".into()
        }
        ModelWrapper::BPE(_) if byte_level => "BPE byte-level".into(),
        ModelWrapper::BPE(_) if metaspace => "SentencePiece-BPE".into(),
        ModelWrapper::BPE(_) => "BPE".into(),
        ModelWrapper::Unigram(_) => "Unigram (SentencePiece)".into(),
        ModelWrapper::WordPiece(_) => "WordPiece".into(),
        ModelWrapper::WordLevel(_) => "WordLevel".into(),
    }
}

/// Incremental detokeniser for streaming generation: [`StreamDecoder::push`] returns the newly
/// completed text, never a partial UTF-8 character or a partial byte-fallback sequence.
///
/// It decodes a short window of ids (a few tokens of context before the new ones, so that
/// leading-space rules apply as in a full decode) and emits what the window's text gained.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the context window in `ids`.
    prefix: usize,
    /// End of the text already emitted.
    read: usize,
    skip_special_tokens: bool,
}

/// The byte length of the longest common prefix of `a` and `b` (on a character boundary).
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}

/// Tokens of prompt kept as context.
const STREAM_CONTEXT: usize = 6;

impl<'a> StreamDecoder<'a> {
    /// `prompt_ids`: the ids the generated ones follow (their text is not emitted).
    pub fn new(tok: &'a Tokenizer, prompt_ids: &[u32]) -> Self {
        let ids = prompt_ids[prompt_ids.len().saturating_sub(STREAM_CONTEXT)..].to_vec();
        let read = ids.len();
        StreamDecoder {
            tok,
            ids,
            prefix: 0,
            read,
            skip_special_tokens: false,
        }
    }

    /// Leave special tokens out of the text (default: keep them).
    pub fn skip_special_tokens(mut self, yes: bool) -> Self {
        self.skip_special_tokens = yes;
        self
    }

    /// Adds one generated id; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix_text = self
            .tok
            .decode(&self.ids[self.prefix..self.read], self.skip_special_tokens)?;
        let new_text = self
            .tok
            .decode(&self.ids[self.prefix..], self.skip_special_tokens)?;
        let common = common_prefix_len(&prefix_text, &new_text);
        if new_text.len() > common && !new_text.ends_with('\u{FFFD}') {
            // Normally `common == prefix_text.len()`. It is shorter when the context ended in
            // an incomplete character (U+FFFD) that the new id completes.
            let out = new_text[common..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            self.compact();
            Ok(out)
        } else {
            Ok(String::new())
        }
    }

    /// The text still held back (an incomplete character at the end of generation), with
    /// U+FFFD for the incomplete bytes, as a full decode would give.
    pub fn flush(&mut self) -> Result<String> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        let prefix_text = self
            .tok
            .decode(&self.ids[self.prefix..self.read], self.skip_special_tokens)?;
        let new_text = self
            .tok
            .decode(&self.ids[self.prefix..], self.skip_special_tokens)?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(new_text[common_prefix_len(&prefix_text, &new_text)..].to_string())
    }

    fn compact(&mut self) {
        if self.prefix > 4 * STREAM_CONTEXT {
            self.ids.drain(..self.prefix);
            self.read -= self.prefix;
            self.prefix = 0;
        }
    }
}

#[cfg(test)]
mod tests;
