//! Model configuration and the decoder.
//!
//! One decoder ([`decoder`], [`decoder_train`]) runs every Llama-shaped family: Llama 1–3.x,
//! SmolLM2, Mistral, Qwen2, Qwen3, Gemma 3, Phi-3, OLMo 2 and GPT-2. They differ only in the block
//! description of [`spec`] and the weight names of [`arch`], never in code copies.

pub mod arch;
pub mod config;
pub mod decoder;
pub mod decoder_train;
pub mod gguf_adapter;
pub mod gguf_from_hf;
pub mod gguf_model;
pub mod kv_cache;
pub mod linear;
pub mod linear_train;
pub mod load;
pub mod param;
pub mod rows;
pub mod save;
pub mod spec;
pub mod traits;

pub use config::{Arch, Config};
pub use decoder::{Decoder, KvCache};
pub use linear::{Linear, Precision, PrecisionChoice, Weight};
pub use load::{
    load_hf_model, load_model, load_model_blocks, quantize_weights, LoadedModel, ModelSource,
};
pub use traits::{CausalLm, LmHead};
