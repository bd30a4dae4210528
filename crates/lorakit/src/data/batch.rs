//! Batching: file order or a seeded, length-grouped shuffle; right padding.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::{count_targets, Example, IGNORE_INDEX};
use crate::{Error, Result};

/// A shuffled epoch is cut into mega-batches of `MEGA_BATCH * batch_size` examples, each
/// sorted by length before it is cut into batches.
pub const MEGA_BATCH: usize = 50;

/// Examples padded on the right to the longest of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// `[batch_size, seq_len]`, row-major, padded with the pad id.
    pub input_ids: Vec<u32>,
    /// `[batch_size, seq_len]`, row-major, -100 on padding.
    pub labels: Vec<i64>,
    pub batch_size: usize,
    pub seq_len: usize,
    /// The unpadded length of each row.
    pub lengths: Vec<usize>,
    /// Labels that count after the next-token shift (positions `t >= 1` of each row that are
    /// not -100): the loss normaliser.
    pub target_tokens: usize,
    /// Index of each row's example in the data the [`Batcher`] was given.
    pub indices: Vec<usize>,
}

impl Batch {
    /// Row `b` of the ids (padding included).
    pub fn row_ids(&self, b: usize) -> &[u32] {
        &self.input_ids[b * self.seq_len..(b + 1) * self.seq_len]
    }

    /// Row `b` of the labels (padding included).
    pub fn row_labels(&self, b: usize) -> &[i64] {
        &self.labels[b * self.seq_len..(b + 1) * self.seq_len]
    }
}

/// Groups examples into batches, epoch after epoch.
///
/// Without shuffling, batch `k` holds examples `k*B .. k*B+B` in file order (the last batch
/// may be smaller), every epoch.
///
/// With shuffling, epoch `e` is reproducible from `(seed, e)` alone: a random permutation of
/// the examples (from `StdRng::seed_from_u64(seed ^ mix(e))`) is cut into mega-batches of
/// [`MEGA_BATCH`]` * B` examples; each mega-batch is sorted by length (stable, so equal lengths
/// keep the shuffled order) and cut into batches of `B`, so that examples of similar length
/// share a batch and little is padded; finally the order of all the batches is shuffled with
/// the same generator. Only the very last batch of the last mega-batch may be smaller than
/// `B`. (The generator is rand's `StdRng`, pinned by Cargo.lock.)
#[derive(Debug, Clone)]
pub struct Batcher {
    examples: Vec<Example>,
    batch_size: usize,
    shuffle: bool,
    seed: u64,
    pad_id: u32,
}

impl Batcher {
    /// Fails when there are no examples, `batch_size` is 0, or an example is empty or has
    /// labels of another length than its ids. The pad id is 0 until [`Batcher::with_pad_id`]
    /// (padding is masked out of the loss and, with right padding and causal attention,
    /// cannot affect the real tokens, so its value only matters for tidiness).
    pub fn new(
        examples: Vec<Example>,
        batch_size: usize,
        shuffle: bool,
        seed: u64,
    ) -> Result<Batcher> {
        if batch_size == 0 {
            return Err(Error::Invalid("batch size must be at least 1".into()));
        }
        if examples.is_empty() {
            return Err(Error::Invalid("no training examples to batch".into()));
        }
        for (i, ex) in examples.iter().enumerate() {
            if ex.input_ids.is_empty() {
                return Err(Error::Invalid(format!("example {i} has no tokens")));
            }
            if ex.labels.len() != ex.input_ids.len() {
                return Err(Error::Invalid(format!(
                    "example {i} has {} labels for {} tokens",
                    ex.labels.len(),
                    ex.input_ids.len()
                )));
            }
        }
        Ok(Batcher {
            examples,
            batch_size,
            shuffle,
            seed,
            pad_id: 0,
        })
    }

    /// The id written into padding positions (e.g. `tok.pad_id().or(tok.eos_id())`).
    pub fn with_pad_id(mut self, pad_id: u32) -> Self {
        self.pad_id = pad_id;
        self
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// `ceil(examples / batch_size)`.
    pub fn batches_per_epoch(&self) -> usize {
        self.examples.len().div_ceil(self.batch_size)
    }

    /// The example indices of each batch of epoch `epoch` (see the type's documentation).
    pub fn epoch_order(&self, epoch: usize) -> Vec<Vec<usize>> {
        let n = self.examples.len();
        let b = self.batch_size;
        if !self.shuffle {
            return (0..n)
                .step_by(b)
                .map(|s| (s..(s + b).min(n)).collect())
                .collect();
        }
        let mix = (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = StdRng::seed_from_u64(self.seed ^ mix);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        let mut batches = Vec::with_capacity(self.batches_per_epoch());
        for mega in order.chunks_mut(MEGA_BATCH * b) {
            mega.sort_by_key(|&i| self.examples[i].len());
            batches.extend(mega.chunks(b).map(|c| c.to_vec()));
        }
        batches.shuffle(&mut rng);
        batches
    }

    /// The batches of epoch `epoch`, each padded to its own longest example.
    pub fn epoch(&self, epoch: usize) -> Vec<Batch> {
        self.epoch_order(epoch)
            .iter()
            .map(|idx| self.batch(idx))
            .collect()
    }

    /// A batch of the given examples, right-padded to the longest. Panics on an index out of
    /// range (indices come from [`Batcher::epoch_order`]).
    pub fn batch(&self, indices: &[usize]) -> Batch {
        let seq_len = indices
            .iter()
            .map(|&i| self.examples[i].len())
            .max()
            .unwrap_or(0);
        let rows = indices.len();
        let mut input_ids = vec![self.pad_id; rows * seq_len];
        let mut labels = vec![IGNORE_INDEX; rows * seq_len];
        let mut lengths = Vec::with_capacity(rows);
        let mut target_tokens = 0;
        for (r, &i) in indices.iter().enumerate() {
            let ex = &self.examples[i];
            let at = r * seq_len;
            input_ids[at..at + ex.len()].copy_from_slice(&ex.input_ids);
            labels[at..at + ex.len()].copy_from_slice(&ex.labels);
            lengths.push(ex.len());
            target_tokens += count_targets(&ex.labels);
        }
        Batch {
            input_ids,
            labels,
            batch_size: rows,
            seq_len,
            lengths,
            target_tokens,
            indices: indices.to_vec(),
        }
    }
}
