//! Text generation with a KV cache (greedy or sampled) and per-token scoring.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::engine::ops::{argmax, logsumexp};
use crate::error::{Error, Result};
use crate::model::decoder::Logits;
use crate::model::CausalLm;

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability sums to ≥ top_p.
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    pub seed: u64,
    pub max_new_tokens: usize,
    /// Stop when one of these ids is generated (it is still returned). Empty = never stop.
    pub stop_ids: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            max_new_tokens: 128,
            stop_ids: vec![],
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Invalid(format!(
                "temperature must be ≥ 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Invalid(format!(
                "top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Picks the next token from one row of logits [vocab].
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(logits) as u32;
        }
        // Candidates sorted by logit, highest first, cut by top-k.
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        if p.top_k > 0 {
            idx.truncate(p.top_k);
        }
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i as usize] - max) / p.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        for (i, q) in probs.iter().enumerate() {
            if r < *q {
                return idx[i];
            }
            r -= q;
        }
        idx[probs.len() - 1]
    }
}

/// Generates up to `params.max_new_tokens` tokens after `prompt`, calling `on_token` with each
/// as soon as it is chosen. Returns the new ids (including a final stop id, if one was hit).
pub fn generate<M: CausalLm + ?Sized>(
    model: &M,
    prompt: &[u32],
    params: &SamplingParams,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
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
    let capacity = (prompt.len() + params.max_new_tokens).min(ctx);
    let mut cache = model.new_cache(capacity)?;
    let mut sampler = Sampler::new(params.clone());
    let mut out = Vec::new();
    let mut logits = model.prefill(prompt, &mut cache)?;
    while out.len() < params.max_new_tokens {
        let next = sampler.sample(&logits);
        out.push(next);
        on_token(next)?;
        if params.stop_ids.contains(&next) || cache.len >= capacity {
            break;
        }
        logits = model.forward(&[next], &mut cache, Logits::Last)?;
    }
    Ok(out)
}

/// Positions run through the model at once when scoring: bounds the [rows, vocab] logits
/// (Gemma's 262k vocabulary makes a 1000-token text's logits 1 GB).
const SCORE_CHUNK: usize = 128;

/// log P(ids[t] | ids[..t]) for every t ≥ 1; entry 0 is None (nothing predicts the first token).
/// The text runs in chunks of SCORE_CHUNK positions through one KV cache: the same computation
/// as one pass up to rounding (the products' blocking depends on the chunk's rows).
pub fn token_logprobs<M: CausalLm + ?Sized>(model: &M, ids: &[u32]) -> Result<Vec<Option<f64>>> {
    if ids.is_empty() {
        return Err(Error::Invalid(
            "nothing to score: the input has no tokens".into(),
        ));
    }
    let v = model.config().vocab_size;
    let mut cache = model.new_cache(ids.len())?;
    let mut out = vec![None];
    for (c, chunk) in ids.chunks(SCORE_CHUNK).enumerate() {
        let logits = model.forward(chunk, &mut cache, Logits::All)?;
        let start = c * SCORE_CHUNK;
        // Row i predicts ids[start + i + 1].
        for (i, row) in logits.chunks_exact(v).enumerate() {
            if let Some(&next) = ids.get(start + i + 1) {
                out.push(Some(row[next as usize] as f64 - logsumexp(row)));
            }
        }
    }
    Ok(out)
}
