//! The decoder's forward pass for training, which keeps what the backward needs, and the
//! hand-written backward, both over the block description of [`crate::model::spec`]. For LoRA it produces gradients for the adapter tensors only: frozen
//! weights get a dX (to carry the gradient down) but never a dW. For full fine-tuning
//! ([`FullGrads`]) every weight, norm and the embedding also get their gradient.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use rayon::prelude::*;

use crate::engine::attention::{
    attention_train_backward, attention_train_forward, AttnShape, Segments,
};
use crate::engine::ops::{
    add_inplace, embedding_backward, layer_norm_backward, layer_norm_weight_grad,
    rms_norm_backward, rms_norm_weight_grad, rope_backward, rope_forward,
};
use crate::error::{Error, Result};
use crate::lora::peft::Adapter;
use crate::lora::{ModuleId, ModuleKind};
use crate::model::arch::{self, NormSlot, Slot};
use crate::model::decoder::Decoder;
use crate::model::decoder::{
    act_forward, gated_act_backward, gated_act_forward, join_rows, split_rows, Layer, MlpWeights,
    Norm, QkvWeights,
};
use crate::model::linear::Linear;
use crate::model::linear_train::{
    linear_train_backward, linear_train_forward, Buf, LoraBackward, LoraScratch,
};
pub use crate::model::linear_train::{Dropout, LoraGrads};
use crate::model::param::Param;
use crate::model::spec::{Activation, NormKind, QkNorm};

/// Gradients of every parameter of the model (full fine-tuning), in the model's own layouts.
#[derive(Debug, Clone)]
pub struct FullGrads {
    /// [vocab, hidden]; with a tied LM head it also receives the head's gradient.
    pub embed_tokens: Vec<f32>,
    /// Final norm, [hidden].
    pub norm: Vec<f32>,
    /// The final norm's bias (LayerNorm), [hidden].
    pub norm_bias: Option<Vec<f32>>,
    /// Learned positions, [max_positions, hidden].
    pub wpe: Option<Vec<f32>>,
    /// [vocab, hidden], when the head is not tied to the embedding.
    pub lm_head: Option<Vec<f32>>,
    pub layers: Vec<LayerGrads>,
}

/// One decoder layer's gradients.
#[derive(Debug, Clone)]
pub struct LayerGrads {
    /// The norms' weights (and biases), in the layer's order ([`Layer::norms`]).
    pub norms: Vec<(NormSlot, Norm)>,
    /// dW [out, in] and db [out] (biased projections only) of each linear layer.
    pub linears: BTreeMap<ModuleKind, (Vec<f32>, Option<Vec<f32>>)>,
}

impl LayerGrads {
    pub fn norm(&self, slot: NormSlot) -> Option<&[f32]> {
        self.norms
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, g)| g.weight.as_slice())
    }
}

impl FullGrads {
    pub fn zeros_like(model: &Decoder) -> Self {
        let zeros = |n: usize| vec![0.0f32; n];
        FullGrads {
            embed_tokens: zeros(model.config.vocab_size * model.config.hidden_size),
            norm: zeros(model.norm.len()),
            norm_bias: model.norm_bias.as_ref().map(|b| zeros(b.len())),
            wpe: model.wpe.as_ref().map(|w| zeros(w.len())),
            lm_head: model
                .lm_head
                .as_ref()
                .map(|l| zeros(l.out_features * l.in_features)),
            layers: model
                .layers
                .iter()
                .map(|l| LayerGrads {
                    norms: l
                        .norms
                        .iter()
                        .map(|(s, n)| {
                            let weight = zeros(n.weight.len());
                            let bias = n.bias.as_ref().map(|b| zeros(b.len()));
                            (*s, Norm { weight, bias })
                        })
                        .collect(),
                    linears: l
                        .kinds()
                        .into_iter()
                        .filter_map(|k| l.linear(k).map(|lin| (k, lin)))
                        .map(|(k, lin)| {
                            (
                                k,
                                (
                                    zeros(lin.out_features * lin.in_features),
                                    lin.bias.as_ref().map(|b| zeros(b.len())),
                                ),
                            )
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    pub fn zero(&mut self) {
        let FullGrads {
            embed_tokens,
            norm,
            norm_bias,
            wpe,
            lm_head,
            layers,
        } = self;
        let mut all: Vec<&mut Vec<f32>> = vec![embed_tokens, norm];
        all.extend(norm_bias.as_mut());
        all.extend(wpe.as_mut());
        all.extend(lm_head.as_mut());
        for l in layers {
            for (_, n) in &mut l.norms {
                all.push(&mut n.weight);
                all.extend(n.bias.as_mut());
            }
            for (w, b) in l.linears.values_mut() {
                all.push(w);
                all.extend(b.as_mut());
            }
        }
        for t in all {
            t.fill(0.0);
        }
    }
}

impl Decoder {
    /// Every trainable tensor beside its gradient in `grads` (made by
    /// [`FullGrads::zeros_like`] for this model), named as in the HF checkpoint, in a fixed
    /// order: embedding, positions, per layer its norms then its linears by kind, final norm,
    /// head. A tied head has no entry of its own (its gradient is the embedding's).
    pub fn params_with_grads<'a>(&'a mut self, grads: &'a mut FullGrads) -> Result<Vec<Param<'a>>> {
        let table = arch::weights(self.config.arch);
        let names = arch::model_names(self.config.arch);
        let mismatch =
            |what: String| Error::Invalid(format!("gradients do not match the model: {what}"));
        let Decoder {
            config: cfg,
            embed_tokens,
            wpe,
            layers,
            norm,
            norm_bias,
            lm_head,
            ..
        } = self;
        let cfg = &*cfg;
        let mut v = vec![Param::new(
            names.embed.into(),
            true,
            // Blocks cannot take an optimiser step: they become f32 here.
            embed_tokens.make_f32(),
            &mut grads.embed_tokens,
        )?];
        match (wpe, &mut grads.wpe, names.positions) {
            (Some(w), Some(g), Some(name)) => v.push(Param::new(name.into(), true, w, g)?),
            (None, None, _) => {}
            _ => return Err(mismatch("learned positions".into())),
        }
        if layers.len() != grads.layers.len() {
            return Err(mismatch(format!(
                "{} layers, {} in the gradients",
                layers.len(),
                grads.layers.len()
            )));
        }
        for (i, (l, g)) in layers.iter_mut().zip(&mut grads.layers).enumerate() {
            let Layer {
                norms,
                qkv,
                o_proj,
                mlp,
                down_proj,
            } = l;
            if norms.len() != g.norms.len() {
                return Err(mismatch(format!("layer {i}'s norms")));
            }
            for ((slot, n), (g_slot, gn)) in norms.iter_mut().zip(&mut g.norms) {
                if slot != g_slot {
                    return Err(mismatch(format!("layer {i}: norm {slot:?} vs {g_slot:?}")));
                }
                let hf = table.names(Slot::Norm(*slot)).map_or("?", |n| n.0);
                let base = format!("{}.{i}.{hf}", names.layers);
                v.push(Param::new(
                    format!("{base}.weight"),
                    false,
                    &mut n.weight,
                    &mut gn.weight,
                )?);
                match (&mut n.bias, &mut gn.bias) {
                    (Some(b), Some(gb)) => {
                        v.push(Param::new(format!("{base}.bias"), false, b, gb)?)
                    }
                    (None, None) => {}
                    _ => return Err(mismatch(format!("layer {i}: the {slot:?} norm's bias"))),
                }
            }
            // The layer's linears in kind order, the order of the gradients' map.
            let mut lins: Vec<(ModuleKind, &mut Linear)> =
                vec![(ModuleKind::O, o_proj), (ModuleKind::Down, down_proj)];
            match qkv {
                QkvWeights::Separate { q, k, v: vv } => {
                    lins.push((ModuleKind::Q, q));
                    lins.push((ModuleKind::K, k));
                    lins.push((ModuleKind::V, vv));
                }
                QkvWeights::Fused(f) => lins.push((ModuleKind::Qkv, f)),
            }
            match mlp {
                MlpWeights::Gated { gate, up } => {
                    lins.push((ModuleKind::Gate, gate));
                    lins.push((ModuleKind::Up, up));
                }
                MlpWeights::GatedFused(f) => lins.push((ModuleKind::GateUp, f)),
                MlpWeights::Plain { up } => lins.push((ModuleKind::Up, up)),
            }
            lins.sort_by_key(|(k, _)| *k);
            if lins.len() != g.linears.len() {
                return Err(mismatch(format!("layer {i}'s linear layers")));
            }
            for ((k, lin), (gk, (gw, gb))) in lins.into_iter().zip(&mut g.linears) {
                if k != *gk {
                    return Err(mismatch(format!(
                        "layer {i}: {} vs {}",
                        k.name(),
                        gk.name()
                    )));
                }
                let path = ModuleId {
                    layer: i,
                    kind: cfg.adapter_kind(k),
                }
                .path();
                let (w, b) = lin.weight_and_bias_mut();
                v.push(Param::new(format!("{path}.weight"), true, w, gw)?);
                match (b, gb) {
                    (Some(b), Some(gb)) => {
                        v.push(Param::new(format!("{path}.bias"), false, b, gb)?)
                    }
                    (None, None) => {}
                    _ => return Err(mismatch(format!("layer {i}: {}'s bias", k.name()))),
                }
            }
        }
        let final_norm = names.final_norm;
        v.push(Param::new(
            format!("{final_norm}.weight"),
            false,
            norm,
            &mut grads.norm,
        )?);
        match (norm_bias, &mut grads.norm_bias) {
            (Some(b), Some(g)) => v.push(Param::new(format!("{final_norm}.bias"), false, b, g)?),
            (None, None) => {}
            _ => return Err(mismatch("the final norm's bias".into())),
        }
        match (lm_head, &mut grads.lm_head) {
            (Some(h), Some(g)) => v.push(Param::new(
                names.head.into(),
                true,
                h.weight_and_bias_mut().0,
                g,
            )?),
            (None, None) => {}
            _ => return Err(mismatch("the LM head".into())),
        }
        Ok(v)
    }
}

/// What one layer's backward needs from its forward. N = batch · seq rows. The normed inputs of
/// the projections and act(gate) ⊙ up are cheap to recompute, so the backward does that
/// instead of keeping them (a third less activation memory). Every buffer keeps the storage of
/// the largest batch it has held; a smaller batch uses a prefix.
#[derive(Debug, Default)]
struct LayerActs {
    /// Residual stream entering the layer, [N, hidden].
    x_in: Buf,
    /// q and k as projected, before their norm (blocks with a q/k norm only): [N, q_dim], [N, kv_dim].
    q_raw: Buf,
    k_raw: Buf,
    /// After the q/k norm and RoPE: [N, heads·hd], [N, kv·hd]; v: [N, kv·hd].
    q: Buf,
    k: Buf,
    v: Buf,
    /// Attention output, the input of o_proj, [N, heads·hd].
    attn: Buf,
    /// [batch, heads, seq]
    lse: Buf,
    /// o_proj's output, the input of the post-attention norm (blocks with one), [N, hidden].
    o_out: Buf,
    /// Residual stream after the attention block, [N, hidden].
    x_mid: Buf,
    /// The MLP's projections, [N, intermediate] (a plain MLP keeps its one in `up`).
    gate: Buf,
    up: Buf,
    /// down_proj's output, the input of the post-MLP norm (blocks with one), [N, hidden].
    d_out: Buf,
    /// x·Aᵀ (after dropout) of each adapted module, [N, r].
    xa: BTreeMap<ModuleKind, Buf>,
}

/// Saved activations of a whole forward pass, and the work buffers of the forward and the
/// backward, reused across steps: each buffer grows to the largest batch of the run once and
/// is never zeroed again (every one is overwritten in full before it is read).
#[derive(Debug, Default)]
pub struct Activations {
    layers: Vec<LayerActs>,
    /// Residual stream after the last layer (before the final norm), [N, hidden].
    pub x_final: Vec<f32>,
    /// The batch's token ids, [N] (for the embedding's gradient).
    ids: Vec<u32>,
    pub batch: usize,
    pub seq: usize,
    /// The sequences packed into each row (unpacked: one per row).
    segments: Segments,
    /// Keep only each layer's input and recompute the rest in the backward, one layer at a
    /// time (activation checkpointing): saved activations shrink to [N, hidden] per layer plus
    /// one layer's worth, for one more forward pass per step.
    pub recompute: bool,
    /// The step's work buffers. Behind a lock because the backward reads the activations
    /// through a shared reference; it is never contended.
    work: Mutex<Work>,
}

impl LayerActs {
    /// Frees everything but `x_in` (what the backward recomputes from).
    fn keep_input_only(&mut self) {
        let x_in = std::mem::take(&mut self.x_in);
        *self = LayerActs {
            x_in,
            ..LayerActs::default()
        };
    }
}

/// Work buffers of the training forward, reused across layers.
#[derive(Debug, Default)]
struct FwdBufs {
    proj: Buf,
    normed: Buf,
    act: Buf,
    fused: Buf,
    scratch: LoraScratch,
}

/// Work buffers of the backward, reused across layers; N = batch · seq. It also borrows the
/// forward's ([`FwdBufs`]), which are free by then.
#[derive(Debug, Default)]
struct BwdBufs {
    /// [N, intermediate]
    d_act: Buf,
    d_gate: Buf,
    d_up: Buf,
    /// [N, hidden]
    d_n: Buf,
    /// [N, q_dim]; dk, dv: [N, kv_dim]
    d_attn: Buf,
    dq: Buf,
    dk: Buf,
    dv: Buf,
    /// A q/k norm's input gradient, [N, q_dim or kv_dim].
    d_raw: Buf,
}

/// Everything a step needs besides the saved activations.
#[derive(Debug, Default)]
struct Work {
    fwd: FwdBufs,
    bwd: BwdBufs,
    /// The layer recomputed from its saved input (`recompute`), and its residual stream.
    recomputed: LayerActs,
    x_work: Buf,
}

impl Activations {
    /// Bytes held by the saved activations (for the memory report).
    pub fn bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|a| {
                [
                    &a.x_in, &a.q_raw, &a.k_raw, &a.q, &a.k, &a.v, &a.attn, &a.lse, &a.o_out,
                    &a.x_mid, &a.gate, &a.up, &a.d_out,
                ]
                .iter()
                .map(|v| v.len())
                .sum::<usize>()
                    + a.xa.values().map(|b| b.len()).sum::<usize>()
            })
            .sum();
        (l + self.x_final.len()) * 4
    }
}

impl Decoder {
    fn check_trainable(&self, adapter: Option<&Adapter>) -> Result<()> {
        if self.has_adapters() {
            return Err(Error::Invalid(
                "training needs a model without attached adapters (merge them first, or pass the adapter to train as the initial adapter)".into(),
            ));
        }
        if let Some(a) = adapter {
            self.check_adapter_modules(a)?;
        }
        Ok(())
    }

    fn attn_shape(&self, batch: usize, seq: usize, window: Option<usize>) -> AttnShape {
        let c = &self.config;
        AttnShape {
            batch,
            seq,
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            scale: c.block.attn_scale,
            window,
        }
    }

    /// Forward pass of a batch for training; fills `acts` (including `acts.x_final`).
    ///
    /// ids: [batch, seq] row-major, right-padded; every row uses positions 0..seq.
    pub fn train_forward(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        adapter: Option<&Adapter>,
        dropout: Dropout,
        acts: &mut Activations,
    ) -> Result<()> {
        let segs = Segments::unpacked();
        self.train_forward_packed(ids, batch, seq, &segs, adapter, dropout, acts)
    }

    /// [`Decoder::train_forward`] of a packed batch: each row holds the sequences `segs` says,
    /// one after the other, and each is computed as if it were alone (attention within itself
    /// only, positions from 0); the backward follows the same segments.
    #[allow(clippy::too_many_arguments)]
    pub fn train_forward_packed(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        segs: &Segments,
        adapter: Option<&Adapter>,
        dropout: Dropout,
        acts: &mut Activations,
    ) -> Result<()> {
        let c = &self.config;
        self.check_trainable(adapter)?;
        if ids.len() != batch * seq || ids.is_empty() {
            return Err(Error::Invalid(format!(
                "batch of {} ids is not {batch} × {seq}",
                ids.len()
            )));
        }
        let max_positions = self
            .ropes
            .first()
            .map_or(c.max_position_embeddings, |r| r.max_positions());
        segs.check(batch, seq)
            .map_err(|e| Error::Invalid(format!("packed batch: {e}")))?;
        let longest = segs.longest(seq);
        if longest > max_positions {
            return Err(Error::Invalid(format!(
                "sequence length {longest} exceeds the model's context of {max_positions}"
            )));
        }
        self.check_ids(ids)?;
        let (n, h) = (batch * seq, c.hidden_size);
        acts.batch = batch;
        acts.seq = seq;
        acts.ids.clear();
        acts.ids.extend_from_slice(ids);
        acts.layers.resize_with(c.num_layers, LayerActs::default);
        acts.segments.clone_from(segs);
        let mut x = std::mem::take(&mut acts.x_final);
        // The embedding writes every row (padding included): no need to clear it.
        if x.len() < n * h {
            x.resize(n * h, 0.0);
        }
        x.truncate(n * h);
        // Each sequence is embedded at positions 0.. (learned positions restart with it).
        for bi in 0..batch {
            for (start, len) in segs.row(bi, seq) {
                let at = bi * seq + start;
                self.embed(&mut x[at * h..(at + len) * h], &ids[at..at + len], 0, len);
            }
        }
        let bufs = &mut acts
            .work
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .fwd;
        for li in 0..c.num_layers {
            let a = &mut acts.layers[li];
            self.train_layer_forward(li, &mut x, a, batch, seq, segs, adapter, dropout, bufs);
            if acts.recompute {
                a.keep_input_only();
            }
        }
        acts.x_final = x;
        Ok(())
    }

    /// Layer `li` of the training forward: x [N, hidden] goes in as the layer's input and
    /// comes out as its output; `a` is filled with what the backward needs.
    #[allow(clippy::too_many_arguments)]
    fn train_layer_forward(
        &self,
        li: usize,
        x: &mut [f32],
        a: &mut LayerActs,
        batch: usize,
        seq: usize,
        segs: &Segments,
        adapter: Option<&Adapter>,
        dropout: Dropout,
        bufs: &mut FwdBufs,
    ) {
        let c = &self.config;
        let b = &c.block;
        let (layer, spec) = (&self.layers[li], &c.layers[li]);
        let n = batch * seq;
        let (h, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        let qk_norm = b.qk_norm != QkNorm::None;
        // Every buffer below is written in full before it is read.
        bufs.proj.fit(n * h);
        bufs.normed.fit(n * h);
        bufs.act.fit(n * inter);
        let lora = |k: ModuleKind| {
            let id = ModuleId {
                layer: li,
                kind: c.adapter_kind(k),
            };
            adapter.and_then(|ad| ad.modules.get(&id))
        };
        // Prepare the xa slots of this layer's adapted modules.
        a.xa.retain(|k, _| lora(*k).is_some());
        for k in layer.kinds() {
            if lora(k).is_some() {
                a.xa.entry(k).or_default();
            }
        }
        // One adapted-or-frozen linear layer of this block, by kind.
        let mut fwd = |kind: ModuleKind, input: &[f32], out: &mut [f32]| {
            let id = ModuleId {
                layer: li,
                kind: c.adapter_kind(kind),
            };
            let Some(lin) = layer.linear(kind) else {
                return;
            };
            linear_train_forward(
                lin,
                adapter.and_then(|ad| ad.modules.get(&id)),
                input,
                out,
                a.xa.get_mut(&kind),
                dropout,
                dropout.key(id),
                &mut bufs.scratch,
            );
        };
        a.x_in.copy_from(x);
        let attn_in: &[f32] = match layer.norm(NormSlot::AttnIn) {
            Some(w) => {
                self.norm_forward(&mut bufs.normed, x, w);
                &bufs.normed
            }
            None => x,
        };
        a.q.fit(n * qd);
        a.k.fit(n * kvd);
        a.v.fit(n * kvd);
        match &layer.qkv {
            QkvWeights::Separate { .. } => {
                fwd(ModuleKind::Q, attn_in, &mut a.q);
                fwd(ModuleKind::K, attn_in, &mut a.k);
                fwd(ModuleKind::V, attn_in, &mut a.v);
            }
            QkvWeights::Fused(_) => {
                bufs.fused.fit(n * (qd + 2 * kvd));
                fwd(ModuleKind::Qkv, attn_in, &mut bufs.fused);
                split_rows(
                    &bufs.fused,
                    &[qd, kvd, kvd],
                    &mut [&mut a.q, &mut a.k, &mut a.v],
                );
            }
        }
        if qk_norm {
            a.q_raw.copy_from(&a.q);
            a.k_raw.copy_from(&a.k);
            if let (Some(wq), Some(wk)) = (layer.norm(NormSlot::Q), layer.norm(NormSlot::K)) {
                self.norm_forward(&mut a.q, &a.q_raw, wq);
                self.norm_forward(&mut a.k, &a.k_raw, wk);
            }
        }
        if let Some(rope) = self.ropes.get(spec.rope) {
            for bi in 0..batch {
                // Positions restart at 0 with every sequence of the row.
                for (start, len) in segs.row(bi, seq) {
                    let rows = bi * seq + start..bi * seq + start + len;
                    let q = &mut a.q[rows.start * qd..rows.end * qd];
                    rope_forward(q, c.num_heads, hd, 0, rope);
                    let k = &mut a.k[rows.start * kvd..rows.end * kvd];
                    rope_forward(k, c.num_kv_heads, hd, 0, rope);
                }
            }
        }
        a.attn.fit(n * qd);
        a.lse.fit(batch * c.num_heads * seq);
        let shape = self.attn_shape(batch, seq, spec.window);
        attention_train_forward(&mut a.attn, &mut a.lse, &a.q, &a.k, &a.v, shape, segs);
        fwd(ModuleKind::O, &a.attn, &mut bufs.proj);
        if layer.norm(NormSlot::AttnOut).is_some() {
            a.o_out.copy_from(&bufs.proj);
        }
        self.residual_add(
            layer,
            NormSlot::AttnOut,
            x,
            &mut bufs.proj,
            &mut bufs.normed,
        );

        a.x_mid.copy_from(x);
        let mlp_in: &[f32] = match layer.norm(NormSlot::MlpIn) {
            Some(w) => {
                self.norm_forward(&mut bufs.normed, x, w);
                &bufs.normed
            }
            None => x,
        };
        a.up.fit(n * inter);
        match &layer.mlp {
            MlpWeights::Gated { .. } => {
                a.gate.fit(n * inter);
                fwd(ModuleKind::Gate, mlp_in, &mut a.gate);
                fwd(ModuleKind::Up, mlp_in, &mut a.up);
                gated_act_forward(b.act, &mut bufs.act, &a.gate, &a.up);
            }
            MlpWeights::GatedFused(_) => {
                a.gate.fit(n * inter);
                bufs.fused.fit(n * 2 * inter);
                fwd(ModuleKind::GateUp, mlp_in, &mut bufs.fused);
                split_rows(&bufs.fused, &[inter, inter], &mut [&mut a.gate, &mut a.up]);
                gated_act_forward(b.act, &mut bufs.act, &a.gate, &a.up);
            }
            MlpWeights::Plain { .. } => {
                fwd(ModuleKind::Up, mlp_in, &mut a.up);
                act_forward(b.act, &mut bufs.act, &a.up);
            }
        }
        fwd(ModuleKind::Down, &bufs.act, &mut bufs.proj);
        if layer.norm(NormSlot::MlpOut).is_some() {
            a.d_out.copy_from(&bufs.proj);
        }
        self.residual_add(layer, NormSlot::MlpOut, x, &mut bufs.proj, &mut bufs.normed);
    }

    /// Backward pass: given dx = ∂loss/∂x_final [N, hidden], accumulates the adapter's
    /// gradients into `grads`. `dx` is used as a work buffer.
    pub fn train_backward(
        &self,
        dx: &mut [f32],
        acts: &Activations,
        adapter: &Adapter,
        dropout: Dropout,
        grads: &mut LoraGrads,
    ) -> Result<()> {
        self.backward(dx, acts, Some((adapter, grads)), None, dropout)
    }

    /// Backward pass of full fine-tuning: given dx = ∂loss/∂x_final [N, hidden], accumulates the
    /// gradient of every layer weight, norm and the embedding into `grads` (the final norm and
    /// the LM head get theirs from `lm_head_loss`). `dx` is used as a work buffer.
    pub fn train_backward_full(
        &self,
        dx: &mut [f32],
        acts: &Activations,
        grads: &mut FullGrads,
    ) -> Result<()> {
        self.backward(dx, acts, None, Some(grads), Dropout::NONE)
    }

    /// d_in (+)= ∂/∂x of the norm at `slot` applied to x, given the gradient dy of its output;
    /// in full fine-tuning also the norm weight's gradient.  x, dy, d_in: [rows, w.len()].
    #[allow(clippy::too_many_arguments)]
    fn norm_backward(
        &self,
        layer: &Layer,
        slot: NormSlot,
        grads: Option<&mut Vec<(NormSlot, Norm)>>,
        x: &[f32],
        dy: &[f32],
        d_in: &mut [f32],
        accumulate: bool,
    ) {
        let Some(w) = layer.norm(slot) else {
            return;
        };
        let eps = self.config.rms_norm_eps;
        let g = grads.and_then(|g| g.iter_mut().find(|(s, _)| *s == slot));
        match self.config.block.norm {
            NormKind::Rms { offset } => {
                if let Some((_, g)) = g {
                    rms_norm_weight_grad(&mut g.weight, x, dy, eps);
                }
                rms_norm_backward(d_in, x, w.weight, offset, dy, eps, accumulate);
            }
            NormKind::Layer => {
                if let Some((_, g)) = g {
                    layer_norm_weight_grad(&mut g.weight, x, dy, eps);
                    if let Some(db) = &mut g.bias {
                        bias_grad(db, dy);
                    }
                }
                layer_norm_backward(d_in, x, w.weight, dy, eps, accumulate);
            }
        }
    }

    fn backward(
        &self,
        dx: &mut [f32],
        acts: &Activations,
        lora: Option<(&Adapter, &mut LoraGrads)>,
        mut full: Option<&mut FullGrads>,
        dropout: Dropout,
    ) -> Result<()> {
        let c = &self.config;
        let b = &c.block;
        let (batch, seq) = (acts.batch, acts.seq);
        let segs = &acts.segments;
        let n = batch * seq;
        let (h, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        if dx.len() != n * h || acts.layers.len() != c.num_layers {
            return Err(Error::Invalid(
                "backward called without a matching forward".into(),
            ));
        }
        let mut guard = acts.work.lock().unwrap_or_else(PoisonError::into_inner);
        let Work {
            fwd: fwd_bufs,
            bwd,
            recomputed: work,
            x_work,
        } = &mut *guard;
        // Each of these is overwritten in full (a product or kernel with accumulate = false
        // comes first) before it is read: sized, never cleared.
        let d_act = bwd.d_act.fit(n * inter);
        // Sized where used: a fused gate_up writes its gradient straight into fused rows.
        let (d_gate, d_up) = (&mut bwd.d_gate, &mut bwd.d_up);
        let d_n = bwd.d_n.fit(n * h);
        let d_attn = bwd.d_attn.fit(n * qd);
        let (dq, dk) = (&mut bwd.dq, &mut bwd.dk);
        dq.fit(n * qd);
        dk.fit(n * kvd);
        let dv = bwd.dv.fit(n * kvd);
        let d_raw = &mut bwd.d_raw;

        let (adapter, mut lora_grads) = match lora {
            Some((a, g)) => (Some(a), Some(g)),
            None => (None, None),
        };
        let mut full_layers = full.as_deref_mut().map(|f| f.layers.iter_mut().rev());
        for li in (0..c.num_layers).rev() {
            let (layer, spec) = (&self.layers[li], &c.layers[li]);
            let a: &LayerActs = if acts.recompute {
                x_work.copy_from(&acts.layers[li].x_in);
                self.train_layer_forward(
                    li, x_work, work, batch, seq, segs, adapter, dropout, fwd_bufs,
                );
                &*work
            } else {
                &acts.layers[li]
            };
            // The forward's work buffers hold nothing the backward reads (a recomputed layer
            // is in `work`) and have the backward's shapes, so they serve it too: the
            // recomputed activation and normed inputs, a sub-layer norm's input gradient, the
            // fused projections' output gradient and the LoRA scratch.
            let FwdBufs {
                proj,
                normed,
                act,
                fused: d_fused,
                scratch,
            } = &mut *fwd_bufs;
            let act = act.fit(n * inter);
            let normed = normed.fit(n * h);
            let d_sub = proj.fit(n * h);
            let id = |k: ModuleKind| ModuleId {
                layer: li,
                kind: c.adapter_kind(k),
            };
            // Whether the backward of linear `k` reads its input x: for dW (full fine-tuning)
            // or its adapter's dA.
            let full_ft = full_layers.is_some();
            let wants_x = |k: ModuleKind| {
                layer.linear(k).is_some()
                    && (full_ft || adapter.is_some_and(|ad| ad.modules.contains_key(&id(k))))
            };
            // Split borrows: each module's (weights, saved xa, grads).
            let mut g = lora_grads
                .iter_mut()
                .flat_map(|g| g.modules.iter_mut())
                .filter(|(m, _)| m.layer == li)
                .map(|(m, g)| (m.kind, g))
                .collect::<BTreeMap<_, _>>();
            let mut lora = |k: ModuleKind| -> LoraBackward<'_> {
                let w = adapter?.modules.get(&id(k))?;
                let xa = a.xa.get(&k)?;
                let gr = g.remove(&id(k).kind)?;
                Some((w, &xa[..], gr))
            };
            let (mut norm_grads, mut weight_grads) =
                match full_layers.as_mut().and_then(|it| it.next()) {
                    Some(LayerGrads { norms, linears }) => (
                        Some(norms),
                        linears.iter_mut().map(|(k, g)| (*k, g)).collect(),
                    ),
                    None => (None, BTreeMap::new()),
                };
            // dx (+)= dy·W of this block's linear layer `kind`, plus its adapter's dA, dB (LoRA)
            // or its dW, db (full fine-tuning).
            let mut bwd =
                |kind: ModuleKind, input: &[f32], dy: &[f32], dx: &mut [f32], accumulate: bool| {
                    let Some(lin) = layer.linear(kind) else {
                        return;
                    };
                    let key = dropout.key(id(kind));
                    linear_train_backward(
                        lin,
                        lora(kind),
                        weight_grads.remove(&kind),
                        input,
                        dy,
                        dx,
                        accumulate,
                        dropout,
                        key,
                        scratch,
                    );
                };

            // MLP block: x_out = x_mid + mlp_out_norm(down(act(gate) ⊙ up)).
            let d_down: &[f32] = if layer.norm(NormSlot::MlpOut).is_some() {
                self.norm_backward(
                    layer,
                    NormSlot::MlpOut,
                    norm_grads.as_deref_mut(),
                    &a.d_out,
                    dx,
                    d_sub,
                    false,
                );
                d_sub
            } else {
                dx
            };
            // Recompute the MLP's input and activation first, where a gradient reads them: a
            // frozen projection without an adapter needs only its dy (its x would go to dW or
            // dA), so LoRA on q, v skips both recomputations (an empty x stands for "unused").
            let act_in: &[f32] = if wants_x(ModuleKind::Down) {
                match &layer.mlp {
                    MlpWeights::Plain { .. } => act_forward(b.act, act, &a.up),
                    _ => gated_act_forward(b.act, act, &a.gate, &a.up),
                }
                act
            } else {
                &[]
            };
            let mlp_wants_x = [ModuleKind::Gate, ModuleKind::Up, ModuleKind::GateUp]
                .into_iter()
                .any(wants_x);
            let mlp_in: &[f32] = match layer.norm(NormSlot::MlpIn) {
                Some(w) if mlp_wants_x => {
                    self.norm_forward(normed, &a.x_mid, w);
                    normed
                }
                Some(_) => &[],
                None => &a.x_mid,
            };
            bwd(ModuleKind::Down, act_in, d_down, d_act, false);
            match &layer.mlp {
                MlpWeights::Gated { .. } => {
                    let (d_gate, d_up) = (d_gate.fit(n * inter), d_up.fit(n * inter));
                    gated_act_backward(b.act, d_gate, d_up, &a.gate, &a.up, d_act);
                    bwd(ModuleKind::Gate, mlp_in, d_gate, d_n, false);
                    bwd(ModuleKind::Up, mlp_in, d_up, d_n, true);
                }
                MlpWeights::GatedFused(_) => {
                    // Each row [d gate | d up] computed in place: no [N, intermediate]
                    // buffers for the two halves.
                    let d_fused = d_fused.fit(n * 2 * inter);
                    d_fused
                        .par_chunks_mut(2 * inter)
                        .zip(a.gate.par_chunks(inter))
                        .zip(a.up.par_chunks(inter))
                        .zip(d_act.par_chunks(inter))
                        .for_each(|(((row, gate), up), d)| {
                            let (d_gate, d_up) = row.split_at_mut(inter);
                            gated_act_backward(b.act, d_gate, d_up, gate, up, d);
                        });
                    bwd(ModuleKind::GateUp, mlp_in, d_fused, d_n, false);
                }
                MlpWeights::Plain { .. } => {
                    let d_up = d_up.fit(n * inter);
                    act_backward(b.act, d_up, &a.up, d_act);
                    bwd(ModuleKind::Up, mlp_in, d_up, d_n, false);
                }
            }
            if layer.norm(NormSlot::MlpIn).is_some() {
                self.norm_backward(
                    layer,
                    NormSlot::MlpIn,
                    norm_grads.as_deref_mut(),
                    &a.x_mid,
                    d_n,
                    dx,
                    true,
                );
            } else {
                add_inplace(dx, d_n);
            }

            // Attention block: x_mid = x_in + attn_out_norm(o(attn(rope(qk_norm(q, k)), v))).
            let d_o: &[f32] = if layer.norm(NormSlot::AttnOut).is_some() {
                self.norm_backward(
                    layer,
                    NormSlot::AttnOut,
                    norm_grads.as_deref_mut(),
                    &a.o_out,
                    dx,
                    d_sub,
                    false,
                );
                d_sub
            } else {
                dx
            };
            bwd(ModuleKind::O, &a.attn, d_o, d_attn, false);
            let shape = self.attn_shape(batch, seq, spec.window);
            attention_train_backward(
                dq, dk, dv, d_attn, &a.q, &a.k, &a.v, &a.attn, &a.lse, shape, segs,
            );
            if let Some(rope) = self.ropes.get(spec.rope) {
                for bi in 0..batch {
                    for (start, len) in segs.row(bi, seq) {
                        let rows = bi * seq + start..bi * seq + start + len;
                        let dq = &mut dq[rows.start * qd..rows.end * qd];
                        rope_backward(dq, c.num_heads, hd, 0, rope);
                        let dk = &mut dk[rows.start * kvd..rows.end * kvd];
                        rope_backward(dk, c.num_kv_heads, hd, 0, rope);
                    }
                }
            }
            if b.qk_norm != QkNorm::None {
                for (slot, raw, d) in [
                    (NormSlot::Q, &a.q_raw, &mut *dq),
                    (NormSlot::K, &a.k_raw, &mut *dk),
                ] {
                    d_raw.fit(d.len());
                    self.norm_backward(
                        layer,
                        slot,
                        norm_grads.as_deref_mut(),
                        raw,
                        d,
                        d_raw,
                        false,
                    );
                    std::mem::swap(d, d_raw);
                }
            }
            let attn_wants_x = [ModuleKind::Q, ModuleKind::K, ModuleKind::V, ModuleKind::Qkv]
                .into_iter()
                .any(wants_x);
            let attn_in: &[f32] = match layer.norm(NormSlot::AttnIn) {
                Some(w) if attn_wants_x => {
                    self.norm_forward(normed, &a.x_in, w);
                    normed
                }
                Some(_) => &[],
                None => &a.x_in,
            };
            match &layer.qkv {
                QkvWeights::Separate { .. } => {
                    bwd(ModuleKind::Q, attn_in, dq, d_n, false);
                    bwd(ModuleKind::K, attn_in, dk, d_n, true);
                    bwd(ModuleKind::V, attn_in, dv, d_n, true);
                }
                QkvWeights::Fused(_) => {
                    d_fused.fit(n * (qd + 2 * kvd));
                    join_rows(d_fused, &[qd, kvd, kvd], &[dq, dk, dv]);
                    bwd(ModuleKind::Qkv, attn_in, d_fused, d_n, false);
                }
            }
            if layer.norm(NormSlot::AttnIn).is_some() {
                self.norm_backward(layer, NormSlot::AttnIn, norm_grads, &a.x_in, d_n, dx, true);
            } else {
                add_inplace(dx, d_n);
            }
        }
        if let Some(f) = full {
            // The embedding's output was scaled (Gemma): so is its gradient.
            if let Some(s) = b.embed_scale {
                dx.iter_mut().for_each(|v| *v *= s);
            }
            embedding_backward(&mut f.embed_tokens, dx, &acts.ids, h);
            if let Some(wpe) = &mut f.wpe {
                for bi in 0..batch {
                    for (start, len) in segs.row(bi, seq) {
                        let at = (bi * seq + start) * h;
                        for (g, &d) in wpe.iter_mut().zip(&dx[at..at + len * h]) {
                            *g += d;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// db += Σ_rows dy (a bias's gradient).  dy: [rows, db.len()].
pub fn bias_grad(db: &mut [f32], dy: &[f32]) {
    let n = db.len();
    let mut acc = vec![0.0f64; n];
    for row in dy.chunks_exact(n) {
        for (a, &d) in acc.iter_mut().zip(row) {
            *a += d as f64;
        }
    }
    for (g, a) in db.iter_mut().zip(acc) {
        *g += a as f32;
    }
}

/// dx = dy ⊙ act'(x) (a plain MLP).  x, dy, dx: [N, intermediate].
fn act_backward(act: Activation, dx: &mut [f32], x: &[f32], dy: &[f32]) {
    match act {
        Activation::Silu => {
            for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
                let sig = 1.0 / (1.0 + (-v).exp());
                *d = g * sig * (1.0 + v * (1.0 - sig));
            }
        }
        Activation::GeluTanh => crate::engine::ops::gelu_tanh_backward(dx, x, dy),
    }
}
