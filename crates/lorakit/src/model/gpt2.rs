//! GPT-2 (HF `GPT2LMHeadModel`): token + learned position embeddings → N × (LayerNorm →
//! causal attention through the fused `c_attn` → `c_proj` → residual → LayerNorm → `c_fc` →
//! tanh GELU → `c_proj` → residual) → LayerNorm → LM head (tied to the token embedding).
//!
//! HF stores GPT-2's `Conv1D` weights as [in, out] (`y = x W + b`). They are transposed once at
//! load to the [out, in] of [`Linear`], so the LoRA math (A [r, in], B [out, r], merge
//! `W += s·B A`) is the same as Llama's; PEFT's `fan_in_fan_out` only matters at file I/O, where
//! [`Gpt2Model::save_hf_dir`] writes [in, out] back.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use crate::engine::attention::{attention_train_backward, attention_train_forward, AttnShape};
use crate::engine::ops::{
    add_inplace, attention_forward, embedding_forward, gelu_tanh_backward, gelu_tanh_forward,
    layer_norm_backward, layer_norm_forward, layer_norm_weight_grad, position_embedding_add,
};
use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;
use crate::io::hf_dir::SafetensorsSet;
use crate::io::output::OutputDir;
use crate::io::safetensors_file::write_f32_safetensors;
use crate::lora::peft::Adapter;
use crate::lora::{ModuleId, ModuleKind};
use crate::model::config::{Arch, Config};
use crate::model::kv_cache::{store_kv, KvCache, Logits};
use crate::model::linear::{
    check_precision_supported, frozen_forward, head_weight, set_head_precision, Bf16Weight,
};
use crate::model::linear::{Linear, Precision};
use crate::model::linear_train::{
    linear_train_backward, linear_train_forward, Dropout, LoraBackward, LoraGrads,
};
use crate::model::traits::{CausalLm, LmHead, LoraTrainable};

/// A LayerNorm's parameters, each [hidden].
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// One GPT-2 block's frozen weights. The Conv1D layers are held as [out, in] [`Linear`]s.
#[derive(Debug, Clone)]
pub struct Gpt2Block {
    pub ln_1: LayerNorm,
    /// [3·hidden, hidden]: rows 0..h give q, h..2h k, 2h..3h v.
    pub c_attn: Linear,
    /// attn.c_proj, [hidden, hidden]
    pub attn_c_proj: Linear,
    pub ln_2: LayerNorm,
    /// [inner, hidden]
    pub c_fc: Linear,
    /// mlp.c_proj, [hidden, inner]
    pub mlp_c_proj: Linear,
}

impl Gpt2Block {
    /// The Conv1D layer `kind`; None for a Llama kind.
    pub fn linear(&self, kind: ModuleKind) -> Option<&Linear> {
        match kind {
            ModuleKind::CAttn => Some(&self.c_attn),
            ModuleKind::AttnCProj => Some(&self.attn_c_proj),
            ModuleKind::CFc => Some(&self.c_fc),
            ModuleKind::MlpCProj => Some(&self.mlp_c_proj),
            _ => None,
        }
    }

    pub fn linear_mut(&mut self, kind: ModuleKind) -> Option<&mut Linear> {
        match kind {
            ModuleKind::CAttn => Some(&mut self.c_attn),
            ModuleKind::AttnCProj => Some(&mut self.attn_c_proj),
            ModuleKind::CFc => Some(&mut self.c_fc),
            ModuleKind::MlpCProj => Some(&mut self.mlp_c_proj),
            _ => None,
        }
    }

    fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [
            &mut self.c_attn,
            &mut self.attn_c_proj,
            &mut self.c_fc,
            &mut self.mlp_c_proj,
        ]
    }
}

#[derive(Debug, Clone)]
pub struct Gpt2Model {
    /// `arch` is [`Arch::Gpt2`]; `rms_norm_eps` holds `layer_norm_epsilon`.
    pub config: Config,
    /// wte, [vocab, hidden]
    pub wte: Vec<f32>,
    /// wpe, [n_positions, hidden]
    pub wpe: Vec<f32>,
    pub blocks: Vec<Gpt2Block>,
    pub ln_f: LayerNorm,
    /// None when tied to `wte` (GPT-2's default).
    pub lm_head: Option<Linear>,
    /// bf16 packing of the tied head in [`Precision::Bf16`].
    pub tied_head_bf16: Option<Box<Bf16Weight>>,
    pub precision: Precision,
}

impl Gpt2Model {
    /// Loads an HF GPT-2 directory (`config.json` + `model.safetensors` or shards). Tensor names
    /// may carry the `transformer.` prefix (`GPT2LMHeadModel`) or not (the `gpt2` hub repo).
    pub fn load(dir: &Path) -> Result<Gpt2Model> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::format(
                dir,
                "directory has no config.json; expected an HF GPT-2 directory",
            ));
        }
        let config = Config::from_hf_json(&config_path)?;
        if config.arch != Arch::Gpt2 {
            return Err(Error::config(
                &config_path,
                "model_type",
                format!("\"{}\" is not gpt2", config.arch.name()),
            ));
        }
        let set = SafetensorsSet::open(dir)?;
        let prefix = if set.contains("transformer.wte.weight") {
            "transformer."
        } else if set.contains("wte.weight") {
            ""
        } else {
            return Err(Error::tensor(
                set.file_of("transformer.wte.weight"),
                "transformer.wte.weight",
                "not found (nor wte.weight) in the model's safetensors files",
            ));
        };
        let c = &config;
        let (h, inner) = (c.hidden_size, c.intermediate_size);
        let tensor = |name: &str, want: &[usize]| -> Result<Vec<f32>> {
            let name = format!("{prefix}{name}");
            let (data, shape) = set.tensor_f32(&name)?;
            let file = set.file_of(&name);
            if shape != want {
                return Err(Error::tensor(
                    file,
                    &name,
                    format!("shape {shape:?}, but the config implies {want:?}"),
                ));
            }
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                return Err(Error::tensor(
                    file,
                    &name,
                    format!("element {i} is {} (weights must be finite)", data[i]),
                ));
            }
            Ok(data)
        };
        // Conv1D: weight stored [in, out], bias [out]; held transposed as [out, in].
        let conv1d = |base: &str, inp: usize, out: usize| -> Result<Linear> {
            let w = tensor(&format!("{base}.weight"), &[inp, out])?;
            let b = tensor(&format!("{base}.bias"), &[out])?;
            Ok(Linear::new(transpose(&w, inp, out), out, inp, Some(b)))
        };
        let norm = |base: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: tensor(&format!("{base}.weight"), &[h])?,
                bias: tensor(&format!("{base}.bias"), &[h])?,
            })
        };
        let wte = tensor("wte.weight", &[c.vocab_size, h])?;
        let wpe = tensor("wpe.weight", &[c.max_position_embeddings, h])?;
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("h.{i}");
            blocks.push(Gpt2Block {
                ln_1: norm(&format!("{p}.ln_1"))?,
                c_attn: conv1d(&format!("{p}.attn.c_attn"), h, 3 * h)?,
                attn_c_proj: conv1d(&format!("{p}.attn.c_proj"), h, h)?,
                ln_2: norm(&format!("{p}.ln_2"))?,
                c_fc: conv1d(&format!("{p}.mlp.c_fc"), h, inner)?,
                mlp_c_proj: conv1d(&format!("{p}.mlp.c_proj"), inner, h)?,
            });
        }
        let ln_f = norm("ln_f")?;
        // An untied head is an nn.Linear ([vocab, hidden]) outside `transformer.`.
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            let name = "lm_head.weight";
            let (w, shape) = set.tensor_f32(name)?;
            if shape != [c.vocab_size, h] {
                return Err(Error::tensor(
                    set.file_of(name),
                    name,
                    format!(
                        "shape {shape:?}, but the config implies {:?}",
                        [c.vocab_size, h]
                    ),
                ));
            }
            Some(Linear::new(w, c.vocab_size, h, None))
        };
        Ok(Gpt2Model {
            config,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            tied_head_bf16: None,
            precision: Precision::F32,
        })
    }

    /// The Conv1D layer of module `id`, or an error naming it if GPT-2 has no such module.
    pub fn linear(&self, id: ModuleId) -> Result<&Linear> {
        self.blocks
            .get(id.layer)
            .and_then(|b| b.linear(id.kind))
            .ok_or_else(|| not_a_module(id, self.blocks.len()))
    }

    pub fn linear_mut(&mut self, id: ModuleId) -> Result<&mut Linear> {
        let n = self.blocks.len();
        self.blocks
            .get_mut(id.layer)
            .and_then(|b| b.linear_mut(id.kind))
            .ok_or_else(|| not_a_module(id, n))
    }

    /// Switches the frozen-weight products to `precision` (see `LlamaModel::set_precision`).
    pub fn set_precision(&mut self, precision: Precision, training: bool) -> Result<()> {
        check_precision_supported(precision)?;
        for b in &mut self.blocks {
            for lin in b.linears_mut() {
                lin.set_precision(precision, training);
            }
        }
        set_head_precision(
            self.lm_head.as_mut(),
            &mut self.tied_head_bf16,
            &self.wte,
            self.config.vocab_size,
            self.config.hidden_size,
            precision,
            training,
        );
        self.precision = precision;
        Ok(())
    }

    /// The LM head's weight [vocab, hidden] and its bf16 packing, if any.
    pub fn head_weight(&self) -> (&[f32], Option<&Bf16Weight>) {
        head_weight(
            self.lm_head.as_ref(),
            self.tied_head_bf16.as_deref(),
            &self.wte,
        )
    }

    /// logits = x · headᵀ.  x: [n, hidden] → logits: [n, vocab].
    pub fn head_forward(&self, logits: &mut [f32], x: &[f32], n: usize) {
        let (w, bf16) = self.head_weight();
        frozen_forward(
            logits,
            x,
            w,
            bf16,
            n,
            self.config.hidden_size,
            self.config.vocab_size,
        );
    }

    /// Attaches an adapter unmerged, its scale multiplied by `weight` (1.0 = as trained).
    /// Every module must be one of GPT-2's (checked before anything is attached).
    pub fn attach_adapter(&mut self, adapter: &Adapter, weight: f32) -> Result<()> {
        for id in adapter.modules.keys() {
            self.linear(*id)?;
        }
        for (id, w) in &adapter.modules {
            let mut w = w.clone();
            w.scale *= weight;
            self.linear_mut(*id)?.loras.push(w);
        }
        Ok(())
    }

    /// Removes every attached adapter (weights untouched).
    pub fn detach_adapters(&mut self) {
        for b in &mut self.blocks {
            for lin in b.linears_mut() {
                lin.loras.clear();
            }
        }
    }

    /// W0 += s·B A (in the [out, in] layout; `(B A)ᵀ` of HF's [in, out]) for every attached
    /// adapter, which are then detached. Refuses, changing nothing, if a weight would become
    /// non-finite.
    pub fn merge_adapters(&mut self) -> Result<()> {
        self.merge_signed(1.0)
    }

    /// W −= s·B A for the given adapter, undoing an earlier merge of it (up to rounding).
    pub fn unmerge_adapter(&mut self, adapter: &Adapter, weight: f32) -> Result<()> {
        self.attach_adapter(adapter, weight)?;
        self.merge_signed(-1.0)
    }

    fn merge_signed(&mut self, sign: f32) -> Result<()> {
        for (i, b) in self.blocks.iter().enumerate() {
            for kind in ModuleKind::GPT2 {
                if let Some((at, v)) = b.linear(kind).and_then(|l| l.check_merge(sign)) {
                    return Err(Error::Invalid(format!(
                        "merging would make {} non-finite (element {at} becomes {v}); \
                         the adapter seems to be broken, nothing was merged",
                        ModuleId { layer: i, kind }.path()
                    )));
                }
            }
        }
        for b in &mut self.blocks {
            for lin in b.linears_mut() {
                lin.merge_loras(sign);
            }
        }
        Ok(())
    }

    /// A cache for at most `capacity` positions (at most `n_positions`: the position table
    /// has no more rows).
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        if capacity > self.config.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "{capacity} positions exceed the model's context of {} tokens (n_positions)",
                self.config.max_position_embeddings
            )));
        }
        Ok(KvCache::new(&self.config, capacity))
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::Invalid(
                "no tokens to run the model on (empty prompt?)".into(),
            ));
        }
        if let Some(&bad) = ids
            .iter()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// Runs `ids` at positions `cache.len ..`, appends their keys/values to the cache and returns
    /// logits: [T, vocab] for `Logits::All`, [vocab] for `Logits::Last`.
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache, which: Logits) -> Result<Vec<f32>> {
        let c = &self.config;
        self.check_ids(ids)?;
        let t = ids.len();
        let start = cache.len;
        if start + t > cache.capacity || cache.layers.len() != self.blocks.len() {
            return Err(Error::Invalid(format!(
                "{} tokens exceed the cache capacity of {} positions",
                start + t,
                cache.capacity
            )));
        }
        let (h, hd, nh, inner) = (c.hidden_size, c.head_dim, c.num_heads, c.intermediate_size);
        let eps = c.rms_norm_eps;
        let mut x = vec![0.0f32; t * h];
        embedding_forward(&mut x, &self.wte, ids, h);
        position_embedding_add(&mut x, &self.wpe, start, h);
        let mut normed = vec![0.0f32; t * h];
        let mut qkv = vec![0.0f32; t * 3 * h];
        let (mut q, mut k, mut v) = (
            vec![0.0f32; t * h],
            vec![0.0f32; t * h],
            vec![0.0f32; t * h],
        );
        let mut attn = vec![0.0f32; t * h];
        let mut proj = vec![0.0f32; t * h];
        let mut fc = vec![0.0f32; t * inner];
        let mut act = vec![0.0f32; t * inner];
        for (b, kv) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            layer_norm_forward(&mut normed, &x, &b.ln_1.weight, &b.ln_1.bias, eps);
            b.c_attn.forward(&mut qkv, &normed);
            split_qkv(&qkv, &mut q, &mut k, &mut v, h);
            store_kv(kv, &k, &v, nh, hd, cache.capacity, start);
            let scale = 1.0 / (hd as f32).sqrt();
            attention_forward(
                &mut attn,
                &q,
                kv,
                cache.capacity,
                nh,
                nh,
                hd,
                start,
                scale,
                None,
            );
            b.attn_c_proj.forward(&mut proj, &attn);
            add_inplace(&mut x, &proj);

            layer_norm_forward(&mut normed, &x, &b.ln_2.weight, &b.ln_2.bias, eps);
            b.c_fc.forward(&mut fc, &normed);
            gelu_tanh_forward(&mut act, &fc);
            b.mlp_c_proj.forward(&mut proj, &act);
            add_inplace(&mut x, &proj);
        }
        cache.len = start + t;
        let rows = match which {
            Logits::All => &x[..],
            Logits::Last => &x[(t - 1) * h..],
        };
        let n = rows.len() / h;
        let mut final_normed = vec![0.0f32; n * h];
        layer_norm_forward(
            &mut final_normed,
            rows,
            &self.ln_f.weight,
            &self.ln_f.bias,
            eps,
        );
        let mut logits = vec![0.0f32; n * c.vocab_size];
        self.head_forward(&mut logits, &final_normed, n);
        Ok(logits)
    }

    /// Logits for a whole sequence from position 0: [T, vocab].
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut cache = self.new_cache(ids.len())?;
        self.forward(ids, &mut cache, Logits::All)
    }

    /// The tokenizer files [`Gpt2Model::save_hf_dir`] copies from the source directory.
    pub const TOKENIZER_FILES: [&'static str; 4] = [
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
    ];

    /// Writes the model (adapters merged or detached first) as an HF GPT-2 directory:
    /// `config.json` and `model.safetensors` with `transformer.`-prefixed names and the Conv1D
    /// weights back in their [in, out] layout, plus those of [`Self::TOKENIZER_FILES`] that
    /// `tokenizer_from` holds, copied as they are, into the checked output `dir` (replacing only
    /// lorakit's files there). The directory appears complete or not at all.
    pub fn save_hf_dir(&self, dir: &OutputDir, tokenizer_from: Option<&Path>) -> Result<()> {
        if self.blocks.iter().any(|b| {
            ModuleKind::GPT2
                .iter()
                .any(|&k| b.linear(k).is_some_and(|l| !l.loras.is_empty()))
        }) {
            return Err(Error::Invalid(
                "save_hf_dir: merge or detach the adapters first".into(),
            ));
        }
        dir.write_whole(|tmp| {
            self.write_contents(tmp)?;
            for name in Self::TOKENIZER_FILES {
                let Some(src) = tokenizer_from.map(|d| d.join(name)).filter(|p| p.is_file()) else {
                    continue;
                };
                std::fs::copy(&src, tmp.join(name)).map_err(|e| Error::io(&src, e))?;
            }
            Ok(())
        })
    }

    /// config.json and model.safetensors into `dir`.
    fn write_contents(&self, dir: &Path) -> Result<()> {
        let c = &self.config;
        let cfg = json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "n_embd": c.hidden_size,
            "n_head": c.num_heads,
            "n_layer": c.num_layers,
            "n_inner": c.intermediate_size,
            "n_positions": c.max_position_embeddings,
            "vocab_size": c.vocab_size,
            "layer_norm_epsilon": c.rms_norm_eps,
            "tie_word_embeddings": c.tie_word_embeddings,
            "scale_attn_weights": true,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_ids.first(),
            "torch_dtype": "float32",
        });
        let (h, v) = (c.hidden_size, c.vocab_size);
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = vec![
            (
                "transformer.wte.weight".into(),
                vec![v, h],
                self.wte.clone(),
            ),
            (
                "transformer.wpe.weight".into(),
                vec![c.max_position_embeddings, h],
                self.wpe.clone(),
            ),
        ];
        let push_norm = |tensors: &mut Vec<_>, base: String, n: &LayerNorm| {
            tensors.push((format!("{base}.weight"), vec![h], n.weight.clone()));
            tensors.push((format!("{base}.bias"), vec![h], n.bias.clone()));
        };
        for (i, b) in self.blocks.iter().enumerate() {
            push_norm(&mut tensors, format!("transformer.h.{i}.ln_1"), &b.ln_1);
            push_norm(&mut tensors, format!("transformer.h.{i}.ln_2"), &b.ln_2);
            for kind in ModuleKind::GPT2 {
                let Some(lin) = b.linear(kind) else { continue };
                let path = kind.path(i);
                let (out, inp) = (lin.out_features, lin.in_features);
                tensors.push((
                    format!("{path}.weight"),
                    vec![inp, out],
                    transpose(lin.weight_f32(), out, inp),
                ));
                if let Some(bias) = &lin.bias {
                    tensors.push((format!("{path}.bias"), vec![out], bias.clone()));
                }
            }
        }
        push_norm(&mut tensors, "transformer.ln_f".into(), &self.ln_f);
        if let Some(head) = &self.lm_head {
            tensors.push((
                "lm_head.weight".into(),
                vec![v, h],
                head.weight_f32().to_vec(),
            ));
        }
        write_f32_safetensors(&dir.join("model.safetensors"), tensors)?;
        let text = serde_json::to_string_pretty(&cfg)
            .map_err(|e| Error::format(dir.join("config.json"), e.to_string()))?;
        write_atomic(&dir.join("config.json"), text.as_bytes())
    }
}

fn not_a_module(id: ModuleId, n_layers: usize) -> Error {
    if id.layer >= n_layers {
        Error::Invalid(format!(
            "adapter module {} is outside this {n_layers}-layer model",
            id.path()
        ))
    } else {
        Error::Invalid(format!(
            "adapter module {} is not a GPT-2 module (GPT-2 has c_attn, c_proj, c_fc)",
            id.path()
        ))
    }
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

/// qkv: [T, 3·h] (c_attn's output) → q, k, v: [T, h] each.
fn split_qkv(qkv: &[f32], q: &mut [f32], k: &mut [f32], v: &mut [f32], h: usize) {
    for (t, row) in qkv.chunks_exact(3 * h).enumerate() {
        q[t * h..(t + 1) * h].copy_from_slice(&row[..h]);
        k[t * h..(t + 1) * h].copy_from_slice(&row[h..2 * h]);
        v[t * h..(t + 1) * h].copy_from_slice(&row[2 * h..]);
    }
}

/// The inverse of `split_qkv`: dq, dk, dv: [T, h] → d_qkv: [T, 3·h].
fn join_qkv(d_qkv: &mut [f32], dq: &[f32], dk: &[f32], dv: &[f32], h: usize) {
    for (t, row) in d_qkv.chunks_exact_mut(3 * h).enumerate() {
        row[..h].copy_from_slice(&dq[t * h..(t + 1) * h]);
        row[h..2 * h].copy_from_slice(&dk[t * h..(t + 1) * h]);
        row[2 * h..].copy_from_slice(&dv[t * h..(t + 1) * h]);
    }
}

// ---------------------------------------------------------------------------------------------
// Training: forward keeping what the backward needs, backward for the LoRA tensors only.

/// What one block's backward needs. N = batch · seq rows; LayerNorm outputs and GELU(fc) are
/// recomputed by the backward instead of kept.
#[derive(Debug, Default)]
struct BlockActs {
    /// Residual stream entering the block, [N, hidden].
    x_in: Vec<f32>,
    /// [N, hidden] each, split from c_attn's output.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output, the input of attn.c_proj, [N, hidden].
    attn: Vec<f32>,
    /// [batch, heads, seq]
    lse: Vec<f32>,
    /// Residual stream after the attention block, [N, hidden].
    x_mid: Vec<f32>,
    /// c_fc's output before the GELU, [N, inner].
    fc: Vec<f32>,
    /// x·Aᵀ of each adapted module, [N, r].
    xa: BTreeMap<ModuleKind, Vec<f32>>,
}

/// Saved activations of a GPT-2 training forward pass.
#[derive(Debug, Default)]
pub struct Gpt2Activations {
    blocks: Vec<BlockActs>,
    /// Residual stream after the last block (before ln_f), [N, hidden].
    pub x_final: Vec<f32>,
    pub batch: usize,
    pub seq: usize,
}

fn set_len(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

impl Gpt2Model {
    fn check_trainable(&self, adapter: Option<&Adapter>) -> Result<()> {
        if self.blocks.iter().any(|b| {
            ModuleKind::GPT2
                .iter()
                .any(|&k| b.linear(k).is_some_and(|l| !l.loras.is_empty()))
        }) {
            return Err(Error::Invalid(
                "training needs a model without attached adapters (merge them first, or pass the adapter to train as the initial adapter)".into(),
            ));
        }
        if let Some(a) = adapter {
            for id in a.modules.keys() {
                self.linear(*id)?;
            }
        }
        Ok(())
    }

    /// Forward pass of a batch for training; fills `acts` (including `acts.x_final`).
    ///
    /// ids: [batch, seq] row-major; every row uses positions 0..seq.
    pub fn train_forward(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        adapter: Option<&Adapter>,
        dropout: Dropout,
        acts: &mut Gpt2Activations,
    ) -> Result<()> {
        let c = &self.config;
        self.check_trainable(adapter)?;
        if ids.len() != batch * seq || ids.is_empty() {
            return Err(Error::Invalid(format!(
                "batch of {} ids is not {batch} × {seq}",
                ids.len()
            )));
        }
        if seq > c.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "sequence length {seq} exceeds the model's context of {} (n_positions)",
                c.max_position_embeddings
            )));
        }
        self.check_ids(ids)?;
        let n = batch * seq;
        let (h, nh, inner, eps) = (
            c.hidden_size,
            c.num_heads,
            c.intermediate_size,
            c.rms_norm_eps,
        );
        let shape = AttnShape {
            batch,
            seq,
            n_heads: nh,
            n_kv_heads: nh,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            window: None,
        };
        acts.batch = batch;
        acts.seq = seq;
        acts.blocks.resize_with(c.num_layers, BlockActs::default);
        let mut x = std::mem::take(&mut acts.x_final);
        set_len(&mut x, n * h);
        embedding_forward(&mut x, &self.wte, ids, h);
        for row in x.chunks_exact_mut(seq * h) {
            position_embedding_add(row, &self.wpe, 0, h);
        }
        let mut normed = vec![0.0f32; n * h];
        let mut qkv = vec![0.0f32; n * 3 * h];
        let mut proj = vec![0.0f32; n * h];
        let mut act = vec![0.0f32; n * inner];
        let mut scratch = Vec::new();
        for (li, (b, a)) in self.blocks.iter().zip(acts.blocks.iter_mut()).enumerate() {
            let lora = |k: ModuleKind| {
                adapter.and_then(|ad| ad.modules.get(&ModuleId { layer: li, kind: k }))
            };
            a.xa.retain(|k, _| lora(*k).is_some());
            for k in ModuleKind::GPT2 {
                if lora(k).is_some() {
                    a.xa.entry(k).or_default();
                }
            }
            let mut fwd = |kind: ModuleKind, lin: &Linear, input: &[f32], out: &mut [f32]| {
                let id = ModuleId { layer: li, kind };
                linear_train_forward(
                    lin,
                    lora(kind),
                    input,
                    out,
                    a.xa.get_mut(&kind),
                    dropout,
                    dropout.key(id),
                    &mut scratch,
                );
            };
            a.x_in.clear();
            a.x_in.extend_from_slice(&x);
            layer_norm_forward(&mut normed, &x, &b.ln_1.weight, &b.ln_1.bias, eps);
            fwd(ModuleKind::CAttn, &b.c_attn, &normed, &mut qkv);
            set_len(&mut a.q, n * h);
            set_len(&mut a.k, n * h);
            set_len(&mut a.v, n * h);
            split_qkv(&qkv, &mut a.q, &mut a.k, &mut a.v, h);
            set_len(&mut a.attn, n * h);
            set_len(&mut a.lse, batch * nh * seq);
            attention_train_forward(&mut a.attn, &mut a.lse, &a.q, &a.k, &a.v, shape);
            fwd(ModuleKind::AttnCProj, &b.attn_c_proj, &a.attn, &mut proj);
            add_inplace(&mut x, &proj);

            a.x_mid.clear();
            a.x_mid.extend_from_slice(&x);
            layer_norm_forward(&mut normed, &x, &b.ln_2.weight, &b.ln_2.bias, eps);
            set_len(&mut a.fc, n * inner);
            fwd(ModuleKind::CFc, &b.c_fc, &normed, &mut a.fc);
            gelu_tanh_forward(&mut act, &a.fc);
            fwd(ModuleKind::MlpCProj, &b.mlp_c_proj, &act, &mut proj);
            add_inplace(&mut x, &proj);
        }
        acts.x_final = x;
        Ok(())
    }

    /// Backward pass: given dx = ∂loss/∂x_final [N, hidden], accumulates the adapter's dA, dB
    /// into `grads` (frozen weights get no dW). `dx` is used as a work buffer.
    pub fn train_backward(
        &self,
        dx: &mut [f32],
        acts: &Gpt2Activations,
        adapter: &Adapter,
        dropout: Dropout,
        grads: &mut LoraGrads,
    ) -> Result<()> {
        let c = &self.config;
        let (batch, seq) = (acts.batch, acts.seq);
        let n = batch * seq;
        let (h, nh, inner, eps) = (
            c.hidden_size,
            c.num_heads,
            c.intermediate_size,
            c.rms_norm_eps,
        );
        if dx.len() != n * h || acts.blocks.len() != c.num_layers {
            return Err(Error::Invalid(
                "backward called without a matching forward".into(),
            ));
        }
        let shape = AttnShape {
            batch,
            seq,
            n_heads: nh,
            n_kv_heads: nh,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            window: None,
        };
        let mut d_act = vec![0.0f32; n * inner];
        let mut d_fc = vec![0.0f32; n * inner];
        let mut act = vec![0.0f32; n * inner];
        let mut d_n = vec![0.0f32; n * h];
        let mut d_attn = vec![0.0f32; n * h];
        let (mut dq, mut dk, mut dv) = (
            vec![0.0f32; n * h],
            vec![0.0f32; n * h],
            vec![0.0f32; n * h],
        );
        let mut d_qkv = vec![0.0f32; n * 3 * h];
        let mut normed = vec![0.0f32; n * h];
        let mut scratch = Vec::new();
        for (li, (b, a)) in self.blocks.iter().zip(&acts.blocks).enumerate().rev() {
            let id = |k: ModuleKind| ModuleId { layer: li, kind: k };
            let mut g = grads
                .modules
                .iter_mut()
                .filter(|(m, _)| m.layer == li)
                .map(|(m, g)| (m.kind, g))
                .collect::<BTreeMap<_, _>>();
            let mut lora = |k: ModuleKind| -> LoraBackward<'_> {
                let w = adapter.modules.get(&id(k))?;
                let xa = a.xa.get(&k)?;
                let gr = g.remove(&k)?;
                Some((w, xa.as_slice(), gr))
            };
            let mut bwd = |kind: ModuleKind,
                           lin: &Linear,
                           input: &[f32],
                           dy: &[f32],
                           dx: &mut [f32],
                           accumulate: bool| {
                linear_train_backward(
                    lin,
                    lora(kind),
                    None,
                    input,
                    dy,
                    dx,
                    accumulate,
                    dropout,
                    dropout.key(id(kind)),
                    &mut scratch,
                );
            };
            // MLP block: x_out = x_mid + c_proj(gelu(c_fc(ln_2(x_mid)))).
            gelu_tanh_forward(&mut act, &a.fc);
            layer_norm_forward(&mut normed, &a.x_mid, &b.ln_2.weight, &b.ln_2.bias, eps);
            bwd(
                ModuleKind::MlpCProj,
                &b.mlp_c_proj,
                &act,
                dx,
                &mut d_act,
                false,
            );
            gelu_tanh_backward(&mut d_fc, &a.fc, &d_act);
            bwd(ModuleKind::CFc, &b.c_fc, &normed, &d_fc, &mut d_n, false);
            layer_norm_backward(dx, &a.x_mid, &b.ln_2.weight, &d_n, eps, true);

            // Attention block: x_mid = x_in + c_proj(attn(split(c_attn(ln_1(x_in))))).
            layer_norm_forward(&mut normed, &a.x_in, &b.ln_1.weight, &b.ln_1.bias, eps);
            bwd(
                ModuleKind::AttnCProj,
                &b.attn_c_proj,
                &a.attn,
                dx,
                &mut d_attn,
                false,
            );
            attention_train_backward(
                &mut dq, &mut dk, &mut dv, &d_attn, &a.q, &a.k, &a.v, &a.attn, &a.lse, shape,
            );
            join_qkv(&mut d_qkv, &dq, &dk, &dv, h);
            bwd(
                ModuleKind::CAttn,
                &b.c_attn,
                &normed,
                &d_qkv,
                &mut d_n,
                false,
            );
            layer_norm_backward(dx, &a.x_in, &b.ln_1.weight, &d_n, eps, true);
        }
        Ok(())
    }
}

impl LmHead for Gpt2Model {
    fn dims(&self) -> (usize, usize) {
        (self.config.hidden_size, self.config.vocab_size)
    }

    fn final_norm_forward(&self, out: &mut [f32], x: &[f32]) {
        layer_norm_forward(
            out,
            x,
            &self.ln_f.weight,
            &self.ln_f.bias,
            self.config.rms_norm_eps,
        );
    }

    fn final_norm_backward(&self, dx: &mut [f32], x: &[f32], dy: &[f32]) {
        layer_norm_backward(
            dx,
            x,
            &self.ln_f.weight,
            dy,
            self.config.rms_norm_eps,
            false,
        );
    }

    fn final_norm_weight_grad(&self, dw: &mut [f32], x: &[f32], dy: &[f32]) {
        layer_norm_weight_grad(dw, x, dy, self.config.rms_norm_eps);
    }

    fn head_forward(&self, logits: &mut [f32], x: &[f32], n: usize) {
        Gpt2Model::head_forward(self, logits, x, n);
    }

    fn head_weight(&self) -> (&[f32], Option<&Bf16Weight>) {
        Gpt2Model::head_weight(self)
    }
}

impl CausalLm for Gpt2Model {
    fn config(&self) -> &Config {
        &self.config
    }
    fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        Gpt2Model::new_cache(self, capacity)
    }
    fn forward(&self, ids: &[u32], cache: &mut KvCache, which: Logits) -> Result<Vec<f32>> {
        Gpt2Model::forward(self, ids, cache, which)
    }
}

impl LoraTrainable for Gpt2Model {
    type Acts = Gpt2Activations;
    fn train_forward(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        adapter: Option<&Adapter>,
        dropout: Dropout,
        acts: &mut Self::Acts,
    ) -> Result<()> {
        Gpt2Model::train_forward(self, ids, batch, seq, adapter, dropout, acts)
    }
    fn x_final(acts: &Self::Acts) -> &[f32] {
        &acts.x_final
    }
    fn train_backward(
        &self,
        dx: &mut [f32],
        acts: &Self::Acts,
        adapter: &Adapter,
        dropout: Dropout,
        grads: &mut LoraGrads,
    ) -> Result<()> {
        Gpt2Model::train_backward(self, dx, acts, adapter, dropout, grads)
    }
}
