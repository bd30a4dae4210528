//! Linear layers, `y = x Wᵀ + b` with W stored `[out, in]` as HF stores it.
//!
//! The weight is an enum so that bf16 and quantised storage can join f32 without touching the
//! model code; LoRA adapters will attach here too.

use crate::engine::matmul_nt;

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
}

impl Linear {
    pub fn new(weight: Vec<f32>, out_features: usize, in_features: usize, bias: Option<Vec<f32>>) -> Self {
        debug_assert_eq!(weight.len(), out_features * in_features);
        Linear {
            out_features,
            in_features,
            weight: Weight::F32(weight),
            bias,
        }
    }

    /// The weight as f32 `[out, in]`.
    pub fn weight_f32(&self) -> &[f32] {
        match &self.weight {
            Weight::F32(w) => w,
        }
    }

    /// y = x Wᵀ + b.  x: [T, in] → y: [T, out].
    pub fn forward(&self, y: &mut [f32], x: &[f32]) {
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
}
