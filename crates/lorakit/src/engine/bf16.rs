//! bf16 matrix products with f32 accumulation (AVX512-BF16 `vdpbf16ps`), for frozen weights.
//!
//! A frozen weight is converted once to bf16 and packed in the VNNI layout the instruction
//! wants: column panels of [`NR`] output columns, each holding, for every pair of the
//! reduction dimension, `NR × 2` bf16 values. The activation side is converted to bf16 on
//! every call (m·k work against m·k·n multiply-adds). Each `vdpbf16ps` does 32 multiply-adds,
//! twice an f32 FMA, which is what `--precision bf16` buys on CPUs without AMX.

use half::bf16;
use rayon::prelude::*;

/// Output columns per packed panel (4 zmm registers of 16 f32).
pub const NR: usize = 64;
/// Rows of the activation per micro-kernel call (6 × 4 accumulators + 4 B + 1 A registers).
const MR: usize = 6;
/// Micro-blocks of MR rows per rayon task.
const BLOCKS_PER_TASK: usize = 16;

/// B [k, n] in bf16, packed for `matmul_bf16`: panel j, pair p → NR columns × (k = 2p, 2p + 1).
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    pub k: usize,
    pub n: usize,
    k_pairs: usize,
    data: Vec<u16>,
}

impl PackedBf16 {
    /// Packs B given element-wise: `b(kk, nn)` for kk < k, nn < n.
    fn pack(k: usize, n: usize, b: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let k_pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let panel_len = k_pairs * NR * 2;
        let mut data = vec![0u16; panels * panel_len];
        data.par_chunks_mut(panel_len)
            .enumerate()
            .for_each(|(j, panel)| {
                for p in 0..k_pairs {
                    for c in 0..NR {
                        let nn = j * NR + c;
                        for e in 0..2 {
                            let kk = 2 * p + e;
                            if nn < n && kk < k {
                                panel[(p * NR + c) * 2 + e] = bf16::from_f32(b(kk, nn)).to_bits();
                            }
                        }
                    }
                }
            });
        PackedBf16 {
            k,
            n,
            k_pairs,
            data,
        }
    }

    /// For out = x · Wᵀ with W [n, k] row-major (a linear layer's forward).
    pub fn for_x_wt(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k);
        Self::pack(k, n, |kk, nn| w[nn * k + kk])
    }

    /// For out = dy · W with W [k, n] row-major (a linear layer's input gradient).
    pub fn for_x_w(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n);
        Self::pack(k, n, |kk, nn| w[kk * n + nn])
    }

    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }
}

/// Whether this CPU runs the bf16 kernels.
pub fn bf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// x [m, k] f32 → bf16 [m, 2·k_pairs] (round to nearest even; the odd tail padded with 0).
fn convert_rows(x: &[f32], m: usize, k: usize, k_pairs: usize) -> Vec<u16> {
    let kp = 2 * k_pairs;
    let mut out = vec![0u16; m * kp];
    out.par_chunks_mut(kp)
        .zip(x.par_chunks(k))
        .with_min_len(16)
        .for_each(|(o, r)| {
            for (oi, &v) in o.iter_mut().zip(r) {
                *oi = bf16::from_f32(v).to_bits();
            }
        });
    out
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// out[m, n] (+)= x[m, k] · B[k, n] with B packed in bf16; f32 accumulation.
pub fn matmul_bf16(out: &mut [f32], x: &[f32], m: usize, b: &PackedBf16, accumulate: bool) {
    let (k, n) = (b.k, b.n);
    assert_eq!(
        x.len(),
        m * k,
        "matmul_bf16: x has {} elements, expected {m}×{k}",
        x.len()
    );
    assert_eq!(
        out.len(),
        m * n,
        "matmul_bf16: out has {} elements, expected {m}×{n}",
        out.len()
    );
    assert!(
        bf16_supported(),
        "matmul_bf16 needs AVX512-BF16; callers check bf16_supported()"
    );
    if m == 0 || n == 0 {
        return;
    }
    let a = convert_rows(x, m, k, b.k_pairs);
    let panels = n.div_ceil(NR);
    let row_groups = m.div_ceil(MR * BLOCKS_PER_TASK);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let panel_len = b.k_pairs * NR * 2;
    (0..panels * row_groups).into_par_iter().for_each(|task| {
        let (j, g) = (task % panels, task / panels);
        let panel = &b.data[j * panel_len..(j + 1) * panel_len];
        let cols = NR.min(n - j * NR);
        let row_end = ((g + 1) * MR * BLOCKS_PER_TASK).min(m);
        let mut r0 = g * MR * BLOCKS_PER_TASK;
        while r0 < row_end {
            let rows = MR.min(row_end - r0);
            // SAFETY: AVX512-BF16 was asserted above; this task alone writes rows
            // r0..r0+rows, columns j·NR..j·NR+cols of out, all inside its m × n bounds.
            unsafe {
                #[cfg(target_arch = "x86_64")]
                micro_kernel(
                    &a[r0 * 2 * b.k_pairs..],
                    2 * b.k_pairs,
                    rows,
                    panel,
                    b.k_pairs,
                    out_ptr.get().add(r0 * n + j * NR),
                    n,
                    cols,
                    accumulate,
                );
            }
            r0 += rows;
        }
    });
}

/// C[rows ≤ MR, cols ≤ NR] (+)= A[rows, 2·k_pairs] · panel, A bf16 row-major with stride `lda`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_kernel(
    a: &[u16],
    lda: usize,
    rows: usize,
    panel: &[u16],
    k_pairs: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 4]; MR];
    let bp = panel.as_ptr();
    let ap = a.as_ptr();
    for p in 0..k_pairs {
        let bq = bp.add(p * NR * 2);
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq.add(32) as *const _));
        let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq.add(64) as *const _));
        let b3: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq.add(96) as *const _));
        for (r, acc_r) in acc.iter_mut().enumerate().take(rows) {
            let pair = (ap.add(r * lda + 2 * p) as *const i32).read_unaligned();
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            acc_r[0] = _mm512_dpbf16_ps(acc_r[0], av, b0);
            acc_r[1] = _mm512_dpbf16_ps(acc_r[1], av, b1);
            acc_r[2] = _mm512_dpbf16_ps(acc_r[2], av, b2);
            acc_r[3] = _mm512_dpbf16_ps(acc_r[3], av, b3);
        }
    }
    for (r, acc_r) in acc.iter().enumerate().take(rows) {
        let crow = c.add(r * ldc);
        for (q, v) in acc_r.iter().enumerate() {
            let start = q * 16;
            if start >= cols {
                break;
            }
            let live = (cols - start).min(16);
            let mask: __mmask16 = if live == 16 {
                0xffff
            } else {
                ((1u32 << live) - 1) as u16
            };
            let dst = crow.add(start);
            let v = if accumulate {
                _mm512_add_ps(*v, _mm512_maskz_loadu_ps(mask, dst))
            } else {
                *v
            };
            _mm512_mask_storeu_ps(dst, mask, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32
                    / 500.0
                    - 1.0
            })
            .collect()
    }

    /// Exact product of the bf16-rounded inputs, in f64.
    fn reference(x: &[f32], w_nk: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let r = |v: f32| bf16::from_f32(v).to_f32() as f64;
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| r(x[i * k + p]) * r(w_nk[j * k + p])).sum();
            }
        }
        out
    }

    #[test]
    fn bf16_matmul_equals_the_product_of_rounded_inputs() {
        if !bf16_supported() {
            panic!("this test needs AVX512-BF16, which the project's machines have");
        }
        for &(m, k, n) in &[(1, 7, 5), (7, 33, 70), (13, 64, 129), (100, 576, 64)] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let want = reference(&x, &w, m, k, n);
            let mut out = vec![0.5f32; m * n];
            matmul_bf16(&mut out, &x, m, &PackedBf16::for_x_wt(&w, n, k), false);
            let tol = 1e-5 * k as f64;
            for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                assert!((*a as f64 - b).abs() < tol, "{m}x{k}x{n} [{i}]: {a} vs {b}");
            }
            // Accumulate, and the transposed packing gives the same product.
            let mut wt = vec![0.0; k * n];
            for j in 0..n {
                for p in 0..k {
                    wt[p * n + j] = w[j * k + p];
                }
            }
            matmul_bf16(&mut out, &x, m, &PackedBf16::for_x_w(&wt, k, n), true);
            for (a, b) in out.iter().zip(&want) {
                assert!((*a as f64 - 2.0 * b).abs() < 2.0 * tol);
            }
        }
    }
}
