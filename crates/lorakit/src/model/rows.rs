//! One step for a batch of sequences, each with its own KV cache, position and adapter, and each
//! running one token (a decode) or a chunk of its prompt (a prefill): [`forward_rows`].
//!
//! It runs the decoder's block exactly as [`Decoder::forward`] runs it for one new token, on
//! every token row, with one change: the frozen-weight products take all token rows at once
//! ([`matmul_rows_dot`], one pass over each weight per step), and the adapter products take the
//! rows of each adapter at once.
//!
//! Batch and chunk invariance (every row identical to `lorakit generate` alone, greedy or
//! seeded, whatever the batch and however a prompt is cut into chunks):
//! - products: `matmul_rows_dot` computes each element with the `dot` call that the one-row
//!   decode path (`matmul_nt` with m = 1 → `matvec_rows`) makes (`dot_tile`, tiles of rows sharing the
//!   weight loads, keeps each element's `dot` order); adapter products x·Aᵀ and
//!   (s·x·Aᵀ)·Bᵀ go through the same kernel, and the bias and adapter terms are added in
//!   `Linear::forward`'s order (base, bias, then y + s·(x·Aᵀ)·Bᵀ);
//! - everything else (norms, q/k norms, RoPE, attention, activations, residuals, the final norm)
//!   is called on one row's slice at a time: the element-wise kernels vectorise in 16-lane blocks
//!   with a scalar tail and split work into tasks by element count, so on a [B, n] buffer an
//!   element's arithmetic could depend on where its row starts;
//! - attention is one task per (token, head): a query row's scores, softmax and weighted sum
//!   read the keys and values of positions ..= its own, whichever chunk stored them;
//! - the bf16 and GGUF-block paths have no batched kernel here and run row by row.

use crate::engine::batched::matmul_rows_dot;
use crate::engine::ops::{attention_forward, rope_forward};
use crate::error::{Error, Result};
use crate::lora::{LoraWeights, ModuleId, ModuleKind};
use crate::model::arch::NormSlot;
use crate::model::decoder::{
    act_forward, gated_act_forward, split_rows, Decoder, Layer, MlpWeights, QkvWeights,
};
use crate::model::kv_cache::{store_kv, KvCache, Logits};
use crate::model::linear::{FrozenRef, Linear};

use crate::lora::peft::Adapter;

/// One sequence in a decode step: the token to run, its cache (the token goes at position
/// `cache.len`), and its adapter (None = the base model).
pub struct StepRow<'a> {
    pub token: u32,
    pub cache: &'a mut KvCache,
    pub adapter: Option<&'a Adapter>,
}

/// One sequence in a [`forward_rows`] step: some of its tokens (one for a decode, a chunk of
/// the prompt for a prefill), run at positions `cache.len ..`, with its adapter (None = the
/// base model); `logits`: whether the step returns the logits of its last token.
pub struct SeqChunk<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub adapter: Option<&'a Adapter>,
    pub logits: bool,
}

/// Runs one token for every row and appends its keys/values to the row's cache.
/// Returns logits [rows, vocab].
pub fn decode_step(model: &Decoder, rows: &mut [StepRow<'_>]) -> Result<Vec<f32>> {
    let mut seqs: Vec<SeqChunk<'_>> = rows
        .iter_mut()
        .map(|r| SeqChunk {
            tokens: std::slice::from_ref(&r.token),
            cache: &mut *r.cache,
            adapter: r.adapter,
            logits: true,
        })
        .collect();
    forward_rows(model, &mut seqs)
}

/// Runs every sequence's tokens (decodes and prefill chunks together, one pass over each base
/// weight for all their token rows), appends their keys/values to each sequence's cache, and
/// returns the logits of the last token of each sequence that asks for them, in order:
/// [asking sequences, vocab].
///
/// Chunk invariance: every token row is computed exactly as a one-token decode at its position
/// computes it (the products are one `dot` per element, the row-wise ops run on one token's
/// slice, attention reads the keys of positions ..= its own, which earlier chunks or this one
/// stored with the same arithmetic). So a prompt gives the same bits whether it runs in one
/// chunk, in chunks of any size, or one token at a time, and whatever else shares the step;
/// [`Decoder::prefill`] (what `lorakit generate` runs) is this function on the whole prompt.
pub fn forward_rows(model: &Decoder, seqs: &mut [SeqChunk<'_>]) -> Result<Vec<f32>> {
    let c = &model.config;
    if seqs.is_empty() {
        return Ok(Vec::new());
    }
    for s in seqs.iter() {
        model.check_ids(s.tokens)?;
        let end = s.cache.len + s.tokens.len();
        if end > s.cache.capacity || s.cache.layers.len() != model.layers.len() {
            return Err(Error::Invalid(format!(
                "{end} tokens exceed the cache capacity of {} positions",
                s.cache.capacity
            )));
        }
    }
    let (h, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
    // Token rows: sequence s owns rows offs[s] .. offs[s + 1], at positions starts[s] ...
    let starts: Vec<usize> = seqs.iter().map(|s| s.cache.len).collect();
    let mut offs = Vec::with_capacity(seqs.len() + 1);
    offs.push(0);
    for s in seqs.iter() {
        offs.push(offs[offs.len() - 1] + s.tokens.len());
    }
    let n = offs[seqs.len()];
    // The position of each token row.
    let pos: Vec<usize> = seqs
        .iter()
        .zip(&starts)
        .flat_map(|(s, &at)| at..at + s.tokens.len())
        .collect();

    let mut x = vec![0.0f32; n * h];
    for (i, s) in seqs.iter().enumerate() {
        for (j, &id) in s.tokens.iter().enumerate() {
            let r = offs[i] + j;
            model.embed(&mut x[r * h..(r + 1) * h], &[id], starts[i] + j, 1);
        }
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
    let groups = adapter_groups(seqs, &offs);

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
        for (r, &p) in pos.iter().enumerate() {
            let qi = &mut q[r * q_dim..(r + 1) * q_dim];
            let ki = &mut k[r * kv_dim..(r + 1) * kv_dim];
            model.qk_norm(layer, NormSlot::Q, qi, &mut tmp);
            model.qk_norm(layer, NormSlot::K, ki, &mut tmp);
            if let Some(rope) = model.ropes.get(spec.rope) {
                rope_forward(qi, c.num_heads, hd, p, rope);
                rope_forward(ki, c.num_kv_heads, hd, p, rope);
            }
        }
        for (i, s) in seqs.iter_mut().enumerate() {
            let rows = offs[i]..offs[i + 1];
            let cap = s.cache.capacity;
            let kv = &mut s.cache.layers[li];
            store_kv(
                kv,
                &k[rows.start * kv_dim..rows.end * kv_dim],
                &v[rows.start * kv_dim..rows.end * kv_dim],
                c.num_kv_heads,
                hd,
                cap,
                starts[i],
            );
            // One task per (token, head): each query row's scores, softmax and sum depend only
            // on its own position, not on how many tokens run with it.
            attention_forward(
                &mut attn[rows.start * q_dim..rows.end * q_dim],
                &q[rows.start * q_dim..rows.end * q_dim],
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
    for s in seqs.iter_mut() {
        s.cache.len += s.tokens.len();
    }

    // The last token row of each sequence that asks for logits.
    let last: Vec<usize> = (0..seqs.len())
        .filter(|&i| seqs[i].logits && offs[i + 1] > offs[i])
        .map(|i| offs[i + 1] - 1)
        .collect();
    let nl = last.len();
    let mut final_normed = vec![0.0f32; nl * h];
    for (o, &r) in last.iter().enumerate() {
        model.norm_forward(
            &mut final_normed[o * h..(o + 1) * h],
            &x[r * h..(r + 1) * h],
            model.final_norm(),
        );
    }
    let vocab = c.vocab_size;
    let mut logits = vec![0.0f32; nl * vocab];
    if nl == 0 {
        return Ok(logits);
    }
    if let Some(w) = model.head_f32() {
        matmul_rows_dot(&mut logits, &final_normed, w, nl, h, vocab);
        // As Decoder::head_forward: Gemma's final soft-capping, cap · tanh(z / cap).
        if let Some(cap) = c.final_logit_softcap {
            logits.iter_mut().for_each(|z| *z = cap * (*z / cap).tanh());
        }
    } else {
        for i in 0..nl {
            model.head_forward(
                &mut logits[i * vocab..(i + 1) * vocab],
                &final_normed[i * h..(i + 1) * h],
                1,
            );
        }
    }
    Ok(logits)
}

/// Rows grouped by adapter: (the adapter, the indices of its rows), base rows (None) included.
type Groups<'a> = Vec<(Option<&'a Adapter>, Vec<usize>)>;

/// The token rows of each adapter: sequence s owns rows `offs[s] .. offs[s + 1]`.
fn adapter_groups<'a>(seqs: &[SeqChunk<'a>], offs: &[usize]) -> Groups<'a> {
    let mut groups: Groups<'a> = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        let same = |g: &Option<&Adapter>| match (g, s.adapter) {
            (None, None) => true,
            (Some(a), Some(b)) => std::ptr::eq(*a, b),
            _ => false,
        };
        let rows = offs[i]..offs[i + 1];
        match groups.iter_mut().find(|(g, _)| same(g)) {
            Some((_, idx)) => idx.extend(rows),
            None => groups.push((s.adapter, rows.collect())),
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
    if let FrozenRef::F32(w) = lin.frozen() {
        matmul_rows_dot(y, x, w, n, inp, out);
        if let Some(b) = &lin.bias {
            for row in y.chunks_exact_mut(out) {
                for (yi, bi) in row.iter_mut().zip(b) {
                    *yi += bi;
                }
            }
        }
    } else {
        // Row by row, so that a row's result does not depend on the rows batched with it.
        for i in 0..n {
            lin.forward_base(&mut y[i * out..(i + 1) * out], &x[i * inp..(i + 1) * inp]);
        }
    }
    // Adapters attached to the base itself apply to every row (the server attaches none).
    let all: Vec<usize> = (0..n).collect();
    for lora in &lin.loras {
        lora_rows(y, x, lora, &all, inp, out);
    }
    let kind = model.config.adapter_kind(role);
    for (adapter, idx) in groups {
        if let Some(lora) = adapter.and_then(|a| a.modules.get(&ModuleId { layer, kind })) {
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

// `Decoder::prefill` lives here, beside the step it runs, so that decoder.rs does not import
// this file back.
impl Decoder {
    /// Runs a prompt at positions `cache.len ..` and returns the logits of its last token
    /// [vocab]: what `generate` starts with. With f32 weights every token row is computed as a
    /// one-token decode at its position ([`forward_rows`]: one `dot` per
    /// product element, row-wise ops on one token's slice), so the result does not depend on how
    /// the prompt is cut into chunks: `lorakit serve` prefills in chunks between decode steps
    /// and gets these bits. ([`Decoder::forward`] sends one row to a dot product and several to
    /// `gemm`, which orders each sum differently: cut into one-token chunks, a 46-token prompt's
    /// last logits differ in 44 350 of 49 152 places; and `gemm` does not promise that its
    /// blocking ignores the row count.)
    /// Otherwise (bf16, GGUF blocks) this is [`Decoder::forward`] on the whole prompt.
    pub fn prefill(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        if !self.all_f32() {
            return self.forward(ids, cache, Logits::Last);
        }
        let mut seq = [SeqChunk {
            tokens: ids,
            cache,
            adapter: None,
            logits: true,
        }];
        forward_rows(self, &mut seq)
    }
}
