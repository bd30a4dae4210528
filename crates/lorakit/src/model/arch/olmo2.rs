//! OLMo 2: no norms before the sublayers; an RMSNorm on each sublayer's output before the
//! residual add (`post_attention_layernorm`, `post_feedforward_layernorm`), and RMSNorms over
//! the whole q and k projections ([heads·head_dim], before the head split and RoPE).

use super::table::{NormSlot, Slot, WeightTable, LLAMA_LINEARS};
use crate::error::Result;
use crate::model::config::Config;
use crate::model::config::HfJson;
use crate::model::spec::{NormPlacement, QkNorm};

const NORMS: [(Slot, &str, &str); 4] = [
    (
        Slot::Norm(NormSlot::AttnOut),
        "post_attention_layernorm",
        "post_attention_norm",
    ),
    (
        Slot::Norm(NormSlot::MlpOut),
        "post_feedforward_layernorm",
        "post_ffw_norm",
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
    block(c);
    Ok(())
}

/// The switches of every OLMo 2, from config.json or a GGUF `olmo2` file.
pub(crate) fn block(c: &mut Config) {
    c.block.norms = NormPlacement {
        attn_in: false,
        attn_out: true,
        mlp_in: false,
        mlp_out: true,
    };
    c.block.qk_norm = QkNorm::Whole;
}
