//! The JSONL reader: one example per line, four formats, errors that name the line.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::{Map, Value};

use super::{chat, DataOptions, Example, LoadStats, IGNORE_INDEX};
use crate::tokenize::{ChatMessage, Tokenizer};
use crate::{Error, Result};

/// Roles a chat line may use.
const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

/// Reads a JSONL training file. Each non-blank line is one JSON object in one of these
/// formats (other keys, such as `"references"` or `"schema"`, are ignored; formats may be
/// mixed in one file):
///
/// - `{"prompt": str, "completion": str}`: `encode(prompt, true) ++ encode(completion, false)
///   [++ EOS]`, loss on the completion (and EOS) only. See [`encode_prompt_completion`].
/// - `{"messages": [{"role": str, "content": str}, ...]}`: rendered with the chat template
///   (no generation prompt), loss on the assistant turns only. See [`encode_messages`].
/// - `{"text": str}`: `encode(text, true) [++ EOS]`, loss on every token.
/// - `{"input_ids": [int], "labels": [int]}`: pre-tokenised; `labels` is optional (default:
///   the ids), must have the same length and may hold -100; ids must be in the vocabulary.
///
/// Examples longer than `opts.max_seq_len` keep their beginning; examples left without a
/// target token are dropped. Both are counted in [`LoadStats`] for the caller to report.
/// A malformed line is an error that names the file and the (1-based) line; so is a file
/// without any example line.
pub fn load_jsonl(
    path: &Path,
    tok: &Tokenizer,
    opts: &DataOptions,
) -> Result<(Vec<Example>, LoadStats)> {
    if opts.max_seq_len == 0 {
        return Err(Error::Invalid("max_seq_len must be at least 1".into()));
    }
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = BufReader::new(file);
    let mut stats = LoadStats::default();
    let mut examples = Vec::new();
    let mut lines = 0usize;
    for (i, line) in reader.split(b'\n').enumerate() {
        let n = i + 1;
        let bytes = line.map_err(|e| Error::io(path, e))?;
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            line_error(
                path,
                n,
                format!(
                    "not valid UTF-8 (bad byte at column {})",
                    e.valid_up_to() + 1
                ),
            )
        })?;
        let text = if n == 1 {
            text.strip_prefix('\u{feff}').unwrap_or(text)
        } else {
            text
        };
        if text.trim().is_empty() {
            continue;
        }
        lines += 1;
        let value: Value = serde_json::from_str(text).map_err(|e| {
            let full = e.to_string();
            let suffix = format!(" at line {} column {}", e.line(), e.column());
            let msg = full.strip_suffix(&suffix).unwrap_or(&full);
            line_error(
                path,
                n,
                format!("invalid JSON at column {}: {msg}", e.column()),
            )
        })?;
        let mut ex = parse_line(&value, tok, opts).map_err(|msg| line_error(path, n, msg))?;
        if ex.truncate(opts.max_seq_len) {
            stats.truncated += 1;
        }
        let targets = ex.target_tokens();
        if targets == 0 {
            stats.dropped_no_target += 1;
            continue;
        }
        stats.target_tokens += targets;
        examples.push(ex);
    }
    if lines == 0 {
        return Err(Error::format(
            path,
            "no examples: the file is empty or has only blank lines",
        ));
    }
    stats.examples = examples.len();
    Ok((examples, stats))
}

fn line_error(path: &Path, line: usize, msg: impl std::fmt::Display) -> Error {
    Error::format(path, format!("line {line}: {msg}"))
}

/// "a string", "a number", ... for messages about wrong types.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn get_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("'{key}' must be a string, got {}", kind(other))),
        None => Err(format!("missing '{key}'")),
    }
}

const FORMATS_HINT: &str = "expected {\"prompt\", \"completion\"}, {\"messages\"}, {\"text\"} \
                            or {\"input_ids\"[, \"labels\"]}";

/// One line's example, or what is wrong with it.
fn parse_line(value: &Value, tok: &Tokenizer, opts: &DataOptions) -> Result<Example, String> {
    let Some(obj) = value.as_object() else {
        return Err(format!(
            "not a JSON object but {} ({FORMATS_HINT})",
            kind(value)
        ));
    };
    let has = |k: &str| obj.contains_key(k);
    let mut formats = Vec::new();
    if has("prompt") || has("completion") {
        formats.push("prompt/completion");
    }
    if has("messages") {
        formats.push("messages");
    }
    if has("text") {
        formats.push("text");
    }
    if has("input_ids") || has("labels") {
        formats.push("input_ids");
    }
    let tok_err = |e: Error| e.to_string();
    match formats.as_slice() {
        [] => {
            let keys: Vec<String> = obj.keys().map(|k| format!("{k:?}")).collect();
            Err(format!(
                "none of the known formats ({FORMATS_HINT}); the keys are [{}]",
                keys.join(", ")
            ))
        }
        ["prompt/completion"] => {
            if !has("prompt") {
                return Err("'completion' without 'prompt'".into());
            }
            if !has("completion") {
                return Err("'prompt' without 'completion'".into());
            }
            let prompt = get_str(obj, "prompt")?;
            let completion = get_str(obj, "completion")?;
            encode_prompt_completion(tok, prompt, completion, opts.add_eos).map_err(tok_err)
        }
        ["messages"] => {
            let msgs = parse_messages(&obj["messages"])?;
            encode_messages(tok, &msgs).map_err(tok_err)
        }
        ["text"] => {
            let text = get_str(obj, "text")?;
            encode_text(tok, text, opts.add_eos).map_err(tok_err)
        }
        ["input_ids"] => parse_pretokenised(obj, tok.vocab_size()),
        several => Err(format!(
            "ambiguous: has the keys of several formats ({})",
            several.join(", ")
        )),
    }
}

fn parse_messages(v: &Value) -> Result<Vec<ChatMessage>, String> {
    let Value::Array(list) = v else {
        return Err(format!("'messages' must be an array, got {}", kind(v)));
    };
    if list.is_empty() {
        return Err("'messages' is empty".into());
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(format!(
                "messages[{i}] must be an object with 'role' and 'content', got {}",
                kind(m)
            ));
        };
        let role = get_str(m, "role").map_err(|e| format!("messages[{i}]: {e}"))?;
        if !ROLES.contains(&role) {
            return Err(format!(
                "messages[{i}]: unknown role {role:?} (expected one of {})",
                ROLES.join(", ")
            ));
        }
        let content = get_str(m, "content").map_err(|e| format!("messages[{i}]: {e}"))?;
        out.push(ChatMessage::new(role, content));
    }
    Ok(out)
}

fn int_list(obj: &Map<String, Value>, key: &str) -> Result<Option<Vec<i64>>, String> {
    let Some(v) = obj.get(key) else {
        return Ok(None);
    };
    let Value::Array(list) = v else {
        return Err(format!(
            "'{key}' must be an array of integers, got {}",
            kind(v)
        ));
    };
    list.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_i64()
                .ok_or_else(|| format!("'{key}'[{i}] must be an integer, got {}", kind(x)))
        })
        .collect::<Result<Vec<i64>, String>>()
        .map(Some)
}

fn parse_pretokenised(obj: &Map<String, Value>, vocab: usize) -> Result<Example, String> {
    let Some(ids) = int_list(obj, "input_ids")? else {
        return Err("'labels' without 'input_ids'".into());
    };
    if ids.is_empty() {
        return Err("'input_ids' is empty".into());
    }
    let mut input_ids = Vec::with_capacity(ids.len());
    for (i, &id) in ids.iter().enumerate() {
        if id < 0 || id as u64 >= vocab as u64 {
            return Err(format!(
                "'input_ids'[{i}] = {id} is out of the vocabulary (0..{vocab})"
            ));
        }
        input_ids.push(id as u32);
    }
    let labels = match int_list(obj, "labels")? {
        None => ids,
        Some(labels) => {
            if labels.len() != input_ids.len() {
                return Err(format!(
                    "'labels' has {} entries but 'input_ids' has {}; they must have the same length",
                    labels.len(),
                    input_ids.len()
                ));
            }
            if let Some((i, l)) = labels
                .iter()
                .enumerate()
                .find(|(_, &l)| l != IGNORE_INDEX && (l < 0 || l as u64 >= vocab as u64))
            {
                return Err(format!(
                    "'labels'[{i}] = {l} is neither -100 nor in the vocabulary (0..{vocab})"
                ));
            }
            labels
        }
    };
    Ok(Example { input_ids, labels })
}

fn eos(tok: &Tokenizer) -> Result<u32> {
    tok.eos_id().ok_or_else(|| {
        Error::Invalid("the tokenizer has no EOS token to append (turn add_eos off)".into())
    })
}

/// `encode(prompt, true) ++ encode(completion, false) [++ EOS]`, labels -100 over the prompt
/// tokens.
///
/// Prompt and completion are tokenised *separately*: the prompt with the tokenizer's special
/// tokens (a BOS where the tokenizer adds one), the completion without. The prompt/target
/// boundary is then always a token boundary, so the mask is exact, and the prompt tokens are
/// exactly those a user gets at inference time by encoding the same prompt. (Tokenising
/// `prompt + completion` together could merge characters across the boundary, as TRL warns
/// about.) Put a separating space at the start of the completion, not the end of the prompt:
/// byte-level BPE tokenisers join a leading space to the following word (`" The"` is one
/// token), as in running text.
pub fn encode_prompt_completion(
    tok: &Tokenizer,
    prompt: &str,
    completion: &str,
    add_eos: bool,
) -> Result<Example> {
    let mut input_ids = tok.encode(prompt, true)?;
    let n_prompt = input_ids.len();
    input_ids.extend(tok.encode(completion, false)?);
    if add_eos {
        input_ids.push(eos(tok)?);
    }
    let labels = input_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            if i < n_prompt {
                IGNORE_INDEX
            } else {
                id as i64
            }
        })
        .collect();
    Ok(Example { input_ids, labels })
}

/// `encode(text, true) [++ EOS]`, loss on every token.
pub fn encode_text(tok: &Tokenizer, text: &str, add_eos: bool) -> Result<Example> {
    let mut input_ids = tok.encode(text, true)?;
    if add_eos {
        input_ids.push(eos(tok)?);
    }
    let labels = input_ids.iter().map(|&id| id as i64).collect();
    Ok(Example { input_ids, labels })
}

/// A conversation rendered with the tokenizer's chat template (no generation prompt) and
/// encoded without added special tokens (the template writes any BOS itself, as
/// transformers' `apply_chat_template(tokenize=True)` assumes). Loss on the assistant turns:
/// each assistant message's content and the end-of-turn token after it (`<|im_end|>`,
/// `<|eot_id|>`, EOS, ...), not the role header, nor anything between turns.
///
/// The assistant spans are found in characters and mapped to tokens by their offsets: for an
/// assistant message `i`, the turn starts where the rendering of `messages[..i]` with a
/// generation prompt ends and ends where that of `messages[..=i]` without one does (both
/// prefixes of the full rendering for templates such as ChatML, Llama 3, Gemma). For
/// templates whose prefixes are not prefixes of the whole (a default system prompt before an
/// assistant-first conversation, history rewriting), the message contents are looked up in
/// order in the rendered text instead.
pub fn encode_messages(tok: &Tokenizer, messages: &[ChatMessage]) -> Result<Example> {
    let (input_ids, labels) = chat::encode(tok, messages)?;
    Ok(Example { input_ids, labels })
}
