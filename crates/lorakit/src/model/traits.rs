//! What the rest of the library needs of a model, whatever its family: scoring and generation
//! ([`CausalLm`]) and the LM head and final norm the loss runs ([`LmHead`]).

use crate::error::Result;
use crate::model::config::Config;
use crate::model::kv_cache::{KvCache, Logits};

/// What scoring and generation need of a decoder.
pub trait CausalLm {
    fn config(&self) -> &Config;
    /// A KV cache for at most `capacity` positions.
    fn new_cache(&self, capacity: usize) -> Result<KvCache>;
    /// Runs `ids` at positions `cache.len ..`: logits [T, vocab] (`All`) or [vocab] (`Last`).
    fn forward(&self, ids: &[u32], cache: &mut KvCache, which: Logits) -> Result<Vec<f32>>;
    /// Runs a prompt at positions `cache.len ..`: the logits of its last token [vocab], as
    /// generation starts. A model may compute it differently from `forward` (see
    /// `Decoder::prefill`: the same bits however the prompt is chunked).
    fn prefill(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        self.forward(ids, cache, Logits::Last)
    }
    /// Logits for a whole sequence from position 0: [T, vocab].
    fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut cache = self.new_cache(ids.len())?;
        self.forward(ids, &mut cache, Logits::All)
    }
}

/// What the loss needs of a model's top: its final norm and its LM head (Llama: RMSNorm;
/// GPT-2: LayerNorm with bias).
pub trait LmHead {
    /// (hidden, vocab)
    fn dims(&self) -> (usize, usize);
    /// The final norm.  x, out: [n, hidden].
    fn final_norm_forward(&self, out: &mut [f32], x: &[f32]);
    /// dx = ∂/∂x of the final norm given the gradient dy of its output.  x, dy, dx: [n, hidden].
    fn final_norm_backward(&self, dx: &mut [f32], x: &[f32], dy: &[f32]);
    /// dw += the final norm weight's gradient (full fine-tuning).  x, dy: [n, hidden], dw: [hidden].
    fn final_norm_weight_grad(&self, dw: &mut [f32], x: &[f32], dy: &[f32]);
    /// logits = x · headᵀ.  x: [n, hidden] → logits: [n, vocab].
    fn head_forward(&self, logits: &mut [f32], x: &[f32], n: usize);
    /// dx (+)= d logits · head.  d logits: [n, vocab] → dx: [n, hidden].
    fn head_backward(&self, dx: &mut [f32], dlogits: &[f32], n: usize, accumulate: bool);
    /// `head_forward` ends with logits = cap · tanh(z / cap) (Gemma's final soft-capping).
    fn logit_softcap(&self) -> Option<f32> {
        None
    }
    /// Target rows the loss sends through the head at once (it holds [rows, vocab] logits).
    fn loss_chunk_rows(&self) -> usize {
        64
    }
}
