//! Causal grouped-query attention over a batch of equal-length (right-padded) sequences, for
//! training: the forward keeps only the output and one log-sum-exp per query row, and the
//! backward recomputes the probabilities from them (flash-attention style), so the [T, T] score
//! matrix is never stored.
//!
//! Layouts: q, dq, out: [B·T, n_heads·head_dim]; k, v, dk, dv: [B·T, n_kv_heads·head_dim];
//! lse: [B, n_heads, T]. Query head h reads KV head h / (n_heads / n_kv_heads). Right padding
//! needs no mask: a real token never attends to a later position.
//!
//! A packed row ([`Segments`]) holds several sequences one after the other; each is computed as
//! its own causal block (the mask is block-diagonal), with the same products it would get alone,
//! so no score across two sequences is ever formed. An unpacked row is one segment.

use std::cell::RefCell;

use rayon::prelude::*;

use super::matmul::dot;
use super::SharedMut;

thread_local! {
    /// Each thread's score buffers ([L, L] for the longest segment seen), kept between calls:
    /// allocating and zeroing them per task was a share of the step. Every use overwrites the
    /// [len, len] prefix it reads.
    static SCORES: RefCell<(Vec<f32>, Vec<f32>)> = RefCell::default();
}

/// Runs `f` on this thread's two score buffers, each at least `n` long.
fn with_scores<R>(n: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    let grow = |v: &mut Vec<f32>| {
        if v.len() < n {
            v.resize(n, 0.0);
        }
    };
    SCORES.with(|cell| match cell.try_borrow_mut() {
        Ok(mut b) => {
            let (p, dp) = &mut *b;
            grow(p);
            grow(dp);
            f(p, dp)
        }
        // Not reached (the tasks make no nested calls); fresh buffers keep it correct anyway.
        Err(_) => f(&mut vec![0.0; n], &mut vec![0.0; n]),
    })
}

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

/// How the rows of a batch are cut into independent sequences (packing): row b holds the
/// sequences `lengths[b]`, in order, each attending only to itself; what is left of the row after
/// them (right padding) is one more segment. No rows given: every row is one sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Segments {
    rows: Vec<Vec<usize>>,
}

impl Segments {
    /// Every row one sequence (the unpacked batch).
    pub fn unpacked() -> Self {
        Segments::default()
    }

    /// Row b holds sequences of lengths `rows[b]`.
    pub fn packed(rows: Vec<Vec<usize>>) -> Self {
        Segments { rows }
    }

    pub fn is_packed(&self) -> bool {
        !self.rows.is_empty()
    }

    /// The sequence lengths of each row (empty when unpacked).
    pub fn rows(&self) -> &[Vec<usize>] {
        &self.rows
    }

    /// Why these segments do not fit a batch of `batch` rows of `seq` tokens, if they do not.
    pub fn check(&self, batch: usize, seq: usize) -> Result<(), String> {
        if !self.is_packed() {
            return Ok(());
        }
        if self.rows.len() != batch {
            return Err(format!(
                "segments for {} rows, the batch has {batch}",
                self.rows.len()
            ));
        }
        for (b, r) in self.rows.iter().enumerate() {
            if r.contains(&0) {
                return Err(format!("row {b} has an empty segment"));
            }
            let used: usize = r.iter().sum();
            if used > seq {
                return Err(format!(
                    "row {b}'s segments hold {used} tokens, more than its {seq}"
                ));
            }
        }
        Ok(())
    }

    /// The longest segment of a batch of rows of `seq` tokens (padding included).
    pub fn longest(&self, seq: usize) -> usize {
        if !self.is_packed() {
            return seq;
        }
        (0..self.rows.len())
            .flat_map(|b| self.row(b, seq).map(|(_, len)| len))
            .max()
            .unwrap_or(0)
    }

    /// (start, length) of each segment of row `b`, in a row of `seq` tokens.
    pub fn row(&self, b: usize, seq: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let lens: &[usize] = self.rows.get(b).map_or(&[], Vec::as_slice);
        let used: usize = lens.iter().sum();
        let mut start = 0;
        lens.iter()
            .copied()
            .chain((used < seq).then(|| seq - used))
            .map(move |len| {
                let s = start;
                start += len;
                (s, len)
            })
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

/// Rows per causal block: a segment's [L, L] products are computed in row blocks of this many
/// query rows, each only over the keys at or before its last row, which skips the zeros above the
/// diagonal (for L = 256, 10 of 16 blocks of 64 × 64 are computed). Dropping exact zeros from a
/// sum leaves it as it was.
const CAUSAL_BLOCK: usize = 64;

/// The row blocks (r0, r1) of a segment of `len` rows.
fn causal_blocks(len: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(CAUSAL_BLOCK)
        .map(move |r0| (r0, (r0 + CAUSAL_BLOCK).min(len)))
}

/// S = scale · Q_h K_hᵀ for one segment of `len` rows of one (batch, head): [len, hd] · [hd, len]
/// → [len, len] in `dst`, on and below the diagonal's blocks only: for rows r0..r1, columns
/// 0..r1. The rest of each row is left as it was (the causal mask overwrites it).
///
/// # Safety
/// q0 / kv0 must be the offsets of the segment's first row of that head in q / k, with `len` rows
/// after them, and `dst` must hold len² elements.
unsafe fn head_scores(
    dst: &mut [f32],
    q: &[f32],
    k: &[f32],
    q0: usize,
    kv0: usize,
    len: usize,
    s: AttnShape,
) {
    for (r0, r1) in causal_blocks(len) {
        gemm_strided(
            r1 - r0,
            r1,
            s.head_dim,
            dst.as_mut_ptr().add(r0 * len),
            len,
            false,
            q.as_ptr().add(q0 + r0 * s.q_row()),
            s.q_row(),
            1,
            k.as_ptr().add(kv0),
            1,
            s.kv_row(),
            s.scale,
        );
    }
}

/// dst[len, hd] (+)= beta · op(P) · R for a causal P [len, len] (zero above the diagonal; row
/// stride len) and R [len, hd] with row stride `r_rs`; op(P) is Pᵀ if `transposed`. Only the
/// nonzero part is summed: row block b0..b1 of P·R over P's columns 0..b1, row block b0..b1 of
/// Pᵀ·R (P's columns b0..b1) over P's rows b0..len.
///
/// # Safety
/// As [`gemm_strided`]: `dst` rows at stride `dst_rs` and `r` rows at stride `r_rs`, `len` of
/// each, inside their buffers.
#[allow(clippy::too_many_arguments)]
unsafe fn causal_times(
    transposed: bool,
    len: usize,
    hd: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    p: &[f32],
    r: *const f32,
    r_rs: usize,
    beta: f32,
) {
    for (b0, b1) in causal_blocks(len) {
        // The reduction k0..k1, and op(P)'s block: its first element and strides (row, column).
        let (k0, k1, lhs, lhs_rs, lhs_cs) = if transposed {
            (b0, len, b0 * len + b0, 1, len)
        } else {
            (0, b1, b0 * len, len, 1)
        };
        gemm_strided(
            b1 - b0,
            hd,
            k1 - k0,
            dst.add(b0 * dst_rs),
            dst_rs,
            accumulate,
            p.as_ptr().add(lhs),
            lhs_rs,
            lhs_cs,
            r.add(k0 * r_rs),
            r_rs,
            1,
            beta,
        );
    }
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

/// out = softmax(scale · q kᵀ + causal (sliding-window) mask) v, per (batch, head) and per
/// segment of each row (`segs`); lse[b, h, t] = log Σ_j exp(s_tj).
pub fn attention_train_forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    segs: &Segments,
) {
    let (t_len, hd) = (s.seq, s.head_dim);
    assert_eq!(q.len(), s.batch * t_len * s.q_row());
    assert_eq!(k.len(), s.batch * t_len * s.kv_row());
    assert_eq!(v.len(), k.len());
    assert_eq!(out.len(), q.len());
    assert_eq!(lse.len(), s.batch * s.n_heads * t_len);
    if let Err(e) = segs.check(s.batch, t_len) {
        panic!("attention_train_forward: {e}");
    }
    let longest = segs.longest(t_len);
    let out_ptr = SharedMut(out.as_mut_ptr());
    // One task per (batch, head): it owns out[b, :, h, :] and lse[b, h, :].
    lse.par_chunks_mut(t_len)
        .enumerate()
        .for_each(|(bh, lse_row)| {
            with_scores(longest * longest, |scores, _| {
                let (b, h) = (bh / s.n_heads, bh % s.n_heads);
                let kvh = h / s.group();
                for (start, len) in segs.row(b, t_len) {
                    let q0 = (b * t_len + start) * s.q_row() + h * hd;
                    let kv0 = (b * t_len + start) * s.kv_row() + kvh * hd;
                    let sc = &mut scores[..len * len];
                    // SAFETY: the asserts above bound the views (the segments lie inside the row);
                    // this task alone writes out[b, :, h, :].
                    unsafe {
                        // S = scale · Q Kᵀ: [L, hd] · [hd, L]
                        head_scores(sc, q, k, q0, kv0, len, s);
                        causal_exp_rows(sc, len, s.window, None, &mut lse_row[start..start + len]);
                        // O = P V: [L, L] · [L, hd]
                        causal_times(
                            false,
                            len,
                            hd,
                            out_ptr.at(q0),
                            s.q_row(),
                            false,
                            sc,
                            v.as_ptr().add(kv0),
                            s.kv_row(),
                            1.0,
                        );
                    }
                }
            })
        });
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
    segs: &Segments,
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
    if let Err(e) = segs.check(s.batch, t_len) {
        panic!("attention_train_backward: {e}");
    }
    let longest = segs.longest(t_len);
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    // One task per (batch, KV head): it owns dk/dv of that head and dq of the query heads
    // that share it, so no two tasks write the same element.
    (0..s.batch * s.n_kv_heads).into_par_iter().for_each(|bk| {
        with_scores(longest * longest, |p_buf, dp_buf| {
            let (b, kvh) = (bk / s.n_kv_heads, bk % s.n_kv_heads);
            for (i, h) in (kvh * s.group()..(kvh + 1) * s.group()).enumerate() {
                let first = i == 0;
                for (start, len) in segs.row(b, t_len) {
                    let kv0 = (b * t_len + start) * s.kv_row() + kvh * hd;
                    let q0 = (b * t_len + start) * s.q_row() + h * hd;
                    let (p, dp) = (&mut p_buf[..len * len], &mut dp_buf[..len * len]);
                    // SAFETY: the asserts above bound every view (the segments lie inside the
                    // row); dk/dv rows of (b, kvh) and dq rows of (b, h) belong to this task only.
                    unsafe {
                        head_scores(p, q, k, q0, kv0, len, s);
                        let lse_row = &lse[(b * s.n_heads + h) * t_len + start..][..len];
                        causal_exp_rows(p, len, s.window, Some(lse_row), &mut []);
                        // dV (+)= Pᵀ dO
                        causal_times(
                            true,
                            len,
                            hd,
                            dv_ptr.at(kv0),
                            s.kv_row(),
                            !first,
                            p,
                            d_out.as_ptr().add(q0),
                            s.q_row(),
                            1.0,
                        );
                        // dP = dO Vᵀ, on and below the diagonal's blocks (as the scores).
                        head_scores(dp, d_out, v, q0, kv0, len, AttnShape { scale: 1.0, ..s });
                    }
                    // dS = P ⊙ (dP − D), D_t = dO_t · O_t; 0 above the diagonal, where P is 0
                    // (written, as dP was not computed everywhere there).
                    for t in 0..len {
                        let row = q0 + t * s.q_row();
                        let d_t = dot(&d_out[row..row + hd], &out[row..row + hd]);
                        let (pr, dpr) =
                            (&p[t * len..(t + 1) * len], &mut dp[t * len..(t + 1) * len]);
                        let (live, above) = dpr.split_at_mut(t + 1);
                        for (x, &pv) in live.iter_mut().zip(pr) {
                            *x = pv * (*x - d_t);
                        }
                        above.fill(0.0);
                    }
                    unsafe {
                        // dQ = scale · dS K
                        causal_times(
                            false,
                            len,
                            hd,
                            dq_ptr.at(q0),
                            s.q_row(),
                            false,
                            dp,
                            k.as_ptr().add(kv0),
                            s.kv_row(),
                            scale,
                        );
                        // dK (+)= scale · dSᵀ Q
                        causal_times(
                            true,
                            len,
                            hd,
                            dk_ptr.at(kv0),
                            s.kv_row(),
                            !first,
                            dp,
                            q.as_ptr().add(q0),
                            s.q_row(),
                            scale,
                        );
                    }
                }
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Gradients (dq, dk, dv) and output of causal attention written out key by key in f64,
    /// with the segments' block-diagonal mask and the sliding window: no blocks, no products.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d_out: &[f32],
        s: AttnShape,
        segs: &Segments,
    ) -> [Vec<f64>; 4] {
        let (t_len, hd) = (s.seq, s.head_dim);
        let (qr, kr) = (s.q_row(), s.kv_row());
        let mut out = vec![0.0; q.len()];
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; k.len()]);
        for b in 0..s.batch {
            for (start, len) in segs.row(b, t_len) {
                for h in 0..s.n_heads {
                    let kvh = h / s.group();
                    let qi = |t: usize, d: usize| (b * t_len + start + t) * qr + h * hd + d;
                    let ki = |j: usize, d: usize| (b * t_len + start + j) * kr + kvh * hd + d;
                    for t in 0..len {
                        let keys: Vec<usize> = (0..=t)
                            .filter(|&j| s.window.is_none_or(|w| t - j < w))
                            .collect();
                        let scores: Vec<f64> = keys
                            .iter()
                            .map(|&j| {
                                (0..hd)
                                    .map(|d| q[qi(t, d)] as f64 * k[ki(j, d)] as f64)
                                    .sum::<f64>()
                                    * s.scale as f64
                            })
                            .collect();
                        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                        let sum: f64 = e.iter().sum();
                        let p: Vec<f64> = e.iter().map(|x| x / sum).collect();
                        for (&j, &pj) in keys.iter().zip(&p) {
                            for d in 0..hd {
                                out[qi(t, d)] += pj * v[ki(j, d)] as f64;
                                dv[ki(j, d)] += pj * d_out[qi(t, d)] as f64;
                            }
                        }
                        let dp: Vec<f64> = keys
                            .iter()
                            .map(|&j| {
                                (0..hd)
                                    .map(|d| d_out[qi(t, d)] as f64 * v[ki(j, d)] as f64)
                                    .sum()
                            })
                            .collect();
                        let big_d: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                        for ((&j, &pj), &dpj) in keys.iter().zip(&p).zip(&dp) {
                            let ds = pj * (dpj - big_d) * s.scale as f64;
                            for d in 0..hd {
                                dq[qi(t, d)] += ds * k[ki(j, d)] as f64;
                                dk[ki(j, d)] += ds * q[qi(t, d)] as f64;
                            }
                        }
                    }
                }
            }
        }
        [out, dq, dk, dv]
    }

    /// The causal row blocks (several per segment, a last block that is not whole, a segment
    /// shorter than a block) compute what attention computes key by key: with and without a
    /// sliding window, unpacked and packed rows, grouped KV heads.
    #[test]
    fn causal_blocks_match_attention_written_key_by_key() {
        let seq = 2 * CAUSAL_BLOCK + 22;
        for window in [None, Some(CAUSAL_BLOCK + 7)] {
            let s = AttnShape {
                batch: 2,
                seq,
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 8,
                scale: 0.35,
                window,
            };
            for segs in [
                Segments::unpacked(),
                Segments::packed(vec![vec![CAUSAL_BLOCK + 1, 9, CAUSAL_BLOCK], vec![seq]]),
            ] {
                let n_q = s.batch * seq * s.q_row();
                let n_kv = s.batch * seq * s.kv_row();
                let (q, k, v, d_out) = (data(n_q, 1), data(n_kv, 2), data(n_kv, 3), data(n_q, 4));
                let mut out = vec![f32::NAN; n_q];
                let mut lse = vec![f32::NAN; s.batch * s.n_heads * seq];
                attention_train_forward(&mut out, &mut lse, &q, &k, &v, s, &segs);
                // Dirty outputs: the backward must overwrite every element.
                let (mut dq, mut dk, mut dv) = (
                    vec![f32::NAN; n_q],
                    vec![f32::NAN; n_kv],
                    vec![f32::NAN; n_kv],
                );
                attention_train_backward(
                    &mut dq, &mut dk, &mut dv, &d_out, &q, &k, &v, &out, &lse, s, &segs,
                );
                let want = reference(&q, &k, &v, &d_out, s, &segs);
                for (name, got, want) in [
                    ("out", &out, &want[0]),
                    ("dq", &dq, &want[1]),
                    ("dk", &dk, &want[2]),
                    ("dv", &dv, &want[3]),
                ] {
                    for (i, (g, w)) in got.iter().zip(want).enumerate() {
                        // f32 sums of at most a few hundred terms of size ≤ 1 against f64.
                        assert!(
                            (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{name}[{i}] window {window:?} packed {}: {g} vs {w}",
                            segs.is_packed()
                        );
                    }
                }
            }
        }
    }
}
