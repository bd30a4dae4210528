//! Training data: JSONL formats, loss masks, batching.
//!
//! The training objective is the conditional log-likelihood of the *target* tokens. An
//! [`Example`] holds `input_ids` and `labels` of the same length, aligned as in Hugging Face
//! transformers: `labels[t] == input_ids[t]` where token `t` is a target, [`IGNORE_INDEX`]
//! (-100) elsewhere. The next-token shift is the trainer's job: the logits at position `t`
//! are scored against `labels[t + 1]`, so `labels[0]` never counts. [`Example::target_tokens`]
//! and [`Batch::target_tokens`] count the labels that do (positions `t >= 1`).
//!
//! [`load_jsonl`] reads the four line formats (prompt/completion, chat messages, plain text,
//! pre-tokenised ids); [`Batcher`] groups examples into right-padded batches, in file order or
//! in a seeded, length-grouped shuffle.

mod batch;
mod chat;
mod jsonl;

pub use batch::{pack_best_fit_decreasing, Batch, Batcher, Grouping, MEGA_BATCH};
pub use jsonl::{encode_messages, encode_prompt_completion, encode_text, load_jsonl};

use std::fmt;

/// The label of a token that carries no loss (PyTorch's `CrossEntropyLoss` `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// One training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`; [`IGNORE_INDEX`] (-100) where there is no loss.
    pub labels: Vec<i64>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// The labels that contribute to the loss after the next-token shift: positions `t >= 1`
    /// whose label is not [`IGNORE_INDEX`].
    pub fn target_tokens(&self) -> usize {
        count_targets(&self.labels)
    }

    /// Keeps the first `max_len` tokens (transformers' `truncation=True`); returns whether
    /// anything was cut.
    pub fn truncate(&mut self, max_len: usize) -> bool {
        if self.input_ids.len() > max_len {
            self.input_ids.truncate(max_len);
            self.labels.truncate(max_len);
            true
        } else {
            false
        }
    }
}

pub(crate) fn count_targets(labels: &[i64]) -> usize {
    labels
        .iter()
        .skip(1)
        .filter(|&&l| l != IGNORE_INDEX)
        .count()
}

/// How [`load_jsonl`] turns lines into examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOptions {
    /// Longer examples keep their first `max_seq_len` tokens (and are counted in
    /// [`LoadStats::truncated`]).
    pub max_seq_len: usize,
    /// Append the tokenizer's EOS token, as a target, to prompt/completion and text examples
    /// (so that the model learns to stop). Chat examples end with the template's end-of-turn
    /// token instead; pre-tokenised examples are used as they are.
    pub add_eos: bool,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            max_seq_len: 2048,
            add_eos: true,
        }
    }
}

/// What [`load_jsonl`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Examples returned.
    pub examples: usize,
    /// Lines longer than `max_seq_len` tokens whose end was cut (whether or not they were
    /// then dropped).
    pub truncated: usize,
    /// Target tokens of the returned examples (as [`Example::target_tokens`] counts them).
    pub target_tokens: usize,
    /// Lines left out because they had no target token (after truncation).
    pub dropped_no_target: usize,
}

impl LoadStats {
    /// Lines for the user about truncated or dropped examples (empty when there are none).
    pub fn warnings(&self, max_seq_len: usize) -> Vec<String> {
        let mut w = Vec::new();
        if self.truncated > 0 {
            w.push(format!(
                "{} example(s) longer than {max_seq_len} tokens were truncated (their end was cut)",
                self.truncated
            ));
        }
        if self.dropped_no_target > 0 {
            w.push(format!(
                "{} example(s) without any target token were dropped",
                self.dropped_no_target
            ));
        }
        w
    }
}

impl fmt::Display for LoadStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} examples, {} target tokens ({} truncated, {} dropped without targets)",
            self.examples, self.target_tokens, self.truncated, self.dropped_no_target
        )
    }
}

#[cfg(test)]
mod tests;
