//! f32 rows → the GGUF tensor types lorakit writes: F32, F16, BF16 and the block types
//! Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K (every type of llama.cpp's Q4_K_M,
//! Q5_K_M and Q8_0 files).
//!
//! Each block quantiser reproduces ggml's reference quantiser (`quantize_row_*_ref` in
//! `ggml-quants.c`, which `llama-quantize` runs when it has no importance matrix) value for value:
//! the same search over scales, the same f32 operations in the same order, ggml's `nearest_int`
//! (round half to even through the 1.5·2²³ trick), f16 scales rounded to nearest even. The
//! tests compare the bytes with ggml's own output (`tests/integration/gguf_adapter.rs`). The
//! floats round to nearest even as `gguf.quants` does.

use std::fmt;

use super::GgmlType;

/// Why [`quantize`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuantizeError {
    /// A type lorakit does not write.
    Unsupported(GgmlType),
    /// A block type needs rows that are whole blocks.
    RowLength { dtype: GgmlType, row: usize },
}

/// The types [`quantize`] writes.
pub const WRITABLE: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

impl fmt::Display for QuantizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            QuantizeError::Unsupported(t) => {
                let names: Vec<&str> = WRITABLE.iter().map(|t| t.name()).collect();
                write!(
                    f,
                    "lorakit cannot write tensor type {t} ({})",
                    names.join(", ")
                )
            }
            QuantizeError::RowLength { dtype, row } => write!(
                f,
                "rows of {row} values are not whole {dtype} blocks of {}",
                dtype.block_size()
            ),
        }
    }
}

impl std::error::Error for QuantizeError {}

/// Whether `dtype` can hold rows of `row` values (block types need whole blocks per row).
pub fn can_quantize(dtype: GgmlType, row: usize) -> bool {
    WRITABLE.contains(&dtype) && row.is_multiple_of(dtype.block_size())
}

/// x: rows of `row` values (x.len() a multiple of `row`) → `dtype` data.
pub fn quantize(dtype: GgmlType, x: &[f32], row: usize) -> Result<Vec<u8>, QuantizeError> {
    if !WRITABLE.contains(&dtype) {
        return Err(QuantizeError::Unsupported(dtype));
    }
    if !row.is_multiple_of(dtype.block_size()) {
        return Err(QuantizeError::RowLength { dtype, row });
    }
    let block = dtype.block_size();
    let mut out = Vec::with_capacity(x.len() / block * dtype.type_size());
    let blocks = x.chunks_exact(block);
    match dtype {
        GgmlType::F32 => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => x.iter().for_each(|&v| out.extend(f16_bytes(v))),
        GgmlType::BF16 => x
            .iter()
            .for_each(|&v| out.extend(bf16_bits(v).to_le_bytes())),
        GgmlType::Q8_0 => blocks.for_each(|b| q8_0(b, &mut out)),
        GgmlType::Q4_0 => blocks.for_each(|b| q4_0(b, &mut out)),
        GgmlType::Q4_1 => blocks.for_each(|b| q4_1(b, &mut out)),
        GgmlType::Q5_0 => blocks.for_each(|b| q5_0(b, &mut out)),
        GgmlType::Q5_1 => blocks.for_each(|b| q5_1(b, &mut out)),
        GgmlType::Q4_K => blocks.for_each(|b| qk_k_asymmetric(b, 15, &mut out)),
        GgmlType::Q5_K => blocks.for_each(|b| qk_k_asymmetric(b, 31, &mut out)),
        GgmlType::Q6_K => blocks.for_each(|b| q6_k(b, &mut out)),
        _ => unreachable!("WRITABLE lists the types handled above"),
    }
    Ok(out)
}

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

fn f16_round(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// f32 → bf16 bits, round to nearest even; NaN stays a (quiet) NaN. As ggml's
/// `ggml_compute_fp32_to_bf16` and gguf-py.
fn bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

/// ggml's `nearest_int`: round half to even, for |v| < 2²² (the callers' scaled values are).
fn nearest_int(v: f32) -> i32 {
    let shifted = v + 12_582_912.0;
    (shifted.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// The value of largest magnitude, with its sign (the first such on ties).
fn signed_absmax(b: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in b {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(b: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in b {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// Q8_0 (34 bytes): f16 d = amax / 127, 32 × i8 roundf(x / d) (computed as x · (1 / d)).
fn q8_0(b: &[f32], out: &mut Vec<u8>) {
    let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    out.extend(f16_bytes(d));
    out.extend(b.iter().map(|&v| (v * id).round() as i8 as u8));
}

/// Q4_0 (18 bytes): the value of largest magnitude maps to -8, d = max / -8; q = x/d + 8.
fn q4_0(b: &[f32], out: &mut Vec<u8>) {
    let d = signed_absmax(b) / -8.0;
    let id = inverse(d);
    out.extend(f16_bytes(d));
    let q = |v: f32| ((v * id + 8.5) as i32).min(15) as u8;
    out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
}

/// Q4_1 (20 bytes): f16 d = (max - min) / 15, f16 m = min, nibbles (x - min) / d.
fn q4_1(b: &[f32], out: &mut Vec<u8>) {
    let (min, max) = min_max(b);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    out.extend(f16_bytes(d));
    out.extend(f16_bytes(min));
    let q = |v: f32| (((v - min) * id + 0.5) as i32).min(15) as u8;
    out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
}

/// The 5-bit values' low nibbles (16 bytes) and their fifth bits (u32, bit j for element j).
fn put_5bit(q: [u8; 32], out: &mut Vec<u8>) {
    let mut qh = 0u32;
    for (j, &v) in q.iter().enumerate() {
        qh |= ((v as u32 >> 4) & 1) << j;
    }
    out.extend(qh.to_le_bytes());
    out.extend((0..16).map(|j| (q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4)));
}

/// Q5_0 (22 bytes): f16 d = max / -16 (max the signed value of largest magnitude), u32 fifth
/// bits, nibbles; q = x/d + 16.
fn q5_0(b: &[f32], out: &mut Vec<u8>) {
    let d = signed_absmax(b) / -16.0;
    let id = inverse(d);
    out.extend(f16_bytes(d));
    put_5bit(
        std::array::from_fn(|j| ((b[j] * id + 16.5) as i32).min(31) as u8),
        out,
    );
}

/// Q5_1 (24 bytes): f16 d = (max - min) / 31, f16 m = min, u32 fifth bits, nibbles.
fn q5_1(b: &[f32], out: &mut Vec<u8>) {
    let (min, max) = min_max(b);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    out.extend(f16_bytes(d));
    out.extend(f16_bytes(min));
    put_5bit(
        std::array::from_fn(|j| (((b[j] - min) * id + 0.5) as i32) as u8),
        out,
    );
}

/// ggml's `make_qkx2_quants`: levels L ∈ [0, nmax] for x ≈ scale · L - min, minimising the
/// `weights`-weighted squared error over a grid of `nstep + 1` candidate scales around
/// nmax / (max - min), each refined by weighted least squares. Returns (scale, min ≥ 0).
fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    levels: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let level = |iscale: f32, v: f32, min: f32| nearest_int(iscale * (v - min)).clamp(0, nmax);
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = level(iscale, x[i], min);
        levels[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = level(iscale, x[i], min);
            aux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                levels[..n].copy_from_slice(&aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Q4_K (nmax 15, 144 bytes: f16 d, f16 dmin, scales[12], qs[128]) and Q5_K (nmax 31, 176
/// bytes: the same, then qh[32] before qs[128]). Eight sub-blocks of 32, each with its own
/// 6-bit scale and min (of d and dmin): y = d·sc·q - dmin·m.
fn qk_k_asymmetric(x: &[f32], nmax: i32, out: &mut Vec<u8>) {
    // The grid of candidate scales ggml searches for each type.
    let (rmin, nstep) = if nmax == 15 { (-1.0, 20) } else { (-0.5, 15) };
    let mut levels = [0u8; 256];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let sub = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in sub {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|l| av_x + sub[l].abs());
        let (scale, min) = make_qkx2_quants(
            sub,
            &weights,
            nmax,
            &mut levels[32 * j..32 * j + 32],
            rmin,
            0.1,
            nstep,
        );
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16_round(max_scale / 63.0);
    let dmin = f16_round(max_min / 63.0);
    // The levels again, against the scales as they were rounded.
    for j in 0..8 {
        let (sc, m) = super::quants::scale_min_k4(j, &packed);
        let dj = d * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for i in 32 * j..32 * j + 32 {
            levels[i] = nearest_int((x[i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    out.extend(f16_bytes(max_scale / 63.0));
    out.extend(f16_bytes(max_min / 63.0));
    out.extend(packed);
    if nmax == 31 {
        // Fifth bits: element n·64 + j sets bit 2n of qh[j], element n·64 + 32 + j bit 2n + 1.
        let mut qh = [0u8; 32];
        for n in 0..4 {
            for j in 0..32 {
                qh[j] |= (levels[64 * n + j] >> 4) << (2 * n);
                qh[j] |= (levels[64 * n + 32 + j] >> 4) << (2 * n + 1);
            }
        }
        out.extend(qh);
    }
    for n in 0..4 {
        let chunk = &levels[64 * n..64 * n + 64];
        out.extend((0..32).map(|l| (chunk[l] & 0x0f) | ((chunk[l + 32] & 0x0f) << 4)));
    }
}

/// ggml's `make_qx_quants` with rmse_type 1 (weights x²): symmetric levels L ∈ [-nmax, nmax)
/// stored as L + nmax, the scale searched over 19 candidates around -nmax / max and refined by
/// weighted least squares. Returns the scale.
fn make_qx_quants(x: &[f32], nmax: i32, levels: &mut [i8]) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < 1e-15 {
        levels.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let mut iscale = -(nmax as f32) / max;
    for (l, &v) in levels.iter_mut().zip(x) {
        *l = (level(iscale, v) + nmax) as i8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (l, &v) in levels.iter_mut().zip(x) {
                *l = (level(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q6_K (210 bytes: ql[128], qh[64], i8 scales[16], f16 d): sixteen sub-blocks of 16, each with
/// an 8-bit scale of d; y = d·sc·(q - 32).
fn q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut levels = [0i8; 256];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for ib in 0..16 {
        let scale = make_qx_quants(
            &x[16 * ib..16 * ib + 16],
            32,
            &mut levels[16 * ib..16 * ib + 16],
        );
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < 1e-15 {
        out.extend([0u8; 210]);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d_bytes = f16_bytes(1.0 / iscale);
    let d = f16_round(1.0 / iscale);
    let sc: [i8; 16] = std::array::from_fn(|ib| nearest_int(iscale * scales[ib]).min(127) as i8);
    for ((&s, lv), xs) in sc
        .iter()
        .zip(levels.chunks_exact_mut(16))
        .zip(x.chunks_exact(16))
    {
        let dj = d * s as f32;
        if dj == 0.0 {
            continue;
        }
        for (l, &v) in lv.iter_mut().zip(xs) {
            *l = (nearest_int(v / dj).clamp(-32, 31) + 32) as i8;
        }
    }
    let l = |i: usize| levels[i] as u8;
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for n in 0..2 {
        let j = 128 * n;
        for i in 0..32 {
            ql[64 * n + i] = (l(j + i) & 0x0f) | ((l(j + i + 64) & 0x0f) << 4);
            ql[64 * n + i + 32] = (l(j + i + 32) & 0x0f) | ((l(j + i + 96) & 0x0f) << 4);
            qh[32 * n + i] = (l(j + i) >> 4)
                | ((l(j + i + 32) >> 4) << 2)
                | ((l(j + i + 64) >> 4) << 4)
                | ((l(j + i + 96) >> 4) << 6);
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.map(|s| s as u8));
    out.extend(d_bytes);
}
