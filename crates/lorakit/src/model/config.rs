//! One [`Config`] for every supported checkpoint, built from an HF `config.json` or from GGUF
//! metadata.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::gguf::GgufFile;

/// The architectures that share the Llama forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama, SmolLM/SmolLM2, TinyLlama.
    Llama,
    /// Mistral (without sliding-window attention, which only matters past its window).
    Mistral,
    /// Qwen2: biases on q, k and v.
    Qwen2,
    /// GPT-2: its own forward pass ([`Gpt2Model`](crate::model::Gpt2Model)), not the Llama one.
    Gpt2,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Gpt2 => "gpt2",
        }
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
    /// RMSNorm epsilon (GPT-2: LayerNorm's `layer_norm_epsilon`).
    pub rms_norm_eps: f32,
    /// Unused by GPT-2 (learned position embeddings).
    pub rope_theta: f64,
    /// GPT-2: `n_positions`, the rows of its position-embedding table.
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q_proj, k_proj and v_proj (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama's `attention_bias` also covers it).
    pub o_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl Config {
    /// Reads an HF `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::format(path, "expected a JSON object at the top level"))?;
        let get = |key: &str| obj.get(key).filter(|v| !v.is_null());
        let usize_of = |key: &str| -> Result<usize> {
            let v = get(key).ok_or_else(|| Error::config(path, key, "missing"))?;
            v.as_u64()
                .filter(|&n| n > 0 && n < (1 << 32))
                .map(|n| n as usize)
                .ok_or_else(|| {
                    Error::config(path, key, format!("expected a positive integer, found {v}"))
                })
        };
        let f64_of = |key: &str| -> Result<Option<f64>> {
            match get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .map(Some)
                    .ok_or_else(|| {
                        Error::config(path, key, format!("expected a number, found {v}"))
                    }),
            }
        };
        let bool_of = |key: &str, default: bool| -> Result<bool> {
            match get(key) {
                None => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| {
                    Error::config(path, key, format!("expected true or false, found {v}"))
                }),
            }
        };

        let model_type = get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::config(path, "model_type", "missing or not a string"))?;
        let arch = match model_type {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "gpt2" => return Self::from_gpt2_json(obj, path),
            other => {
                return Err(Error::unsupported(
                    path,
                    format!(
                        "architecture model_type = \"{other}\" (supported: llama, mistral, qwen2, gpt2)"
                    ),
                ))
            }
        };
        if let Some(act) = get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(Error::unsupported(
                    path,
                    format!("hidden_act = \"{act}\" (only silu)"),
                ));
            }
        }
        // transformers ≥ 5 nests RoPE settings under rope_parameters; older files use
        // rope_theta + rope_scaling at the top level.
        let rope = get("rope_parameters").or_else(|| get("rope_scaling"));
        if let Some(rope) = rope.and_then(Value::as_object) {
            let kind = rope
                .get("rope_type")
                .or_else(|| rope.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind != "default" {
                return Err(Error::unsupported(
                    path,
                    format!("RoPE scaling rope_type = \"{kind}\""),
                ));
            }
        }
        let rope_theta = match rope
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
        {
            Some(t) => t,
            None => f64_of("rope_theta")?.unwrap_or(10000.0),
        };

        let hidden_size = usize_of("hidden_size")?;
        let num_heads = usize_of("num_attention_heads")?;
        let num_kv_heads = match get("num_key_value_heads") {
            None => num_heads,
            Some(_) => usize_of("num_key_value_heads")?,
        };
        let head_dim = match get("head_dim") {
            None => hidden_size / num_heads,
            Some(_) => usize_of("head_dim")?,
        };
        let attention_bias = bool_of("attention_bias", false)?;
        let ids = |key: &str| -> Vec<u32> {
            match get(key) {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as u32)
                    .collect(),
                Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
                None => vec![],
            }
        };
        let cfg = Config {
            arch,
            hidden_size,
            intermediate_size: usize_of("intermediate_size")?,
            num_layers: usize_of("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: usize_of("vocab_size")?,
            rms_norm_eps: f64_of("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            max_position_embeddings: match get("max_position_embeddings") {
                None => 4096,
                Some(_) => usize_of("max_position_embeddings")?,
            },
            tie_word_embeddings: bool_of("tie_word_embeddings", false)?,
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: attention_bias,
            bos_token_id: ids("bos_token_id").first().copied(),
            eos_token_ids: ids("eos_token_id"),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// A GPT-2 `config.json` (HF's `GPT2Config` names and defaults). Options that change the
    /// math in ways lorakit does not implement are errors naming the key.
    fn from_gpt2_json(obj: &serde_json::Map<String, Value>, path: &Path) -> Result<Config> {
        let get = |key: &str| obj.get(key).filter(|v| !v.is_null());
        let usize_or = |key: &str, default: Option<usize>| -> Result<usize> {
            match get(key) {
                None => default.ok_or_else(|| Error::config(path, key, "missing")),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n > 0 && n < (1 << 32))
                    .map(|n| n as usize)
                    .ok_or_else(|| {
                        Error::config(path, key, format!("expected a positive integer, found {v}"))
                    }),
            }
        };
        let bool_or = |key: &str, default: bool| -> Result<bool> {
            match get(key) {
                None => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| {
                    Error::config(path, key, format!("expected true or false, found {v}"))
                }),
            }
        };
        // GPT2Config's default is gelu_new; gelu_pytorch_tanh is the same tanh formula.
        match get("activation_function") {
            None => {}
            Some(Value::String(s)) if s == "gelu_new" || s == "gelu_pytorch_tanh" => {}
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
            if bool_or(key, default)? != want {
                return Err(Error::config(
                    path,
                    key,
                    format!("{} is not supported (only {want})", !want),
                ));
            }
        }
        let hidden_size = usize_or("n_embd", Some(768))?;
        let num_heads = usize_or("n_head", Some(12))?;
        if !hidden_size.is_multiple_of(num_heads) {
            return Err(Error::config(
                path,
                "n_head",
                format!("n_embd = {hidden_size} is not a multiple of {num_heads} heads"),
            ));
        }
        let eps = match get("layer_norm_epsilon") {
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
        let id = |key: &str| get(key).and_then(Value::as_u64).map(|v| v as u32);
        Ok(Config {
            arch: Arch::Gpt2,
            hidden_size,
            intermediate_size: usize_or("n_inner", Some(4 * hidden_size))?,
            num_layers: usize_or("n_layer", Some(12))?,
            num_heads,
            num_kv_heads: num_heads,
            head_dim: hidden_size / num_heads,
            vocab_size: usize_or("vocab_size", Some(50257))?,
            rms_norm_eps: eps as f32,
            rope_theta: 0.0,
            max_position_embeddings: usize_or("n_positions", Some(1024))?,
            tie_word_embeddings: bool_or("tie_word_embeddings", true)?,
            qkv_bias: true,
            o_bias: true,
            bos_token_id: id("bos_token_id"),
            eos_token_ids: id("eos_token_id").into_iter().collect(),
        })
    }

    /// Reads the `{arch}.*` keys of a GGUF file (llama.cpp's names).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Config> {
        let path = gguf.path();
        let arch_name = gguf.get_str("general.architecture")?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(Error::unsupported(
                    path,
                    format!("architecture general.architecture = \"{other}\" (supported: llama, mistral, qwen2)"),
                ))
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let usize_of = |k: &str| -> Result<usize> {
            let n = gguf.get_u64(&key(k))?;
            if n == 0 || n >= (1 << 32) {
                return Err(Error::config(
                    path,
                    key(k),
                    format!("implausible value {n}"),
                ));
            }
            Ok(n as usize)
        };
        let hidden_size = usize_of("embedding_length")?;
        let num_heads = usize_of("attention.head_count")?;
        let num_kv_heads = match gguf.get(&key("attention.head_count_kv")) {
            Some(_) => usize_of("attention.head_count_kv")?,
            None => num_heads,
        };
        let head_dim = match gguf.get(&key("attention.key_length")) {
            Some(_) => usize_of("attention.key_length")?,
            None => hidden_size / num_heads,
        };
        let vocab_size = match gguf.get(&key("vocab_size")) {
            Some(_) => usize_of("vocab_size")?,
            None => gguf.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        let rope_theta = match gguf.get(&key("rope.freq_base")) {
            Some(_) => gguf.get_f32(&key("rope.freq_base"))? as f64,
            None => 10000.0,
        };
        let max_position_embeddings = match gguf.get(&key("context_length")) {
            Some(_) => usize_of("context_length")?,
            None => 4096,
        };
        let tie_word_embeddings = gguf.tensor_info("output.weight").is_none();
        let qkv_bias = gguf.tensor_info("blk.0.attn_q.bias").is_some();
        let o_bias = gguf.tensor_info("blk.0.attn_output.bias").is_some();
        let opt_id = |k: &str| gguf.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        let cfg = Config {
            arch,
            hidden_size,
            intermediate_size: usize_of("feed_forward_length")?,
            num_layers: usize_of("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: gguf.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta,
            max_position_embeddings,
            tie_word_embeddings,
            qkv_bias,
            o_bias,
            bos_token_id: opt_id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: opt_id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
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
        Ok(())
    }

    /// Parameters of the whole model (embedding, layers, norms, LM head unless tied).
    pub fn parameter_count(&self) -> usize {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        if self.arch == Arch::Gpt2 {
            // Two LayerNorms (weight + bias), c_attn, attn.c_proj, c_fc, mlp.c_proj (all biased).
            let layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h);
            let head = if self.tie_word_embeddings {
                0
            } else {
                self.vocab_size * h
            };
            return (self.vocab_size + self.max_position_embeddings) * h
                + self.num_layers * layer
                + 2 * h
                + head;
        }
        let q = self.num_heads * hd;
        let kv = self.num_kv_heads * hd;
        let mut attn = h * q + 2 * h * kv + q * h;
        if self.qkv_bias {
            attn += q + 2 * kv;
        }
        if self.o_bias {
            attn += h;
        }
        let layer = attn + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_layers * layer + h + head
    }
}
