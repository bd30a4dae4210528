//! Gemma 3 text (`gemma3_text`; GGUF `gemma3`): RMSNorms with `(1 + w)` on both sides of each
//! sublayer (input, post-attention, pre- and post-feedforward), per-head q/k norms, a gated MLP
//! with the tanh GELU, the token embedding multiplied by √hidden, attention scaled by
//! `query_pre_attn_scalar^-½`, a tied LM head, and two kinds of layers: sliding-window ("local",
//! RoPE θ `rope_local_base_freq`, 10 000) and full ("global", `rope_theta`, with its scaling).

use super::table::{GgufKeys, NormSlot, Slot, WeightTable, LLAMA_LINEARS};
use crate::error::{Error, Result};
use crate::model::config::Config;
use crate::model::config::HfJson;
use crate::model::spec::{NormKind, NormPlacement, QkNorm, Rope};

const NORMS: [(Slot, &str, &str); 6] = [
    (Slot::Norm(NormSlot::AttnIn), "input_layernorm", "attn_norm"),
    (
        Slot::Norm(NormSlot::AttnOut),
        "post_attention_layernorm",
        "post_attention_norm",
    ),
    (
        Slot::Norm(NormSlot::MlpIn),
        "pre_feedforward_layernorm",
        "ffn_norm",
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
    gguf_norms_plus_one: true,
};

/// RoPE tables: 0 global (full-attention layers), 1 local (sliding-window layers).
const GLOBAL: usize = 0;
const LOCAL: usize = 1;

/// The block switches every Gemma 3 shares, whichever file it came from.
fn gemma_block(c: &mut Config, query_pre_attn_scalar: f64) {
    let b = &mut c.block;
    b.norm = NormKind::Rms { offset: 1.0 };
    b.norms = NormPlacement {
        attn_in: true,
        attn_out: true,
        mlp_in: true,
        mlp_out: true,
    };
    b.qk_norm = QkNorm::PerHead;
    b.attn_scale = query_pre_attn_scalar.powf(-0.5) as f32;
    // transformers keeps √hidden as an f32 tensor and multiplies in the model's dtype.
    b.embed_scale = Some((c.hidden_size as f64).sqrt() as f32);
}

pub(crate) fn hf_block(j: &HfJson, c: &mut Config) -> Result<()> {
    // `attn_logit_softcapping` is read by Gemma3TextConfig but never applied by transformers'
    // Gemma 3 attention (nor allowed by llama.cpp's converter): ignored here too.
    c.final_logit_softcap = match j.f64("final_logit_softcapping")? {
        Some(cap) if cap > 0.0 => Some(cap as f32),
        Some(cap) => {
            return Err(Error::config(
                j.path,
                "final_logit_softcapping",
                format!("{cap} must be positive (or null)"),
            ))
        }
        None => None,
    };
    c.block.act = j.activation("hidden_activation", "gelu_pytorch_tanh")?;
    c.tie_word_embeddings = j.bool_or("tie_word_embeddings", true)?;
    let qpas = j.f64("query_pre_attn_scalar")?.unwrap_or(c.head_dim as f64);
    gemma_block(c, qpas);
    // transformers ≥ 5: rope_parameters keyed by layer type; older files: rope_theta,
    // rope_scaling (global) and rope_local_base_freq (local).
    let per_type = j
        .get("rope_parameters")
        .and_then(|v| v.as_object())
        .filter(|o| o.contains_key("full_attention") || o.contains_key("sliding_attention"));
    let (global, local) = match per_type {
        Some(o) => (
            j.rope(
                o.get("full_attention"),
                "rope_parameters.full_attention",
                None,
            )?,
            j.rope(
                o.get("sliding_attention"),
                "rope_parameters.sliding_attention",
                None,
            )?,
        ),
        None => (
            c.ropes[0].clone(),
            Rope::plain(j.f64("rope_local_base_freq")?.unwrap_or(10000.0)),
        ),
    };
    c.rope_theta = global.theta;
    c.ropes = vec![global, local];
    for l in &mut c.layers {
        l.rope = if l.window.is_some() { LOCAL } else { GLOBAL };
    }
    Ok(())
}

/// Layers with index i where (i + 1) is a multiple of this are global, as llama.cpp's
/// `set_swa_pattern(6)` for Gemma 3.
const GGUF_SWA_PATTERN: usize = 6;

pub(crate) fn gguf_block(k: &GgufKeys, c: &mut Config) -> Result<()> {
    let window = k.usize("attention.sliding_window")?;
    // llama.cpp scales by 1/√head_dim (query_pre_attn_scalar = head_dim) for all but the 27B.
    gemma_block(c, c.head_dim as f64);
    c.block.act = crate::model::spec::Activation::GeluTanh;
    let local_theta = k.f32_or("rope.freq_base_swa", 10000.0)? as f64;
    c.ropes = vec![Rope::plain(c.rope_theta), Rope::plain(local_theta)];
    if k.has("final_logit_softcapping") {
        c.final_logit_softcap = Some(k.f32("final_logit_softcapping")?);
    }
    for (i, l) in c.layers.iter_mut().enumerate() {
        let global = (i + 1) % GGUF_SWA_PATTERN == 0;
        l.window = (!global).then_some(window);
        l.rope = if global { GLOBAL } else { LOCAL };
    }
    Ok(())
}

/// Gemma 3's own `config.json` keys on top of the shared ones ([`super::llama::hf_config_out`]):
/// the activation's name, the attention scale as `query_pre_attn_scalar`, the two RoPE tables
/// keyed by layer type, the final soft-capping.
pub(crate) fn hf_config_out(c: &Config, v: &mut serde_json::Value) -> Result<()> {
    use serde_json::json;
    let Some(obj) = v.as_object_mut() else {
        return Ok(());
    };
    let act = obj
        .remove("hidden_act")
        .unwrap_or(json!("gelu_pytorch_tanh"));
    obj.insert("hidden_activation".into(), act);
    // attn_scale = query_pre_attn_scalar^-½, held in f32: round back to the integer it was.
    let qpas = (c.block.attn_scale as f64).powi(-2);
    obj.insert(
        "query_pre_attn_scalar".into(),
        match (qpas - qpas.round()).abs() < 1e-3 * qpas {
            true => json!(qpas.round() as u64),
            false => json!(qpas),
        },
    );
    let (global, local) = (
        &c.ropes[GLOBAL],
        c.ropes.get(LOCAL).unwrap_or(&c.ropes[GLOBAL]),
    );
    obj.insert(
        "rope_parameters".into(),
        json!({
            "full_attention": super::llama::rope_json(global)?,
            "sliding_attention": super::llama::rope_json(local)?,
        }),
    );
    obj.insert("rope_local_base_freq".into(), json!(local.theta));
    obj.insert(
        "final_logit_softcapping".into(),
        json!(c.final_logit_softcap),
    );
    obj.insert("attn_logit_softcapping".into(), serde_json::Value::Null);
    Ok(())
}
