use lorakit::engine::bf16::{matmul_bf16, PackedBf16};
use lorakit::engine::matmul_nt;
use std::time::Instant;
fn main() {
    for &(m, k, n) in &[
        (1024usize, 576usize, 1536usize),
        (1024, 1536, 576),
        (64, 576, 49152),
        (1, 576, 1536),
    ] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut out = vec![0.0f32; m * n];
        let p = PackedBf16::for_x_wt(&w, n, k);
        let reps = if m == 1 { 2000 } else { 10 };
        let flops = 2.0 * (m * n * k * reps) as f64;
        let t = Instant::now();
        for _ in 0..reps {
            matmul_nt(&mut out, &x, &w, m, k, n, false);
        }
        let f32r = flops / t.elapsed().as_secs_f64() / 1e9;
        let t = Instant::now();
        for _ in 0..reps {
            matmul_bf16(&mut out, &x, m, &p, false);
        }
        let bfr = flops / t.elapsed().as_secs_f64() / 1e9;
        println!("{m}x{k}x{n}: f32 {f32r:.0} GFLOP/s, bf16 {bfr:.0} GFLOP/s");
    }
}
