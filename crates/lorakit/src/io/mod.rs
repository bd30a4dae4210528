//! Readers for model files: GGUF and Hugging Face directories (safetensors + JSON configs);
//! atomic writes, and the checks every output directory or file passes (`output`).

pub mod atomic;
pub mod gguf;
pub mod hf_dir;
pub mod output;
pub mod safetensors_file;
