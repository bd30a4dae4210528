//! lorakit: LoRA fine-tuning of real LLMs on the CPU.
//!
//! Layout (see `docs/ARCHITECTURE.md` in the repository):
//! - [`engine`]: CPU buffers and kernels (matmul, norms, RoPE, attention, MLP), each an
//!   explicit `*_forward` whose `*_backward` twin the training code adds.
//! - [`model`]: one [`model::Config`] for every supported Llama-family checkpoint and the
//!   Llama forward pass with a KV cache.
//! - [`io`]: readers for GGUF files and Hugging Face directories (safetensors, configs).
//! - [`tokenize`]: tokenizers from `tokenizer.json` or GGUF metadata, and chat templates.
//! - [`generate`] and [`beam`]: sampling, greedy and beam-search decoding on the KV cache.
//! - [`eval`]: evaluation data and metrics (loss, exact, accuracy, BLEU, ROUGE-L, SQL execution).

pub mod analysis;
pub mod beam;
pub mod data;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fuzzing;
pub mod generate;
pub mod io;
pub mod lora;
pub mod model;
pub mod serve;
pub mod sweep;
pub mod tokenize;
pub mod train;

pub use error::{Error, Result};
