//! Products with weights kept in the GGUF's own quantised blocks (`--precision gguf`), for
//! decoding: a 135M model's Q4_1 weights are a third of its bf16 bytes, and decode is bound by
//! memory bandwidth. Each weight is used exactly as `dequantize` defines it (w = d·q + m for
//! Q4_1, w = d·q for Q8_0, in f32), so results differ from the f32 path only by summation order.
//!
//! The blocks are re-laid out once at load: scales and minimums as f32 arrays beside the packed
//! quants, so the kernel does no f16 conversion.

use rayon::prelude::*;

use crate::engine::matmul::dot;
use crate::error::{Error, Result};

/// Weights per block (both formats).
pub const BLOCK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    /// 32 weights: f16 d, f16 m, 16 bytes of nibbles (element j low, j+16 high).
    Q4_1,
    /// 32 weights: f16 d, 32 int8.
    Q8_0,
}

/// A [rows, cols] matrix in quantised blocks along each row.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    pub kind: QuantKind,
    pub rows: usize,
    pub cols: usize,
    /// [rows, cols / 32]
    scales: Vec<f32>,
    /// [rows, cols / 32] (Q4_1 only; empty for Q8_0)
    mins: Vec<f32>,
    /// Q4_1: [rows, cols / 32, 16] bytes; Q8_0: [rows, cols / 32, 32] bytes.
    quants: Vec<u8>,
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

impl QuantMatrix {
    /// From GGUF block bytes, rows in `row_order` (row i of the result is stored row
    /// `row_order[i]`; the identity when None). `what` names the tensor in errors.
    pub fn from_gguf_blocks(
        kind: QuantKind,
        bytes: &[u8],
        rows: usize,
        cols: usize,
        row_order: Option<&[usize]>,
        what: &str,
    ) -> Result<QuantMatrix> {
        let (block_bytes, q_bytes) = match kind {
            QuantKind::Q4_1 => (20, 16),
            QuantKind::Q8_0 => (34, 32),
        };
        let nb = cols / BLOCK;
        if !cols.is_multiple_of(BLOCK) || bytes.len() != rows * nb * block_bytes {
            return Err(Error::Invalid(format!(
                "{what}: {} bytes do not hold [{rows}, {cols}] in {kind:?} blocks",
                bytes.len()
            )));
        }
        let mut m = QuantMatrix {
            kind,
            rows,
            cols,
            scales: Vec::with_capacity(rows * nb),
            mins: Vec::with_capacity(if kind == QuantKind::Q4_1 {
                rows * nb
            } else {
                0
            }),
            quants: Vec::with_capacity(rows * nb * q_bytes),
        };
        for i in 0..rows {
            let r = row_order.map_or(i, |o| o[i]);
            let row = &bytes[r * nb * block_bytes..(r + 1) * nb * block_bytes];
            for blk in row.chunks_exact(block_bytes) {
                m.scales.push(f16_at(blk, 0));
                match kind {
                    QuantKind::Q4_1 => {
                        m.mins.push(f16_at(blk, 2));
                        m.quants.extend_from_slice(&blk[4..20]);
                    }
                    QuantKind::Q8_0 => m.quants.extend_from_slice(&blk[2..34]),
                }
            }
        }
        Ok(m)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        (self.scales.len() + self.mins.len()) * 4 + self.quants.len()
    }

    /// Row `r` dequantised (tests and reference).  → [cols]
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let nb = self.cols / BLOCK;
        let mut out = Vec::with_capacity(self.cols);
        for b in 0..nb {
            let d = self.scales[r * nb + b];
            match self.kind {
                QuantKind::Q4_1 => {
                    let q = &self.quants[(r * nb + b) * 16..][..16];
                    let m = self.mins[r * nb + b];
                    out.extend(q.iter().map(|&v| d * (v & 0xF) as f32 + m));
                    out.extend(q.iter().map(|&v| d * (v >> 4) as f32 + m));
                }
                QuantKind::Q8_0 => {
                    let q = &self.quants[(r * nb + b) * 32..][..32];
                    out.extend(q.iter().map(|&v| d * (v as i8) as f32));
                }
            }
        }
        out
    }

    /// y = x Wᵀ.  x: [t, cols], y: [t, rows]. Each token is one matrix-vector product, split
    /// over threads by rows (decode has t = 1; a prompt runs token by token).
    pub fn matmul_nt(&self, y: &mut [f32], x: &[f32], t: usize) {
        let nb = self.cols / BLOCK;
        for (yt, xt) in y
            .chunks_exact_mut(self.rows)
            .zip(x.chunks_exact(self.cols))
            .take(t)
        {
            // Σ x over each block: the Q4_1 minimum's share of every row's dot product.
            let xsum: Vec<f32> = xt.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
            yt.par_chunks_mut(64).enumerate().for_each(|(ci, ys)| {
                for (i, yi) in ys.iter_mut().enumerate() {
                    let r = ci * 64 + i;
                    *yi = self.row_dot(r, xt, &xsum, nb);
                }
            });
        }
    }

    fn row_dot(&self, r: usize, x: &[f32], xsum: &[f32], nb: usize) -> f32 {
        let scales = &self.scales[r * nb..(r + 1) * nb];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature was detected at run time; slices have the lengths the
                // kernels read (nb blocks of quants, nb·32 of x).
                return unsafe {
                    match self.kind {
                        QuantKind::Q4_1 => {
                            let q = &self.quants[r * nb * 16..(r + 1) * nb * 16];
                            q4_1_dot_avx512(q, scales, x)
                                + dot(&self.mins[r * nb..(r + 1) * nb], xsum)
                        }
                        QuantKind::Q8_0 => {
                            q8_0_dot_avx512(&self.quants[r * nb * 32..(r + 1) * nb * 32], scales, x)
                        }
                    }
                };
            }
        }
        dot(&self.dequantize_row(r), x)
    }
}

/// Σ_b d_b · Σ_j q_bj x_bj over one Q4_1 row (the minimums' share is added by the caller).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn q4_1_dot_avx512(q: &[u8], scales: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let low = _mm512_set1_epi32(0xF);
    let mut acc = _mm512_setzero_ps();
    for (b, &d) in scales.iter().enumerate() {
        let packed = _mm_loadu_si128(q.as_ptr().add(b * 16) as *const __m128i);
        let bytes = _mm512_cvtepu8_epi32(packed);
        let lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, low));
        let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
        let x0 = _mm512_loadu_ps(x.as_ptr().add(b * 32));
        let x1 = _mm512_loadu_ps(x.as_ptr().add(b * 32 + 16));
        let s = _mm512_fmadd_ps(hi, x1, _mm512_mul_ps(lo, x0));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), s, acc);
    }
    _mm512_reduce_add_ps(acc)
}

/// Σ_b d_b · Σ_j q_bj x_bj over one Q8_0 row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn q8_0_dot_avx512(q: &[u8], scales: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm512_setzero_ps();
    for (b, &d) in scales.iter().enumerate() {
        let q0 = _mm_loadu_si128(q.as_ptr().add(b * 32) as *const __m128i);
        let q1 = _mm_loadu_si128(q.as_ptr().add(b * 32 + 16) as *const __m128i);
        let f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0));
        let f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1));
        let x0 = _mm512_loadu_ps(x.as_ptr().add(b * 32));
        let x1 = _mm512_loadu_ps(x.as_ptr().add(b * 32 + 16));
        let s = _mm512_fmadd_ps(f1, x1, _mm512_mul_ps(f0, x0));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), s, acc);
    }
    _mm512_reduce_add_ps(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random blocks of `kind` for a [rows, cols] matrix (scales as f16 bytes).
    fn random_blocks(kind: QuantKind, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let mut out = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            let d = half::f16::from_f32((next() % 1000) as f32 / 1e4 + 1e-3);
            out.extend(d.to_le_bytes());
            match kind {
                QuantKind::Q4_1 => {
                    let m = half::f16::from_f32(-((next() % 1000) as f32) / 1e4);
                    out.extend(m.to_le_bytes());
                    out.extend((0..16).map(|_| next() as u8));
                }
                QuantKind::Q8_0 => out.extend((0..32).map(|_| next() as u8)),
            }
        }
        out
    }

    #[test]
    fn quantised_products_equal_the_dequantised_ones() {
        for kind in [QuantKind::Q4_1, QuantKind::Q8_0] {
            let (rows, cols, t) = (130, 96, 3);
            let bytes = random_blocks(kind, rows, cols, 7);
            let order: Vec<usize> = (0..rows).rev().collect();
            let m =
                QuantMatrix::from_gguf_blocks(kind, &bytes, rows, cols, Some(&order), "w").unwrap();
            let plain = QuantMatrix::from_gguf_blocks(kind, &bytes, rows, cols, None, "w").unwrap();
            assert_eq!(m.dequantize_row(0), plain.dequantize_row(rows - 1));
            let x: Vec<f32> = (0..t * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let mut y = vec![0.0f32; t * rows];
            m.matmul_nt(&mut y, &x, t);
            for ti in 0..t {
                for r in 0..rows {
                    let w = m.dequantize_row(r);
                    let want: f64 = w
                        .iter()
                        .zip(&x[ti * cols..(ti + 1) * cols])
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum();
                    let got = y[ti * rows + r] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{kind:?} t {ti} row {r}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn wrong_byte_count_is_an_error() {
        let e = QuantMatrix::from_gguf_blocks(QuantKind::Q4_1, &[0; 19], 1, 32, None, "blk.0.x")
            .unwrap_err();
        assert!(e.to_string().contains("blk.0.x"), "{e}");
    }
}
