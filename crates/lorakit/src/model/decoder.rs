//! The decoder of every family (Llama 1–3.x, Mistral, Qwen2, Qwen3, Gemma 3, Phi-3, OLMo 2,
//! GPT-2): embedding → N × block → final norm → LM head, with a KV cache for decoding.
//! The block is the one described in [`crate::model::spec`]; this file runs it for inference,
//! `decoder_train.rs` for training.

use std::borrow::Cow;

use crate::engine::ops::{
    add_inplace, attention_forward, embedding_forward, gelu_tanh_backward, gelu_tanh_forward,
    layer_norm_forward, position_embedding_add, rms_norm_forward, rope_forward, swiglu_forward,
    RopeTable,
};
use crate::engine::quant::QuantMatrix;
use crate::error::{Error, Result};
use crate::lora::peft::Adapter;
use crate::lora::{ModuleId, ModuleKind};
use crate::model::arch::NormSlot;
use crate::model::config::Config;
use crate::model::kv_cache::store_kv;
pub use crate::model::kv_cache::{KvCache, Logits};
use crate::model::linear::{
    check_precision_supported, frozen_backward, frozen_forward, head_weight, Bf16Weight, FrozenRef,
    TiedEmbedding,
};
use crate::model::linear::{Linear, Precision, Weight};
use crate::model::spec::{Activation, NormKind, Positions, QkNorm};
use crate::model::traits::{CausalLm, LmHead};

/// The q, k, v projections: three, or one with rows [q; k; v] (Phi-3's `qkv_proj`).
// One per layer, so the size difference costs nothing worth a Box's indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum QkvWeights {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// The MLP's input projections: gate and up (Llama), one `gate_up` with rows [gate; up]
/// (Phi-3), or up alone (a plain MLP).
#[derive(Debug, Clone)]
pub enum MlpWeights {
    Gated { gate: Linear, up: Linear },
    GatedFused(Linear),
    Plain { up: Linear },
}

/// A norm's parameters: weight [n] and, for LayerNorm, bias [n].
#[derive(Debug, Clone, PartialEq)]
pub struct Norm {
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

impl Norm {
    pub fn as_ref(&self) -> NormRef<'_> {
        NormRef {
            weight: &self.weight,
            bias: self.bias.as_deref(),
        }
    }
}

/// A borrowed [`Norm`].
#[derive(Debug, Clone, Copy)]
pub struct NormRef<'a> {
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
}

/// One decoder layer's frozen weights.
#[derive(Debug, Clone)]
pub struct Layer {
    pub qkv: QkvWeights,
    pub o_proj: Linear,
    pub mlp: MlpWeights,
    pub down_proj: Linear,
    /// The norms this architecture places (weights [hidden], q/k: [head_dim] per head or
    /// [heads·head_dim] over the whole projection; LayerNorm also a bias).
    pub norms: Vec<(NormSlot, Norm)>,
}

impl Layer {
    /// The linear layer `kind`, if this layer has it.
    pub fn linear(&self, kind: ModuleKind) -> Option<&Linear> {
        use ModuleKind as K;
        match (kind, &self.qkv, &self.mlp) {
            (K::Q, QkvWeights::Separate { q, .. }, _) => Some(q),
            (K::K, QkvWeights::Separate { k, .. }, _) => Some(k),
            (K::V, QkvWeights::Separate { v, .. }, _) => Some(v),
            (K::Qkv, QkvWeights::Fused(l), _) => Some(l),
            (K::O, _, _) => Some(&self.o_proj),
            (K::Gate, _, MlpWeights::Gated { gate, .. }) => Some(gate),
            (K::Up, _, MlpWeights::Gated { up, .. } | MlpWeights::Plain { up }) => Some(up),
            (K::GateUp, _, MlpWeights::GatedFused(l)) => Some(l),
            (K::Down, _, _) => Some(&self.down_proj),
            _ => None,
        }
    }

    /// The linear layer `kind`, if this layer has it.
    pub fn linear_mut(&mut self, kind: ModuleKind) -> Option<&mut Linear> {
        use ModuleKind as K;
        match (kind, &mut self.qkv, &mut self.mlp) {
            (K::Q, QkvWeights::Separate { q, .. }, _) => Some(q),
            (K::K, QkvWeights::Separate { k, .. }, _) => Some(k),
            (K::V, QkvWeights::Separate { v, .. }, _) => Some(v),
            (K::Qkv, QkvWeights::Fused(l), _) => Some(l),
            (K::O, _, _) => Some(&mut self.o_proj),
            (K::Gate, _, MlpWeights::Gated { gate, .. }) => Some(gate),
            (K::Up, _, MlpWeights::Gated { up, .. } | MlpWeights::Plain { up }) => Some(up),
            (K::GateUp, _, MlpWeights::GatedFused(l)) => Some(l),
            (K::Down, _, _) => Some(&mut self.down_proj),
            _ => None,
        }
    }

    /// The kinds of this layer's linear layers, in [`ModuleKind`] order.
    pub fn kinds(&self) -> Vec<ModuleKind> {
        let mut v: Vec<ModuleKind> = [
            ModuleKind::Q,
            ModuleKind::K,
            ModuleKind::V,
            ModuleKind::O,
            ModuleKind::Gate,
            ModuleKind::Up,
            ModuleKind::Down,
            ModuleKind::Qkv,
            ModuleKind::GateUp,
        ]
        .into_iter()
        .filter(|&k| self.linear(k).is_some())
        .collect();
        v.sort();
        v
    }

    /// Every linear layer with its kind, in [`ModuleKind`] order.
    pub fn linears_mut(&mut self) -> Vec<(ModuleKind, &mut Linear)> {
        let mut v: Vec<(ModuleKind, &mut Linear)> = Vec::with_capacity(7);
        match &mut self.qkv {
            QkvWeights::Separate { q, k, v: vv } => {
                v.push((ModuleKind::Q, q));
                v.push((ModuleKind::K, k));
                v.push((ModuleKind::V, vv));
            }
            QkvWeights::Fused(l) => v.push((ModuleKind::Qkv, l)),
        }
        v.push((ModuleKind::O, &mut self.o_proj));
        match &mut self.mlp {
            MlpWeights::Gated { gate, up } => {
                v.push((ModuleKind::Gate, gate));
                v.push((ModuleKind::Up, up));
            }
            MlpWeights::GatedFused(l) => v.push((ModuleKind::GateUp, l)),
            MlpWeights::Plain { up } => v.push((ModuleKind::Up, up)),
        }
        v.push((ModuleKind::Down, &mut self.down_proj));
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// The norm at `slot`, if this architecture places one there.
    pub fn norm(&self, slot: NormSlot) -> Option<NormRef<'_>> {
        self.norms
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, n)| n.as_ref())
    }
}

/// Bytes of a model's frozen weights by form ([`Decoder::frozen_bytes`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrozenBytes {
    pub f32: usize,
    pub bf16: usize,
    pub blocks: usize,
    /// 8-bit rows of the backward ([`Decoder::set_int8_backward`]).
    pub int8: usize,
}

impl FrozenBytes {
    pub fn total(&self) -> usize {
        self.f32 + self.bf16 + self.blocks + self.int8
    }
}

/// A model of any supported family: its config (with the block description) and its weights.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub config: Config,
    /// [vocab, hidden]: f32, or quantised blocks whose rows are dequantised as looked up
    /// (`--precision gguf`; a tied head multiplies with the same blocks).
    pub embed_tokens: Weight,
    pub layers: Vec<Layer>,
    /// final norm, [hidden]
    pub norm: Vec<f32>,
    /// The final norm's bias (LayerNorm), [hidden].
    pub norm_bias: Option<Vec<f32>>,
    /// Learned positions (GPT-2's wpe), [max_positions, hidden].
    pub wpe: Option<Vec<f32>>,
    /// None when tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
    /// One table per entry of `config.ropes`.
    pub ropes: Vec<RopeTable>,
    /// bf16 packing of the tied LM head (an f32 `embed_tokens`) in [`Precision::Bf16`].
    pub tied_head_bf16: Option<Box<Bf16Weight>>,
    /// With `tied_head_bf16`: the embedding's exact f32 values beside that packing (the bits
    /// it rounded away, or the file's blocks); `embed_tokens` is then empty
    /// ([`Decoder::embedding_f32`] rebuilds it).
    pub tied_embedding: Option<Box<TiedEmbedding>>,
    /// The quantised blocks an f32 embedding tied to the head was read from (a GGUF file's),
    /// until a precision is chosen: bf16 keeps them for the exact lookups, in a fraction of
    /// the bytes of the bits its packing rounds away.
    pub embedding_blocks: Option<Box<QuantMatrix>>,
    pub precision: Precision,
}

/// out = act(gate) ⊙ up.  gate, up, out: [T, intermediate].
pub(crate) fn gated_act_forward(act: Activation, out: &mut [f32], gate: &[f32], up: &[f32]) {
    match act {
        Activation::Silu => swiglu_forward(out, gate, up),
        Activation::GeluTanh => {
            gelu_tanh_forward(out, gate);
            for (o, &u) in out.iter_mut().zip(up) {
                *o *= u;
            }
        }
    }
}

/// d_gate = d_out ⊙ up ⊙ act'(gate), d_up = d_out ⊙ act(gate).  All [T, intermediate].
pub(crate) fn gated_act_backward(
    act: Activation,
    d_gate: &mut [f32],
    d_up: &mut [f32],
    gate: &[f32],
    up: &[f32],
    d_out: &[f32],
) {
    match act {
        Activation::Silu => crate::engine::ops::swiglu_backward(d_gate, d_up, gate, up, d_out),
        Activation::GeluTanh => {
            // d_up holds d_out ⊙ up for a moment, the input of gelu's backward.
            for ((du, &d), &u) in d_up.iter_mut().zip(d_out).zip(up) {
                *du = d * u;
            }
            gelu_tanh_backward(d_gate, gate, d_up);
            gelu_tanh_forward(d_up, gate);
            for (du, &d) in d_up.iter_mut().zip(d_out) {
                *du *= d;
            }
        }
    }
}

/// out = act(x) (a plain MLP).  x, out: [T, intermediate].
pub(crate) fn act_forward(act: Activation, out: &mut [f32], x: &[f32]) {
    match act {
        Activation::Silu => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = crate::engine::ops::silu(v);
            }
        }
        Activation::GeluTanh => gelu_tanh_forward(out, x),
    }
}

/// Splits fused rows [T, Σ widths] into parts [T, widths[i]] (qkv → q, k, v; gate_up → gate, up).
pub(crate) fn split_rows(fused: &[f32], widths: &[usize], parts: &mut [&mut [f32]]) {
    let row_len: usize = widths.iter().sum();
    for (r, row) in fused.chunks_exact(row_len).enumerate() {
        let mut at = 0;
        for (p, &w) in parts.iter_mut().zip(widths) {
            p[r * w..(r + 1) * w].copy_from_slice(&row[at..at + w]);
            at += w;
        }
    }
}

/// The inverse of [`split_rows`]: parts [T, widths[i]] → fused [T, Σ widths].
pub(crate) fn join_rows(fused: &mut [f32], widths: &[usize], parts: &[&[f32]]) {
    let row_len: usize = widths.iter().sum();
    for (r, row) in fused.chunks_exact_mut(row_len).enumerate() {
        let mut at = 0;
        for (p, &w) in parts.iter().zip(widths) {
            row[at..at + w].copy_from_slice(&p[r * w..(r + 1) * w]);
            at += w;
        }
    }
}

impl Decoder {
    pub fn new(
        config: Config,
        embed_tokens: Vec<f32>,
        layers: Vec<Layer>,
        norm: Vec<f32>,
        lm_head: Option<Linear>,
    ) -> Self {
        let ropes = config
            .ropes
            .iter()
            .map(|r| {
                RopeTable::from_inv_freq(
                    &r.inv_freq(config.head_dim),
                    config.max_position_embeddings,
                )
            })
            .collect();
        Decoder {
            config,
            embed_tokens: Weight::F32(embed_tokens),
            layers,
            norm,
            norm_bias: None,
            wpe: None,
            lm_head,
            ropes,
            tied_head_bf16: None,
            tied_embedding: None,
            embedding_blocks: None,
            precision: Precision::F32,
        }
    }

    /// The linear layer of module `id`, or an error naming it if the model has none.
    pub fn linear(&self, id: ModuleId) -> Result<&Linear> {
        let role = self.config.layer_role(id.kind);
        self.layers
            .get(id.layer)
            .and_then(|l| l.linear(role?))
            .ok_or_else(|| self.no_module(id))
    }

    pub fn linear_mut(&mut self, id: ModuleId) -> Result<&mut Linear> {
        let err = self.no_module(id);
        let role = self.config.layer_role(id.kind);
        self.layers
            .get_mut(id.layer)
            .and_then(|l| l.linear_mut(role?))
            .ok_or(err)
    }

    fn no_module(&self, id: ModuleId) -> Error {
        if self.config.arch == crate::model::config::Arch::Gpt2 && id.layer < self.layers.len() {
            return Error::Invalid(format!(
                "adapter module {} is not a GPT-2 module (GPT-2 has c_attn, c_proj, c_fc)",
                id.path()
            ));
        }
        Error::Invalid(format!(
            "adapter module {} is not a module of this {}-layer {} model",
            id.path(),
            self.layers.len(),
            self.config.arch.name()
        ))
    }

    /// out = norm(x) (RMSNorm or LayerNorm, by the block).  x, out: [rows, n.weight.len()].
    pub(crate) fn norm_forward(&self, out: &mut [f32], x: &[f32], n: NormRef) {
        let eps = self.config.rms_norm_eps;
        match self.config.block.norm {
            NormKind::Rms { offset } => rms_norm_forward(out, x, n.weight, offset, eps),
            NormKind::Layer => match n.bias {
                Some(b) => layer_norm_forward(out, x, n.weight, b, eps),
                None => layer_norm_forward(out, x, n.weight, &vec![0.0; n.weight.len()], eps),
            },
        }
    }

    /// The final norm.
    pub fn final_norm(&self) -> NormRef<'_> {
        NormRef {
            weight: &self.norm,
            bias: self.norm_bias.as_deref(),
        }
    }

    /// Switches the frozen-weight products to `precision`. bf16 packs every weight once (the
    /// forward's packing serves the backward too) and drops the layers' f32 copies; the
    /// embedding's lookups stay exact: a tied head gets its own packing, and the embedding is
    /// then kept as that packing plus the bits it rounded away, or as the file's blocks
    /// ([`TiedEmbedding`]).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        check_precision_supported(precision)?;
        for layer in &mut self.layers {
            for (_, lin) in layer.linears_mut() {
                lin.set_precision(precision);
            }
        }
        match self.lm_head.as_mut() {
            Some(head) => head.set_precision(precision),
            None => self.set_tied_precision(precision),
        }
        self.precision = precision;
        Ok(())
    }

    /// Adds 8-bit rows of every layer's linear weights for the input-gradient products
    /// dx = dy·W (`--precision int8`, `gguf-int8`), after [`Decoder::set_precision`]: the
    /// forward keeps reading the weights as they are stored, so the loss is the precision's own,
    /// and the layers' backward multiplies in 8-bit integers (`engine::int8_rows`). Errors name
    /// the tensor that holds a value that is not finite.
    ///
    /// Not the LM head: its dy is softmax(z) − onehot(y) over the vocabulary, whose thousands of
    /// small probabilities fall below a 127th of the target's entry and round to zero per row,
    /// a biased gradient (measured on SmolLM2 at lr 1e-3: 7.8% higher loss after 8 steps with
    /// the head in 8 bits, 0.1% without).
    pub fn set_int8_backward(&mut self) -> Result<()> {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (kind, lin) in layer.linears_mut() {
                lin.set_int8_backward(&format!("layer {i} {kind:?}"))?;
            }
        }
        Ok(())
    }

    /// [`Decoder::set_precision`] of a head tied to the embedding (an f32 one: blocks compute as
    /// they are).
    fn set_tied_precision(&mut self, precision: Precision) {
        let (vocab, h) = (self.config.vocab_size, self.config.hidden_size);
        if let (Some(split), Some(head)) = (self.tied_embedding.take(), &self.tied_head_bf16) {
            self.embed_tokens = Weight::F32(split.to_f32(head));
        }
        self.tied_head_bf16 = None;
        // A head tied to blocks reads them in the precision's arithmetic (QLoRA).
        if let Weight::Quant(q) = &mut self.embed_tokens {
            q.set_bf16_products(precision == Precision::Bf16);
        }
        let blocks = self.embedding_blocks.take();
        if precision == Precision::Bf16 {
            if let Weight::F32(e) = &self.embed_tokens {
                let head = Bf16Weight::new(e, vocab, h);
                let split = blocks
                    .and_then(|b| TiedEmbedding::from_blocks(e, *b))
                    .unwrap_or_else(|| TiedEmbedding::new(e, &head, vocab, h));
                self.embed_tokens = Weight::F32(Vec::new());
                self.tied_head_bf16 = Some(Box::new(head));
                self.tied_embedding = Some(Box::new(split));
            }
        }
    }

    /// The embedding [vocab, hidden] in f32: borrowed, or rebuilt (exactly) from its split
    /// storage in bf16 ([`TiedEmbedding`]), or dequantised from blocks.
    pub fn embedding_f32(&self) -> Cow<'_, [f32]> {
        match (&self.tied_embedding, &self.tied_head_bf16) {
            (Some(split), Some(head)) => Cow::Owned(split.to_f32(head)),
            _ => self.embed_tokens.to_f32(),
        }
    }

    /// Bytes held by the model's weights in every stored form (f32, bf16 packings, GGUF
    /// blocks): what the frozen model costs in memory.
    pub fn weight_bytes(&self) -> usize {
        self.frozen_bytes().total()
    }

    /// Bytes the frozen weights hold, by form: f32 values (norms, biases and positions
    /// included), bf16 packings (and a tied embedding's split storage), quantised blocks.
    pub fn frozen_bytes(&self) -> FrozenBytes {
        let mut b = FrozenBytes::default();
        let mut add = |w: &Weight, bf16: Option<&Bf16Weight>| {
            match w {
                Weight::F32(v) => b.f32 += v.len() * 4,
                Weight::Bf16(p) => b.bf16 += p.bytes(),
                Weight::Quant(q) => b.blocks += q.bytes(),
            }
            b.bf16 += bf16.map_or(0, |p| p.bytes());
        };
        add(&self.embed_tokens, self.tied_head_bf16.as_deref());
        if let Some(l) = &self.lm_head {
            add(&l.weight, l.bf16.as_deref());
        }
        let mut small = self.norm.len() + self.norm_bias.as_ref().map_or(0, |v| v.len());
        small += self.wpe.as_ref().map_or(0, |v| v.len());
        for layer in &self.layers {
            for lin in layer.kinds().into_iter().filter_map(|k| layer.linear(k)) {
                add(&lin.weight, lin.bf16.as_deref());
                b.int8 += lin.int8_backward.as_ref().map_or(0, |q| q.bytes());
                small += lin.bias.as_ref().map_or(0, |v| v.len());
            }
            for (_, n) in &layer.norms {
                small += n.weight.len() + n.bias.as_ref().map_or(0, |v| v.len());
            }
        }
        b.f32 += small * 4;
        b.bf16 += self.tied_embedding.as_ref().map_or(0, |e| e.bytes());
        b
    }

    /// The LM head's weight [vocab, hidden] as its products read it.
    pub fn head_weight(&self) -> FrozenRef<'_> {
        head_weight(
            self.lm_head.as_ref(),
            self.tied_head_bf16.as_deref(),
            &self.embed_tokens,
        )
    }

    /// The LM head as plain f32 [vocab, hidden] (no bf16 packing, no blocks), if it is.
    pub fn head_f32(&self) -> Option<&[f32]> {
        match self.head_weight() {
            FrozenRef::F32(w) => Some(w),
            _ => None,
        }
    }

    /// d x (+)= d logits · head, the head's share of the input gradient.  d logits:
    /// [n, vocab] → dx: [n, hidden]. (The soft-cap's derivative is the caller's.)
    pub fn head_backward(&self, dx: &mut [f32], dlogits: &[f32], n: usize, accumulate: bool) {
        let (h, vocab) = (self.config.hidden_size, self.config.vocab_size);
        frozen_backward(dx, dlogits, self.head_weight(), n, h, vocab, accumulate);
    }

    /// logits = x · headᵀ (soft-capped where the model says so).  x: [n, hidden] → logits:
    /// [n, vocab].
    pub fn head_forward(&self, logits: &mut [f32], x: &[f32], n: usize) {
        frozen_forward(
            logits,
            x,
            self.head_weight(),
            n,
            self.config.hidden_size,
            self.config.vocab_size,
        );
        // Gemma's final soft-capping: cap · tanh(z / cap).
        if let Some(cap) = self.config.final_logit_softcap {
            logits.iter_mut().for_each(|z| *z = cap * (*z / cap).tanh());
        }
    }

    /// Checks that every module of `adapter` exists in this model, naming the first that
    /// does not.
    pub(crate) fn check_adapter_modules(&self, adapter: &Adapter) -> Result<()> {
        for id in adapter.modules.keys() {
            self.linear(*id)?;
        }
        Ok(())
    }

    /// Attaches an adapter unmerged, its scale multiplied by `weight` (1.0 = as trained).
    pub fn attach_adapter(&mut self, adapter: &Adapter, weight: f32) -> Result<()> {
        self.check_adapter_modules(adapter)?;
        for (id, w) in &adapter.modules {
            let mut w = w.clone();
            w.scale *= weight;
            self.linear_mut(*id)?.loras.push(w);
        }
        Ok(())
    }

    /// True when any linear layer carries an unmerged adapter.
    pub fn has_adapters(&self) -> bool {
        self.layers.iter().any(|l| {
            l.kinds()
                .into_iter()
                .any(|k| l.linear(k).is_some_and(|lin| !lin.loras.is_empty()))
        })
    }

    /// Removes every attached adapter (weights untouched).
    pub fn detach_adapters(&mut self) {
        for layer in &mut self.layers {
            for (_, lin) in layer.linears_mut() {
                lin.loras.clear();
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
            for kind in layer.kinds() {
                if let Some((at, v)) = layer.linear(kind).and_then(|l| l.check_merge(sign)) {
                    let id = ModuleId {
                        layer: i,
                        kind: self.config.adapter_kind(kind),
                    };
                    return Err(Error::Invalid(format!(
                        "merging would make {} non-finite (element {at} becomes {v}); \
                         the adapter seems to be broken, nothing was merged",
                        id.path()
                    )));
                }
            }
        }
        for layer in &mut self.layers {
            for (_, lin) in layer.linears_mut() {
                lin.merge_loras(sign);
            }
        }
        Ok(())
    }

    /// A cache for at most `capacity` positions (prompt + generated tokens).
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        if capacity > self.config.max_position_embeddings {
            let table = match self.config.block.positions {
                Positions::Learned => " (n_positions)",
                Positions::Rope => "",
            };
            return Err(Error::Invalid(format!(
                "{capacity} positions exceed the model's context of {} tokens{table}",
                self.config.max_position_embeddings
            )));
        }
        Ok(KvCache::new(&self.config, capacity))
    }

    /// Checks a batch of token ids against the vocabulary.
    pub(crate) fn check_ids(&self, ids: &[u32]) -> Result<()> {
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

    /// x = embedding(ids) (· the embedding scale) (+ learned positions start.. in each row of
    /// `seq` tokens).  x: [T, hidden].
    pub(crate) fn embed(&self, x: &mut [f32], ids: &[u32], start: usize, seq: usize) {
        let h = self.config.hidden_size;
        match (
            &self.tied_embedding,
            &self.tied_head_bf16,
            &self.embed_tokens,
        ) {
            (Some(split), Some(head), _) => {
                for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
                    split.row_into(head, id as usize, row);
                }
            }
            (_, _, Weight::Quant(q)) => {
                for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
                    let id = id as usize;
                    q.dequantize_into(id..id + 1, 0..h, row);
                }
            }
            (_, _, table) => embedding_forward(x, &table.to_f32(), ids, h),
        }
        if let Some(s) = self.config.block.embed_scale {
            x.iter_mut().for_each(|v| *v *= s);
        }
        if let Some(wpe) = &self.wpe {
            for row in x.chunks_exact_mut(seq * h) {
                position_embedding_add(row, wpe, start, h);
            }
        }
    }

    /// q, k (+ v) from the attention input a: [T, hidden] into q: [T, q_dim], k, v: [T, kv_dim].
    /// `fused` is the scratch for a fused projection's output, [T, q_dim + 2·kv_dim].
    pub(crate) fn project_qkv(
        layer: &Layer,
        a: &[f32],
        q: &mut [f32],
        k: &mut [f32],
        v: &mut [f32],
        fused: &mut Vec<f32>,
    ) {
        match &layer.qkv {
            QkvWeights::Separate {
                q: qp,
                k: kp,
                v: vp,
            } => {
                qp.forward(q, a);
                kp.forward(k, a);
                vp.forward(v, a);
            }
            QkvWeights::Fused(l) => {
                fused.resize(q.len() + k.len() + v.len(), 0.0);
                l.forward(fused, a);
                let t = a.len() / l.in_features;
                let widths = [q.len() / t, k.len() / t, v.len() / t];
                split_rows(fused, &widths, &mut [q, k, v]);
            }
        }
    }

    /// The q/k norm in place (per head or over the whole projection), if the block has one.
    /// x: [T, heads·head_dim]; `tmp` is scratch of the same size.
    pub(crate) fn qk_norm(&self, layer: &Layer, slot: NormSlot, x: &mut [f32], tmp: &mut Vec<f32>) {
        if self.config.block.qk_norm == QkNorm::None {
            return;
        }
        if let Some(w) = layer.norm(slot) {
            tmp.clear();
            tmp.extend_from_slice(x);
            self.norm_forward(x, tmp, w);
        }
    }

    /// Runs `ids` at positions `cache.len ..`, appends their keys/values to the cache and returns
    /// logits: [T, vocab] for `Logits::All`, [vocab] for `Logits::Last`.
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache, which: Logits) -> Result<Vec<f32>> {
        let c = &self.config;
        let b = &c.block;
        self.check_ids(ids)?;
        let t = ids.len();
        let start = cache.len;
        if start + t > cache.capacity || cache.layers.len() != self.layers.len() {
            return Err(Error::Invalid(format!(
                "{} tokens exceed the cache capacity of {} positions",
                start + t,
                cache.capacity
            )));
        }
        let (h, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());

        let mut x = vec![0.0f32; t * h];
        self.embed(&mut x, ids, start, t);
        let mut normed = vec![0.0f32; t * h];
        let mut q = vec![0.0f32; t * q_dim];
        let mut k = vec![0.0f32; t * kv_dim];
        let mut v = vec![0.0f32; t * kv_dim];
        let mut attn = vec![0.0f32; t * q_dim];
        let mut proj = vec![0.0f32; t * h];
        let mut gate = vec![0.0f32; t * inter];
        let mut up = vec![0.0f32; t * inter];
        let mut act = vec![0.0f32; t * inter];
        let (mut fused, mut tmp) = (Vec::new(), Vec::new());

        for ((layer, kv), spec) in self
            .layers
            .iter()
            .zip(cache.layers.iter_mut())
            .zip(&c.layers)
        {
            // Attention block.
            let a: &[f32] = match layer.norm(NormSlot::AttnIn) {
                Some(w) => {
                    self.norm_forward(&mut normed, &x, w);
                    &normed
                }
                None => &x,
            };
            Self::project_qkv(layer, a, &mut q, &mut k, &mut v, &mut fused);
            self.qk_norm(layer, NormSlot::Q, &mut q, &mut tmp);
            self.qk_norm(layer, NormSlot::K, &mut k, &mut tmp);
            if let Some(rope) = self.ropes.get(spec.rope) {
                rope_forward(&mut q, c.num_heads, hd, start, rope);
                rope_forward(&mut k, c.num_kv_heads, hd, start, rope);
            }
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
                b.attn_scale,
                spec.window,
            );
            layer.o_proj.forward(&mut proj, &attn);
            self.residual_add(layer, NormSlot::AttnOut, &mut x, &mut proj, &mut normed);

            // MLP block.
            let m: &[f32] = match layer.norm(NormSlot::MlpIn) {
                Some(w) => {
                    self.norm_forward(&mut normed, &x, w);
                    &normed
                }
                None => &x,
            };
            match &layer.mlp {
                MlpWeights::Gated { gate: g, up: u } => {
                    g.forward(&mut gate, m);
                    u.forward(&mut up, m);
                    gated_act_forward(b.act, &mut act, &gate, &up);
                }
                MlpWeights::GatedFused(l) => {
                    fused.resize(2 * t * inter, 0.0);
                    l.forward(&mut fused, m);
                    split_rows(&fused, &[inter, inter], &mut [&mut gate, &mut up]);
                    gated_act_forward(b.act, &mut act, &gate, &up);
                }
                MlpWeights::Plain { up: u } => {
                    u.forward(&mut up, m);
                    act_forward(b.act, &mut act, &up);
                }
            }
            layer.down_proj.forward(&mut proj, &act);
            self.residual_add(layer, NormSlot::MlpOut, &mut x, &mut proj, &mut normed);
        }
        cache.len = start + t;

        let rows = match which {
            Logits::All => &x[..],
            Logits::Last => &x[(t - 1) * h..],
        };
        let n = rows.len() / h;
        let mut final_normed = vec![0.0f32; n * h];
        self.norm_forward(&mut final_normed, rows, self.final_norm());
        let mut logits = vec![0.0f32; n * c.vocab_size];
        self.head_forward(&mut logits, &final_normed, n);
        Ok(logits)
    }

    /// x += out_norm(y) (or x += y where the block has no norm at `slot`).  x, y, scratch:
    /// [T, hidden].
    pub(crate) fn residual_add(
        &self,
        layer: &Layer,
        slot: NormSlot,
        x: &mut [f32],
        y: &mut [f32],
        scratch: &mut [f32],
    ) {
        match layer.norm(slot) {
            Some(w) => {
                self.norm_forward(scratch, y, w);
                add_inplace(x, scratch);
            }
            None => add_inplace(x, y),
        }
    }

    /// Whether every product of the model is f32 (no bf16 packing, no GGUF blocks): then
    /// [`Decoder::prefill`] runs through the chunk-invariant path.
    pub fn all_f32(&self) -> bool {
        let f32_lin = |l: &Linear| l.is_f32();
        self.head_f32().is_some()
            && self.layers.iter().all(|layer| {
                layer
                    .kinds()
                    .into_iter()
                    .filter_map(|k| layer.linear(k))
                    .all(f32_lin)
            })
    }

    /// Logits for a whole sequence from position 0: [T, vocab].
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut cache = self.new_cache(ids.len())?;
        self.forward(ids, &mut cache, Logits::All)
    }
}

impl LmHead for Decoder {
    fn dims(&self) -> (usize, usize) {
        (self.config.hidden_size, self.config.vocab_size)
    }

    fn final_norm_forward(&self, out: &mut [f32], x: &[f32]) {
        self.norm_forward(out, x, self.final_norm());
    }

    fn final_norm_backward(&self, dx: &mut [f32], x: &[f32], dy: &[f32]) {
        let eps = self.config.rms_norm_eps;
        match self.config.block.norm {
            NormKind::Rms { offset } => {
                crate::engine::ops::rms_norm_backward(dx, x, &self.norm, offset, dy, eps, false)
            }
            NormKind::Layer => {
                crate::engine::ops::layer_norm_backward(dx, x, &self.norm, dy, eps, false)
            }
        }
    }

    fn final_norm_weight_grad(&self, dw: &mut [f32], x: &[f32], dy: &[f32]) {
        let eps = self.config.rms_norm_eps;
        match self.config.block.norm {
            NormKind::Rms { .. } => crate::engine::ops::rms_norm_weight_grad(dw, x, dy, eps),
            NormKind::Layer => crate::engine::ops::layer_norm_weight_grad(dw, x, dy, eps),
        }
    }

    fn head_forward(&self, logits: &mut [f32], x: &[f32], n: usize) {
        Decoder::head_forward(self, logits, x, n);
    }

    fn head_backward(&self, dx: &mut [f32], dlogits: &[f32], n: usize, accumulate: bool) {
        Decoder::head_backward(self, dx, dlogits, n, accumulate);
    }

    fn logit_softcap(&self) -> Option<f32> {
        self.config.final_logit_softcap
    }

    /// A head in quantised blocks is dequantised again by every product (forward and
    /// backward), so it takes 256 rows at once: a quarter of the dequantisations, for 50 MB of
    /// logits at a 49k vocabulary instead of 12 MB. Other heads keep 64 rows: the bf16 path's
    /// peak memory is a third of PEFT's with them.
    fn loss_chunk_rows(&self) -> usize {
        match self.head_weight() {
            FrozenRef::Quant(_) => 256,
            _ => 64,
        }
    }
}

impl CausalLm for Decoder {
    fn config(&self) -> &Config {
        &self.config
    }
    fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        Decoder::new_cache(self, capacity)
    }
    fn forward(&self, ids: &[u32], cache: &mut KvCache, which: Logits) -> Result<Vec<f32>> {
        Decoder::forward(self, ids, cache, which)
    }
    fn prefill(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        Decoder::prefill(self, ids, cache)
    }
}
