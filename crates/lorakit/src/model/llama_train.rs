//! The Llama forward pass for training, which keeps what the backward needs, and the
//! hand-written backward. For LoRA it produces gradients for the adapter tensors only: frozen
//! weights get a dX (to carry the gradient down) but never a dW. For full fine-tuning
//! ([`FullGrads`]) every weight, norm and the embedding also get their gradient.

use std::collections::BTreeMap;

use crate::engine::attention::{attention_train_backward, attention_train_forward, AttnShape};
use crate::engine::matmul;
use crate::engine::ops::{
    add_inplace, embedding_backward, embedding_forward, rms_norm_backward, rms_norm_forward,
    rms_norm_weight_grad, rope_backward, rope_forward, swiglu_backward, swiglu_forward,
};
use crate::error::{Error, Result};
use crate::lora::peft::Adapter;
use crate::lora::{LoraWeights, ModuleId, ModuleKind};
use crate::model::linear::frozen_backward;
use crate::model::llama::Layer;
use crate::model::{Linear, LlamaModel};

/// LoRA dropout on the adapter path: element i of module (layer, kind)'s input is kept with
/// probability 1 − p and scaled by 1/(1 − p). The mask is a hash of (seed, layer, kind, i), so
/// the backward regenerates it instead of storing it.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    pub const NONE: Dropout = Dropout { p: 0.0, seed: 0 };

    fn active(&self) -> bool {
        self.p > 0.0
    }

    pub(crate) fn key(&self, id: ModuleId) -> u64 {
        self.seed ^ ((id.layer as u64) << 40) ^ ((id.kind as u64) << 56)
    }

    /// out = mask ⊙ x / (1 − p).
    fn apply(&self, out: &mut Vec<f32>, x: &[f32], key: u64) {
        let keep_scale = 1.0 / (1.0 - self.p);
        let threshold = (self.p as f64 * u32::MAX as f64) as u32;
        out.clear();
        out.extend(x.iter().enumerate().map(|(i, &v)| {
            if (splitmix64(key.wrapping_add(i as u64)) >> 32) as u32 >= threshold {
                v * keep_scale
            } else {
                0.0
            }
        }));
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Gradients of an adapter's tensors, keyed like `Adapter::modules`: (dA [r, in], dB [out, r]).
#[derive(Debug, Clone, Default)]
pub struct LoraGrads {
    pub modules: BTreeMap<ModuleId, (Vec<f32>, Vec<f32>)>,
}

impl LoraGrads {
    pub fn zeros_like(adapter: &Adapter) -> Self {
        LoraGrads {
            modules: adapter
                .modules
                .iter()
                .map(|(id, w)| (*id, (vec![0.0; w.a.len()], vec![0.0; w.b.len()])))
                .collect(),
        }
    }

    pub fn zero(&mut self) {
        for (a, b) in self.modules.values_mut() {
            a.fill(0.0);
            b.fill(0.0);
        }
    }
}

/// Gradients of every parameter of the model (full fine-tuning), in the model's own layouts.
#[derive(Debug, Clone)]
pub struct FullGrads {
    /// [vocab, hidden]; with a tied LM head it also receives the head's gradient.
    pub embed_tokens: Vec<f32>,
    /// Final norm, [hidden].
    pub norm: Vec<f32>,
    /// [vocab, hidden], when the head is not tied to the embedding.
    pub lm_head: Option<Vec<f32>>,
    pub layers: Vec<LayerGrads>,
}

/// One decoder layer's gradients.
#[derive(Debug, Clone)]
pub struct LayerGrads {
    pub attn_norm: Vec<f32>,
    pub mlp_norm: Vec<f32>,
    /// dW [out, in] and db [out] (biased projections only) of each linear layer.
    pub linears: BTreeMap<ModuleKind, (Vec<f32>, Option<Vec<f32>>)>,
}

impl FullGrads {
    pub fn zeros_like(model: &LlamaModel) -> Self {
        let zeros = |n: usize| vec![0.0f32; n];
        FullGrads {
            embed_tokens: zeros(model.embed_tokens.len()),
            norm: zeros(model.norm.len()),
            lm_head: model.lm_head.as_ref().map(|l| zeros(l.weight_f32().len())),
            layers: model
                .layers
                .iter()
                .map(|l| LayerGrads {
                    attn_norm: zeros(l.attn_norm.len()),
                    mlp_norm: zeros(l.mlp_norm.len()),
                    linears: ModuleKind::ALL
                        .iter()
                        .map(|&k| {
                            let lin = l.linear(k);
                            (
                                k,
                                (
                                    zeros(lin.weight_f32().len()),
                                    lin.bias.as_ref().map(|b| zeros(b.len())),
                                ),
                            )
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Every gradient tensor, in [`LlamaModel::parameters_mut`] order.
    pub fn tensors_mut(&mut self) -> Vec<&mut [f32]> {
        let mut v: Vec<&mut [f32]> = vec![&mut self.embed_tokens];
        for l in &mut self.layers {
            v.push(&mut l.attn_norm);
            v.push(&mut l.mlp_norm);
            for (w, b) in l.linears.values_mut() {
                v.push(w);
                if let Some(b) = b {
                    v.push(b);
                }
            }
        }
        v.push(&mut self.norm);
        if let Some(h) = &mut self.lm_head {
            v.push(h);
        }
        v
    }

    pub fn zero(&mut self) {
        for t in self.tensors_mut() {
            t.fill(0.0);
        }
    }
}

/// One parameter tensor of the model, for the optimiser of full fine-tuning.
pub struct Parameter<'a> {
    /// The HF name (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// Weight decay applies (matrices and embeddings; not norms or biases, as HF's Trainer).
    pub decay: bool,
    pub data: &'a mut [f32],
}

impl LlamaModel {
    /// Every trainable tensor, in the order of [`FullGrads::tensors_mut`].
    pub fn parameters_mut(&mut self) -> Vec<Parameter<'_>> {
        // Quantised copies would go stale once the weights move.
        self.head_quant = None;
        fn p(name: String, decay: bool, data: &mut [f32]) -> Parameter<'_> {
            Parameter { name, decay, data }
        }
        // ModuleKind::ALL is in ModuleKind's order, which is FullGrads' BTreeMap order.
        let mut v = vec![p(
            "model.embed_tokens.weight".into(),
            true,
            &mut self.embed_tokens,
        )];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let pre = format!("model.layers.{i}");
            let Layer {
                attn_norm,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                mlp_norm,
                gate_proj,
                up_proj,
                down_proj,
            } = l;
            v.push(p(format!("{pre}.input_layernorm.weight"), false, attn_norm));
            v.push(p(
                format!("{pre}.post_attention_layernorm.weight"),
                false,
                mlp_norm,
            ));
            let linears = [
                q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj,
            ];
            for (k, lin) in ModuleKind::ALL.into_iter().zip(linears) {
                let path = ModuleId { layer: i, kind: k }.path();
                let (w, b) = lin.weight_and_bias_mut();
                v.push(p(format!("{path}.weight"), true, w));
                if let Some(b) = b {
                    v.push(p(format!("{path}.bias"), false, b));
                }
            }
        }
        v.push(p("model.norm.weight".into(), false, &mut self.norm));
        if let Some(h) = &mut self.lm_head {
            v.push(p("lm_head.weight".into(), true, h.weight_and_bias_mut().0));
        }
        v
    }
}

/// What one layer's backward needs from its forward. N = batch · seq rows. The normed inputs of
/// the projections and silu(gate) ⊙ up are cheap to recompute, so the backward does that
/// instead of keeping them (a third less activation memory).
#[derive(Debug, Default)]
struct LayerActs {
    /// Residual stream entering the layer, [N, hidden].
    x_in: Vec<f32>,
    /// After RoPE: [N, heads·hd], [N, kv·hd]; v: [N, kv·hd].
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output, the input of o_proj, [N, heads·hd].
    attn: Vec<f32>,
    /// [batch, heads, seq]
    lse: Vec<f32>,
    /// Residual stream after the attention block, [N, hidden].
    x_mid: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// x·Aᵀ (after dropout) of each adapted module, [N, r].
    xa: BTreeMap<ModuleKind, Vec<f32>>,
}

/// Saved activations of a whole forward pass, reused across steps (buffers grow once).
#[derive(Debug, Default)]
pub struct Activations {
    layers: Vec<LayerActs>,
    /// Residual stream after the last layer (before the final norm), [N, hidden].
    pub x_final: Vec<f32>,
    /// The batch's token ids, [N] (for the embedding's gradient).
    ids: Vec<u32>,
    pub batch: usize,
    pub seq: usize,
}

impl Activations {
    /// Bytes held by the saved activations (for the memory report).
    pub fn bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|a| {
                [
                    &a.x_in, &a.q, &a.k, &a.v, &a.attn, &a.lse, &a.x_mid, &a.gate, &a.up,
                ]
                .iter()
                .map(|v| v.len())
                .sum::<usize>()
                    + a.xa.values().map(Vec::len).sum::<usize>()
            })
            .sum();
        (l + self.x_final.len()) * 4
    }
}

fn set_len(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

/// An adapted module's weights, its saved x·Aᵀ and its (dA, dB) accumulators.
pub(crate) type LoraBackward<'a> =
    Option<(&'a LoraWeights, &'a [f32], &'a mut (Vec<f32>, Vec<f32>))>;

/// y = x Wᵀ + b (+ s·(dropout(x) Aᵀ) Bᵀ, keeping dropout(x) Aᵀ in `xa`).  x: [N, in], y: [N, out].
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_train_forward(
    lin: &Linear,
    lora: Option<&LoraWeights>,
    x: &[f32],
    y: &mut [f32],
    xa: Option<&mut Vec<f32>>,
    dropout: Dropout,
    key: u64,
    scratch: &mut Vec<f32>,
) {
    lin.forward_base(y, x);
    if let (Some(lora), Some(xa)) = (lora, xa) {
        let n = x.len() / lin.in_features;
        set_len(xa, n * lora.r);
        let x_lora: &[f32] = if dropout.active() {
            dropout.apply(scratch, x, key);
            scratch
        } else {
            x
        };
        crate::model::linear::lora_forward(
            y,
            x_lora,
            lora,
            xa,
            n,
            lin.in_features,
            lin.out_features,
        );
    }
}

/// A linear layer's (dW [out, in], db [out]) accumulators in full fine-tuning.
pub(crate) type WeightGrads<'a> = Option<&'a mut (Vec<f32>, Option<Vec<f32>>)>;

/// dx (+)= dy·W (+ the adapter path's share); dA += s·(dy B)ᵀ·dropout(x); dB += s·dyᵀ·xa;
/// in full fine-tuning also dW += dyᵀ·x and db += Σ_rows dy.
///
/// x: [N, in] (the forward's input), dy: [N, out], dx: [N, in], xa: [N, r].
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_train_backward(
    lin: &Linear,
    lora: LoraBackward<'_>,
    weight_grads: WeightGrads<'_>,
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    accumulate: bool,
    dropout: Dropout,
    key: u64,
    scratch: &mut Vec<f32>,
) {
    let (n, inp, out) = (
        dy.len() / lin.out_features,
        lin.in_features,
        lin.out_features,
    );
    if let Some((dw, db)) = weight_grads {
        matmul(dw, dy, true, x, false, out, n, inp, true);
        if let Some(db) = db {
            for row in dy.chunks_exact(out) {
                for (g, &d) in db.iter_mut().zip(row) {
                    *g += d;
                }
            }
        }
    }
    frozen_backward(
        dx,
        dy,
        lin.weight_f32(),
        lin.bf16.as_deref(),
        n,
        inp,
        out,
        accumulate,
    );
    let Some((w, xa, (da, db))) = lora else {
        return;
    };
    let r = w.r;
    // g = s · dy B: [N, r]
    let mut g = vec![0.0f32; n * r];
    matmul(&mut g, dy, false, &w.b, false, n, out, r, false);
    g.iter_mut().for_each(|v| *v *= w.scale);
    // dB += s · dyᵀ xa: [out, r]
    let xa_s: Vec<f32> = xa.iter().map(|v| v * w.scale).collect();
    matmul(db, dy, true, &xa_s, false, out, n, r, true);
    // dA += gᵀ dropout(x): [r, in]
    let x_lora: &[f32] = if dropout.active() {
        dropout.apply(scratch, x, key);
        scratch
    } else {
        x
    };
    matmul(da, &g, true, x_lora, false, r, n, inp, true);
    // dx += dropout'(g A): [N, in]
    if dropout.active() {
        let mut gx = vec![0.0f32; n * inp];
        matmul(&mut gx, &g, false, &w.a, false, n, r, inp, false);
        // The mask (scaled by 1/(1-p)) is scratch / x where x ≠ 0; recompute it from the hash.
        let mut ones = Vec::new();
        dropout.apply(&mut ones, &vec![1.0f32; n * inp], key);
        for ((d, gv), m) in dx.iter_mut().zip(&gx).zip(&ones) {
            *d += gv * m;
        }
    } else {
        matmul(dx, &g, false, &w.a, false, n, r, inp, true);
    }
}

impl LlamaModel {
    fn check_trainable(&self, adapter: Option<&Adapter>) -> Result<()> {
        if self.layers.iter().any(|l| {
            ModuleKind::ALL
                .iter()
                .any(|&k| !l.linear(k).loras.is_empty())
        }) {
            return Err(Error::Invalid(
                "training needs a model without attached adapters (merge them first, or pass the adapter to train as the initial adapter)".into(),
            ));
        }
        if let Some(a) = adapter {
            crate::model::llama::check_llama_modules(a)?;
            for id in a.modules.keys() {
                if id.layer >= self.layers.len() {
                    return Err(Error::Invalid(format!(
                        "adapter module {} is outside this model",
                        id.path()
                    )));
                }
            }
        }
        Ok(())
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
        let c = &self.config;
        self.check_trainable(adapter)?;
        if ids.len() != batch * seq || ids.is_empty() {
            return Err(Error::Invalid(format!(
                "batch of {} ids is not {batch} × {seq}",
                ids.len()
            )));
        }
        if seq > self.rope.max_positions() {
            return Err(Error::Invalid(format!(
                "sequence length {seq} exceeds the model's context of {}",
                self.rope.max_positions()
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                c.vocab_size
            )));
        }
        let n = batch * seq;
        let (h, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
        let shape = AttnShape {
            batch,
            seq,
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: hd,
        };
        acts.batch = batch;
        acts.seq = seq;
        acts.ids.clear();
        acts.ids.extend_from_slice(ids);
        acts.layers.resize_with(c.num_layers, LayerActs::default);
        let mut x = std::mem::take(&mut acts.x_final);
        set_len(&mut x, n * h);
        embedding_forward(&mut x, &self.embed_tokens, ids, h);
        let mut proj = vec![0.0f32; n * h];
        let mut normed = vec![0.0f32; n * h];
        let mut act = vec![0.0f32; n * inter];
        let mut scratch = Vec::new();

        for (li, (layer, a)) in self.layers.iter().zip(acts.layers.iter_mut()).enumerate() {
            let lora = |k: ModuleKind| {
                adapter.and_then(|ad| ad.modules.get(&ModuleId { layer: li, kind: k }))
            };
            // Prepare the xa slots of this layer's adapted modules.
            a.xa.retain(|k, _| lora(*k).is_some());
            for k in ModuleKind::ALL {
                if lora(k).is_some() {
                    a.xa.entry(k).or_default();
                }
            }
            // One adapted-or-frozen linear layer of this block, by kind.
            let mut fwd = |kind: ModuleKind, input: &[f32], out: &mut [f32]| {
                let id = ModuleId { layer: li, kind };
                let lora = adapter.and_then(|ad| ad.modules.get(&id));
                let xa = a.xa.get_mut(&kind);
                linear_train_forward(
                    layer.linear(kind),
                    lora,
                    input,
                    out,
                    xa,
                    dropout,
                    dropout.key(id),
                    &mut scratch,
                );
            };
            a.x_in.clear();
            a.x_in.extend_from_slice(&x);
            rms_norm_forward(&mut normed, &x, &layer.attn_norm, c.rms_norm_eps);
            set_len(&mut a.q, n * qd);
            set_len(&mut a.k, n * kvd);
            set_len(&mut a.v, n * kvd);
            fwd(ModuleKind::Q, &normed, &mut a.q);
            fwd(ModuleKind::K, &normed, &mut a.k);
            fwd(ModuleKind::V, &normed, &mut a.v);
            for b in 0..batch {
                rope_forward(
                    &mut a.q[b * seq * qd..(b + 1) * seq * qd],
                    c.num_heads,
                    hd,
                    0,
                    &self.rope,
                );
                rope_forward(
                    &mut a.k[b * seq * kvd..(b + 1) * seq * kvd],
                    c.num_kv_heads,
                    hd,
                    0,
                    &self.rope,
                );
            }
            set_len(&mut a.attn, n * qd);
            set_len(&mut a.lse, batch * c.num_heads * seq);
            attention_train_forward(&mut a.attn, &mut a.lse, &a.q, &a.k, &a.v, shape);
            fwd(ModuleKind::O, &a.attn, &mut proj);
            add_inplace(&mut x, &proj);

            a.x_mid.clear();
            a.x_mid.extend_from_slice(&x);
            rms_norm_forward(&mut normed, &x, &layer.mlp_norm, c.rms_norm_eps);
            set_len(&mut a.gate, n * inter);
            set_len(&mut a.up, n * inter);
            fwd(ModuleKind::Gate, &normed, &mut a.gate);
            fwd(ModuleKind::Up, &normed, &mut a.up);
            swiglu_forward(&mut act, &a.gate, &a.up);
            fwd(ModuleKind::Down, &act, &mut proj);
            add_inplace(&mut x, &proj);
        }
        acts.x_final = x;
        Ok(())
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

    fn backward(
        &self,
        dx: &mut [f32],
        acts: &Activations,
        lora: Option<(&Adapter, &mut LoraGrads)>,
        mut full: Option<&mut FullGrads>,
        dropout: Dropout,
    ) -> Result<()> {
        let c = &self.config;
        let (batch, seq) = (acts.batch, acts.seq);
        let n = batch * seq;
        let (h, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
        if dx.len() != n * h || acts.layers.len() != c.num_layers {
            return Err(Error::Invalid(
                "backward called without a matching forward".into(),
            ));
        }
        let shape = AttnShape {
            batch,
            seq,
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: hd,
        };
        let mut d_act = vec![0.0f32; n * inter];
        let mut d_gate = vec![0.0f32; n * inter];
        let mut d_up = vec![0.0f32; n * inter];
        let mut d_n = vec![0.0f32; n * h];
        let mut d_attn = vec![0.0f32; n * qd];
        let mut dq = vec![0.0f32; n * qd];
        let mut dk = vec![0.0f32; n * kvd];
        let mut dv = vec![0.0f32; n * kvd];
        let mut normed = vec![0.0f32; n * h];
        let mut act = vec![0.0f32; n * inter];
        let mut scratch = Vec::new();

        let (adapter, mut lora_grads) = match lora {
            Some((a, g)) => (Some(a), Some(g)),
            None => (None, None),
        };
        let mut full_layers = full.as_deref_mut().map(|f| f.layers.iter_mut().rev());
        for (li, (layer, a)) in self.layers.iter().zip(&acts.layers).enumerate().rev() {
            let id = |k: ModuleKind| ModuleId { layer: li, kind: k };
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
                let gr = g.remove(&k)?;
                Some((w, xa.as_slice(), gr))
            };
            let layer_grads = full_layers.as_mut().and_then(|it| it.next());
            let (mut norm_grads, mut weight_grads) = match layer_grads {
                Some(lg) => (
                    Some((&mut lg.attn_norm, &mut lg.mlp_norm)),
                    lg.linears.iter_mut().map(|(k, g)| (*k, g)).collect(),
                ),
                None => (None, BTreeMap::new()),
            };
            // dx (+)= dy·W of this block's linear layer `kind`, plus its adapter's dA, dB (LoRA)
            // or its dW, db (full fine-tuning).
            let mut bwd =
                |kind: ModuleKind, input: &[f32], dy: &[f32], dx: &mut [f32], accumulate: bool| {
                    let key = dropout.key(id(kind));
                    linear_train_backward(
                        layer.linear(kind),
                        lora(kind),
                        weight_grads.remove(&kind),
                        input,
                        dy,
                        dx,
                        accumulate,
                        dropout,
                        key,
                        &mut scratch,
                    );
                };

            // MLP block: x_out = x_mid + down(silu(gate) ⊙ up). Recompute its inputs first.
            swiglu_forward(&mut act, &a.gate, &a.up);
            rms_norm_forward(&mut normed, &a.x_mid, &layer.mlp_norm, c.rms_norm_eps);
            bwd(ModuleKind::Down, &act, dx, &mut d_act, false);
            swiglu_backward(&mut d_gate, &mut d_up, &a.gate, &a.up, &d_act);
            bwd(ModuleKind::Gate, &normed, &d_gate, &mut d_n, false);
            bwd(ModuleKind::Up, &normed, &d_up, &mut d_n, true);
            if let Some((_, d_mlp_norm)) = norm_grads.as_mut() {
                rms_norm_weight_grad(d_mlp_norm, &a.x_mid, &d_n, c.rms_norm_eps);
            }
            rms_norm_backward(dx, &a.x_mid, &layer.mlp_norm, &d_n, c.rms_norm_eps, true);

            // Attention block: x_mid = x_in + o(attn(rope(q), rope(k), v)).
            rms_norm_forward(&mut normed, &a.x_in, &layer.attn_norm, c.rms_norm_eps);
            bwd(ModuleKind::O, &a.attn, dx, &mut d_attn, false);
            attention_train_backward(
                &mut dq, &mut dk, &mut dv, &d_attn, &a.q, &a.k, &a.v, &a.attn, &a.lse, shape,
            );
            for b in 0..batch {
                rope_backward(
                    &mut dq[b * seq * qd..(b + 1) * seq * qd],
                    c.num_heads,
                    hd,
                    0,
                    &self.rope,
                );
                rope_backward(
                    &mut dk[b * seq * kvd..(b + 1) * seq * kvd],
                    c.num_kv_heads,
                    hd,
                    0,
                    &self.rope,
                );
            }
            bwd(ModuleKind::Q, &normed, &dq, &mut d_n, false);
            bwd(ModuleKind::K, &normed, &dk, &mut d_n, true);
            bwd(ModuleKind::V, &normed, &dv, &mut d_n, true);
            if let Some((d_attn_norm, _)) = norm_grads.as_mut() {
                rms_norm_weight_grad(d_attn_norm, &a.x_in, &d_n, c.rms_norm_eps);
            }
            rms_norm_backward(dx, &a.x_in, &layer.attn_norm, &d_n, c.rms_norm_eps, true);
        }
        if let Some(f) = full {
            embedding_backward(&mut f.embed_tokens, dx, &acts.ids, h);
        }
        Ok(())
    }
}
