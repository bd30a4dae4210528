//! The batched decode product: many sequences' rows against one pass over a weight matrix,
//! with each row computed exactly as a one-row decode computes it.
//!
//! Batch invariance: `matmul_nt` sends one row to [`matvec_rows`] (one [`dot`] per weight row)
//! but several rows to the `gemm` crate, whose blocking and summation order differ, so a row's
//! logits would change with the number of rows beside it. [`matmul_rows_dot`] instead computes
//! every output element as the same [`dot`] call `matvec_rows` makes, on the same two slices, so
//! row b of a batch is bit for bit what a batch of one gives — whatever else is in the batch.

use rayon::prelude::*;

use super::matmul::{dot, dot4, matvec_rows};

/// out[b, j] = dot(w[j, :], x[b, :]).  x: [m, k], w: [n, k] (a linear layer's `[out, in]`),
/// out: [m, n].
///
/// Each task takes a block of weight rows (about 16 KB, as `matvec_rows` does) and multiplies
/// it with every row of x while it is in cache, so the weights are read from memory once per
/// step, not once per sequence: that is what batching buys on a memory-bound decode.
pub fn matmul_rows_dot(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
    assert_eq!(x.len(), m * k, "matmul_rows_dot: x is not [{m}, {k}]");
    assert_eq!(w.len(), n * k, "matmul_rows_dot: w is not [{n}, {k}]");
    assert_eq!(out.len(), m * n, "matmul_rows_dot: out is not [{m}, {n}]");
    if m == 0 || n == 0 {
        return;
    }
    if m == 1 {
        matvec_rows(out, x, w, k, false);
        return;
    }
    // About 16 KB of weights per task as in `matvec_rows`, times m/4 so that a task's m dot
    // products outweigh rayon's cost per task, at most about 128 KB (prefill chunks: many rows
    // of x, and enough tasks for every thread). (The split never changes a result: each
    // element is one whole dot product.)
    let rows_per_task = ((4096 / k.max(1)).max(8) * m.div_ceil(4)).min((32768 / k.max(1)).max(8));
    // Transposed result [n, m]: each task owns a contiguous block of it.
    let mut out_t = vec![0.0f32; n * m];
    out_t
        .par_chunks_mut(rows_per_task * m)
        .zip(w.par_chunks(rows_per_task * k))
        .for_each(|(o, wr)| {
            // Four rows of x at a time share each load of the weight row (`dot4`: each element
            // still exactly `dot`'s), the rest one by one.
            let quads = m / 4;
            let mut four = [0.0f32; 4];
            for (oj, row) in o.chunks_exact_mut(m).zip(wr.chunks_exact(k)) {
                for q in 0..quads {
                    dot4(row, &x[4 * q * k..4 * (q + 1) * k], &mut four);
                    oj[4 * q..4 * q + 4].copy_from_slice(&four);
                }
                for (b, ob) in oj.iter_mut().enumerate().skip(4 * quads) {
                    *ob = dot(row, &x[b * k..(b + 1) * k]);
                }
            }
        });
    for (j, col) in out_t.chunks_exact(m).enumerate() {
        for (b, &v) in col.iter().enumerate() {
            out[b * n + j] = v;
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

    /// Every row of a batched product equals the one-row product bit for bit, for batch sizes
    /// and widths that exercise the dot tails and the task blocks.
    #[test]
    fn rows_equal_single_row_products_bitwise() {
        for &(m, k, n) in &[
            (2, 7, 5),
            (3, 576, 300),
            (16, 576, 1536),
            (5, 1536, 64),
            (7, 100, 33),
            (137, 576, 192),
        ] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let mut out = vec![0.0; m * n];
            matmul_rows_dot(&mut out, &x, &w, m, k, n);
            for b in 0..m {
                let mut one = vec![0.0; n];
                matvec_rows(&mut one, &x[b * k..(b + 1) * k], &w, k, false);
                let got = &out[b * n..(b + 1) * n];
                assert!(
                    got.iter()
                        .zip(&one)
                        .all(|(a, c)| a.to_bits() == c.to_bits()),
                    "{m}x{k}x{n}: row {b} differs from its one-row product"
                );
                // and it is the product (not just consistent)
                for (j, &v) in got.iter().enumerate() {
                    let want: f64 = (0..k)
                        .map(|p| x[b * k + p] as f64 * w[j * k + p] as f64)
                        .sum();
                    assert!((v as f64 - want).abs() < 1e-3 * (1.0 + want.abs()));
                }
            }
        }
    }
}
