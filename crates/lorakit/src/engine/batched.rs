//! The batched decode product: many sequences' rows against one pass over a weight matrix,
//! with each row computed exactly as a one-row decode computes it.
//!
//! Batch invariance: `matmul_nt` sends one row to [`matvec_rows`] (one [`dot`] per weight row)
//! but several rows to the `gemm` crate, whose blocking and summation order differ, so a row's
//! logits would change with the number of rows beside it. [`matmul_rows_dot`] instead computes
//! every output element as the same [`dot`] call `matvec_rows` makes, on the same two slices, so
//! row b of a batch is bit for bit what a batch of one gives — whatever else is in the batch.

use rayon::prelude::*;

use super::matmul::{dot_tile, matvec_rows};
use super::SharedMut;

/// out[b, j] = dot(w[j, :], x[b, :]).  x: [m, k], w: [n, k] (a linear layer's `[out, in]`),
/// out: [m, n].
///
/// Each task takes a block of weight rows (about 16 KB, as `matvec_rows` does) and multiplies
/// it with every row of x while it is in cache, so the weights are read from memory once per
/// step, not once per sequence: that is what batching buys on a memory-bound decode. Many rows
/// of x (a prefill chunk) are taken in L1-sized blocks and multiplied in register tiles of
/// 2 x rows × 3 weight rows ([`dot_tile`]), which is what keeps a prefill compute-bound.
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
    // Rows of x per cache block: about 32 KB (an even count, for the 2-row tiles). Measured on
    // the 135M model's shapes, 8 to 16 rows of 576 are best; the choice moves speed by ±10%.
    let x_block = ((32768 / (4 * k.max(1))) & !1).max(2);
    let out_ptr = SharedMut(out.as_mut_ptr());
    w.par_chunks(rows_per_task * k)
        .enumerate()
        .for_each(|(task, wr)| {
            let j0 = task * rows_per_task;
            let nw = wr.len() / k.max(1);
            for x0 in (0..m).step_by(x_block) {
                let rows = x0..(x0 + x_block).min(m);
                // Three weight rows × two x rows per tile (`dot_tile`: each element still
                // exactly `dot`'s); the last one or two weight rows in narrower tiles.
                let mut c = 0;
                while c + 3 <= nw {
                    tiles::<3>(out_ptr, wr, x, (j0, c), rows.clone(), k, n);
                    c += 3;
                }
                match nw - c {
                    2 => tiles::<2>(out_ptr, wr, x, (j0, c), rows.clone(), k, n),
                    1 => tiles::<1>(out_ptr, wr, x, (j0, c), rows.clone(), k, n),
                    _ => {}
                }
            }
        });
}

/// out[b, j0 + c + i] = dot(wr[c + i], x[b]) for i < `C` and the rows b of x in `rows`, two rows
/// of x per tile (one for an odd last row).  wr: the task's weight rows [rows, k] (the task's
/// first is row j0 of the matrix), x: [m, k], out: [m, n] with j0 + c + C ≤ n.
///
/// The caller's tasks own disjoint column ranges of `out`, so no two writes overlap.
fn tiles<const C: usize>(
    out: SharedMut,
    wr: &[f32],
    x: &[f32],
    (j0, c): (usize, usize),
    rows: std::ops::Range<usize>,
    k: usize,
    n: usize,
) {
    let w_tile = &wr[c * k..(c + C) * k];
    let j = j0 + c;
    let write = |b: usize, i: usize, v: f32| {
        debug_assert!(j + i < n && (b + 1) * k <= x.len());
        // SAFETY: b < m and j + i < n, so the element is inside `out` ([m, n]), and no other
        // task writes column j + i.
        unsafe { *out.at(b * n + j + i) = v };
    };
    let mut b = rows.start;
    while b + 2 <= rows.end {
        let mut t = [[0.0f32; 2]; C];
        dot_tile::<2, C>(w_tile, &x[b * k..(b + 2) * k], &mut t);
        for (i, ti) in t.iter().enumerate() {
            write(b, i, ti[0]);
            write(b + 1, i, ti[1]);
        }
        b += 2;
    }
    if b < rows.end {
        let mut t = [[0.0f32; 1]; C];
        dot_tile::<1, C>(w_tile, &x[b * k..(b + 1) * k], &mut t);
        for (i, ti) in t.iter().enumerate() {
            write(b, i, ti[0]);
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
