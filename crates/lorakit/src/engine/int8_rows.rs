//! Frozen weights as 8-bit rows, W ≈ diag(s)·Q with Q in −127..=127 and one scale per output
//! row (absmax, as bitsandbytes' `load_in_8bit` stores a weight), and the two products LoRA
//! training needs over them, with the other operand quantised on the fly row by row:
//!
//! * forward, y = x·Wᵀ: x ≈ diag(a)·P ⇒ y[t, j] = (a_t·s_j)·Σ_k P[t, k]·Q[j, k];
//! * backward, dx = dy·W: the row scales fold into dy, dy·diag(s) ≈ diag(d)·R ⇒
//!   dx[t, i] = d_t·Σ_j R[t, j]·Q[j, i].
//!
//! Both are plain 8-bit integer products with exact i32 sums (|Σ| ≤ 127²·k < 2³¹ for
//! k < 133 000) and one f32 epilogue per output element. That is why this form exists beside
//! the GGUF blocks: a block type scales every group of 32 along the reduction, so an integer
//! product over blocks must rescale each group's partial sums (`engine::int8`, which stops near
//! half the instruction's roof, and cannot serve the backward at all, whose reduction runs
//! across the groups' scales). Over rows, the tiles' `tdpbssd` (AMX-INT8: twice the multiply-adds
//! of `tdpbf16ps`) and AVX512-VNNI's `vpdpbusd` (four times an f32 FMA's) run as fast as they go.
//!
//! Kernels: AMX tiles, VNNI (u8 × i8: the activations offset by 128, the offset's sum taken back
//! per column), and a portable one. They give the same integers and share the epilogue, so
//! every CPU computes the same bits.
//!
//! Error, beyond f32 rounding: the weight |W − s·Q| ≤ s/2 per element (s = max_k |W[j, k]| /
//! 127); the forward's activations |x − a·P| ≤ a/2 (a = max_k |x[t, k]| / 127), so
//! |y − x·(s·Q)ᵀ| ≤ (a_t / 2)·Σ_k s_j·|Q[j, k]|; the backward's |dx − dy·(s·Q)| ≤
//! (d_t / 2)·Σ_j |Q[j, i]| (d = max_j |dy[t, j]·s_j| / 127). The tests check these bounds.
//!
//! Training uses the backward only (`--precision int8`, `gguf-int8`: [`Int8Weight::for_backward`],
//! one packing, a byte per weight): its forward stays in bf16. With both products in 8 bits,
//! SmolLM2-135M's first loss on the bench batch rose 4.6% (1.2165 against bf16's 1.1628, whose
//! own error against f32 is 0.03%): per-row 8-bit activations are too coarse for its hidden
//! states, which are heavy-tailed across many columns (taking the columns with a value past
//! 3 out in f32, as LLM.int8 does past 6, still left 0.9% and took up to 170 of 576 columns).
//! Rounding only dy moves the losses of the steps after the first by 0.1–0.2%.

use std::cell::Cell;

use rayon::prelude::*;

use super::amx;

/// Columns per packed panel: AMX's two column tiles twice, four zmm of i32 for VNNI.
pub const NR: usize = amx::PANEL_COLS;
/// Rows of A per block: two AMX row tiles.
const BLOCK_ROWS: usize = amx::I8_BLOCK_ROWS;
/// The reduction is padded to whole tiles: 16 quads of 4 values.
const K_ALIGN: usize = 64;
/// Rows per VNNI micro-kernel call (4 × 4 accumulators + 4 B + 1 A registers).
const VNNI_MR: usize = 4;

/// Which kernel multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kernel {
    /// AMX-INT8 tiles (`tdpbssd`).
    Amx,
    /// AVX512-VNNI `vpdpbusd`.
    Vnni,
    /// Plain integer loops, for every CPU.
    Portable,
}

impl Int8Kernel {
    /// Whether this CPU runs it.
    pub fn available(self) -> bool {
        match self {
            Int8Kernel::Amx => amx::amx_int8_available(),
            Int8Kernel::Vnni => super::int8::vnni_available(),
            Int8Kernel::Portable => true,
        }
    }
}

/// The fastest kernel here: AMX tiles (unless `LORAKIT_DISABLE_AMX`), then VNNI, then portable.
pub fn int8_kernel() -> Int8Kernel {
    [Int8Kernel::Amx, Int8Kernel::Vnni]
        .into_iter()
        .find(|k| k.available())
        .unwrap_or(Int8Kernel::Portable)
}

fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// B [kk, nn] of 8-bit values packed for a product: panels of [`NR`] columns, panel p holding
/// for every quad of the reduction NR columns × 4 values ([kk_pad / 4][NR][4]), zero past kk and
/// nn; and each column's sum (VNNI's offset correction).
#[derive(Debug, Clone)]
struct PackedI8 {
    kk: usize,
    nn: usize,
    kk_pad: usize,
    data: Vec<i8>,
    col_sum: Vec<i32>,
}

impl PackedI8 {
    /// Packs `b(kk, nn)` for kk < kk, nn < nn.
    fn pack(kk: usize, nn: usize, b: impl Fn(usize, usize) -> i8 + Sync) -> Self {
        let kk_pad = kk.next_multiple_of(K_ALIGN).max(K_ALIGN);
        let panel_len = kk_pad * NR;
        let panels = nn.div_ceil(NR);
        let mut data = vec![0i8; panels * panel_len];
        let mut col_sum = vec![0i32; panels * NR];
        data.par_chunks_mut(panel_len)
            .zip(col_sum.par_chunks_mut(NR))
            .enumerate()
            .for_each(|(p, (panel, sums))| {
                for c in 0..NR.min(nn - p * NR) {
                    let col = p * NR + c;
                    let mut sum = 0i32;
                    for r in 0..kk {
                        let v = b(r, col);
                        panel[(r / 4) * NR * 4 + c * 4 + r % 4] = v;
                        sum += v as i32;
                    }
                    sums[c] = sum;
                }
            });
        PackedI8 {
            kk,
            nn,
            kk_pad,
            data,
            col_sum,
        }
    }

    fn panel(&self, p: usize) -> &[i8] {
        &self.data[p * self.kk_pad * NR..(p + 1) * self.kk_pad * NR]
    }
}

/// A frozen weight W [n, k] as 8-bit rows: W ≈ diag(scale)·Q.
#[derive(Debug, Clone)]
pub struct Int8Weight {
    /// Output features (rows of W).
    pub n: usize,
    /// Input features (columns of W).
    pub k: usize,
    /// s_j = max_k |W[j, k]| / 127, [n].
    scale: Vec<f32>,
    /// Qᵀ [k, n], for y = x·Wᵀ; None when built for the backward only.
    fwd: Option<PackedI8>,
    /// Q [n, k], for dx = dy·W.
    bwd: PackedI8,
}

impl Int8Weight {
    /// Quantises W [n, k], its rows given by `row(j, out)` (out: [k], for instance a block row
    /// dequantised), to 8 bits per row: q = round_ties_even(w / s), s = max |w| / 127 (0 for a
    /// row of zeros), packed for both products. Err(j) names the first row with a value that
    /// is not finite.
    pub fn quantize(
        n: usize,
        k: usize,
        row: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Result<Int8Weight, usize> {
        Int8Weight::quantize_for(n, k, row, true)
    }

    /// As [`Int8Weight::quantize`], packed for the backward product only (1 byte a weight):
    /// what training uses, whose forward reads the weight in its own form.
    pub fn for_backward(
        n: usize,
        k: usize,
        row: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Result<Int8Weight, usize> {
        Int8Weight::quantize_for(n, k, row, false)
    }

    fn quantize_for(
        n: usize,
        k: usize,
        row: impl Fn(usize, &mut [f32]) + Sync,
        forward: bool,
    ) -> Result<Int8Weight, usize> {
        let mut q = vec![0i8; n * k];
        let mut scale = vec![0.0f32; n];
        let bad: Option<usize> = q
            .par_chunks_mut(k.max(1))
            .zip(scale.par_iter_mut())
            .enumerate()
            .map_init(
                || vec![0.0f32; k],
                |buf, (j, (qrow, s))| {
                    row(j, buf);
                    let finite = quantize_row(qrow, s, buf, None);
                    (!finite).then_some(j)
                },
            )
            .flatten()
            .min();
        if let Some(j) = bad {
            return Err(j);
        }
        let fwd = forward.then(|| PackedI8::pack(k, n, |kk, nn| q[nn * k + kk]));
        let bwd = PackedI8::pack(n, k, |kk, nn| q[kk * k + nn]);
        Ok(Int8Weight {
            n,
            k,
            scale,
            fwd,
            bwd,
        })
    }

    /// Quantises a row-major f32 W [n, k].
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Result<Int8Weight, usize> {
        assert_eq!(w.len(), n * k, "Int8Weight::from_f32: W is not {n}×{k}");
        Int8Weight::quantize(n, k, |j, out| out.copy_from_slice(&w[j * k..(j + 1) * k]))
    }

    /// [`Int8Weight::for_backward`] of a row-major f32 W [n, k].
    pub fn backward_from_f32(w: &[f32], n: usize, k: usize) -> Result<Int8Weight, usize> {
        assert_eq!(
            w.len(),
            n * k,
            "Int8Weight::backward_from_f32: W is not {n}×{k}"
        );
        Int8Weight::for_backward(n, k, |j, out| out.copy_from_slice(&w[j * k..(j + 1) * k]))
    }

    /// Row j's level at column i, Q[j, i].
    pub fn level(&self, j: usize, i: usize) -> i8 {
        // Q[j, i] is the backward packing's B[j, i].
        let (p, c) = (i / NR, i % NR);
        self.bwd.panel(p)[(j / 4) * NR * 4 + c * 4 + j % 4]
    }

    /// s_j.
    pub fn row_scale(&self, j: usize) -> f32 {
        self.scale[j]
    }

    /// Row j as the products read it: s_j·Q[j, ·], [k].
    pub fn dequantize_row(&self, j: usize) -> Vec<f32> {
        (0..self.k)
            .map(|i| self.scale[j] * self.level(j, i) as f32)
            .collect()
    }

    /// Bytes held (both packings, the scales, the column sums).
    pub fn bytes(&self) -> usize {
        let fwd = self
            .fwd
            .as_ref()
            .map_or(0, |f| f.data.len() + 4 * f.col_sum.len());
        fwd + self.bwd.data.len() + 4 * (self.scale.len() + self.bwd.col_sum.len())
    }

    /// y [m, n] (+)= x [m, k] · Wᵀ, on [`int8_kernel`].
    pub fn forward(&self, y: &mut [f32], x: &[f32], m: usize, accumulate: bool) {
        self.forward_with(int8_kernel(), y, x, m, accumulate)
    }

    /// [`Int8Weight::forward`] on `kernel` (panics where the CPU lacks it, or for rows built
    /// [`Int8Weight::for_backward`]).
    pub fn forward_with(
        &self,
        kernel: Int8Kernel,
        y: &mut [f32],
        x: &[f32],
        m: usize,
        accumulate: bool,
    ) {
        check("Int8Weight::forward", x.len(), y.len(), m, self.k, self.n);
        let fwd = self
            .fwd
            .as_ref()
            .expect("Int8Weight::forward: these rows were packed for the backward only");
        product(kernel, y, x, m, None, fwd, Some(&self.scale), accumulate);
    }

    /// dx [m, k] (+)= dy [m, n] · W, on [`int8_kernel`].
    pub fn backward(&self, dx: &mut [f32], dy: &[f32], m: usize, accumulate: bool) {
        self.backward_with(int8_kernel(), dx, dy, m, accumulate)
    }

    /// [`Int8Weight::backward`] on `kernel` (panics where the CPU lacks it).
    pub fn backward_with(
        &self,
        kernel: Int8Kernel,
        dx: &mut [f32],
        dy: &[f32],
        m: usize,
        accumulate: bool,
    ) {
        check(
            "Int8Weight::backward",
            dy.len(),
            dx.len(),
            m,
            self.n,
            self.k,
        );
        product(
            kernel,
            dx,
            dy,
            m,
            Some(&self.scale),
            &self.bwd,
            None,
            accumulate,
        );
    }
}

fn check(what: &str, a: usize, out: usize, m: usize, kk: usize, nn: usize) {
    assert_eq!(
        a,
        m * kk,
        "{what}: the input has {a} elements, expected {m}×{kk}"
    );
    assert_eq!(
        out,
        m * nn,
        "{what}: the output has {out} elements, expected {m}×{nn}"
    );
}

/// Quantises one row, `src[i]·col_scale[i]` (or `src[i]`), into `q` (its first src.len()
/// values; the rest untouched) and its scale `s`; false if a value is not finite (then q is
/// zero and s NaN, so every product with the row is NaN).
fn quantize_row(q: &mut [i8], s: &mut f32, src: &[f32], col_scale: Option<&[f32]>) -> bool {
    #[cfg(target_arch = "x86_64")]
    if avx512_available() {
        // SAFETY: the features were detected; lengths are checked inside.
        return unsafe { quantize_row_avx512(q, s, src, col_scale) };
    }
    let v = |i: usize| col_scale.map_or(src[i], |c| src[i] * c[i]);
    let mut max = 0.0f32;
    for i in 0..src.len() {
        let a = v(i).abs();
        if !a.is_finite() {
            q[..src.len()].fill(0);
            *s = f32::NAN;
            return false;
        }
        max = max.max(a);
    }
    let (scale, inv) = scales(max);
    *s = scale;
    for (i, qi) in q[..src.len()].iter_mut().enumerate() {
        *qi = (v(i) * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    true
}

/// (s, 1/s as the rounding uses it) for a row whose largest magnitude is `max`.
#[inline]
fn scales(max: f32) -> (f32, f32) {
    if max > 0.0 {
        (max / 127.0, 127.0 / max)
    } else {
        (0.0, 0.0)
    }
}

/// [`quantize_row`] 16 values at a time: the same products, maximum, rounding (ties to even)
/// and clamp, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_row_avx512(
    q: &mut [i8],
    s: &mut f32,
    src: &[f32],
    col_scale: Option<&[f32]>,
) -> bool {
    use std::arch::x86_64::*;
    let n = src.len();
    assert!(q.len() >= n && col_scale.is_none_or(|c| c.len() >= n));
    let load = |i: usize, mask: __mmask16| {
        let x = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(i));
        match col_scale {
            Some(c) => _mm512_mul_ps(x, _mm512_maskz_loadu_ps(mask, c.as_ptr().add(i))),
            None => x,
        }
    };
    let mask_at = |i: usize| -> __mmask16 {
        if i + 16 <= n {
            0xffff
        } else {
            ((1u32 << (n - i)) - 1) as __mmask16
        }
    };
    let inf = _mm512_set1_ps(f32::INFINITY);
    let mut vmax = _mm512_setzero_ps();
    let mut bad: __mmask16 = 0;
    let mut i = 0;
    while i < n {
        let m = mask_at(i);
        let a = _mm512_abs_ps(load(i, m));
        // Not less than infinity: infinite, or NaN (unordered).
        bad |= _mm512_mask_cmp_ps_mask::<_CMP_NLT_UQ>(m, a, inf);
        vmax = _mm512_max_ps(vmax, a);
        i += 16;
    }
    if bad != 0 {
        q[..n].fill(0);
        *s = f32::NAN;
        return false;
    }
    let (scale, inv) = scales(_mm512_reduce_max_ps(vmax));
    *s = scale;
    let vinv = _mm512_set1_ps(inv);
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let mut i = 0;
    while i < n {
        let m = mask_at(i);
        let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(load(i, m), vinv),
        );
        let r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
        let b = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r));
        _mm_mask_storeu_epi8(q.as_mut_ptr().add(i), m, b);
        i += 16;
    }
    true
}

/// The activation side of a product, quantised: rows of kk_pad values (zero past kk), padded
/// to whole blocks of rows with zeros, and each row's scale.
#[derive(Default)]
struct QuantRows {
    q: Vec<i8>,
    scale: Vec<f32>,
}

thread_local! {
    /// The calling thread's [`QuantRows`], kept between products (a training step quantises
    /// hundreds of activations); taken out while in use, so that a product nested on the same
    /// thread quantises into its own.
    static ROWS: Cell<QuantRows> = Cell::new(QuantRows::default());
}

/// out [m, nn] (+)= diag(a)·(A_q · B)·diag(out_scale): A = a_in [m, kk] (each column times
/// `in_scale` first, when given) quantised row by row, B packed.
#[allow(clippy::too_many_arguments)]
fn product(
    kernel: Int8Kernel,
    out: &mut [f32],
    a_in: &[f32],
    m: usize,
    in_scale: Option<&[f32]>,
    b: &PackedI8,
    out_scale: Option<&[f32]>,
    accumulate: bool,
) {
    assert!(
        kernel.available(),
        "the {kernel:?} int8 kernel does not run on this CPU"
    );
    let (kk, nn, lda) = (b.kk, b.nn, b.kk_pad);
    if m == 0 || nn == 0 {
        return;
    }
    let rows_pad = m.next_multiple_of(BLOCK_ROWS);
    let mut rows = ROWS.take();
    if rows.q.len() < rows_pad * lda {
        rows.q.resize(rows_pad * lda, 0);
    }
    rows.scale.resize(rows_pad, 0.0);
    {
        let (live, pad) = rows.q[..rows_pad * lda].split_at_mut(m * lda);
        pad.fill(0);
        live.par_chunks_mut(lda)
            .zip(rows.scale[..m].par_iter_mut())
            .zip(a_in.par_chunks(kk))
            .with_min_len(16)
            .for_each(|((q, s), src)| {
                quantize_row(q, s, src, in_scale);
                q[kk..].fill(0);
            });
    }
    let panels = nn.div_ceil(NR);
    let threads = rayon::current_num_threads().max(1);
    // Enough tasks for every thread to take two, in whole blocks of rows.
    let groups = (2 * threads).div_ceil(panels).min(rows_pad / BLOCK_ROWS);
    let group_rows = (rows_pad / BLOCK_ROWS).div_ceil(groups) * BLOCK_ROWS;
    let groups = rows_pad.div_ceil(group_rows);
    let out_ptr = super::SharedMut(out.as_mut_ptr());
    let (q, scale) = (&rows.q, &rows.scale);
    (0..panels * groups).into_par_iter().for_each(|task| {
        let (p, g) = (task % panels, task / panels);
        let panel = b.panel(p);
        let sums = &b.col_sum[p * NR..(p + 1) * NR];
        let cols = NR.min(nn - p * NR);
        let mut acc = amx::I8Block([0; BLOCK_ROWS * NR]);
        // SAFETY: AMX-INT8 runs here (asserted above); no other tile code runs in this task.
        let tiles = (kernel == Int8Kernel::Amx).then(|| unsafe { amx::Tiles::begin() });
        let mut r0 = g * group_rows;
        while r0 < ((g + 1) * group_rows).min(m) {
            let live = BLOCK_ROWS.min(m - r0);
            let a = &q[r0 * lda..(r0 + BLOCK_ROWS) * lda];
            // SAFETY: the kernel runs here (asserted above); `a` holds BLOCK_ROWS rows of lda
            // bytes (the rows are padded to whole blocks), lda is a multiple of 64, the panel
            // holds lda / 4 quads.
            unsafe { block(kernel, tiles.as_ref(), a, lda, live, panel, sums, &mut acc) };
            let out_scale = out_scale.map(|s| &s[p * NR..p * NR + cols]);
            // SAFETY: this task alone writes rows r0..r0 + live, columns p·NR.. p·NR + cols,
            // inside out's m × nn.
            unsafe {
                epilogue(
                    &acc,
                    live,
                    cols,
                    &scale[r0..r0 + live],
                    out_scale,
                    out_ptr.at(r0 * nn + p * NR),
                    nn,
                    accumulate,
                )
            };
            r0 += BLOCK_ROWS;
        }
    });
    ROWS.set(rows);
}

/// acc[r, c] = Σ_k a[r, k]·panel[k, c] for the first `live` rows (AMX computes all 32).
///
/// # Safety
/// As for [`amx::i8_panel_block`]; the kernel runs on this CPU, and on AMX `tiles` holds the
/// configuration.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    kernel: Int8Kernel,
    tiles: Option<&amx::Tiles>,
    a: &[i8],
    lda: usize,
    live: usize,
    panel: &[i8],
    col_sum: &[i32],
    acc: &mut amx::I8Block,
) {
    let k_quads = lda / 4;
    // (AMX without tiles does not occur, as `product` begins them; the portable loop would give
    // the same exact i32 sums.)
    match (kernel, tiles) {
        (Int8Kernel::Amx, Some(tiles)) => {
            amx::i8_panel_block(tiles, a.as_ptr(), lda, panel.as_ptr(), k_quads, acc)
        }
        #[cfg(target_arch = "x86_64")]
        (Int8Kernel::Vnni, _) => {
            let mut r = 0;
            while r < live {
                vnni_rows(
                    &a[r * lda..],
                    lda,
                    panel,
                    k_quads,
                    col_sum,
                    &mut acc.0[r * NR..],
                );
                r += VNNI_MR;
            }
        }
        _ => {
            for r in 0..live {
                let row = &a[r * lda..(r + 1) * lda];
                let c = &mut acc.0[r * NR..(r + 1) * NR];
                c.fill(0);
                for (quad, bq) in row.chunks_exact(4).zip(panel.chunks_exact(NR * 4)) {
                    for (cj, bc) in c.iter_mut().zip(bq.chunks_exact(4)) {
                        *cj += quad
                            .iter()
                            .zip(bc)
                            .map(|(&x, &w)| x as i32 * w as i32)
                            .sum::<i32>();
                    }
                }
            }
        }
    }
}

/// acc[r, c] for VNNI_MR rows from `a` (rows of stride lda; the rows past the block's live
/// ones are zero padding, computed and ignored): `vpdpbusd` takes unsigned × signed bytes, so
/// a + 128 is multiplied and 128·Σ_k panel[k, c] taken back, exactly.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni_rows(
    a: &[i8],
    lda: usize,
    panel: &[i8],
    k_quads: usize,
    col_sum: &[i32],
    acc: &mut [i32],
) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= (VNNI_MR - 1) * lda + 4 * k_quads);
    debug_assert!(panel.len() >= k_quads * NR * 4 && acc.len() >= VNNI_MR * NR);
    let mut c = [_mm512_setzero_si512(); VNNI_MR * 4];
    let (pa, pb) = (a.as_ptr(), panel.as_ptr());
    let flip = 0x8080_8080u32 as i32;
    for q in 0..k_quads {
        let b = [0, 1, 2, 3].map(|v| _mm512_loadu_si512(pb.add(q * NR * 4 + v * 64) as *const _));
        for r in 0..VNNI_MR {
            let quad = (pa.add(r * lda + 4 * q) as *const i32).read_unaligned();
            let av = _mm512_set1_epi32(quad ^ flip);
            for v in 0..4 {
                c[r * 4 + v] = _mm512_dpbusd_epi32(c[r * 4 + v], av, b[v]);
            }
        }
    }
    for v in 0..4 {
        let off =
            _mm512_slli_epi32::<7>(_mm512_loadu_si512(col_sum.as_ptr().add(v * 16) as *const _));
        for r in 0..VNNI_MR {
            let exact = _mm512_sub_epi32(c[r * 4 + v], off);
            _mm512_storeu_si512(acc.as_mut_ptr().add(r * NR + v * 16) as *mut _, exact);
        }
    }
}

/// out[r, c] = (a_r·s_c)·acc[r, c] (+ out[r, c]) for r < rows, c < cols: one rounding for the
/// scales' product, one for the scaling, one for the addition, on every kernel.
///
/// # Safety
/// `out` is valid for rows × cols elements at stride `ldo`, and nothing else touches them.
#[allow(clippy::too_many_arguments)]
unsafe fn epilogue(
    acc: &amx::I8Block,
    rows: usize,
    cols: usize,
    row_scale: &[f32],
    col_scale: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if avx512_available() {
        return epilogue_avx512(acc, rows, cols, row_scale, col_scale, out, ldo, accumulate);
    }
    epilogue_body(acc, rows, cols, row_scale, col_scale, out, ldo, accumulate)
}

/// [`epilogue_body`] compiled for AVX-512 (the same operations, 16 lanes at a time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn epilogue_avx512(
    acc: &amx::I8Block,
    rows: usize,
    cols: usize,
    row_scale: &[f32],
    col_scale: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
    accumulate: bool,
) {
    epilogue_body(acc, rows, cols, row_scale, col_scale, out, ldo, accumulate)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn epilogue_body(
    acc: &amx::I8Block,
    rows: usize,
    cols: usize,
    row_scale: &[f32],
    col_scale: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
    accumulate: bool,
) {
    for (r, &a) in row_scale[..rows].iter().enumerate() {
        let dst = std::slice::from_raw_parts_mut(out.add(r * ldo), cols);
        let src = &acc.0[r * NR..r * NR + cols];
        match (col_scale, accumulate) {
            (Some(cs), false) => {
                for ((d, &v), &c) in dst.iter_mut().zip(src).zip(cs) {
                    *d = (a * c) * v as f32;
                }
            }
            (Some(cs), true) => {
                for ((d, &v), &c) in dst.iter_mut().zip(src).zip(cs) {
                    *d += (a * c) * v as f32;
                }
            }
            (None, false) => {
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = a * v as f32;
                }
            }
            (None, true) => {
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d += a * v as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reproducible pseudo-random value in −1..1.
    fn noise(i: usize, seed: u64) -> f32 {
        let mut z = (i as u64)
            .wrapping_add(seed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z ^= z >> 27;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn kernels() -> Vec<Int8Kernel> {
        [Int8Kernel::Amx, Int8Kernel::Vnni, Int8Kernel::Portable]
            .into_iter()
            .filter(|k| k.available())
            .collect()
    }

    /// Weight rows with a spread of magnitudes (an outlier column, a row of zeros).
    fn weight(n: usize, k: usize) -> Vec<f32> {
        let mut w: Vec<f32> = (0..n * k).map(|i| 0.05 * noise(i, 1)).collect();
        for j in 0..n {
            w[j * k + (j * 7) % k] *= 20.0;
        }
        if n > 2 {
            w[k..2 * k].fill(0.0);
        }
        w
    }

    #[test]
    fn weight_rows_round_within_half_a_step() {
        let (n, k) = (70, 100);
        let w = weight(n, k);
        let q = Int8Weight::from_f32(&w, n, k).unwrap();
        for j in 0..n {
            let row = &w[j * k..(j + 1) * k];
            let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(q.row_scale(j), max / 127.0, "row {j}'s scale");
            for (i, (&v, d)) in row.iter().zip(q.dequantize_row(j)).enumerate() {
                assert!(
                    (v - d).abs() <= q.row_scale(j) / 2.0 * (1.0 + 1e-5),
                    "W[{j}, {i}] = {v} became {d} (step {})",
                    q.row_scale(j)
                );
            }
        }
        assert!(
            q.dequantize_row(1).iter().all(|&v| v == 0.0),
            "the zero row stays zero"
        );
    }

    /// Both products on every kernel here against f64 products of the dequantised weight,
    /// within the module's bounds (and an f32 rounding margin), on odd shapes: one row, rows
    /// not a multiple of a block, reductions and columns not a multiple of 64; every kernel
    /// gives the same bits, accumulating or not.
    #[test]
    fn products_match_the_dequantised_weight_within_the_bound_on_every_kernel() {
        for &(m, n, k) in &[(1, 64, 64), (5, 70, 100), (33, 192, 576), (70, 130, 33)] {
            let w = weight(n, k);
            let q = Int8Weight::from_f32(&w, n, k).unwrap();
            let wd: Vec<f64> = (0..n)
                .flat_map(|j| q.dequantize_row(j))
                .map(f64::from)
                .collect();
            let x: Vec<f32> = (0..m * k)
                .map(|i| noise(i, 2) * (1.0 + (i % k == 3) as u8 as f32 * 30.0))
                .collect();
            let dy: Vec<f32> = (0..m * n).map(|i| 1e-3 * noise(i, 3)).collect();
            let mut first: Option<(Vec<f32>, Vec<f32>)> = None;
            for kernel in kernels() {
                let mut y = vec![f32::NAN; m * n];
                q.forward_with(kernel, &mut y, &x, m, false);
                let mut dx = vec![f32::NAN; m * k];
                q.backward_with(kernel, &mut dx, &dy, m, false);
                for t in 0..m {
                    let xr = &x[t * k..(t + 1) * k];
                    let a = xr.iter().fold(0.0f32, |mx, v| mx.max(v.abs())) as f64 / 127.0;
                    for j in 0..n {
                        let wr = &wd[j * k..(j + 1) * k];
                        let exact: f64 = xr.iter().zip(wr).map(|(&x, &w)| x as f64 * w).sum();
                        let abs: f64 = xr.iter().zip(wr).map(|(&x, &w)| (x as f64 * w).abs()).sum();
                        let bound = a / 2.0 * wr.iter().map(|w| w.abs()).sum::<f64>() + 1e-6 * abs;
                        let got = y[t * n + j] as f64;
                        assert!(
                            (got - exact).abs() <= bound,
                            "{kernel:?} {m}×{k}×{n}: y[{t}, {j}] = {got}, exact {exact}, bound {bound}"
                        );
                    }
                    let g: Vec<f64> = (0..n)
                        .map(|j| dy[t * n + j] as f64 * q.row_scale(j) as f64)
                        .collect();
                    let d = g.iter().fold(0.0f64, |mx, v| mx.max(v.abs())) / 127.0;
                    for i in 0..k {
                        let exact: f64 = (0..n).map(|j| dy[t * n + j] as f64 * wd[j * k + i]).sum();
                        let abs: f64 = (0..n)
                            .map(|j| (dy[t * n + j] as f64 * wd[j * k + i]).abs())
                            .sum();
                        let levels: f64 = (0..n).map(|j| (q.level(j, i) as f64).abs()).sum();
                        let bound = d / 2.0 * levels + 1e-6 * abs + 1e-12;
                        let got = dx[t * k + i] as f64;
                        assert!(
                            (got - exact).abs() <= bound,
                            "{kernel:?} {m}×{n}×{k}: dx[{t}, {i}] = {got}, exact {exact}, bound {bound}"
                        );
                    }
                }
                // Accumulating adds the same product to what was there.
                let mut y2 = vec![1.0f32; m * n];
                q.forward_with(kernel, &mut y2, &x, m, true);
                for (a, b) in y2.iter().zip(&y) {
                    assert_eq!(*a, *b + 1.0, "{kernel:?}: accumulation");
                }
                match &first {
                    None => first = Some((y, dx)),
                    Some((y0, dx0)) => {
                        assert!(
                            y0.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{kernel:?}: forward bits"
                        );
                        assert!(
                            dx0.iter().zip(&dx).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{kernel:?}: backward bits"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rows_for_the_backward_only_give_the_same_backward_and_refuse_the_forward() {
        let (m, n, k) = (9, 70, 130);
        let w = weight(n, k);
        let both = Int8Weight::from_f32(&w, n, k).unwrap();
        let back = Int8Weight::backward_from_f32(&w, n, k).unwrap();
        assert!(back.bytes() < both.bytes());
        let dy: Vec<f32> = (0..m * n).map(|i| noise(i, 4)).collect();
        let (mut a, mut b) = (vec![0.0f32; m * k], vec![0.0f32; m * k]);
        both.backward(&mut a, &dy, m, false);
        back.backward(&mut b, &dy, m, false);
        assert_eq!(a, b);
        for j in 0..n {
            assert_eq!(both.dequantize_row(j), back.dequantize_row(j), "row {j}");
        }
        let refused = std::panic::catch_unwind(|| {
            let mut y = vec![0.0f32; m * n];
            back.forward(&mut y, &vec![0.0; m * k], m, false);
        });
        assert!(
            refused.is_err(),
            "a forward over rows packed for the backward only"
        );
    }

    #[test]
    fn a_row_that_is_not_finite_is_named_and_poisons_its_products() {
        let (n, k) = (3, 64);
        let mut w = vec![0.1f32; n * k];
        w[k + 5] = f32::NAN;
        assert_eq!(Int8Weight::from_f32(&w, n, k).unwrap_err(), 1);
        let q = Int8Weight::from_f32(&vec![0.1f32; n * k], n, k).unwrap();
        let mut x = vec![1.0f32; 2 * k];
        x[k + 1] = f32::INFINITY;
        for kernel in kernels() {
            let mut y = vec![0.0f32; 2 * n];
            q.forward_with(kernel, &mut y, &x, 2, false);
            assert!(
                y[..n].iter().all(|v| v.is_finite()),
                "{kernel:?}: the finite row"
            );
            assert!(
                y[n..].iter().all(|v| v.is_nan()),
                "{kernel:?}: the row with ∞"
            );
        }
    }

    #[test]
    fn the_scalar_and_vector_quantisers_agree() {
        let src: Vec<f32> = (0..77).map(|i| noise(i, 9) * 3.0).collect();
        let cs: Vec<f32> = (0..77).map(|i| 0.5 + noise(i, 10).abs()).collect();
        for col in [None, Some(&cs[..])] {
            let (mut q1, mut q2) = (vec![0i8; 77], vec![0i8; 77]);
            let mut s1 = 0.0;
            quantize_row(&mut q1, &mut s1, &src, col);
            // The scalar path, written out.
            let v: Vec<f32> = (0..77)
                .map(|i| col.map_or(src[i], |c| src[i] * c[i]))
                .collect();
            let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let s2 = max / 127.0;
            for (q, &x) in q2.iter_mut().zip(&v) {
                *q = (x * (127.0 / max)).round_ties_even() as i8;
            }
            assert_eq!(s1, s2);
            assert_eq!(q1, q2);
        }
    }
}
