//! Model configuration, the decoder and GPT-2's forward pass.
//!
//! One decoder ([`decoder`], [`decoder_train`]) runs every Llama-shaped family: Llama 1–3.x,
//! SmolLM2, Mistral, Qwen2, Qwen3, Gemma 3, Phi-3 and OLMo 2. They differ only in the block
//! description of [`spec`] and the weight names of [`arch`], never in code copies.

pub mod arch;
pub mod config;
pub mod decoder;
pub mod decoder_train;
pub mod gpt2;
pub mod linear;
pub mod load;
pub mod spec;

pub use config::{Arch, Config};
pub use decoder::{KvCache, LlamaModel};
pub use gpt2::Gpt2Model;
pub use linear::{Linear, Precision};
pub use load::{attach_gguf_blocks, load_model, LoadedModel, ModelSource};

use crate::error::Result;
use crate::lora::peft::Adapter;
use crate::model::decoder::Logits;
use crate::model::decoder_train::{Dropout, LoraGrads};

/// What scoring and generation need of a decoder: Llama-family or GPT-2.
pub trait CausalLm {
    fn config(&self) -> &Config;
    /// A KV cache for at most `capacity` positions.
    fn new_cache(&self, capacity: usize) -> Result<KvCache>;
    /// Runs `ids` at positions `cache.len ..`: logits [T, vocab] (`All`) or [vocab] (`Last`).
    fn forward(&self, ids: &[u32], cache: &mut KvCache, which: Logits) -> Result<Vec<f32>>;
    /// Logits for a whole sequence from position 0: [T, vocab].
    fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut cache = self.new_cache(ids.len())?;
        self.forward(ids, &mut cache, Logits::All)
    }
}

impl CausalLm for LlamaModel {
    fn config(&self) -> &Config {
        &self.config
    }
    fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        LlamaModel::new_cache(self, capacity)
    }
    fn forward(&self, ids: &[u32], cache: &mut KvCache, which: Logits) -> Result<Vec<f32>> {
        LlamaModel::forward(self, ids, cache, which)
    }
}

impl CausalLm for Gpt2Model {
    fn config(&self) -> &Config {
        &self.config
    }
    fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        Gpt2Model::new_cache(self, capacity)
    }
    fn forward(&self, ids: &[u32], cache: &mut KvCache, which: Logits) -> Result<Vec<f32>> {
        Gpt2Model::forward(self, ids, cache, which)
    }
}

/// What the LoRA trainer needs of a model: a training forward that keeps its activations
/// (`Acts`), the LM head + loss ([`LmHead`](crate::train::loss::LmHead)) and the backward to
/// the adapter's tensors.
pub trait LoraTrainable: CausalLm + crate::train::loss::LmHead {
    type Acts: Default;
    /// ids: [batch, seq] row-major; fills `acts`.
    fn train_forward(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        adapter: Option<&Adapter>,
        dropout: Dropout,
        acts: &mut Self::Acts,
    ) -> Result<()>;
    /// The residual stream after the last layer, [batch·seq, hidden].
    fn x_final(acts: &Self::Acts) -> &[f32];
    /// dx = ∂loss/∂x_final [batch·seq, hidden] (used as a work buffer) → dA, dB into `grads`.
    fn train_backward(
        &self,
        dx: &mut [f32],
        acts: &Self::Acts,
        adapter: &Adapter,
        dropout: Dropout,
        grads: &mut LoraGrads,
    ) -> Result<()>;
}

impl LoraTrainable for LlamaModel {
    type Acts = decoder_train::Activations;
    fn train_forward(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        adapter: Option<&Adapter>,
        dropout: Dropout,
        acts: &mut Self::Acts,
    ) -> Result<()> {
        LlamaModel::train_forward(self, ids, batch, seq, adapter, dropout, acts)
    }
    fn x_final(acts: &Self::Acts) -> &[f32] {
        &acts.x_final
    }
    fn train_backward(
        &self,
        dx: &mut [f32],
        acts: &Self::Acts,
        adapter: &Adapter,
        dropout: Dropout,
        grads: &mut LoraGrads,
    ) -> Result<()> {
        LlamaModel::train_backward(self, dx, acts, adapter, dropout, grads)
    }
}

impl LoraTrainable for Gpt2Model {
    type Acts = gpt2::Gpt2Activations;
    fn train_forward(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        adapter: Option<&Adapter>,
        dropout: Dropout,
        acts: &mut Self::Acts,
    ) -> Result<()> {
        Gpt2Model::train_forward(self, ids, batch, seq, adapter, dropout, acts)
    }
    fn x_final(acts: &Self::Acts) -> &[f32] {
        &acts.x_final
    }
    fn train_backward(
        &self,
        dx: &mut [f32],
        acts: &Self::Acts,
        adapter: &Adapter,
        dropout: Dropout,
        grads: &mut LoraGrads,
    ) -> Result<()> {
        Gpt2Model::train_backward(self, dx, acts, adapter, dropout, grads)
    }
}

/// True when `path` is a directory whose `config.json` says `model_type: "gpt2"`. Any problem
/// reading it gives false, so that the usual loader reports it.
pub fn is_gpt2_dir(path: &std::path::Path) -> bool {
    std::fs::read_to_string(path.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["model_type"] == "gpt2")
}
