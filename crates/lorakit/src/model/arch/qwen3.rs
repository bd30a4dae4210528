//! Qwen3: the Llama block with an RMSNorm over each head of q and of k, after the projection
//! and before RoPE (`self_attn.q_norm` / `k_norm`, [head_dim] each). Sliding-window layers come
//! from `layer_types` through the shared config code.

use super::table::{NormSlot, Slot, WeightTable, LLAMA_LINEARS};
use crate::error::Result;
use crate::model::config::Config;
use crate::model::config::HfJson;
use crate::model::spec::QkNorm;

const NORMS: [(Slot, &str, &str); 4] = [
    (Slot::Norm(NormSlot::AttnIn), "input_layernorm", "attn_norm"),
    (
        Slot::Norm(NormSlot::MlpIn),
        "post_attention_layernorm",
        "ffn_norm",
    ),
    (Slot::Norm(NormSlot::Q), "self_attn.q_norm", "attn_q_norm"),
    (Slot::Norm(NormSlot::K), "self_attn.k_norm", "attn_k_norm"),
];

pub const WEIGHTS: WeightTable = WeightTable {
    linears: &LLAMA_LINEARS,
    norms: &NORMS,
    gguf_permute_qk: false,
    gguf_norms_plus_one: false,
};

pub(crate) fn hf_block(_j: &HfJson, c: &mut Config) -> Result<()> {
    gguf_block(c);
    Ok(())
}

/// The same switches for a GGUF `qwen3` file.
pub(crate) fn gguf_block(c: &mut Config) {
    c.block.qk_norm = QkNorm::PerHead;
}
