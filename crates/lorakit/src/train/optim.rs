//! AdamW and gradient clipping with PyTorch's exact semantics.
//!
//! [`AdamW::step`] reproduces `torch.optim.AdamW` (single-tensor path: `foreach=False`,
//! `amsgrad=False`, `maximize=False`, `capturable=False`) operation by operation, in f32
//! for the tensors and f64 for the Python scalars, so that an adapter trained here
//! follows one trained by PEFT as closely as the float arithmetic allows. Per parameter
//! tensor, with `step` already incremented:
//!
//! ```text
//! param.mul_(1 - lr * weight_decay)                      # scalar rounded to f32
//! exp_avg.lerp_(grad, 1 - beta1)                         # m + w * (g - m), fused multiply-add
//! exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//! bias_correction1 = 1 - beta1 ** step                   # Python floats (f64)
//! bias_correction2 = 1 - beta2 ** step
//! step_size = lr / bias_correction1
//! bias_correction2_sqrt = bias_correction2 ** 0.5
//! denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
//! param.addcdiv_(exp_avg, denom, value=-step_size)       # p + (-step_size * m) / denom
//! ```
//!
//! The f32 rounding of each step follows PyTorch's CPU kernels (x86-64 builds with AVX2 or
//! AVX-512, where `lerp` and `addcmul` compile to fused multiply-adds); the unit tests
//! compare against values produced by torch 2.15 on such a CPU.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::param::Param;

/// AdamW hyper-parameters (`torch.optim.AdamW` names; defaults as used for LoRA training).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Base learning rate (the schedule's `base_lr`; [`AdamW::step`] takes the current one).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay: each step multiplies parameters by `1 - lr * weight_decay`.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// The checks `torch.optim.AdamW.__init__` makes, with a message naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f64| Err(Error::Invalid(format!("AdamW: invalid {what}: {v}")));
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return bad("learning rate (must be finite and >= 0)", self.lr);
        }
        if !(self.eps >= 0.0 && self.eps.is_finite()) {
            return bad("epsilon (must be finite and >= 0)", self.eps);
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1 (must be in [0, 1))", self.beta1);
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2 (must be in [0, 1))", self.beta2);
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay (must be finite and >= 0)", self.weight_decay);
        }
        Ok(())
    }
}

/// The AdamW optimiser state for a fixed list of parameter tensors.
#[derive(Debug, Clone)]
pub struct AdamW {
    config: AdamWConfig,
    step: u64,
    /// First moments (`exp_avg`), one per parameter tensor.
    m: Vec<Vec<f32>>,
    /// Second moments (`exp_avg_sq`), one per parameter tensor.
    v: Vec<Vec<f32>>,
}

impl AdamW {
    /// A fresh optimiser (step 0, zero moments) for tensors of the given element counts.
    pub fn new(config: AdamWConfig, param_sizes: &[usize]) -> AdamW {
        AdamW {
            config,
            step: 0,
            m: param_sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: param_sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// Restores a checkpointed state, checking that the moments match `param_sizes`.
    pub fn from_state(
        config: AdamWConfig,
        step: u64,
        m: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
        param_sizes: &[usize],
    ) -> Result<AdamW> {
        for (name, moments) in [("exp_avg", &m), ("exp_avg_sq", &v)] {
            if moments.len() != param_sizes.len() {
                return Err(Error::Invalid(format!(
                    "AdamW state: {} {name} tensors for {} parameter tensors",
                    moments.len(),
                    param_sizes.len()
                )));
            }
            for (i, (t, &n)) in moments.iter().zip(param_sizes).enumerate() {
                if t.len() != n {
                    return Err(Error::Invalid(format!(
                        "AdamW state: {name}[{i}] has {} elements, the parameter has {n}",
                        t.len()
                    )));
                }
            }
        }
        Ok(AdamW { config, step, m, v })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Number of updates made so far (torch's `state["step"]`).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// `(step, exp_avg, exp_avg_sq)`, for checkpoints.
    pub fn state(&self) -> (u64, &[Vec<f32>], &[Vec<f32>]) {
        (self.step, &self.m, &self.v)
    }

    /// One AdamW update of every parameter tensor with learning rate `lr` (from the
    /// schedule; `config.lr` is not used here), weight decay on all of them. `params[i]` and
    /// `grads[i]` must have the size given for tensor `i` at construction.
    ///
    /// # Panics
    /// If the number or sizes of `params` / `grads` differ from the construction sizes
    /// (a programming error in the caller; nothing is modified in that case).
    pub fn step(&mut self, lr: f64, params: &mut [&mut [f32]], grads: &[&[f32]]) {
        assert_eq!(
            grads.len(),
            params.len(),
            "AdamW::step: number of gradient tensors"
        );
        let tensors = params
            .iter_mut()
            .zip(grads)
            .map(|(p, g)| (&mut **p, *g, true))
            .collect();
        if let Err(e) = self.update(lr, tensors) {
            panic!("AdamW::step: {e}");
        }
    }

    /// One AdamW update of each parameter with its own gradient, with weight decay where
    /// [`Param::decay`] says. `params` must be the list this state was built for (same count and
    /// sizes, in order); otherwise an error and nothing is modified.
    pub fn step_params(&mut self, lr: f64, params: &mut [Param<'_>]) -> Result<()> {
        let tensors = params
            .iter_mut()
            .map(|p| (&mut *p.value, &*p.grad, p.decay))
            .collect();
        self.update(lr, tensors)
    }

    /// (value, gradient, decay) of every tensor, in construction order.
    fn update(&mut self, lr: f64, tensors: Vec<(&mut [f32], &[f32], bool)>) -> Result<()> {
        if tensors.len() != self.m.len() {
            return Err(Error::Invalid(format!(
                "AdamW: {} parameter tensors, the optimiser state has {}",
                tensors.len(),
                self.m.len()
            )));
        }
        for (i, ((p, g, _), m)) in tensors.iter().zip(&self.m).enumerate() {
            if p.len() != m.len() || g.len() != m.len() {
                return Err(Error::Invalid(format!(
                    "AdamW: parameter tensor {i} has {} values and {} gradient entries, the optimiser state {}",
                    p.len(),
                    g.len(),
                    m.len()
                )));
            }
        }

        self.step += 1;
        let c = &self.config;
        let step = self.step as f64;

        // Python-float scalars, rounded to f32 where the f32 kernels receive them.
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let apply_decay = c.weight_decay != 0.0;
        let w1 = (1.0 - c.beta1) as f32;
        let b2 = c.beta2 as f32;
        let w2 = (1.0 - c.beta2) as f32;
        let bias_correction1 = 1.0 - c.beta1.powf(step);
        let bias_correction2 = 1.0 - c.beta2.powf(step);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.powf(0.5) as f32;
        let eps = c.eps as f32;
        let neg_step_size = (-step_size) as f32;

        for ((p, g, decays), (m, v)) in tensors.into_iter().zip(self.m.iter_mut().zip(&mut self.v))
        {
            let k = AdamConsts {
                decay: (apply_decay && decays).then_some(decay),
                w1,
                b2,
                w2,
                bias_correction2_sqrt,
                eps,
                neg_step_size,
            };
            // Element-wise, so splitting across threads changes no result; worth it only for
            // the large tensors of full fine-tuning.
            const CHUNK: usize = 1 << 16;
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| adam_update(p, g, m, v, &k));
        }
        Ok(())
    }
}

/// The f32 scalars of one AdamW step.
struct AdamConsts {
    decay: Option<f32>,
    w1: f32,
    b2: f32,
    w2: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
}

/// The update of torch's single-tensor AdamW on one slice. Compiled with FMA where the CPU has
/// it: `mul_add` is then one instruction (and vectorises) instead of a libm call per element;
/// the result is the same fused operation either way.
fn adam_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &AdamConsts) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2")
        {
            // SAFETY: the features were detected at run time.
            return unsafe { adam_update_fma(p, g, m, v, k) };
        }
    }
    adam_update_body(p, g, m, v, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn adam_update_fma(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &AdamConsts) {
    adam_update_body(p, g, m, v, k)
}

#[inline(always)]
fn adam_update_body(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &AdamConsts) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let mut pv = *p;
        if let Some(decay) = k.decay {
            pv *= decay;
        }
        // lerp with a small weight: fma(weight, end - self, self).
        let mv = k.w1.mul_add(g - *m, *m);
        // mul_(beta2), then addcmul_: fma(value * g, g, v * beta2).
        let vv = (k.w2 * g).mul_add(g, *v * k.b2);
        let denom = vv.sqrt() / k.bias_correction2_sqrt + k.eps;
        pv += k.neg_step_size * mv / denom;
        *p = pv;
        *m = mv;
        *v = vv;
    }
}

/// The L2 norm over all elements of all tensors, accumulated in f64.
pub fn global_grad_norm(grads: &[&[f32]]) -> f64 {
    grads
        .iter()
        .map(|g| g.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
        .sum::<f64>()
        .sqrt()
}

/// `torch.nn.utils.clip_grad_norm_(grads, max_norm)` (L2, `error_if_nonfinite=False`):
/// computes the total norm, and when `max_norm / (total + 1e-6) < 1` multiplies every
/// gradient by that coefficient (computed in f32 as torch does). Returns the total norm
/// before clipping; a non-finite norm (NaN/inf gradients) is returned as is and, as in
/// torch, leaves the gradients non-finite or zero: callers should check it.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f64) -> f64 {
    let total = {
        let views: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
        global_grad_norm(&views)
    };
    // torch: clip_coef = max_norm / (total_norm + 1e-6), with total_norm an f32 tensor;
    // `float / tensor` is `tensor.reciprocal() * float`; then clamp(max=1.0).
    let total32 = total as f32;
    let coef = (1.0f32 / (total32 + 1e-6f32)) * max_norm as f32;
    if coef < 1.0 || coef.is_nan() {
        for g in grads.iter_mut() {
            for x in g.iter_mut() {
                *x *= coef;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-made case: two tensors, four updates, weight decay 0.01, the first update
    /// with lr 0 (as after transformers' warm-up), zero and tiny gradients.
    fn hand_made_case() -> (Vec<Vec<f32>>, AdamW) {
        let steps: [(f64, [&[f32]; 2]); 4] = [
            (0.0, [&[0.1, -0.2, 0.0], &[1.0, 1e-3]]),
            (1e-2, [&[0.3, 0.05, -1e-4], &[-0.5, 2e-3]]),
            (2e-2, [&[-0.2, 0.0, 5.0], &[0.25, -1e-6]]),
            (1e-2, [&[0.0, 0.1, -0.5], &[3.0, 0.0]]),
        ];
        let mut p = vec![vec![0.5f32, -1.25, 0.0], vec![2.0f32, -0.125]];
        let config = AdamWConfig {
            lr: 1.0,
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = AdamW::new(config, &[3, 2]);
        for (lr, grads) in steps {
            let (a, b) = p.split_at_mut(1);
            opt.step(lr, &mut [&mut a[0], &mut b[0]], &grads);
        }
        (p, opt)
    }

    /// Against a plain f64 re-implementation of torch's AdamW formulas (Python):
    ///
    /// ```python
    /// import math
    /// P0 = [[0.5, -1.25, 0.0], [2.0, -0.125]]
    /// STEPS = [(0.0,  [[0.1, -0.2, 0.0], [1.0, 1e-3]]),
    ///          (1e-2, [[0.3, 0.05, -1e-4], [-0.5, 2e-3]]),
    ///          (2e-2, [[-0.2, 0.0, 5.0], [0.25, -1e-6]]),
    ///          (1e-2, [[0.0, 0.1, -0.5], [3.0, 0.0]])]
    /// b1, b2, eps, wd = 0.9, 0.999, 1e-8, 0.01
    /// p = [list(t) for t in P0]; m = [[0.0] * len(t) for t in P0]; v = [[0.0] * len(t) for t in P0]
    /// for k, (lr, gs) in enumerate(STEPS, start=1):
    ///     for t in range(len(p)):
    ///         for i in range(len(p[t])):
    ///             g = gs[t][i]
    ///             p[t][i] *= 1 - lr * wd
    ///             m[t][i] = b1 * m[t][i] + (1 - b1) * g
    ///             v[t][i] = b2 * v[t][i] + (1 - b2) * g * g
    ///             denom = math.sqrt(v[t][i]) / math.sqrt(1 - b2 ** k) + eps
    ///             p[t][i] -= lr / (1 - b1 ** k) * m[t][i] / denom
    /// print(p)
    /// ```
    #[test]
    fn adamw_matches_f64_reference() {
        let want: [&[f64]; 2] = [
            &[
                0.48335481639484035,
                -1.2374149291842924,
                -0.009964832729562244,
            ],
            &[1.9833061366708442, -0.1556224206107582],
        ];
        let (p, opt) = hand_made_case();
        assert_eq!(opt.step_count(), 4);
        for (got, want) in p.iter().zip(want) {
            for (&g, &w) in got.iter().zip(want) {
                assert!(
                    (f64::from(g) - w).abs() <= 1e-6 * w.abs().max(1e-3),
                    "{g} vs {w}"
                );
            }
        }
    }

    /// Bit-exact f32 results. `EMULATED` come from a numpy float32 emulation of torch's
    /// op order (fused lerp/addcmul, f32 scalars, correctly rounded sqrt) and are what
    /// this implementation must produce. `TORCH` are torch 2.15.0 (x86-64 wheel, AVX-512,
    /// `torch.optim.AdamW(..., foreach=False)`) on the same case: identical except
    /// p[0][2], 1 ulp off because torch's CPU `sqrt` goes through MKL's vector math,
    /// which is faithfully but not correctly rounded (17% of inputs land 1 ulp away).
    /// With torch's sqrt substituted, the emulation matches torch bit for bit, on this
    /// case and on 20-step random runs of 1248 parameters.
    #[test]
    fn adamw_matches_torch_bits() {
        const EMULATED: [&[u32]; 2] = [
            &[0x3ef77a49, 0xbf9e639c, 0xbc234389],
            &[0x3ffddcf9, 0xbe1f5b7b],
        ];
        const TORCH: [&[u32]; 2] = [
            &[0x3ef77a49, 0xbf9e639c, 0xbc23438a],
            &[0x3ffddcf9, 0xbe1f5b7b],
        ];
        const TORCH_M: [&[u32]; 2] = [
            &[0x3c5ea89a, 0xba0aefbd, 0x3ecccbbd],
            &[0x3eb5b574, 0x39763755],
        ];
        const TORCH_V: [&[u32]; 2] = [
            &[0x391289e4, 0x385bad5e, 0x3ccea4aa],
            &[0x3c28e6d5, 0x31ab6bc9],
        ];
        let (p, opt) = hand_made_case();
        let bits = |t: &[Vec<f32>]| -> Vec<Vec<u32>> {
            t.iter()
                .map(|v| v.iter().map(|x| x.to_bits()).collect())
                .collect()
        };
        let (_, m, v) = opt.state();
        assert_eq!(bits(&p), EMULATED.map(<[u32]>::to_vec));
        // The moments involve no sqrt: identical to torch.
        assert_eq!(bits(m), TORCH_M.map(<[u32]>::to_vec));
        assert_eq!(bits(v), TORCH_V.map(<[u32]>::to_vec));
        for (got, want) in p.iter().flatten().zip(TORCH.iter().flat_map(|t| t.iter())) {
            assert!(
                (got.to_bits() as i64 - *want as i64).abs() <= 1,
                "{got} vs torch {}",
                f32::from_bits(*want)
            );
        }
    }

    #[test]
    fn zero_lr_only_leaves_params_unchanged_but_counts_the_step() {
        let mut opt = AdamW::new(AdamWConfig::default(), &[2]);
        let mut p = [1.0f32, -2.0];
        opt.step(0.0, &mut [&mut p], &[&[0.5, 0.5]]);
        assert_eq!(p, [1.0, -2.0]);
        assert_eq!(opt.step_count(), 1);
        assert!(opt.state().1[0].iter().all(|&m| m != 0.0));
    }

    #[test]
    #[should_panic(expected = "parameter tensor 0 has 2 values and 1 gradient entries")]
    fn mismatched_sizes_panic() {
        let mut opt = AdamW::new(AdamWConfig::default(), &[2]);
        let mut p = [1.0f32, -2.0];
        opt.step(0.1, &mut [&mut p], &[&[0.5]]);
    }

    #[test]
    fn step_params_refuses_a_list_it_was_not_built_for_and_changes_nothing() {
        let mut opt = AdamW::new(AdamWConfig::default(), &[2, 3]);
        let (mut v, mut g) = ([1.0f32, -2.0], [0.5f32, 0.5]);
        let mut params = vec![Param::new("w".into(), true, &mut v, &mut g).unwrap()];
        let e = opt.step_params(0.1, &mut params).unwrap_err().to_string();
        assert!(
            e.contains("1 parameter tensors") && e.contains("has 2"),
            "{e}"
        );
        assert_eq!(opt.step_count(), 0);
        assert_eq!(v, [1.0, -2.0]);
    }

    #[test]
    fn step_params_decays_only_the_tensors_marked_for_it() {
        // Two tensors with zero gradients: AdamW moves them only through the weight decay.
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(config, &[1, 1]);
        let (mut w, mut gw, mut n, mut gn) = ([2.0f32], [0.0f32], [2.0f32], [0.0f32]);
        let mut params = vec![
            Param::new("w".into(), true, &mut w, &mut gw).unwrap(),
            Param::new("norm".into(), false, &mut n, &mut gn).unwrap(),
        ];
        opt.step_params(0.5, &mut params).unwrap();
        assert_eq!(w, [2.0 * (1.0 - 0.5 * 0.1) as f32]);
        assert_eq!(n, [2.0]);
    }

    #[test]
    fn config_validation() {
        assert!(AdamWConfig::default().validate().is_ok());
        let bad = AdamWConfig {
            beta2: 1.0,
            ..Default::default()
        };
        let msg = bad.validate().unwrap_err().to_string();
        assert!(msg.contains("beta2"), "{msg}");
        let bad = AdamWConfig {
            lr: f64::NAN,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn state_round_trip_and_validation() {
        let mut opt = AdamW::new(AdamWConfig::default(), &[2, 3]);
        let mut a = [1.0f32, -1.0];
        let mut b = [0.5f32, 0.25, -2.0];
        opt.step(
            1e-2,
            &mut [&mut a, &mut b],
            &[&[0.1, 0.2], &[0.3, -0.4, 0.5]],
        );
        let (step, m, v) = opt.state();
        assert_eq!(step, 1);
        let restored =
            AdamW::from_state(*opt.config(), step, m.to_vec(), v.to_vec(), &[2, 3]).unwrap();
        assert_eq!(restored.state().1, m);
        assert_eq!(restored.state().2, v);
        let msg = AdamW::from_state(*opt.config(), 1, m.to_vec(), v.to_vec(), &[2, 4])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("exp_avg[1]"), "{msg}");
        assert!(AdamW::from_state(*opt.config(), 1, m.to_vec(), vec![], &[2, 3]).is_err());
    }

    #[test]
    fn grad_norm_and_clipping() {
        let mut a = [3.0f32, 0.0];
        let mut b = [4.0f32];
        assert_eq!(global_grad_norm(&[&a, &b]), 5.0);
        // No clipping when max_norm / (5 + 1e-6) >= 1.
        let n = clip_grad_norm(&mut [&mut a, &mut b], 10.0);
        assert_eq!(n, 5.0);
        assert_eq!((a, b), ([3.0, 0.0], [4.0]));
        // Clipping to 1: coefficient (1 / (5 + 1e-6)) * 1 in f32.
        let n = clip_grad_norm(&mut [&mut a, &mut b], 1.0);
        assert_eq!(n, 5.0);
        let coef = 1.0f32 / (5.0f32 + 1e-6f32);
        assert_eq!(a[0], 3.0 * coef);
        assert_eq!(b[0], 4.0 * coef);
        assert!((global_grad_norm(&[&a, &b]) - 1.0).abs() < 1e-6);
        // Empty input: norm 0, nothing to do.
        assert_eq!(clip_grad_norm(&mut [], 1.0), 0.0);
    }
}
