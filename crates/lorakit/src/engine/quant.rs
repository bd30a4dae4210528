//! Products with weights kept in the GGUF's own quantised blocks (`--precision gguf`): the only
//! copy of a frozen weight in that mode, for decoding (bound by memory bandwidth) and for QLoRA
//! training (a 135M model's Q4_1 weights are a sixth of its f32 bytes).
//!
//! Every block type of llama.cpp's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K_M and Q5_K_M files is one
//! of two shapes: groups of 32 (or 16) integer levels with an f32 scale and, for some, an f32
//! minimum, w = scale·q + min. At load each block is re-laid out as such groups (K-quants' 6-bit
//! sub-block scales multiplied out, exactly as `dequantize` multiplies them), in one of two
//! layouts the kernels read: 4-bit levels two per byte (Q4_0, Q4_1, Q4_K) or one signed byte per
//! level (Q5_0, Q5_1, Q8_0, Q5_K, and Q6_K in groups of 16). [`QuantMatrix::dequantize_row`]
//! gives `io::gguf::dequantize`'s values (bit for bit, but for the sign of a Q4_0 zero); a
//! product differs from the f32 product of the dequantised weights only in rounding order.
//!
//! Two product shapes: token by token (`row_dot`, decode: each weight row streamed once per
//! token), and many rows at once (training, prefill), where each weight is dequantised once per
//! product, not once per row of x, in one of two arithmetics (the block storage is the same):
//!
//! * f32 (the default): a panel of weight rows is dequantised to f32 into per-thread scratch
//!   and multiplied by a blocked f32 kernel (`gemm`).
//! * bf16 ([`QuantMatrix::set_bf16_products`]): a panel is dequantised straight into the bf16
//!   panel layout of `engine::bf16` (per-thread scratch) and multiplied by its kernels (AMX
//!   tiles, `vdpbf16ps`, or their emulation), x converted to bf16 once per product. Each value
//!   is rounded to bf16 as `PackedBf16` rounds it, so the products equal `matmul_bf16` /
//!   `matmul_bf16_t` over the packing of the dequantised weight bit for bit.

use rayon::prelude::*;

use crate::engine::bf16::{
    bf16_kernel, built_panel_group_rows, matmul_bf16_panels, matmul_bf16_t_panels, to_bf16_row,
    Bf16Kernel, PanelSource, NR,
};
use crate::engine::matmul::dot;
use crate::error::{Error, Result};
use crate::io::gguf::GgmlType;

/// How the levels are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Levels {
    /// 0..=15, groups of 32 in 16 bytes: element j in the low nibble of byte j, j + 16 in the
    /// high nibble.
    Nibbles,
    /// One i8 per level.
    Bytes,
}

/// The block types [`QuantMatrix::from_gguf_blocks`] takes.
pub const GGUF_TYPES: [GgmlType; 8] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// The layout, group size and whether there are minimums, for `dtype`; None for a type the
/// kernels do not take.
pub fn layout_of(dtype: GgmlType) -> Option<(Levels, usize, bool)> {
    layout(dtype)
}

/// A [rows, cols] matrix as groups of quantised levels along each row.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    /// The GGUF type it was read from.
    pub dtype: GgmlType,
    pub levels: Levels,
    /// Levels per group: 32, or 16 (Q6_K).
    pub group: usize,
    pub rows: usize,
    pub cols: usize,
    /// [rows, cols / group]
    scales: Vec<f32>,
    /// [rows, cols / group], or empty when every minimum is 0.
    mins: Vec<f32>,
    /// Nibbles: [rows, cols / 2] bytes; Bytes: [rows, cols].
    quants: Vec<u8>,
    /// Whether the many-row products run in bf16 (else f32); decode's dot products are f32.
    bf16_products: bool,
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The layout, group size and whether there are minimums, for `dtype`.
fn layout(dtype: GgmlType) -> Option<(Levels, usize, bool)> {
    use GgmlType::*;
    Some(match dtype {
        // Q4_0's w = d·(q − 8) is held as d·q + (−8d): both products are exact in f32 (an f16
        // scale times a 4-bit level), so the values are the reader's bit for bit, at half the
        // bytes of one i8 per level.
        Q4_0 | Q4_1 | Q4_K => (Levels::Nibbles, 32, true),
        Q5_0 | Q8_0 => (Levels::Bytes, 32, false),
        Q5_1 | Q5_K => (Levels::Bytes, 32, true),
        Q6_K => (Levels::Bytes, 16, false),
        _ => return None,
    })
}

/// Where the groups of one GGUF block go.
struct Groups<'a> {
    scales: &'a mut Vec<f32>,
    mins: &'a mut Vec<f32>,
    /// Levels of the whole block, in element order.
    levels: &'a mut Vec<i8>,
}

impl Groups<'_> {
    fn push(&mut self, scale: f32, min: Option<f32>) {
        self.scales.push(scale);
        if let Some(m) = min {
            self.mins.push(m);
        }
    }
}

/// The 5-bit values of a Q5_0 / Q5_1 block: nibbles `qs` and fifth bits `qh`.
fn five_bit(qs: &[u8], qh: u32) -> [i32; 32] {
    std::array::from_fn(|j| {
        let (nibble, bit) = if j < 16 {
            (qs[j] & 0x0f, (qh >> j) & 1)
        } else {
            (qs[j - 16] >> 4, (qh >> j) & 1)
        };
        (nibble as u32 | (bit << 4)) as i32
    })
}

/// Splits one GGUF block into groups: w = scale·level + min, with scale and min computed exactly
/// as `io::gguf::dequantize` computes them.
fn split_block(dtype: GgmlType, b: &[u8], g: &mut Groups) {
    use crate::io::gguf::scale_min_k4;
    use GgmlType::*;
    match dtype {
        Q4_0 => {
            let d = f16_at(b, 0);
            g.push(d, Some(-8.0 * d));
            let qs = &b[2..18];
            g.levels
                .extend((0..32).map(|j| if j < 16 { qs[j] & 0x0f } else { qs[j - 16] >> 4 } as i8));
        }
        Q4_1 => {
            g.push(f16_at(b, 0), Some(f16_at(b, 2)));
            let qs = &b[4..20];
            g.levels
                .extend((0..32).map(|j| if j < 16 { qs[j] & 0x0f } else { qs[j - 16] >> 4 } as i8));
        }
        Q5_0 => {
            g.push(f16_at(b, 0), None);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            g.levels
                .extend(five_bit(&b[6..22], qh).iter().map(|&q| (q - 16) as i8));
        }
        Q5_1 => {
            g.push(f16_at(b, 0), Some(f16_at(b, 2)));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            g.levels
                .extend(five_bit(&b[8..24], qh).iter().map(|&q| q as i8));
        }
        Q8_0 => {
            g.push(f16_at(b, 0), None);
            g.levels.extend(b[2..34].iter().map(|&q| q as i8));
        }
        Q4_K | Q5_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let (qh, ql) = if dtype == Q5_K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for k in 0..4 {
                let q = &ql[32 * k..32 * k + 32];
                for half in 0..2 {
                    let (sc, m) = scale_min_k4(2 * k + half, scales);
                    // y = (d·sc)·q - (dmin·m): the minimum stored negated.
                    g.push(d * sc as f32, Some(-(dmin * m as f32)));
                    g.levels.extend((0..32).map(|l| {
                        let nibble = if half == 0 { q[l] & 0x0f } else { q[l] >> 4 };
                        let high = qh.map_or(0, |h| {
                            if h[l] & (1 << (2 * k + half)) != 0 {
                                16
                            } else {
                                0
                            }
                        });
                        (nibble + high) as i8
                    }));
                }
            }
        }
        Q6_K => {
            let d = f16_at(b, 208);
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let mut levels = [0i8; 256];
            for n in 0..2 {
                let (ql, qh) = (&ql[64 * n..64 * n + 64], &qh[32 * n..32 * n + 32]);
                for l in 0..32 {
                    let e = 128 * n + l;
                    levels[e] = (((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32) as i8;
                    levels[e + 32] =
                        (((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32) as i8;
                    levels[e + 64] = (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32) as i8;
                    levels[e + 96] =
                        (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32) as i8;
                }
            }
            // Element e's scale is sc[e / 16].
            for &s in sc {
                g.push(d * (s as i8) as f32, None);
            }
            g.levels.extend(levels);
        }
        _ => unreachable!("layout() admits only the types above"),
    }
}

impl QuantMatrix {
    /// From GGUF block bytes of `dtype`, rows in `row_order` (row i of the result is stored row
    /// `row_order[i]`; the identity when None). `what` names the tensor in errors.
    pub fn from_gguf_blocks(
        dtype: GgmlType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
        row_order: Option<&[usize]>,
        what: &str,
    ) -> Result<QuantMatrix> {
        let Some((levels, group, has_mins)) = layout(dtype) else {
            let names: Vec<&str> = GGUF_TYPES.iter().map(|t| t.name()).collect();
            return Err(Error::Invalid(format!(
                "{what} is {}; --precision gguf computes with {} blocks (use f32 or bf16)",
                dtype.name(),
                names.join(", ")
            )));
        };
        let (block, block_bytes) = (dtype.block_size(), dtype.type_size());
        let nb = cols / block;
        if !cols.is_multiple_of(block) || bytes.len() != rows * nb * block_bytes {
            return Err(Error::Invalid(format!(
                "{what}: {} bytes do not hold [{rows}, {cols}] in {} blocks",
                bytes.len(),
                dtype.name()
            )));
        }
        let groups = rows * cols / group;
        let mut scales = Vec::with_capacity(groups);
        let mut mins = Vec::with_capacity(if has_mins { groups } else { 0 });
        let mut quants = Vec::with_capacity(match levels {
            Levels::Nibbles => rows * cols / 2,
            Levels::Bytes => rows * cols,
        });
        let mut row_levels = Vec::with_capacity(cols);
        for i in 0..rows {
            let r = row_order.map_or(i, |o| o[i]);
            row_levels.clear();
            let mut g = Groups {
                scales: &mut scales,
                mins: &mut mins,
                levels: &mut row_levels,
            };
            for blk in
                bytes[r * nb * block_bytes..(r + 1) * nb * block_bytes].chunks_exact(block_bytes)
            {
                split_block(dtype, blk, &mut g);
            }
            match levels {
                Levels::Bytes => quants.extend(row_levels.iter().map(|&q| q as u8)),
                Levels::Nibbles => {
                    for c in row_levels.chunks_exact(32) {
                        quants.extend((0..16).map(|j| c[j] as u8 | ((c[j + 16] as u8) << 4)));
                    }
                }
            }
        }
        // Non-finite scales would poison every product silently.
        if let Some(i) = scales.iter().chain(&mins).position(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!(
                "{what}: block scale or minimum {i} is not finite"
            )));
        }
        Ok(QuantMatrix {
            dtype,
            levels,
            group,
            rows,
            cols,
            scales,
            mins,
            quants,
            bf16_products: false,
        })
    }

    /// Chooses the many-row products' arithmetic: bf16 (`engine::bf16`'s kernels, f32
    /// accumulation) or f32. Decode's per-token dot products stay f32 either way.
    pub fn set_bf16_products(&mut self, on: bool) {
        self.bf16_products = on;
    }

    /// Whether the many-row products run in bf16.
    pub fn bf16_products(&self) -> bool {
        self.bf16_products
    }

    /// The stored levels, scales and minimums (empty when none), as the field docs lay them out.
    pub(crate) fn raw_parts(&self) -> (&[u8], &[f32], &[f32]) {
        (&self.quants, &self.scales, &self.mins)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        (self.scales.len() + self.mins.len()) * 4 + self.quants.len()
    }

    /// Row `r` dequantised (tests and the portable path).  → [cols]
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let ng = self.cols / self.group;
        let mut out = Vec::with_capacity(self.cols);
        for gi in 0..ng {
            let d = self.scales[r * ng + gi];
            let m = self.mins.get(r * ng + gi).copied();
            let level = |j: usize| -> f32 {
                let e = r * self.cols + gi * self.group + j;
                match self.levels {
                    Levels::Bytes => self.quants[e] as i8 as f32,
                    Levels::Nibbles => {
                        let byte = self.quants[e / 32 * 16 + (e % 32) % 16];
                        (if e % 32 < 16 { byte & 0x0f } else { byte >> 4 }) as f32
                    }
                }
            };
            for j in 0..self.group {
                // The products and sums dequantize computes: level·scale (+ min).
                out.push(match m {
                    Some(m) => level(j) * d + m,
                    None => level(j) * d,
                });
            }
        }
        out
    }

    /// y = x Wᵀ.  x: [t, cols], y: [t, rows]. Where [`QuantMatrix::set_bf16_products`] chose
    /// bf16, every product runs on the bf16 panels, whatever t: a 1-row loss chunk must round as
    /// `--precision bf16` does, or training over blocks would drift from it. In f32, up to
    /// [`MANY_ROWS`] rows of x, each is one matrix-vector product split over threads by rows of
    /// W (decode); from there on, panels of W are dequantised once and multiplied by all of x.
    pub fn matmul_nt(&self, y: &mut [f32], x: &[f32], t: usize) {
        if self.bf16_products && t > 0 {
            let (y, x) = (&mut y[..t * self.rows], &x[..t * self.cols]);
            return self.matmul_nt_bf16_with(bf16_kernel(), y, x, t);
        }
        if t >= MANY_ROWS {
            return self.matmul_nt_panels(y, x, t);
        }
        for (yt, xt) in y
            .chunks_exact_mut(self.rows)
            .zip(x.chunks_exact(self.cols))
            .take(t)
        {
            // Σ x over each group: the minimum's share of every row's dot product.
            let xsum: Vec<f32> = if self.mins.is_empty() {
                Vec::new()
            } else {
                xt.chunks_exact(self.group)
                    .map(|c| c.iter().sum())
                    .collect()
            };
            yt.par_chunks_mut(64).enumerate().for_each(|(ci, ys)| {
                for (i, yi) in ys.iter_mut().enumerate() {
                    *yi = self.row_dot(ci * 64 + i, xt, &xsum);
                }
            });
        }
    }

    fn row_dot(&self, r: usize, x: &[f32], xsum: &[f32]) -> f32 {
        let ng = self.cols / self.group;
        let scales = &self.scales[r * ng..(r + 1) * ng];
        let min_part = || {
            if self.mins.is_empty() {
                0.0
            } else {
                dot(&self.mins[r * ng..(r + 1) * ng], xsum)
            }
        };
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature was detected at run time; the slices hold the row's
                // levels (cols of them) and x holds cols values.
                let main = unsafe {
                    match (self.levels, self.group) {
                        (Levels::Nibbles, _) => {
                            let q = &self.quants[r * self.cols / 2..(r + 1) * self.cols / 2];
                            nibbles_dot_avx512(q, scales, x)
                        }
                        (Levels::Bytes, 32) => {
                            let q = &self.quants[r * self.cols..(r + 1) * self.cols];
                            bytes32_dot_avx512(q, scales, x)
                        }
                        (Levels::Bytes, _) => {
                            let q = &self.quants[r * self.cols..(r + 1) * self.cols];
                            bytes16_dot_avx512(q, scales, x)
                        }
                    }
                };
                return main + min_part();
            }
        }
        dot(&self.dequantize_row(r), x)
    }
}

/// Rows of W per dequantised panel in the many-row forward product (64 × 4096 f32 = 1 MiB of
/// scratch per thread, which stays in L2 while `gemm` streams x past it).
const FWD_PANEL: usize = 64;
/// Rows of W per panel in the many-row backward product.
const BWD_PANEL: usize = 256;
/// From this many rows of x on, [`QuantMatrix::matmul_nt`] dequantises panels instead of
/// streaming rows (below it the per-token dot products read less memory).
const MANY_ROWS: usize = 4;

/// A raw output pointer shared by threads that write disjoint elements.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every user writes a set of elements no other thread touches (disjoint columns).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Through a method, so that closures capture the whole (Send) wrapper, not its field.
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

impl QuantMatrix {
    /// W[rows, cols] dequantised into `out` [rows.len(), cols.len()] (row-major), with the
    /// values of [`QuantMatrix::dequantize_row`]. `cols` must start and end on group
    /// boundaries.
    pub fn dequantize_into(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let (g, w) = (self.group, cols.len());
        assert!(
            cols.start.is_multiple_of(g) && cols.end.is_multiple_of(g) && cols.end <= self.cols,
            "dequantize_into: columns {cols:?} are not whole groups of {g} within {}",
            self.cols
        );
        assert!(rows.end <= self.rows && out.len() == rows.len() * w);
        let ng = self.cols / g;
        #[cfg(target_arch = "x86_64")]
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        for (r, o) in rows.zip(out.chunks_exact_mut(w)) {
            for (k, og) in o.chunks_exact_mut(g).enumerate() {
                let gi = r * ng + cols.start / g + k;
                let d = self.scales[gi];
                let m = self.mins.get(gi).copied();
                let e0 = r * self.cols + cols.start + k * g;
                #[cfg(target_arch = "x86_64")]
                if avx512 {
                    // SAFETY: the feature was detected above; the group's levels are in bounds
                    // (16 nibble bytes or g level bytes from e0) and og holds g values.
                    unsafe {
                        match self.levels {
                            Levels::Nibbles => dequant_nibbles32_avx512(
                                &self.quants[e0 / 2..e0 / 2 + 16],
                                d,
                                m,
                                og,
                            ),
                            Levels::Bytes => {
                                dequant_bytes_avx512(&self.quants[e0..e0 + g], d, m, og)
                            }
                        }
                    }
                    continue;
                }
                dequant_group(self.levels, &self.quants, e0, g, d, m, og);
            }
        }
    }

    /// y = x Wᵀ for many rows of x.  x: [t, cols], y: [t, rows]. Rows of W are split into
    /// panels of [`FWD_PANEL`], one thread per panel: the panel is dequantised once into the
    /// thread's scratch and multiplied by all of x, each thread writing its own columns of y.
    fn matmul_nt_panels(&self, y: &mut [f32], x: &[f32], t: usize) {
        let (rows, cols) = (self.rows, self.cols);
        assert!(x.len() >= t * cols && y.len() >= t * rows);
        let out = SharedOut(y.as_mut_ptr());
        (0..rows.div_ceil(FWD_PANEL)).into_par_iter().for_each_init(
            || vec![0.0f32; FWD_PANEL * cols],
            |scratch, p| {
                let r0 = p * FWD_PANEL;
                let n = FWD_PANEL.min(rows - r0);
                let w = &mut scratch[..n * cols];
                self.dequantize_into(r0..r0 + n, 0..cols, w);
                // SAFETY: dst (i, j) = y[i·rows + r0 + j] for i < t, j < n: in bounds by the
                // assert, and columns r0..r0+n belong to this panel alone. lhs (i, p) =
                // x[i·cols + p]; rhs (p, j) = w[j·cols + p], both in bounds.
                unsafe {
                    gemm::gemm(
                        t,
                        n,
                        cols,
                        out.ptr().add(r0),
                        1,
                        rows as isize,
                        false,
                        x.as_ptr(),
                        1,
                        cols as isize,
                        w.as_ptr(),
                        cols as isize,
                        1,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            },
        );
    }

    /// dx (+)= dy W.  dy: [t, rows], dx: [t, cols] (the input gradient of y = x Wᵀ).
    ///
    /// Columns of W are split into chunks of whole groups, one thread per chunk, so each thread
    /// owns its columns of dx; within a chunk, panels of [`BWD_PANEL`] rows are dequantised
    /// into the thread's scratch and accumulated, so every weight is dequantised once. With bf16
    /// products chosen, [`QuantMatrix::matmul_w_bf16_with`] for every t (as in `matmul_nt`).
    pub fn matmul_w(&self, dx: &mut [f32], dy: &[f32], t: usize, accumulate: bool) {
        let (rows, cols, g) = (self.rows, self.cols, self.group);
        assert!(
            dy.len() == t * rows && dx.len() == t * cols,
            "matmul_w: dy has {} elements, dx {}; expected {t}×{rows} and {t}×{cols}",
            dy.len(),
            dx.len()
        );
        if t == 0 {
            return;
        }
        if self.bf16_products {
            return self.matmul_w_bf16_with(bf16_kernel(), dx, dy, t, accumulate);
        }
        // About four chunks per thread, at most 256 columns, whole groups.
        let threads = rayon::current_num_threads().max(1);
        let chunk = (cols / (4 * threads) / g * g).clamp(g, 256.max(g));
        let out = SharedOut(dx.as_mut_ptr());
        (0..cols.div_ceil(chunk)).into_par_iter().for_each_init(
            || vec![0.0f32; BWD_PANEL * chunk],
            |scratch, c| {
                let c0 = c * chunk;
                let cw = chunk.min(cols - c0);
                for (pi, r0) in (0..rows).step_by(BWD_PANEL).enumerate() {
                    let n = BWD_PANEL.min(rows - r0);
                    let w = &mut scratch[..n * cw];
                    self.dequantize_into(r0..r0 + n, c0..c0 + cw, w);
                    // SAFETY: dst (i, j) = dx[i·cols + c0 + j] for i < t, j < cw: in bounds,
                    // and columns c0..c0+cw belong to this chunk alone. lhs (i, p) =
                    // dy[i·rows + r0 + p] with r0 + p < rows; rhs (p, j) = w[p·cw + j].
                    unsafe {
                        gemm::gemm(
                            t,
                            cw,
                            n,
                            out.ptr().add(c0),
                            1,
                            cols as isize,
                            accumulate || pi > 0,
                            dy.as_ptr().add(r0),
                            1,
                            rows as isize,
                            w.as_ptr(),
                            1,
                            cw as isize,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                }
            },
        );
    }
}

impl QuantMatrix {
    /// y = x Wᵀ in bf16 on `kernel`.  x: [t, cols], y: [t, rows]. Equals
    /// `matmul_bf16_with(kernel, y, x, t, &PackedBf16::for_x_wt(&W, rows, cols), false)` over the
    /// dequantised W bit for bit.
    pub fn matmul_nt_bf16_with(&self, kernel: Bf16Kernel, y: &mut [f32], x: &[f32], t: usize) {
        let group = built_panel_group_rows(t, self.rows.div_ceil(NR));
        matmul_bf16_panels(kernel, y, x, t, &BlocksNt(self), group, false)
    }

    /// dx (+)= dy W in bf16 on `kernel`.  dy: [t, rows], dx: [t, cols]. Equals
    /// `matmul_bf16_t_with(kernel, dx, dy, t, &PackedBf16::for_x_wt(&W, rows, cols), accumulate)`
    /// over the dequantised W bit for bit.
    pub fn matmul_w_bf16_with(
        &self,
        kernel: Bf16Kernel,
        dx: &mut [f32],
        dy: &[f32],
        t: usize,
        accumulate: bool,
    ) {
        let group = built_panel_group_rows(t, self.cols.div_ceil(NR));
        matmul_bf16_t_panels(kernel, dx, dy, t, &BlocksW(self), group, accumulate)
    }
}

thread_local! {
    /// Dequantised f32 values and their bf16 bits, per thread, reused by the panel builders.
    static DEQUANT: std::cell::RefCell<(Vec<f32>, Vec<u16>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// B = Wᵀ [cols, rows] of y = x Wᵀ: panel j holds W's rows j·NR.. (its columns), pair p W's
/// columns 2p, 2p + 1, as `PackedBf16::for_x_wt` lays them out.
struct BlocksNt<'a>(&'a QuantMatrix);

impl PanelSource for BlocksNt<'_> {
    fn reduction(&self) -> usize {
        self.0.cols
    }
    fn columns(&self) -> usize {
        self.0.rows
    }
    fn panel<'a>(
        &'a self,
        j: usize,
        pairs: std::ops::Range<usize>,
        dst: &'a mut Vec<u16>,
    ) -> &'a [u16] {
        let (q, cols) = (self.0, self.0.cols);
        // Every block type's groups (16 or 32 values) make cols even: no pair is cut.
        debug_assert!(cols % 2 == 0);
        let live = NR.min(q.rows - j * NR);
        dst.clear();
        dst.resize(pairs.len() * NR * 2, 0);
        DEQUANT.with_borrow_mut(|(f, b)| {
            // The panel's rows in one call each (dequantise, round), then transposed pair by
            // pair: row c's pair p goes to (p·NR + c)·2. Tiles of TILE pairs keep the rows read
            // and the panel rows written in L1 (a row at a time would stride the whole panel).
            f.resize(live * cols, 0.0);
            b.resize(live * cols, 0);
            q.dequantize_into(j * NR..j * NR + live, 0..cols, f);
            to_bf16_row(b, f);
            const TILE: usize = 16;
            let first = pairs.start;
            for p0 in pairs.clone().step_by(TILE) {
                let p1 = (p0 + TILE).min(pairs.end);
                for (c, row) in b.chunks_exact(cols).enumerate() {
                    let src = &row[2 * p0..2 * p1];
                    for (i, pair) in src.chunks_exact(2).enumerate() {
                        let at = ((p0 - first + i) * NR + c) * 2;
                        dst[at..at + 2].copy_from_slice(pair);
                    }
                }
            }
        });
        dst
    }
}

/// B = W [rows, cols] of dx = dy W: panel j holds W's columns j·NR.., pair q W's rows 2q,
/// 2q + 1, as the transposed panels of `matmul_bf16_t` hold them.
struct BlocksW<'a>(&'a QuantMatrix);

impl PanelSource for BlocksW<'_> {
    fn reduction(&self) -> usize {
        self.0.rows
    }
    fn columns(&self) -> usize {
        self.0.cols
    }
    fn panel<'a>(
        &'a self,
        j: usize,
        pairs: std::ops::Range<usize>,
        dst: &'a mut Vec<u16>,
    ) -> &'a [u16] {
        let q = self.0;
        // Whole groups: cols and NR are multiples of every group size.
        let (c0, cw) = (j * NR, NR.min(q.cols - j * NR));
        dst.clear();
        dst.resize(pairs.len() * NR * 2, 0);
        DEQUANT.with_borrow_mut(|(f, b)| {
            f.resize(2 * cw, 0.0);
            b.resize(2 * cw, 0);
            for (pi, p) in pairs.enumerate() {
                let r0 = 2 * p;
                let live = 2.min(q.rows - r0);
                q.dequantize_into(r0..r0 + live, c0..c0 + cw, &mut f[..live * cw]);
                to_bf16_row(&mut b[..live * cw], &f[..live * cw]);
                let out = &mut dst[pi * NR * 2..(pi + 1) * NR * 2];
                for e in 0..live {
                    for c in 0..cw {
                        out[2 * c + e] = b[e * cw + c];
                    }
                }
            }
        });
        dst
    }
}

/// One group of levels from element `e0` on, dequantised into `out` [g]: the reader's
/// arithmetic, level·d (+ m where the type has minimums), no fused multiply-add.
fn dequant_group(
    levels: Levels,
    quants: &[u8],
    e0: usize,
    g: usize,
    d: f32,
    m: Option<f32>,
    out: &mut [f32],
) {
    match levels {
        Levels::Nibbles => {
            let q = &quants[e0 / 2..e0 / 2 + 16];
            let m = m.unwrap_or(0.0);
            let (lo, hi) = out.split_at_mut(16);
            for j in 0..16 {
                lo[j] = (q[j] & 0x0f) as f32 * d + m;
                hi[j] = (q[j] >> 4) as f32 * d + m;
            }
        }
        Levels::Bytes => {
            let q = &quants[e0..e0 + g];
            match m {
                None => {
                    for (v, &l) in out.iter_mut().zip(q) {
                        *v = l as i8 as f32 * d;
                    }
                }
                Some(m) => {
                    for (v, &l) in out.iter_mut().zip(q) {
                        *v = l as i8 as f32 * d + m;
                    }
                }
            }
        }
    }
}

/// [`dequant_group`] for a group of 32 nibbles (16 bytes) → out [32].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dequant_nibbles32_avx512(q: &[u8], d: f32, m: Option<f32>, out: &mut [f32]) {
    use std::arch::x86_64::*;
    debug_assert!(q.len() >= 16 && out.len() >= 32);
    let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(q.as_ptr() as *const __m128i));
    let lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(0xF)));
    let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
    let (dv, mv) = (_mm512_set1_ps(d), _mm512_set1_ps(m.unwrap_or(0.0)));
    // Separate multiply and add: the reader rounds level·d before adding the minimum.
    _mm512_storeu_ps(out.as_mut_ptr(), _mm512_add_ps(_mm512_mul_ps(lo, dv), mv));
    _mm512_storeu_ps(
        out.as_mut_ptr().add(16),
        _mm512_add_ps(_mm512_mul_ps(hi, dv), mv),
    );
}

/// [`dequant_group`] for a group of 16 or 32 signed level bytes → out [g].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dequant_bytes_avx512(q: &[u8], d: f32, m: Option<f32>, out: &mut [f32]) {
    use std::arch::x86_64::*;
    debug_assert!(q.len() == out.len() && q.len().is_multiple_of(16));
    let dv = _mm512_set1_ps(d);
    for c in 0..q.len() / 16 {
        let l = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
            q.as_ptr().add(16 * c) as *const __m128i,
        )));
        let v = match m {
            None => _mm512_mul_ps(l, dv),
            Some(m) => _mm512_add_ps(_mm512_mul_ps(l, dv), _mm512_set1_ps(m)),
        };
        _mm512_storeu_ps(out.as_mut_ptr().add(16 * c), v);
    }
}

/// Σ_g d_g · Σ_j q_gj x_gj over one row of 4-bit groups of 32 (minimums added by the caller).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn nibbles_dot_avx512(q: &[u8], scales: &[f32], x: &[f32]) -> f32 {
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

/// Σ_g d_g · Σ_j q_gj x_gj over one row of i8 groups of 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn bytes32_dot_avx512(q: &[u8], scales: &[f32], x: &[f32]) -> f32 {
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

/// Σ_g d_g · Σ_j q_gj x_gj over one row of i8 groups of 16 (Q6_K).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn bytes16_dot_avx512(q: &[u8], scales: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm512_setzero_ps();
    for (b, &d) in scales.iter().enumerate() {
        let q0 = _mm_loadu_si128(q.as_ptr().add(b * 16) as *const __m128i);
        let f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0));
        let x0 = _mm512_loadu_ps(x.as_ptr().add(b * 16));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_mul_ps(f0, x0), acc);
    }
    _mm512_reduce_add_ps(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::{dequantize, quantize};

    /// A [rows, cols] matrix of `dtype` from lorakit's quantiser (ggml's own blocks), over
    /// values with varied scales and signs.
    fn blocks(dtype: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                u * [1.0, 0.1, 3.0, 0.01][(i / cols) % 4]
            })
            .collect();
        quantize(dtype, &x, cols).unwrap()
    }

    #[test]
    fn rows_dequantise_bit_for_bit_as_the_gguf_reader() {
        for dtype in GGUF_TYPES {
            let (rows, cols) = (5, 512);
            let bytes = blocks(dtype, rows, cols, 3);
            let m = QuantMatrix::from_gguf_blocks(dtype, &bytes, rows, cols, None, "w").unwrap();
            let mut want = vec![0.0f32; rows * cols];
            dequantize(dtype, &bytes, &mut want).unwrap();
            for r in 0..rows {
                let got = m.dequantize_row(r);
                let w = &want[r * cols..(r + 1) * cols];
                // Bit for bit, but a Q4_0 zero d·8 + (−8d) is +0 where the reader's d·0 may be
                // −0.
                assert!(
                    got.iter()
                        .zip(w)
                        .all(|(a, b)| a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0)),
                    "{dtype}: row {r} differs from dequantize"
                );
                let mut panel = vec![0.0f32; cols - 256];
                m.dequantize_into(r..r + 1, 256..cols, &mut panel);
                assert!(
                    panel
                        .iter()
                        .zip(&got[256..])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{dtype}: row {r}'s panel differs from dequantize_row"
                );
                // The portable group kernel too (the panel above may have run AVX-512).
                let ng = cols / m.group;
                let mut portable = vec![0.0f32; cols];
                for (k, og) in portable.chunks_exact_mut(m.group).enumerate() {
                    let gi = r * ng + k;
                    let (d, mn) = (m.scales[gi], m.mins.get(gi).copied());
                    dequant_group(
                        m.levels,
                        &m.quants,
                        r * cols + k * m.group,
                        m.group,
                        d,
                        mn,
                        og,
                    );
                }
                assert!(
                    portable
                        .iter()
                        .zip(&got)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{dtype}: row {r}'s portable groups differ from dequantize_row"
                );
            }
        }
    }

    #[test]
    fn quantised_products_equal_the_dequantised_ones() {
        // Rows not a multiple of the 64-row tile, a single row, reordered rows. The bound:
        // the kernels sum d·(Σ q·x) + m·Σx in f32 where the reference sums w·x in f64; over
        // 512 terms of |w·x| ≤ 2 that is within 1e-5 relative to the row's Σ|w·x| plus 1.
        for dtype in GGUF_TYPES {
            for (rows, t) in [(130, 3), (1, 1)] {
                let cols = 512;
                let bytes = blocks(dtype, rows, cols, 7);
                let order: Vec<usize> = (0..rows).rev().collect();
                let m = QuantMatrix::from_gguf_blocks(dtype, &bytes, rows, cols, Some(&order), "w")
                    .unwrap();
                let plain =
                    QuantMatrix::from_gguf_blocks(dtype, &bytes, rows, cols, None, "w").unwrap();
                assert_eq!(m.dequantize_row(0), plain.dequantize_row(rows - 1));
                let x: Vec<f32> = (0..t * cols)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                    .collect();
                let mut y = vec![0.0f32; t * rows];
                m.matmul_nt(&mut y, &x, t);
                for ti in 0..t {
                    for r in 0..rows {
                        let w = m.dequantize_row(r);
                        let xs = &x[ti * cols..(ti + 1) * cols];
                        let want: f64 = w.iter().zip(xs).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let mag: f64 = w
                            .iter()
                            .zip(xs)
                            .map(|(&a, &b)| (a as f64 * b as f64).abs())
                            .sum();
                        let got = y[ti * rows + r] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + mag),
                            "{dtype} t {ti} row {r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Random block bytes of `dtype` for [rows, cols], every f16 scale field overwritten with a
    /// small finite value (random bytes would make some NaN or huge).
    fn random_blocks(dtype: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        use GgmlType::*;
        let mut s = seed;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let n = rows * cols / dtype.block_size() * dtype.type_size();
        let mut b: Vec<u8> = (0..n).map(|_| next() as u8).collect();
        let f16_fields: &[usize] = match dtype {
            Q4_0 | Q5_0 | Q8_0 => &[0],
            Q4_1 | Q5_1 | Q4_K | Q5_K => &[0, 2],
            Q6_K => &[208],
            _ => unreachable!(),
        };
        for blk in b.chunks_exact_mut(dtype.type_size()) {
            for &at in f16_fields {
                let v = (next() % 2001) as f32 / 1000.0 - 1.0;
                blk[at..at + 2].copy_from_slice(&half::f16::from_f32(v * 0.05).to_le_bytes());
            }
        }
        b
    }

    fn random_f32(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// |got − want| ≤ γ_k · Σ|a·b| + 1e-30, γ_k = k·u / (1 − k·u) with u = 2⁻²⁴: the
    /// worst-case error of any order of summing k f32 products (with or without fused
    /// multiply-adds), against the exact (f64) sum of the same f32 factors.
    fn assert_within_gamma(got: f32, want: f64, mag: f64, k: usize, what: &str) {
        let u = (2.0f64).powi(-24);
        let gamma = k as f64 * u / (1.0 - k as f64 * u);
        assert!(
            (got as f64 - want).abs() <= gamma * mag + 1e-30,
            "{what}: {got} vs {want} (bound {})",
            gamma * mag
        );
    }

    #[test]
    fn many_row_products_match_f64_products_of_the_dequantised_weights() {
        // t = 1 and t not a multiple of any tile; rows not a multiple of either panel; cols
        // giving a last column chunk shorter than the others.
        for dtype in GGUF_TYPES {
            for (rows, cols, t) in [(70, 768, 1), (300, 256, 5), (1, 512, 67), (129, 1280, 4)] {
                let bytes = random_blocks(dtype, rows, cols, rows as u64 * 31 + t as u64);
                let m =
                    QuantMatrix::from_gguf_blocks(dtype, &bytes, rows, cols, None, "w").unwrap();
                let w: Vec<f32> = (0..rows).flat_map(|r| m.dequantize_row(r)).collect();
                assert!(w.iter().all(|v| v.is_finite()));
                // Forward through the panels (matmul_nt takes them from MANY_ROWS rows).
                let x = random_f32(t * cols, 5);
                let mut y = vec![f32::NAN; t * rows];
                m.matmul_nt_panels(&mut y, &x, t);
                for i in 0..t {
                    for r in 0..rows {
                        let (xs, ws) = (&x[i * cols..(i + 1) * cols], &w[r * cols..(r + 1) * cols]);
                        let want: f64 = xs.iter().zip(ws).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let mag: f64 = xs
                            .iter()
                            .zip(ws)
                            .map(|(&a, &b)| (a as f64 * b as f64).abs())
                            .sum();
                        let what = format!("{dtype} [{rows}, {cols}] t {t}: y[{i}, {r}]");
                        assert_within_gamma(y[i * rows + r], want, mag, cols, &what);
                    }
                }
                // Backward, plain and accumulating onto a known dx.
                let dy = random_f32(t * rows, 9);
                for accumulate in [false, true] {
                    let base = random_f32(t * cols, 11);
                    let mut dx = if accumulate {
                        base.clone()
                    } else {
                        vec![f32::NAN; t * cols]
                    };
                    m.matmul_w(&mut dx, &dy, t, accumulate);
                    for i in 0..t {
                        for c in 0..cols {
                            let terms =
                                (0..rows).map(|r| dy[i * rows + r] as f64 * w[r * cols + c] as f64);
                            let (mut want, mut mag) = (0.0f64, 0.0f64);
                            for v in terms {
                                want += v;
                                mag += v.abs();
                            }
                            if accumulate {
                                want += base[i * cols + c] as f64;
                                mag += (base[i * cols + c] as f64).abs();
                            }
                            let what = format!(
                                "{dtype} [{rows}, {cols}] t {t} accumulate {accumulate}: dx[{i}, {c}]"
                            );
                            assert_within_gamma(dx[i * cols + c], want, mag, rows + 1, &what);
                        }
                    }
                }
            }
        }
    }

    /// Every bf16 kernel this CPU runs (the emulated ones everywhere).
    fn bf16_kernels() -> Vec<Bf16Kernel> {
        use crate::engine::{amx, bf16::cpu_has_avx512bf16};
        let mut v = vec![Bf16Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            v.push(Bf16Kernel::Avx2);
        }
        if cpu_has_avx512bf16() {
            v.push(Bf16Kernel::Avx512Bf16);
            if amx::amx_available() {
                v.push(Bf16Kernel::Amx);
            }
        }
        v
    }

    /// The bf16 products over blocks against the bf16 products over the packing of the
    /// dequantised weight (an independent path: `PackedBf16` rounds the f32 values itself), bit
    /// for bit, forward and backward, plain and accumulating, on every kernel here.
    #[test]
    fn bf16_products_over_blocks_equal_the_packed_dequantised_weight_bit_for_bit() {
        let kernels = bf16_kernels();
        eprintln!("bf16 kernels on this CPU: {kernels:?}");
        // Rows not whole panels of 64 nor whole AMX pairs (the backward's reduction), a single
        // row; t a single row, and not a multiple of the 32-row AMX block; cols of one group.
        let shapes: &[(usize, usize, usize)] = &[(70, 256, 37), (1, 512, 1), (129, 256, 5)];
        for dtype in GGUF_TYPES {
            for &(rows, cols, t) in shapes {
                check_bf16_over_blocks(dtype, rows, cols, t, &kernels);
            }
        }
        // Short rows where the block allows (k = 32 and 96: 16 and 48 pairs), and a backward
        // reduction long enough to run in three blocks of pairs.
        for dtype in [GgmlType::Q4_0, GgmlType::Q8_0] {
            check_bf16_over_blocks(dtype, 33, 96, 7, &kernels);
        }
        check_bf16_over_blocks(GgmlType::Q4_1, 2 * 2 * 2048 + 67, 32, 3, &kernels);
    }

    fn check_bf16_over_blocks(
        dtype: GgmlType,
        rows: usize,
        cols: usize,
        t: usize,
        kernels: &[Bf16Kernel],
    ) {
        use crate::engine::bf16::{matmul_bf16_t_with as bwd, matmul_bf16_with as fwd, PackedBf16};
        let bytes = random_blocks(dtype, rows, cols, rows as u64 * 7 + cols as u64);
        let m = QuantMatrix::from_gguf_blocks(dtype, &bytes, rows, cols, None, "w").unwrap();
        let w: Vec<f32> = (0..rows).flat_map(|r| m.dequantize_row(r)).collect();
        let packed = PackedBf16::for_x_wt(&w, rows, cols);
        let x = random_f32(t * cols, 3);
        let dy = random_f32(t * rows, 4);
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
        for &kernel in kernels {
            let what = format!("{dtype} [{rows}, {cols}] t {t} {kernel:?}");
            let mut want = vec![0.0f32; t * rows];
            fwd(kernel, &mut want, &x, t, &packed, false);
            let mut got = vec![f32::NAN; t * rows];
            m.matmul_nt_bf16_with(kernel, &mut got, &x, t);
            assert!(same(&got, &want), "{what}: forward");
            for accumulate in [false, true] {
                let base = random_f32(t * cols, 5);
                let mut want = base.clone();
                bwd(kernel, &mut want, &dy, t, &packed, accumulate);
                let mut got = base.clone();
                m.matmul_w_bf16_with(kernel, &mut got, &dy, t, accumulate);
                assert!(
                    same(&got, &want),
                    "{what}: backward, accumulate {accumulate}"
                );
            }
        }
        // The dispatch: every row count takes the bf16 products once chosen, on bf16_kernel().
        {
            let mut m = m;
            m.set_bf16_products(true);
            let kernel = bf16_kernel();
            let mut want = vec![0.0f32; t * rows];
            fwd(kernel, &mut want, &x, t, &packed, false);
            let mut got = vec![0.0f32; t * rows];
            m.matmul_nt(&mut got, &x, t);
            assert!(same(&got, &want), "{dtype}: matmul_nt with bf16 products");
            let mut want = vec![0.0f32; t * cols];
            bwd(kernel, &mut want, &dy, t, &packed, false);
            let mut got = vec![0.0f32; t * cols];
            m.matmul_w(&mut got, &dy, t, false);
            assert!(same(&got, &want), "{dtype}: matmul_w with bf16 products");
        }
    }

    #[test]
    fn matmul_nt_takes_the_panels_from_many_rows() {
        // The dispatch: the same y (within rounding) on both sides of MANY_ROWS.
        let (rows, cols) = (90, 512);
        let bytes = random_blocks(GgmlType::Q4_K, rows, cols, 1);
        let m =
            QuantMatrix::from_gguf_blocks(GgmlType::Q4_K, &bytes, rows, cols, None, "w").unwrap();
        let x = random_f32(MANY_ROWS * cols, 2);
        let mut many = vec![0.0f32; MANY_ROWS * rows];
        m.matmul_nt(&mut many, &x, MANY_ROWS);
        for i in 0..MANY_ROWS {
            let mut one = vec![0.0f32; rows];
            m.matmul_nt(&mut one, &x[i * cols..(i + 1) * cols], 1);
            for (a, b) in one.iter().zip(&many[i * rows..(i + 1) * rows]) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn bad_blocks_are_errors_naming_the_tensor() {
        let e = QuantMatrix::from_gguf_blocks(GgmlType::Q4_1, &[0; 19], 1, 32, None, "blk.0.x")
            .unwrap_err();
        assert!(e.to_string().contains("blk.0.x"), "{e}");
        let e = QuantMatrix::from_gguf_blocks(GgmlType::Q3_K, &[0; 110], 1, 256, None, "blk.1.y")
            .unwrap_err();
        assert!(e.to_string().contains("blk.1.y is Q3_K"), "{e}");
        // A Q8_0 block whose f16 scale is infinite.
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
        let e =
            QuantMatrix::from_gguf_blocks(GgmlType::Q8_0, &b, 1, 32, None, "blk.2.z").unwrap_err();
        assert!(
            e.to_string().contains("blk.2.z") && e.to_string().contains("finite"),
            "{e}"
        );
    }
}
