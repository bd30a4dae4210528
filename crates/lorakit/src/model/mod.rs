//! Model configuration, the Llama-family forward pass and GPT-2's.
//!
//! One implementation covers Llama, SmolLM/SmolLM2, TinyLlama, Mistral and Qwen2: they differ
//! only in [`Config`] switches (q/k/v biases, tied LM head, RoPE theta), never in code copies.

pub mod config;
pub mod gpt2;
pub mod linear;
pub mod llama;
pub mod llama_train;
pub mod load;

pub use config::{Arch, Config};
pub use gpt2::Gpt2Model;
pub use linear::{Linear, Precision};
pub use llama::{KvCache, LlamaModel};
pub use load::{attach_gguf_blocks, load_model, LoadedModel, ModelSource};
