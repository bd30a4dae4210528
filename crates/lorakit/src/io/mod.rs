//! Readers for model files: GGUF and Hugging Face directories (safetensors + JSON configs).

pub mod atomic;
pub mod gguf;
pub mod hf_dir;
pub mod hf_save;
pub mod safetensors_file;
