//! The bf16 backward product dX = dY·W of a frozen weight W [out, in], two ways, on the LoRA
//! training shapes of SmolLM2-135M (batch 4 × 256 = 1024 tokens; the LM head in the loss's
//! chunks of 64 rows):
//! - `second`: `matmul_bf16` on a second packing of W (`PackedBf16::for_x_w`), which costs a
//!   second bf16 copy of every weight;
//! - `one`: `matmul_bf16_t` on the forward's packing (`PackedBf16::for_x_wt`), rebuilding one
//!   panel of Wᵀ per task.
//!
//! The two alternate, call by call, so that a machine loaded by other work slows both alike;
//! each shape prints the median seconds of each and the ratio one/second, and a last line the
//! whole backward's (every layer's shapes, the head's chunks) as one sum of medians.
//! Usage: cargo run --release --example bf16_backward [ROUNDS] (default 15).

use std::time::Instant;

use lorakit::engine::bf16::{bf16_kernel, matmul_bf16, matmul_bf16_t, PackedBf16};

fn data(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0
                - 1.0
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    println!(
        "kernel {:?}, {} threads, {rounds} rounds",
        bf16_kernel(),
        rayon::current_num_threads()
    );
    // (name, rows of dY, out, in, calls per training step)
    let shapes = [
        ("q_proj/o_proj", 1024, 576, 576, 60),
        ("k_proj/v_proj", 1024, 192, 576, 60),
        ("gate/up", 1024, 1536, 576, 60),
        ("down", 1024, 576, 1536, 30),
        ("head chunk", 64, 49152, 576, 16),
    ];
    let (mut step_second, mut step_one) = (0.0, 0.0);
    for (name, m, out, inp, calls) in shapes {
        let w = data(out * inp, 1);
        let dy = data(m * out, 2);
        let forward = PackedBf16::for_x_wt(&w, out, inp);
        let backward = PackedBf16::for_x_w(&w, out, inp);
        let mut dx = vec![0.0f32; m * inp];
        let (mut second, mut one) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let t = Instant::now();
            matmul_bf16(&mut dx, &dy, m, &backward, false);
            second.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            matmul_bf16_t(&mut dx, &dy, m, &forward, false);
            one.push(t.elapsed().as_secs_f64());
        }
        let (s, o) = (median(second), median(one));
        step_second += s * calls as f64;
        step_one += o * calls as f64;
        println!(
            "{name:14} {m}x{out}x{inp}: second packing {:.3} ms, one packing {:.3} ms, ratio {:.3}",
            s * 1e3,
            o * 1e3,
            o / s
        );
    }
    println!(
        "one step's backward products: second packing {:.3} s, one packing {:.3} s, ratio {:.3}",
        step_second,
        step_one,
        step_one / step_second
    );
}
