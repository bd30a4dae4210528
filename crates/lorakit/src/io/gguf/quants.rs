//! Dequantisation of GGML tensor data to f32.
//!
//! Every kernel follows ggml's `dequantize_row_*` (ggml-quants.c) and the Python `gguf` package's
//! `gguf.quants.dequantize` operation for operation, so the results are bit-identical: the f16
//! scales are widened exactly, and each value is `(q as f32) * d` or `(q as f32) * d + m` (or
//! `d * sc` first where ggml multiplies the scales first), rounded once per operation, never fused
//! into an FMA (Rust does not contract `a * b + c`).
//!
//! A kernel works on whole blocks: `src.len() == n * type_size` and `dst.len() == n * block_size`.
//! [`dequantize`] checks the lengths and splits large tensors into chunks of blocks that rayon
//! dequantises in parallel.

use std::fmt;

use rayon::prelude::*;

use super::GgmlType;

/// Why [`dequantize`] refused its input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DequantError {
    /// lorakit has no kernel for this type (see [`GgmlType::can_dequantize`]).
    Unsupported(GgmlType),
    /// `bytes` is not a whole number of blocks, or `out` has the wrong length for it.
    Length {
        dtype: GgmlType,
        bytes: usize,
        out: usize,
    },
}

impl fmt::Display for DequantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DequantError::Unsupported(t) => write!(f, "cannot dequantise tensor type {}", t.name()),
            DequantError::Length { dtype, bytes, out } => {
                let (bs, ts) = (dtype.block_size(), dtype.type_size());
                if bytes % ts != 0 {
                    write!(
                        f,
                        "{bytes} bytes of {} data is not a whole number of {ts}-byte blocks",
                        dtype.name()
                    )
                } else {
                    write!(
                        f,
                        "{bytes} bytes of {} data hold {} values, but the output has room for {out}",
                        dtype.name(),
                        bytes / ts * bs
                    )
                }
            }
        }
    }
}

impl std::error::Error for DequantError {}

type Kernel = fn(&[u8], &mut [f32]);

/// The kernel for `dtype`, if lorakit can dequantise it.
pub(super) fn kernel(dtype: GgmlType) -> Option<Kernel> {
    use GgmlType::*;
    Some(match dtype {
        F32 => dq_f32,
        F16 => dq_f16,
        BF16 => dq_bf16,
        F64 => dq_f64,
        Q4_0 => dq_q4_0,
        Q4_1 => dq_q4_1,
        Q5_0 => dq_q5_0,
        Q5_1 => dq_q5_1,
        Q8_0 => dq_q8_0,
        Q2_K => dq_q2_k,
        Q3_K => dq_q3_k,
        Q4_K => dq_q4_k,
        Q5_K => dq_q5_k,
        Q6_K => dq_q6_k,
        IQ4_NL => dq_iq4_nl,
        IQ4_XS => dq_iq4_xs,
        _ => return None,
    })
}

/// Tensors with fewer values than this are dequantised on the calling thread.
const PARALLEL_MIN_VALUES: usize = 1 << 16;
/// Values per parallel task (a multiple of every block size).
const CHUNK_VALUES: usize = 1 << 15;

/// Dequantise `bytes` (whole blocks of `dtype`, as stored in a GGUF file) into `out`, which must
/// have exactly one slot per value. Large inputs are split across rayon's thread pool.
pub fn dequantize(dtype: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    let chunk = if out.len() >= PARALLEL_MIN_VALUES {
        CHUNK_VALUES
    } else {
        usize::MAX
    };
    dequantize_chunked(dtype, bytes, out, chunk)
}

/// [`dequantize`] with an explicit chunk size in values (rounded down to whole blocks, at least
/// one block); `usize::MAX` runs everything on the calling thread. Tests use small chunks.
pub(super) fn dequantize_chunked(
    dtype: GgmlType,
    bytes: &[u8],
    out: &mut [f32],
    chunk_values: usize,
) -> Result<(), DequantError> {
    let kernel = kernel(dtype).ok_or(DequantError::Unsupported(dtype))?;
    let (bs, ts) = (dtype.block_size(), dtype.type_size());
    let n_blocks = bytes.len() / ts;
    if !bytes.len().is_multiple_of(ts) || n_blocks.checked_mul(bs) != Some(out.len()) {
        return Err(DequantError::Length {
            dtype,
            bytes: bytes.len(),
            out: out.len(),
        });
    }
    let chunk_blocks = (chunk_values / bs).max(1);
    if chunk_blocks >= n_blocks {
        kernel(bytes, out);
    } else {
        out.par_chunks_mut(chunk_blocks * bs)
            .zip(bytes.par_chunks(chunk_blocks * ts))
            .for_each(|(dst, src)| kernel(src, dst));
    }
    Ok(())
}

/// IEEE half to single precision, exact for every input, NaN payloads kept (like numpy's
/// software conversion; hardware F16C would quiet signalling NaNs). Written branch-light so the
/// F16 loop vectorises.
#[inline(always)]
pub(super) fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let exp = (h >> 10) & 0x1f;
    let man = h & 0x3ff;
    let bits = if exp == 0 {
        // zero or subnormal: man * 2^-24, exact in f32
        (man as f32 * (1.0 / 16_777_216.0)).to_bits()
    } else if exp == 31 {
        0x7f80_0000 | (man << 13)
    } else {
        ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(sign | bits)
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

fn dq_f32(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(4).zip(dst.iter_mut()) {
        *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

fn dq_f16(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
}

fn dq_bf16(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
    }
}

fn dq_f64(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(8).zip(dst.iter_mut()) {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        *y = f64::from_le_bytes(a) as f32;
    }
}

/// Q4_0: f16 d, 16 bytes of nibbles; y[j] = (lo - 8) d, y[j + 16] = (hi - 8) d.
fn dq_q4_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qs = &b[2..18];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            lo[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
            hi[j] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Q4_1: f16 d, f16 m, 16 bytes of nibbles; y = q d + m.
fn dq_q4_1(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(20).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let qs = &b[4..20];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            lo[j] = (qs[j] & 0x0f) as f32 * d + m;
            hi[j] = (qs[j] >> 4) as f32 * d + m;
        }
    }
}

/// Q5_0: f16 d, u32 qh (bit j = 5th bit of value j), 16 bytes of nibbles; y = (q - 16) d.
fn dq_q5_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(22).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            lo[j] = (((qs[j] & 0x0f) as u32 | h0) as i32 - 16) as f32 * d;
            hi[j] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
        }
    }
}

/// Q5_1: f16 d, f16 m, u32 qh, 16 bytes of nibbles; y = q d + m.
fn dq_q5_1(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(24).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let qs = &b[8..24];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            lo[j] = ((qs[j] & 0x0f) as u32 | h0) as f32 * d + m;
            hi[j] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
        }
    }
}

/// Q8_0: f16 d, 32 i8; y = q d.
fn dq_q8_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qs = &b[2..34];
        for j in 0..32 {
            y[j] = (qs[j] as i8) as f32 * d;
        }
    }
}

/// Q2_K (84 bytes): scales[16] (lo nibble scale, hi nibble min), qs[64] (2-bit), f16 d, f16 dmin.
fn dq_q2_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(84).zip(dst.chunks_exact_mut(256)) {
        let scales = &b[0..16];
        let d = f16_at(b, 80);
        let min = f16_at(b, 82);
        for n in 0..2 {
            let q = &b[16 + 32 * n..16 + 32 * n + 32];
            for j in 0..4 {
                let shift = 2 * j;
                for half in 0..2 {
                    let sc = scales[n * 8 + j * 2 + half];
                    let dl = d * (sc & 0x0f) as f32;
                    let ml = min * (sc >> 4) as f32;
                    let out = &mut y[n * 128 + j * 32 + half * 16..][..16];
                    let q = &q[half * 16..half * 16 + 16];
                    for l in 0..16 {
                        out[l] = dl * ((q[l] >> shift) & 3) as f32 - ml;
                    }
                }
            }
        }
    }
}

/// Q3_K (110 bytes): hmask[32], qs[64] (low 2 bits), scales[12] (16 packed 6-bit), f16 d.
fn dq_q3_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(110).zip(dst.chunks_exact_mut(256)) {
        let hm = &b[0..32];
        let sb = &b[96..108];
        let d_all = f16_at(b, 108);
        let mut scales = [0i32; 16];
        for (s, out) in scales.iter_mut().enumerate() {
            let low = if s < 8 { sb[s] & 0x0f } else { sb[s - 8] >> 4 };
            let high = (sb[8 + s % 4] >> (2 * (s / 4))) & 3;
            *out = (low | (high << 4)) as i32 - 32;
        }
        for n in 0..2 {
            let q = &b[32 + 32 * n..32 + 32 * n + 32];
            for j in 0..4 {
                let shift = 2 * j;
                let m = 1u8 << (4 * n + j);
                for half in 0..2 {
                    let dl = d_all * scales[n * 8 + j * 2 + half] as f32;
                    let out = &mut y[n * 128 + j * 32 + half * 16..][..16];
                    let q = &q[half * 16..half * 16 + 16];
                    let hm = &hm[half * 16..half * 16 + 16];
                    for l in 0..16 {
                        let sub = if hm[l] & m != 0 { 0 } else { 4 };
                        out[l] = dl * (((q[l] >> shift) & 3) as i32 - sub) as f32;
                    }
                }
            }
        }
    }
}

/// The 6-bit scale and min `j` (0..8) of a Q4_K/Q5_K block (ggml's `get_scale_min_k4`).
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K (144 bytes): f16 d, f16 dmin, scales[12], qs[128]; y = (d sc) q - (dmin m).
fn dq_q4_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(144).zip(dst.chunks_exact_mut(256)) {
        let d = f16_at(b, 0);
        let min = f16_at(b, 2);
        let scales = &b[4..16];
        for (k, y) in y.chunks_exact_mut(64).enumerate() {
            let q = &b[16 + 32 * k..16 + 32 * k + 32];
            let (sc, m) = scale_min_k4(2 * k, scales);
            let (d1, m1) = (d * sc as f32, min * m as f32);
            let (sc, m) = scale_min_k4(2 * k + 1, scales);
            let (d2, m2) = (d * sc as f32, min * m as f32);
            let (lo, hi) = y.split_at_mut(32);
            for l in 0..32 {
                lo[l] = d1 * (q[l] & 0x0f) as f32 - m1;
                hi[l] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}

/// Q5_K (176 bytes): f16 d, f16 dmin, scales[12], qh[32], qs[128].
fn dq_q5_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(176).zip(dst.chunks_exact_mut(256)) {
        let d = f16_at(b, 0);
        let min = f16_at(b, 2);
        let scales = &b[4..16];
        let qh = &b[16..48];
        for (k, y) in y.chunks_exact_mut(64).enumerate() {
            let ql = &b[48 + 32 * k..48 + 32 * k + 32];
            let (u1, u2) = (1u8 << (2 * k), 2u8 << (2 * k));
            let (sc, m) = scale_min_k4(2 * k, scales);
            let (d1, m1) = (d * sc as f32, min * m as f32);
            let (sc, m) = scale_min_k4(2 * k + 1, scales);
            let (d2, m2) = (d * sc as f32, min * m as f32);
            let (lo, hi) = y.split_at_mut(32);
            for l in 0..32 {
                let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                lo[l] = d1 * ((ql[l] & 0x0f) + h1) as f32 - m1;
                hi[l] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
            }
        }
    }
}

/// Q6_K (210 bytes): ql[128], qh[64], scales[16] (i8), f16 d; y = (d sc) (q - 32).
fn dq_q6_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(210).zip(dst.chunks_exact_mut(256)) {
        let d = f16_at(b, 208);
        for (n, y) in y.chunks_exact_mut(128).enumerate() {
            let ql = &b[64 * n..64 * n + 64];
            let qh = &b[128 + 32 * n..128 + 32 * n + 32];
            let sc = &b[192 + 8 * n..192 + 8 * n + 8];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
            }
        }
    }
}

/// The non-linear 4-bit grid of IQ4_NL and IQ4_XS (ggml's `kvalues_iq4nl`).
const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// IQ4_NL (18 bytes): f16 d, 16 bytes of nibbles indexing the grid; y = d grid[q].
fn dq_iq4_nl(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qs = &b[2..18];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            lo[j] = d * KVALUES_IQ4NL[(qs[j] & 0x0f) as usize] as f32;
            hi[j] = d * KVALUES_IQ4NL[(qs[j] >> 4) as usize] as f32;
        }
    }
}

/// IQ4_XS (136 bytes): f16 d, u16 scales_h, scales_l[4], qs[128]; 8 sub-blocks of 32 with
/// 6-bit scales; y = (d (ls - 32)) grid[q].
fn dq_iq4_xs(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(136).zip(dst.chunks_exact_mut(256)) {
        let d = f16_at(b, 0);
        let scales_h = u16::from_le_bytes([b[2], b[3]]) as u32;
        let scales_l = &b[4..8];
        for (ib, y) in y.chunks_exact_mut(32).enumerate() {
            let ls = ((scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0f) as u32
                | (((scales_h >> (2 * ib)) & 3) << 4);
            let dl = d * (ls as i32 - 32) as f32;
            let qs = &b[8 + 16 * ib..8 + 16 * ib + 16];
            let (lo, hi) = y.split_at_mut(16);
            for j in 0..16 {
                lo[j] = dl * KVALUES_IQ4NL[(qs[j] & 0x0f) as usize] as f32;
                hi[j] = dl * KVALUES_IQ4NL[(qs[j] >> 4) as usize] as f32;
            }
        }
    }
}
