//! Loading a model from a GGUF file or an HF directory into a [`Decoder`] + [`Tokenizer`],
//! every architecture through its weight table ([`crate::model::arch`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::engine::quant::{layout_of, QuantMatrix, GGUF_TYPES};
use crate::error::{Error, Result};
use crate::io::gguf::{GgmlType, GgufFile};
use crate::io::hf_dir::SafetensorsSet;
use crate::lora::ModuleKind;
use crate::model::arch::{self, NormSlot, Slot, EMBED, FINAL_NORM, HEAD};
use crate::model::config::{Arch, Config};
use crate::model::decoder::Decoder;
use crate::model::decoder::{Layer, MlpWeights, Norm, QkvWeights};
use crate::model::linear::{Linear, Weight};
use crate::model::spec::{Mlp, NormKind, QkNorm};
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

/// A model opened from a path: the decoder, its tokenizer (an HF directory may have none, as
/// the tiny test models; GGUF files always carry one) and where it came from.
pub struct LoadedModel {
    pub model: Decoder,
    tokenizer: Option<Tokenizer>,
    pub source: ModelSource,
    /// The model's own chat template text, if it has one.
    pub chat_template: Option<String>,
}

impl LoadedModel {
    /// The tokenizer, or an error naming the model directory that lacks `tokenizer.json`.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            let at = match &self.source {
                ModelSource::HfDir { dir, .. } | ModelSource::Gguf { path: dir, .. } => dir,
            };
            Error::format(
                at,
                "the model has no tokenizer.json, which reading or writing text needs",
            )
        })
    }

    /// The tokenizer, if the model has one.
    pub fn tokenizer_opt(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// The model and its tokenizer, owned apart (a server's model thread owns the model while
    /// requests share the tokenizer).
    pub fn into_parts(self) -> (Decoder, Option<Tokenizer>) {
        (self.model, self.tokenizer)
    }
}

/// Opens `path`: a GGUF file, or an HF directory with `config.json`, `model.safetensors` (or a
/// sharded `model.safetensors.index.json`) and `tokenizer.json`.
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    if is_dir_or_gguf(path)? {
        return load_hf_dir(path, None);
    }
    load_gguf(path, false)
}

/// True for a directory, false for a file with the GGUF magic; anything else is an error.
fn is_dir_or_gguf(path: &Path) -> Result<bool> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Ok(true);
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
    Ok(false)
}

/// Opens `path` with every frozen weight matrix (linear layers, embedding, LM head) in
/// quantised blocks and no f32 copy (`--precision gguf`, QLoRA): a GGUF file's own blocks, or,
/// for an HF directory, the f32 weights quantised to `quantize` at load. A GGUF tensor stored
/// as F32/F16/BF16 stays f32; a block type the kernels lack is an error naming the tensor.
pub fn load_model_blocks(path: &Path, quantize: Option<GgmlType>) -> Result<LoadedModel> {
    if !is_dir_or_gguf(path)? {
        if let Some(t) = quantize {
            return Err(Error::Invalid(format!(
                "{}: quantising to {} is for an HF base; a GGUF base computes with its own blocks",
                path.display(),
                t.name()
            )));
        }
        return load_gguf(path, true);
    }
    let Some(dtype) = quantize else {
        return Err(Error::Invalid(format!(
            "{} is an HF directory: computing with quantised blocks needs a GGUF base or a \
             type to quantise to (--quantize q8_0, q4_0, q4_k, ...)",
            path.display()
        )));
    };
    check_trainable_block_type(dtype)?;
    load_hf_dir(path, Some(dtype))
}

fn check_trainable_block_type(dtype: GgmlType) -> Result<()> {
    if layout_of(dtype).is_none() {
        let names: Vec<&str> = GGUF_TYPES.iter().map(|t| t.name()).collect();
        return Err(Error::Invalid(format!(
            "cannot train over {} blocks; quantise to one of {}",
            dtype.name(),
            names.join(", ")
        )));
    }
    Ok(())
}

/// w [rows, cols] as `dtype` blocks (ggml's quantisers, io::gguf::quantize); `what` names the
/// tensor in errors.
fn quantize_matrix(
    dtype: GgmlType,
    w: &[f32],
    rows: usize,
    cols: usize,
    what: &str,
) -> Result<QuantMatrix> {
    let bytes = crate::io::gguf::quantize(dtype, w, cols)
        .map_err(|e| Error::Invalid(format!("{what} [{rows}, {cols}]: {e}")))?;
    QuantMatrix::from_gguf_blocks(dtype, &bytes, rows, cols, None, what)
}

/// Replaces every linear weight, the embedding and an untied LM head of `model` by `dtype`
/// blocks (ggml's quantisers, io::gguf::quantize), dropping the f32 values tensor by tensor.
/// (Loading an HF base for QLoRA quantises each tensor as it is read instead, so that the f32
/// model never exists whole: [`load_model_blocks`].)
pub fn quantize_weights(model: &mut Decoder, dtype: GgmlType) -> Result<()> {
    check_trainable_block_type(dtype)?;
    let to_blocks = |w: &Weight, rows: usize, cols: usize, what: &str| {
        quantize_matrix(dtype, &w.to_f32(), rows, cols, what)
    };
    let (v, h) = (model.config.vocab_size, model.config.hidden_size);
    let names = arch::model_names(model.config.arch);
    let embed = to_blocks(&model.embed_tokens, v, h, names.embed)?;
    model.embed_tokens = Weight::Quant(embed);
    model.tied_head_bf16 = None;
    if let Some(head) = &mut model.lm_head {
        let q = to_blocks(&head.weight, v, h, names.head)?;
        head.weight = Weight::Quant(q);
        head.bf16 = None;
    }
    let c = model.config.clone();
    for (i, layer) in model.layers.iter_mut().enumerate() {
        for (kind, lin) in layer.linears_mut() {
            let what = format!("{}.weight", c.adapter_kind(kind).path(i));
            let q = to_blocks(&lin.weight, lin.out_features, lin.in_features, &what)?;
            lin.weight = Weight::Quant(q);
            lin.bf16 = None;
        }
    }
    Ok(())
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
// Layers from a weight table

/// The linear layers and norms a layer of `c` has, from its block description.
pub(crate) fn layer_slots(c: &Config) -> (Vec<ModuleKind>, Vec<NormSlot>) {
    let b = &c.block;
    let mut kinds = if b.fused_qkv {
        vec![ModuleKind::Qkv]
    } else {
        vec![ModuleKind::Q, ModuleKind::K, ModuleKind::V]
    };
    kinds.push(ModuleKind::O);
    kinds.extend(match b.mlp {
        Mlp::Gated { fused: false } => vec![ModuleKind::Gate, ModuleKind::Up],
        Mlp::Gated { fused: true } => vec![ModuleKind::GateUp],
        Mlp::Plain => vec![ModuleKind::Up],
    });
    kinds.push(ModuleKind::Down);
    let p = b.norms;
    let mut norms: Vec<NormSlot> = [
        (p.attn_in, NormSlot::AttnIn),
        (p.attn_out, NormSlot::AttnOut),
        (p.mlp_in, NormSlot::MlpIn),
        (p.mlp_out, NormSlot::MlpOut),
    ]
    .into_iter()
    .filter_map(|(on, s)| on.then_some(s))
    .collect();
    if b.qk_norm != QkNorm::None {
        norms.extend([NormSlot::Q, NormSlot::K]);
    }
    (kinds, norms)
}

/// The length of the norm at `slot`.
fn norm_len(c: &Config, slot: NormSlot) -> usize {
    match (slot, c.block.qk_norm) {
        (NormSlot::Q, QkNorm::PerHead) | (NormSlot::K, QkNorm::PerHead) => c.head_dim,
        (NormSlot::Q, _) => c.q_dim(),
        (NormSlot::K, _) => c.kv_dim(),
        _ => c.hidden_size,
    }
}

/// Whether the linear `kind` carries a bias.
fn has_bias(c: &Config, kind: ModuleKind) -> bool {
    match kind {
        ModuleKind::Q | ModuleKind::K | ModuleKind::V | ModuleKind::Qkv => c.block.qkv_bias,
        ModuleKind::O => c.block.o_bias,
        _ => c.block.mlp_bias,
    }
}

/// Builds layer `i` from a tensor source: `linear(name, kind, out, in, bias)` and
/// `norm(name, slot, len)`, where `name` is the table's name for the slot (HF or GGUF, by
/// `gguf`), without the layer prefix and `.weight`.
fn build_layer(
    c: &Config,
    gguf: bool,
    mut linear: impl FnMut(&str, ModuleKind, usize, usize, bool) -> Result<Linear>,
    mut norm: impl FnMut(&str, usize) -> Result<Norm>,
) -> Result<Layer> {
    let table = arch::weights(c.arch);
    let (kinds, norm_slots) = layer_slots(c);
    let name = |slot: Slot| -> Result<&'static str> {
        table
            .names(slot)
            .map(|(hf, g)| if gguf { g } else { hf })
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "the {} weight table has no name for {slot:?}",
                    c.arch.name()
                ))
            })
    };
    let mut lin = std::collections::BTreeMap::new();
    for kind in kinds {
        let (out, inp) = c.module_shape(kind);
        lin.insert(
            kind,
            linear(name(Slot::Linear(kind))?, kind, out, inp, has_bias(c, kind))?,
        );
    }
    let mut norms = Vec::new();
    for slot in norm_slots {
        norms.push((slot, norm(name(Slot::Norm(slot))?, norm_len(c, slot))?));
    }
    let mut take = |k: ModuleKind| {
        lin.remove(&k)
            .ok_or_else(|| Error::Invalid(format!("layer without {}", k.name())))
    };
    let qkv = if c.block.fused_qkv {
        QkvWeights::Fused(take(ModuleKind::Qkv)?)
    } else {
        QkvWeights::Separate {
            q: take(ModuleKind::Q)?,
            k: take(ModuleKind::K)?,
            v: take(ModuleKind::V)?,
        }
    };
    let mlp = match c.block.mlp {
        Mlp::Gated { fused: false } => MlpWeights::Gated {
            gate: take(ModuleKind::Gate)?,
            up: take(ModuleKind::Up)?,
        },
        Mlp::Gated { fused: true } => MlpWeights::GatedFused(take(ModuleKind::GateUp)?),
        Mlp::Plain => MlpWeights::Plain {
            up: take(ModuleKind::Up)?,
        },
    };
    Ok(Layer {
        qkv,
        o_proj: take(ModuleKind::O)?,
        mlp,
        down_proj: take(ModuleKind::Down)?,
        norms,
    })
}

// ---------------------------------------------------------------------------------------------
// GGUF

/// A GGUF model; `blocks`: its quantised matrices stay in their blocks (see
/// [`load_model_blocks`]).
fn load_gguf(path: &Path, blocks: bool) -> Result<LoadedModel> {
    let gguf = GgufFile::open(path)?;
    let config = Config::from_gguf(&gguf)?;
    let c = &config;
    let table = arch::weights(c.arch);
    let h = c.hidden_size;

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
    // llama.cpp stores Gemma's norms as 1 + w; HF (and lorakit) hold w.
    let norm_tensor = |name: &str, len: usize| -> Result<Vec<f32>> {
        let mut w = tensor(name, &[len])?;
        if table.gguf_norms_plus_one {
            w.iter_mut().for_each(|v| *v -= 1.0);
        }
        Ok(w)
    };
    let heads_to_unpermute = |kind: ModuleKind| match kind {
        ModuleKind::Q if table.gguf_permute_qk => Some(c.num_heads),
        ModuleKind::K if table.gguf_permute_qk => Some(c.num_kv_heads),
        _ => None,
    };

    // A matrix as blocks when asked and stored quantised; else f32. Rows of q and k get the
    // reordering `unpermute_rows` gives the f32 values.
    let float = |t: GgmlType| matches!(t, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
    let matrix_as = |name: &str,
                     rows: usize,
                     cols: usize,
                     n_head: Option<usize>,
                     blocks: bool|
     -> Result<Weight> {
        let info = gguf
            .tensor_info(name)
            .ok_or_else(|| Error::tensor(path, name, "not found in file"))?;
        if !blocks || float(info.dtype) {
            let w = tensor(name, &[rows, cols])?;
            return Ok(Weight::F32(match n_head {
                Some(n_head) => unpermute_rows(&w, n_head, rows, cols),
                None => w,
            }));
        }
        expect_shape(path, name, &info.shape(), &[rows, cols])?;
        let order: Option<Vec<usize>> = n_head.map(|n_head| {
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
        let q = QuantMatrix::from_gguf_blocks(
            info.dtype,
            gguf.tensor_bytes(info),
            rows,
            cols,
            order.as_deref(),
            &format!("{}: tensor '{name}'", path.display()),
        )?;
        // Pages of the map already re-laid out need not stay resident.
        gguf.release(info);
        Ok(Weight::Quant(q))
    };
    let matrix = |name: &str, rows: usize, cols: usize, n_head: Option<usize>| {
        matrix_as(name, rows, cols, n_head, blocks)
    };

    let embed_tokens = matrix(EMBED.1, c.vocab_size, h, None)?;
    // An f32 embedding tied to the head also keeps its blocks, for a bf16 head's exact lookups
    // ([`Decoder::embedding_blocks`]); a type the kernels lack just goes without.
    let embedding_blocks = match (&embed_tokens, c.tie_word_embeddings) {
        (Weight::F32(_), true) => match matrix_as(EMBED.1, c.vocab_size, h, None, true) {
            Ok(Weight::Quant(q)) => Some(Box::new(q)),
            _ => None,
        },
        _ => None,
    };
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = format!("blk.{i}");
        layers.push(build_layer(
            c,
            true,
            |name, kind, out, inp, _bias| {
                let n_head = heads_to_unpermute(kind);
                let w = matrix(&format!("{p}.{name}.weight"), out, inp, n_head)?;
                let mut b = opt_tensor(&format!("{p}.{name}.bias"), &[out])?;
                if let Some(n_head) = n_head {
                    b = b.map(|b| unpermute_rows(&b, n_head, out, 1));
                }
                Ok(Linear::from_weight(w, out, inp, b))
            },
            |name, len| {
                Ok(Norm {
                    weight: norm_tensor(&format!("{p}.{name}.weight"), len)?,
                    bias: None,
                })
            },
        )?);
    }
    let norm = norm_tensor(FINAL_NORM.1, h)?;
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        Some(Linear::from_weight(
            matrix(HEAD.1, c.vocab_size, h, None)?,
            c.vocab_size,
            h,
            None,
        ))
    };
    let tokenizer = Tokenizer::from_gguf(&gguf)?;
    let chat_template = tokenizer.chat_template().map(str::to_owned);
    let source = ModelSource::Gguf {
        path: path.to_owned(),
        tensor_types: count_types(gguf.tensors().iter().map(|t| t.dtype.name().to_string())),
    };
    let mut model = Decoder::new(config, Vec::new(), layers, norm, lm_head);
    model.embed_tokens = embed_tokens;
    model.embedding_blocks = embedding_blocks;
    Ok(LoadedModel {
        model,
        tokenizer: Some(tokenizer),
        source,
        chat_template,
    })
}

/// HF order from llama.cpp order: `w.reshape(n_head, rows/n_head/2, 2, cols).swapaxes(1, 2)`.
///
/// w: [rows, cols] → [rows, cols]; within each head, row `j·half + i` of the result is row
/// `2i + j` of the input.
pub fn unpermute_rows(w: &[f32], n_head: usize, rows: usize, cols: usize) -> Vec<f32> {
    reorder_head_rows(w, n_head, rows, cols, false)
}

/// Inverse of [`unpermute_rows`]: llama.cpp order from HF order, as the converter's
/// `permute(w, n_head, n_head_kv)`: `w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2)`.
///
/// w: [rows, cols] → [rows, cols]; within each head, row `2i + j` of the result is row
/// `j·half + i` of the input.
pub fn permute_rows(w: &[f32], n_head: usize, rows: usize, cols: usize) -> Vec<f32> {
    reorder_head_rows(w, n_head, rows, cols, true)
}

/// Within each head, HF's row `j·half + i` ↔ llama.cpp's row `2i + j`; `to_gguf` picks the
/// direction.  w: [rows, cols] → [rows, cols].
fn reorder_head_rows(
    w: &[f32],
    n_head: usize,
    rows: usize,
    cols: usize,
    to_gguf: bool,
) -> Vec<f32> {
    let head_rows = rows / n_head;
    let half = head_rows / 2;
    let mut out = vec![0.0f32; w.len()];
    for head in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let hf = head * head_rows + j * half + i;
                let gguf = head * head_rows + 2 * i + j;
                let (src, dst) = if to_gguf { (hf, gguf) } else { (gguf, hf) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// HF directory

/// `quantize`: every frozen matrix becomes blocks of that type as it is read (see
/// [`load_hf_weights_as`]).
fn load_hf_dir(dir: &Path, quantize: Option<GgmlType>) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Error::format(
            dir,
            "directory has no config.json; expected an HF model directory (config.json, model.safetensors, and tokenizer.json for text) or a .gguf file",
        ));
    }
    let config = Config::from_hf_json(&config_path)?;
    let model = load_hf_weights_as(dir, config, quantize)?;
    let set = SafetensorsSet::open(dir)?;
    let tokenizer = match dir.join("tokenizer.json").is_file() {
        true => Some(Tokenizer::from_hf_dir(dir)?),
        false => None,
    };
    let chat_template = tokenizer
        .as_ref()
        .and_then(|t| t.chat_template())
        .map(str::to_owned);
    let source = ModelSource::HfDir {
        dir: dir.to_owned(),
        files: set.files().to_vec(),
        dtypes: count_types(set.dtypes().into_iter()),
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        source,
        chat_template,
    })
}

/// Opens an HF directory's `config.json` and weights (no tokenizer: a GPT-2 directory may
/// have none).
pub fn load_hf_model(dir: &Path) -> Result<Decoder> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Error::format(
            dir,
            "directory has no config.json; expected an HF model directory (config.json, model.safetensors)",
        ));
    }
    let config = Config::from_hf_json(&config_path)?;
    load_hf_weights(dir, config)
}

/// w: [rows, cols] → [cols, rows].
pub fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = w[r * cols + c];
        }
    }
    out
}

/// The weights of an HF directory (`model.safetensors` or shards) for `config`, without the
/// tokenizer: what the tiny test models of every architecture have. Names come from the
/// architecture's tables; GPT-2's may lack the `transformer.` prefix (the `gpt2` hub repo), and
/// its Conv1D weights, stored [in, out], are transposed to [out, in].
pub fn load_hf_weights(dir: &Path, config: Config) -> Result<Decoder> {
    load_hf_weights_as(dir, config, None)
}

/// [`load_hf_weights`], with every linear weight, the embedding and an untied head turned into
/// `quantize` blocks right after it is read (QLoRA over an HF base): the f32 values of one
/// tensor at a time, never the whole f32 model (an 8B bf16 checkpoint would be 32 GB in f32).
/// Bit for bit what [`quantize_weights`] makes of the f32 model.
pub fn load_hf_weights_as(
    dir: &Path,
    config: Config,
    quantize: Option<GgmlType>,
) -> Result<Decoder> {
    let set = SafetensorsSet::open(dir)?;
    let c = &config;
    let h = c.hidden_size;
    let names = arch::model_names(c.arch);
    // A checkpoint without the `transformer.` prefix: strip it from every name.
    let strip = names
        .embed
        .split_once('.')
        .map(|(p, rest)| (format!("{p}."), rest))
        .filter(|(_, rest)| {
            c.arch == Arch::Gpt2 && !set.contains(names.embed) && set.contains(rest)
        })
        .map(|(p, _)| p);
    let name_of = |n: &str| -> String {
        match &strip {
            Some(p) => n.strip_prefix(p.as_str()).unwrap_or(n).to_owned(),
            None => n.to_owned(),
        }
    };
    let tensor = |name: &str, want: &[usize]| -> Result<Vec<f32>> {
        let name = name_of(name);
        let (data, shape) = set.tensor_f32(&name)?;
        expect_shape(set.file_of(&name), &name, &shape, want)?;
        expect_finite(set.file_of(&name), &name, &data)?;
        Ok(data)
    };
    let layer_norm = c.block.norm == NormKind::Layer;
    let embed_tokens = tensor(names.embed, &[c.vocab_size, h])?;
    // Quantised now, before the layers are read, so that its f32 values are gone by then.
    let (embed_tokens, embed_blocks) = match quantize {
        Some(t) => {
            let q = quantize_matrix(t, &embed_tokens, c.vocab_size, h, names.embed)?;
            (Vec::new(), Some(q))
        }
        None => (embed_tokens, None),
    };
    let wpe = match names.positions {
        Some(n) => Some(tensor(n, &[c.max_position_embeddings, h])?),
        None => None,
    };
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = format!("{}.{i}", names.layers);
        layers.push(build_layer(
            c,
            false,
            |name, _kind, out, inp, bias| {
                let w = if names.conv1d {
                    let w = tensor(&format!("{p}.{name}.weight"), &[inp, out])?;
                    transpose(&w, inp, out)
                } else {
                    tensor(&format!("{p}.{name}.weight"), &[out, inp])?
                };
                let b = if bias {
                    Some(tensor(&format!("{p}.{name}.bias"), &[out])?)
                } else {
                    None
                };
                Ok(match quantize {
                    None => Linear::new(w, out, inp, b),
                    Some(t) => {
                        let what = format!("{p}.{name}.weight");
                        let q = quantize_matrix(t, &w, out, inp, &what)?;
                        Linear::from_weight(Weight::Quant(q), out, inp, b)
                    }
                })
            },
            |name, len| {
                Ok(Norm {
                    weight: tensor(&format!("{p}.{name}.weight"), &[len])?,
                    bias: match layer_norm {
                        true => Some(tensor(&format!("{p}.{name}.bias"), &[len])?),
                        false => None,
                    },
                })
            },
        )?);
    }
    let norm = tensor(&format!("{}.weight", names.final_norm), &[h])?;
    let norm_bias = match layer_norm {
        true => Some(tensor(&format!("{}.bias", names.final_norm), &[h])?),
        false => None,
    };
    // Some tied checkpoints still carry an lm_head copy; the config decides. An untied GPT-2
    // head is an nn.Linear ([vocab, hidden]) outside `transformer.`.
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        let (w, shape) = set.tensor_f32(names.head)?;
        expect_shape(
            set.file_of(names.head),
            names.head,
            &shape,
            &[c.vocab_size, h],
        )?;
        expect_finite(set.file_of(names.head), names.head, &w)?;
        Some(match quantize {
            None => Linear::new(w, c.vocab_size, h, None),
            Some(t) => {
                let q = quantize_matrix(t, &w, c.vocab_size, h, names.head)?;
                Linear::from_weight(Weight::Quant(q), c.vocab_size, h, None)
            }
        })
    };
    let mut model = Decoder::new(config, embed_tokens, layers, norm, lm_head);
    if let Some(q) = embed_blocks {
        model.embed_tokens = Weight::Quant(q);
    }
    model.norm_bias = norm_bias;
    model.wpe = wpe;
    Ok(model)
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

    #[test]
    fn permute_undoes_unpermute() {
        // 3 heads of 4 rows, 2 columns.
        let w: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let there = permute_rows(&w, 3, 12, 2);
        assert_ne!(there, w);
        assert_eq!(unpermute_rows(&there, 3, 12, 2), w);
    }
}
