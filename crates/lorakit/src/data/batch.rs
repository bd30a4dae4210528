//! Batching: file order or a seeded, length-grouped shuffle; right padding; or packing (several
//! whole examples per row, best-fit decreasing) and batches by token budget ([`Grouping`]).

use std::collections::BTreeSet;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::{count_targets, Example, IGNORE_INDEX};
use crate::engine::attention::Segments;
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
    /// Index of each example in the data the [`Batcher`] was given, row after row (one per row
    /// unless packed).
    pub indices: Vec<usize>,
    /// The examples packed into each row ([`Segments::unpacked`] for one example per row).
    pub segments: Segments,
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

/// How a [`Batcher`] forms micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// `batch_size` examples per micro-batch, one per row, right-padded to the longest.
    Examples,
    /// As many examples (one per row) as fit in `max_tokens` tokens, padding included
    /// (rows × longest ≤ max_tokens).
    Tokens { max_tokens: usize },
    /// Rows of up to `row_len` tokens filled with whole examples by best-fit decreasing (TRL's
    /// `bfd`), `rows` rows per micro-batch; each example attends only to itself.
    Packed { row_len: usize, rows: usize },
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
///
/// With [`Grouping::Tokens`] or [`Grouping::Packed`] ([`Batcher::with_grouping`]) the batches
/// (or packed rows) are formed once, and each shuffled epoch visits them in a new order.
#[derive(Debug, Clone)]
pub struct Batcher {
    examples: Vec<Example>,
    batch_size: usize,
    shuffle: bool,
    seed: u64,
    pad_id: u32,
    grouping: Grouping,
    /// Tokens: the batches' example indices; Packed: the rows' example indices.
    formed: Vec<Vec<usize>>,
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
            grouping: Grouping::Examples,
            formed: Vec::new(),
        })
    }

    /// Forms the micro-batches as `grouping` says. Fails on a budget or row of 0 tokens, 0 rows,
    /// or an example longer than the budget or the row (examples are truncated when they are
    /// loaded, to `--max-seq-len`; a longer one cannot be batched without cutting it, which
    /// is left to that truncation).
    pub fn with_grouping(mut self, grouping: Grouping) -> Result<Self> {
        let (limit, what) = match grouping {
            Grouping::Examples => (usize::MAX, ""),
            Grouping::Tokens { max_tokens } => (max_tokens, "--max-tokens-per-batch"),
            Grouping::Packed { row_len, rows } => {
                if rows == 0 {
                    return Err(Error::Invalid(
                        "packing needs at least 1 row per batch".into(),
                    ));
                }
                (row_len, "the packed row length")
            }
        };
        if limit == 0 {
            return Err(Error::Invalid(format!("{what} must be at least 1")));
        }
        if let Some((i, ex)) = self
            .examples
            .iter()
            .enumerate()
            .find(|(_, e)| e.len() > limit)
        {
            return Err(Error::Invalid(format!(
                "example {i} has {} tokens, more than {what} ({limit}): raise it, or lower --max-seq-len to truncate longer examples",
                ex.len()
            )));
        }
        self.formed = match grouping {
            Grouping::Examples => Vec::new(),
            Grouping::Tokens { max_tokens } => self.token_batches(max_tokens),
            Grouping::Packed { row_len, .. } => {
                let lens: Vec<usize> = self.examples.iter().map(Example::len).collect();
                pack_best_fit_decreasing(&lens, row_len)
            }
        };
        self.grouping = grouping;
        Ok(self)
    }

    pub fn grouping(&self) -> Grouping {
        self.grouping
    }

    /// Token-budget batches: file order, or (shuffled) a seeded permutation sorted by length so
    /// that similar lengths share a batch; cut where the next example would take rows × longest
    /// past the budget.
    fn token_batches(&self, max_tokens: usize) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        if self.shuffle {
            order.shuffle(&mut StdRng::seed_from_u64(self.seed));
            order.sort_by_key(|&i| self.examples[i].len());
        }
        let mut batches = Vec::new();
        let mut cur: Vec<usize> = Vec::new();
        let mut longest = 0;
        for i in order {
            let l = self.examples[i].len().max(longest);
            if !cur.is_empty() && (cur.len() + 1) * l > max_tokens {
                batches.push(std::mem::take(&mut cur));
                longest = 0;
            }
            longest = longest.max(self.examples[i].len());
            cur.push(i);
        }
        if !cur.is_empty() {
            batches.push(cur);
        }
        batches
    }

    /// The packed rows (example indices, in row order), when packing.
    pub fn packed_rows(&self) -> &[Vec<usize>] {
        match self.grouping {
            Grouping::Packed { .. } => &self.formed,
            _ => &[],
        }
    }

    /// The largest number of tokens (padding included) a micro-batch of this batcher holds.
    pub fn max_batch_tokens(&self) -> usize {
        let len = |i: &usize| self.examples[*i].len();
        match self.grouping {
            Grouping::Examples => {
                self.batch_size.min(self.examples.len())
                    * self.examples.iter().map(Example::len).max().unwrap_or(0)
            }
            Grouping::Tokens { .. } => self
                .formed
                .iter()
                .map(|b| b.len() * b.iter().map(len).max().unwrap_or(0))
                .max()
                .unwrap_or(0),
            Grouping::Packed { rows, .. } => {
                rows.min(self.formed.len())
                    * self
                        .formed
                        .iter()
                        .map(|r| r.iter().map(len).sum::<usize>())
                        .max()
                        .unwrap_or(0)
            }
        }
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

    /// `ceil(examples / batch_size)`; with a token budget the number of batches formed; packed,
    /// `ceil(rows / rows per batch)`.
    pub fn batches_per_epoch(&self) -> usize {
        match self.grouping {
            Grouping::Examples => self.examples.len().div_ceil(self.batch_size),
            Grouping::Tokens { .. } => self.formed.len(),
            Grouping::Packed { rows, .. } => self.formed.len().div_ceil(rows),
        }
    }

    /// The example indices of each batch of epoch `epoch` (see the type's documentation), row
    /// after row when packed.
    pub fn epoch_order(&self, epoch: usize) -> Vec<Vec<usize>> {
        self.epoch_rows(epoch)
            .into_iter()
            .map(|rows| rows.concat())
            .collect()
    }

    /// The rows of each batch of epoch `epoch`, each row's example indices (one per row unless
    /// packed).
    pub fn epoch_rows(&self, epoch: usize) -> Vec<Vec<Vec<usize>>> {
        let mut rng = StdRng::seed_from_u64(self.seed ^ epoch_mix(epoch));
        match self.grouping {
            Grouping::Examples => self
                .example_order(epoch)
                .into_iter()
                .map(|b| b.into_iter().map(|i| vec![i]).collect())
                .collect(),
            Grouping::Tokens { .. } => {
                let mut batches: Vec<Vec<Vec<usize>>> = self
                    .formed
                    .iter()
                    .map(|b| b.iter().map(|&i| vec![i]).collect())
                    .collect();
                if self.shuffle {
                    batches.shuffle(&mut rng);
                }
                batches
            }
            Grouping::Packed { rows, .. } => {
                let mut all = self.formed.clone();
                if self.shuffle {
                    all.shuffle(&mut rng);
                }
                all.chunks(rows).map(<[_]>::to_vec).collect()
            }
        }
    }

    /// [`Grouping::Examples`]: the example indices of each batch of epoch `epoch`.
    fn example_order(&self, epoch: usize) -> Vec<Vec<usize>> {
        let n = self.examples.len();
        let b = self.batch_size;
        if !self.shuffle {
            return (0..n)
                .step_by(b)
                .map(|s| (s..(s + b).min(n)).collect())
                .collect();
        }
        let mut rng = StdRng::seed_from_u64(self.seed ^ epoch_mix(epoch));
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

    /// The batches of epoch `epoch`, each padded to its own longest example (or row).
    pub fn epoch(&self, epoch: usize) -> Vec<Batch> {
        let packed = matches!(self.grouping, Grouping::Packed { .. });
        self.epoch_rows(epoch)
            .iter()
            .map(|rows| match packed {
                true => self.packed_batch(rows),
                false => self.batch(&rows.concat()),
            })
            .collect()
    }

    /// A packed batch: row r holds the examples `rows[r]` one after the other, each example's
    /// first label made -100 (nothing before it in its own sequence predicts it, and the previous
    /// example must not), rows right-padded to the fullest. Panics on an index out of range.
    pub fn packed_batch(&self, rows: &[Vec<usize>]) -> Batch {
        let fill = |r: &Vec<usize>| r.iter().map(|&i| self.examples[i].len()).sum::<usize>();
        let seq_len = rows.iter().map(fill).max().unwrap_or(0);
        let n = rows.len();
        let mut input_ids = vec![self.pad_id; n * seq_len];
        let mut labels = vec![IGNORE_INDEX; n * seq_len];
        let mut lengths = Vec::with_capacity(n);
        let mut target_tokens = 0;
        let mut segments = Vec::with_capacity(n);
        for (r, row) in rows.iter().enumerate() {
            let mut at = r * seq_len;
            let mut lens = Vec::with_capacity(row.len());
            for &i in row {
                let ex = &self.examples[i];
                input_ids[at..at + ex.len()].copy_from_slice(&ex.input_ids);
                labels[at + 1..at + ex.len()].copy_from_slice(&ex.labels[1..]);
                target_tokens += count_targets(&ex.labels);
                lens.push(ex.len());
                at += ex.len();
            }
            lengths.push(fill(row));
            segments.push(lens);
        }
        Batch {
            input_ids,
            labels,
            batch_size: n,
            seq_len,
            lengths,
            target_tokens,
            indices: rows.concat(),
            segments: Segments::packed(segments),
        }
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
            segments: Segments::unpacked(),
        }
    }
}

fn epoch_mix(epoch: usize) -> u64 {
    (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Best-fit decreasing: the items (lengths, each ≤ `capacity`) from the longest down (equal
/// lengths in index order), each into the open bin with the least room that still holds it, or
/// a new bin. Returns each bin's item indices in the order they went in; bins in the order they
/// were opened.
pub fn pack_best_fit_decreasing(lens: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    // (room left, bin) of every bin with room.
    let mut open: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in order {
        let l = lens[i];
        assert!(l <= capacity, "an item of {l} in bins of {capacity}");
        let (room, bin) = match open.range((l, 0)..).next().copied() {
            Some(found) => {
                open.remove(&found);
                found
            }
            None => {
                bins.push(Vec::new());
                (capacity, bins.len() - 1)
            }
        };
        bins[bin].push(i);
        if room > l {
            open.insert((room - l, bin));
        }
    }
    bins
}
