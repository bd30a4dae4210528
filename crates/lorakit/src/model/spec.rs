//! The decoder block described as data. Every supported architecture is one [`BlockSpec`] plus
//! per-layer [`LayerSpec`]s (window, which RoPE table); the forward pass, KV-cache decode, the
//! training forward and the backward read this description instead of being written per family.
//!
//! One block, in the order the passes apply it (each optional step is a switch below):
//! ```text
//! a = attn_in_norm(x)            (absent in OLMo 2)
//! q, k, v = proj(a)              (separate q/k/v or one fused qkv; optional biases)
//! q, k = qk_norm(q), qk_norm(k)  (per head: Qwen3, Gemma 3; whole projection: OLMo 2)
//! q, k = rope(q), rope(k)        (the layer's table: default, llama3 or linear scaling, θ)
//! o = o_proj(attention(q, k, v)) (scale, causal or sliding-window mask)
//! x = x + attn_out_norm(o)       (Gemma 3 and OLMo 2 only)
//! m = mlp_in_norm(x)             (absent in OLMo 2)
//! d = down(act(gate(m)) ⊙ up(m)) (gated; gate/up fused in Phi-3) or down(act(up(m))) (plain)
//! x = x + mlp_out_norm(d)        (Gemma 3 and OLMo 2 only)
//! ```

/// How a norm normalises: RMSNorm `(offset + w) ⊙ x / rms(x)` (offset 1 is Gemma's `1 + w`),
/// or LayerNorm with a bias (GPT-2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    Rms { offset: f32 },
    Layer,
}

/// Which of a block's four norm positions carry a norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormPlacement {
    /// Before attention (`input_layernorm`).
    pub attn_in: bool,
    /// On the attention output, before the residual add (Gemma 3, OLMo 2).
    pub attn_out: bool,
    /// Before the MLP (Llama's `post_attention_layernorm`, Gemma's `pre_feedforward_layernorm`).
    pub mlp_in: bool,
    /// On the MLP output, before the residual add (Gemma 3, OLMo 2).
    pub mlp_out: bool,
}

impl NormPlacement {
    /// Pre-norm only: Llama, Qwen, Mistral, Phi-3, GPT-2.
    pub const PRE: NormPlacement = NormPlacement {
        attn_in: true,
        attn_out: false,
        mlp_in: true,
        mlp_out: false,
    };
}

/// A norm on the queries and keys after their projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Over each head's head_dim values (Qwen3, Gemma 3).
    PerHead,
    /// Over the whole projection, heads·head_dim values (OLMo 2).
    Whole,
}

/// The MLP's nonlinearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// The tanh approximation (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
}

/// Gated `down(act(gate x) ⊙ up x)` (gate and up separate or one fused `gate_up`), or plain
/// `down(act(up x))` (GPT-2's c_fc → c_proj).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mlp {
    Gated { fused: bool },
    Plain,
}

/// Position information: rotary tables, or a learned table added to the embedding (GPT-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    Rope,
    Learned,
}

/// The parts of a decoder block that are the same in every layer.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSpec {
    pub norm: NormKind,
    pub norms: NormPlacement,
    pub qk_norm: QkNorm,
    /// One `qkv` projection with rows [q; k; v] instead of three.
    pub fused_qkv: bool,
    pub mlp: Mlp,
    pub act: Activation,
    /// Biases on q, k and v (Qwen2; Llama's `attention_bias`; GPT-2).
    pub qkv_bias: bool,
    /// Bias on o_proj.
    pub o_bias: bool,
    /// Biases on the MLP's projections (GPT-2; Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Multiplies q·k in attention: 1/√head_dim, or Gemma's `query_pre_attn_scalar^-½`.
    pub attn_scale: f32,
    /// Multiplies the token embedding (Gemma: √hidden, rounded to f32 as transformers does).
    pub embed_scale: Option<f32>,
    pub positions: Positions,
}

/// How a RoPE table's frequencies are derived from θ.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Every frequency divided by `factor` (transformers' `"linear"`).
    Linear {
        factor: f64,
    },
    /// Llama 3.x (`"llama3"`): low frequencies divided by `factor`, high ones kept, a smooth
    /// blend between the two wavelength bounds.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: f64,
    },
    /// Each frequency divided by its own factor: llama.cpp's `rope_freqs.weight` [head_dim / 2],
    /// how a GGUF carries Llama 3's scaling.
    Factors(Vec<f32>),
}

/// One rotary table: θ and its scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl Rope {
    pub fn plain(theta: f64) -> Rope {
        Rope {
            theta,
            scaling: RopeScaling::None,
        }
    }

    /// The frequencies inv_freq [head_dim / 2], as transformers' `ROPE_INIT_FUNCTIONS` (in f64).
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f64> {
        let base = crate::engine::ops::default_inv_freq(head_dim, self.theta);
        match &self.scaling {
            RopeScaling::None => base,
            RopeScaling::Factors(f) => base.iter().zip(f).map(|(b, &f)| b / f as f64).collect(),
            RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => {
                let low_freq_wavelen = original_max_positions / low_freq_factor;
                let high_freq_wavelen = original_max_positions / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen > low_freq_wavelen {
                            f / factor
                        } else if wavelen < high_freq_wavelen {
                            f
                        } else {
                            let smooth = (original_max_positions / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// What differs between the layers of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpec {
    /// Sliding-window attention over the last `window` positions (None: full causal).
    pub window: Option<usize>,
    /// Index into [`Config::ropes`](crate::model::Config::ropes).
    pub rope: usize,
}
