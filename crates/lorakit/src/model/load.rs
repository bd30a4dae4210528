//! Loading a model from a GGUF file or an HF directory into a [`LlamaModel`] + [`Tokenizer`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::engine::quant::{QuantKind, QuantMatrix};
use crate::error::{Error, Result};
use crate::io::gguf::{GgmlType, GgufFile};
use crate::io::hf_dir::SafetensorsSet;
use crate::lora::ModuleKind;
use crate::model::llama::Layer;
use crate::model::{Arch, Config, Linear, LlamaModel};
use crate::tokenize::Tokenizer;

/// Where the weights came from, for `inspect` and error messages.
#[derive(Debug, Clone)]
pub enum ModelSource {
    Gguf {
        path: PathBuf,
        tensor_types: Vec<(String, usize)>,
    },
    HfDir {
        dir: PathBuf,
        files: Vec<PathBuf>,
        dtypes: Vec<(String, usize)>,
    },
}

pub struct LoadedModel {
    pub model: LlamaModel,
    pub tokenizer: Tokenizer,
    pub source: ModelSource,
    /// The model's own chat template text, if it has one.
    pub chat_template: Option<String>,
}

/// Opens `path`: a GGUF file, or an HF directory with `config.json`, `model.safetensors` (or a
/// sharded `model.safetensors.index.json`) and `tokenizer.json`.
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return load_hf_dir(path);
    }
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
        if n < 4 || &magic != b"GGUF" {
            return Err(Error::format(
                path,
                "not a GGUF file (no 'GGUF' magic) and not a directory; pass a .gguf file or an HF model directory",
            ));
        }
    }
    load_gguf(path)
}

fn count_types(names: impl Iterator<Item = String>) -> Vec<(String, usize)> {
    let mut m: HashMap<String, usize> = HashMap::new();
    for n in names {
        *m.entry(n).or_default() += 1;
    }
    let mut v: Vec<_> = m.into_iter().collect();
    v.sort();
    v
}

/// Checks that a loaded tensor has the shape the config implies.
fn expect_shape(path: &Path, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(Error::tensor(
            path,
            name,
            format!("shape {got:?}, but the config implies {want:?}"),
        ));
    }
    Ok(())
}

/// Rejects NaN/Inf in a base weight: a model file from a stranger with a poisoned tensor (or a
/// quantised block whose f16 scale is Inf) would otherwise turn every output into NaN silently.
/// One pass over the dequantised data, ~20 ms for the 135M model.
fn expect_finite(path: &Path, name: &str, data: &[f32]) -> Result<()> {
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(Error::tensor(
            path,
            name,
            format!("element {i} is {} (weights must be finite)", data[i]),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// GGUF

fn load_gguf(path: &Path) -> Result<LoadedModel> {
    let gguf = GgufFile::open(path)?;
    let config = Config::from_gguf(&gguf)?;
    let c = &config;
    let (h, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q_dim, kv_dim) = (c.num_heads * hd, c.num_kv_heads * hd);

    let tensor = |name: &str, want: &[usize]| -> Result<Vec<f32>> {
        let (data, shape) = gguf.tensor_f32(name)?;
        expect_shape(path, name, &shape, want)?;
        expect_finite(path, name, &data)?;
        Ok(data)
    };
    let opt_tensor = |name: &str, want: &[usize]| -> Result<Option<Vec<f32>>> {
        match gguf.tensor_info(name) {
            Some(_) => tensor(name, want).map(Some),
            None => Ok(None),
        }
    };
    // llama.cpp's converter interleaves the rows of q and k for Llama-arch models (its RoPE pairs
    // adjacent elements); HF pairs (i, i + d/2). Undo it so weights equal HF's.
    let permuted = matches!(c.arch, Arch::Llama | Arch::Mistral);
    let linear =
        |base: &str, out: usize, inp: usize, heads_to_unpermute: Option<usize>| -> Result<Linear> {
            let mut w = tensor(&format!("{base}.weight"), &[out, inp])?;
            let mut b = opt_tensor(&format!("{base}.bias"), &[out])?;
            if let Some(n_head) = heads_to_unpermute.filter(|_| permuted) {
                w = unpermute_rows(&w, n_head, out, inp);
                b = b.map(|b| unpermute_rows(&b, n_head, out, 1));
            }
            Ok(Linear::new(w, out, inp, b))
        };

    let embed_tokens = tensor("token_embd.weight", &[c.vocab_size, h])?;
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = format!("blk.{i}");
        layers.push(Layer {
            attn_norm: tensor(&format!("{p}.attn_norm.weight"), &[h])?,
            q_proj: linear(&format!("{p}.attn_q"), q_dim, h, Some(c.num_heads))?,
            k_proj: linear(&format!("{p}.attn_k"), kv_dim, h, Some(c.num_kv_heads))?,
            v_proj: linear(&format!("{p}.attn_v"), kv_dim, h, None)?,
            o_proj: linear(&format!("{p}.attn_output"), h, q_dim, None)?,
            mlp_norm: tensor(&format!("{p}.ffn_norm.weight"), &[h])?,
            gate_proj: linear(&format!("{p}.ffn_gate"), inter, h, None)?,
            up_proj: linear(&format!("{p}.ffn_up"), inter, h, None)?,
            down_proj: linear(&format!("{p}.ffn_down"), h, inter, None)?,
        });
    }
    let norm = tensor("output_norm.weight", &[h])?;
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        Some(linear("output", c.vocab_size, h, None)?)
    };
    let tokenizer = tokenizer_from_gguf(&gguf)?;
    let chat_template = tokenizer.chat_template().map(str::to_owned);
    let source = ModelSource::Gguf {
        path: path.to_owned(),
        tensor_types: count_types(gguf.tensors().iter().map(|t| t.dtype.name().to_string())),
    };
    Ok(LoadedModel {
        model: LlamaModel::new(config, embed_tokens, layers, norm, lm_head),
        tokenizer,
        source,
        chat_template,
    })
}

/// Gives every linear layer and the LM head of a model loaded from the GGUF at `path` its
/// quantised blocks from that file (`--precision gguf`), so inference multiplies with them
/// directly. Only Q4_1 and Q8_0 blocks are supported; any other type is an error naming the
/// tensor. Rows of q and k get the same reordering as at load.
pub fn attach_gguf_blocks(model: &mut LlamaModel, path: &Path) -> Result<()> {
    let gguf = GgufFile::open(path)?;
    let c = model.config.clone();
    let permuted = matches!(c.arch, Arch::Llama | Arch::Mistral);
    let quant = |name: &str, rows: usize, cols: usize, n_head: Option<usize>| {
        let info = gguf
            .tensor_info(name)
            .ok_or_else(|| Error::tensor(path, name, "not found in file"))?;
        let kind = match info.dtype {
            GgmlType::Q4_1 => QuantKind::Q4_1,
            GgmlType::Q8_0 => QuantKind::Q8_0,
            other => {
                return Err(Error::tensor(
                    path,
                    name,
                    format!(
                        "is {}; --precision gguf computes with Q4_1 and Q8_0 blocks only (use f32 or bf16)",
                        other.name()
                    ),
                ))
            }
        };
        // The row permutation of `unpermute_rows` as an index map.
        let order: Option<Vec<usize>> = n_head.filter(|_| permuted).map(|n_head| {
            let head_rows = rows / n_head;
            let half = head_rows / 2;
            (0..rows)
                .map(|dst| {
                    let (head, k) = (dst / head_rows, dst % head_rows);
                    let (j, i) = (k / half, k % half);
                    head * head_rows + 2 * i + j
                })
                .collect()
        });
        QuantMatrix::from_gguf_blocks(
            kind,
            gguf.tensor_bytes(info),
            rows,
            cols,
            order.as_deref(),
            &format!("{}: tensor '{name}'", path.display()),
        )
        .map(Box::new)
    };
    let (h, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q_dim, kv_dim) = (c.num_heads * hd, c.num_kv_heads * hd);
    for (i, layer) in model.layers.iter_mut().enumerate() {
        let p = format!("blk.{i}");
        let shapes = [
            (ModuleKind::Q, "attn_q", q_dim, h, Some(c.num_heads)),
            (ModuleKind::K, "attn_k", kv_dim, h, Some(c.num_kv_heads)),
            (ModuleKind::V, "attn_v", kv_dim, h, None),
            (ModuleKind::O, "attn_output", h, q_dim, None),
            (ModuleKind::Gate, "ffn_gate", inter, h, None),
            (ModuleKind::Up, "ffn_up", inter, h, None),
            (ModuleKind::Down, "ffn_down", h, inter, None),
        ];
        for (kind, name, rows, cols, heads) in shapes {
            let q = quant(&format!("{p}.{name}.weight"), rows, cols, heads)?;
            layer.linear_mut(kind).quant = Some(q);
        }
    }
    match &mut model.lm_head {
        Some(head) => head.quant = Some(quant("output.weight", c.vocab_size, h, None)?),
        None => model.head_quant = Some(quant("token_embd.weight", c.vocab_size, h, None)?),
    }
    Ok(())
}

/// HF order from llama.cpp order: `w.reshape(n_head, rows/n_head/2, 2, cols).swapaxes(1, 2)`.
///
/// w: [rows, cols] → [rows, cols]; within each head, row `j·half + i` of the result is row
/// `2i + j` of the input.
pub fn unpermute_rows(w: &[f32], n_head: usize, rows: usize, cols: usize) -> Vec<f32> {
    let head_rows = rows / n_head;
    let half = head_rows / 2;
    let mut out = vec![0.0f32; w.len()];
    for head in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let dst = head * head_rows + j * half + i;
                let src = head * head_rows + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// HF directory

fn load_hf_dir(dir: &Path) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Error::format(
            dir,
            "directory has no config.json; expected an HF model directory (config.json, model.safetensors, tokenizer.json) or a .gguf file",
        ));
    }
    let config = Config::from_hf_json(&config_path)?;
    if config.arch == Arch::Gpt2 {
        return Err(Error::unsupported(
            &config_path,
            "a GPT-2 model here: this command runs the Llama family only (the library loads GPT-2 with Gpt2Model::load)",
        ));
    }
    let set = SafetensorsSet::open(dir)?;
    let c = &config;
    let (h, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q_dim, kv_dim) = (c.num_heads * hd, c.num_kv_heads * hd);
    let tensor = |name: &str, want: &[usize]| -> Result<Vec<f32>> {
        let (data, shape) = set.tensor_f32(name)?;
        expect_shape(set.file_of(name), name, &shape, want)?;
        expect_finite(set.file_of(name), name, &data)?;
        Ok(data)
    };
    let linear = |base: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
        let w = tensor(&format!("{base}.weight"), &[out, inp])?;
        let b = if bias {
            Some(tensor(&format!("{base}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(w, out, inp, b))
    };
    let embed_tokens = tensor("model.embed_tokens.weight", &[c.vocab_size, h])?;
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        layers.push(Layer {
            attn_norm: tensor(&format!("{p}.input_layernorm.weight"), &[h])?,
            q_proj: linear(&format!("{p}.self_attn.q_proj"), q_dim, h, c.qkv_bias)?,
            k_proj: linear(&format!("{p}.self_attn.k_proj"), kv_dim, h, c.qkv_bias)?,
            v_proj: linear(&format!("{p}.self_attn.v_proj"), kv_dim, h, c.qkv_bias)?,
            o_proj: linear(&format!("{p}.self_attn.o_proj"), h, q_dim, c.o_bias)?,
            mlp_norm: tensor(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            gate_proj: linear(&format!("{p}.mlp.gate_proj"), inter, h, false)?,
            up_proj: linear(&format!("{p}.mlp.up_proj"), inter, h, false)?,
            down_proj: linear(&format!("{p}.mlp.down_proj"), h, inter, false)?,
        });
    }
    let norm = tensor("model.norm.weight", &[h])?;
    // Some tied checkpoints still carry an lm_head copy; the config decides.
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        Some(linear("lm_head", c.vocab_size, h, false)?)
    };
    let tokenizer = Tokenizer::from_hf_dir(dir)?;
    let chat_template = tokenizer.chat_template().map(str::to_owned);
    let source = ModelSource::HfDir {
        dir: dir.to_owned(),
        files: set.files().to_vec(),
        dtypes: count_types(set.dtypes().into_iter()),
    };
    Ok(LoadedModel {
        model: LlamaModel::new(config, embed_tokens, layers, norm, lm_head),
        tokenizer,
        source,
        chat_template,
    })
}

/// The tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
fn tokenizer_from_gguf(gguf: &GgufFile) -> Result<Tokenizer> {
    use crate::tokenize::GgufTokenizerSpec;
    let path = gguf.path();
    let strings = |key: &str| -> Result<Option<Vec<String>>> {
        match gguf.get(key) {
            None => Ok(None),
            Some(_) => Ok(Some(
                gguf.get_str_array(key)?
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
            )),
        }
    };
    let numbers = |key: &str| -> Result<Option<Vec<f64>>> {
        match gguf.get(key) {
            None => Ok(None),
            Some(v) => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| Error::config(path, key, "expected an array"))?;
                arr.iter()
                    .map(|x| {
                        x.as_f64()
                            .ok_or_else(|| Error::config(path, key, "expected numbers"))
                    })
                    .collect::<Result<Vec<f64>>>()
                    .map(Some)
            }
        }
    };
    let id = |key: &str| gguf.get(key).and_then(|v| v.as_u64()).map(|v| v as u32);
    let flag = |key: &str| gguf.get(key).and_then(|v| v.as_bool());
    let tokens = strings("tokenizer.ggml.tokens")?.ok_or_else(|| {
        Error::config(
            path,
            "tokenizer.ggml.tokens",
            "missing: the file has no tokenizer",
        )
    })?;
    let spec = GgufTokenizerSpec {
        model: gguf.get_str("tokenizer.ggml.model")?.to_owned(),
        pre: gguf
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .map(str::to_owned),
        tokens,
        token_types: numbers("tokenizer.ggml.token_type")?
            .map(|v| v.into_iter().map(|x| x as i32).collect()),
        scores: numbers("tokenizer.ggml.scores")?
            .map(|v| v.into_iter().map(|x| x as f32).collect()),
        merges: strings("tokenizer.ggml.merges")?,
        bos_id: id("tokenizer.ggml.bos_token_id"),
        eos_id: id("tokenizer.ggml.eos_token_id"),
        unk_id: id("tokenizer.ggml.unknown_token_id"),
        pad_id: id("tokenizer.ggml.padding_token_id"),
        add_bos: flag("tokenizer.ggml.add_bos_token"),
        add_space_prefix: flag("tokenizer.ggml.add_space_prefix"),
        chat_template: gguf
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_owned),
    };
    Tokenizer::from_gguf_spec(spec, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_matches_hf_reshape_swapaxes() {
        // 2 heads of 4 rows, 1 column: llama.cpp order within a head is (0, 2, 1, 3) of HF's.
        let w: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let out = unpermute_rows(&w, 2, 8, 1);
        assert_eq!(out, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    }
}
