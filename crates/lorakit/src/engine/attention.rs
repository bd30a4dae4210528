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

/// out = softmax(q kᵀ / √d + causal mask) v, per (batch, head); lse[b, h, t] = log Σ_j exp(s_tj).
pub fn attention_train_forward(out: &mut [f32], lse: &mut [f32], q: &[f32], k: &[f32], v: &[f32], s: AttnShape) {
    let (t_len, hd) = (s.seq, s.head_dim);
    let scale = 1.0 / (hd as f32).sqrt();
    assert_eq!(q.len(), s.batch * t_len * s.q_row());
    assert_eq!(out.len(), q.len());
    assert_eq!(lse.len(), s.batch * s.n_heads * t_len);
    let out_ptr = SharedMut(out.as_mut_ptr());
    // One task per (batch, head): it owns out[b, :, h, :] and lse[b, h, :].
    lse.par_chunks_mut(t_len).enumerate().for_each_init(
        || vec![0.0f32; t_len],
        |scores, (bh, lse_row)| {
            let (b, h) = (bh / s.n_heads, bh % s.n_heads);
            let kvh = h / s.group();
            for t in 0..t_len {
                let row = b * t_len + t;
                let qv = &q[row * s.q_row() + h * hd..][..hd];
                let mut max = f32::NEG_INFINITY;
                for j in 0..=t {
                    let kr = &k[(b * t_len + j) * s.kv_row() + kvh * hd..][..hd];
                    let sc = dot(qv, kr) * scale;
                    scores[j] = sc;
                    max = max.max(sc);
                }
                let mut sum = 0.0f32;
                for sc in &mut scores[..=t] {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                // SAFETY: this task alone writes out[row, h·hd .. (h+1)·hd].
                let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(row * s.q_row() + h * hd), hd) };
                o.fill(0.0);
                let inv = 1.0 / sum;
                for (j, &p) in scores[..=t].iter().enumerate() {
                    let vr = &v[(b * t_len + j) * s.kv_row() + kvh * hd..][..hd];
                    let w = p * inv;
                    for (oi, &vi) in o.iter_mut().zip(vr) {
                        *oi += w * vi;
                    }
                }
                lse_row[t] = max + sum.ln();
            }
        },
    );
}

/// Gradients of `attention_train_forward` with respect to q, k and v (overwritten).
///
/// With p_tj = exp(s_tj − lse_t): dv_j = Σ_t p_tj do_t; dp_tj = do_t·v_j; D_t = do_t·o_t;
/// ds_tj = p_tj (dp_tj − D_t); dq_t = scale Σ_j ds_tj k_j; dk_j = scale Σ_t ds_tj q_t.
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
    let scale = 1.0 / (hd as f32).sqrt();
    let (dq_ptr, dk_ptr, dv_ptr) = (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
    // One task per (batch, KV head): it owns dk/dv of that head and dq of the query heads
    // that share it, so no two tasks write the same element.
    (0..s.batch * s.n_kv_heads).into_par_iter().for_each_init(
        || vec![0.0f32; t_len],
        |ds, bk| {
            let (b, kvh) = (bk / s.n_kv_heads, bk % s.n_kv_heads);
            let kv_at = |j: usize| (b * t_len + j) * s.kv_row() + kvh * hd;
            // SAFETY: rows of dk/dv for (b, kvh) and of dq for (b, h in group) belong to this task only.
            let dk_row = |j: usize| unsafe { std::slice::from_raw_parts_mut(dk_ptr.at(kv_at(j)), hd) };
            let dv_row = |j: usize| unsafe { std::slice::from_raw_parts_mut(dv_ptr.at(kv_at(j)), hd) };
            for j in 0..t_len {
                dk_row(j).fill(0.0);
                dv_row(j).fill(0.0);
            }
            for h in kvh * s.group()..(kvh + 1) * s.group() {
                for t in 0..t_len {
                    let row = b * t_len + t;
                    let q_at = row * s.q_row() + h * hd;
                    let qv = &q[q_at..q_at + hd];
                    let dov = &d_out[q_at..q_at + hd];
                    let d_t = dot(dov, &out[q_at..q_at + hd]);
                    let l = lse[(b * s.n_heads + h) * t_len + t];
                    for j in 0..=t {
                        let p = (dot(qv, &k[kv_at(j)..kv_at(j) + hd]) * scale - l).exp();
                        let dp = dot(dov, &v[kv_at(j)..kv_at(j) + hd]);
                        ds[j] = p * (dp - d_t);
                        for (dvi, &doi) in dv_row(j).iter_mut().zip(dov) {
                            *dvi += p * doi;
                        }
                    }
                    let dq_row = unsafe { std::slice::from_raw_parts_mut(dq_ptr.at(q_at), hd) };
                    dq_row.fill(0.0);
                    for j in 0..=t {
                        let g = ds[j] * scale;
                        let kr = &k[kv_at(j)..kv_at(j) + hd];
                        for (dqi, &ki) in dq_row.iter_mut().zip(kr) {
                            *dqi += g * ki;
                        }
                        for (dki, &qi) in dk_row(j).iter_mut().zip(qv) {
                            *dki += g * qi;
                        }
                    }
                }
            }
        },
    );
}
