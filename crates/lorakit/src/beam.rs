//! Beam search with a length penalty and n-gram blocking, on the KV cache (one cache per beam,
//! cloned when a beam branches; the model's decode path is batch-1, so beams run one after the
//! other). Conventions follow Hugging Face transformers' `BeamSearchScorer`:
//!
//! - a finished hypothesis scores `sum of token logprobs / generated_len ^ length_penalty`, where
//!   the sum includes the end token and `generated_len` counts the tokens before it (at least 1);
//! - at each step every live beam proposes its `2·beams` best tokens; candidates are taken best
//!   first, an end token among the top `beams` finishes a hypothesis, others fill the next beams;
//! - search stops when `beams` hypotheses are finished and none of the live beams can beat the
//!   worst of them (`early_stopping=False`), or at `max_new_tokens` (live beams then count as
//!   finished).
//!
//! One difference: `no_repeat_ngram` blocks n-grams repeated *within the generated tokens*;
//! transformers also counts the prompt, which would forbid copying a 4-token name from an E2E
//! meaning representation into its description.

use crate::engine::ops::logsumexp;
use crate::error::{Error, Result};
use crate::model::decoder::{KvCache, Logits};
use crate::model::CausalLm;

#[derive(Debug, Clone)]
pub struct BeamParams {
    pub beams: usize,
    /// Exponent of the length normalisation (HF `length_penalty`; 0 = plain sum of logprobs).
    pub length_penalty: f32,
    /// Never generate an n-gram of this size twice (0 = off).
    pub no_repeat_ngram: usize,
    pub max_new_tokens: usize,
    /// Tokens that end a hypothesis (EOS, end of line, ...). The end token is returned.
    pub stop_ids: Vec<u32>,
}

impl BeamParams {
    pub fn validate(&self) -> Result<()> {
        if self.beams == 0 {
            return Err(Error::Invalid("beam search needs at least 1 beam".into()));
        }
        if !self.length_penalty.is_finite() {
            return Err(Error::Invalid(format!(
                "length penalty must be finite, got {}",
                self.length_penalty
            )));
        }
        Ok(())
    }
}

struct Beam {
    tokens: Vec<u32>,
    sum_logprob: f64,
    cache: KvCache,
    /// Logits [vocab] for the next token.
    logits: Vec<f32>,
}

/// A finished hypothesis: its tokens (ending with the stop token, if it hit one) and score.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    pub tokens: Vec<u32>,
    pub score: f64,
    pub sum_logprob: f64,
}

fn normalised(sum: f64, generated_len: usize, lp: f32) -> f64 {
    sum / (generated_len.max(1) as f64).powf(lp as f64)
}

/// Tokens that would repeat an n-gram of `tokens` of size `n` if generated next.
pub fn banned_tokens(tokens: &[u32], n: usize) -> Vec<u32> {
    if n == 0 || tokens.len() + 1 < n {
        return vec![];
    }
    if n == 1 {
        return tokens.to_vec();
    }
    // The last n-1 tokens, followed by the candidate, must not equal an earlier n-gram.
    let prefix = &tokens[tokens.len() + 1 - n..];
    tokens
        .windows(n)
        .filter(|w| &w[..n - 1] == prefix)
        .map(|w| w[n - 1])
        .collect()
}

/// Keeps the `keep` best finished hypotheses, best first.
fn push_finished(done: &mut Vec<Hypothesis>, h: Hypothesis, keep: usize) {
    done.push(h);
    done.sort_by(|a, b| b.score.total_cmp(&a.score));
    done.truncate(keep);
}

/// Beam search after `prompt`: up to `params.beams` finished hypotheses, best first.
pub fn beam_search<M: CausalLm + ?Sized>(
    model: &M,
    prompt: &[u32],
    params: &BeamParams,
) -> Result<Vec<Hypothesis>> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(Error::Invalid(
            "the prompt is empty: nothing to continue from".into(),
        ));
    }
    let ctx = model.config().max_position_embeddings;
    if prompt.len() >= ctx {
        return Err(Error::Invalid(format!(
            "the prompt has {} tokens; the model's context is {ctx}",
            prompt.len()
        )));
    }
    let k = params.beams;
    let lp = params.length_penalty;
    let capacity = (prompt.len() + params.max_new_tokens).min(ctx);
    let mut cache = model.new_cache(capacity)?;
    let logits = model.prefill(prompt, &mut cache)?;
    let mut live = vec![Beam {
        tokens: vec![],
        sum_logprob: 0.0,
        cache,
        logits,
    }];
    let mut done: Vec<Hypothesis> = Vec::new();
    let max_new = params.max_new_tokens.min(capacity - prompt.len());
    for step in 0..max_new {
        // (score, beam index, token, token logprob): each beam's 2k best continuations.
        let mut cands: Vec<(f64, usize, u32, f64)> = Vec::new();
        for (bi, b) in live.iter_mut().enumerate() {
            for t in banned_tokens(&b.tokens, params.no_repeat_ngram) {
                b.logits[t as usize] = f32::NEG_INFINITY;
            }
            let lse = logsumexp(&b.logits);
            let mut idx: Vec<u32> = (0..b.logits.len() as u32).collect();
            let take = (2 * k).min(idx.len());
            idx.select_nth_unstable_by(take - 1, |&x, &y| {
                b.logits[y as usize].total_cmp(&b.logits[x as usize])
            });
            for &t in &idx[..take] {
                let lpt = b.logits[t as usize] as f64 - lse;
                if lpt.is_finite() {
                    cands.push((b.sum_logprob + lpt, bi, t, lpt));
                }
            }
        }
        // Best first; ties by beam then token so that the order is deterministic.
        cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let last_step = step + 1 == max_new;
        let mut chosen: Vec<(usize, u32, f64)> = Vec::new();
        for (rank, &(score, bi, t, _)) in cands.iter().enumerate() {
            if params.stop_ids.contains(&t) {
                if rank < k {
                    let mut tokens = live[bi].tokens.clone();
                    let gen_len = tokens.len();
                    tokens.push(t);
                    push_finished(
                        &mut done,
                        Hypothesis {
                            tokens,
                            score: normalised(score, gen_len, lp),
                            sum_logprob: score,
                        },
                        k,
                    );
                }
            } else {
                chosen.push((bi, t, score));
            }
            if chosen.len() == k {
                break;
            }
        }
        if chosen.is_empty() {
            live.clear();
            break;
        }
        // Is the search over? (HF's `is_done` with early_stopping=False, which bounds what the
        // live beams can reach by the best candidate of this step, end tokens included.)
        let best_live = cands[0].0;
        let gen_len = live[0].tokens.len();
        if done.len() == k && done[k - 1].score >= normalised(best_live, gen_len, lp) {
            live.clear();
            break;
        }
        // Extend: each chosen candidate gets its parent's cache (moved for the last user,
        // cloned for the others) and runs one token.
        let mut uses = vec![0usize; live.len()];
        for &(bi, _, _) in &chosen {
            uses[bi] += 1;
        }
        let mut parents: Vec<Option<Beam>> = live.into_iter().map(Some).collect();
        let mut next = Vec::with_capacity(chosen.len());
        for &(bi, t, score) in &chosen {
            uses[bi] -= 1;
            let (mut tokens, mut cache) = if uses[bi] == 0 {
                let p = parents[bi]
                    .take()
                    .expect("parent used once more than counted");
                (p.tokens, p.cache)
            } else {
                let p = parents[bi].as_ref().expect("parent present");
                (p.tokens.clone(), p.cache.clone())
            };
            tokens.push(t);
            let logits = if last_step {
                vec![]
            } else {
                model.forward(&[t], &mut cache, Logits::Last)?
            };
            next.push(Beam {
                tokens,
                sum_logprob: score,
                cache,
                logits,
            });
        }
        live = next;
    }
    // Out of tokens: the live beams count as finished (HF's `finalize`).
    for b in live {
        let gen_len = b.tokens.len();
        push_finished(
            &mut done,
            Hypothesis {
                score: normalised(b.sum_logprob, gen_len, lp),
                tokens: b.tokens,
                sum_logprob: b.sum_logprob,
            },
            k,
        );
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banned_tokens_block_repeated_ngrams() {
        // ... 5 6 7 ... 5 6 -> 7 would repeat "5 6 7".
        assert_eq!(banned_tokens(&[5, 6, 7, 1, 5, 6], 3), vec![7]);
        assert_eq!(banned_tokens(&[5, 6, 7, 1, 5], 3), Vec::<u32>::new());
        assert_eq!(banned_tokens(&[1, 2, 1], 2), vec![2]);
        assert_eq!(banned_tokens(&[1, 2], 1), vec![1, 2]);
        assert_eq!(banned_tokens(&[1, 2, 3], 0), Vec::<u32>::new());
        assert_eq!(banned_tokens(&[1], 4), Vec::<u32>::new());
    }
}
