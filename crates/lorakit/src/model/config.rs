//! One [`Config`] for every supported checkpoint, built from an HF `config.json` or from GGUF
//! metadata: the dimensions, the block description ([`BlockSpec`]), and per-layer settings.
//! The settings every family shares are read here; each family's own keys are read by its file
//! in [`crate::model::arch`], which also holds the entry points (`Config::from_hf_json`,
//! `Config::from_gguf`).

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::lora::{AdapterBase, BaseModules, ModuleKind};
use crate::model::spec::{
    Activation, BlockSpec, LayerSpec, Mlp, NormKind, NormPlacement, Positions, QkNorm, Rope,
    RopeScaling,
};

/// The supported architectures (HF `model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 1–3.x, SmolLM/SmolLM2, TinyLlama.
    Llama,
    /// Mistral (sliding-window attention when `sliding_window` is set).
    Mistral,
    /// Qwen2: biases on q, k and v.
    Qwen2,
    /// Qwen3: per-head RMSNorm on q and k.
    Qwen3,
    /// Gemma 3 text (`gemma3_text`): (1 + w) norms around both sublayers, q/k norms, GELU,
    /// √hidden embedding scale, local (sliding) and global layers with their own RoPE θ.
    Gemma3,
    /// Phi-3: fused qkv_proj and gate_up_proj.
    Phi3,
    /// OLMo 2: norms after each sublayer only, q/k norms over the whole projection.
    Olmo2,
    /// GPT-2: LayerNorm, learned positions, Conv1D weights (PEFT names c_attn, c_proj, c_fc).
    Gpt2,
}

impl Arch {
    /// HF's `model_type`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3_text",
            Arch::Phi3 => "phi3",
            Arch::Olmo2 => "olmo2",
            Arch::Gpt2 => "gpt2",
        }
    }

    pub(crate) const ALL: [Arch; 8] = [
        Arch::Llama,
        Arch::Mistral,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Gemma3,
        Arch::Phi3,
        Arch::Olmo2,
        Arch::Gpt2,
    ];

    pub(crate) fn from_model_type(t: &str) -> Option<Arch> {
        Self::ALL.into_iter().find(|a| a.name() == t)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub arch: Arch,
    /// `hidden_size` (GPT-2: `n_embd`).
    pub hidden_size: usize,
    /// `intermediate_size` (GPT-2: `n_inner`, 4·n_embd when null).
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// The norms' epsilon (GPT-2: LayerNorm's `layer_norm_epsilon`).
    pub rms_norm_eps: f32,
    /// θ of the global RoPE table (unused by GPT-2's learned positions).
    pub rope_theta: f64,
    /// GPT-2: `n_positions`, the rows of its position-embedding table.
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The block, the same in every layer.
    pub block: BlockSpec,
    /// One entry per layer.
    pub layers: Vec<LayerSpec>,
    /// The RoPE tables the layers pick from (Gemma 3: global and local).
    pub ropes: Vec<Rope>,
    /// `final_logit_softcapping`: logits become cap · tanh(logits / cap).
    pub final_logit_softcap: Option<f32>,
    /// The `config.json` this came from, which `merge` writes back unchanged.
    pub hf_json: Option<Value>,
}

/// Typed reads of a `config.json` object; every error names the file and the key.
pub struct HfJson<'a> {
    pub obj: &'a Map<String, Value>,
    pub path: &'a Path,
}

impl HfJson<'_> {
    /// The value of `key`, treating null as absent.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.usize_or(key, None)
    }

    pub fn usize_or(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match self.get(key) {
            None => default.ok_or_else(|| Error::config(self.path, key, "missing")),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0 && n < (1 << 32))
                .map(|n| n as usize)
                .ok_or_else(|| {
                    Error::config(
                        self.path,
                        key,
                        format!("expected a positive integer, found {v}"),
                    )
                }),
        }
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| {
                    Error::config(self.path, key, format!("expected a number, found {v}"))
                }),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                Error::config(self.path, key, format!("expected true or false, found {v}"))
            }),
        }
    }

    pub fn str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                Error::config(self.path, key, format!("expected a string, found {v}"))
            }),
        }
    }

    /// A token id or a list of them (`eos_token_id` may be either).
    pub fn ids(&self, key: &str) -> Vec<u32> {
        match self.get(key) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            None => vec![],
        }
    }

    /// The MLP activation named by `key` (an error naming the key for one lorakit lacks).
    pub fn activation(&self, key: &str, default: &str) -> Result<Activation> {
        let name = self.str(key)?.unwrap_or(default);
        match name {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_new" => Ok(Activation::GeluTanh),
            other => Err(Error::config(
                self.path,
                key,
                format!(
                    "activation \"{other}\" is not supported (silu, gelu_pytorch_tanh, gelu_new)"
                ),
            )),
        }
    }

    /// One RoPE description: an object with `rope_type` (or `type`), `rope_theta` and the
    /// scaling keys, as transformers ≥ 5 writes under `rope_parameters` (`key` names it in
    /// errors). `theta` is the fallback θ from the top level (older files).
    pub fn rope(&self, v: Option<&Value>, key: &str, theta: Option<f64>) -> Result<Rope> {
        let empty = Map::new();
        let obj = match v {
            None => &empty,
            Some(Value::Object(o)) => o,
            Some(other) => {
                return Err(Error::config(
                    self.path,
                    key,
                    format!("expected an object, found {other}"),
                ))
            }
        };
        let num = |k: &str| -> Result<Option<f64>> {
            match obj.get(k).filter(|v| !v.is_null()) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .map(Some)
                    .ok_or_else(|| {
                        Error::config(
                            self.path,
                            format!("{key}.{k}"),
                            format!("expected a positive number, found {v}"),
                        )
                    }),
            }
        };
        let need = |k: &str| -> Result<f64> {
            num(k)?.ok_or_else(|| Error::config(self.path, format!("{key}.{k}"), "missing"))
        };
        let theta = match num("rope_theta")? {
            Some(t) => t,
            None => theta.unwrap_or(10000.0),
        };
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: need("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_positions: need("original_max_position_embeddings")?,
            },
            other => {
                return Err(Error::config(
                    self.path,
                    format!("{key}.rope_type"),
                    format!("\"{other}\" is not supported (default, linear, llama3)"),
                ))
            }
        };
        if let RopeScaling::Llama3 {
            low_freq_factor,
            high_freq_factor,
            ..
        } = &scaling
        {
            if high_freq_factor <= low_freq_factor {
                return Err(Error::config(
                    self.path,
                    format!("{key}.high_freq_factor"),
                    "must be larger than low_freq_factor",
                ));
            }
        }
        Ok(Rope { theta, scaling })
    }

    /// The model's one RoPE table: `rope_parameters` (transformers ≥ 5) or the older top-level
    /// `rope_theta` + `rope_scaling`.
    pub fn main_rope(&self) -> Result<Rope> {
        let theta = self.f64("rope_theta")?;
        match self.get("rope_parameters") {
            Some(v) => self.rope(Some(v), "rope_parameters", theta),
            None => self.rope(self.get("rope_scaling"), "rope_scaling", theta),
        }
    }

    /// Per-layer windows from `layer_types` ("full_attention" / "sliding_attention"), or None
    /// when the file has no such list.
    pub fn layer_windows(&self, num_layers: usize) -> Result<Option<Vec<Option<usize>>>> {
        let Some(types) = self.get("layer_types") else {
            return Ok(None);
        };
        let types = types
            .as_array()
            .filter(|a| a.len() == num_layers)
            .ok_or_else(|| {
                Error::config(
                    self.path,
                    "layer_types",
                    format!("expected a list of {num_layers} layer types"),
                )
            })?;
        types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                Some("full_attention") => Ok(None),
                Some("sliding_attention") => self.usize("sliding_window").map(Some),
                _ => Err(Error::config(
                    self.path,
                    format!("layer_types[{i}]"),
                    format!("{t} is not supported (full_attention, sliding_attention)"),
                )),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

impl Config {
    /// What the Llama-shaped families (all but GPT-2) share: dimensions, biases, RoPE, windows.
    /// Family files then change what differs.
    pub(crate) fn llama_like_from_hf(j: &HfJson, arch: Arch) -> Result<Config> {
        let hidden_size = j.usize("hidden_size")?;
        let num_heads = j.usize("num_attention_heads")?;
        let num_kv_heads = j.usize_or("num_key_value_heads", Some(num_heads))?;
        let head_dim = j.usize_or("head_dim", Some(hidden_size / num_heads))?;
        let num_layers = j.usize("num_hidden_layers")?;
        let attention_bias = j.bool_or("attention_bias", false)?;
        let rope = j.main_rope()?;
        let windows = match j.layer_windows(num_layers)? {
            Some(w) => w,
            // Files without layer_types: Mistral windows every layer when sliding_window is set;
            // Qwen2 only with use_sliding_window, from layer max_window_layers on.
            None => match arch {
                Arch::Mistral => vec![
                    j.get("sliding_window")
                        .map(|_| j.usize("sliding_window"))
                        .transpose()?;
                    num_layers
                ],
                Arch::Qwen2 if j.bool_or("use_sliding_window", false)? => {
                    let window = j.usize("sliding_window")?;
                    let from = j.usize_or("max_window_layers", Some(num_layers))?;
                    (0..num_layers)
                        .map(|i| (i >= from).then_some(window))
                        .collect()
                }
                _ => vec![None; num_layers],
            },
        };
        Ok(Config {
            arch,
            hidden_size,
            intermediate_size: j.usize("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: j.usize("vocab_size")?,
            rms_norm_eps: j.f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta: rope.theta,
            max_position_embeddings: j.usize_or("max_position_embeddings", Some(4096))?,
            tie_word_embeddings: j.bool_or("tie_word_embeddings", false)?,
            bos_token_id: j.ids("bos_token_id").first().copied(),
            eos_token_ids: j.ids("eos_token_id"),
            block: BlockSpec {
                norm: NormKind::Rms { offset: 0.0 },
                norms: NormPlacement::PRE,
                qk_norm: QkNorm::None,
                fused_qkv: false,
                mlp: Mlp::Gated { fused: false },
                act: j.activation("hidden_act", "silu")?,
                qkv_bias: arch == Arch::Qwen2 || attention_bias,
                o_bias: attention_bias,
                mlp_bias: j.bool_or("mlp_bias", false)?,
                // 1/√d in f32, as the engine has always computed it.
                attn_scale: 1.0 / (head_dim as f32).sqrt(),
                embed_scale: None,
                positions: Positions::Rope,
            },
            layers: windows
                .into_iter()
                .map(|window| LayerSpec { window, rope: 0 })
                .collect(),
            ropes: vec![rope],
            final_logit_softcap: None,
            hf_json: None,
        })
    }

    pub(crate) fn validate(&self, path: &Path) -> Result<()> {
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::config(
                path,
                "num_key_value_heads",
                format!(
                    "{} query heads are not a multiple of {} KV heads",
                    self.num_heads, self.num_kv_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::config(
                path,
                "head_dim",
                format!("{} is odd; RoPE needs pairs", self.head_dim),
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps < 0.0 {
            return Err(Error::config(path, "rms_norm_eps", "must be ≥ 0"));
        }
        if self.layers.len() != self.num_layers
            || self
                .layers
                .iter()
                .any(|l| l.rope >= self.ropes.len().max(1))
        {
            return Err(Error::config(
                path,
                "num_hidden_layers",
                "layer settings do not match the layer count",
            ));
        }
        Ok(())
    }

    /// The linear modules of one layer, in PEFT's path order.
    pub fn module_kinds(&self) -> &'static [ModuleKind] {
        match self.arch {
            Arch::Gpt2 => &ModuleKind::GPT2,
            Arch::Phi3 => &ModuleKind::PHI3,
            _ => &ModuleKind::ALL,
        }
    }

    /// The adapter module kind (PEFT's name) of the decoder layer's linear `role` (Qkv, O, Up,
    /// Down, ...): GPT-2 names its fused qkv, o, up and down c_attn, attn.c_proj, c_fc,
    /// mlp.c_proj; every other family uses the role's own name.
    pub fn adapter_kind(&self, role: ModuleKind) -> ModuleKind {
        match (self.arch, role) {
            (Arch::Gpt2, ModuleKind::Qkv) => ModuleKind::CAttn,
            (Arch::Gpt2, ModuleKind::O) => ModuleKind::AttnCProj,
            (Arch::Gpt2, ModuleKind::Up) => ModuleKind::CFc,
            (Arch::Gpt2, ModuleKind::Down) => ModuleKind::MlpCProj,
            _ => role,
        }
    }

    /// The decoder layer's role of adapter module `kind` (the inverse of
    /// [`Config::adapter_kind`]); None when this architecture has no module of that name.
    pub fn layer_role(&self, kind: ModuleKind) -> Option<ModuleKind> {
        let gpt2 = self.arch == Arch::Gpt2;
        match kind {
            ModuleKind::CAttn if gpt2 => Some(ModuleKind::Qkv),
            ModuleKind::AttnCProj if gpt2 => Some(ModuleKind::O),
            ModuleKind::CFc if gpt2 => Some(ModuleKind::Up),
            ModuleKind::MlpCProj if gpt2 => Some(ModuleKind::Down),
            ModuleKind::CAttn | ModuleKind::AttnCProj | ModuleKind::CFc | ModuleKind::MlpCProj => {
                None
            }
            _ if gpt2 => None,
            k => Some(k),
        }
    }

    /// [out, in] of a linear layer (GPT-2's Conv1D layers as the [out, in] the LoRA math uses,
    /// not their stored [in, out]).
    pub fn module_shape(&self, kind: ModuleKind) -> (usize, usize) {
        let (h, q, kv, i) = (
            self.hidden_size,
            self.q_dim(),
            self.kv_dim(),
            self.intermediate_size,
        );
        match kind {
            ModuleKind::Q => (q, h),
            ModuleKind::K | ModuleKind::V => (kv, h),
            ModuleKind::O => (h, q),
            ModuleKind::Gate | ModuleKind::Up => (i, h),
            ModuleKind::Down => (h, i),
            ModuleKind::CAttn => (3 * h, h),
            ModuleKind::AttnCProj => (h, h),
            ModuleKind::CFc => (i, h),
            ModuleKind::MlpCProj => (h, i),
            ModuleKind::Qkv => (q + 2 * kv, h),
            ModuleKind::GateUp => (2 * i, h),
        }
    }

    /// Rows of a q or k projection: heads · head_dim.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Parameters of the whole model (embedding, layers, norms, LM head unless tied).
    pub fn parameter_count(&self) -> usize {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let b = &self.block;
        let (q, kv) = (self.q_dim(), self.kv_dim());
        let norm_size = |n: usize| match b.norm {
            NormKind::Layer => 2 * n,
            NormKind::Rms { .. } => n,
        };
        let mut attn = h * q + 2 * h * kv + q * h;
        if b.qkv_bias {
            attn += q + 2 * kv;
        }
        if b.o_bias {
            attn += h;
        }
        let mlp = match b.mlp {
            Mlp::Gated { .. } => 3 * h * i + if b.mlp_bias { 2 * i + h } else { 0 },
            Mlp::Plain => 2 * h * i + if b.mlp_bias { i + h } else { 0 },
        };
        let p = b.norms;
        let norms = [p.attn_in, p.attn_out, p.mlp_in, p.mlp_out]
            .iter()
            .filter(|&&on| on)
            .count()
            * norm_size(h);
        let qk = match b.qk_norm {
            QkNorm::None => 0,
            QkNorm::PerHead => 2 * self.head_dim,
            QkNorm::Whole => q + kv,
        };
        let layer = attn + mlp + norms + qk;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        let positions = match b.positions {
            Positions::Learned => self.max_position_embeddings * h,
            Positions::Rope => 0,
        };
        self.vocab_size * h + positions + self.num_layers * layer + norm_size(h) + head
    }
}

impl AdapterBase for Config {
    fn base_modules(&self) -> BaseModules {
        BaseModules {
            arch: self.arch.name(),
            num_layers: self.num_layers,
            modules: self
                .module_kinds()
                .iter()
                .map(|&k| {
                    let (out, inp) = self.module_shape(k);
                    (k, out, inp)
                })
                .collect(),
            conv1d: self.arch == Arch::Gpt2,
        }
    }
}
