//! Matrix products for linear layers whose weights are stored `[out, in]`, as HF stores them.
//!
//! Prefill / training shapes (many rows) go through the `gemm` crate (AVX-512 kernels chosen at
//! run time). Batch-1 decode is a matrix-vector product bound by memory bandwidth: a row-parallel
//! dot-product loop streams each weight row once, which `gemm` does not do as well for m = 1.

use rayon::prelude::*;

/// out[m, n] = x[m, k] · w[n, k]ᵀ (+ out if `accumulate`).
///
/// x: [m, k] row-major, w: [n, k] row-major (a linear layer's `[out, in]`), out: [m, n].
pub fn matmul_nt(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    assert_eq!(
        x.len(),
        m * k,
        "matmul_nt: x has {} elements, expected {m}×{k}",
        x.len()
    );
    assert_eq!(
        w.len(),
        n * k,
        "matmul_nt: w has {} elements, expected {n}×{k}",
        w.len()
    );
    assert_eq!(
        out.len(),
        m * n,
        "matmul_nt: out has {} elements, expected {m}×{n}",
        out.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if m == 1 {
        matvec_rows(out, x, w, k, accumulate);
        return;
    }
    // SAFETY: the asserts above guarantee every (row, col) the strides reach is in bounds:
    // dst (i, j) = out[i*n + j]; lhs (i, p) = x[i*k + p]; rhs (p, j) = w[j*k + p].
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm_parallelism(m, n, k),
        );
    }
}

/// out[m, n] = op(a)[m, k] · op(b)[k, n] (+ out if `accumulate`), where op transposes when
/// asked: a is stored [m, k] (or [k, m] if `a_t`), b is stored [k, n] (or [n, k] if `b_t`).
///
/// The backward passes need every combination: dX = dY·W is (false, false) with W [out, in];
/// dW-like products dBᵀ... are (true, false).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    out: &mut [f32],
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    assert_eq!(
        a.len(),
        m * k,
        "matmul: a has {} elements, expected {m}×{k}",
        a.len()
    );
    assert_eq!(
        b.len(),
        k * n,
        "matmul: b has {} elements, expected {k}×{n}",
        b.len()
    );
    assert_eq!(
        out.len(),
        m * n,
        "matmul: out has {} elements, expected {m}×{n}",
        out.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    let (lhs_cs, lhs_rs) = if a_t {
        (m as isize, 1)
    } else {
        (1, k as isize)
    };
    let (rhs_cs, rhs_rs) = if b_t {
        (k as isize, 1)
    } else {
        (1, n as isize)
    };
    // SAFETY: the asserts above bound every index the strides reach: op(a)[i, p] is a[i*k + p]
    // or a[p*m + i]; op(b)[p, j] is b[p*n + j] or b[j*k + p]; out[i, j] is out[i*n + j].
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            lhs_cs,
            lhs_rs,
            b.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm_parallelism(m, n, k),
        );
    }
}

/// Small products are faster on one thread than split across the pool.
fn gemm_parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    if m * n * k < 64 * 64 * 64 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(0)
    }
}

/// out[n] = w[n, k] · x[k] (+ out if `accumulate`): one dot product per weight row, rows split
/// across threads.
pub fn matvec_rows(out: &mut [f32], x: &[f32], w: &[f32], k: usize, accumulate: bool) {
    let n = out.len();
    assert_eq!(x.len(), k);
    assert_eq!(w.len(), n * k);
    // ~16 KB of weights per task keeps rayon's overhead small against the memory traffic.
    let rows_per_task = (4096 / k.max(1)).max(8);
    out.par_chunks_mut(rows_per_task)
        .zip(w.par_chunks(rows_per_task * k))
        .for_each(|(o, wr)| {
            for (oi, row) in o.iter_mut().zip(wr.chunks_exact(k)) {
                let d = dot(row, x);
                *oi = if accumulate { *oi + d } else { d };
            }
        });
}

/// o[i] += w·v[i], each product rounded before the add (no fused multiply-add), so the AVX-512
/// path and the portable loop give the same bits on every CPU.  o, v: [n].
#[inline]
pub fn add_scaled(o: &mut [f32], w: f32, v: &[f32]) {
    assert_eq!(o.len(), v.len(), "add_scaled: lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected at run time; the assert bounds every access.
            unsafe { add_scaled_avx512(o, w, v) };
            return;
        }
    }
    for (oi, &vi) in o.iter_mut().zip(v) {
        *oi += w * vi;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_scaled_avx512(o: &mut [f32], w: f32, v: &[f32]) {
    use std::arch::x86_64::*;
    let n = o.len();
    let (po, pv) = (o.as_mut_ptr(), v.as_ptr());
    let wv = _mm512_set1_ps(w);
    let mut i = 0;
    while i + 16 <= n {
        let p = _mm512_mul_ps(wv, _mm512_loadu_ps(pv.add(i)));
        _mm512_storeu_ps(po.add(i), _mm512_add_ps(_mm512_loadu_ps(po.add(i)), p));
        i += 16;
    }
    if i < n {
        // n - i < 16 here, so the mask keeps only the lanes inside the slices.
        let mask: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
        let p = _mm512_mul_ps(wv, _mm512_maskz_loadu_ps(mask, pv.add(i)));
        let s = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, po.add(i)), p);
        _mm512_mask_storeu_ps(po.add(i), mask, s);
    }
}

/// Σ a[i]·b[i] with AVX-512 when the CPU has it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected at run time.
            return unsafe { dot_avx512(a, b) };
        }
    }
    dot_portable(a, b)
}

/// Eight independent accumulators so the adds pipeline; LLVM vectorises this with SSE.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm512_setzero_ps();
    let mut acc1 = _mm512_setzero_ps();
    let mut acc2 = _mm512_setzero_ps();
    let mut acc3 = _mm512_setzero_ps();
    let mut i = 0;
    while i + 64 <= n {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc0);
        acc1 = _mm512_fmadd_ps(
            _mm512_loadu_ps(pa.add(i + 16)),
            _mm512_loadu_ps(pb.add(i + 16)),
            acc1,
        );
        acc2 = _mm512_fmadd_ps(
            _mm512_loadu_ps(pa.add(i + 32)),
            _mm512_loadu_ps(pb.add(i + 32)),
            acc2,
        );
        acc3 = _mm512_fmadd_ps(
            _mm512_loadu_ps(pa.add(i + 48)),
            _mm512_loadu_ps(pb.add(i + 48)),
            acc3,
        );
        i += 64;
    }
    while i + 16 <= n {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc0);
        i += 16;
    }
    if i < n {
        // n - i < 16 here, so the mask keeps only the lanes inside the slices.
        let mask: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
        acc1 = _mm512_fmadd_ps(
            _mm512_maskz_loadu_ps(mask, pa.add(i)),
            _mm512_maskz_loadu_ps(mask, pb.add(i)),
            acc1,
        );
    }
    let s = _mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3));
    _mm512_reduce_add_ps(s)
}

/// out[c][r] = dot(w[c], x[r]) for a tile of `C` weight rows and `R` rows of x (w: C rows of
/// length k back to back, x: R rows of length k back to back), each element bit for bit what
/// [`dot`] gives on that pair: the same four accumulators, the same fused multiply-adds in the
/// same order, the same final sums. Only the loads are shared: each weight vector serves R rows
/// and each x vector C weight rows, so a 2 × 3 tile does 6 multiply-adds per 5 loads where one
/// `dot` does 1 per 2. That is what makes the products of many rows (prefill, batched decode)
/// compute-bound instead of load-bound while keeping every element's bits independent of the
/// rows beside it.
///
/// Register budget on AVX-512: 4·R·C accumulators + C weight vectors + 1 x vector ≤ 32, so
/// R·C ≤ 6 (2 × 3 is the widest tile).
#[inline]
pub fn dot_tile<const R: usize, const C: usize>(w: &[f32], x: &[f32], out: &mut [[f32; R]; C]) {
    let k = w.len() / C.max(1);
    assert_eq!(w.len(), C * k, "dot_tile: w is not {C} rows");
    assert_eq!(x.len(), R * k, "dot_tile: x is not {R} rows of {k}");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected at run time; the asserts bound every load.
            unsafe { dot_tile_avx512::<R, C>(w, x, k, out) };
            return;
        }
    }
    for (c, oc) in out.iter_mut().enumerate() {
        for (r, o) in oc.iter_mut().enumerate() {
            *o = dot(&w[c * k..(c + 1) * k], &x[r * k..(r + 1) * k]);
        }
    }
}

// Indexed loops: `acc[r][c][j]` is accumulator j of element (r, c), each named as in
// `dot_avx512`; the loops have constant bounds and unroll into registers.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_tile_avx512<const R: usize, const C: usize>(
    w: &[f32],
    x: &[f32],
    n: usize,
    out: &mut [[f32; R]; C],
) {
    use std::arch::x86_64::*;
    let pw: [*const f32; C] = std::array::from_fn(|c| w.as_ptr().add(c * n));
    let px: [*const f32; R] = std::array::from_fn(|r| x.as_ptr().add(r * n));
    let mut acc = [[[_mm512_setzero_ps(); 4]; C]; R];
    let mut i = 0;
    while i + 64 <= n {
        for j in 0..4 {
            let wv: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(pw[c].add(i + 16 * j)));
            for r in 0..R {
                let xv = _mm512_loadu_ps(px[r].add(i + 16 * j));
                for c in 0..C {
                    acc[r][c][j] = _mm512_fmadd_ps(wv[c], xv, acc[r][c][j]);
                }
            }
        }
        i += 64;
    }
    while i + 16 <= n {
        let wv: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(pw[c].add(i)));
        for r in 0..R {
            let xv = _mm512_loadu_ps(px[r].add(i));
            for c in 0..C {
                acc[r][c][0] = _mm512_fmadd_ps(wv[c], xv, acc[r][c][0]);
            }
        }
        i += 16;
    }
    if i < n {
        // n - i < 16 here, so the mask keeps only the lanes inside the slices.
        let mask: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
        let wv: [__m512; C] = std::array::from_fn(|c| _mm512_maskz_loadu_ps(mask, pw[c].add(i)));
        for r in 0..R {
            let xv = _mm512_maskz_loadu_ps(mask, px[r].add(i));
            for c in 0..C {
                acc[r][c][1] = _mm512_fmadd_ps(wv[c], xv, acc[r][c][1]);
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            let [a0, a1, a2, a3] = acc[r][c];
            let s = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
            out[c][r] = _mm512_reduce_add_ps(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    out[i * n + j] += x[i * k + p] as f64 * w[j * k + p] as f64;
                }
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32
                    / 500.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn matmul_matches_naive_for_all_paths() {
        for &(m, k, n) in &[
            (1, 7, 5),
            (1, 576, 300),
            (3, 5, 4),
            (17, 64, 33),
            (130, 96, 70),
        ] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let mut out = vec![0.0; m * n];
            matmul_nt(&mut out, &x, &w, m, k, n, false);
            let want = naive(&x, &w, m, k, n);
            for (a, b) in out.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "{m}x{k}x{n}: {a} vs {b}"
                );
            }
            // accumulate adds onto what is there
            matmul_nt(&mut out, &x, &w, m, k, n, true);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - 2.0 * b).abs() < 2e-4 * (1.0 + b.abs()));
            }
        }
    }

    #[test]
    fn matmul_handles_every_transpose() {
        let (m, k, n) = (5, 7, 3);
        let a = data(m * k, 5);
        let b = data(k * n, 6);
        let transpose = |x: &[f32], r: usize, c: usize| -> Vec<f32> {
            let mut t = vec![0.0; r * c];
            for i in 0..r {
                for j in 0..c {
                    t[j * r + i] = x[i * c + j];
                }
            }
            t
        };
        // naive(x, w) computes x · wᵀ; with w = bᵀ that is a · b.
        let want = naive(&a, &transpose(&b, k, n), m, k, n);
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let aa = if a_t { transpose(&a, m, k) } else { a.clone() };
            let bb = if b_t { transpose(&b, k, n) } else { b.clone() };
            let mut out = vec![0.0; m * n];
            matmul(&mut out, &aa, a_t, &bb, b_t, m, k, n, false);
            for (x, y) in out.iter().zip(&want) {
                assert!((x - y).abs() < 1e-5, "a_t {a_t} b_t {b_t}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn dot_tile_equals_dots_bitwise() {
        fn check<const R: usize, const C: usize>() {
            for len in [0, 1, 7, 16, 17, 63, 64, 65, 100, 576, 1536] {
                let w = data(C * len, 3);
                let x = data(R * len, 4);
                let mut out = [[f32::NAN; R]; C];
                dot_tile::<R, C>(&w, &x, &mut out);
                for c in 0..C {
                    for r in 0..R {
                        let one = dot(&w[c * len..(c + 1) * len], &x[r * len..(r + 1) * len]);
                        let got = out[c][r];
                        assert_eq!(
                            got.to_bits(),
                            one.to_bits(),
                            "{R}x{C} len {len}, ({r}, {c})"
                        );
                    }
                }
            }
        }
        check::<1, 1>();
        check::<2, 1>();
        check::<1, 3>();
        check::<2, 2>();
        check::<2, 3>();
        check::<4, 1>();
    }

    #[test]
    fn add_scaled_equals_the_scalar_loop_bitwise() {
        for len in [0, 1, 15, 16, 17, 64, 100] {
            let v = data(len, 5);
            let start = data(len, 6);
            let mut got = start.clone();
            add_scaled(&mut got, 0.37, &v);
            for i in 0..len {
                let want = start[i] + 0.37 * v[i];
                assert_eq!(got[i].to_bits(), want.to_bits(), "len {len}, element {i}");
            }
        }
    }

    #[test]
    fn dot_handles_every_tail_length() {
        for len in 0..80 {
            let a = data(len, 3);
            let b = data(len, 4);
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-4, "len {len}");
            assert!(
                (dot_portable(&a, &b) as f64 - want).abs() < 1e-4,
                "len {len}"
            );
        }
    }
}
