//! Each supported architecture as a short spec: how its `config.json` (and GGUF metadata)
//! become the block description, and one table of its weights' names. Everything else —
//! forward, decode, training forward and backward, merge, the parameter list, loading and
//! saving — is written once, over these descriptions.
//!
//! Adding an architecture: see `docs/ARCHITECTURE.md`.

pub mod gemma3;
pub mod gpt2;
pub mod llama;
pub mod olmo2;
pub mod phi3;
pub mod qwen3;
pub mod table;

pub use table::{
    GgufKeys, ModelNames, NormSlot, Slot, WeightTable, EMBED, FINAL_NORM, HEAD, HF_LAYERS,
    LLAMA_NAMES,
};

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::gguf::GgufFile;
use crate::model::config::HfJson;
use crate::model::config::{Arch, Config};

impl Config {
    /// Reads an HF `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::format(path, "expected a JSON object at the top level"))?;
        let j = HfJson { obj, path };
        let model_type = j
            .str("model_type")?
            .ok_or_else(|| Error::config(path, "model_type", "missing"))?;
        let supported = Arch::ALL.map(Arch::name).join(", ");
        let arch = Arch::from_model_type(model_type).ok_or_else(|| {
            let hint = if model_type == "gemma3" {
                " (the multimodal Gemma 3; lorakit runs the text model, gemma3_text)"
            } else {
                ""
            };
            Error::unsupported(
                path,
                format!(
                    "architecture model_type = \"{model_type}\"{hint} (supported: {supported})"
                ),
            )
        })?;
        let mut cfg = match arch {
            Arch::Gpt2 => gpt2::hf_config(&j)?,
            _ => Config::llama_like_from_hf(&j, arch)?,
        };
        match arch {
            Arch::Llama | Arch::Mistral | Arch::Qwen2 | Arch::Gpt2 => {}
            Arch::Qwen3 => qwen3::hf_block(&j, &mut cfg)?,
            Arch::Gemma3 => gemma3::hf_block(&j, &mut cfg)?,
            Arch::Phi3 => phi3::hf_block(&j, &mut cfg)?,
            Arch::Olmo2 => olmo2::hf_block(&j, &mut cfg)?,
        }
        cfg.hf_json = Some(v.clone());
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads the `{arch}.*` keys of a GGUF file (llama.cpp's names).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Config> {
        gguf_config(gguf)
    }
}

/// The HF names of `arch`'s model-level tensors and its layer prefix.
pub fn model_names(arch: Arch) -> &'static ModelNames {
    match arch {
        Arch::Gpt2 => &gpt2::NAMES,
        _ => &LLAMA_NAMES,
    }
}

/// The weight table of `arch`.
pub fn weights(arch: Arch) -> &'static WeightTable {
    match arch {
        Arch::Llama | Arch::Mistral => &llama::WEIGHTS,
        Arch::Qwen2 => &llama::QWEN2_WEIGHTS,
        Arch::Qwen3 => &qwen3::WEIGHTS,
        Arch::Gemma3 => &gemma3::WEIGHTS,
        Arch::Phi3 => &phi3::WEIGHTS,
        Arch::Olmo2 => &olmo2::WEIGHTS,
        Arch::Gpt2 => &gpt2::WEIGHTS,
    }
}

/// The `config.json` for a model that came without one (from GGUF), as transformers reads it.
pub fn hf_config_out(c: &Config) -> Result<serde_json::Value> {
    match c.arch {
        Arch::Gpt2 => Ok(gpt2::hf_config_out(c)),
        Arch::Gemma3 => {
            let mut v = llama::hf_config_out(c)?;
            gemma3::hf_config_out(c, &mut v)?;
            Ok(v)
        }
        _ => llama::hf_config_out(c),
    }
}

/// The HF class name written into `architectures` of a saved config.json.
pub fn hf_class(arch: Arch) -> &'static str {
    match arch {
        Arch::Llama => "LlamaForCausalLM",
        Arch::Mistral => "MistralForCausalLM",
        Arch::Qwen2 => "Qwen2ForCausalLM",
        Arch::Qwen3 => "Qwen3ForCausalLM",
        Arch::Gemma3 => "Gemma3ForCausalLM",
        Arch::Phi3 => "Phi3ForCausalLM",
        Arch::Olmo2 => "Olmo2ForCausalLM",
        Arch::Gpt2 => "GPT2LMHeadModel",
    }
}

/// [`Config::from_gguf`]: the shared keys here, the family's own in its file.
fn gguf_config(gguf: &GgufFile) -> Result<Config> {
    let path = gguf.path();
    let arch_name = gguf.get_str("general.architecture")?;
    let arch = match arch_name {
        "llama" => Arch::Llama,
        "mistral" => Arch::Mistral,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        "gemma3" => Arch::Gemma3,
        "phi3" => Arch::Phi3,
        "olmo2" => Arch::Olmo2,
        other => {
            return Err(Error::unsupported(
                path,
                format!("architecture general.architecture = \"{other}\" (supported: llama, mistral, qwen2, qwen3, gemma3, phi3, olmo2)"),
            ))
        }
    };
    let k = GgufKeys {
        gguf,
        arch: arch_name,
    };
    let mut cfg = llama::gguf_config(&k, arch)?;
    match arch {
        Arch::Qwen3 => qwen3::gguf_block(&mut cfg),
        Arch::Gemma3 => gemma3::gguf_block(&k, &mut cfg)?,
        Arch::Phi3 => phi3::block(&mut cfg),
        Arch::Olmo2 => olmo2::block(&mut cfg),
        _ => {}
    }
    cfg.validate(path)?;
    Ok(cfg)
}
