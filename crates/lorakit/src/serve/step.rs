//! One decode step for a batch of sequences, each with its own KV cache, position and adapter.
//!
//! It runs the decoder's block exactly as [`Decoder::forward`] runs it for one new token, with
//! one change: the frozen-weight products take all rows at once ([`matmul_rows_dot`], one pass
//! over each weight per step), and the adapter products take the rows of each adapter at once.
//!
//! Batch invariance (every row identical to `lorakit generate` alone, greedy or seeded):
//! - products: `matmul_rows_dot` computes each element with the `dot` call that the one-row
//!   decode path (`matmul_nt` with m = 1 → `matvec_rows`) makes; adapter products x·Aᵀ and
//!   (s·x·Aᵀ)·Bᵀ go through the same kernel, and the bias and adapter terms are added in
//!   `Linear::forward`'s order (base, bias, then y + s·(x·Aᵀ)·Bᵀ);
//! - everything else (norms, q/k norms, RoPE, attention, activations, residuals, the final norm)
//!   is called on one row's slice at a time: the element-wise kernels vectorise in 16-lane blocks
//!   with a scalar tail and split work into tasks by element count, so on a [B, n] buffer an
//!   element's arithmetic could depend on where its row starts;
//! - the bf16 and GGUF-block paths have no batched kernel here and run row by row.

use crate::engine::batched::matmul_rows_dot;
use crate::engine::ops::{attention_forward, rope_forward};
use crate::error::{Error, Result};
use crate::lora::{LoraWeights, ModuleId, ModuleKind};
use crate::model::arch::NormSlot;
use crate::model::decoder::{
    act_forward, gated_act_forward, split_rows, Decoder, Layer, MlpWeights, QkvWeights,
};
use crate::model::kv_cache::{store_kv, KvCache};
use crate::model::linear::Linear;

use super::ServeAdapter;

/// One sequence in a decode step: the token to run, its cache (the token goes at position
/// `cache.len`), and its adapter (None = the base model).
pub struct StepRow<'a> {
    pub token: u32,
    pub cache: &'a mut KvCache,
    pub adapter: Option<&'a ServeAdapter>,
}

/// Runs one token for every row and appends its keys/values to the row's cache.
/// Returns logits [rows, vocab].
pub fn decode_step(model: &Decoder, rows: &mut [StepRow<'_>]) -> Result<Vec<f32>> {
    let c = &model.config;
    let n = rows.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let ids: Vec<u32> = rows.iter().map(|r| r.token).collect();
    model.check_ids(&ids)?;
    for r in rows.iter() {
        if r.cache.len + 1 > r.cache.capacity || r.cache.layers.len() != model.layers.len() {
            return Err(Error::Invalid(format!(
                "{} tokens exceed the cache capacity of {} positions",
                r.cache.len + 1,
                r.cache.capacity
            )));
        }
    }
    let (h, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
    let starts: Vec<usize> = rows.iter().map(|r| r.cache.len).collect();

    let mut x = vec![0.0f32; n * h];
    for (i, &id) in ids.iter().enumerate() {
        model.embed(&mut x[i * h..(i + 1) * h], &[id], starts[i], 1);
    }
    let mut normed = vec![0.0f32; n * h];
    let mut q = vec![0.0f32; n * q_dim];
    let mut k = vec![0.0f32; n * kv_dim];
    let mut v = vec![0.0f32; n * kv_dim];
    let mut attn = vec![0.0f32; n * q_dim];
    let mut proj = vec![0.0f32; n * h];
    let mut gate = vec![0.0f32; n * inter];
    let mut up = vec![0.0f32; n * inter];
    let mut act = vec![0.0f32; n * inter];
    let (mut fused, mut tmp) = (Vec::new(), Vec::new());
    let groups = adapter_groups(rows);

    for (li, (layer, spec)) in model.layers.iter().zip(&c.layers).enumerate() {
        let lin = |l: &Linear, role: ModuleKind, y: &mut [f32], x: &[f32]| {
            linear_rows(model, l, li, role, y, x, n, &groups)
        };
        // Attention block.
        let a: &[f32] = match layer.norm(NormSlot::AttnIn) {
            Some(w) => {
                for i in 0..n {
                    model.norm_forward(&mut normed[i * h..(i + 1) * h], &x[i * h..(i + 1) * h], w);
                }
                &normed
            }
            None => &x,
        };
        match &layer.qkv {
            QkvWeights::Separate {
                q: qp,
                k: kp,
                v: vp,
            } => {
                lin(qp, ModuleKind::Q, &mut q, a);
                lin(kp, ModuleKind::K, &mut k, a);
                lin(vp, ModuleKind::V, &mut v, a);
            }
            QkvWeights::Fused(l) => {
                fused.resize(n * (q_dim + 2 * kv_dim), 0.0);
                lin(l, ModuleKind::Qkv, &mut fused, a);
                split_rows(
                    &fused,
                    &[q_dim, kv_dim, kv_dim],
                    &mut [&mut q, &mut k, &mut v],
                );
            }
        }
        for (i, row) in rows.iter_mut().enumerate() {
            let qi = &mut q[i * q_dim..(i + 1) * q_dim];
            let ki = &mut k[i * kv_dim..(i + 1) * kv_dim];
            let vi = &v[i * kv_dim..(i + 1) * kv_dim];
            model.qk_norm(layer, NormSlot::Q, qi, &mut tmp);
            model.qk_norm(layer, NormSlot::K, ki, &mut tmp);
            if let Some(rope) = model.ropes.get(spec.rope) {
                rope_forward(qi, c.num_heads, hd, starts[i], rope);
                rope_forward(ki, c.num_kv_heads, hd, starts[i], rope);
            }
            let cap = row.cache.capacity;
            let kv = &mut row.cache.layers[li];
            store_kv(kv, ki, vi, c.num_kv_heads, hd, cap, starts[i]);
            attention_forward(
                &mut attn[i * q_dim..(i + 1) * q_dim],
                qi,
                kv,
                cap,
                c.num_heads,
                c.num_kv_heads,
                hd,
                starts[i],
                c.block.attn_scale,
                spec.window,
            );
        }
        lin(&layer.o_proj, ModuleKind::O, &mut proj, &attn);
        residual_rows(
            model,
            layer,
            NormSlot::AttnOut,
            &mut x,
            &mut proj,
            &mut normed,
            h,
        );

        // MLP block.
        let m: &[f32] = match layer.norm(NormSlot::MlpIn) {
            Some(w) => {
                for i in 0..n {
                    model.norm_forward(&mut normed[i * h..(i + 1) * h], &x[i * h..(i + 1) * h], w);
                }
                &normed
            }
            None => &x,
        };
        let act_rows = |act: &mut [f32], gate: &[f32], up: &[f32]| {
            for i in 0..n {
                let r = i * inter..(i + 1) * inter;
                gated_act_forward(c.block.act, &mut act[r.clone()], &gate[r.clone()], &up[r]);
            }
        };
        match &layer.mlp {
            MlpWeights::Gated { gate: g, up: u } => {
                lin(g, ModuleKind::Gate, &mut gate, m);
                lin(u, ModuleKind::Up, &mut up, m);
                act_rows(&mut act, &gate, &up);
            }
            MlpWeights::GatedFused(l) => {
                fused.resize(2 * n * inter, 0.0);
                lin(l, ModuleKind::GateUp, &mut fused, m);
                split_rows(&fused, &[inter, inter], &mut [&mut gate, &mut up]);
                act_rows(&mut act, &gate, &up);
            }
            MlpWeights::Plain { up: u } => {
                lin(u, ModuleKind::Up, &mut up, m);
                for i in 0..n {
                    let r = i * inter..(i + 1) * inter;
                    act_forward(c.block.act, &mut act[r.clone()], &up[r]);
                }
            }
        }
        lin(&layer.down_proj, ModuleKind::Down, &mut proj, &act);
        residual_rows(
            model,
            layer,
            NormSlot::MlpOut,
            &mut x,
            &mut proj,
            &mut normed,
            h,
        );
    }
    for r in rows.iter_mut() {
        r.cache.len += 1;
    }

    let mut final_normed = vec![0.0f32; n * h];
    for i in 0..n {
        model.norm_forward(
            &mut final_normed[i * h..(i + 1) * h],
            &x[i * h..(i + 1) * h],
            model.final_norm(),
        );
    }
    let vocab = c.vocab_size;
    let mut logits = vec![0.0f32; n * vocab];
    let quant = match &model.lm_head {
        Some(l) => l.quant.is_some(),
        None => model.head_quant.is_some(),
    };
    let (w, bf16) = model.head_weight();
    if quant || bf16.is_some() {
        for i in 0..n {
            model.head_forward(
                &mut logits[i * vocab..(i + 1) * vocab],
                &final_normed[i * h..(i + 1) * h],
                1,
            );
        }
    } else {
        matmul_rows_dot(&mut logits, &final_normed, w, n, h, vocab);
        // As Decoder::head_forward: Gemma's final soft-capping, cap · tanh(z / cap).
        if let Some(cap) = c.final_logit_softcap {
            logits.iter_mut().for_each(|z| *z = cap * (*z / cap).tanh());
        }
    }
    Ok(logits)
}

/// Rows grouped by adapter: (the adapter, the indices of its rows), base rows (None) included.
type Groups<'a> = Vec<(Option<&'a ServeAdapter>, Vec<usize>)>;

fn adapter_groups<'a>(rows: &[StepRow<'a>]) -> Groups<'a> {
    let mut groups: Groups<'a> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let same = |g: &Option<&ServeAdapter>| match (g, r.adapter) {
            (None, None) => true,
            (Some(a), Some(b)) => std::ptr::eq(*a, b),
            _ => false,
        };
        match groups.iter_mut().find(|(g, _)| same(g)) {
            Some((_, idx)) => idx.push(i),
            None => groups.push((r.adapter, vec![i])),
        }
    }
    groups
}

/// y = x Wᵀ + b + (each row's adapter) s·(x Aᵀ) Bᵀ.  x: [n, in] → y: [n, out].
#[allow(clippy::too_many_arguments)]
fn linear_rows(
    model: &Decoder,
    lin: &Linear,
    layer: usize,
    role: ModuleKind,
    y: &mut [f32],
    x: &[f32],
    n: usize,
    groups: &Groups<'_>,
) {
    let (inp, out) = (lin.in_features, lin.out_features);
    if lin.quant.is_some() || lin.bf16.is_some() {
        for i in 0..n {
            lin.forward_base(&mut y[i * out..(i + 1) * out], &x[i * inp..(i + 1) * inp]);
        }
    } else {
        matmul_rows_dot(y, x, lin.weight_f32(), n, inp, out);
        if let Some(b) = &lin.bias {
            for row in y.chunks_exact_mut(out) {
                for (yi, bi) in row.iter_mut().zip(b) {
                    *yi += bi;
                }
            }
        }
    }
    // Adapters attached to the base itself apply to every row (the server attaches none).
    let all: Vec<usize> = (0..n).collect();
    for lora in &lin.loras {
        lora_rows(y, x, lora, &all, inp, out);
    }
    let kind = model.config.adapter_kind(role);
    for (adapter, idx) in groups {
        if let Some(lora) = adapter.and_then(|a| a.module(ModuleId { layer, kind })) {
            lora_rows(y, x, lora, idx, inp, out);
        }
    }
}

/// y[i] += s · (x[i] Aᵀ) Bᵀ for the rows `idx`, as `lora_forward` does for one row: xa = x·Aᵀ,
/// scaled by s, then y + (s·xa)·Bᵀ.  x: [n, in], y: [n, out], A: [r, in], B: [out, r].
fn lora_rows(y: &mut [f32], x: &[f32], lora: &LoraWeights, idx: &[usize], inp: usize, out: usize) {
    let g = idx.len();
    let r = lora.r;
    let mut xs = Vec::with_capacity(g * inp);
    for &i in idx {
        xs.extend_from_slice(&x[i * inp..(i + 1) * inp]);
    }
    let mut xa = vec![0.0f32; g * r];
    matmul_rows_dot(&mut xa, &xs, &lora.a, g, inp, r);
    xa.iter_mut().for_each(|v| *v *= lora.scale);
    let mut d = vec![0.0f32; g * out];
    matmul_rows_dot(&mut d, &xa, &lora.b, g, r, out);
    for (j, &i) in idx.iter().enumerate() {
        for (yi, di) in y[i * out..(i + 1) * out]
            .iter_mut()
            .zip(&d[j * out..(j + 1) * out])
        {
            *yi += di;
        }
    }
}

/// x += out_norm(y) per row (see [`Decoder::residual_add`]).  x, y, scratch: [n, hidden].
fn residual_rows(
    model: &Decoder,
    layer: &Layer,
    slot: NormSlot,
    x: &mut [f32],
    y: &mut [f32],
    scratch: &mut [f32],
    h: usize,
) {
    for ((xi, yi), si) in x
        .chunks_exact_mut(h)
        .zip(y.chunks_exact_mut(h))
        .zip(scratch.chunks_exact_mut(h))
    {
        model.residual_add(layer, slot, xi, yi, si);
    }
}
