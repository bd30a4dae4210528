//! Element-wise and row-wise kernels of the Llama family: embedding, RMSNorm, RoPE, causal
//! grouped-query attention, SwiGLU, log-softmax; and GPT-2's LayerNorm, tanh GELU and learned
//! position embeddings.

use rayon::prelude::*;

use super::matmul::{add_scaled, dot};

/// out[t, :] = table[ids[t], :].
///
/// table: [vocab, hidden], ids: [T], out: [T, hidden]. Ids must be < vocab (checked by callers
/// that take ids from users, so that the error can name the input).
pub fn embedding_forward(out: &mut [f32], table: &[f32], ids: &[u32], hidden: usize) {
    for (row, &id) in out.chunks_exact_mut(hidden).zip(ids) {
        let id = id as usize;
        row.copy_from_slice(&table[id * hidden..(id + 1) * hidden]);
    }
}

/// out[t, :] = (offset + w) ⊙ x[t, :] / sqrt(mean(x[t, :]²) + eps), as HF's `LlamaRMSNorm`
/// (offset 0) and `Gemma3RMSNorm` (offset 1, its `1 + weight`); the sum is in f32 there and in
/// f64 here, which is closer to the exact value. The rows are `w.len()` long, so a per-head norm
/// (Qwen3's q_norm) passes [T·heads, head_dim] and a whole-projection one (OLMo 2's) [T, q_dim].
///
/// x, out: [T, hidden], w: [hidden]. Returns nothing; the backward will recompute 1/rms.
pub fn rms_norm_forward(out: &mut [f32], x: &[f32], w: &[f32], offset: f32, eps: f32) {
    let hidden = w.len();
    out.par_chunks_mut(hidden)
        .zip(x.par_chunks(hidden))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(o, xr)| rms_norm_row(o, xr, w, offset, eps));
}

avx512_variant! {
    /// One row of [`rms_norm_forward`]. o, x, w: [hidden].
    fn rms_norm_row(o: &mut [f32], xr: &[f32], w: &[f32], offset: f32, eps: f32) {
        let ss = sum_squares_f64(xr);
        let inv = (1.0 / (ss / w.len() as f64 + eps as f64).sqrt()) as f32;
        // offset + w is exact for offset 0, so the Llama path is unchanged bit for bit.
        for ((oi, &xi), &wi) in o.iter_mut().zip(xr).zip(w) {
            *oi = (offset + wi) * (xi * inv);
        }
    }
}

/// Partial sums per row reduction: one f64 sum taken element by element waits on each addition
/// (a norm's backward spent ~3.5% of a bf16 training step there); [`LANES`] independent sums,
/// added pairwise at the end, let the compiler use vector registers. The order is fixed, so a
/// row's sum is the same on every call.
const LANES: usize = 8;

/// The sum of `chunks` (each [`LANES`] terms) in [`LANES`] partial sums, added pairwise, then `tail`.
#[inline(always)]
fn lane_sum(chunks: impl Iterator<Item = [f64; LANES]>, tail: f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    for c in chunks {
        for (a, t) in acc.iter_mut().zip(c) {
            *a += t;
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Σ x² in f64 ([`LANES`] partial sums). x: [n].
#[inline(always)]
fn sum_squares_f64(x: &[f32]) -> f64 {
    let chunks = x.chunks_exact(LANES);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| v as f64 * v as f64)
        .sum();
    lane_sum(
        chunks.map(|c| std::array::from_fn(|l| c[l] as f64 * c[l] as f64)),
        tail,
    )
}

/// Σ ((offset + w) · dy) · x in f64 ([`LANES`] partial sums), the RMSNorm backward's projection
/// of the gradient on x. x, dy, w: [n].
#[inline(always)]
fn norm_grad_dot_f64(x: &[f32], dy: &[f32], w: &[f32], offset: f32) -> f64 {
    let term = |xi: f32, di: f32, wi: f32| ((offset + wi) * di) as f64 * xi as f64;
    let whole = x.len() / LANES * LANES;
    let tail: f64 = (whole..x.len()).map(|i| term(x[i], dy[i], w[i])).sum();
    lane_sum(
        x[..whole]
            .chunks_exact(LANES)
            .zip(dy[..whole].chunks_exact(LANES))
            .zip(w[..whole].chunks_exact(LANES))
            .map(|((xc, dc), wc)| std::array::from_fn(|l| term(xc[l], dc[l], wc[l]))),
        tail,
    )
}

/// Rows handed to one rayon task by the row-wise kernels: enough work to hide the task cost.
const ROWS_PER_TASK: usize = 16;
/// Elements handed to one rayon task by the element-wise kernels.
const ELEMS_PER_TASK: usize = 16 * 1024;

/// cos / sin tables for rotary position embeddings in HF's "rotate_half" layout.
#[derive(Debug, Clone)]
pub struct RopeTable {
    /// [max_positions, head_dim / 2]
    pub cos: Vec<f32>,
    /// [max_positions, head_dim / 2]
    pub sin: Vec<f32>,
    pub half: usize,
}

impl RopeTable {
    /// inv_freq_i = theta^(-2i / head_dim); angle(p, i) = p · inv_freq_i, computed in f64.
    pub fn new(head_dim: usize, max_positions: usize, theta: f64) -> Self {
        Self::from_inv_freq(&default_inv_freq(head_dim, theta), max_positions)
    }

    /// Tables for given frequencies inv_freq: [head_dim / 2] (a scaled RoPE such as Llama 3's
    /// computes its own); angle(p, i) = p · inv_freq_i in f64.
    pub fn from_inv_freq(inv_freq: &[f64], max_positions: usize) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        RopeTable { cos, sin, half }
    }

    pub fn max_positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }
}

/// RoPE's unscaled frequencies inv_freq_i = theta^(-2i / head_dim), i < head_dim / 2.
pub fn default_inv_freq(head_dim: usize, theta: f64) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
        .collect()
}

/// Rotates each head of x in place: pairs (i, i + d/2) of head h at position p become
/// (x_i cos − x_{i+d/2} sin, x_{i+d/2} cos + x_i sin).
///
/// x: [T, n_heads, head_dim]; token t sits at position `start_pos + t`.
pub fn rope_forward(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    start_pos: usize,
    rope: &RopeTable,
) {
    rope_rotate(x, n_heads, head_dim, start_pos, rope, 1.0);
}

/// The rotation by θ (`sign` = 1) or by −θ (`sign` = −1, the transpose, for the backward).
fn rope_rotate(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    start_pos: usize,
    rope: &RopeTable,
    sign: f32,
) {
    let half = head_dim / 2;
    let row = n_heads * head_dim;
    if row == 0 {
        return;
    }
    let rotate = |first: usize, rows: &mut [f32]| {
        rope_rows(
            rows,
            row,
            head_dim,
            &rope.cos[first * half..],
            &rope.sin[first * half..],
            sign,
        )
    };
    // Training batches rotate thousands of rows: split them over the threads (each row is
    // rotated alone, so the result does not depend on the split). Decode rotates one.
    if x.len() / row <= ROWS_PER_TASK {
        rotate(start_pos, x);
    } else {
        x.par_chunks_mut(ROWS_PER_TASK * row)
            .enumerate()
            .for_each(|(i, rows)| rotate(start_pos + i * ROWS_PER_TASK, rows));
    }
}

avx512_variant! {
    /// Rotates `rows` ([n, row], each of heads of `head_dim`) by the angles whose cos / sin tables
    /// ([n, head_dim / 2]) start at the first row's position; `sign` −1 rotates back.
    fn rope_rows(rows: &mut [f32], row: usize, head_dim: usize, cos: &[f32], sin: &[f32], sign: f32) {
        let half = head_dim / 2;
        for (t, tok) in rows.chunks_exact_mut(row).enumerate() {
            let cos = &cos[t * half..(t + 1) * half];
            let sin = &sin[t * half..(t + 1) * half];
            for head in tok.chunks_exact_mut(head_dim) {
                let (lo, hi) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b, s) = (lo[i], hi[i], sign * sin[i]);
                    lo[i] = a * cos[i] - b * s;
                    hi[i] = b * cos[i] + a * s;
                }
            }
        }
    }
}

/// Keys and values of one layer for every position seen so far, laid out so that one head's
/// keys are contiguous: [n_kv_heads, capacity, head_dim].
#[derive(Debug, Clone)]
pub struct KvLayer {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Causal grouped-query attention of `T` new queries against all cached keys.
///
/// q: [T, n_heads, head_dim] (RoPE applied), the new tokens' keys/values already appended to
/// `kv` at positions `start_pos..start_pos+T`; kv.k / kv.v: [n_kv_heads, capacity, head_dim].
/// out: [T, n_heads, head_dim]. Query head h reads KV head h / (n_heads / n_kv_heads); scores are
/// multiplied by `scale` (1/sqrt(head_dim) for most models); query t at position p = start_pos+t
/// sees keys 0..=p, or only the last `window` of them (p − window < j ≤ p, sliding-window layers).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    out: &mut [f32],
    q: &[f32],
    kv: &KvLayer,
    capacity: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    start_pos: usize,
    scale: f32,
    window: Option<usize>,
) {
    let t_new = q.len() / (n_heads * head_dim);
    let group = n_heads / n_kv_heads;
    // One task per (token, head) row of the output; the rows are disjoint.
    out.par_chunks_mut(head_dim).enumerate().for_each_init(
        || Vec::with_capacity(start_pos + t_new),
        |scores, (row, o)| {
            let (t, h) = (row / n_heads, row % n_heads);
            let kvh = h / group;
            let qv = &q[row * head_dim..(row + 1) * head_dim];
            let keys = &kv.k[kvh * capacity * head_dim..];
            let vals = &kv.v[kvh * capacity * head_dim..];
            let n_keys = start_pos + t + 1;
            let first = window.map_or(0, |w| n_keys.saturating_sub(w));
            attention_row(o, qv, keys, vals, first..n_keys, scale, scores);
        },
    );
}

avx512_variant! {
    /// One query's attention output: o = Σ_j softmax(scale · q·k_j)_j · v_j over the keys j in
    /// `keys_range`.  o, q: [head_dim]; keys, vals: [.., head_dim] rows (row j at j · head_dim);
    /// `scores` is scratch.
    ///
    /// On AVX-512 the whole row runs in one function compiled for it, so that the per-key `dot` and
    /// `add_scaled` (a few vectors each at head_dim 64) inline instead of being called per key; the
    /// arithmetic, and so every bit, is the same on both paths.
    fn attention_row(
        o: &mut [f32],
        q: &[f32],
        keys: &[f32],
        vals: &[f32],
        keys_range: std::ops::Range<usize>,
        scale: f32,
        scores: &mut Vec<f32>,
    ) {
        let d = q.len();
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for j in keys_range.clone() {
            let s = dot(q, &keys[j * d..(j + 1) * d]) * scale;
            max = max.max(s);
            scores.push(s);
        }
        let mut sum = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        o.fill(0.0);
        for (j, &p) in keys_range.zip(scores.iter()) {
            add_scaled(o, p * inv, &vals[j * d..(j + 1) * d]);
        }
    }
}

/// silu(g) = g · sigmoid(g).
#[inline]
pub fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// out = silu(gate) ⊙ up, the SwiGLU of Llama's MLP. gate, up, out: [T, intermediate].
pub fn swiglu_forward(out: &mut [f32], gate: &[f32], up: &[f32]) {
    out.par_chunks_mut(ELEMS_PER_TASK)
        .zip(
            gate.par_chunks(ELEMS_PER_TASK)
                .zip(up.par_chunks(ELEMS_PER_TASK)),
        )
        .for_each(|(o, (g, u))| {
            #[allow(unused_mut)]
            let mut done = 0;
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature was detected at run time.
                done = unsafe { swiglu_forward_avx512(o, g, u) };
            }
            for ((o, &g), &u) in o[done..].iter_mut().zip(&g[done..]).zip(&u[done..]) {
                *o = silu(g) * u;
            }
        });
}

/// x += y, element-wise (residual connections).
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(ELEMS_PER_TASK)
        .zip(y.par_chunks(ELEMS_PER_TASK))
        .for_each(|(x, y)| {
            for (a, &b) in x.iter_mut().zip(y) {
                *a += b;
            }
        });
}

/// log Σ exp(row), computed stably in f64.
pub fn logsumexp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let s: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + s.ln()
}

/// Index of the largest value, the first one on ties (as torch.argmax).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lane sums against one sequential f64 sum, on every length from 0 to 41 (whole lanes,
    /// a tail, a tail alone): the same value to f64 rounding, so no element is dropped or
    /// counted twice.
    #[test]
    fn lane_sums_match_a_sequential_sum_on_every_length() {
        let v = |i: usize, k: f32| ((i as f32 * 0.37 + k).sin() * 3.0) + 0.1;
        for n in 0..42 {
            let x: Vec<f32> = (0..n).map(|i| v(i, 0.0)).collect();
            let dy: Vec<f32> = (0..n).map(|i| v(i, 1.0)).collect();
            let w: Vec<f32> = (0..n).map(|i| v(i, 2.0)).collect();
            let ss: f64 = x.iter().map(|&a| a as f64 * a as f64).sum();
            let gx: f64 = (0..n)
                .map(|i| ((0.5 + w[i]) * dy[i]) as f64 * x[i] as f64)
                .sum();
            let (got_ss, got_gx) = (sum_squares_f64(&x), norm_grad_dot_f64(&x, &dy, &w, 0.5));
            let scale = x.iter().map(|&a| (a as f64).powi(2)).sum::<f64>() + 1.0;
            assert!(
                (got_ss - ss).abs() <= 1e-12 * scale,
                "n {n}: {got_ss} vs {ss}"
            );
            let scale_gx = (0..n)
                .map(|i| (((0.5 + w[i]) * dy[i]) as f64 * x[i] as f64).abs())
                .sum::<f64>()
                + 1.0;
            assert!(
                (got_gx - gx).abs() <= 1e-12 * scale_gx,
                "n {n}: {got_gx} vs {gx}"
            );
        }
    }

    #[test]
    fn rms_norm_of_constant_row_is_weight() {
        let x = [3.0f32; 4];
        let w = [1.0, 2.0, 3.0, 4.0];
        let mut out = [0.0; 4];
        rms_norm_forward(&mut out, &x, &w, 0.0, 0.0);
        for (o, w) in out.iter().zip(&w) {
            assert!((o - w).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let rope = RopeTable::new(8, 16, 10000.0);
        let orig: Vec<f32> = (0..16).map(|i| i as f32 * 0.1 - 0.5).collect();
        let mut x = orig.clone();
        rope_forward(&mut x, 2, 8, 0, &rope);
        assert_eq!(x, orig);
        rope_forward(&mut x, 2, 8, 5, &rope);
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-5);
        assert_ne!(x, orig);
    }

    #[test]
    fn attention_with_one_key_returns_its_value() {
        // 2 query heads share 1 kv head; a single position → softmax weight 1.
        let head_dim = 4;
        let kv = KvLayer {
            k: vec![0.3, -0.2, 0.1, 0.5],
            v: vec![1.0, 2.0, 3.0, 4.0],
        };
        let q = vec![0.5; 8];
        let mut out = vec![0.0; 8];
        attention_forward(&mut out, &q, &kv, 1, 2, 1, head_dim, 0, 0.5, None);
        assert_eq!(out, vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn argmax_takes_first_on_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }
}

// ------------------------------------------------------------------------------------------
// Backward kernels. Each takes the forward's saved input(s) and the gradient of its output.

/// dx (+)= ∂L/∂x of `rms_norm_forward`, given its input x and the gradient dy of its output.
///
/// x, dy, dx: [T, hidden], w: [hidden]. With inv = 1/sqrt(mean(x²)+eps) and g = (offset + w) ⊙ dy:
/// dx = inv·g − x · inv³ · (g·x) / hidden.
pub fn rms_norm_backward(
    dx: &mut [f32],
    x: &[f32],
    w: &[f32],
    offset: f32,
    dy: &[f32],
    eps: f32,
    accumulate: bool,
) {
    let hidden = w.len();
    dx.par_chunks_mut(hidden)
        .zip(x.par_chunks(hidden).zip(dy.par_chunks(hidden)))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(dxr, (xr, dyr))| {
            rms_norm_backward_row(dxr, xr, dyr, w, offset, eps, accumulate)
        });
}

avx512_variant! {
    /// One row of [`rms_norm_backward`]. dx, x, dy, w: [hidden].
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_backward_row(
        dxr: &mut [f32],
        xr: &[f32],
        dyr: &[f32],
        w: &[f32],
        offset: f32,
        eps: f32,
        accumulate: bool,
    ) {
        let hidden = w.len();
        let ss = sum_squares_f64(xr);
        let inv = 1.0 / (ss / hidden as f64 + eps as f64).sqrt();
        let gx = norm_grad_dot_f64(xr, dyr, w, offset);
        let c = (inv * inv * inv * gx / hidden as f64) as f32;
        let inv = inv as f32;
        for (((o, &xi), &di), &wi) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
            let g = inv * ((offset + wi) * di) - xi * c;
            *o = if accumulate { *o + g } else { g };
        }
    }
}

/// dw[j] += Σ_t dy[t, j] · x[t, j] / rms(x[t, :]): the RMSNorm weight's gradient (full
/// fine-tuning). Sequential over rows, in f64, so the sum has one fixed order.
///
/// x, dy: [T, hidden], dw: [hidden].
pub fn rms_norm_weight_grad(dw: &mut [f32], x: &[f32], dy: &[f32], eps: f32) {
    let hidden = dw.len();
    let mut acc = vec![0.0f64; hidden];
    for (xr, dyr) in x.chunks_exact(hidden).zip(dy.chunks_exact(hidden)) {
        let ss = sum_squares_f64(xr);
        let inv = 1.0 / (ss / hidden as f64 + eps as f64).sqrt();
        for ((a, &xi), &di) in acc.iter_mut().zip(xr).zip(dyr) {
            *a += di as f64 * xi as f64 * inv;
        }
    }
    for (d, a) in dw.iter_mut().zip(acc) {
        *d += a as f32;
    }
}

/// table_grad[ids[t], :] += dy[t, :]: the embedding's gradient (full fine-tuning).
///
/// dy: [T, hidden], table_grad: [vocab, hidden].
pub fn embedding_backward(table_grad: &mut [f32], dy: &[f32], ids: &[u32], hidden: usize) {
    for (row, &id) in dy.chunks_exact(hidden).zip(ids) {
        let id = id as usize;
        for (g, &d) in table_grad[id * hidden..(id + 1) * hidden]
            .iter_mut()
            .zip(row)
        {
            *g += d;
        }
    }
}

/// Gradient of `rope_forward` in place: the rotation's transpose (the same rotation by −θ).
///
/// dx: [T, n_heads, head_dim]; token t at position `start_pos + t`.
pub fn rope_backward(
    dx: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    start_pos: usize,
    rope: &RopeTable,
) {
    rope_rotate(dx, n_heads, head_dim, start_pos, rope, -1.0);
}

/// Gradients of `swiglu_forward`: d_gate = d_out ⊙ up ⊙ silu'(gate), d_up = d_out ⊙ silu(gate).
///
/// gate, up, d_out, d_gate, d_up: [T, intermediate].
pub fn swiglu_backward(
    d_gate: &mut [f32],
    d_up: &mut [f32],
    gate: &[f32],
    up: &[f32],
    d_out: &[f32],
) {
    let e = ELEMS_PER_TASK;
    d_gate
        .par_chunks_mut(e)
        .zip(d_up.par_chunks_mut(e))
        .zip(
            gate.par_chunks(e)
                .zip(up.par_chunks(e))
                .zip(d_out.par_chunks(e)),
        )
        .for_each(|((dgc, duc), ((gc, uc), dc))| {
            #[allow(unused_mut)]
            let mut done = 0;
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature was detected at run time.
                done = unsafe { swiglu_backward_avx512(dgc, duc, gc, uc, dc) };
            }
            let (dgc, duc, gc, uc, dc) = (
                &mut dgc[done..],
                &mut duc[done..],
                &gc[done..],
                &uc[done..],
                &dc[done..],
            );
            for ((((dg, du), &g), &u), &d) in
                dgc.iter_mut().zip(duc.iter_mut()).zip(gc).zip(uc).zip(dc)
            {
                let sig = 1.0 / (1.0 + (-g).exp());
                let silu = g * sig;
                *du = d * silu;
                *dg = d * u * (sig * (1.0 + g * (1.0 - sig)));
            }
        });
}

/// Replaces each v in `row` by exp(v − shift) and returns Σ exp(v − shift) accumulated in f64.
///
/// The softmax of the LM head evaluates this for every vocabulary entry of every target row,
/// so it is vectorised (AVX-512, a degree-6 polynomial after range reduction: ≤ 2 ulp, like
/// Cephes' expf); other CPUs use the libm exp.
pub fn exp_shifted_sum(row: &mut [f32], shift: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected at run time.
            return unsafe { exp_shifted_sum_avx512(row, shift) };
        }
    }
    let mut sum = 0.0f64;
    for v in row.iter_mut() {
        *v = (*v - shift).exp();
        sum += *v as f64;
    }
    sum
}

/// e^x for 16 lanes: Cody-Waite range reduction by ln 2, a degree-6 polynomial, then scale by
/// 2^k (≤ 2 ulp over the clamped range, like Cephes' expf). Inputs below −87.3 give ~0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-87.33655)),
        _mm512_set1_ps(88.37626),
    );
    let k = _mm512_roundscale_ps(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    // ln 2 split in a part exact in f32 and the remainder.
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        5e-1,
    ] {
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
    }
    let r2 = _mm512_mul_ps(r, r);
    let y = _mm512_fmadd_ps(y, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    _mm512_scalef_ps(y, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shifted_sum_avx512(row: &mut [f32], shift: f32) -> f64 {
    use std::arch::x86_64::*;
    let n = row.len();
    let p = row.as_mut_ptr();
    let vshift = _mm512_set1_ps(shift);
    let mut acc0 = _mm512_setzero_pd();
    let mut acc1 = _mm512_setzero_pd();
    let mut i = 0;
    while i + 16 <= n {
        let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), vshift));
        _mm512_storeu_ps(p.add(i), e);
        acc0 = _mm512_add_pd(acc0, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
        acc1 = _mm512_add_pd(
            acc1,
            _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(
                _mm512_castps_pd(e),
                1,
            ))),
        );
        i += 16;
    }
    let mut sum = _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
    for j in i..n {
        let v = (*p.add(j) - shift).exp();
        *p.add(j) = v;
        sum += v as f64;
    }
    sum
}

/// sigmoid(g) for 16 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn sigmoid16(g: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_div_ps(_mm512_set1_ps(1.0), _mm512_add_ps(_mm512_set1_ps(1.0), e))
}

/// out = silu(g) ⊙ u over whole 16-lane blocks; returns how many elements it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn swiglu_forward_avx512(out: &mut [f32], gate: &[f32], up: &[f32]) -> usize {
    use std::arch::x86_64::*;
    let n = out.len().min(gate.len()).min(up.len()) / 16 * 16;
    for i in (0..n).step_by(16) {
        let g = _mm512_loadu_ps(gate.as_ptr().add(i));
        let u = _mm512_loadu_ps(up.as_ptr().add(i));
        _mm512_storeu_ps(
            out.as_mut_ptr().add(i),
            _mm512_mul_ps(_mm512_mul_ps(g, sigmoid16(g)), u),
        );
    }
    n
}

/// The SwiGLU backward over whole 16-lane blocks; returns how many elements it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn swiglu_backward_avx512(
    d_gate: &mut [f32],
    d_up: &mut [f32],
    gate: &[f32],
    up: &[f32],
    d_out: &[f32],
) -> usize {
    use std::arch::x86_64::*;
    let n = d_gate
        .len()
        .min(d_up.len())
        .min(gate.len())
        .min(up.len())
        .min(d_out.len())
        / 16
        * 16;
    let one = _mm512_set1_ps(1.0);
    for i in (0..n).step_by(16) {
        let g = _mm512_loadu_ps(gate.as_ptr().add(i));
        let u = _mm512_loadu_ps(up.as_ptr().add(i));
        let d = _mm512_loadu_ps(d_out.as_ptr().add(i));
        let sig = sigmoid16(g);
        let silu = _mm512_mul_ps(g, sig);
        _mm512_storeu_ps(d_up.as_mut_ptr().add(i), _mm512_mul_ps(d, silu));
        // silu'(g) = sig · (1 + g · (1 − sig))
        let dsilu = _mm512_mul_ps(sig, _mm512_fmadd_ps(g, _mm512_sub_ps(one, sig), one));
        _mm512_storeu_ps(
            d_gate.as_mut_ptr().add(i),
            _mm512_mul_ps(_mm512_mul_ps(d, u), dsilu),
        );
    }
    n
}

#[cfg(test)]
mod exp_tests {
    use super::*;

    #[test]
    fn vectorised_swiglu_matches_scalar() {
        let n = 16 * 40 + 7;
        let g: Vec<f32> = (0..n).map(|i| (i as f32 - 300.0) * 0.037).collect();
        let u: Vec<f32> = (0..n).map(|i| ((i * 7) % 13) as f32 * 0.3 - 2.0).collect();
        let d: Vec<f32> = (0..n).map(|i| ((i * 5) % 11) as f32 * 0.2 - 1.0).collect();
        let mut out = vec![0.0; n];
        swiglu_forward(&mut out, &g, &u);
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        swiglu_backward(&mut dg, &mut du, &g, &u, &d);
        for i in 0..n {
            let sig = 1.0 / (1.0 + (-(g[i] as f64)).exp());
            let silu = g[i] as f64 * sig;
            assert!(
                (out[i] as f64 - silu * u[i] as f64).abs()
                    < 1e-5 * (1.0 + (silu * u[i] as f64).abs()),
                "fwd {i}"
            );
            assert!((du[i] as f64 - d[i] as f64 * silu).abs() < 1e-5, "d_up {i}");
            let want = d[i] as f64 * u[i] as f64 * sig * (1.0 + g[i] as f64 * (1.0 - sig));
            assert!(
                (dg[i] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                "d_gate {i}: {} vs {want}",
                dg[i]
            );
        }
    }

    #[test]
    fn vectorised_exp_matches_libm_to_a_few_ulp() {
        let xs: Vec<f32> = (0..5000).map(|i| -90.0 + i as f32 * 0.0191).collect();
        let mut row = xs.clone();
        let sum = exp_shifted_sum(&mut row, 0.5);
        let mut want_sum = 0.0f64;
        for (&x, &got) in xs.iter().zip(&row) {
            let want = ((x - 0.5) as f64).exp();
            want_sum += want;
            if want > 1e-37 {
                assert!(
                    ((got as f64 - want) / want).abs() < 3e-7,
                    "exp({}) = {got}, want {want}",
                    x - 0.5
                );
            }
        }
        assert!((sum - want_sum).abs() / want_sum < 1e-6);
    }
}

// ------------------------------------------------------------------------------------------
// GPT-2 kernels: LayerNorm with bias, the tanh GELU, learned position embeddings.

/// out[t, :] = w ⊙ (x[t, :] − mean) / sqrt(var + eps) + b, as torch's `LayerNorm` (biased
/// variance; the statistics in f64 here).
///
/// x, out: [T, hidden], w, b: [hidden].
pub fn layer_norm_forward(out: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
    let hidden = w.len();
    out.par_chunks_mut(hidden)
        .zip(x.par_chunks(hidden))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(o, xr)| {
            let (mean, inv) = layer_norm_stats(xr, eps);
            for (((oi, &xi), &wi), &bi) in o.iter_mut().zip(xr).zip(w).zip(b) {
                *oi = wi * (((xi as f64 - mean) * inv) as f32) + bi;
            }
        });
}

/// (mean, 1/sqrt(var + eps)) of one row, in f64.
fn layer_norm_stats(xr: &[f32], eps: f32) -> (f64, f64) {
    let n = xr.len() as f64;
    let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = xr
        .iter()
        .map(|&v| (v as f64 - mean) * (v as f64 - mean))
        .sum::<f64>()
        / n;
    (mean, 1.0 / (var + eps as f64).sqrt())
}

/// dx (+)= ∂L/∂x of `layer_norm_forward`, given its input x and the gradient dy of its output.
///
/// x, dy, dx: [T, hidden], w: [hidden]. With x̂ = (x − mean)·inv and g = w ⊙ dy:
/// dx = inv · (g − mean(g) − x̂ · mean(g ⊙ x̂)). The bias does not enter.
pub fn layer_norm_backward(
    dx: &mut [f32],
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    eps: f32,
    accumulate: bool,
) {
    let hidden = w.len();
    dx.par_chunks_mut(hidden)
        .zip(x.par_chunks(hidden).zip(dy.par_chunks(hidden)))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(dxr, (xr, dyr))| {
            let (mean, inv) = layer_norm_stats(xr, eps);
            let n = hidden as f64;
            let (mut g_sum, mut gx_sum) = (0.0f64, 0.0f64);
            for ((&xi, &di), &wi) in xr.iter().zip(dyr).zip(w) {
                let g = (wi * di) as f64;
                g_sum += g;
                gx_sum += g * (xi as f64 - mean) * inv;
            }
            let (g_mean, gx_mean) = (g_sum / n, gx_sum / n);
            for (((o, &xi), &di), &wi) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
                let xhat = (xi as f64 - mean) * inv;
                let d = (inv * ((wi * di) as f64 - g_mean - xhat * gx_mean)) as f32;
                *o = if accumulate { *o + d } else { d };
            }
        });
}

/// dw[j] += Σ_t dy[t, j] · x̂[t, j]: the LayerNorm weight's gradient (x̂ the normalised input).
/// Sequential over rows, in f64.
///
/// x, dy: [T, hidden], dw: [hidden].
pub fn layer_norm_weight_grad(dw: &mut [f32], x: &[f32], dy: &[f32], eps: f32) {
    let hidden = dw.len();
    let mut acc = vec![0.0f64; hidden];
    for (xr, dyr) in x.chunks_exact(hidden).zip(dy.chunks_exact(hidden)) {
        let (mean, inv) = layer_norm_stats(xr, eps);
        for ((a, &xi), &di) in acc.iter_mut().zip(xr).zip(dyr) {
            *a += di as f64 * (xi as f64 - mean) * inv;
        }
    }
    for (d, a) in dw.iter_mut().zip(acc) {
        *d += a as f32;
    }
}

/// √(2/π), the constant of the tanh GELU.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// out = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), HF's `gelu_new`. x, out: [n].
pub fn gelu_tanh_forward(out: &mut [f32], x: &[f32]) {
    out.par_chunks_mut(ELEMS_PER_TASK)
        .zip(x.par_chunks(ELEMS_PER_TASK))
        .for_each(|(o, x)| {
            for (o, &v) in o.iter_mut().zip(x) {
                let t = (SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)).tanh();
                *o = 0.5 * v * (1.0 + t);
            }
        });
}

/// dx = dy ⊙ gelu'(x) of `gelu_tanh_forward`: with u = √(2/π)(x + 0.044715x³), t = tanh u,
/// gelu'(x) = 0.5(1 + t) + 0.5·x·(1 − t²)·√(2/π)(1 + 3·0.044715x²). x, dy, dx: [n].
pub fn gelu_tanh_backward(dx: &mut [f32], x: &[f32], dy: &[f32]) {
    dx.par_chunks_mut(ELEMS_PER_TASK)
        .zip(
            x.par_chunks(ELEMS_PER_TASK)
                .zip(dy.par_chunks(ELEMS_PER_TASK)),
        )
        .for_each(|(dxc, (xc, dyc))| {
            for ((d, &v), &g) in dxc.iter_mut().zip(xc).zip(dyc) {
                let t = (SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)).tanh();
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * v * v);
                *d = g * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du);
            }
        });
}

/// x[t, :] += wpe[start_pos + t, :]: GPT-2's learned position embeddings.
///
/// x: [T, hidden], wpe: [n_positions, hidden]; start_pos + T ≤ n_positions (checked by callers).
pub fn position_embedding_add(x: &mut [f32], wpe: &[f32], start_pos: usize, hidden: usize) {
    for (t, row) in x.chunks_exact_mut(hidden).enumerate() {
        let p = (start_pos + t) * hidden;
        for (xi, &pi) in row.iter_mut().zip(&wpe[p..p + hidden]) {
            *xi += pi;
        }
    }
}

#[cfg(test)]
mod gpt2_kernel_tests {
    use super::*;

    /// Central finite differences in f64 of a scalar function of x.
    fn numeric_grad(x: &[f32], f: impl Fn(&[f32]) -> f64) -> Vec<f64> {
        let h = 1e-3f32;
        (0..x.len())
            .map(|i| {
                let mut p = x.to_vec();
                p[i] += h;
                let mut m = x.to_vec();
                m[i] -= h;
                (f(&p) - f(&m)) / (2.0 * h as f64)
            })
            .collect()
    }

    #[test]
    fn layer_norm_matches_definition_and_its_backward_matches_finite_differences() {
        let hidden = 8;
        let x: Vec<f32> = (0..2 * hidden)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let w: Vec<f32> = (0..hidden).map(|i| 0.5 + 0.1 * i as f32).collect();
        let b: Vec<f32> = (0..hidden).map(|i| 0.05 * i as f32 - 0.2).collect();
        let dy: Vec<f32> = (0..2 * hidden)
            .map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.4)
            .collect();
        let mut y = vec![0.0; x.len()];
        layer_norm_forward(&mut y, &x, &w, &b, 1e-5);
        // Row 0 by hand: mean, biased variance.
        let r = &x[..hidden];
        let mean = r.iter().sum::<f32>() / hidden as f32;
        let var = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / hidden as f32;
        for j in 0..hidden {
            let want = w[j] * (r[j] - mean) / (var + 1e-5).sqrt() + b[j];
            assert!((y[j] - want).abs() < 1e-5, "{j}: {} vs {want}", y[j]);
        }
        let loss = |x: &[f32]| {
            let mut y = vec![0.0; x.len()];
            layer_norm_forward(&mut y, x, &w, &b, 1e-5);
            y.iter()
                .zip(&dy)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum()
        };
        let num = numeric_grad(&x, loss);
        let mut dx = vec![0.0; x.len()];
        layer_norm_backward(&mut dx, &x, &w, &dy, 1e-5, false);
        for (a, n) in dx.iter().zip(&num) {
            assert!((*a as f64 - n).abs() < 2e-3, "{a} vs {n}");
        }
    }

    #[test]
    fn gelu_tanh_values_and_backward() {
        let x = [-3.0f32, -1.0, -0.1, 0.0, 0.5, 2.0];
        let mut y = [0.0f32; 6];
        gelu_tanh_forward(&mut y, &x);
        // torch.nn.functional.gelu(x, approximate="tanh") for these inputs.
        let want = [
            -0.003_637_392f32,
            -0.158_808,
            -0.046_017_25,
            0.0,
            0.345_714,
            1.954_597_7,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let dy = [1.0f32, -2.0, 0.5, 1.0, 3.0, -1.0];
        let mut dx = [0.0f32; 6];
        gelu_tanh_backward(&mut dx, &x, &dy);
        let num = numeric_grad(&x, |x| {
            let mut y = vec![0.0; x.len()];
            gelu_tanh_forward(&mut y, x);
            y.iter()
                .zip(&dy)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum()
        });
        for (a, n) in dx.iter().zip(&num) {
            assert!((*a as f64 - n).abs() < 2e-3, "{a} vs {n}");
        }
    }
}
