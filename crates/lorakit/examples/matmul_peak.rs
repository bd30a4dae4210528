//! The matmul ceilings of this CPU, for bench/RESULTS.md's model-FLOP-utilisation (MFU) table
//! (`bench/mfu.sh` runs this beside torch's numbers for the same shapes).
//!
//! 1. Instruction roof: every thread runs independent chains of 512-bit f32 FMAs
//!    (`vfmadd231ps`, 32 FLOP each) or bf16 dot products (`vdpbf16ps`, 64 FLOP each) on
//!    registers only: no memory, no packing, no edges. No matmul on this machine can beat it.
//!    Best of 5 runs, as the kernels below are best-of-N too. Where the bf16 products run on
//!    AMX tiles (`engine::amx`), the bf16 roof is the tiles' (`tdpbf16ps` chains, 16 384 FLOP
//!    each) and the `vdpbf16ps` one is printed too, as shape "roof vdpbf16ps". The 8-bit roof
//!    ("int8", integer operations per second in the same field) is AMX-INT8's `tdpbusd` where
//!    the CPU has it, with AVX512-VNNI's `vpdpbusd` as "roof vpdpbusd"; VNNI's alone otherwise.
//! 2. The engine's kernels on the LoRA training shapes of SmolLM2-135M (batch 4 × 256 = 1024
//!    tokens): f32 through the `gemm` crate, bf16 through `engine::bf16`.
//! 3. QLoRA's forward product y = x·Wᵀ over the same shapes with W in random Q4_1 blocks, two
//!    ways: precision "gguf-bf16" (bf16 panels dequantised from the blocks by each product, as
//!    `train --precision gguf-bf16` runs) and "int8" (`engine::int8`: x quantised to 8 bits per
//!    group of 32, then `vpdpbusd` over the 4-bit levels; the quantisation of x is timed too).
//!    The "int8" rows count FLOP as the f32 product would (2·m·k·n), so they compare directly.
//!
//! Prints one JSON object per line: {"precision": "f32"|"bf16"|"int8", "shape": "roof" | "NAME MxKxN" |
//! "mix", "threads", "gflops"}; "mix" is one forward pass's shapes, time-weighted. Threads:
//! RAYON_NUM_THREADS (default: all).

use std::time::Instant;

// As the lorakit binaries: large buffers on cache-line boundaries, which the AMX tile loads and
// stores need to run at speed (a tile row that straddles two lines costs two).
#[global_allocator]
static ALLOC: lorakit::engine::aligned_alloc::CacheLineAligned =
    lorakit::engine::aligned_alloc::CacheLineAligned;

use lorakit::engine::amx;
use lorakit::engine::bf16::{bf16_kernel, cpu_has_avx512bf16, matmul_bf16, Bf16Kernel, PackedBf16};
use lorakit::engine::int8::{self, Int8Panels};
use lorakit::engine::int8_rows::Int8Weight;
use lorakit::engine::matmul_nt;
use lorakit::engine::quant::QuantMatrix;
use lorakit::io::gguf::GgmlType;
use rayon::prelude::*;

/// FLOP/s of `iters` rounds of 16 independent FMA chains per thread (enough to cover latency ×
/// pipes on current cores), on every rayon thread.
#[cfg(target_arch = "x86_64")]
fn roof(bf16: bool, iters: usize) -> f64 {
    let threads = rayon::current_num_threads();
    let t = Instant::now();
    let sink: f32 = (0..threads)
        .into_par_iter()
        // SAFETY: the features are checked in main before this is called.
        .map(|i| unsafe {
            if bf16 {
                chains_bf16(iters, i as f32)
            } else {
                chains_f32(iters, i as f32)
            }
        })
        .sum();
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box(sink);
    let per_instr = if bf16 { 64.0 } else { 32.0 };
    (threads * iters * 16) as f64 * per_instr / secs
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn chains_f32(iters: usize, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_ps(0.999_9);
    let b = _mm512_set1_ps(1e-7 * seed);
    let mut acc = [_mm512_set1_ps(seed); 16];
    for _ in 0..iters {
        for c in acc.iter_mut() {
            *c = _mm512_fmadd_ps(*c, a, b);
        }
    }
    acc.iter().map(|&c| _mm512_reduce_add_ps(c)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn chains_bf16(iters: usize, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3f80_3f80)); // (1.0, 1.0)
    let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3380_3380)); // (6e-8, 6e-8)
    let mut acc = [_mm512_set1_ps(seed); 16];
    for _ in 0..iters {
        for c in acc.iter_mut() {
            *c = _mm512_dpbf16_ps(*c, a, b);
        }
    }
    acc.iter().map(|&c| _mm512_reduce_add_ps(c)).sum()
}

/// Integer operations per second (a multiply-add counts two) of `iters` rounds of 16
/// independent chains of 512-bit u8 × i8 dot products (`vpdpbusd`, 64 multiply-adds each) on
/// every rayon thread: the AVX512-VNNI roof.
#[cfg(target_arch = "x86_64")]
fn roof_vnni(iters: usize) -> f64 {
    let threads = rayon::current_num_threads();
    let t = Instant::now();
    // SAFETY: AVX512-VNNI is checked by the caller.
    let sink: i64 = (0..threads)
        .into_par_iter()
        .map(|i| unsafe { chains_vnni(iters, i as i32) })
        .sum();
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box(sink);
    (threads * iters * 16) as f64 * 128.0 / secs
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn chains_vnni(iters: usize, seed: i32) -> i64 {
    use std::arch::x86_64::*;
    // Opaque operands: with constants the compiler folds the dot products into plain adds.
    let a = std::hint::black_box(_mm512_set1_epi8(1));
    let b = std::hint::black_box(_mm512_set1_epi8(-1));
    let mut acc = [_mm512_set1_epi32(seed); 16];
    for _ in 0..iters {
        for c in acc.iter_mut() {
            *c = _mm512_dpbusd_epi32(*c, a, b);
        }
    }
    acc.iter().map(|&c| _mm512_reduce_add_epi32(c) as i64).sum()
}

/// Best of `reps` timings of out[m, n] = x[m, k] · W[n, k]ᵀ, in FLOP/s.
fn best_of(reps: usize, m: usize, k: usize, n: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm caches, threads and page tables
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            2.0 * (m * n * k) as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn main() {
    if !(std::arch::is_x86_feature_detected!("avx512f")
        && cpu_has_avx512bf16()
        && bf16_kernel() != Bf16Kernel::Portable
        && bf16_kernel() != Bf16Kernel::Avx2)
    {
        eprintln!("error: this benchmark needs AVX-512 and AVX512-BF16 (not disabled by LORAKIT_DISABLE_AVX512BF16)");
        std::process::exit(1);
    }
    let threads = rayon::current_num_threads();
    let line = |precision: &str, shape: &str, flops: f64| {
        let gflops = (flops / 1e9 * 10.0).round() / 10.0;
        let row = serde_json::json!({ "precision": precision, "shape": shape, "threads": threads, "gflops": gflops });
        println!("{row}");
    };
    #[cfg(target_arch = "x86_64")]
    {
        let best = |bf16: bool| (0..5).map(|_| roof(bf16, 10_000_000)).fold(0.0, f64::max);
        line("f32", "roof", best(false));
        // A tile roof: every thread's chains at once, summed; best of 5.
        let tiles = |per_thread: fn(usize) -> Option<f64>| {
            (0..5)
                .map(|_| {
                    (0..threads)
                        .into_par_iter()
                        .map(|_| per_thread(200_000).unwrap_or(0.0))
                        .sum::<f64>()
                })
                .fold(0.0, f64::max)
        };
        if bf16_kernel() == Bf16Kernel::Amx {
            line("bf16", "roof", tiles(amx::roof_flops));
            line("bf16", "roof vdpbf16ps", best(true));
        } else {
            line("bf16", "roof", best(true));
        }
        // The 8-bit roofs (integer operations per second, in the same "gflops" field): the tiles'
        // `tdpbusd` where the CPU has AMX-INT8, and AVX512-VNNI's `vpdpbusd`, printed as shape
        // "roof vpdpbusd" beside the tiles' (as "roof" alone where there are no tiles).
        let vnni = std::arch::is_x86_feature_detected!("avx512vnni")
            .then(|| (0..5).map(|_| roof_vnni(10_000_000)).fold(0.0, f64::max));
        if amx::amx_int8_available() {
            line("int8", "roof", tiles(amx::roof_int8_ops));
            if let Some(v) = vnni {
                line("int8", "roof vpdpbusd", v);
            }
        } else if let Some(v) = vnni {
            line("int8", "roof", v);
        }
    }
    // SmolLM2-135M linear layers at 1024 tokens: q/o, k/v, gate/up, down; and the LM head.
    let shapes = [
        ("q_proj/o_proj", 1024usize, 576usize, 576usize),
        ("k_proj/v_proj", 1024, 576, 192),
        ("gate_proj/up_proj", 1024, 576, 1536),
        ("down_proj", 1024, 1536, 576),
        ("lm_head", 1024, 576, 49152),
    ];
    let (mut f32_total, mut bf16_total, mut flop_total) = (0.0, 0.0, 0.0);
    for (name, m, k, n) in shapes {
        let x: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
        let mut out = vec![0.0f32; m * n];
        let packed = PackedBf16::for_x_wt(&w, n, k);
        let reps = if n > 10_000 { 3 } else { 10 };
        let f = best_of(reps, m, k, n, || {
            matmul_nt(&mut out, &x, &w, m, k, n, false)
        });
        let b = best_of(reps, m, k, n, || {
            matmul_bf16(&mut out, &x, m, &packed, false)
        });
        line("f32", &format!("{name} {m}x{k}x{n}"), f);
        line("bf16", &format!("{name} {m}x{k}x{n}"), b);
        let mut blocks = q4_1(n, k);
        blocks.set_bf16_products(true);
        let g = best_of(reps, m, k, n, || blocks.matmul_nt(&mut out, &x, m));
        line("gguf-bf16", &format!("{name} {m}x{k}x{n}"), g);
        if int8::vnni_available() {
            let panels = Int8Panels::from_quant(&blocks).expect("Q4_1 repacks");
            let i = best_of(reps, m, k, n, || {
                int8::matmul_nt_int8(&mut out, &x, m, &panels)
            });
            line("int8", &format!("{name} {m}x{k}x{n}"), i);
        }
        // 8-bit rows (`engine::int8_rows`, `train --precision int8`): y = x·Wᵀ and dx = dy·W.
        let rows8 = Int8Weight::from_f32(&w, n, k).expect("finite weight");
        let r8 = best_of(reps, m, k, n, || rows8.forward(&mut out, &x, m, false));
        line("int8-rows", &format!("{name} {m}x{k}x{n}"), r8);
        let dy: Vec<f32> = (0..m * n).map(|i| ((i % 11) as f32 - 5.0) * 0.01).collect();
        let mut dx = vec![0.0f32; m * k];
        let r8t = best_of(reps, m, k, n, || rows8.backward(&mut dx, &dy, m, false));
        line("int8-rows-t", &format!("{name} {m}x{k}x{n}"), r8t);
        let bt = best_of(reps, m, k, n, || {
            lorakit::engine::bf16::matmul_bf16_t(&mut dx, &dy, m, &packed, false)
        });
        line("bf16-t", &format!("{name} {m}x{k}x{n}"), bt);
        // Time-weighted over the shapes as one forward pass meets them (gate/up count twice).
        let count = match name {
            "q_proj/o_proj" | "k_proj/v_proj" | "gate_proj/up_proj" => 2.0,
            _ => 1.0,
        };
        let flop = count * 2.0 * (m * n * k) as f64;
        flop_total += flop;
        f32_total += flop / f;
        bf16_total += flop / b;
    }
    line("f32", "mix", flop_total / f32_total);
    line("bf16", "mix", flop_total / bf16_total);
}

/// A [n, k] weight of Q4_1 blocks (f16 scale, f16 minimum, 32 levels in 16 bytes) with levels
/// and scales from a fixed pattern: speed does not depend on the values.
fn q4_1(n: usize, k: usize) -> QuantMatrix {
    let mut bytes = Vec::with_capacity(n * k / 32 * 20);
    for b in 0..n * k / 32 {
        bytes.extend(half::f16::from_f32(0.001 + (b % 17) as f32 * 1e-4).to_le_bytes());
        bytes.extend(half::f16::from_f32(-0.008).to_le_bytes());
        bytes.extend((0..16).map(|j| ((b + j) % 251) as u8));
    }
    QuantMatrix::from_gguf_blocks(GgmlType::Q4_1, &bytes, n, k, None, "w").expect("Q4_1 blocks")
}
