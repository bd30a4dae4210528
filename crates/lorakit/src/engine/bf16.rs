//! bf16 matrix products with f32 accumulation (AVX512-BF16 `vdpbf16ps`), for frozen weights.
//!
//! A frozen weight is converted once to bf16 and packed in the VNNI layout the instruction
//! wants: column panels of [`NR`] output columns, each holding, for every pair of the
//! reduction dimension, `NR × 2` bf16 values. The activation side is converted to bf16 on
//! every call (m·k work against m·k·n multiply-adds). Each `vdpbf16ps` does 32 multiply-adds,
//! twice an f32 FMA, which is what `--precision bf16` buys on CPUs without AMX.
//!
//! On CPUs without the instruction (or with [`DISABLE_ENV`] set) the same products are emulated
//! ([`Bf16Kernel::Avx2`], [`Bf16Kernel::Portable`]) with the instruction's arithmetic: both
//! inputs rounded to bf16 (nearest even; bf16 subnormals read as zero, as the instruction's
//! DAZ), each product exact in f32, and for every output element the running f32 sum taken
//! pair by pair in the instruction's order (odd element of the pair, then even; each addition
//! rounded to nearest even), starting from zero, the old output added last when accumulating.
//! The results are those of the instruction bit for bit (tested on a CPU that has it) except
//! where a product or a partial sum falls below f32's smallest normal (2⁻¹²⁶), which the
//! instruction flushes to zero. The emulation is no faster than f32 products, so the default
//! precision is bf16 only where [`bf16_native`] holds.

use std::ops::Range;
use std::sync::OnceLock;

use half::bf16;

use super::amx;
use rayon::prelude::*;

/// Output columns per packed panel (4 zmm registers of 16 f32).
pub const NR: usize = 64;
// The AMX kernel reads these panels as its B tiles.
const _: () = assert!(NR == amx::PANEL_COLS);
/// Rows of the activation per micro-kernel call (6 × 4 accumulators + 4 B + 1 A registers).
const MR: usize = 6;
/// Pairs of the reduction per rebuilt panel of [`matmul_bf16_t`] (NR × 2 × 2 bytes each: 512 KB):
/// a linear layer's reduction fits in one, the LM head's (over the vocabulary) takes several.
const T_BLOCK_PAIRS: usize = 2048;
/// The fewest rows of x a task that builds its panel multiplies by it.
const MIN_GROUP_ROWS: usize = 256;
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
                                panel[(p * NR + c) * 2 + e] = to_bf16_bits(b(kk, nn));
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

    /// B(kk, nn)'s bf16 bits.
    #[inline]
    pub fn bits(&self, kk: usize, nn: usize) -> u16 {
        let (j, c) = (nn / NR, nn % NR);
        let panel_len = self.k_pairs * NR * 2;
        self.data[j * panel_len + ((kk / 2) * NR + c) * 2 + kk % 2]
    }

    /// B(kk, nn) as f32 (exact: the bf16 value packed).
    #[inline]
    fn get(&self, kk: usize, nn: usize) -> f32 {
        bf16_f32(self.bits(kk, nn))
    }

    /// The packed values as W [n, k] row-major, the inverse of [`PackedBf16::for_x_wt`] up to
    /// the bf16 rounding (bf16 → f32 is exact).
    pub fn unpack_wt(&self) -> Vec<f32> {
        let mut w = vec![0.0f32; self.n * self.k];
        w.par_chunks_mut(self.k.max(1))
            .enumerate()
            .for_each(|(nn, row)| {
                for (kk, v) in row.iter_mut().enumerate() {
                    *v = self.get(kk, nn);
                }
            });
        w
    }

    /// Pairs `qs` of panel `jt` of Bᵀ [n, k] in this packing's layout, written into `dst`
    /// (resized to qs.len() pairs × NR × 2): what the panel [`PackedBf16::for_x_w`] of the same
    /// weight holds there, value for value, so that one packing serves both products.
    ///
    /// The panel is a transpose of 4-value units: B's pair p0 + pl, columns 2q, 2q + 1 (one unit,
    /// contiguous in B's panel) becomes Bᵀ's pair q, columns 2pl, 2pl + 1 (contiguous in dst),
    /// its middle two values swapped. AVX-512 moves 8 × 8 units at a time (rebuilding panels
    /// element by element was an eighth of an AMX training step); the rest go one by one.
    fn transposed_panel(&self, jt: usize, qs: Range<usize>, dst: &mut Vec<u16>) {
        let len = qs.len() * NR * 2;
        // Every element is written below: only storage the buffer never had needs zeroing.
        dst.truncate(len);
        dst.resize(len, 0);
        // Bᵀ's columns jt·NR.. are B's rows, i.e. the pairs p0.. of B's packing.
        let p0 = jt * NR / 2;
        let pairs = (NR / 2).min(self.k_pairs.saturating_sub(p0));
        if pairs < NR / 2 {
            // Past B's last row: the padding of Bᵀ's last panel.
            for row in dst.chunks_mut(NR * 2) {
                row[4 * pairs..].fill(0);
            }
        }
        // The units moved 8 × 8 at a time: blocks of 8 q starting at a multiple of 8 (they stay
        // inside one of B's panels) and of 8 pl.
        #[cfg(target_arch = "x86_64")]
        let vector = std::arch::is_x86_feature_detected!("avx512bw");
        #[cfg(not(target_arch = "x86_64"))]
        let vector = false;
        let q_first = qs.start.next_multiple_of(8).min(qs.end);
        let q_vec = if vector {
            q_first..q_first + (qs.end - q_first) / 8 * 8
        } else {
            0..0
        };
        let pl_vec = 0..pairs / 8 * 8;
        for q in q_vec.clone().step_by(8) {
            for pl in pl_vec.clone().step_by(8) {
                let src = self.unit_at(q, p0 + pl);
                let out = (q - qs.start) * NR * 2 + 4 * pl;
                let last = 7 * NR * 2 + 32;
                assert!(src + last <= self.data.len() && out + last <= len);
                // SAFETY: avx512bw was detected; the assert bounds the 8 rows of 32 values read
                // and written.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    transpose_units_8x8(self.data.as_ptr().add(src), dst.as_mut_ptr().add(out))
                };
            }
        }
        for q in qs.clone() {
            for pl in 0..pairs {
                if q_vec.contains(&q) && pl_vec.contains(&pl) {
                    continue;
                }
                let at = self.unit_at(q, p0 + pl);
                let s = &self.data[at..at + 4];
                let out = (q - qs.start) * NR * 2 + 4 * pl;
                dst[out..out + 4].copy_from_slice(&[s[0], s[2], s[1], s[3]]);
            }
        }
    }

    /// Where B(2p, 2q) starts in `data`: the unit B(2p..2p + 2, 2q..2q + 2), stored as
    /// B(2p, 2q), B(2p+1, 2q), B(2p, 2q+1), B(2p+1, 2q+1) (NR is even, so both columns share
    /// a panel).
    #[inline]
    fn unit_at(&self, q: usize, p: usize) -> usize {
        let (j, c0) = (2 * q / NR, 2 * q % NR);
        j * self.k_pairs * NR * 2 + (p * NR + c0) * 2
    }
}

/// dst row q (q < 8, stride NR·2) = the units of src column q (8 rows at stride NR·2, 8 units
/// of 4 values each), each unit's middle two values swapped: an 8 × 8 transpose of 64-bit
/// units.
///
/// # Safety
/// The CPU has AVX512-BW; src and dst are valid for 8 rows of 32 u16 at stride NR·2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn transpose_units_8x8(src: *const u16, dst: *mut u16) {
    use std::arch::x86_64::*;
    const STRIDE: usize = NR * 2;
    // Within each 8-byte unit: values 0, 2, 1, 3.
    const SWAP: [u8; 64] = {
        let mut s = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            let lane = i / 16 * 16;
            let unit = (i % 16) / 8 * 8;
            s[i] = (lane % 16 + unit + [0, 1, 4, 5, 2, 3, 6, 7][i % 8]) as u8;
            i += 1;
        }
        s
    };
    let swap = _mm512_loadu_si512(SWAP.as_ptr().cast());
    let r: [__m512i; 8] = std::array::from_fn(|i| {
        _mm512_shuffle_epi8(_mm512_loadu_si512(src.add(i * STRIDE).cast()), swap)
    });
    // rq = row r's unit q. t0 = [00 10 02 12 04 14 06 16], t1 = [01 11 03 13 ...], ...
    let lo = |a, b| _mm512_unpacklo_epi64(a, b);
    let hi = |a, b| _mm512_unpackhi_epi64(a, b);
    let t = [
        lo(r[0], r[1]),
        hi(r[0], r[1]),
        lo(r[2], r[3]),
        hi(r[2], r[3]),
        lo(r[4], r[5]),
        hi(r[4], r[5]),
        lo(r[6], r[7]),
        hi(r[6], r[7]),
    ];
    // 128-bit lanes: even lanes (0x88) or odd lanes (0xDD) of a, then of b.
    let even = |a, b| _mm512_shuffle_i64x2::<0x88>(a, b);
    let odd = |a, b| _mm512_shuffle_i64x2::<0xDD>(a, b);
    for parity in 0..2 {
        // Columns q ≡ parity (mod 2): t[parity], t[parity + 2], ... hold them.
        let (a, b, c, d) = (t[parity], t[parity + 2], t[parity + 4], t[parity + 6]);
        let (u0, u1, u2, u3) = (even(a, b), odd(a, b), even(c, d), odd(c, d));
        let rows = [even(u0, u2), even(u1, u3), odd(u0, u2), odd(u1, u3)];
        for (i, v) in rows.into_iter().enumerate() {
            // rows[i] is column q = parity + 2i.
            _mm512_storeu_si512(dst.add((parity + 2 * i) * STRIDE).cast(), v);
        }
    }
}

/// The environment variable that, set to anything but `0` or nothing, keeps the AVX512-BF16
/// kernel off even where the CPU has it: the emulated kernels run instead (to exercise them on
/// any machine) and the default training precision becomes f32.
pub const DISABLE_ENV: &str = "LORAKIT_DISABLE_AVX512BF16";

/// The kernels that compute [`matmul_bf16`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX tiles (`tdpbf16ps`, `engine::amx`) for products whose reduction dimension is whole
    /// tiles, the `vdpbf16ps` kernel for the rest.
    Amx,
    /// The `vdpbf16ps` instruction (AVX512-BF16).
    Avx512Bf16,
    /// Emulated with AVX2 + FMA f32 arithmetic.
    Avx2,
    /// Emulated in plain Rust (any CPU).
    Portable,
}

/// Whether this CPU has AVX512-BF16, whatever [`DISABLE_ENV`] says.
pub fn cpu_has_avx512bf16() -> bool {
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

/// Whether [`DISABLE_ENV`] is set (to anything but `0` or nothing).
pub fn avx512bf16_disabled() -> bool {
    std::env::var_os(DISABLE_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// The kernel [`matmul_bf16`] uses on this CPU: AMX tiles where the CPU and OS have them (and
/// [`amx::DISABLE_ENV`] is not set), else the AVX512-BF16 instruction, both unless
/// [`DISABLE_ENV`] is set; else the emulation (AVX2 + FMA where present). Decided once.
pub fn bf16_kernel() -> Bf16Kernel {
    static KERNEL: OnceLock<Bf16Kernel> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        if cpu_has_avx512bf16() && !avx512bf16_disabled() {
            if amx::amx_available() {
                return Bf16Kernel::Amx;
            }
            return Bf16Kernel::Avx512Bf16;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Bf16Kernel::Avx2;
        }
        Bf16Kernel::Portable
    })
}

/// Whether bf16 products are faster than f32 ones here: the default precision rule. True on AMX
/// tiles, and on `vdpbf16ps` where it does twice the work of an f32 FMA per cycle (AMD's Zen 4
/// and later). On the Intel Xeon measured, `vdpbf16ps` chains ran at 44% of the f32 FMA roof
/// (84 against 190 GFLOP/s, examples/matmul_peak), so an Intel CPU with AVX512-BF16 but no
/// usable tiles keeps f32 as its default; the emulated products are never faster than f32.
pub fn bf16_native() -> bool {
    match bf16_kernel() {
        Bf16Kernel::Amx => true,
        Bf16Kernel::Avx512Bf16 => cpu_is_amd(),
        Bf16Kernel::Avx2 | Bf16Kernel::Portable => false,
    }
}

/// Whether CPUID's vendor string is "AuthenticAMD".
fn cpu_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let v = std::arch::x86_64::__cpuid(0);
        // The vendor string is EBX, EDX, ECX in that order.
        let mut s = [0u8; 12];
        s[..4].copy_from_slice(&v.ebx.to_le_bytes());
        s[4..8].copy_from_slice(&v.edx.to_le_bytes());
        s[8..].copy_from_slice(&v.ecx.to_le_bytes());
        &s == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f32 → bf16 bits, rounded to nearest even; a bf16 subnormal becomes a zero of its sign (the
/// instruction reads them as zero, so the emulation must too).
#[inline]
fn to_bf16_bits(v: f32) -> u16 {
    let b = bf16::from_f32(v).to_bits();
    if b & 0x7f80 == 0 {
        b & 0x8000
    } else {
        b
    }
}

/// x [m, k] f32 → bf16 [rows ≥ m, 2·k_pairs] in the first rows × 2·k_pairs values of `out`
/// (round to nearest even; the odd tail and the rows past m padded with 0). `out` is grown to
/// that length if shorter and never shrunk: what lies past it is stale and must not be read.
fn convert_rows(x: &[f32], m: usize, k: usize, k_pairs: usize, rows: usize, out: &mut Vec<u16>) {
    debug_assert!(rows >= m);
    let kp = 2 * k_pairs;
    // Every element is written below: no need to clear what a reused buffer held, and a buffer
    // longer than needed stays so (products of different sizes alternate; shrinking and growing
    // it back would zero the regrown part each time).
    if out.len() < rows * kp {
        out.resize(rows * kp, 0);
    }
    let (live, padding) = out[..rows * kp].split_at_mut(m * kp);
    padding.fill(0);
    live.par_chunks_mut(kp)
        .zip(x.par_chunks(k))
        .with_min_len(16)
        .for_each(|(o, r)| {
            let (head, tail) = o.split_at_mut(k);
            to_bf16_row(head, r);
            tail.fill(0);
        });
}

thread_local! {
    /// The calling thread's [`convert_rows`] buffer, kept between products: a training step
    /// converts hundreds of activations of a few MB, and fresh pages for each cost page faults.
    /// Taken out while in use, so that a product nested on the same thread (rayon runs other
    /// tasks while it waits) converts into its own.
    static ROWS: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
}

/// dst[i] = [`to_bf16_bits`]`(src[i])`, with `vcvtne2ps2bf16` where AVX512-BF16 runs (the
/// conversion was the largest cost of an AMX product done element by element).  dst, src: [n].
pub(crate) fn to_bf16_row(dst: &mut [u16], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "to_bf16_row: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if cpu_has_avx512bf16() {
        // SAFETY: the features were detected; the assert bounds every access.
        unsafe { to_bf16_row_avx512(dst, src) };
        return;
    }
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = to_bf16_bits(v);
    }
}

/// 32 values per instruction; the instruction rounds to nearest even as `to_bf16_bits` does,
/// and its bf16 subnormals are flushed here to zeros of their sign as `to_bf16_bits` flushes
/// them (NaNs stay NaNs). The tail goes element by element.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn to_bf16_row_avx512(dst: &mut [u16], src: &[f32]) {
    use std::arch::x86_64::*;
    let n = src.len();
    let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
    let exp = _mm512_set1_epi16(0x7f80u16 as i16);
    let sign = _mm512_set1_epi16(0x8000u16 as i16);
    let mut i = 0;
    while i + 32 <= n {
        let lo = _mm512_loadu_ps(ps.add(i));
        let hi = _mm512_loadu_ps(ps.add(i + 16));
        // (hi, lo): the first operand fills the upper half of the result.
        let b: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        // Exponent bits all zero: a zero or a subnormal, kept as a zero of its sign.
        let tiny = _mm512_cmpeq_epi16_mask(_mm512_and_si512(b, exp), _mm512_setzero_si512());
        let b = _mm512_mask_mov_epi16(b, tiny, _mm512_and_si512(b, sign));
        _mm512_storeu_si512(pd.add(i) as *mut _, b);
        i += 32;
    }
    for j in i..n {
        *pd.add(j) = to_bf16_bits(*ps.add(j));
    }
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

/// out[m, n] (+)= x[m, k] · B[k, n] with B packed in bf16; f32 accumulation (on [`bf16_kernel`]).
pub fn matmul_bf16(out: &mut [f32], x: &[f32], m: usize, b: &PackedBf16, accumulate: bool) {
    matmul_bf16_with(bf16_kernel(), out, x, m, b, accumulate)
}

/// [`matmul_bf16`] on the given kernel (the instruction's needs a CPU with it: panics otherwise).
pub fn matmul_bf16_with(
    kernel: Bf16Kernel,
    out: &mut [f32],
    x: &[f32],
    m: usize,
    b: &PackedBf16,
    accumulate: bool,
) {
    matmul_bf16_panels(kernel, out, x, m, b, MR * BLOCKS_PER_TASK, accumulate)
}

/// Where a product's B [k, n] panels come from: the packed panels of [`NR`] columns ×
/// pairs of the reduction that [`panel_rows`] reads, borrowed from a packing or built on demand
/// (a weight's transpose, a weight kept in quantised blocks).
pub(crate) trait PanelSource: Sync {
    /// The product's reduction length k.
    fn reduction(&self) -> usize;
    /// The product's output columns n.
    fn columns(&self) -> usize;
    /// Panel `j` (columns j·NR..) over the reduction pairs `pairs`: pairs.len() × NR × 2 bf16
    /// bits, columns past n zero; borrowed from `self` or built in `scratch` (the calling
    /// thread's, reused from call to call).
    fn panel<'a>(&'a self, j: usize, pairs: Range<usize>, scratch: &'a mut Vec<u16>) -> &'a [u16];
}

impl PanelSource for PackedBf16 {
    fn reduction(&self) -> usize {
        self.k
    }
    fn columns(&self) -> usize {
        self.n
    }
    fn panel<'a>(&'a self, j: usize, pairs: Range<usize>, _: &'a mut Vec<u16>) -> &'a [u16] {
        let at = j * self.k_pairs * NR * 2;
        &self.data[at + pairs.start * NR * 2..at + pairs.end * NR * 2]
    }
}

/// Bᵀ [n, k] of a packing B [k, n], its panels rebuilt from B's ([`PackedBf16::transposed_panel`]).
struct Transposed<'a>(&'a PackedBf16);

impl PanelSource for Transposed<'_> {
    fn reduction(&self) -> usize {
        self.0.n
    }
    fn columns(&self) -> usize {
        self.0.k
    }
    fn panel<'a>(&'a self, j: usize, pairs: Range<usize>, scratch: &'a mut Vec<u16>) -> &'a [u16] {
        self.0.transposed_panel(j, pairs, scratch);
        scratch
    }
}

/// out[m, n] (+)= x[m, k] · B[k, n], B's panels from `b`, on `kernel`: [`matmul_bf16`]'s
/// arithmetic bit for bit whatever the source (one pass over the whole reduction). Each task
/// takes one panel and `group_rows` rows of x, so a source that builds its panels builds each
/// once per group.
pub(crate) fn matmul_bf16_panels(
    kernel: Bf16Kernel,
    out: &mut [f32],
    x: &[f32],
    m: usize,
    b: &impl PanelSource,
    group_rows: usize,
    accumulate: bool,
) {
    run_panels(
        kernel,
        "matmul_bf16",
        out,
        x,
        m,
        b,
        group_rows,
        usize::MAX,
        accumulate,
    )
}

/// As [`matmul_bf16_panels`], with [`matmul_bf16_t`]'s arithmetic: a reduction longer than
/// 2·[`T_BLOCK_PAIRS`] is summed in blocks of that length, each block's sum added to out.
pub(crate) fn matmul_bf16_t_panels(
    kernel: Bf16Kernel,
    out: &mut [f32],
    x: &[f32],
    m: usize,
    b: &impl PanelSource,
    group_rows: usize,
    accumulate: bool,
) {
    run_panels(
        kernel,
        "matmul_bf16_t",
        out,
        x,
        m,
        b,
        group_rows,
        T_BLOCK_PAIRS,
        accumulate,
    )
}

/// The panel loop of every bf16 product: out[m, n] (+)= x[m, k] · B[k, n], x converted to bf16
/// once, tasks of (panel, `group_rows` rows), the reduction in blocks of `block_pairs` pairs.
#[allow(clippy::too_many_arguments)]
fn run_panels(
    kernel: Bf16Kernel,
    what: &str,
    out: &mut [f32],
    x: &[f32],
    m: usize,
    b: &impl PanelSource,
    group_rows: usize,
    block_pairs: usize,
    accumulate: bool,
) {
    let (k, n) = (b.reduction(), b.columns());
    check_call(kernel, what, x.len(), m, k, out.len(), n);
    if m == 0 || n == 0 {
        return;
    }
    let k_pairs = k.div_ceil(2);
    let mut a = ROWS.take();
    convert_rows(x, m, k, k_pairs, padded_rows(kernel, m), &mut a);
    let panels = n.div_ceil(NR);
    let group_rows = if kernel == Bf16Kernel::Amx {
        group_rows.max(amx_group_rows(m, panels))
    } else {
        group_rows.max(1)
    };
    let groups = m.div_ceil(group_rows);
    let out_ptr = OutPtr(out.as_mut_ptr());
    thread_local! {
        static PANEL: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    // One task: panel j, rows of group g; on AMX `tiles` holds the configuration.
    let panel_task = |task: usize, tiles: Option<&amx::Tiles>| {
        let (j, g) = (task % panels, task / panels);
        let cols = NR.min(n - j * NR);
        let (r0, row_end) = (g * group_rows, ((g + 1) * group_rows).min(m));
        PANEL.with_borrow_mut(|scratch| {
            let c = out_ptr.get().wrapping_add(r0 * n + j * NR);
            // A long reduction (the LM head's backward, over the vocabulary) runs in blocks of
            // pairs, so that a rebuilt panel stays small and in cache: each block's sums are
            // added to out, as a second call accumulating would.
            let mut q0 = 0;
            while q0 < k_pairs {
                let q1 = q0.saturating_add(block_pairs).min(k_pairs);
                let panel = b.panel(j, q0..q1, scratch);
                // SAFETY: the kernel's CPU features were checked; this task alone writes rows
                // r0..row_end, columns j·NR..j·NR+cols of out, all inside its m × n bounds.
                unsafe {
                    panel_rows(
                        kernel,
                        tiles,
                        &a[r0 * 2 * k_pairs + 2 * q0..],
                        2 * k_pairs,
                        row_end - r0,
                        panel,
                        q1 - q0,
                        c,
                        n,
                        cols,
                        accumulate || q0 > 0,
                    )
                }
                q0 = q1;
            }
        });
    };
    let tasks = panels * groups;
    // On AMX a run of consecutive tasks shares one tile configuration (`amx::Tiles`: loading it
    // drains the tile pipeline), a few runs per thread, their lengths within one task of each
    // other; elsewhere every task is a run of its own.
    let runs = if kernel == Bf16Kernel::Amx {
        tasks.min(AMX_RUNS_PER_THREAD * rayon::current_num_threads().max(1))
    } else {
        tasks
    };
    (0..runs).into_par_iter().for_each(|run| {
        // SAFETY: check_call asserted that this CPU and OS run the AMX kernel; no other tile
        // code runs on this thread until the run ends and `tiles` is dropped.
        let tiles = (kernel == Bf16Kernel::Amx).then(|| unsafe { amx::Tiles::begin() });
        for task in run * tasks / runs..(run + 1) * tasks / runs {
            panel_task(task, tiles.as_ref());
        }
    });
    ROWS.set(a);
}

/// Rows of x per task on AMX, where a task of more rows reads its panel from L2 for more of them:
/// up to [`AMX_GROUP_ROWS`], in whole blocks of 32, fewer only where the product has too few
/// panels to give every thread [`AMX_RUNS_PER_THREAD`] tasks.
fn amx_group_rows(m: usize, panels: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let groups = (AMX_RUNS_PER_THREAD * threads).div_ceil(panels.max(1));
    m.div_ceil(groups)
        .clamp(AMX_BLOCK, AMX_GROUP_ROWS)
        .next_multiple_of(AMX_BLOCK)
}

/// The most rows of x per AMX task: 256 rows of SmolLM2's width (576) are 288 KB of bf16, which
/// stay in L2 while the task's thread moves from panel to panel.
const AMX_GROUP_ROWS: usize = 256;

/// Runs of tasks per thread on AMX: enough for rayon to even out a slow thread, few enough that
/// loading the tile configuration (once per run) costs nothing measurable.
const AMX_RUNS_PER_THREAD: usize = 4;

/// Rows of A per AMX block, and the zero rows kept past the last row of A for it: a block that
/// starts inside A reads 32 rows from its start.
const AMX_BLOCK: usize = 32;
const AMX_PAD: usize = AMX_BLOCK;

/// Rows to convert A into for `kernel`: m, plus [`AMX_PAD`] zero rows on AMX.
fn padded_rows(kernel: Bf16Kernel, m: usize) -> usize {
    if kernel == Bf16Kernel::Amx {
        m + AMX_PAD
    } else {
        m
    }
}

/// Asserts that this CPU runs `kernel` and that x [m, k], out [m, n] have their sizes.
fn check_call(kernel: Bf16Kernel, what: &str, x: usize, m: usize, k: usize, out: usize, n: usize) {
    assert_eq!(x, m * k, "{what}: x has {x} elements, expected {m}×{k}");
    assert_eq!(
        out,
        m * n,
        "{what}: out has {out} elements, expected {m}×{n}"
    );
    assert!(
        !matches!(kernel, Bf16Kernel::Avx512Bf16 | Bf16Kernel::Amx) || cpu_has_avx512bf16(),
        "the AVX512-BF16 kernel needs a CPU with AVX512-BF16"
    );
    assert!(
        kernel != Bf16Kernel::Amx || amx::amx_available(),
        "the AMX kernel needs a CPU and OS with AMX-BF16"
    );
    #[cfg(target_arch = "x86_64")]
    assert!(
        kernel != Bf16Kernel::Avx2
            || (std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")),
        "the AVX2 bf16 kernel needs a CPU with AVX2 and FMA"
    );
}

/// C[rows, cols ≤ NR] (+)= A[rows, 2·k_pairs] · panel, A with row stride `lda`, MR rows at a
/// time on `kernel`.
///
/// # Safety
/// The CPU runs `kernel`; `c` is valid for rows × cols elements at stride `ldc` and no one
/// else touches them meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn panel_rows(
    kernel: Bf16Kernel,
    tiles: Option<&amx::Tiles>,
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
    if let (Bf16Kernel::Amx, Some(tiles), true) = (kernel, tiles, amx::amx_fits(k_pairs)) {
        // Blocks of 32 rows on the tiles; `a` holds AMX_PAD rows past the product's last
        // (`padded_rows`), so every block's tile loads stay inside it.
        let mut r0 = 0;
        while r0 < rows {
            let rows_here = AMX_BLOCK.min(rows - r0);
            amx::panel_kernel(
                tiles,
                &a[r0 * lda..],
                lda,
                rows_here,
                panel,
                k_pairs,
                c.add(r0 * ldc),
                ldc,
                cols,
                accumulate,
            );
            r0 += rows_here;
        }
        return;
    }
    let mut r0 = 0;
    while r0 < rows {
        let mr = MR.min(rows - r0);
        let (a_rows, c) = (&a[r0 * lda..], c.add(r0 * ldc));
        match kernel {
            // (AMX on a reduction that is not whole tiles takes the vdpbf16ps kernel.)
            #[cfg(target_arch = "x86_64")]
            Bf16Kernel::Avx512Bf16 | Bf16Kernel::Amx => {
                micro_kernel(a_rows, lda, mr, panel, k_pairs, c, ldc, cols, accumulate)
            }
            #[cfg(target_arch = "x86_64")]
            Bf16Kernel::Avx2 => {
                emulated_kernel_avx2(a_rows, lda, mr, panel, k_pairs, c, ldc, cols, accumulate)
            }
            _ => {
                emulated_kernel::<false>(a_rows, lda, mr, panel, k_pairs, c, ldc, cols, accumulate)
            }
        }
        r0 += mr;
    }
}

/// out[m, k] (+)= x[m, n] · B[k, n]ᵀ with B packed in bf16 (on [`bf16_kernel`]): with B the
/// forward packing of a weight W [n, k] ([`PackedBf16::for_x_wt`]), the input gradient
/// dx = dy · W, so that training needs no second packing. Each task rebuilds one panel of Bᵀ
/// (the panel [`PackedBf16::for_x_w`] would have held) and runs the product's kernel on it, so
/// the result is that of [`matmul_bf16`] on a `for_x_w` packing, bit for bit, up to reductions
/// of 2·[`T_BLOCK_PAIRS`]; a longer one is summed in blocks of that length, each block's sum
/// added to out in turn (on every kernel alike).
pub fn matmul_bf16_t(out: &mut [f32], x: &[f32], m: usize, b: &PackedBf16, accumulate: bool) {
    matmul_bf16_t_with(bf16_kernel(), out, x, m, b, accumulate)
}

/// [`matmul_bf16_t`] on the given kernel (the instruction's needs a CPU with it: panics
/// otherwise).
pub fn matmul_bf16_t_with(
    kernel: Bf16Kernel,
    out: &mut [f32],
    x: &[f32],
    m: usize,
    b: &PackedBf16,
    accumulate: bool,
) {
    let group = built_panel_group_rows(m, b.k.div_ceil(NR));
    matmul_bf16_t_panels(kernel, out, x, m, &Transposed(b), group, accumulate)
}

/// Rows of x per task of a product whose tasks build their panel (a transposed packing's, or
/// one dequantised from blocks), with `panels` panels. Building a panel costs about as much as
/// multiplying a few hundred rows by it on AMX tiles: so all m rows in one task, unless there
/// are too few panels to give every thread two tasks, or the tasks would not share out evenly
/// between the threads (9 panels on 2 threads: 18 tasks, not 9, measured 1.2–1.3× faster on
/// SmolLM2's dx products in examples/matmul_peak); never fewer than [`MIN_GROUP_ROWS`] rows.
pub(crate) fn built_panel_group_rows(m: usize, panels: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let panels = panels.max(1);
    let mut groups = (2 * threads).div_ceil(panels);
    // (Ends within `threads` steps: a multiple of `threads` is among them.)
    while !(panels * groups).is_multiple_of(threads) {
        groups += 1;
    }
    m.div_ceil(groups).max(MIN_GROUP_ROWS).next_multiple_of(32)
}

/// Columns of a panel the emulated kernel sums at once.
const EMU_COLS: usize = 16;

/// bf16 bits → the f32 they stand for (exact).
#[inline(always)]
fn bf16_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// [`micro_kernel`]'s arithmetic in f32 (see the module documentation): per output element,
/// acc = 0, then for each pair p: acc += a[2p+1]·b[2p+1]; acc += a[2p]·b[2p] (exact products, so
/// `FMA` or a multiply and an add give the same bits); out = acc (+ out).
///
/// # Safety
/// As [`micro_kernel`]: `c` must be valid for rows × cols elements at stride `ldc`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn emulated_kernel<const FMA: bool>(
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
    let madd = |acc: f32, x: f32, y: f32| if FMA { x.mul_add(y, acc) } else { acc + x * y };
    for q0 in (0..cols).step_by(EMU_COLS) {
        let live = EMU_COLS.min(cols - q0);
        let mut acc = [[0.0f32; EMU_COLS]; MR];
        for p in 0..k_pairs {
            let bq = &panel[(p * NR + q0) * 2..(p * NR + q0 + EMU_COLS) * 2];
            let mut b_even = [0.0f32; EMU_COLS];
            let mut b_odd = [0.0f32; EMU_COLS];
            for cc in 0..EMU_COLS {
                b_even[cc] = bf16_f32(bq[2 * cc]);
                b_odd[cc] = bf16_f32(bq[2 * cc + 1]);
            }
            for (r, acc_r) in acc.iter_mut().enumerate().take(rows) {
                let a_even = bf16_f32(a[r * lda + 2 * p]);
                let a_odd = bf16_f32(a[r * lda + 2 * p + 1]);
                for cc in 0..EMU_COLS {
                    let t = madd(acc_r[cc], a_odd, b_odd[cc]);
                    acc_r[cc] = madd(t, a_even, b_even[cc]);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate().take(rows) {
            let crow = c.add(r * ldc + q0);
            for (cc, &v) in acc_r.iter().enumerate().take(live) {
                let dst = crow.add(cc);
                *dst = if accumulate { v + *dst } else { v };
            }
        }
    }
}

/// [`emulated_kernel`] compiled for AVX2 + FMA.
///
/// # Safety
/// As [`emulated_kernel`], on a CPU with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn emulated_kernel_avx2(
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
    emulated_kernel::<true>(a, lda, rows, panel, k_pairs, c, ldc, cols, accumulate)
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

    /// Every kernel this CPU runs.
    fn kernels() -> Vec<Bf16Kernel> {
        let mut v = vec![Bf16Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            v.push(Bf16Kernel::Avx2);
        }
        if cpu_has_avx512bf16() {
            v.push(Bf16Kernel::Avx512Bf16);
        }
        if cpu_has_avx512bf16() && amx::amx_available() {
            v.push(Bf16Kernel::Amx);
        }
        v
    }

    #[test]
    fn bf16_matmul_equals_the_product_of_rounded_inputs() {
        eprintln!("bf16 kernels on this CPU: {:?}", kernels());
        for kernel in kernels() {
            check_against_reference(kernel);
        }
    }

    fn check_against_reference(kernel: Bf16Kernel) {
        let matmul_bf16 = |out: &mut [f32], x: &[f32], m, b: &PackedBf16, acc| {
            matmul_bf16_with(kernel, out, x, m, b, acc)
        };
        // (k = 64 and 576 are whole AMX tiles: 13 and 100 rows are not whole blocks, 129 and 200
        // columns not whole panels.)
        for &(m, k, n) in &[
            (1, 7, 5),
            (7, 33, 70),
            (13, 64, 129),
            (100, 576, 64),
            (70, 96, 200),
        ] {
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

    /// The vector conversion equals the scalar one on every kind of value: ties, subnormals,
    /// infinities, the largest finite values, and wide random data (NaNs only as NaNs).
    #[test]
    fn row_conversion_equals_the_scalar_rounding() {
        let mut v = wide_data(1000, 7);
        v.extend([
            0.0,
            -0.0,
            1.0 + f32::EPSILON * 64.0,   // 1 + 2^-17: below half a bf16 ulp
            f32::from_bits(0x3f80_8000), // ties: to even, down and up
            f32::from_bits(0x3f81_8000),
            f32::MIN_POSITIVE,
            f32::MIN_POSITIVE / 3.0,
            -f32::MIN_POSITIVE / 3.0,
            f32::from_bits(0x0080_0000 - 1),
            f32::MAX,
            -f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-40,
            -1e-45,
        ]);
        let mut got = vec![0u16; v.len()];
        to_bf16_row(&mut got, &v);
        for (i, (&g, &x)) in got.iter().zip(&v).enumerate() {
            let want = to_bf16_bits(x);
            if x.is_nan() {
                assert!(
                    g & 0x7f80 == 0x7f80 && g & 0x7f != 0,
                    "[{i}] NaN became {g:#06x}"
                );
            } else {
                assert_eq!(g, want, "[{i}] {x:e}: {g:#06x} vs {want:#06x}");
            }
        }
    }

    /// Values spread over many binades (and signs), so that the sums' roundings differ with the
    /// order of the additions.
    fn wide_data(len: usize, seed: u64) -> Vec<f32> {
        let mut z = seed;
        (0..len)
            .map(|_| {
                z = z
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (z >> 40) as u32;
                let mant = (u & 0xffff) as f32 / 65536.0 + 0.5;
                let exp = ((u >> 16) % 24) as i32 - 12;
                let sign = if u & (1 << 23) != 0 { -1.0 } else { 1.0 };
                sign * mant * 2f32.powi(exp)
            })
            .collect()
    }

    /// The emulation against the instruction, bit for bit, on a CPU that has it (even with
    /// LORAKIT_DISABLE_AVX512BF16 set, which only keeps the library's own dispatch off it).
    #[test]
    fn emulated_bf16_matmul_matches_the_instruction_bit_for_bit() {
        if !cpu_has_avx512bf16() {
            eprintln!("no AVX512-BF16 on this CPU: nothing to compare the emulation with");
            return;
        }
        let emulated: Vec<Bf16Kernel> = kernels()
            .into_iter()
            .filter(|k| !matches!(k, Bf16Kernel::Avx512Bf16 | Bf16Kernel::Amx))
            .collect();
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 7, 5),
            (7, 33, 70),
            (13, 64, 129),
            (97, 576, 200),
        ] {
            for seed in 0..3u64 {
                let x = wide_data(m * k, 2 * seed + 1);
                let w = wide_data(n * k, 2 * seed + 2);
                let packed = PackedBf16::for_x_wt(&w, n, k);
                let start = wide_data(m * n, 99);
                for accumulate in [false, true] {
                    let mut want = start.clone();
                    matmul_bf16_with(
                        Bf16Kernel::Avx512Bf16,
                        &mut want,
                        &x,
                        m,
                        &packed,
                        accumulate,
                    );
                    for &kernel in &emulated {
                        let mut got = start.clone();
                        matmul_bf16_with(kernel, &mut got, &x, m, &packed, accumulate);
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(
                                g.to_bits(),
                                w.to_bits(),
                                "{kernel:?} {m}x{k}x{n} seed {seed} accumulate {accumulate} [{i}]: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// One packing for both products: Bᵀ's panels rebuilt from the forward packing are those of
    /// the transposed packing, so dx = dy · W from `for_x_wt` equals `for_x_w`'s product bit for
    /// bit on every kernel (odd sizes exercise the padding of both dimensions).
    #[test]
    fn transposed_bf16_matmul_equals_the_second_packing_bit_for_bit() {
        for &(m, out_f, in_f) in &[
            (1, 1, 1),
            (5, 7, 5),
            (7, 70, 33),
            (13, 129, 64),
            (97, 200, 131),
            // Whole 8 × 8 blocks of units and ragged ones, in full and partial panels.
            (5, 300, 150),
            // Several row groups for its one panel, whatever the number of threads.
            (2 * MIN_GROUP_ROWS + 17, 70, 33),
        ] {
            let w = wide_data(out_f * in_f, 7);
            let forward = PackedBf16::for_x_wt(&w, out_f, in_f);
            let backward = PackedBf16::for_x_w(&w, out_f, in_f);
            let len = backward.k_pairs * NR * 2;
            // Whole panels, and pair ranges that start and end off the blocks of 8, built into
            // a buffer that still holds another panel's values.
            let kp = backward.k_pairs;
            let ranges = [0..kp, 3..kp, 1..kp.min(17), kp / 2..kp, kp - 1..kp];
            let mut panel = vec![0xffff; 2 * len];
            for jt in 0..in_f.div_ceil(NR) {
                for qs in ranges.iter().filter(|r| !r.is_empty()) {
                    forward.transposed_panel(jt, qs.clone(), &mut panel);
                    let at = jt * len;
                    assert!(
                        panel == backward.data[at + qs.start * NR * 2..at + qs.end * NR * 2],
                        "{out_f}x{in_f} panel {jt} pairs {qs:?}"
                    );
                }
            }
            let dy = wide_data(m * out_f, 3);
            let start = wide_data(m * in_f, 5);
            for kernel in kernels() {
                for accumulate in [false, true] {
                    let mut want = start.clone();
                    matmul_bf16_with(kernel, &mut want, &dy, m, &backward, accumulate);
                    let mut got = start.clone();
                    matmul_bf16_t_with(kernel, &mut got, &dy, m, &forward, accumulate);
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(g, w)| g.to_bits() == w.to_bits());
                    assert!(
                        same,
                        "{kernel:?} {m}x{out_f}x{in_f} accumulate {accumulate}"
                    );
                }
            }
        }
    }

    /// The transposed product against an independent reference: the f64 product of the
    /// bf16-rounded inputs.
    #[test]
    fn transposed_bf16_matmul_equals_the_product_of_rounded_inputs() {
        // The second shape's reduction runs in three blocks.
        for (m, out_f, in_f) in [(19, 150, 77), (7, 2 * 2 * T_BLOCK_PAIRS + 301, 70)] {
            check_transposed_against_reference(m, out_f, in_f);
        }
    }

    fn check_transposed_against_reference(m: usize, out_f: usize, in_f: usize) {
        let dy = data(m * out_f, 11);
        let w = data(out_f * in_f, 12);
        let packed = PackedBf16::for_x_wt(&w, out_f, in_f);
        let r = |v: f32| bf16::from_f32(v).to_f32() as f64;
        for kernel in kernels() {
            let mut dx = vec![0.0f32; m * in_f];
            matmul_bf16_t_with(kernel, &mut dx, &dy, m, &packed, false);
            for i in 0..m {
                for c in 0..in_f {
                    let want: f64 = (0..out_f)
                        .map(|o| r(dy[i * out_f + o]) * r(w[o * in_f + c]))
                        .sum();
                    let got = dx[i * in_f + c] as f64;
                    assert!(
                        (got - want).abs() < 1e-5 * out_f as f64,
                        "{kernel:?} [{i}, {c}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_packing_unpacks_to_the_rounded_weight() {
        let (out_f, in_f) = (67, 9);
        let w = data(out_f * in_f, 4);
        let back = PackedBf16::for_x_wt(&w, out_f, in_f).unpack_wt();
        for (b, v) in back.iter().zip(&w) {
            assert_eq!(b.to_bits(), bf16::from_f32(*v).to_f32().to_bits());
        }
    }

    /// The blocked reduction of a long transposed product (the LM head's backward): the
    /// emulation equals the instruction bit for bit there too.
    #[test]
    fn emulated_transposed_bf16_matmul_matches_the_instruction_bit_for_bit() {
        if !cpu_has_avx512bf16() {
            eprintln!("no AVX512-BF16 on this CPU: nothing to compare the emulation with");
            return;
        }
        let (m, out_f, in_f) = (13, 2 * 2 * T_BLOCK_PAIRS + 77, 129);
        let w = wide_data(out_f * in_f, 21);
        let packed = PackedBf16::for_x_wt(&w, out_f, in_f);
        let dy = wide_data(m * out_f, 22);
        let start = wide_data(m * in_f, 23);
        for accumulate in [false, true] {
            let mut want = start.clone();
            matmul_bf16_t_with(
                Bf16Kernel::Avx512Bf16,
                &mut want,
                &dy,
                m,
                &packed,
                accumulate,
            );
            for kernel in kernels()
                .into_iter()
                .filter(|k| !matches!(k, Bf16Kernel::Avx512Bf16 | Bf16Kernel::Amx))
            {
                let mut got = start.clone();
                matmul_bf16_t_with(kernel, &mut got, &dy, m, &packed, accumulate);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(same, "{kernel:?} accumulate {accumulate}");
            }
        }
    }
}
