//! Llama 1–3.x (SmolLM2, TinyLlama), Mistral and Qwen2: the plain pre-norm block every other
//! family starts from. `config.json` is read by the shared code in `model/config.rs`
//! (`rope_type: "llama3"` included); this file holds the weight names and the GGUF keys.

use super::table::{GgufKeys, NormSlot, Slot, WeightTable, LLAMA_LINEARS};
use crate::error::{Error, Result};
use crate::model::spec::{
    Activation, BlockSpec, LayerSpec, Mlp, NormKind, NormPlacement, Positions, QkNorm, Rope,
    RopeScaling,
};

/// llama.cpp's tensor of RoPE frequency divisors.
const ROPE_FREQS: &str = "rope_freqs.weight";
use crate::model::config::{Arch, Config};

const NORMS: [(Slot, &str, &str); 2] = [
    (Slot::Norm(NormSlot::AttnIn), "input_layernorm", "attn_norm"),
    (
        Slot::Norm(NormSlot::MlpIn),
        "post_attention_layernorm",
        "ffn_norm",
    ),
];

pub const WEIGHTS: WeightTable = WeightTable {
    linears: &LLAMA_LINEARS,
    norms: &NORMS,
    gguf_permute_qk: true,
    gguf_norms_plus_one: false,
};

/// Qwen2's GGUF keeps HF's row order (llama.cpp runs it with NEOX-style RoPE).
pub const QWEN2_WEIGHTS: WeightTable = WeightTable {
    linears: &LLAMA_LINEARS,
    norms: &NORMS,
    gguf_permute_qk: false,
    gguf_norms_plus_one: false,
};

/// The shared `{arch}.*` GGUF keys as a plain pre-norm block; other families adjust it.
pub(crate) fn gguf_config(k: &GgufKeys, arch: Arch) -> Result<Config> {
    let gguf = k.gguf;
    let hidden_size = k.usize("embedding_length")?;
    let num_heads = k.usize("attention.head_count")?;
    let num_kv_heads = k.usize_or("attention.head_count_kv", num_heads)?;
    let head_dim = k.usize_or("attention.key_length", hidden_size / num_heads)?;
    let vocab_size = match k.has("vocab_size") {
        true => k.usize("vocab_size")?,
        false => gguf.get_str_array("tokenizer.ggml.tokens")?.len(),
    };
    let rope_theta = k.f32_or("rope.freq_base", 10000.0)? as f64;
    let num_layers = k.usize("block_count")?;
    let opt_id = |key: &str| gguf.get(key).and_then(|v| v.as_u64()).map(|v| v as u32);
    let qkv_bias = gguf.tensor_info("blk.0.attn_q.bias").is_some();
    // Llama 3's RoPE scaling travels as per-frequency divisors (llama.cpp's `rope_freqs`).
    let scaling = match gguf.tensor_info(ROPE_FREQS) {
        None => RopeScaling::None,
        Some(_) => {
            let (f, _) = gguf.tensor_f32(ROPE_FREQS)?;
            if f.len() != head_dim / 2 || f.iter().any(|v| !v.is_finite() || *v <= 0.0) {
                return Err(Error::tensor(
                    gguf.path(),
                    ROPE_FREQS,
                    format!(
                        "expected {} positive factors (head_dim / 2), found {}",
                        head_dim / 2,
                        f.len()
                    ),
                ));
            }
            RopeScaling::Factors(f)
        }
    };
    Ok(Config {
        arch,
        hidden_size,
        intermediate_size: k.usize("feed_forward_length")?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        rms_norm_eps: k.f32("attention.layer_norm_rms_epsilon")?,
        rope_theta,
        max_position_embeddings: k.usize_or("context_length", 4096)?,
        tie_word_embeddings: gguf.tensor_info("output.weight").is_none(),
        bos_token_id: opt_id("tokenizer.ggml.bos_token_id"),
        eos_token_ids: opt_id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        block: BlockSpec {
            norm: NormKind::Rms { offset: 0.0 },
            norms: NormPlacement::PRE,
            qk_norm: QkNorm::None,
            fused_qkv: false,
            mlp: Mlp::Gated { fused: false },
            act: Activation::Silu,
            qkv_bias,
            o_bias: gguf.tensor_info("blk.0.attn_output.bias").is_some(),
            mlp_bias: false,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            embed_scale: None,
            positions: Positions::Rope,
        },
        layers: vec![
            LayerSpec {
                window: None,
                rope: 0
            };
            num_layers
        ],
        ropes: vec![Rope {
            theta: rope_theta,
            scaling,
        }],
        final_logit_softcap: None,
        hf_json: None,
    })
}

/// One RoPE table as transformers' `rope_parameters` (also what `rope_scaling` held before
/// transformers 5). llama.cpp's per-frequency divisors (`rope_freqs`) have no such form.
pub(crate) fn rope_json(r: &Rope) -> Result<serde_json::Value> {
    use serde_json::json;
    Ok(match &r.scaling {
        RopeScaling::None => json!({"rope_type": "default", "rope_theta": r.theta}),
        RopeScaling::Linear { factor } => {
            json!({"rope_type": "linear", "rope_theta": r.theta, "factor": factor})
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_positions,
        } => json!({
            "rope_type": "llama3",
            "rope_theta": r.theta,
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_positions,
        }),
        RopeScaling::Factors(_) => {
            return Err(Error::Invalid(format!(
                "the model's RoPE scaling is a table of per-frequency divisors (the GGUF's {ROPE_FREQS}), which config.json cannot state; write the merged model as GGUF, or merge from the HF checkpoint"
            )))
        }
    })
}

/// The `config.json` of a Llama-shaped model that came without one (from GGUF): the keys every
/// family shares, in transformers 5's form with the older `rope_theta` / `rope_scaling` beside
/// it for older readers; sliding-window layers as `layer_types`. Families add their own keys.
pub(crate) fn hf_config_out(c: &Config) -> Result<serde_json::Value> {
    use serde_json::json;
    let rope = rope_json(&c.ropes[0])?;
    // GGUF holds epsilon as f32: write its shortest decimal form (1e-6, not 9.99999997e-7).
    let eps: f64 = c
        .rms_norm_eps
        .to_string()
        .parse()
        .unwrap_or(c.rms_norm_eps as f64);
    let mut v = json!({
        "architectures": [super::hf_class(c.arch)],
        "model_type": c.arch.name(),
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": eps,
        "rope_theta": c.ropes[0].theta,
        "rope_parameters": rope,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": match c.block.act {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        },
        "torch_dtype": "float32",
        "bos_token_id": c.bos_token_id,
        "eos_token_id": match c.eos_token_ids.as_slice() {
            [] => serde_json::Value::Null,
            [one] => json!(one),
            many => json!(many),
        },
    });
    if rope["rope_type"] != "default" {
        v["rope_scaling"] = rope;
    }
    match c.arch {
        // Qwen2 always has q/k/v biases; Phi-3 none.
        Arch::Qwen2 | Arch::Phi3 | Arch::Gpt2 => {}
        _ => {
            v["attention_bias"] = json!(c.block.qkv_bias);
            v["mlp_bias"] = json!(c.block.mlp_bias);
        }
    }
    let windows: Vec<usize> = c.layers.iter().filter_map(|l| l.window).collect();
    if let Some(&w) = windows.first() {
        if windows.iter().any(|&x| x != w) {
            return Err(Error::Invalid(format!(
                "the layers' sliding windows differ ({windows:?}); config.json has one sliding_window"
            )));
        }
        v["sliding_window"] = json!(w);
        v["layer_types"] = c
            .layers
            .iter()
            .map(|l| match l.window {
                Some(_) => "sliding_attention",
                None => "full_attention",
            })
            .collect();
    }
    Ok(v)
}
