//! bf16 products on AMX tiles (`tdpbf16ps`), for CPUs that have them (Intel Xeon since Sapphire
//! Rapids).
//!
//! One `tdpbf16ps` multiplies a 16 × 32 bf16 tile by a 32 × 16 one into 16 × 16 f32
//! accumulators: 8192 multiply-adds, against 32 for one AVX-512 `vdpbf16ps`. On the Xeon this
//! was written on, `vdpbf16ps` products ran at half the speed of f32 FMAs (examples/matmul_peak:
//! 66 against 141 GFLOP/s on SmolLM2's training mix, two cores), so bf16 training there was
//! slower than f32; on the tiles the same mix ran at 324 GFLOP/s.
//!
//! The kernel reads the same data as the AVX-512 kernels of `engine::bf16`: the activations
//! rounded to bf16 row by row (here with rows padded to a multiple of 16 so that every tile load
//! stays inside the buffer), and the weight packing's panels of [`NR`] columns, whose layout
//! (for each pair of the reduction dimension, NR columns × 2 values) is exactly AMX's "VNNI" B
//! tile: 16 pairs × 16 columns is a tile with a row stride of NR × 2 values.
//!
//! Arithmetic: f32 accumulation of the exact bf16 products, with the hardware's own order and
//! rounding inside each tile product (denormals flushed), so the results differ from the
//! `vdpbf16ps` kernel's in the last bits; each output element still depends only on its row of
//! the activations and its column of the weight, never on the rows beside it (the batch- and
//! packing-invariance the tests check holds). The old output is added last when accumulating, as
//! the other kernels do.
//!
//! The tile instructions are written with `asm!`: the Rust intrinsics are not stable.

use std::sync::OnceLock;

/// Columns of a packed weight panel: the width `engine::bf16` packs (it asserts the two agree at
/// compile time; this module does not import it, so the dependency runs one way).
pub const PANEL_COLS: usize = 64;
const NR: usize = PANEL_COLS;

/// Rows of A (and of C) per tile, and f32 columns of C per tile.
const TILE: usize = 16;
/// bf16 pairs of the reduction dimension per tile (32 values, 64 bytes per tile row).
const PAIRS: usize = 16;

/// Linux's `arch_prctl` request for permission to use a dynamically enabled state component, and
/// AMX's tile-data component (Documentation/arch/x86/xstate.rst).
const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
const XFEATURE_XTILEDATA: libc::c_ulong = 18;

/// The environment variable that, set to anything but `0` or nothing, keeps the AMX kernel off
/// (the AVX512-BF16 one runs instead where the CPU has it).
pub const DISABLE_ENV: &str = "LORAKIT_DISABLE_AMX";

/// Whether this CPU and OS run AMX-BF16 tiles: CPUID says AMX-TILE and AMX-BF16, the OS enables
/// the tile state in XCR0, and Linux grants this process the tile data (asked once). False
/// where [`DISABLE_ENV`] is set.
pub fn amx_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let off = std::env::var_os(DISABLE_ENV).is_some_and(|v| !v.is_empty() && v != "0");
        !off && cpu_and_os_support()
    })
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn cpu_and_os_support() -> bool {
    use std::arch::x86_64::__cpuid_count;
    let leaf0 = __cpuid_count(0, 0);
    if leaf0.eax < 0xd {
        return false;
    }
    let l7 = __cpuid_count(7, 0);
    let amx_bf16 = (l7.edx >> 22) & 1 == 1;
    let amx_tile = (l7.edx >> 24) & 1 == 1;
    let osxsave = (__cpuid_count(1, 0).ecx >> 27) & 1 == 1;
    if !(amx_bf16 && amx_tile && osxsave) {
        return false;
    }
    // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the OS saves the tile state.
    let xcr0: u64 = {
        let (lo, hi): (u32, u32);
        // SAFETY: OSXSAVE is set, so XGETBV is enabled.
        unsafe {
            std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
                options(nomem, nostack, preserves_flags));
        }
        ((hi as u64) << 32) | lo as u64
    };
    if (xcr0 >> 17) & 3 != 3 {
        return false;
    }
    // SAFETY: a plain system call with integer arguments.
    let granted = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    granted == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn cpu_and_os_support() -> bool {
    false
}

/// Whether the AMX kernel takes a product with `k_pairs` pairs of the reduction dimension: whole
/// tiles only (k a multiple of 32, as every projection of the supported models has).
pub fn amx_fits(k_pairs: usize) -> bool {
    k_pairs > 0 && k_pairs.is_multiple_of(PAIRS)
}

/// The tile configuration (palette 1): tiles 0–3 accumulate C (16 rows × 16 f32), 4–5 hold A
/// (16 rows × 32 bf16), 6–7 hold B (16 pairs × 16 columns × 2 bf16); every row is 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// The tile configuration [`CONFIG`] loaded on the calling thread, released when dropped: the
/// tile kernels take one, so that a run of many blocks loads the configuration once.
///
/// Loading it (and releasing it) waits for every tile instruction in flight to finish: done once
/// per block of 32 rows, as it was, that drain cost about a sixth of a product on the Xeon it was
/// measured on (bench/RESULTS.md, "AMX: one tile configuration per run of tasks").
pub(crate) struct Tiles {
    /// Tile state is per thread: the guard must be dropped where it was made.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Tiles {
    /// Loads [`CONFIG`] on this thread.
    ///
    /// # Safety
    /// [`amx_available`] must hold, and no other tile code may run on this thread until the guard
    /// is dropped (it would replace or release the configuration).
    pub(crate) unsafe fn begin() -> Self {
        std::arch::asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig,
            options(nostack, readonly));
        Tiles {
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured on this thread by `begin` (the guard is not Send).
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// C[rows ≤ 32, cols ≤ NR] (+)= A[rows, 2·k_pairs] · panel, on tiles configured by `_tiles`.
///
/// a: bf16 rows with stride `lda` values, at least 32 rows readable from it (the caller pads);
/// panel: one packed panel (k_pairs × NR × 2 values); c: row stride `ldc` f32, written only
/// inside rows × cols.
///
/// # Safety
/// [`amx_fits`]`(k_pairs)`, `a` must hold 32 rows of `lda ≥ 2·k_pairs` values from its start,
/// and c must be valid for rows × cols elements at stride ldc with no other thread writing them.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn panel_kernel(
    _tiles: &Tiles,
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
    use std::arch::asm;
    debug_assert!(rows <= 2 * TILE && cols <= NR && amx_fits(k_pairs));
    debug_assert!(a.len() >= (2 * TILE - 1) * lda + 2 * k_pairs);
    debug_assert!(panel.len() >= k_pairs * NR * 2);
    let a_stride = lda * 2; // bytes
    let b_stride = NR * 2 * 2; // bytes: one pair row of the panel

    // Written whole by the tile stores before it is read: not zeroed (that was a 4 KB memset per
    // call, a few % of a training step).
    let mut scratch = std::mem::MaybeUninit::<TileScratch>::uninit();
    let tiles = scratch.as_mut_ptr() as *mut [f32; TILE * TILE];
    // Two column halves of 32 (tile pairs 0–1 and 2–3 of the panel's 4 × 16 columns).
    for half in 0..NR / (2 * TILE) {
        let col0 = half * 2 * TILE;
        if col0 >= cols {
            break;
        }
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        let mut p = 0;
        while p < k_pairs {
            let a0 = a.as_ptr().add(2 * p);
            let a1 = a0.add(TILE * lda);
            let b0 = panel.as_ptr().add((p * NR + col0) * 2);
            let b1 = b0.add(TILE * 2);
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
                sa = in(reg) a_stride, sb = in(reg) b_stride,
                options(nostack, readonly),
            );
            p += PAIRS;
        }
        if !accumulate && rows == 2 * TILE && col0 + 2 * TILE <= cols {
            // Whole tiles: straight into C (most of a large product).
            let c0 = c.add(col0);
            asm!(
                "tilestored [{s0} + {st}*1], tmm0",
                "tilestored [{s1} + {st}*1], tmm1",
                "tilestored [{s2} + {st}*1], tmm2",
                "tilestored [{s3} + {st}*1], tmm3",
                s0 = in(reg) c0, s1 = in(reg) c0.add(TILE),
                s2 = in(reg) c0.add(TILE * ldc), s3 = in(reg) c0.add(TILE * ldc + TILE),
                st = in(reg) ldc * 4,
                options(nostack),
            );
            continue;
        }
        let row_bytes = TILE * 4;
        asm!(
            "tilestored [{s0} + {st}*1], tmm0",
            "tilestored [{s1} + {st}*1], tmm1",
            "tilestored [{s2} + {st}*1], tmm2",
            "tilestored [{s3} + {st}*1], tmm3",
            s0 = in(reg) tiles, s1 = in(reg) tiles.add(1),
            s2 = in(reg) tiles.add(2), s3 = in(reg) tiles.add(3),
            st = in(reg) row_bytes,
            options(nostack),
        );
        // SAFETY: the four tile stores above wrote all of it.
        let stored = scratch.assume_init_ref();
        // stored[2·rb + cb]: rows rb·16.., columns col0 + cb·16..
        for (t, tile) in stored.0.iter().enumerate() {
            let (rb, cb) = (t / 2, t % 2);
            let c_start = col0 + cb * TILE;
            if c_start >= cols {
                continue;
            }
            let live_cols = (cols - c_start).min(TILE);
            for r in 0..TILE {
                let row = rb * TILE + r;
                if row >= rows {
                    break;
                }
                let src = &tile[r * TILE..r * TILE + live_cols];
                let dst = std::slice::from_raw_parts_mut(c.add(row * ldc + c_start), live_cols);
                if live_cols == TILE && accumulate {
                    add_row(dst, src);
                } else {
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = if accumulate { v + *d } else { v };
                    }
                }
            }
        }
    }
}

/// Rows × columns of one 8-bit block: two row tiles by [`PANEL_COLS`] columns.
pub(crate) const I8_BLOCK_ROWS: usize = 2 * TILE;

/// The i32 sums of one 8-bit block, rows of [`PANEL_COLS`], on a cache line (tile stores of
/// 64-byte rows that straddle lines run at half speed).
#[repr(C, align(64))]
pub(crate) struct I8Block(pub [i32; I8_BLOCK_ROWS * PANEL_COLS]);

/// C[32, 64] = A[32, 4·k_quads] · panel, on tiles configured by `_tiles`, in exact i32 sums of
/// 8-bit signed × signed products (`tdpbssd`, 16 × 16 × 64 multiply-adds per instruction, twice
/// `tdpbf16ps`'s); all of C is written. The panel is `engine::int8_rows`' layout: per quad of the reduction, 64 columns × 4
/// values, which is AMX's B tile (16 quads × 16 columns per tile, row stride 256 bytes).
///
/// # Safety
/// [`amx_int8_available`] holds; `k_quads` a multiple of 16; `a` readable for 32 rows of stride
/// `lda` bytes from its start, each 4·k_quads bytes long; `panel` for k_quads × 256 bytes.
pub(crate) unsafe fn i8_panel_block(
    _tiles: &Tiles,
    a: *const i8,
    lda: usize,
    panel: *const i8,
    k_quads: usize,
    c: &mut I8Block,
) {
    use std::arch::asm;
    debug_assert!(k_quads.is_multiple_of(PAIRS));
    let b_stride = NR * 4; // bytes: one quad row of the panel
    let c_stride = NR * 4; // bytes: one row of C
    for half in 0..NR / (2 * TILE) {
        let col0 = half * 2 * TILE;
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        let mut q = 0;
        while q < k_quads {
            let a0 = a.add(4 * q);
            let a1 = a0.add(TILE * lda);
            let b0 = panel.add(q * b_stride + col0 * 4);
            let b1 = b0.add(TILE * 4);
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbssd tmm0, tmm4, tmm6",
                "tdpbssd tmm1, tmm4, tmm7",
                "tdpbssd tmm2, tmm5, tmm6",
                "tdpbssd tmm3, tmm5, tmm7",
                a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
                sa = in(reg) lda, sb = in(reg) b_stride,
                options(nostack, readonly),
            );
            q += PAIRS;
        }
        let c0 = c.0.as_mut_ptr().add(col0);
        asm!(
            "tilestored [{s0} + {st}*1], tmm0",
            "tilestored [{s1} + {st}*1], tmm1",
            "tilestored [{s2} + {st}*1], tmm2",
            "tilestored [{s3} + {st}*1], tmm3",
            s0 = in(reg) c0, s1 = in(reg) c0.add(TILE),
            s2 = in(reg) c0.add(TILE * NR), s3 = in(reg) c0.add(TILE * NR + TILE),
            st = in(reg) c_stride,
            options(nostack),
        );
    }
}

/// The four C tiles of a block as stored for the edges and for accumulation: on a cache line, as
/// a tile store of 64-byte rows that straddle lines runs at half speed.
#[repr(C, align(64))]
struct TileScratch([[f32; TILE * TILE]; 4]);

/// dst[0..16] += src[0..16] (one tile row), with AVX-512, which every AMX CPU has: the same
/// single rounding per element as the scalar `v + d`.
///
/// # Safety
/// The CPU has AVX-512F (the AMX kernel runs only where AVX512-BF16 was detected, which needs
/// it: `engine::bf16`'s call checks); both slices hold 16 values.
#[target_feature(enable = "avx512f")]
unsafe fn add_row(dst: &mut [f32], src: &[f32]) {
    use std::arch::x86_64::*;
    debug_assert!(dst.len() == TILE && src.len() == TILE);
    let sum = _mm512_add_ps(_mm512_loadu_ps(src.as_ptr()), _mm512_loadu_ps(dst.as_ptr()));
    _mm512_storeu_ps(dst.as_mut_ptr(), sum);
}

/// The tile instruction roof on the calling thread: FLOP/s of `iters` rounds of four
/// independent `tdpbf16ps` (16 × 16 × 32 multiply-adds each) on tiles loaded once: no memory
/// traffic, no conversion, no edges. None without AMX.
pub fn roof_flops(iters: usize) -> Option<f64> {
    if !amx_available() {
        return None;
    }
    // bf16 1.0 and a tiny value: the sums stay finite however long the chains run.
    let ones = vec![0x3f80u16; TILE * 2 * PAIRS];
    let tiny = vec![0x0080u16 + 0x3300; TILE * 2 * PAIRS];
    // SAFETY: AMX is available; both buffers hold a whole tile (16 rows of 64 bytes).
    let secs =
        unsafe { time_tile_chains(iters, false, ones.as_ptr().cast(), tiny.as_ptr().cast()) };
    Some((iters * 4 * TILE * TILE * 2 * PAIRS * 2) as f64 / secs)
}

/// Whether the tiles also multiply 8-bit integers (`tdpbusd`, CPUID AMX-INT8), on top of
/// [`amx_available`].
pub fn amx_int8_available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        // CPUID leaf 7, EDX bit 25: AMX-INT8.
        amx_available() && (std::arch::x86_64::__cpuid_count(7, 0).edx >> 25) & 1 == 1
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// The 8-bit tile roof on the calling thread, in integer operations per second (a multiply and
/// an add count two, as for FLOP/s): `iters` rounds of four independent `tdpbusd` (u8 × i8 into
/// i32, 16 × 16 × 64 multiply-adds each, twice `tdpbf16ps`'s) on tiles loaded once. None without
/// AMX-INT8. The i32 sums wrap, which the tiles define and the timing does not care about.
pub fn roof_int8_ops(iters: usize) -> Option<f64> {
    if !amx_int8_available() {
        return None;
    }
    let bytes = vec![1u8; TILE * 64];
    // SAFETY: AMX-INT8 is available; the buffer holds a whole tile.
    let secs = unsafe { time_tile_chains(iters, true, bytes.as_ptr(), bytes.as_ptr()) };
    Some((iters * 4 * TILE * TILE * 64 * 2) as f64 / secs)
}

/// Seconds for `iters` rounds of four independent tile products (`tdpbusd` if `int8`, else
/// `tdpbf16ps`) of A tiles loaded from `a` by B tiles loaded from `b`, into four accumulators.
///
/// # Safety
/// The CPU runs the instruction (AMX-BF16 or AMX-INT8, with the tile data granted), and `a`, `b`
/// each point at 16 rows of 64 readable bytes.
unsafe fn time_tile_chains(iters: usize, int8: bool, a: *const u8, b: *const u8) -> f64 {
    use std::arch::asm;
    let t = std::time::Instant::now();
    let tiles = Tiles::begin();
    asm!(
        "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
        "tileloadd tmm4, [{a} + {s}*1]", "tileloadd tmm5, [{a} + {s}*1]",
        "tileloadd tmm6, [{b} + {s}*1]", "tileloadd tmm7, [{b} + {s}*1]",
        a = in(reg) a, b = in(reg) b, s = in(reg) 64usize,
        options(nostack, readonly),
    );
    // (The branch is the same every round; its cost is noise beside four tile products.)
    for _ in 0..iters {
        if int8 {
            asm!(
                "tdpbusd tmm0, tmm4, tmm6",
                "tdpbusd tmm1, tmm4, tmm7",
                "tdpbusd tmm2, tmm5, tmm6",
                "tdpbusd tmm3, tmm5, tmm7",
                options(nostack, nomem),
            );
        } else {
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                options(nostack, nomem),
            );
        }
    }
    drop(tiles);
    t.elapsed().as_secs_f64()
}
