//! Chat examples: the rendered conversation and the tokens of its assistant turns.

use super::IGNORE_INDEX;
use crate::tokenize::{ChatMessage, Tokenizer};
use crate::{Error, Result};

/// One assistant turn of the rendered text, in byte offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Turn {
    /// Where the text the model must produce starts (after the role header).
    start: usize,
    /// The end of the message content (`start` when it could not be located).
    content_end: usize,
    /// Where the next part of the conversation starts: the end-of-turn token is looked for in
    /// `content_end..end`.
    end: usize,
    /// Label everything up to `end` when no end-of-turn token is found (the turn's bounds
    /// are known exactly); otherwise only the content.
    whole_if_no_eot: bool,
}

/// Token ids of the rendered conversation and labels that are -100 outside assistant turns.
pub(super) fn encode(tok: &Tokenizer, messages: &[ChatMessage]) -> Result<(Vec<u32>, Vec<i64>)> {
    encode_with(tok, messages, false)
}

/// [`encode`]; `search_only` skips the prefix renderings (for tests of the fallback).
pub(super) fn encode_with(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    search_only: bool,
) -> Result<(Vec<u32>, Vec<i64>)> {
    let full = tok.apply_chat_template(messages, false)?;
    let enc = tok.hf().encode(full.as_str(), false).map_err(|e| {
        Error::Tokenizer(format!(
            "encoding the rendered conversation ({} bytes): {e}",
            full.len()
        ))
    })?;
    let ids = enc.get_ids().to_vec();
    let offsets = enc.get_offsets();
    let by_prefix = if search_only {
        None
    } else {
        turns_by_prefix(tok, messages, &full)
    };
    let turns = match by_prefix {
        Some(t) => t,
        None => turns_by_search(messages, &full)?,
    };
    let eot = tok.eos_ids();
    let mut labels = vec![IGNORE_INDEX; ids.len()];
    for turn in turns {
        let mut tail = Vec::new();
        let mut found_eot = false;
        for (t, &(a, b)) in offsets.iter().enumerate() {
            // A token that overlaps the content (or starts inside it) is a target.
            let in_content = a < turn.content_end && (b > turn.start || a >= turn.start);
            if in_content {
                labels[t] = ids[t] as i64;
            } else if a >= turn.content_end && a < turn.end && b > turn.start {
                tail.push(t);
                if eot.contains(&ids[t]) {
                    found_eot = true;
                    break;
                }
            } else if a >= turn.end {
                break;
            }
        }
        if found_eot || turn.whole_if_no_eot {
            for t in tail {
                labels[t] = ids[t] as i64;
            }
        }
    }
    Ok((ids, labels))
}

/// The assistant turns from prefix renderings: turn `i` runs from the end of
/// `render(messages[..i], add_generation_prompt=true)` to the end of
/// `render(messages[..=i], false)`. `None` when a prefix is not a prefix of `full`.
fn turns_by_prefix(tok: &Tokenizer, messages: &[ChatMessage], full: &str) -> Option<Vec<Turn>> {
    let mut turns = Vec::new();
    let mut prev_end = 0;
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = tok.apply_chat_template(&messages[..i], true).ok()?;
        let through = tok.apply_chat_template(&messages[..=i], false).ok()?;
        if !full.starts_with(&before)
            || !full.starts_with(&through)
            || before.len() > through.len()
            || before.len() < prev_end
        {
            return None;
        }
        let (start, end) = (before.len(), through.len());
        let content = m.content.trim();
        let content_end = if content.is_empty() {
            start
        } else {
            // Templates may write something before the content that the model must produce
            // too (it is after the generation prompt): label from `start`.
            full[start..end]
                .find(content)
                .map_or(start, |p| start + p + content.len())
        };
        turns.push(Turn {
            start,
            content_end,
            end,
            whole_if_no_eot: true,
        });
        prev_end = end;
    }
    Some(turns)
}

/// The assistant turns by looking up every message's content, in order, in `full`. The turn
/// is the content and the first end-of-turn token before the next message's content.
fn turns_by_search(messages: &[ChatMessage], full: &str) -> Result<Vec<Turn>> {
    let mut cursor = 0;
    let mut spans = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let content = m.content.trim();
        let Some(p) = full[cursor..].find(content) else {
            return Err(Error::Template(format!(
                "cannot find the content of messages[{i}] ({}) in the rendered conversation \
                 (the chat template changes it), so the assistant turns cannot be located",
                m.role
            )));
        };
        spans.push((cursor + p, cursor + p + content.len()));
        cursor += p + content.len();
    }
    let mut turns = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        // An empty assistant message cannot be told from its surroundings: no target.
        if m.role != "assistant" || m.content.trim().is_empty() {
            continue;
        }
        let (start, content_end) = spans[i];
        let end = spans.get(i + 1).map_or(full.len(), |s| s.0);
        turns.push(Turn {
            start,
            content_end,
            end,
            whole_if_no_eot: false,
        });
    }
    Ok(turns)
}
