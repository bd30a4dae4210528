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
use std::cmp::Reverse;
use std::ops::Range;

use rayon::prelude::*;

use super::matmul::dot;
use super::SharedMut;

/// How attention's products run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnKernel {
    /// AVX-512 register blocks of up to 6 rows × 64 columns, reading Q, K, V and the gradients in
    /// place (only Kᵀ and Vᵀ of a segment are copied) and stopping each block's reduction at the
    /// causal diagonal row by row block. The `gemm` crate packs its operands on every call, which
    /// at these sizes (a segment of ~100 tokens, head_dim 64) cost as much as the products.
    Avx512,
    /// The `gemm` crate on strided views, in causal blocks of [`CAUSAL_BLOCK`] rows (any CPU).
    Gemm,
}

/// The kernel this CPU runs: AVX-512 where it has it (detected once), else `gemm`.
pub fn attn_kernel() -> AttnKernel {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx512f() {
        return AttnKernel::Avx512;
    }
    AttnKernel::Gemm
}

/// A thread's scratch, kept between calls (allocating and zeroing per task was a share of the
/// step): the probabilities P and their gradient ([L, L] for the longest segment seen), and a
/// segment's Kᵀ and Vᵀ ([head_dim, L]). Every use overwrites the prefix it reads.
#[derive(Default)]
struct Scratch {
    p: Vec<f32>,
    dp: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Runs `f` on this thread's scratch, each of P and dP at least `scores` long and Kᵀ, Vᵀ at least
/// `keys_t` long.
fn with_scratch<R>(scores: usize, keys_t: usize, f: impl FnOnce(&mut Scratch) -> R) -> R {
    let grow = |v: &mut Vec<f32>, n: usize| {
        if v.len() < n {
            v.resize(n, 0.0);
        }
    };
    let fit = |s: &mut Scratch| {
        grow(&mut s.p, scores);
        grow(&mut s.dp, scores);
        grow(&mut s.kt, keys_t);
        grow(&mut s.vt, keys_t);
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => {
            fit(&mut s);
            f(&mut s)
        }
        // Not reached (the tasks make no nested calls); fresh buffers keep it correct anyway.
        Err(_) => {
            let mut s = Scratch::default();
            fit(&mut s);
            f(&mut s)
        }
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

/// The products of one segment on the AVX-512 kernel.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Rows per register block: 6 rows × 4 vectors of 16 is 24 accumulators, plus 4 vectors of B
    /// and a broadcast, within the 32 registers.
    const MR: usize = 6;
    /// Columns per register block (4 vectors of 16).
    const NC: usize = 64;

    /// C[i, 0..n] (+)= beta · Σ_k A(i, k) · B[k, 0..n] for the `rows` rows of C, in blocks of
    /// [`MR`] rows i0..i1: each block sums k over `reduction(i0, i1)` and writes the first
    /// `cols(i0, i1)` columns. A(i, k) is `a[i·a_rs + k·a_cs]` (any strides: its elements are
    /// broadcast), B's rows are `b_rs` apart, C's `c_rs`; with `accumulate` C is added to.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, and every element the strides reach for the given ranges
    /// (k < the largest reduction end, columns < cols) must be inside the caller's buffers;
    /// C must not overlap A or B.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn blocked(
        rows: usize,
        (a, a_rs, a_cs): (*const f32, usize, usize),
        (b, b_rs): (*const f32, usize),
        (c, c_rs): (*mut f32, usize),
        beta: f32,
        accumulate: bool,
        reduction: impl Fn(usize, usize) -> Range<usize>,
        cols: impl Fn(usize, usize) -> usize,
    ) {
        for i0 in (0..rows).step_by(MR) {
            let i1 = (i0 + MR).min(rows);
            let ks = reduction(i0, i1);
            let n = cols(i0, i1);
            for c0 in (0..n).step_by(NC) {
                let nc = (n - c0).min(NC);
                let blk = Block {
                    depth: ks.len(),
                    a: a.add(i0 * a_rs + ks.start * a_cs),
                    a_rs,
                    a_cs,
                    b: b.add(ks.start * b_rs + c0),
                    b_rs,
                    c: c.add(i0 * c_rs + c0),
                    c_rs,
                    cols: nc,
                    beta,
                    accumulate,
                };
                // One instance per (rows, vectors): the accumulators stay in registers.
                macro_rules! by_vectors {
                    ($m:literal) => {
                        match nc.div_ceil(16) {
                            1 => micro::<$m, 1>(&blk),
                            2 => micro::<$m, 2>(&blk),
                            3 => micro::<$m, 3>(&blk),
                            _ => micro::<$m, 4>(&blk),
                        }
                    };
                }
                match i1 - i0 {
                    1 => by_vectors!(1),
                    2 => by_vectors!(2),
                    3 => by_vectors!(3),
                    4 => by_vectors!(4),
                    5 => by_vectors!(5),
                    _ => by_vectors!(6),
                }
            }
        }
    }

    /// One register block of [`blocked`]: its first element of A, B and C.
    struct Block {
        depth: usize,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        b_rs: usize,
        c: *mut f32,
        c_rs: usize,
        cols: usize,
        beta: f32,
        accumulate: bool,
    }

    /// C[M, cols] (+)= beta · A[M, depth] · B[depth, cols], cols ≤ 16·V, in M × V registers; the
    /// k-th term is added to each sum in order k = 0, 1, …, as one FMA.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn micro<const M: usize, const V: usize>(blk: &Block) {
        // The columns each vector holds: all 16 but in the last, which may hold fewer (masked
        // loads of absent columns read nothing and cannot fault).
        let mut masks = [0 as __mmask16; V];
        for (v, m) in masks.iter_mut().enumerate() {
            let n = blk.cols.saturating_sub(16 * v).min(16);
            *m = ((1u32 << n) - 1) as __mmask16;
        }
        let mut acc = [[_mm512_setzero_ps(); V]; M];
        for k in 0..blk.depth {
            let b_row = blk.b.add(k * blk.b_rs);
            let mut bv = [_mm512_setzero_ps(); V];
            for v in 0..V {
                bv[v] = _mm512_maskz_loadu_ps(masks[v], b_row.add(16 * v));
            }
            let a_col = blk.a.add(k * blk.a_cs);
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*a_col.add(i * blk.a_rs));
                for v in 0..V {
                    acc_i[v] = _mm512_fmadd_ps(ai, bv[v], acc_i[v]);
                }
            }
        }
        let beta = _mm512_set1_ps(blk.beta);
        for (i, acc_i) in acc.iter().enumerate() {
            let c_row = blk.c.add(i * blk.c_rs);
            for v in 0..V {
                let p = c_row.add(16 * v);
                let mut r = _mm512_mul_ps(acc_i[v], beta);
                if blk.accumulate {
                    r = _mm512_add_ps(_mm512_maskz_loadu_ps(masks[v], p), r);
                }
                _mm512_mask_storeu_ps(p, masks[v], r);
            }
        }
    }
}

/// dst[d · ld + j] = src[j · row + d] for j < len, d < hd: one segment's keys (or values) of one
/// KV head, [len, hd] at row stride `row` → [hd, ld], the B operand of a score product.
fn transpose_keys(dst: &mut [f32], src: &[f32], row: usize, len: usize, hd: usize, ld: usize) {
    for (j, r) in src.chunks(row).take(len).enumerate() {
        for (d, &x) in r[..hd].iter().enumerate() {
            dst[d * ld + j] = x;
        }
    }
}

/// dst[len, len] = scale · A Bᵀ for one segment and head: A [len, hd] at a[a0..] (row stride
/// s.q_row()), B the segment's keys (or values) of its KV head at keys[kv0..] (row stride
/// s.kv_row()), given transposed as keys_t [hd, ld] for AVX-512. Only row block i0..i1's columns
/// 0..i1 are written (the rest is above the diagonal, which the caller masks).
///
/// # Safety
/// As [`head_scores`]; keys_t must hold the transposed keys when the kernel is AVX-512.
#[allow(clippy::too_many_arguments)]
unsafe fn scores(
    kernel: AttnKernel,
    dst: &mut [f32],
    a: &[f32],
    a0: usize,
    (keys, kv0, keys_t, ld): (&[f32], usize, &[f32], usize),
    len: usize,
    s: AttnShape,
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        AttnKernel::Avx512 => avx512::blocked(
            len,
            (a.as_ptr().add(a0), s.q_row(), 1),
            (keys_t.as_ptr(), ld),
            (dst.as_mut_ptr(), len),
            s.scale,
            false,
            |_, _| 0..s.head_dim,
            |_, i1| i1,
        ),
        _ => head_scores(dst, a, keys, a0, kv0, len, s),
    }
}

/// dst[len, hd] (+)= beta · op(P) · R as [`causal_times`], on the given kernel.
///
/// # Safety
/// As [`causal_times`].
#[allow(clippy::too_many_arguments)]
unsafe fn times(
    kernel: AttnKernel,
    transposed: bool,
    len: usize,
    hd: usize,
    (dst, dst_rs, accumulate): (*mut f32, usize, bool),
    p: &[f32],
    (r, r_rs): (*const f32, usize),
    beta: f32,
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        AttnKernel::Avx512 if transposed => avx512::blocked(
            len,
            // op(P)(j, t) = P[t, j]; P[t, j] = 0 for t < j, so row block j0..j1 sums t ≥ j0.
            (p.as_ptr(), 1, len),
            (r, r_rs),
            (dst, dst_rs),
            beta,
            accumulate,
            |j0, _| j0..len,
            |_, _| hd,
        ),
        #[cfg(target_arch = "x86_64")]
        AttnKernel::Avx512 => avx512::blocked(
            len,
            // P[t, j] = 0 for j > t, so row block t0..t1 sums j < t1.
            (p.as_ptr(), len, 1),
            (r, r_rs),
            (dst, dst_rs),
            beta,
            accumulate,
            |_, t1| 0..t1,
            |_, _| hd,
        ),
        _ => causal_times(
            transposed, len, hd, dst, dst_rs, accumulate, p, r, r_rs, beta,
        ),
    }
}

avx512_variant! {
    /// dS = P ⊙ (dP − D) in place of dP, D_t = dO_t · O_t, for one segment and head: dp, p
    /// [len, len]; dO and O rows of `hd` at d_out[q0 + t · q_row..] and out[..]. Zero above the
    /// diagonal, where P is 0 (written, as dP was not computed everywhere there).
    fn softmax_grad_rows(
        dp: &mut [f32],
        p: &[f32],
        len: usize,
        rows: (&[f32], &[f32], usize, usize, usize),
    ) {
        let (d_out, out, q0, q_row, hd) = rows;
        for t in 0..len {
            let row = q0 + t * q_row;
            let d_t = dot(&d_out[row..row + hd], &out[row..row + hd]);
            let (pr, dpr) = (&p[t * len..(t + 1) * len], &mut dp[t * len..(t + 1) * len]);
            let (live, above) = dpr.split_at_mut(t + 1);
            for (x, &pv) in live.iter_mut().zip(pr) {
                *x = pv * (*x - d_t);
            }
            above.fill(0.0);
        }
    }
}

/// One task of the attention passes: one segment of one row and one KV head with the query heads
/// that share it. No two tasks write the same element of any output.
#[derive(Debug, Clone, Copy)]
struct Task {
    b: usize,
    start: usize,
    len: usize,
    kvh: usize,
}

impl Task {
    /// Offset of the task's first row in k / v.
    fn kv0(&self, s: AttnShape) -> usize {
        (self.b * s.seq + self.start) * s.kv_row() + self.kvh * s.head_dim
    }

    /// Offset of the task's first row of query head h in q / out.
    fn q0(&self, s: AttnShape, h: usize) -> usize {
        (self.b * s.seq + self.start) * s.q_row() + h * s.head_dim
    }

    /// The query heads that read this task's KV head.
    fn heads(&self, s: AttnShape) -> Range<usize> {
        self.kvh * s.group()..(self.kvh + 1) * s.group()
    }
}

/// Every (segment, KV head) of the batch, longest segment first: a task costs about len², and
/// with the long ones started first the last tasks to finish are short, so both cores stay busy
/// (one task per row and head left a packed row of 3 KV heads on 2 threads a third idle).
fn tasks(s: AttnShape, segs: &Segments) -> Vec<Task> {
    let mut tasks: Vec<Task> = (0..s.batch)
        .flat_map(|b| segs.row(b, s.seq).map(move |(start, len)| (b, start, len)))
        .flat_map(|(b, start, len)| (0..s.n_kv_heads).map(move |kvh| Task { b, start, len, kvh }))
        .collect();
    tasks.sort_by_key(|t| Reverse(t.len));
    tasks
}

/// Row stride of a segment's transposed keys: a whole number of vectors.
fn keys_t_stride(len: usize) -> usize {
    len.next_multiple_of(16)
}

/// Scratch for one segment's Kᵀ or Vᵀ, up to `longest` rows: copied for the AVX-512 kernel only.
fn keys_t_len(kernel: AttnKernel, hd: usize, longest: usize) -> usize {
    match kernel {
        AttnKernel::Avx512 => hd * keys_t_stride(longest),
        AttnKernel::Gemm => 0,
    }
}

/// Panics, naming `what` and the buffer, unless every query-shaped buffer (`queries`: name,
/// length) holds [B·T, n_heads·head_dim], every key-shaped one [B·T, n_kv_heads·head_dim], lse
/// [B, n_heads, T], and the segments fit the rows; returns the longest segment.
fn check_shapes(
    what: &str,
    s: AttnShape,
    segs: &Segments,
    queries: &[(&str, usize)],
    keys: &[(&str, usize)],
    lse: usize,
) -> usize {
    let rows = s.batch * s.seq;
    for (names, row) in [(queries, s.q_row()), (keys, s.kv_row())] {
        for &(name, len) in names {
            assert_eq!(len, rows * row, "{what}: {name}");
        }
    }
    assert_eq!(lse, s.batch * s.n_heads * s.seq, "{what}: lse");
    if let Err(e) = segs.check(s.batch, s.seq) {
        panic!("{what}: {e}");
    }
    segs.longest(s.seq)
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
    attention_forward_on(attn_kernel(), (out, lse), [q, k, v], s, segs)
}

/// [`attention_train_forward`] on a given kernel.
fn attention_forward_on(
    kernel: AttnKernel,
    (out, lse): (&mut [f32], &mut [f32]),
    [q, k, v]: [&[f32]; 3],
    s: AttnShape,
    segs: &Segments,
) {
    let (t_len, hd) = (s.seq, s.head_dim);
    let longest = check_shapes(
        "attention_train_forward",
        s,
        segs,
        &[("q", q.len()), ("out", out.len())],
        &[("k", k.len()), ("v", v.len())],
        lse.len(),
    );
    let keys_t = keys_t_len(kernel, hd, longest);
    let (out_ptr, lse_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
    tasks(s, segs).par_iter().with_max_len(1).for_each(|t| {
        with_scratch(longest * longest, keys_t, |scr| {
            let (len, kv0, ld) = (t.len, t.kv0(s), keys_t_stride(t.len));
            if kernel == AttnKernel::Avx512 {
                transpose_keys(&mut scr.kt, &k[kv0..], s.kv_row(), len, hd, ld);
            }
            for h in t.heads(s) {
                let q0 = t.q0(s, h);
                let sc = &mut scr.p[..len * len];
                // SAFETY: the asserts above bound the views (the segments lie inside the row);
                // this task alone writes out and lse of its segment's rows of heads t.heads().
                unsafe {
                    let lse_row = std::slice::from_raw_parts_mut(
                        lse_ptr.at((t.b * s.n_heads + h) * t_len + t.start),
                        len,
                    );
                    // S = scale · Q Kᵀ: [L, hd] · [hd, L]
                    scores(kernel, sc, q, q0, (k, kv0, &scr.kt, ld), len, s);
                    causal_exp_rows(sc, len, s.window, None, lse_row);
                    // O = P V: [L, L] · [L, hd]
                    times(
                        kernel,
                        false,
                        len,
                        hd,
                        (out_ptr.at(q0), s.q_row(), false),
                        sc,
                        (v.as_ptr().add(kv0), s.kv_row()),
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
    attention_backward_on(
        attn_kernel(),
        [dq, dk, dv],
        d_out,
        [q, k, v, out],
        lse,
        s,
        segs,
    )
}

/// [`attention_train_backward`] on a given kernel.
fn attention_backward_on(
    kernel: AttnKernel,
    [dq, dk, dv]: [&mut [f32]; 3],
    d_out: &[f32],
    [q, k, v, out]: [&[f32]; 4],
    lse: &[f32],
    s: AttnShape,
    segs: &Segments,
) {
    let (t_len, hd) = (s.seq, s.head_dim);
    let scale = s.scale;
    let longest = check_shapes(
        "attention_train_backward",
        s,
        segs,
        &[
            ("q", q.len()),
            ("out", out.len()),
            ("d_out", d_out.len()),
            ("dq", dq.len()),
        ],
        &[
            ("k", k.len()),
            ("v", v.len()),
            ("dk", dk.len()),
            ("dv", dv.len()),
        ],
        lse.len(),
    );
    let keys_t = keys_t_len(kernel, hd, longest);
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    tasks(s, segs).par_iter().with_max_len(1).for_each(|t| {
        with_scratch(longest * longest, keys_t, |scr| {
            let (len, kv0, ld) = (t.len, t.kv0(s), keys_t_stride(t.len));
            if kernel == AttnKernel::Avx512 {
                transpose_keys(&mut scr.kt, &k[kv0..], s.kv_row(), len, hd, ld);
                transpose_keys(&mut scr.vt, &v[kv0..], s.kv_row(), len, hd, ld);
            }
            for (i, h) in t.heads(s).enumerate() {
                let first = i == 0;
                let q0 = t.q0(s, h);
                let (p, dp) = (&mut scr.p[..len * len], &mut scr.dp[..len * len]);
                // SAFETY: the asserts above bound every view (the segments lie inside the row);
                // dk/dv rows of the task's segment and KV head, and its dq rows of heads
                // t.heads(), belong to this task only.
                unsafe {
                    scores(kernel, p, q, q0, (k, kv0, &scr.kt, ld), len, s);
                    let lse_row = &lse[(t.b * s.n_heads + h) * t_len + t.start..][..len];
                    causal_exp_rows(p, len, s.window, Some(lse_row), &mut []);
                    // dV (+)= Pᵀ dO
                    times(
                        kernel,
                        true,
                        len,
                        hd,
                        (dv_ptr.at(kv0), s.kv_row(), !first),
                        p,
                        (d_out.as_ptr().add(q0), s.q_row()),
                        1.0,
                    );
                    // dP = dO Vᵀ, on and below the diagonal's blocks (as the scores).
                    let unscaled = AttnShape { scale: 1.0, ..s };
                    scores(kernel, dp, d_out, q0, (v, kv0, &scr.vt, ld), len, unscaled);
                }
                // dS = P ⊙ (dP − D), D_t = dO_t · O_t; 0 above the diagonal, where P is 0
                // (written, as dP was not computed everywhere there).
                softmax_grad_rows(dp, p, len, (d_out, out, q0, s.q_row(), hd));
                unsafe {
                    // dQ = scale · dS K
                    times(
                        kernel,
                        false,
                        len,
                        hd,
                        (dq_ptr.at(q0), s.q_row(), false),
                        dp,
                        (k.as_ptr().add(kv0), s.kv_row()),
                        scale,
                    );
                    // dK (+)= scale · dSᵀ Q
                    times(
                        kernel,
                        true,
                        len,
                        hd,
                        (dk_ptr.at(kv0), s.kv_row(), !first),
                        dp,
                        (q.as_ptr().add(q0), s.q_row()),
                        scale,
                    );
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

    /// The kernels this CPU can run: `gemm` everywhere, AVX-512 where present.
    fn kernels() -> Vec<AttnKernel> {
        let mut k = vec![AttnKernel::Gemm];
        if attn_kernel() == AttnKernel::Avx512 {
            k.push(AttnKernel::Avx512);
        } else {
            eprintln!("this CPU has no AVX-512: only the gemm kernel is checked");
        }
        k
    }

    /// Both kernels, with their row blocks (several per segment, a last block that is not whole,
    /// a segment shorter than a block, a head wider than one register block and not a whole
    /// number of vectors), compute what attention computes key by key: with and without a
    /// sliding window, unpacked and packed rows, grouped KV heads.
    #[test]
    fn causal_blocks_match_attention_written_key_by_key() {
        let seq = 2 * CAUSAL_BLOCK + 22;
        for kernel in kernels() {
            for (head_dim, window) in [(8, None), (8, Some(CAUSAL_BLOCK + 7)), (72, None)] {
                let s = AttnShape {
                    batch: 2,
                    seq,
                    n_heads: 4,
                    n_kv_heads: 2,
                    head_dim,
                    scale: 0.35,
                    window,
                };
                for segs in [
                    Segments::unpacked(),
                    Segments::packed(vec![vec![CAUSAL_BLOCK + 1, 9, CAUSAL_BLOCK], vec![seq]]),
                ] {
                    check_against_reference(kernel, s, &segs);
                }
            }
        }
    }

    fn check_against_reference(kernel: AttnKernel, s: AttnShape, segs: &Segments) {
        let seq = s.seq;
        let n_q = s.batch * seq * s.q_row();
        let n_kv = s.batch * seq * s.kv_row();
        let (q, k, v, d_out) = (data(n_q, 1), data(n_kv, 2), data(n_kv, 3), data(n_q, 4));
        let mut out = vec![f32::NAN; n_q];
        let mut lse = vec![f32::NAN; s.batch * s.n_heads * seq];
        attention_forward_on(kernel, (&mut out, &mut lse), [&q, &k, &v], s, segs);
        // Dirty outputs: the backward must overwrite every element.
        let (mut dq, mut dk, mut dv) = (
            vec![f32::NAN; n_q],
            vec![f32::NAN; n_kv],
            vec![f32::NAN; n_kv],
        );
        attention_backward_on(
            kernel,
            [&mut dq, &mut dk, &mut dv],
            &d_out,
            [&q, &k, &v, &out],
            &lse,
            s,
            segs,
        );
        let want = reference(&q, &k, &v, &d_out, s, segs);
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
                    "{kernel:?} {name}[{i}] head_dim {} window {:?} packed {}: {g} vs {w}",
                    s.head_dim,
                    s.window,
                    segs.is_packed()
                );
            }
        }
    }
}
