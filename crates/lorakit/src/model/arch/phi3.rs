//! Phi-3: the Llama block with two fused projections, as PEFT targets them (whole modules):
//! `self_attn.qkv_proj` (rows [q; k; v]) and `mlp.gate_up_proj` (rows [gate; up], split in
//! halves as transformers' `chunk(2)`). RoPE must rotate every dimension
//! (`partial_rotary_factor` 1); the long-context `longrope` scaling is refused by the shared
//! RoPE reader.

use super::table::{NormSlot, Slot, WeightTable};
use crate::error::{Error, Result};
use crate::lora::ModuleKind;
use crate::model::config::Config;
use crate::model::config::HfJson;
use crate::model::spec::Mlp;

const LINEARS: [(Slot, &str, &str); 4] = [
    (
        Slot::Linear(ModuleKind::Qkv),
        "self_attn.qkv_proj",
        "attn_qkv",
    ),
    (
        Slot::Linear(ModuleKind::O),
        "self_attn.o_proj",
        "attn_output",
    ),
    (
        Slot::Linear(ModuleKind::GateUp),
        "mlp.gate_up_proj",
        "ffn_up",
    ),
    (Slot::Linear(ModuleKind::Down), "mlp.down_proj", "ffn_down"),
];

const NORMS: [(Slot, &str, &str); 2] = [
    (Slot::Norm(NormSlot::AttnIn), "input_layernorm", "attn_norm"),
    (
        Slot::Norm(NormSlot::MlpIn),
        "post_attention_layernorm",
        "ffn_norm",
    ),
];

pub const WEIGHTS: WeightTable = WeightTable {
    linears: &LINEARS,
    norms: &NORMS,
    gguf_permute_qk: false,
    gguf_norms_plus_one: false,
};

pub(crate) fn hf_block(j: &HfJson, c: &mut Config) -> Result<()> {
    if let Some(f) = j.f64("partial_rotary_factor")? {
        if f != 1.0 {
            return Err(Error::config(
                j.path,
                "partial_rotary_factor",
                format!("{f} is not supported (only 1.0: RoPE over the whole head)"),
            ));
        }
    }
    // Phi3Attention windows every layer when the config sets sliding_window.
    if j.get("layer_types").is_none() {
        if let Some(w) = j
            .get("sliding_window")
            .map(|_| j.usize("sliding_window"))
            .transpose()?
        {
            c.layers.iter_mut().for_each(|l| l.window = Some(w));
        }
    }
    block(c);
    Ok(())
}

/// The switches of every Phi-3, from config.json or a GGUF `phi3` file (whose fused tensors
/// `attn_qkv` and `ffn_up` keep the same row order).
pub(crate) fn block(c: &mut Config) {
    c.block.fused_qkv = true;
    c.block.mlp = Mlp::Gated { fused: true };
}
