//! Linear layers, `y = x Wᵀ + b (+ Σ s·(x Aᵀ) Bᵀ for each attached LoRA adapter)` with W stored
//! `[out, in]` as HF stores it.
//!
//! The weight is an enum so that bf16 and quantised storage can join f32 without touching the
//! model code; adapters attach here, so every architecture gets LoRA through its linear layers.

use crate::engine::matmul_nt;
use crate::lora::LoraWeights;

/// How a frozen weight is stored.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Row-major `[out, in]`.
    F32(Vec<f32>),
}

#[derive(Debug, Clone)]
pub struct Linear {
    pub out_features: usize,
    pub in_features: usize,
    pub weight: Weight,
    /// `[out]`
    pub bias: Option<Vec<f32>>,
    /// Unmerged adapters, applied on the fly (each with its own scale).
    pub loras: Vec<LoraWeights>,
}

impl Linear {
    pub fn new(weight: Vec<f32>, out_features: usize, in_features: usize, bias: Option<Vec<f32>>) -> Self {
        debug_assert_eq!(weight.len(), out_features * in_features);
        Linear {
            out_features,
            in_features,
            weight: Weight::F32(weight),
            bias,
            loras: Vec::new(),
        }
    }

    /// The weight as f32 `[out, in]`.
    pub fn weight_f32(&self) -> &[f32] {
        match &self.weight {
            Weight::F32(w) => w,
        }
    }

    pub fn weight_f32_mut(&mut self) -> &mut [f32] {
        match &mut self.weight {
            Weight::F32(w) => w,
        }
    }

    /// y = x Wᵀ + b + Σ s·(x Aᵀ) Bᵀ.  x: [T, in] → y: [T, out].
    pub fn forward(&self, y: &mut [f32], x: &[f32]) {
        self.forward_base(y, x);
        let t = x.len() / self.in_features;
        let mut xa = Vec::new();
        for lora in &self.loras {
            xa.resize(t * lora.r, 0.0);
            lora_forward(y, x, lora, &mut xa, t, self.in_features, self.out_features);
        }
    }

    /// y = x Wᵀ + b, without adapters.  x: [T, in] → y: [T, out].
    pub fn forward_base(&self, y: &mut [f32], x: &[f32]) {
        let t = x.len() / self.in_features;
        match &self.weight {
            Weight::F32(w) => matmul_nt(y, x, w, t, self.in_features, self.out_features, false),
        }
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.out_features) {
                for (yi, bi) in row.iter_mut().zip(b) {
                    *yi += bi;
                }
            }
        }
    }

    /// W += sign · s·B A for every attached adapter, then detaches them (sign = +1 merges,
    /// −1 unmerges an adapter merged earlier).
    pub fn merge_loras(&mut self, sign: f32) {
        let (out, inp) = (self.out_features, self.in_features);
        let loras = std::mem::take(&mut self.loras);
        let w = self.weight_f32_mut();
        for lora in &loras {
            for (wi, di) in w.iter_mut().zip(lora.delta(out, inp)) {
                *wi += sign * di;
            }
        }
    }
}

/// y += s · (x Aᵀ) Bᵀ, leaving x Aᵀ [T, r] in `xa`.
///
/// x: [T, in], A: [r, in], B: [out, r], y: [T, out].
pub fn lora_forward(y: &mut [f32], x: &[f32], lora: &LoraWeights, xa: &mut [f32], t: usize, inp: usize, out: usize) {
    matmul_nt(xa, x, &lora.a, t, inp, lora.r, false);
    // Scale the small [T, r] product rather than the [T, out] one.
    let scaled: Vec<f32> = xa.iter().map(|v| v * lora.scale).collect();
    matmul_nt(y, &scaled, &lora.b, t, lora.r, out, true);
}
