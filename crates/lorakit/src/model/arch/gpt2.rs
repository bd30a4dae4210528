//! GPT-2 (`GPT2LMHeadModel`): LayerNorm with bias, learned positions, fused `c_attn` (rows
//! [q; k; v], biased), a plain MLP `c_fc` → tanh GELU → `c_proj`, a tied head. HF stores its
//! Conv1D weights [in, out] (transposed at load and save). The decoder's roles Qkv, O, Up, Down
//! are PEFT's c_attn, attn.c_proj, c_fc, mlp.c_proj ([`Config::adapter_kind`]).

use super::table::{ModelNames, NormSlot, Slot};
use super::WeightTable;
use crate::error::{Error, Result};
use crate::lora::ModuleKind;
use crate::model::config::HfJson;
use crate::model::config::{Arch, Config};
use crate::model::spec::{
    Activation, BlockSpec, LayerSpec, Mlp, NormKind, NormPlacement, Positions, QkNorm,
};

const LINEARS: [(Slot, &str, &str); 4] = [
    (Slot::Linear(ModuleKind::Qkv), "attn.c_attn", "attn_qkv"),
    (Slot::Linear(ModuleKind::O), "attn.c_proj", "attn_output"),
    (Slot::Linear(ModuleKind::Up), "mlp.c_fc", "ffn_up"),
    (Slot::Linear(ModuleKind::Down), "mlp.c_proj", "ffn_down"),
];

const NORMS: [(Slot, &str, &str); 2] = [
    (Slot::Norm(NormSlot::AttnIn), "ln_1", "attn_norm"),
    (Slot::Norm(NormSlot::MlpIn), "ln_2", "ffn_norm"),
];

pub const WEIGHTS: WeightTable = WeightTable {
    linears: &LINEARS,
    norms: &NORMS,
    gguf_permute_qk: false,
    gguf_norms_plus_one: false,
};

/// `GPT2LMHeadModel`'s names; a checkpoint without the `transformer.` prefix (the `gpt2` hub
/// repo) is read too (`model/load.rs`).
pub const NAMES: ModelNames = ModelNames {
    embed: "transformer.wte.weight",
    positions: Some("transformer.wpe.weight"),
    final_norm: "transformer.ln_f",
    head: "lm_head.weight",
    layers: "transformer.h",
    conv1d: true,
};

/// A GPT-2 `config.json` (HF's `GPT2Config` names and defaults). Options that change the
/// math in ways lorakit does not implement are errors naming the key.
pub(crate) fn hf_config(j: &HfJson) -> Result<Config> {
    let path = j.path;
    // GPT2Config's default is gelu_new; gelu_pytorch_tanh is the same tanh formula.
    match j.get("activation_function") {
        None => {}
        Some(serde_json::Value::String(s)) if s == "gelu_new" || s == "gelu_pytorch_tanh" => {}
        Some(v) => {
            return Err(Error::config(
                path,
                "activation_function",
                format!("{v} is not supported (only \"gelu_new\", the tanh GELU)"),
            ))
        }
    }
    for (key, default, want) in [
        ("scale_attn_weights", true, true),
        ("scale_attn_by_inverse_layer_idx", false, false),
        ("add_cross_attention", false, false),
    ] {
        if j.bool_or(key, default)? != want {
            return Err(Error::config(
                path,
                key,
                format!("{} is not supported (only {want})", !want),
            ));
        }
    }
    let hidden_size = j.usize_or("n_embd", Some(768))?;
    let num_heads = j.usize_or("n_head", Some(12))?;
    if !hidden_size.is_multiple_of(num_heads) {
        return Err(Error::config(
            path,
            "n_head",
            format!("n_embd = {hidden_size} is not a multiple of {num_heads} heads"),
        ));
    }
    let eps = match j.get("layer_norm_epsilon") {
        None => 1e-5,
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| {
                Error::config(
                    path,
                    "layer_norm_epsilon",
                    format!("expected a number ≥ 0, found {v}"),
                )
            })?,
    };
    let num_layers = j.usize_or("n_layer", Some(12))?;
    let head_dim = hidden_size / num_heads;
    let id = |key: &str| j.get(key).and_then(|v| v.as_u64()).map(|v| v as u32);
    Ok(Config {
        arch: Arch::Gpt2,
        hidden_size,
        intermediate_size: j.usize_or("n_inner", Some(4 * hidden_size))?,
        num_layers,
        num_heads,
        num_kv_heads: num_heads,
        head_dim,
        vocab_size: j.usize_or("vocab_size", Some(50257))?,
        rms_norm_eps: eps as f32,
        rope_theta: 0.0,
        max_position_embeddings: j.usize_or("n_positions", Some(1024))?,
        tie_word_embeddings: j.bool_or("tie_word_embeddings", true)?,
        bos_token_id: id("bos_token_id"),
        eos_token_ids: id("eos_token_id").into_iter().collect(),
        block: BlockSpec {
            norm: NormKind::Layer,
            norms: NormPlacement::PRE,
            qk_norm: QkNorm::None,
            fused_qkv: true,
            mlp: Mlp::Plain,
            act: Activation::GeluTanh,
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            embed_scale: None,
            positions: Positions::Learned,
        },
        layers: vec![
            LayerSpec {
                window: None,
                rope: 0
            };
            num_layers
        ],
        ropes: vec![],
        final_logit_softcap: None,
        hf_json: None,
    })
}

/// The `config.json` a saved GPT-2 directory gets: GPT2Config's keys for `c`.
pub(crate) fn hf_config_out(c: &Config) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_embd": c.hidden_size,
        "n_head": c.num_heads,
        "n_layer": c.num_layers,
        "n_inner": c.intermediate_size,
        "n_positions": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "layer_norm_epsilon": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings,
        "scale_attn_weights": true,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids.first(),
        "torch_dtype": "float32",
    })
}
