//! `--adapter PATH[:WEIGHT]`, as every command reads it: a PEFT directory or a GGUF adapter file,
//! with an optional weight.

use std::path::PathBuf;

use anyhow::{Context, Result};
use lorakit::lora::peft::Adapter;

/// `PATH` or `PATH:WEIGHT`.
pub fn parse_adapter_spec(spec: &str) -> Result<(PathBuf, f32)> {
    if let Some((dir, w)) = spec.rsplit_once(':') {
        if let Ok(w) = w.parse::<f32>() {
            anyhow::ensure!(w.is_finite(), "adapter weight in '{spec}' is not finite");
            return Ok((PathBuf::from(dir), w));
        }
    }
    Ok((PathBuf::from(spec), 1.0))
}

/// The adapter at `spec`'s path, checked against the model's `config`, and its weight.
pub fn load_adapter(spec: &str, config: &lorakit::model::Config) -> Result<(Adapter, f32)> {
    let (dir, w) = parse_adapter_spec(spec)?;
    // A PEFT directory or a GGUF adapter file.
    let adapter = lorakit::model::gguf_adapter::load_adapter(&dir, config)
        .with_context(|| format!("cannot load adapter {}", dir.display()))?;
    Ok((adapter, w))
}
