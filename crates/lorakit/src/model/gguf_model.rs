//! A model written as a GGUF file llama.cpp runs: `merge --out FILE.gguf`, and F32 bases for the
//! tests.
//!
//! The base must itself be a GGUF file: its metadata (architecture keys, the tokenizer's tokens,
//! scores, merges, token types and special ids, the chat template) is copied as it is, and every
//! tensor of its directory is written, in its order, from the model's current weights (merged
//! adapters included): linears and the embedding quantised to the chosen type, norms and other
//! 1-D tensors in F32, as llama.cpp's own converter and quantiser do. Where the GGUF stores
//! weights differently from HF, the load's changes are undone (q/k rows interleaved again,
//! Gemma's norms as 1 + w). A 2-D tensor whose rows are not whole blocks of the chosen type is
//! written in F16, as llama.cpp's converter does.

use crate::error::{Error, Result};
use crate::io::gguf::can_quantize;
use crate::io::gguf::{quantize, GgmlType, GgufFile, GgufValue, GgufWriter};
use crate::io::output::OutputFile;
use crate::lora::ModuleKind;
use crate::model::arch::{self, Slot, EMBED, FINAL_NORM, HEAD};
use crate::model::decoder::Decoder;
use crate::model::gguf_adapter::{file_type, LORAKIT_KEY};
use crate::model::load::permute_rows;

/// The types a merged model can be written in.
pub const MODEL_TYPES: [GgmlType; 5] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
];

/// `f32`, `f16`, `bf16`, `q8_0`, `q4_0` → the type.
pub fn parse_type(s: &str) -> Option<GgmlType> {
    MODEL_TYPES
        .into_iter()
        .find(|t| t.name().eq_ignore_ascii_case(s))
}

/// The f32 values of the tensor `name` of `source` as `model` holds them now, in the GGUF's
/// layout, with its row-major shape.
fn tensor_from_model(
    model: &Decoder,
    source: &GgufFile,
    name: &str,
) -> Result<(Vec<f32>, Vec<usize>)> {
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
            source.path(),
            name,
            "lorakit does not know where this tensor comes from in the model; cannot write it",
        )
    };
    if name == EMBED.1 {
        return Ok((model.embed_tokens.clone(), vec![c.vocab_size, h]));
    }
    if name == FINAL_NORM.1 {
        return Ok((plus_one(&model.norm), vec![h]));
    }
    if name == HEAD.1 {
        let head = model.lm_head.as_ref().ok_or_else(unknown)?;
        return Ok((head.weight_f32().to_vec(), vec![c.vocab_size, h]));
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
                    "weight" => (lin.weight_f32().to_vec(), vec![out, inp]),
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

/// The GGUF file of `model` (loaded from `source`), its 2-D weights in `dtype`.
pub fn gguf_model_bytes(model: &Decoder, source: &GgufFile, dtype: GgmlType) -> Result<Vec<u8>> {
    if !MODEL_TYPES.contains(&dtype) {
        return Err(Error::Invalid(format!(
            "a merged GGUF is written in f32, f16, bf16, q8_0 or q4_0, not {}",
            dtype.name().to_lowercase()
        )));
    }
    let mut g = GgufWriter::new();
    for (k, v) in source.metadata() {
        // The reader keeps general.alignment; lorakit writes the default alignment.
        if k == "general.alignment" {
            continue;
        }
        g.kv(k, v.clone());
    }
    g.kv("general.file_type", GgufValue::U32(file_type(dtype)));
    g.kv("general.quantization_version", GgufValue::U32(2));
    g.kv_str(LORAKIT_KEY, "model");
    for info in source.tensors() {
        let name = &info.name;
        // llama.cpp's RoPE frequency table is not a weight of the model; copy it.
        let (data, shape) = if name == "rope_freqs.weight" {
            source.tensor_f32(name)?
        } else {
            tensor_from_model(model, source, name)?
        };
        if shape != info.shape() {
            return Err(Error::tensor(
                source.path(),
                name,
                format!("the model holds {shape:?}, the file {:?}", info.shape()),
            ));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::tensor(
                source.path(),
                name,
                format!(
                    "element {i} is {}; refusing to write a non-finite model",
                    data[i]
                ),
            ));
        }
        let row = *shape.last().unwrap_or(&1);
        let t = if shape.len() < 2 {
            GgmlType::F32
        } else if can_quantize(dtype, row) {
            dtype
        } else {
            GgmlType::F16
        };
        let bytes = quantize(t, &data, row)
            .map_err(|e| Error::tensor(source.path(), name, e.to_string()))?;
        g.tensor(name, &shape, t, bytes);
    }
    Ok(g.to_bytes())
}

/// Writes [`gguf_model_bytes`] to `out` atomically.
pub fn save_gguf_model(
    model: &Decoder,
    source: &GgufFile,
    dtype: GgmlType,
    out: &OutputFile,
) -> Result<()> {
    let bytes = gguf_model_bytes(model, source, dtype)?;
    out.write(&bytes)
}
