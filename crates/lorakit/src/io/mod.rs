//! Readers for model files: GGUF and Hugging Face directories.
pub mod gguf;
