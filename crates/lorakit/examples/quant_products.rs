//! Training-shape products from quantised blocks (engine::quant) against the f32 products of
//! the dequantised weights (the `gemm` crate), on Llama-3.1-8B's and SmolLM2's shapes: what
//! QLoRA costs in speed per product.
//!
//! For each (type, shape): forward y = x·Wᵀ and backward dX = dY·W with t rows, blocks vs f32,
//! alternating the two `ROUNDS` times and printing medians (the machine may be shared: the
//! alternation spreads any load over both). One JSON object per line: {"type", "shape",
//! "product", "blocks_ms", "f32_ms", "blocks_gflops", "f32_gflops"}.
//!
//! Usage: cargo run --release --example quant_products [-- ROUNDS]

use std::time::Instant;

use lorakit::engine::matmul::{matmul, matmul_nt};
use lorakit::engine::quant::QuantMatrix;
use lorakit::io::gguf::{quantize, GgmlType};

fn random(n: usize, seed: u64) -> Vec<f32> {
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn ms(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e3
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("ROUNDS is a number"))
        .unwrap_or(5);
    // (name, t, out, in)
    let shapes: [(&str, usize, usize, usize); 4] = [
        ("llama8b q_proj", 512, 4096, 4096),
        ("llama8b down_proj", 512, 4096, 14336),
        ("smollm2 q_proj", 1024, 576, 576),
        ("smollm2 up_proj", 1024, 1536, 576),
    ];
    for dtype in [GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q8_0] {
        for (name, t, out, inp) in shapes {
            if !inp.is_multiple_of(dtype.block_size()) {
                continue;
            }
            let w = random(out * inp, 1);
            let bytes = quantize(dtype, &w, inp).unwrap();
            let q = QuantMatrix::from_gguf_blocks(dtype, &bytes, out, inp, None, name).unwrap();
            let wf: Vec<f32> = (0..out).flat_map(|r| q.dequantize_row(r)).collect();
            let x = random(t * inp, 2);
            let dy = random(t * out, 3);
            let mut y = vec![0.0f32; t * out];
            let mut dx = vec![0.0f32; t * inp];
            let (mut fq, mut ff, mut bq, mut bf) = (vec![], vec![], vec![], vec![]);
            for _ in 0..rounds {
                fq.push(ms(|| q.matmul_nt(&mut y, &x, t)));
                ff.push(ms(|| matmul_nt(&mut y, &x, &wf, t, inp, out, false)));
                bq.push(ms(|| q.matmul_w(&mut dx, &dy, t, false)));
                bf.push(ms(|| {
                    matmul(&mut dx, &dy, false, &wf, false, t, out, inp, false)
                }));
            }
            let flop = 2.0 * (t * out * inp) as f64;
            for (product, blocks, f32ms) in [("forward", fq, ff), ("backward", bq, bf)] {
                let (b, f) = (median(blocks), median(f32ms));
                println!(
                    "{{\"type\": \"{dtype}\", \"shape\": \"{name} {t}x{inp}x{out}\", \"product\": \"{product}\", \"blocks_ms\": {b:.1}, \"f32_ms\": {f:.1}, \"blocks_gflops\": {:.1}, \"f32_gflops\": {:.1}}}",
                    flop / b / 1e6,
                    flop / f / 1e6
                );
            }
        }
    }
}
