//! Linear layers, `y = x Wᵀ + b (+ Σ s·(x Aᵀ) Bᵀ for each attached LoRA adapter)` with W stored
//! `[out, in]` as HF stores it.
//!
//! The weight is an enum so that bf16 and quantised storage can join f32 without touching the
//! model code; adapters attach here, so every architecture gets LoRA through its linear layers.

use std::borrow::Cow;

use crate::engine::bf16::{matmul_bf16, PackedBf16};
use crate::engine::quant::QuantMatrix;
use crate::engine::{matmul, matmul_nt};
use crate::lora::LoraWeights;

/// Arithmetic of the frozen-weight products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 weights and products: the exactness tests' path.
    F32,
    /// Weights rounded once to bf16, activations rounded per product, f32 accumulation.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(crate::Error::Invalid(format!(
                "unknown precision \"{other}\" (f32 or bf16)"
            ))),
        }
    }
}

/// bf16 copies of a frozen weight W [out, in], packed for the two products that use it.
#[derive(Debug, Clone)]
pub struct Bf16Weight {
    /// For y = x Wᵀ.
    pub forward: PackedBf16,
    /// For dX = dY W (training only).
    pub backward: Option<PackedBf16>,
}

impl Bf16Weight {
    pub fn new(w: &[f32], out: usize, inp: usize, training: bool) -> Self {
        Bf16Weight {
            forward: PackedBf16::for_x_wt(w, out, inp),
            backward: training.then(|| PackedBf16::for_x_w(w, out, inp)),
        }
    }

    pub fn bytes(&self) -> usize {
        self.forward.bytes() + self.backward.as_ref().map_or(0, |b| b.bytes())
    }
}

/// y = x Wᵀ.  x: [t, in], W: [out, in] (or its bf16 packing), y: [t, out].
pub fn frozen_forward(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    bf16: Option<&Bf16Weight>,
    t: usize,
    inp: usize,
    out: usize,
) {
    match bf16 {
        Some(b) => matmul_bf16(y, x, t, &b.forward, false),
        None => matmul_nt(y, x, w, t, inp, out, false),
    }
}

/// dx (+)= dy W.  dy: [t, out], W: [out, in] (or its bf16 packing), dx: [t, in].
#[allow(clippy::too_many_arguments)]
pub fn frozen_backward(
    dx: &mut [f32],
    dy: &[f32],
    w: &[f32],
    bf16: Option<&Bf16Weight>,
    t: usize,
    inp: usize,
    out: usize,
    accumulate: bool,
) {
    match bf16.and_then(|b| b.backward.as_ref()) {
        Some(packed) => matmul_bf16(dx, dy, t, packed, accumulate),
        None => matmul(dx, dy, false, w, false, t, out, inp, accumulate),
    }
}

/// Checks that the CPU can run `precision`: every CPU runs both (bf16 products are emulated,
/// with the instruction's rounding, where AVX512-BF16 is missing).
pub(crate) fn check_precision_supported(_precision: Precision) -> crate::Result<()> {
    Ok(())
}

/// Sets an LM head's precision: an untied head is a [`Linear`]; a head tied to an f32
/// embedding `embedding` [vocab, hidden] gets its own bf16 packing in `tied_bf16` (None in f32,
/// and for blocks, which compute as they are).
pub(crate) fn set_head_precision(
    untied: Option<&mut Linear>,
    tied_bf16: &mut Option<Box<Bf16Weight>>,
    embedding: &Weight,
    vocab: usize,
    hidden: usize,
    precision: Precision,
    training: bool,
) {
    match untied {
        Some(head) => head.set_precision(precision, training),
        None => {
            *tied_bf16 = match (precision, embedding) {
                (Precision::Bf16, Weight::F32(e)) => {
                    Some(Box::new(Bf16Weight::new(e, vocab, hidden, training)))
                }
                _ => None,
            };
        }
    }
}

/// How a frozen weight is stored: exactly one form, no copy beside it.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Row-major `[out, in]`.
    F32(Vec<f32>),
    /// A GGUF file's quantised blocks, rows `[out]` of `in` levels (`--precision gguf`, QLoRA):
    /// products dequantise panels on the fly; f32 values are made on demand.
    Quant(QuantMatrix),
}

impl Weight {
    /// The f32 values `[out, in]`: borrowed, or dequantised (a new `[out, in]` buffer).
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match self {
            Weight::F32(w) => Cow::Borrowed(w),
            Weight::Quant(q) => Cow::Owned((0..q.rows).flat_map(|r| q.dequantize_row(r)).collect()),
        }
    }

    /// The blocks, when quantised.
    pub fn quant(&self) -> Option<&QuantMatrix> {
        match self {
            Weight::Quant(q) => Some(q),
            Weight::F32(_) => None,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::F32(w) => w.len() * 4,
            Weight::Quant(q) => q.bytes(),
        }
    }

    /// y = x Wᵀ.  x: [t, in], y: [t, out]; `bf16` is the F32 weight's packing, if any.
    pub fn forward(&self, y: &mut [f32], x: &[f32], bf16: Option<&Bf16Weight>, t: usize) {
        match self {
            Weight::Quant(q) => q.matmul_nt(y, x, t),
            Weight::F32(w) => {
                let inp = x.len() / t.max(1);
                frozen_forward(y, x, w, bf16, t, inp, w.len() / inp.max(1))
            }
        }
    }

    /// dx (+)= dy W.  dy: [t, out], dx: [t, in]; `bf16` is the F32 weight's packing, if any.
    pub fn backward(
        &self,
        dx: &mut [f32],
        dy: &[f32],
        bf16: Option<&Bf16Weight>,
        t: usize,
        accumulate: bool,
    ) {
        match self {
            Weight::Quant(q) => q.matmul_w(dx, dy, t, accumulate),
            Weight::F32(w) => {
                let inp = dx.len() / t.max(1);
                frozen_backward(dx, dy, w, bf16, t, inp, w.len() / inp.max(1), accumulate)
            }
        }
    }

    /// Makes the weight f32 (dequantising blocks) and returns it `[out, in]`.
    pub fn make_f32(&mut self) -> &mut Vec<f32> {
        if let Weight::Quant(_) = self {
            *self = Weight::F32(self.to_f32().into_owned());
        }
        match self {
            Weight::F32(w) => w,
            Weight::Quant(_) => unreachable!("made f32 just above"),
        }
    }
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
    /// bf16 packing of an f32 weight when the model runs in [`Precision::Bf16`].
    pub bf16: Option<Box<Bf16Weight>>,
}

impl Linear {
    pub fn new(
        weight: Vec<f32>,
        out_features: usize,
        in_features: usize,
        bias: Option<Vec<f32>>,
    ) -> Self {
        debug_assert_eq!(weight.len(), out_features * in_features);
        Linear {
            out_features,
            in_features,
            weight: Weight::F32(weight),
            bias,
            loras: Vec::new(),
            bf16: None,
        }
    }

    /// A layer over a weight `[out, in]` in either form.
    pub fn from_weight(
        weight: Weight,
        out_features: usize,
        in_features: usize,
        bias: Option<Vec<f32>>,
    ) -> Self {
        Linear {
            out_features,
            in_features,
            weight,
            bias,
            loras: Vec::new(),
            bf16: None,
        }
    }

    /// The weight as f32 `[out, in]`: borrowed, or dequantised from blocks on demand.
    pub fn weight_f32(&self) -> Cow<'_, [f32]> {
        self.weight.to_f32()
    }

    /// The f32 weight [out, in] and bias [out] for an optimiser step (full fine-tuning). A bf16
    /// packing would go stale, so it is dropped (`set_precision` packs again); blocks are
    /// dequantised to f32 for good.
    pub fn weight_and_bias_mut(&mut self) -> (&mut [f32], Option<&mut [f32]>) {
        self.bf16 = None;
        (self.weight.make_f32(), self.bias.as_deref_mut())
    }

    /// The f32 weight `[out, in]` to change in place (blocks are dequantised to f32 for good).
    pub fn weight_f32_mut(&mut self) -> &mut [f32] {
        self.weight.make_f32()
    }

    /// dx (+)= dy W, the frozen weight's share of the input gradient.  dy: [t, out] → dx:
    /// [t, in].
    pub fn backward_base(&self, dx: &mut [f32], dy: &[f32], t: usize, accumulate: bool) {
        self.weight
            .backward(dx, dy, self.bf16.as_deref(), t, accumulate);
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
        self.weight.forward(y, x, self.bf16.as_deref(), t);
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.out_features) {
                for (yi, bi) in row.iter_mut().zip(b) {
                    *yi += bi;
                }
            }
        }
    }

    /// Packs (or drops) the bf16 copy of an f32 weight (blocks compute as they are).
    pub fn set_precision(&mut self, precision: Precision, training: bool) {
        self.bf16 = match (precision, &self.weight) {
            (_, Weight::Quant(_)) | (Precision::F32, _) => None,
            (Precision::Bf16, Weight::F32(w)) => Some(Box::new(Bf16Weight::new(
                w,
                self.out_features,
                self.in_features,
                training,
            ))),
        };
    }

    /// The first element of W + sign·Σ s·B A that would not be finite, as (flat index, value);
    /// None when merging is safe (PEFT's `safe_merge`). Leaves the layer unchanged.
    pub fn check_merge(&self, sign: f32) -> Option<(usize, f32)> {
        let (out, inp) = (self.out_features, self.in_features);
        let mut merged = self.weight_f32().to_vec();
        for lora in &self.loras {
            for (wi, di) in merged.iter_mut().zip(lora.delta(out, inp)) {
                *wi += sign * di;
            }
        }
        merged
            .iter()
            .position(|v| !v.is_finite())
            .map(|i| (i, merged[i]))
    }

    /// W += sign · s·B A for every attached adapter, then detaches them (sign = +1 merges,
    /// −1 unmerges an adapter merged earlier).
    pub fn merge_loras(&mut self, sign: f32) {
        let (out, inp) = (self.out_features, self.in_features);
        // Merged values are not on the blocks' grid: a quantised weight becomes f32 here
        // (weight_f32_mut), only when there is something to merge.
        let loras = std::mem::take(&mut self.loras);
        // A bf16 packing of the old weight would be stale.
        let repack = self.bf16.as_ref().map(|b| b.backward.is_some());
        if loras.is_empty() {
            return;
        }
        let w = self.weight_f32_mut();
        for lora in &loras {
            for (wi, di) in w.iter_mut().zip(lora.delta(out, inp)) {
                *wi += sign * di;
            }
        }
        if let Some(training) = repack.filter(|_| !loras.is_empty()) {
            self.set_precision(Precision::Bf16, training);
        }
    }
}

/// y += s · (x Aᵀ) Bᵀ, leaving x Aᵀ [T, r] in `xa`.
///
/// x: [T, in], A: [r, in], B: [out, r], y: [T, out].
pub fn lora_forward(
    y: &mut [f32],
    x: &[f32],
    lora: &LoraWeights,
    xa: &mut [f32],
    t: usize,
    inp: usize,
    out: usize,
) {
    matmul_nt(xa, x, &lora.a, t, inp, lora.r, false);
    // Scale the small [T, r] product rather than the [T, out] one.
    let scaled: Vec<f32> = xa.iter().map(|v| v * lora.scale).collect();
    matmul_nt(y, &scaled, &lora.b, t, lora.r, out, true);
}
