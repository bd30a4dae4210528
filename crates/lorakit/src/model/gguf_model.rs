//! A model written as a GGUF file llama.cpp runs: `merge --out FILE.gguf`, and F32 bases for the
//! tests.
//!
//! From a GGUF base, its metadata (architecture keys, the tokenizer's tokens, scores, merges,
//! token types and special ids, the chat template) is copied as it is, and every tensor of its
//! directory is written, in its order, from the model's current weights (merged adapters
//! included). From an HF directory the metadata and directory are built as llama.cpp's converter
//! builds them (`model/gguf_from_hf.rs`). Either way: linears and the embedding quantised to the chosen type, norms and other
//! 1-D tensors in F32, as llama.cpp's own converter and quantiser do. Where the GGUF stores
//! weights differently from HF, the load's changes are undone (q/k rows interleaved again,
//! Gemma's norms as 1 + w). A 2-D tensor whose rows are not whole blocks of the chosen type is
//! written in F16, as llama.cpp's converter does.

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::gguf::can_quantize;
use crate::io::gguf::{quantize, GgmlType, GgufFile, GgufValue, GgufWriter, WRITABLE};
use crate::io::output::OutputFile;
use crate::lora::ModuleKind;
use crate::model::arch::{self, Slot, EMBED, FINAL_NORM, HEAD};
use crate::model::decoder::Decoder;
use crate::model::gguf_adapter::LORAKIT_KEY;
use crate::model::gguf_from_hf::{gguf_tensor_list, hf_gguf_metadata};
use crate::model::load::permute_rows;
use crate::tokenize::Tokenizer;

/// What a merged GGUF model is written in: one type for every matrix, or one of llama.cpp's
/// K-quant mixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileType {
    /// Every matrix in this type (F16 where its rows are not whole blocks); norms in F32.
    Uniform(GgmlType),
    /// llama.cpp's Q4_K_M: Q4_K, with Q6_K for the output and for half of attn_v / ffn_down.
    Q4KM,
    /// llama.cpp's Q5_K_M: Q5_K, with Q6_K for the output and for half of attn_v / ffn_down.
    Q5KM,
}

impl From<GgmlType> for FileType {
    fn from(t: GgmlType) -> Self {
        FileType::Uniform(t)
    }
}

/// The names `--type` accepts for a merged model.
pub const FILE_TYPE_NAMES: &str =
    "f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_k, q5_1, q5_0, q4_k_m, q4_k, q4_1, q4_0";

/// A tensor type lorakit writes, by its ggml name (`f16`, `q8_0`, `q4_k`, …, any case).
pub fn parse_type(s: &str) -> Option<GgmlType> {
    WRITABLE
        .into_iter()
        .find(|t| t.name().eq_ignore_ascii_case(s))
}

impl FileType {
    /// `q4_k_m`, `q5_k_m` or a tensor type lorakit writes.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q4_k_m" => Some(FileType::Q4KM),
            "q5_k_m" => Some(FileType::Q5KM),
            _ => parse_type(s).map(FileType::Uniform),
        }
    }

    /// llama.cpp's `llama_ftype` (`general.file_type`).
    fn llama_ftype(self) -> u32 {
        use GgmlType::*;
        match self {
            FileType::Q4KM => 15,
            FileType::Q5KM => 17,
            FileType::Uniform(t) => match t {
                F16 => 1,
                Q4_0 => 2,
                Q4_1 => 3,
                Q8_0 => 7,
                Q5_0 => 8,
                Q5_1 => 9,
                Q4_K => 14, // MOSTLY_Q4_K_S, the uniform Q4_K file
                Q5_K => 16, // MOSTLY_Q5_K_S
                Q6_K => 18,
                BF16 => 32,
                _ => 0,
            },
        }
    }

    /// The type of tensor `name` (row-major `shape`) of a model with `n_layers` layers.
    ///
    /// The mixes follow llama.cpp's `llama_tensor_get_type` for dense models (not its Falcon,
    /// 70B or mixture-of-experts rules): the output matrix (the token embedding when the output
    /// is tied to it) in Q6_K; `attn_v` and `ffn_down` in Q6_K in the layers where
    /// `use_more_bits` holds (the first and last eighth and every third between); a fused
    /// `attn_qkv` one step up (Q5_K / Q6_K); everything else in the mix's base type. A matrix
    /// whose rows are not whole 256-value blocks falls back as llama.cpp's does (Q4_K → Q5_0,
    /// Q5_K → Q5_1, Q6_K → Q8_0, and F16 if still not whole blocks). 1-D tensors are F32.
    pub fn tensor_type(self, name: &str, shape: &[usize], n_layers: usize, tied: bool) -> GgmlType {
        if shape.len() < 2 {
            return GgmlType::F32;
        }
        let row = *shape.last().unwrap_or(&1);
        let (base, qkv) = match self {
            FileType::Uniform(t) => {
                return if can_quantize(t, row) {
                    t
                } else {
                    GgmlType::F16
                };
            }
            FileType::Q4KM => (GgmlType::Q4_K, GgmlType::Q5_K),
            FileType::Q5KM => (GgmlType::Q5_K, GgmlType::Q6_K),
        };
        let layer = name
            .strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(l, _)| l.parse::<usize>().ok());
        let more_bits = |i: usize| {
            let n = n_layers as i64;
            let i = i as i64;
            i < n / 8 || i >= 7 * n / 8 || (i - n / 8).rem_euclid(3) == 2
        };
        let is_output = name == HEAD.1 || (tied && name == EMBED.1);
        let wanted = if is_output {
            if !row.is_multiple_of(256) {
                GgmlType::Q8_0
            } else {
                GgmlType::Q6_K
            }
        } else if name.ends_with(".attn_qkv.weight") {
            qkv
        } else if (name.ends_with(".attn_v.weight") || name.ends_with(".ffn_down.weight"))
            && layer.is_some_and(more_bits)
        {
            GgmlType::Q6_K
        } else {
            base
        };
        if can_quantize(wanted, row) {
            return wanted;
        }
        let fallback = match wanted {
            GgmlType::Q4_K => GgmlType::Q5_0,
            GgmlType::Q5_K => GgmlType::Q5_1,
            GgmlType::Q6_K => GgmlType::Q8_0,
            t => t,
        };
        if can_quantize(fallback, row) {
            fallback
        } else {
            GgmlType::F16
        }
    }
}

/// The f32 values of the tensor `name` of `source` as `model` holds them now, in the GGUF's
/// layout, with its row-major shape.
fn tensor_from_model(model: &Decoder, source: &Path, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let c = &model.config;
    let table = arch::weights(c.arch);
    let h = c.hidden_size;
    let plus_one = |w: &[f32]| -> Vec<f32> {
        if table.gguf_norms_plus_one {
            w.iter().map(|v| v + 1.0).collect()
        } else {
            w.to_vec()
        }
    };
    let unknown = || {
        Error::tensor(
            source,
            name,
            "lorakit does not know where this tensor comes from in the model; cannot write it",
        )
    };
    if name == EMBED.1 {
        return Ok((
            model.embed_tokens.to_f32().into_owned(),
            vec![c.vocab_size, h],
        ));
    }
    if name == FINAL_NORM.1 {
        return Ok((plus_one(&model.norm), vec![h]));
    }
    if name == HEAD.1 {
        let head = model.lm_head.as_ref().ok_or_else(unknown)?;
        return Ok((head.weight_f32().into_owned(), vec![c.vocab_size, h]));
    }
    let rest = name.strip_prefix("blk.").ok_or_else(unknown)?;
    let (layer, rest) = rest.split_once('.').ok_or_else(unknown)?;
    let layer: usize = layer.parse().map_err(|_| unknown())?;
    let (base, suffix) = rest.rsplit_once('.').ok_or_else(unknown)?;
    let l = model.layers.get(layer).ok_or_else(unknown)?;
    for &(slot, _, gguf) in table.linears.iter().chain(table.norms) {
        if gguf != base {
            continue;
        }
        match slot {
            Slot::Linear(kind) => {
                let lin = l.linear(kind).ok_or_else(unknown)?;
                let (out, inp) = (lin.out_features, lin.in_features);
                let (mut data, shape) = match suffix {
                    "weight" => (lin.weight_f32().into_owned(), vec![out, inp]),
                    "bias" => (lin.bias.clone().ok_or_else(unknown)?, vec![out]),
                    _ => return Err(unknown()),
                };
                let heads = match kind {
                    ModuleKind::Q if table.gguf_permute_qk => Some(c.num_heads),
                    ModuleKind::K if table.gguf_permute_qk => Some(c.num_kv_heads),
                    _ => None,
                };
                if let Some(n_head) = heads {
                    let cols = if suffix == "weight" { inp } else { 1 };
                    data = permute_rows(&data, n_head, out, cols);
                }
                return Ok((data, shape));
            }
            Slot::Norm(ns) => {
                let n = l.norm(ns).ok_or_else(unknown)?;
                let data = match suffix {
                    "weight" => plus_one(n.weight),
                    "bias" => n.bias.ok_or_else(unknown)?.to_vec(),
                    _ => return Err(unknown()),
                };
                let len = data.len();
                return Ok((data, vec![len]));
            }
        }
    }
    Err(unknown())
}

/// Where a merged GGUF's metadata and tensor directory come from.
pub enum GgufSource<'a> {
    /// The GGUF file the model was loaded from: its metadata and tensor order kept.
    Gguf(&'a GgufFile),
    /// The HF directory the model was loaded from, with its tokenizer: metadata as llama.cpp's
    /// converter writes it ([`crate::model::gguf_from_hf`]).
    HfDir(&'a Path, &'a Tokenizer),
}

/// The GGUF file of `model` (loaded from `source`), its 2-D weights in `file_type`.
pub fn gguf_model_bytes(
    model: &Decoder,
    source: &GgufFile,
    file_type: impl Into<FileType>,
) -> Result<Vec<u8>> {
    gguf_bytes(model, GgufSource::Gguf(source), file_type.into())
}

/// [`gguf_model_bytes`] from either kind of source.
pub fn gguf_bytes(model: &Decoder, source: GgufSource, file_type: FileType) -> Result<Vec<u8>> {
    if let FileType::Uniform(t) = file_type {
        if !WRITABLE.contains(&t) {
            return Err(Error::Invalid(format!(
                "a merged GGUF is written in {FILE_TYPE_NAMES}, not {}",
                t.name().to_lowercase()
            )));
        }
    }
    type Directory = Vec<(String, Vec<usize>)>;
    let (path, metadata, tensors): (&Path, Vec<(String, GgufValue)>, Directory) = match source {
        GgufSource::Gguf(g) => (
            g.path(),
            g.metadata()
                .iter()
                // The reader keeps general.alignment; lorakit writes the default alignment.
                .filter(|(k, _)| k.as_str() != "general.alignment")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            g.tensors()
                .iter()
                .map(|t| (t.name.clone(), t.shape()))
                .collect(),
        ),
        GgufSource::HfDir(dir, tok) => (
            dir,
            hf_gguf_metadata(model, dir, tok)?,
            gguf_tensor_list(model),
        ),
    };
    let tied = !tensors.iter().any(|(n, _)| n == HEAD.1);
    let mut g = GgufWriter::new();
    for (k, v) in metadata {
        g.kv(&k, v);
    }
    g.kv("general.file_type", GgufValue::U32(file_type.llama_ftype()));
    g.kv("general.quantization_version", GgufValue::U32(2));
    g.kv_str(LORAKIT_KEY, "model");
    for (name, want_shape) in &tensors {
        // llama.cpp's RoPE frequency table is not a weight of the model; copy it.
        let (data, shape) = match source {
            GgufSource::Gguf(g) if name == "rope_freqs.weight" => g.tensor_f32(name)?,
            _ => tensor_from_model(model, path, name)?,
        };
        if &shape != want_shape {
            return Err(Error::tensor(
                path,
                name,
                format!("the model holds {shape:?}, the file {want_shape:?}"),
            ));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::tensor(
                path,
                name,
                format!(
                    "element {i} is {}; refusing to write a non-finite model",
                    data[i]
                ),
            ));
        }
        let row = *shape.last().unwrap_or(&1);
        let t = file_type.tensor_type(name, &shape, model.config.num_layers, tied);
        let bytes =
            quantize(t, &data, row).map_err(|e| Error::tensor(path, name, e.to_string()))?;
        g.tensor(name, &shape, t, bytes);
    }
    Ok(g.to_bytes())
}

/// Writes [`gguf_model_bytes`] to `out` atomically.
pub fn save_gguf_model(
    model: &Decoder,
    source: GgufSource,
    file_type: FileType,
    out: &OutputFile,
) -> Result<()> {
    let bytes = gguf_bytes(model, source, file_type)?;
    out.write(&bytes)
}
