//! The Llama-family decoder: embedding → N × (RMSNorm → attention → residual → RMSNorm →
//! SwiGLU MLP → residual) → RMSNorm → LM head, with a KV cache for decoding.

use crate::engine::ops::{
    add_inplace, attention_forward, embedding_forward, rms_norm_forward, rope_forward,
    swiglu_forward, KvLayer, RopeTable,
};
use crate::engine::quant::QuantMatrix;
use crate::error::{Error, Result};
use crate::lora::peft::Adapter;
use crate::lora::{ModuleId, ModuleKind};
use crate::model::linear::{
    check_precision_supported, frozen_forward, head_weight, set_head_precision, Bf16Weight,
};
use crate::model::{Config, Linear, Precision};

/// One decoder layer's frozen weights.
#[derive(Debug, Clone)]
pub struct Layer {
    /// input_layernorm, [hidden]
    pub attn_norm: Vec<f32>,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// post_attention_layernorm, [hidden]
    pub mlp_norm: Vec<f32>,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct LlamaModel {
    pub config: Config,
    /// [vocab, hidden]
    pub embed_tokens: Vec<f32>,
    pub layers: Vec<Layer>,
    /// final norm, [hidden]
    pub norm: Vec<f32>,
    /// None when tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
    pub rope: RopeTable,
    /// bf16 packing of the tied LM head (`embed_tokens`) in [`Precision::Bf16`].
    pub tied_head_bf16: Option<Box<Bf16Weight>>,
    /// The tied LM head in the GGUF's quantised blocks (`--precision gguf`, inference only).
    pub head_quant: Option<Box<QuantMatrix>>,
    pub precision: Precision,
}

impl Layer {
    /// The linear layer `kind`.
    ///
    /// # Panics
    /// On a GPT-2 kind: the entry points that take module ids from outside
    /// ([`LlamaModel::attach_adapter`], training) reject those first, with an error.
    pub fn linear(&self, kind: ModuleKind) -> &Linear {
        match kind {
            ModuleKind::Q => &self.q_proj,
            ModuleKind::K => &self.k_proj,
            ModuleKind::V => &self.v_proj,
            ModuleKind::O => &self.o_proj,
            ModuleKind::Gate => &self.gate_proj,
            ModuleKind::Up => &self.up_proj,
            ModuleKind::Down => &self.down_proj,
            other => unreachable!("{} is not a Llama module", other.name()),
        }
    }

    /// The linear layer `kind` (panics on a GPT-2 kind, as [`Layer::linear`]).
    pub fn linear_mut(&mut self, kind: ModuleKind) -> &mut Linear {
        match kind {
            ModuleKind::Q => &mut self.q_proj,
            ModuleKind::K => &mut self.k_proj,
            ModuleKind::V => &mut self.v_proj,
            ModuleKind::O => &mut self.o_proj,
            ModuleKind::Gate => &mut self.gate_proj,
            ModuleKind::Up => &mut self.up_proj,
            ModuleKind::Down => &mut self.down_proj,
            other => unreachable!("{} is not a Llama module", other.name()),
        }
    }
}

/// Keys and values of every layer for one sequence.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<KvLayer>,
    pub capacity: usize,
    /// Positions filled so far.
    pub len: usize,
}

impl KvCache {
    pub fn new(config: &Config, capacity: usize) -> Self {
        let per_layer = config.num_kv_heads * capacity * config.head_dim;
        KvCache {
            layers: (0..config.num_layers)
                .map(|_| KvLayer {
                    k: vec![0.0; per_layer],
                    v: vec![0.0; per_layer],
                })
                .collect(),
            capacity,
            len: 0,
        }
    }
}

/// Which positions need logits: all of them (scoring) or only the last (generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
}

impl LlamaModel {
    pub fn new(
        config: Config,
        embed_tokens: Vec<f32>,
        layers: Vec<Layer>,
        norm: Vec<f32>,
        lm_head: Option<Linear>,
    ) -> Self {
        let rope = RopeTable::new(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
        );
        LlamaModel {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            tied_head_bf16: None,
            head_quant: None,
            precision: Precision::F32,
        }
    }

    pub fn linear(&self, id: ModuleId) -> &Linear {
        self.layers[id.layer].linear(id.kind)
    }

    pub fn linear_mut(&mut self, id: ModuleId) -> &mut Linear {
        self.layers[id.layer].linear_mut(id.kind)
    }

    /// Switches the frozen-weight products to `precision` (bf16 packs every weight once;
    /// `training` also packs the transposed use of each weight for the backward pass).
    pub fn set_precision(&mut self, precision: Precision, training: bool) -> Result<()> {
        check_precision_supported(precision)?;
        for layer in &mut self.layers {
            for kind in ModuleKind::ALL {
                layer.linear_mut(kind).set_precision(precision, training);
            }
        }
        set_head_precision(
            self.lm_head.as_mut(),
            &mut self.tied_head_bf16,
            &self.embed_tokens,
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
            &self.embed_tokens,
        )
    }

    /// logits = x · headᵀ.  x: [n, hidden] → logits: [n, vocab].
    pub fn head_forward(&self, logits: &mut [f32], x: &[f32], n: usize) {
        let quant = match &self.lm_head {
            Some(l) => l.quant.as_deref(),
            None => self.head_quant.as_deref(),
        };
        if let Some(q) = quant {
            q.matmul_nt(logits, x, n);
            return;
        }
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
    pub fn attach_adapter(&mut self, adapter: &Adapter, weight: f32) -> Result<()> {
        check_llama_modules(adapter)?;
        for (id, w) in &adapter.modules {
            if id.layer >= self.layers.len() {
                return Err(Error::Invalid(format!(
                    "adapter module {} is outside this {}-layer model",
                    id.path(),
                    self.layers.len()
                )));
            }
            let mut w = w.clone();
            w.scale *= weight;
            self.linear_mut(*id).loras.push(w);
        }
        Ok(())
    }

    /// Removes every attached adapter (weights untouched).
    pub fn detach_adapters(&mut self) {
        for layer in &mut self.layers {
            for kind in ModuleKind::ALL {
                layer.linear_mut(kind).loras.clear();
            }
        }
    }

    /// W0 += s·B A for every attached adapter, which are then detached. Refuses (and changes
    /// nothing) if any merged weight would be NaN or Inf, as PEFT's `safe_merge` does.
    pub fn merge_adapters(&mut self) -> Result<()> {
        self.merge_signed(1.0)
    }

    /// W −= s·B A for the given adapter, undoing an earlier merge of it (up to rounding).
    pub fn unmerge_adapter(&mut self, adapter: &Adapter, weight: f32) -> Result<()> {
        self.attach_adapter(adapter, weight)?;
        self.merge_signed(-1.0)
    }

    fn merge_signed(&mut self, sign: f32) -> Result<()> {
        // Check every layer before touching any, so a refused merge leaves the model as it was.
        for (i, layer) in self.layers.iter().enumerate() {
            for kind in ModuleKind::ALL {
                if let Some((at, v)) = layer.linear(kind).check_merge(sign) {
                    let id = ModuleId { layer: i, kind };
                    return Err(Error::Invalid(format!(
                        "merging would make {} non-finite (element {at} becomes {v}); \
                         the adapter seems to be broken, nothing was merged",
                        id.path()
                    )));
                }
            }
        }
        for layer in &mut self.layers {
            for kind in ModuleKind::ALL {
                layer.linear_mut(kind).merge_loras(sign);
            }
        }
        Ok(())
    }

    /// A cache for at most `capacity` positions (prompt + generated tokens).
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        if capacity > self.config.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "{capacity} positions exceed the model's context of {} tokens",
                self.config.max_position_embeddings
            )));
        }
        Ok(KvCache::new(&self.config, capacity))
    }

    /// Runs `ids` at positions `cache.len ..`, appends their keys/values to the cache and returns
    /// logits: [T, vocab] for `Logits::All`, [vocab] for `Logits::Last`.
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache, which: Logits) -> Result<Vec<f32>> {
        let c = &self.config;
        let t = ids.len();
        if t == 0 {
            return Err(Error::Invalid(
                "no tokens to run the model on (empty prompt?)".into(),
            ));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                c.vocab_size
            )));
        }
        let start = cache.len;
        if start + t > cache.capacity {
            return Err(Error::Invalid(format!(
                "{} tokens exceed the cache capacity of {} positions",
                start + t,
                cache.capacity
            )));
        }
        let (h, hd) = (c.hidden_size, c.head_dim);
        let q_dim = c.num_heads * hd;
        let kv_dim = c.num_kv_heads * hd;

        let mut x = vec![0.0f32; t * h];
        embedding_forward(&mut x, &self.embed_tokens, ids, h);
        let mut normed = vec![0.0f32; t * h];
        let mut q = vec![0.0f32; t * q_dim];
        let mut k = vec![0.0f32; t * kv_dim];
        let mut v = vec![0.0f32; t * kv_dim];
        let mut attn = vec![0.0f32; t * q_dim];
        let mut proj = vec![0.0f32; t * h];
        let mut gate = vec![0.0f32; t * c.intermediate_size];
        let mut up = vec![0.0f32; t * c.intermediate_size];
        let mut act = vec![0.0f32; t * c.intermediate_size];

        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            // Attention block.
            rms_norm_forward(&mut normed, &x, &layer.attn_norm, c.rms_norm_eps);
            layer.q_proj.forward(&mut q, &normed);
            layer.k_proj.forward(&mut k, &normed);
            layer.v_proj.forward(&mut v, &normed);
            rope_forward(&mut q, c.num_heads, hd, start, &self.rope);
            rope_forward(&mut k, c.num_kv_heads, hd, start, &self.rope);
            store_kv(kv, &k, &v, c.num_kv_heads, hd, cache.capacity, start);
            attention_forward(
                &mut attn,
                &q,
                kv,
                cache.capacity,
                c.num_heads,
                c.num_kv_heads,
                hd,
                start,
            );
            layer.o_proj.forward(&mut proj, &attn);
            add_inplace(&mut x, &proj);

            // MLP block.
            rms_norm_forward(&mut normed, &x, &layer.mlp_norm, c.rms_norm_eps);
            layer.gate_proj.forward(&mut gate, &normed);
            layer.up_proj.forward(&mut up, &normed);
            swiglu_forward(&mut act, &gate, &up);
            layer.down_proj.forward(&mut proj, &act);
            add_inplace(&mut x, &proj);
        }
        cache.len = start + t;

        let rows = match which {
            Logits::All => &x[..],
            Logits::Last => &x[(t - 1) * h..],
        };
        let n = rows.len() / h;
        let mut final_normed = vec![0.0f32; n * h];
        rms_norm_forward(&mut final_normed, rows, &self.norm, c.rms_norm_eps);
        let mut logits = vec![0.0f32; n * c.vocab_size];
        self.head_forward(&mut logits, &final_normed, n);
        Ok(logits)
    }

    /// Logits for a whole sequence from position 0: [T, vocab].
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut cache = self.new_cache(ids.len())?;
        self.forward(ids, &mut cache, Logits::All)
    }
}

/// An adapter for GPT-2's modules cannot be applied to a Llama-family model.
pub(crate) fn check_llama_modules(adapter: &Adapter) -> Result<()> {
    if let Some(id) = adapter.modules.keys().find(|id| id.kind.is_gpt2()) {
        return Err(Error::Invalid(format!(
            "adapter module {} belongs to a GPT-2 model, not to this Llama-family model",
            id.path()
        )));
    }
    Ok(())
}

/// Copies the new tokens' keys/values k, v: [T, n_kv, head_dim] into the cache layout
/// [n_kv, capacity, head_dim] at positions start..start+T.
pub(crate) fn store_kv(
    kv: &mut KvLayer,
    k: &[f32],
    v: &[f32],
    n_kv: usize,
    hd: usize,
    capacity: usize,
    start: usize,
) {
    for (t, (kt, vt)) in k
        .chunks_exact(n_kv * hd)
        .zip(v.chunks_exact(n_kv * hd))
        .enumerate()
    {
        for head in 0..n_kv {
            let dst = (head * capacity + start + t) * hd;
            kv.k[dst..dst + hd].copy_from_slice(&kt[head * hd..(head + 1) * hd]);
            kv.v[dst..dst + hd].copy_from_slice(&vt[head * hd..(head + 1) * hd]);
        }
    }
}
