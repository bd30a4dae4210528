//! y = x · Wᵀ over 4-bit weight groups with x quantised on the fly to 8 bits, multiplied with
//! AVX512-VNNI's `vpdpbusd` (u8 × i8, 64 multiply-adds per instruction: twice `vdpbf16ps`'s).
//! The forward product of QLoRA training, measured against the bf16 kernels by
//! `examples/matmul_peak` (precision "int8"); not yet wired into training. On a 2-core Xeon
//! with AMX (bench/RESULTS.md, 2026-12-02 evening) it ran at 0.5–0.9× the bf16 tile products but
//! 1.1–2.7× the `vdpbf16ps` ones (AMX turned off): the choice is per CPU, and the CPU it is for
//! is one with VNNI and no tiles.
//!
//! Its ceiling: per (row, 16 columns, group) it issues 8 `vpdpbusd` beside about 7 other vector
//! operations (unpacking the nibbles, shared by 4 rows; the conversion and the two scale
//! multiply-adds), so it cannot pass about 55% of the `vpdpbusd` roof.
//!
//! Weights: a [`QuantMatrix`] with 4-bit levels (Q4_0, Q4_1, Q4_K: w = d·q + m, q in 0..=15,
//! groups of 32 along the reduction) repacked into column panels of 16 output rows: per group,
//! four 64-byte vectors, vector t holding for each of the 16 rows the four levels 4t..4t+4 in
//! its low nibbles and 16+4t..16+4t+4 in its high ones, as `vpdpbusd` reads them.
//!
//! Activations ([`Q8Rows`]): each row in groups of 32 along the reduction, as llama.cpp's
//! q8_0: s = max|x| / 127, xq = round(x / s) in −127..=127. Then per output element
//! y = Σ_g d·s·(Σ q·xq) + m·s·(Σ xq), the integer sum exact, the rest in f32 (one fused
//! multiply-add per group and term, in group order). The only error against the f32 product of
//! the dequantised weights beyond f32 rounding is x's quantisation: |x − s·xq| ≤ s/2, so
//! |y − y_f32| ≤ Σ_g (s_g / 2)·Σ_{i∈g} |w_i| (+ f32 rounding), the bound the tests check.

use rayon::prelude::*;

use crate::engine::quant::{Levels, QuantMatrix};

/// Levels per group, along the reduction.
const GROUP: usize = 32;
/// Output columns per panel (one zmm of 16 i32).
const NV: usize = 16;
/// Rows of x per kernel call.
const MR: usize = 4;
/// Panels per kernel call.
const NP: usize = 2;

/// x [m, k] in groups of 32 along each row: levels, scales and the scaled level sums.
#[derive(Debug, Default, Clone)]
pub struct Q8Rows {
    pub m: usize,
    pub k: usize,
    /// [m, k]
    q: Vec<i8>,
    /// [m, k / 32]: s
    scale: Vec<f32>,
    /// [m, k / 32]: s · Σ xq (the minimum's factor)
    sum: Vec<f32>,
}

impl Q8Rows {
    /// x: [m, k], k a multiple of 32.
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Q8Rows {
        let mut out = Q8Rows::default();
        out.fill(x, m, k);
        out
    }

    /// As [`Q8Rows::quantize`], into this one's buffers.
    pub fn fill(&mut self, x: &[f32], m: usize, k: usize) {
        assert!(
            k.is_multiple_of(GROUP),
            "Q8Rows: k = {k} is not a multiple of {GROUP}"
        );
        assert_eq!(
            x.len(),
            m * k,
            "Q8Rows: x has {} elements, expected {m}×{k}",
            x.len()
        );
        let groups = m * k / GROUP;
        self.m = m;
        self.k = k;
        self.q.resize(m * k, 0);
        self.scale.resize(groups, 0.0);
        self.sum.resize(groups, 0.0);
        let avx512 = avx512_available();
        self.q
            .par_chunks_mut(GROUP * 64)
            .zip(self.scale.par_chunks_mut(64))
            .zip(self.sum.par_chunks_mut(64))
            .zip(x.par_chunks(GROUP * 64))
            .for_each(|(((q, s), sum), x)| {
                for (((q, s), sum), x) in q
                    .chunks_mut(GROUP)
                    .zip(s.iter_mut())
                    .zip(sum.iter_mut())
                    .zip(x.chunks(GROUP))
                {
                    #[cfg(target_arch = "x86_64")]
                    if avx512 {
                        // SAFETY: AVX-512F/BW were detected; both slices hold one group.
                        unsafe { quantize_group_avx512(q, s, sum, x) };
                        continue;
                    }
                    let _ = avx512;
                    quantize_group(q, s, sum, x);
                }
            });
    }
}

/// One group of 32: d = max|x| / 127, q = x · (1/d) rounded to nearest (ties to even, as
/// `vcvtps2dq` rounds), s = d, sum = d · Σ q. |x · (1/d)| ≤ 127 up to one rounding, which rounds
/// back to 127, so no level leaves −127..=127.
fn quantize_group(q: &mut [i8], s: &mut f32, sum: &mut f32, x: &[f32]) {
    let amax = x.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut total = 0i32;
    for (q, &v) in q.iter_mut().zip(x) {
        let l = (v * inv).round_ties_even() as i8;
        *q = l;
        total += l as i32;
    }
    *s = d;
    *sum = d * total as f32;
}

/// [`quantize_group`] on AVX-512: the same operations, so the same bits.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512BW; q and x hold 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_group_avx512(q: &mut [i8], s: &mut f32, sum: &mut f32, x: &[f32]) {
    use std::arch::x86_64::*;
    debug_assert!(q.len() == GROUP && x.len() == GROUP);
    let a = _mm512_loadu_ps(x.as_ptr());
    let b = _mm512_loadu_ps(x.as_ptr().add(16));
    // max is exact, so its order does not matter (no NaN in training activations).
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    let d = amax / 127.0;
    let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));
    let qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(
        q.as_mut_ptr().add(16) as *mut __m128i,
        _mm512_cvtepi32_epi8(qb),
    );
    let total = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    *s = d;
    *sum = d * total as f32;
}

/// Whether the AVX-512 quantisation of x runs here.
fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A [n, k] weight of 4-bit levels, repacked for [`matmul_nt_int8`].
#[derive(Debug, Clone)]
pub struct Int8Panels {
    pub n: usize,
    pub k: usize,
    /// [panels, groups, 4 vectors, 16 rows × 4 bytes]
    levels: Vec<u8>,
    /// [panels, groups, 16]: d
    scale: Vec<f32>,
    /// [panels, groups, 16]: m (zeros where the type has none)
    min: Vec<f32>,
}

impl Int8Panels {
    /// The repacking of `w`, or None unless its levels are 4-bit groups of 32.
    pub fn from_quant(w: &QuantMatrix) -> Option<Int8Panels> {
        if w.levels != Levels::Nibbles || w.group != GROUP {
            return None;
        }
        let (n, k) = (w.rows, w.cols);
        let (panels, groups) = (n.div_ceil(NV), k / GROUP);
        let mut levels = vec![0u8; panels * groups * 4 * 64];
        let mut scale = vec![0.0f32; panels * groups * NV];
        let mut min = vec![0.0f32; panels * groups * NV];
        let (quants, scales, mins) = w.raw_parts();
        for row in 0..n {
            let (j, c) = (row / NV, row % NV);
            for g in 0..groups {
                // The row's group: byte i = level i | level i + 16 << 4, as QuantMatrix holds it.
                let src = &quants[(row * k + g * GROUP) / 2..][..16];
                let at = (j * groups + g) * 4 * 64;
                for t in 0..4 {
                    for e in 0..4 {
                        levels[at + t * 64 + c * 4 + e] = src[4 * t + e];
                    }
                }
                scale[(j * groups + g) * NV + c] = scales[row * groups + g];
                if !mins.is_empty() {
                    min[(j * groups + g) * NV + c] = mins[row * groups + g];
                }
            }
        }
        Some(Int8Panels {
            n,
            k,
            levels,
            scale,
            min,
        })
    }

    pub fn bytes(&self) -> usize {
        self.levels.len() + (self.scale.len() + self.min.len()) * 4
    }
}

/// Whether this CPU runs the `vpdpbusd` kernel.
pub fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// y[m, n] = x · Wᵀ, x already quantised: on `vpdpbusd` where the CPU has it (`vnni`), else the
/// portable kernel, which gives the same bits.
pub fn matmul_nt_int8_with(vnni: bool, y: &mut [f32], x: &Q8Rows, w: &Int8Panels) {
    assert_eq!(x.k, w.k, "matmul_nt_int8: x has {} columns, W {}", x.k, w.k);
    assert_eq!(
        y.len(),
        x.m * w.n,
        "matmul_nt_int8: y has {} elements, expected {}×{}",
        y.len(),
        x.m,
        w.n
    );
    assert!(
        !vnni || vnni_available(),
        "the VNNI kernel needs AVX512-VNNI"
    );
    let (m, n) = (x.m, w.n);
    if m == 0 || n == 0 {
        return;
    }
    let col_blocks = n.div_ceil(NV * NP);
    // Tasks of 64 rows × 32 columns; the columns vary fastest so a task's rows stay in cache.
    let row_blocks = m.div_ceil(64);
    let out = super::SharedMut(y.as_mut_ptr());
    (0..row_blocks * col_blocks)
        .into_par_iter()
        .for_each(|task| {
            let (cb, rb) = (task % col_blocks, task / col_blocks);
            let (r_end, j0) = (((rb + 1) * 64).min(m), cb * NP);
            let panels = NP.min(n.div_ceil(NV) - j0);
            let mut r = rb * 64;
            while r < r_end {
                let rows = MR.min(r_end - r);
                let mut tile = [[0.0f32; NV * NP]; MR];
                #[cfg(target_arch = "x86_64")]
                if vnni {
                    // SAFETY: the features were checked; the indices stay inside x and w.
                    unsafe { tile_vnni(x, w, r, rows, j0, panels, &mut tile) };
                } else {
                    tile_portable(x, w, r, rows, j0, panels, &mut tile);
                }
                #[cfg(not(target_arch = "x86_64"))]
                tile_portable(x, w, r, rows, j0, panels, &mut tile);
                let cols = (n - j0 * NV).min(panels * NV);
                for (i, t) in tile.iter().enumerate().take(rows) {
                    // SAFETY: this task alone writes rows r.., columns j0·16.. of y, inside m × n.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            t.as_ptr(),
                            out.at((r + i) * n + j0 * NV),
                            cols,
                        )
                    };
                }
                r += rows;
            }
        });
}

/// [`matmul_nt_int8_with`] on the best kernel here, quantising x [m, k] first.
pub fn matmul_nt_int8(y: &mut [f32], x: &[f32], m: usize, w: &Int8Panels) {
    let q = Q8Rows::quantize(x, m, w.k);
    matmul_nt_int8_with(vnni_available(), y, &q, w);
}

/// The kernel's arithmetic written out: per group, the exact integer sum, then
/// acc = fma(isum, d·s, acc); acc = fma(m, s·Σxq, acc).
#[allow(clippy::too_many_arguments)]
fn tile_portable(
    x: &Q8Rows,
    w: &Int8Panels,
    r0: usize,
    rows: usize,
    j0: usize,
    panels: usize,
    tile: &mut [[f32; NV * NP]; MR],
) {
    let groups = w.k / GROUP;
    for (i, acc) in tile.iter_mut().enumerate().take(rows) {
        let r = r0 + i;
        for p in 0..panels {
            let j = j0 + p;
            for c in 0..NV {
                let mut a = 0.0f32;
                for g in 0..groups {
                    let lv = &w.levels[(j * groups + g) * 256..][..256];
                    let xq = &x.q[r * x.k + g * GROUP..][..GROUP];
                    let mut isum = 0i32;
                    for t in 0..4 {
                        for e in 0..4 {
                            let b = lv[t * 64 + c * 4 + e];
                            isum += (b & 15) as i32 * xq[4 * t + e] as i32;
                            isum += (b >> 4) as i32 * xq[16 + 4 * t + e] as i32;
                        }
                    }
                    let s = x.scale[r * groups + g];
                    let d = w.scale[(j * groups + g) * NV + c];
                    let mn = w.min[(j * groups + g) * NV + c];
                    a = (isum as f32).mul_add(d * s, a);
                    a = mn.mul_add(x.sum[r * groups + g], a);
                }
                acc[p * NV + c] = a;
            }
        }
    }
}

/// MR rows × NP panels of 16 columns: per group, eight `vpdpbusd` per (row, panel) into a fresh
/// integer sum, then its two fused multiply-adds into the f32 accumulator.
///
/// # Safety
/// The CPU has AVX512F, AVX512BW and AVX512-VNNI; rows r0..r0+rows of x and panels j0..j0+panels
/// of w exist.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_vnni(
    x: &Q8Rows,
    w: &Int8Panels,
    r0: usize,
    rows: usize,
    j0: usize,
    panels: usize,
    tile: &mut [[f32; NV * NP]; MR],
) {
    use std::arch::x86_64::*;
    let groups = w.k / GROUP;
    assert!(r0 + rows <= x.m && j0 + panels <= w.n.div_ceil(NV) && rows <= MR && panels <= NP);
    let mask = _mm512_set1_epi8(0x0f);
    let mut acc = [[_mm512_setzero_ps(); NP]; MR];
    let xq = x.q.as_ptr();
    let lv = w.levels.as_ptr();
    for g in 0..groups {
        let mut isum = [[_mm512_setzero_si512(); NP]; MR];
        for t in 0..4 {
            let mut lo = [_mm512_setzero_si512(); NP];
            let mut hi = [_mm512_setzero_si512(); NP];
            for p in 0..panels {
                let v =
                    _mm512_loadu_si512(lv.add(((j0 + p) * groups + g) * 256 + t * 64) as *const _);
                lo[p] = _mm512_and_si512(v, mask);
                hi[p] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
            }
            for (i, sums) in isum.iter_mut().enumerate().take(rows) {
                let base = xq.add((r0 + i) * x.k + g * GROUP + 4 * t);
                let a_lo = _mm512_set1_epi32((base as *const i32).read_unaligned());
                let a_hi = _mm512_set1_epi32((base.add(16) as *const i32).read_unaligned());
                for p in 0..panels {
                    sums[p] = _mm512_dpbusd_epi32(sums[p], lo[p], a_lo);
                    sums[p] = _mm512_dpbusd_epi32(sums[p], hi[p], a_hi);
                }
            }
        }
        for p in 0..panels {
            let at = ((j0 + p) * groups + g) * NV;
            let d = _mm512_loadu_ps(w.scale.as_ptr().add(at));
            let mn = _mm512_loadu_ps(w.min.as_ptr().add(at));
            for i in 0..rows {
                let xg = (r0 + i) * groups + g;
                let ds = _mm512_mul_ps(d, _mm512_set1_ps(*x.scale.get_unchecked(xg)));
                let s = _mm512_cvtepi32_ps(isum[i][p]);
                acc[i][p] = _mm512_fmadd_ps(s, ds, acc[i][p]);
                acc[i][p] =
                    _mm512_fmadd_ps(mn, _mm512_set1_ps(*x.sum.get_unchecked(xg)), acc[i][p]);
            }
        }
    }
    for i in 0..rows {
        for p in 0..panels {
            _mm512_storeu_ps(tile[i][p * NV..].as_mut_ptr(), acc[i][p]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::GgmlType;

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

    /// Q4_1 blocks (f16 d, f16 m, 16 bytes of nibbles) of random levels and scales, [n, k].
    fn q4_1(n: usize, k: usize, seed: u64) -> QuantMatrix {
        let r = data(n * k / 32 * 2 + n * k, seed);
        let mut bytes = Vec::new();
        for b in 0..n * k / 32 {
            let d = half::f16::from_f32(0.01 + 0.02 * r[2 * b].abs());
            let m = half::f16::from_f32(-0.1 * r[2 * b + 1].abs());
            bytes.extend(d.to_le_bytes());
            bytes.extend(m.to_le_bytes());
            for j in 0..16 {
                let l = |i: usize| ((r[n * k / 16 + b * 32 + i] + 1.0) * 7.99) as u8 & 15;
                bytes.push(l(j) | (l(j + 16) << 4));
            }
        }
        QuantMatrix::from_gguf_blocks(GgmlType::Q4_1, &bytes, n, k, None, "w").unwrap()
    }

    /// Against the f64 product of x and the dequantised weights, within the module's bound
    /// (x's quantisation) plus 1e-5 of Σ|w·x| for f32 rounding; and both kernels equal.
    #[test]
    fn int8_products_stay_within_the_quantisation_bound_and_kernels_agree() {
        // Odd shapes: rows not a multiple of the tile (1, 5, 67), columns not of 32 (48, 16, 80).
        for (m, k, n) in [(1, 64, 48), (5, 32, 16), (67, 96, 80), (130, 576, 96)] {
            let w = q4_1(n, k, (m * 7 + n) as u64);
            let x: Vec<f32> = data(m * k, m as u64).iter().map(|v| v * 3.0).collect();
            let panels = Int8Panels::from_quant(&w).expect("4-bit");
            let q = Q8Rows::quantize(&x, m, k);
            let mut y = vec![f32::NAN; m * n];
            matmul_nt_int8_with(false, &mut y, &q, &panels);
            let wd: Vec<Vec<f32>> = (0..n).map(|c| w.dequantize_row(c)).collect();
            for r in 0..m {
                for c in 0..n {
                    let (mut exact, mut bound, mut mag) = (0.0f64, 0.0f64, 0.0f64);
                    for g in 0..k / 32 {
                        let xs = &x[r * k + g * 32..][..32];
                        let amax = xs.iter().fold(0.0f32, |a, v| a.max(v.abs())) as f64;
                        let mut wsum = 0.0;
                        for (i, &xv) in xs.iter().enumerate() {
                            let wv = wd[c][g * 32 + i] as f64;
                            exact += wv * xv as f64;
                            wsum += wv.abs();
                            mag += (wv * xv as f64).abs();
                        }
                        bound += amax / 127.0 / 2.0 * wsum;
                    }
                    let got = y[r * n + c] as f64;
                    assert!(
                        (got - exact).abs() <= bound + 1e-5 * mag,
                        "[{m}, {k}, {n}] ({r}, {c}): {got} vs {exact}, bound {bound}"
                    );
                }
            }
            if vnni_available() {
                let mut v = vec![f32::NAN; m * n];
                matmul_nt_int8_with(true, &mut v, &q, &panels);
                for (a, b) in v.iter().zip(&y) {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "[{m}, {k}, {n}]: VNNI {a} vs portable {b}"
                    );
                }
            }
        }
    }

    /// The AVX-512 quantisation of x gives the portable one's bits: levels, scales and sums, on
    /// random groups, a group of zeros and one of a single non-zero value.
    #[test]
    fn quantising_x_gives_the_same_bits_on_every_path() {
        if !avx512_available() {
            return;
        }
        let mut x: Vec<f32> = data(32 * 40, 3).iter().map(|v| v * 5.0).collect();
        x[32..64].fill(0.0);
        x[64..96].fill(0.0);
        x[70] = -2.5;
        for g in x.chunks(32) {
            let (mut qa, mut qb) = ([0i8; 32], [0i8; 32]);
            let (mut sa, mut sb, mut ua, mut ub) = (0.0f32, 0.0f32, 0.0f32, 0.0f32);
            quantize_group(&mut qa, &mut sa, &mut ua, g);
            // SAFETY: AVX-512 was detected above.
            unsafe { quantize_group_avx512(&mut qb, &mut sb, &mut ub, g) };
            assert_eq!(qa, qb);
            assert_eq!((sa.to_bits(), ua.to_bits()), (sb.to_bits(), ub.to_bits()));
            assert!(qa.iter().all(|&l| l >= -127));
        }
    }

    #[test]
    fn only_4_bit_groups_repack() {
        let bytes: Vec<u8> = (0..2 * 34)
            .map(|i| if i % 34 < 2 { 0 } else { i as u8 })
            .collect();
        let w = QuantMatrix::from_gguf_blocks(GgmlType::Q8_0, &bytes, 2, 32, None, "w").unwrap();
        assert!(Int8Panels::from_quant(&w).is_none());
    }
}
