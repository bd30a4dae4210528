//! `lorakit export` (a PEFT adapter as llama.cpp's GGUF LoRA), `train --gguf-adapter`, and
//! `merge --out FILE.gguf` (a merged model as a GGUF llama.cpp runs).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use lorakit::io::gguf::{GgmlType, GgufFile};
use lorakit::io::output::prepare_output_file;
use lorakit::model::gguf_adapter::{
    gguf_adapter_bytes, is_lorakit_gguf, load_adapter, ADAPTER_TYPES,
};
use lorakit::model::gguf_model::{
    parse_type, save_gguf_model, FileType, GgufSource, FILE_TYPE_NAMES,
};
use lorakit::model::Config;
use lorakit::train::trainer::TrainOutput;

use crate::resolve_model;

/// The file `train --gguf-adapter` writes beside the PEFT files.
pub const TRAIN_GGUF_FILE: &str = "adapter_model.gguf";

#[derive(Args)]
pub struct ExportArgs {
    /// The base model the adapter belongs to (its architecture and GGUF tensor names): a .gguf
    /// file or HF directory [default: the fetched SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// The adapter to convert: a PEFT directory (or a GGUF adapter, to change its type).
    #[arg(long)]
    adapter: PathBuf,
    /// The GGUF adapter file to write.
    #[arg(long)]
    out: PathBuf,
    /// Tensor type: f32, f16, bf16 or q8_0 (q8_0 tensors whose rows are not whole 32-value
    /// blocks, lora_b of rank < 32, are written in f16, as llama.cpp's converter does).
    #[arg(long = "type", default_value = "f32")]
    dtype: String,
    /// Also write an Ollama Modelfile here: FROM the base model, ADAPTER the GGUF adapter, the
    /// chat template as TEMPLATE (with SYSTEM for its default system prompt) and PARAMETER stop
    /// for each end-of-turn token. `ollama create NAME -f PATH` then builds the model.
    #[arg(long)]
    modelfile: Option<PathBuf>,
    /// Replace an existing file lorakit did not write.
    #[arg(long)]
    overwrite: bool,
}

/// The first line lorakit writes into a Modelfile (how it recognises its own).
const MODELFILE_HEADER: &str = "# Ollama Modelfile written by lorakit export";

/// `f32` / `f16` / `bf16` / `q8_0` as an adapter's tensor type.
pub fn adapter_type(s: &str) -> Result<GgmlType> {
    match parse_type(s) {
        Some(t) if ADAPTER_TYPES.contains(&t) => Ok(t),
        _ => bail!("unknown GGUF adapter type '{s}' (f32, f16, bf16, q8_0)"),
    }
}

/// The model's config without loading its weights.
fn model_config(path: &Path) -> Result<Config> {
    let c = if path.is_dir() {
        Config::from_hf_json(&path.join("config.json"))?
    } else {
        Config::from_gguf(&GgufFile::open(path)?)?
    };
    Ok(c)
}

pub fn cmd_export(a: ExportArgs) -> Result<()> {
    let dtype = adapter_type(&a.dtype)?;
    let model = resolve_model(a.model.clone())?;
    let inputs = [
        ("--model", model.as_path()),
        ("--adapter", a.adapter.as_path()),
    ];
    let out = prepare_output_file(
        &a.out,
        &inputs,
        a.overwrite,
        "a GGUF file lorakit wrote",
        &is_lorakit_gguf,
    )?;
    // The Modelfile is checked and built before anything is written.
    let modelfile = match &a.modelfile {
        None => None,
        Some(path) => {
            let file = prepare_output_file(
                path,
                &inputs,
                a.overwrite,
                "a Modelfile lorakit wrote",
                &|p: &Path| {
                    std::fs::read_to_string(p).is_ok_and(|t| t.starts_with(MODELFILE_HEADER))
                },
            )?;
            let tok = if model.is_dir() {
                lorakit::tokenize::Tokenizer::from_hf_dir(&model)
            } else {
                lorakit::tokenize::Tokenizer::from_gguf(&GgufFile::open(&model)?)
            }
            .with_context(|| format!("cannot read the tokenizer of {}", model.display()))?;
            let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            let text =
                lorakit::tokenize::ollama::modelfile(&abs(&model), Some(&abs(&a.out)), &tok)?;
            Some((file, format!("{MODELFILE_HEADER}\n{text}"), path.clone()))
        }
    };
    let config = model_config(&model)?;
    let adapter = load_adapter(&a.adapter, &config)
        .with_context(|| format!("cannot load adapter {}", a.adapter.display()))?;
    let (bytes, info) = gguf_adapter_bytes(&adapter, &config, dtype, &a.adapter)?;
    out.write(&bytes)?;
    eprintln!(
        "GGUF adapter written to {} ({} modules, {}, adapter.lora.alpha {}{})",
        a.out.display(),
        info.modules,
        dtype.name(),
        info.alpha,
        if info.folded {
            "; each module's scale folded into lora_b, which llama.cpp's alpha / r cannot express"
        } else {
            ""
        }
    );
    if let Some((file, text, path)) = modelfile {
        file.write(text.as_bytes())?;
        eprintln!(
            "Ollama Modelfile written to {} (ollama create NAME -f {})",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

/// `train --gguf-adapter`: the trained adapter (read back from the PEFT files just written) as
/// OUT/adapter_model.gguf, listed in the output's marker.
pub fn write_train_gguf(output: &TrainOutput, config: &Config, dtype: GgmlType) -> Result<()> {
    let dir = output.path();
    let adapter = lorakit::lora::peft::Adapter::load(dir, config)?;
    let (bytes, _) = gguf_adapter_bytes(&adapter, config, dtype, dir)?;
    output.dir().add_file(TRAIN_GGUF_FILE, &bytes)?;
    eprintln!(
        "GGUF adapter written to {}",
        dir.join(TRAIN_GGUF_FILE).display()
    );
    Ok(())
}

/// `merge --out FILE.gguf`: the merged model as a GGUF file of `dtype`, from a GGUF base whose
/// metadata (architecture, tokenizer, chat template) it keeps, or from an HF directory (metadata
/// built as llama.cpp's converter builds it).
pub fn merge_gguf(
    model: &Path,
    adapters: &[String],
    out: &Path,
    dtype: &str,
    overwrite: bool,
) -> Result<()> {
    let Some(file_type) = FileType::parse(dtype) else {
        bail!("unknown --type '{dtype}' for a merged GGUF ({FILE_TYPE_NAMES})");
    };
    let specs = adapters
        .iter()
        .map(|s| crate::adapter_arg::parse_adapter_spec(s).map(|(d, _)| d))
        .collect::<Result<Vec<_>>>()?;
    let mut inputs = vec![("--model", model)];
    inputs.extend(specs.iter().map(|d| ("--adapter", d.as_path())));
    let out_file = prepare_output_file(
        out,
        &inputs,
        overwrite,
        "a GGUF file lorakit wrote",
        &is_lorakit_gguf,
    )?;
    let mut loaded = crate::open_model(Some(model.to_path_buf()))?;
    crate::attach_adapters(&mut loaded, adapters)?;
    loaded.model.merge_adapters()?;
    let written = if model.is_dir() {
        lorakit::model::gguf_from_hf::check_convertible(&loaded.model.config, model)?;
        let tok = loaded.tokenizer()?;
        save_gguf_model(
            &loaded.model,
            GgufSource::HfDir(model, tok),
            file_type,
            &out_file,
        )
    } else {
        let source = GgufFile::open(model)?;
        save_gguf_model(
            &loaded.model,
            GgufSource::Gguf(&source),
            file_type,
            &out_file,
        )
    };
    written.with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!(
        "merged model written to {} ({})",
        out.display(),
        dtype.to_lowercase()
    );
    Ok(())
}
