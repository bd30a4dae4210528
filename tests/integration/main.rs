//! The project's one integration-test binary: golden comparisons against the PyTorch/HF/PEFT
//! fixtures in `tests/fixtures/` (see its README for tolerances), the real SmolLM2 model
//! (fetched by `scripts/fetch-model.sh`, never skipped), and the `lorakit` CLI end to end.

mod analysis;
mod arch;
mod bf16;
mod cli_errors;
mod common;
mod corrupted;
mod eval;
mod full_ft;
mod fuzz_regressions;
mod gemma3;
mod gguf_adapter;
mod gguf_blocks;
mod gpt2;
mod logits;
mod lora;
mod mpi;
mod ner;
mod outputs;
mod packing;
mod qlora;
mod real_model;
mod serve;
mod sweep;
mod train;
mod train_errors;
