//! A linear layer in training: its forward (keeping what the adapter's backward needs) and its
//! backward (dX through the frozen weight; dA, dB of its adapter; dW, db in full fine-tuning), the
//! LoRA dropout, and the adapter gradients. Every architecture's training passes call these.

use std::collections::BTreeMap;

use crate::engine::matmul;
use crate::error::{Error, Result};
use crate::lora::peft::Adapter;
use crate::lora::{LoraWeights, ModuleId};
use crate::model::linear::{lora_forward, Linear};
use crate::model::param::Param;

/// LoRA dropout on the adapter path: element i of a module's input is kept with probability
/// 1 − p and scaled by 1/(1 − p). The mask is a hash of (seed, module path, i), so the backward
/// regenerates it instead of storing it.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    pub const NONE: Dropout = Dropout { p: 0.0, seed: 0 };

    fn active(&self) -> bool {
        self.p > 0.0
    }

    /// The mask stream of module `id`: the seed mixed with a hash (FNV-1a) of the module's HF
    /// path, so that a mask depends on the module's name only, never on the order of an enum.
    pub(crate) fn key(&self, id: ModuleId) -> u64 {
        let name = id.path();
        let fnv = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        });
        splitmix64(self.seed ^ fnv)
    }

    /// out = mask ⊙ x / (1 − p).
    fn apply(&self, out: &mut Vec<f32>, x: &[f32], key: u64) {
        let keep_scale = 1.0 / (1.0 - self.p);
        let threshold = (self.p as f64 * u32::MAX as f64) as u32;
        out.clear();
        out.extend(x.iter().enumerate().map(|(i, &v)| {
            if (splitmix64(key.wrapping_add(i as u64)) >> 32) as u32 >= threshold {
                v * keep_scale
            } else {
                0.0
            }
        }));
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Gradients of an adapter's tensors, keyed like `Adapter::modules`: (dA [r, in], dB [out, r]).
#[derive(Debug, Clone, Default)]
pub struct LoraGrads {
    pub modules: BTreeMap<ModuleId, (Vec<f32>, Vec<f32>)>,
}

impl LoraGrads {
    pub fn zeros_like(adapter: &Adapter) -> Self {
        LoraGrads {
            modules: adapter
                .modules
                .iter()
                .map(|(id, w)| (*id, (vec![0.0; w.a.len()], vec![0.0; w.b.len()])))
                .collect(),
        }
    }

    pub fn zero(&mut self) {
        for (a, b) in self.modules.values_mut() {
            a.fill(0.0);
            b.fill(0.0);
        }
    }

    /// Each of `adapter`'s tensors beside its gradient here (made by [`LoraGrads::zeros_like`]
    /// for it): A then B of every module, in module order (the order of checkpointed optimiser
    /// state), named as in PEFT's file.
    pub fn params_with<'a>(&'a mut self, adapter: &'a mut Adapter) -> Result<Vec<Param<'a>>> {
        if adapter.modules.len() != self.modules.len() {
            return Err(Error::Invalid(format!(
                "gradients for {} adapted modules, the adapter has {}",
                self.modules.len(),
                adapter.modules.len()
            )));
        }
        let mut v = Vec::with_capacity(2 * self.modules.len());
        for ((id, w), (gid, (ga, gb))) in adapter.modules.iter_mut().zip(&mut self.modules) {
            if id != gid {
                return Err(Error::Invalid(format!(
                    "gradients for {}, the adapter's module is {}",
                    gid.path(),
                    id.path()
                )));
            }
            let path = id.path();
            v.push(Param::new(
                format!("{path}.lora_A.weight"),
                true,
                &mut w.a,
                ga,
            )?);
            v.push(Param::new(
                format!("{path}.lora_B.weight"),
                true,
                &mut w.b,
                gb,
            )?);
        }
        Ok(v)
    }
}

/// A work buffer planned for the largest shape it has served: `fit(n)` makes it n elements
/// long without clearing what it holds (only storage it never had is zeroed), and a shorter
/// batch uses a prefix of the same storage. For buffers the caller overwrites in full: zeroing
/// them every step was a memset of every activation.
#[derive(Debug, Default, Clone)]
pub(crate) struct Buf {
    data: Vec<f32>,
    len: usize,
}

impl Buf {
    /// Makes the buffer n elements long; its contents are whatever the storage held.
    pub(crate) fn fit(&mut self, n: usize) -> &mut [f32] {
        if self.data.len() < n {
            self.data.resize(n, 0.0);
        }
        self.len = n;
        &mut self.data[..n]
    }

    /// Makes the buffer a copy of `x`.
    pub(crate) fn copy_from(&mut self, x: &[f32]) {
        self.fit(x.len()).copy_from_slice(x);
    }
}

impl std::ops::Deref for Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.data[..self.len]
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data[..self.len]
    }
}

/// Work buffers of the LoRA path, reused by every module: dropout(x) [N, in] (dropout runs
/// only), and the backward's g = s·dy B [N, r] and s·xa [N, r].
#[derive(Debug, Default)]
pub(crate) struct LoraScratch {
    dropped: Vec<f32>,
    g: Buf,
    xa_s: Buf,
}

/// An adapted module's weights, its saved x·Aᵀ and its (dA, dB) accumulators.
pub(crate) type LoraBackward<'a> =
    Option<(&'a LoraWeights, &'a [f32], &'a mut (Vec<f32>, Vec<f32>))>;

/// y = x Wᵀ + b (+ s·(dropout(x) Aᵀ) Bᵀ, keeping dropout(x) Aᵀ in `xa`).  x: [N, in], y: [N, out].
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_train_forward(
    lin: &Linear,
    lora: Option<&LoraWeights>,
    x: &[f32],
    y: &mut [f32],
    xa: Option<&mut Buf>,
    dropout: Dropout,
    key: u64,
    scratch: &mut LoraScratch,
) {
    lin.forward_base(y, x);
    if let (Some(lora), Some(xa)) = (lora, xa) {
        let n = x.len() / lin.in_features;
        // lora_forward overwrites all of xa.
        let xa = xa.fit(n * lora.r);
        let x_lora: &[f32] = if dropout.active() {
            dropout.apply(&mut scratch.dropped, x, key);
            &scratch.dropped
        } else {
            x
        };
        lora_forward(y, x_lora, lora, xa, n, lin.in_features, lin.out_features);
    }
}

/// A linear layer's (dW [out, in], db [out]) accumulators in full fine-tuning.
pub(crate) type WeightGrads<'a> = Option<&'a mut (Vec<f32>, Option<Vec<f32>>)>;

/// dx (+)= dy·W (+ the adapter path's share); dA += s·(dy B)ᵀ·dropout(x); dB += s·dyᵀ·xa;
/// in full fine-tuning also dW += dyᵀ·x and db += Σ_rows dy.
///
/// x: [N, in] (the forward's input), dy: [N, out], dx: [N, in], xa: [N, r].
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_train_backward(
    lin: &Linear,
    lora: LoraBackward<'_>,
    weight_grads: WeightGrads<'_>,
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    accumulate: bool,
    dropout: Dropout,
    key: u64,
    scratch: &mut LoraScratch,
) {
    let (n, inp, out) = (
        dy.len() / lin.out_features,
        lin.in_features,
        lin.out_features,
    );
    if let Some((dw, db)) = weight_grads {
        matmul(dw, dy, true, x, false, out, n, inp, true);
        if let Some(db) = db {
            for row in dy.chunks_exact(out) {
                for (g, &d) in db.iter_mut().zip(row) {
                    *g += d;
                }
            }
        }
    }
    lin.backward_base(dx, dy, accumulate);
    let Some((w, xa, (da, db))) = lora else {
        return;
    };
    let r = w.r;
    let LoraScratch { dropped, g, xa_s } = scratch;
    // g = s · dy B: [N, r] (the product overwrites it)
    let g = g.fit(n * r);
    matmul(g, dy, false, &w.b, false, n, out, r, false);
    g.iter_mut().for_each(|v| *v *= w.scale);
    // dB += s · dyᵀ xa: [out, r]
    let xa_s = xa_s.fit(xa.len());
    for (d, &v) in xa_s.iter_mut().zip(xa) {
        *d = v * w.scale;
    }
    matmul(db, dy, true, xa_s, false, out, n, r, true);
    // dA += gᵀ dropout(x): [r, in]
    let x_lora: &[f32] = if dropout.active() {
        dropout.apply(dropped, x, key);
        dropped
    } else {
        x
    };
    matmul(da, g, true, x_lora, false, r, n, inp, true);
    // dx += dropout'(g A): [N, in]
    if dropout.active() {
        let mut gx = vec![0.0f32; n * inp];
        matmul(&mut gx, g, false, &w.a, false, n, r, inp, false);
        // The mask (scaled by 1/(1-p)) is scratch / x where x ≠ 0; recompute it from the hash.
        let mut ones = Vec::new();
        dropout.apply(&mut ones, &vec![1.0f32; n * inp], key);
        for ((d, gv), m) in dx.iter_mut().zip(&gx).zip(&ones) {
            *d += gv * m;
        }
    } else {
        matmul(dx, g, false, &w.a, false, n, r, inp, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::ModuleKind;

    #[test]
    fn dropout_streams_are_keyed_by_module_name() {
        let d = Dropout { p: 0.25, seed: 7 };
        let id = |layer, kind| ModuleId { layer, kind };
        let keys = [
            d.key(id(0, ModuleKind::Q)),
            d.key(id(0, ModuleKind::K)),
            d.key(id(1, ModuleKind::Q)),
            // GPT-2's two c_proj share a PEFT name but not a path.
            d.key(id(0, ModuleKind::AttnCProj)),
            d.key(id(0, ModuleKind::MlpCProj)),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(d.key(id(3, ModuleKind::V)), d.key(id(3, ModuleKind::V)));
        assert_ne!(
            d.key(id(3, ModuleKind::V)),
            Dropout { p: 0.25, seed: 8 }.key(id(3, ModuleKind::V))
        );
        // The mask keeps about 1 − p of the elements, scaled by 1 / (1 − p).
        let mut out = Vec::new();
        d.apply(&mut out, &vec![1.0; 100_000], keys[0]);
        let kept = out.iter().filter(|&&v| v != 0.0).count() as f64 / 1e5;
        assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
        assert!(out
            .iter()
            .all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    }
}
