//! Causal grouped-query attention over a batch of equal-length (right-padded) sequences, for
//! training: the forward keeps only the output and one log-sum-exp per query row, and the
//! backward recomputes the probabilities from them (flash-attention style), so the [T, T] score
//! matrix is never stored.
//!
//! Layouts: q, dq, out: [B·T, n_heads·head_dim]; k, v, dk, dv: [B·T, n_kv_heads·head_dim];
//! lse: [B, n_heads, T]. Query head h reads KV head h / (n_heads / n_kv_heads). Right padding
//! needs no mask: a real token never attends to a later position.

use rayon::prelude::*;

use super::matmul::dot;

#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies the scores q·k: 1/√head_dim for most models, Gemma's query_pre_attn_scalar^-½.
    pub scale: f32,
    /// Sliding-window layers: query t sees keys t − window < j ≤ t only.
    pub window: Option<usize>,
}

impl AttnShape {
    fn q_row(&self) -> usize {
        self.n_heads * self.head_dim
    }
    fn kv_row(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

/// A raw pointer that rayon tasks may share; each task writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// A method (not field access) so that closures capture the whole Send + Sync wrapper.
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// dst[m, n] (+)= beta · lhs[m, k] · rhs[k, n] on strided views, single-threaded (the callers
/// already run one task per head).
///
/// # Safety
/// Every element the strides reach must be inside the caller's buffers, and `dst` must not
/// alias `lhs` or `rhs` or be written by another thread.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// S = scale · Q_h K_hᵀ for one (batch, head): [T, hd] · [hd, T] → [T, T] in `dst`.
///
/// # Safety
/// q0 / kv0 must be the offsets of that head's first row in q / k, with T rows after them.
unsafe fn head_scores(dst: &mut [f32], q: &[f32], k: &[f32], q0: usize, kv0: usize, s: AttnShape) {
    let scale = s.scale;
    gemm_strided(
        s.seq,
        s.seq,
        s.head_dim,
        dst.as_mut_ptr(),
        s.seq,
        false,
        q.as_ptr().add(q0),
        s.q_row(),
        1,
        k.as_ptr().add(kv0),
        1,
        s.kv_row(),
        scale,
    );
}

/// P[t, j] = exp(S[t, j] − shift_t) for j ≤ t (and t − j < window), 0 elsewhere; S: [T, T] in
/// place. With `shift = None` each row is softmax-normalised and its log-sum-exp written to `lse`.
fn causal_exp_rows(
    s: &mut [f32],
    t_len: usize,
    window: Option<usize>,
    shift: Option<&[f32]>,
    lse: &mut [f32],
) {
    for t in 0..t_len {
        let row = &mut s[t * t_len..(t + 1) * t_len];
        let (live, masked) = row.split_at_mut(t + 1);
        masked.fill(0.0);
        let first = window.map_or(0, |w| (t + 1).saturating_sub(w));
        let (outside, live) = live.split_at_mut(first);
        outside.fill(0.0);
        match shift {
            Some(l) => {
                super::ops::exp_shifted_sum(live, l[t]);
            }
            None => {
                let max = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum = super::ops::exp_shifted_sum(live, max);
                let inv = (1.0 / sum) as f32;
                live.iter_mut().for_each(|p| *p *= inv);
                lse[t] = max + sum.ln() as f32;
            }
        }
    }
}

/// out = softmax(scale · q kᵀ + causal (sliding-window) mask) v, per (batch, head); lse[b, h, t] = log Σ_j exp(s_tj).
pub fn attention_train_forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
) {
    let (t_len, hd) = (s.seq, s.head_dim);
    assert_eq!(q.len(), s.batch * t_len * s.q_row());
    assert_eq!(k.len(), s.batch * t_len * s.kv_row());
    assert_eq!(v.len(), k.len());
    assert_eq!(out.len(), q.len());
    assert_eq!(lse.len(), s.batch * s.n_heads * t_len);
    let out_ptr = SharedMut(out.as_mut_ptr());
    // One task per (batch, head): it owns out[b, :, h, :] and lse[b, h, :].
    lse.par_chunks_mut(t_len).enumerate().for_each_init(
        || vec![0.0f32; t_len * t_len],
        |scores, (bh, lse_row)| {
            let (b, h) = (bh / s.n_heads, bh % s.n_heads);
            let kvh = h / s.group();
            let q0 = b * t_len * s.q_row() + h * hd;
            let kv0 = b * t_len * s.kv_row() + kvh * hd;
            // SAFETY: the asserts above bound the views; this task alone writes out[b, :, h, :].
            unsafe {
                // S = scale · Q Kᵀ: [T, hd] · [hd, T]
                head_scores(scores, q, k, q0, kv0, s);
                causal_exp_rows(scores, t_len, s.window, None, lse_row);
                // O = P V: [T, T] · [T, hd]
                gemm_strided(
                    t_len,
                    hd,
                    t_len,
                    out_ptr.at(q0),
                    s.q_row(),
                    false,
                    scores.as_ptr(),
                    t_len,
                    1,
                    v.as_ptr().add(kv0),
                    s.kv_row(),
                    1,
                    1.0,
                );
            }
        },
    );
}

/// Gradients of `attention_train_forward` with respect to q, k and v (overwritten).
///
/// With P = exp(S − lse): dV = Pᵀ dO; dP = dO Vᵀ; D_t = dO_t·O_t; dS = P ⊙ (dP − D);
/// dQ = scale · dS K; dK = scale · dSᵀ Q (summed over the query heads sharing a KV head).
#[allow(clippy::too_many_arguments)]
pub fn attention_train_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    d_out: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    s: AttnShape,
) {
    let (t_len, hd) = (s.seq, s.head_dim);
    let scale = s.scale;
    for (name, len, want) in [
        ("dq", dq.len(), q.len()),
        ("d_out", d_out.len(), q.len()),
        ("out", out.len(), q.len()),
        ("dk", dk.len(), k.len()),
        ("dv", dv.len(), k.len()),
        ("v", v.len(), k.len()),
    ] {
        assert_eq!(len, want, "attention_train_backward: {name}");
    }
    assert_eq!(q.len(), s.batch * t_len * s.q_row());
    assert_eq!(k.len(), s.batch * t_len * s.kv_row());
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    // One task per (batch, KV head): it owns dk/dv of that head and dq of the query heads
    // that share it, so no two tasks write the same element.
    (0..s.batch * s.n_kv_heads).into_par_iter().for_each_init(
        || (vec![0.0f32; t_len * t_len], vec![0.0f32; t_len * t_len]),
        |(p, dp), bk| {
            let (b, kvh) = (bk / s.n_kv_heads, bk % s.n_kv_heads);
            let kv0 = b * t_len * s.kv_row() + kvh * hd;
            for (i, h) in (kvh * s.group()..(kvh + 1) * s.group()).enumerate() {
                let q0 = b * t_len * s.q_row() + h * hd;
                let first = i == 0;
                // SAFETY: the asserts above bound every view; dk/dv rows of (b, kvh) and dq rows
                // of (b, h) belong to this task only.
                unsafe {
                    head_scores(p, q, k, q0, kv0, s);
                    let lse_row = &lse[(b * s.n_heads + h) * t_len..][..t_len];
                    causal_exp_rows(p, t_len, s.window, Some(lse_row), &mut []);
                    // dV (+)= Pᵀ dO
                    gemm_strided(
                        t_len,
                        hd,
                        t_len,
                        dv_ptr.at(kv0),
                        s.kv_row(),
                        !first,
                        p.as_ptr(),
                        1,
                        t_len,
                        d_out.as_ptr().add(q0),
                        s.q_row(),
                        1,
                        1.0,
                    );
                    // dP = dO Vᵀ
                    gemm_strided(
                        t_len,
                        t_len,
                        hd,
                        dp.as_mut_ptr(),
                        t_len,
                        false,
                        d_out.as_ptr().add(q0),
                        s.q_row(),
                        1,
                        v.as_ptr().add(kv0),
                        1,
                        s.kv_row(),
                        1.0,
                    );
                }
                // dS = P ⊙ (dP − D), D_t = dO_t · O_t (0 above the diagonal, where P is 0).
                for t in 0..t_len {
                    let row = q0 + t * s.q_row();
                    let d_t = dot(&d_out[row..row + hd], &out[row..row + hd]);
                    let (pr, dpr) = (
                        &p[t * t_len..(t + 1) * t_len],
                        &mut dp[t * t_len..(t + 1) * t_len],
                    );
                    for (x, &pv) in dpr.iter_mut().zip(pr) {
                        *x = pv * (*x - d_t);
                    }
                }
                unsafe {
                    // dQ = scale · dS K
                    gemm_strided(
                        t_len,
                        hd,
                        t_len,
                        dq_ptr.at(q0),
                        s.q_row(),
                        false,
                        dp.as_ptr(),
                        t_len,
                        1,
                        k.as_ptr().add(kv0),
                        s.kv_row(),
                        1,
                        scale,
                    );
                    // dK (+)= scale · dSᵀ Q
                    gemm_strided(
                        t_len,
                        hd,
                        t_len,
                        dk_ptr.at(kv0),
                        s.kv_row(),
                        !first,
                        dp.as_ptr(),
                        1,
                        t_len,
                        q.as_ptr().add(q0),
                        s.q_row(),
                        1,
                        scale,
                    );
                }
            }
        },
    );
}
