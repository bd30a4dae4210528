//! The KV cache of one sequence, and which positions a forward pass returns logits for.

use crate::engine::ops::KvLayer;
use crate::model::config::Config;

/// Keys and values of every layer for one sequence.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<KvLayer>,
    pub capacity: usize,
    /// Positions filled so far.
    pub len: usize,
}

impl KvCache {
    pub fn new(config: &Config, capacity: usize) -> Self {
        let per_layer = config.num_kv_heads * capacity * config.head_dim;
        KvCache {
            layers: (0..config.num_layers)
                .map(|_| KvLayer {
                    k: vec![0.0; per_layer],
                    v: vec![0.0; per_layer],
                })
                .collect(),
            capacity,
            len: 0,
        }
    }
}

/// Which positions need logits: all of them (scoring) or only the last (generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
}

/// Copies the new tokens' keys/values k, v: [T, n_kv, head_dim] into the cache layout
/// [n_kv, capacity, head_dim] at positions start..start+T.
pub(crate) fn store_kv(
    kv: &mut KvLayer,
    k: &[f32],
    v: &[f32],
    n_kv: usize,
    hd: usize,
    capacity: usize,
    start: usize,
) {
    for (t, (kt, vt)) in k
        .chunks_exact(n_kv * hd)
        .zip(v.chunks_exact(n_kv * hd))
        .enumerate()
    {
        for head in 0..n_kv {
            let dst = (head * capacity + start + t) * hd;
            kv.k[dst..dst + hd].copy_from_slice(&kt[head * hd..(head + 1) * hd]);
            kv.v[dst..dst + hd].copy_from_slice(&vt[head * hd..(head + 1) * hd]);
        }
    }
}
