//! Linear layers, `y = x Wᵀ + b (+ Σ s·(x Aᵀ) Bᵀ for each attached LoRA adapter)` with W stored
//! `[out, in]` as HF stores it.
//!
//! The weight is an enum so that bf16 and quantised storage can join f32 without touching the
//! model code; adapters attach here, so every architecture gets LoRA through its linear layers.

use std::borrow::Cow;

use crate::engine::bf16::{matmul_bf16, matmul_bf16_t, PackedBf16};
use crate::engine::int8_rows::Int8Weight;
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

/// A `--precision` value: where the frozen weights live, and their products' arithmetic (two
/// separate choices: blocks compute in either arithmetic).
///
/// `f32`, `bf16`: the weights in that form (dequantised from a GGUF file's blocks at load);
/// `gguf`: only the GGUF file's quantised blocks, products in the caller's default arithmetic
/// (`train`'s is the fastest here, [`crate::engine::bf16::bf16_native`]); `gguf-f32`,
/// `gguf-bf16`: the blocks with the products' arithmetic forced; `int8`, `gguf-int8`: as `bf16`
/// and `gguf-bf16`, and training's input-gradient products dx = dy·W over 8-bit rows of the
/// weights ([`Int8Weight`], quantised at load) with dy quantised per row (inference has no such
/// product: there they read as `bf16`, `gguf-bf16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrecisionChoice {
    /// Keep the frozen weights only in the GGUF blocks.
    pub blocks: bool,
    /// The products' arithmetic; None for plain `gguf` (the caller's default).
    pub arithmetic: Option<Precision>,
    /// Training's input-gradient products over 8-bit rows.
    pub int8_rows: bool,
}

impl std::str::FromStr for PrecisionChoice {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (blocks, arithmetic, int8_rows) = match s {
            "f32" => (false, Some(Precision::F32), false),
            "bf16" => (false, Some(Precision::Bf16), false),
            "int8" => (false, Some(Precision::Bf16), true),
            "gguf" => (true, None, false),
            "gguf-f32" => (true, Some(Precision::F32), false),
            "gguf-bf16" => (true, Some(Precision::Bf16), false),
            "gguf-int8" => (true, Some(Precision::Bf16), true),
            other => {
                return Err(crate::Error::Invalid(format!(
                    "unknown precision \"{other}\" (f32, bf16, int8, gguf, gguf-f32, gguf-bf16 or gguf-int8)"
                )))
            }
        };
        Ok(PrecisionChoice {
            blocks,
            arithmetic,
            int8_rows,
        })
    }
}

/// The bf16 packing of a frozen weight W [out, in]: laid out for y = x Wᵀ, and read in place
/// for dX = dY W too ([`matmul_bf16_t`]), so that training holds one bf16 copy.
#[derive(Debug, Clone)]
pub struct Bf16Weight {
    pub packed: PackedBf16,
}

impl Bf16Weight {
    /// w: [out, in] row-major.
    pub fn new(w: &[f32], out: usize, inp: usize) -> Self {
        Bf16Weight {
            packed: PackedBf16::for_x_wt(w, out, inp),
        }
    }

    pub fn bytes(&self) -> usize {
        self.packed.bytes()
    }

    /// The packed weight as f32 [out, in]: W rounded to bf16 (bf16 → f32 is exact).
    pub fn unpack(&self) -> Vec<f32> {
        self.packed.unpack_wt()
    }
}

/// An embedding [vocab, hidden] tied to an LM head that runs in bf16, kept beside the head's
/// packing in a form that rebuilds its f32 values bit for bit (the lookups stay exact).
#[derive(Debug, Clone)]
pub struct TiedEmbedding {
    vocab: usize,
    hidden: usize,
    exact: ExactValues,
}

/// What a [`TiedEmbedding`] keeps besides the head's packing.
#[derive(Debug, Clone)]
enum ExactValues {
    /// What the packing rounded away: the low 16 bits of every f32 value and whether its
    /// rounding to bf16 went up, 2⅛ bytes a value instead of 4.
    Split {
        /// The low half of each value's bits, [vocab, hidden].
        low: Vec<u16>,
        /// Bit i: value i's rounding to bf16 carried into its upper half.
        up: Vec<u64>,
        /// Values the rule does not rebuild (the packing flushed a bf16 subnormal to zero, or
        /// a NaN's payload changed): (flat index, value), by index.
        exceptions: Vec<(usize, f32)>,
    },
    /// The quantised blocks the values were dequantised from (a GGUF file's embedding): about
    /// a byte a value for Q8_0, half that for 4-bit types.
    Blocks(QuantMatrix),
}

impl TiedEmbedding {
    /// embedding: [vocab, hidden]; `head` its packing ([`Bf16Weight::new`] of it).
    pub fn new(embedding: &[f32], head: &Bf16Weight, vocab: usize, hidden: usize) -> Self {
        let mut low = vec![0u16; vocab * hidden];
        let mut up = vec![0u64; (vocab * hidden).div_ceil(64)];
        let mut exceptions = Vec::new();
        for (i, &v) in embedding.iter().enumerate() {
            let bits = v.to_bits();
            let hi = head.packed.bits(i % hidden, i / hidden);
            low[i] = bits as u16;
            match hi.wrapping_sub((bits >> 16) as u16) {
                0 => {}
                1 => up[i / 64] |= 1 << (i % 64),
                _ => exceptions.push((i, v)),
            }
        }
        TiedEmbedding {
            vocab,
            hidden,
            exact: ExactValues::Split {
                low,
                up,
                exceptions,
            },
        }
    }

    /// The embedding [vocab, hidden] kept as `blocks`, if they dequantise to it bit for bit
    /// and take fewer bytes than [`TiedEmbedding::new`]'s split; None otherwise.
    pub fn from_blocks(embedding: &[f32], blocks: QuantMatrix) -> Option<Self> {
        use rayon::prelude::*;
        let (vocab, hidden) = (blocks.rows, blocks.cols);
        let split_bytes = vocab * hidden * 2 + (vocab * hidden).div_ceil(64) * 8;
        if embedding.len() != vocab * hidden || hidden == 0 || blocks.bytes() >= split_bytes {
            return None;
        }
        let exact = embedding.par_chunks(hidden).enumerate().all(|(v, want)| {
            let mut row = vec![0.0f32; hidden];
            blocks.dequantize_into(v..v + 1, 0..hidden, &mut row);
            row.iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        });
        exact.then_some(TiedEmbedding {
            vocab,
            hidden,
            exact: ExactValues::Blocks(blocks),
        })
    }

    /// Row `v` [hidden] into `out`, as the f32 embedding held it (bit for bit).
    pub fn row_into(&self, head: &Bf16Weight, v: usize, out: &mut [f32]) {
        let h = self.hidden;
        let (low, up, exceptions) = match &self.exact {
            ExactValues::Blocks(q) => return q.dequantize_into(v..v + 1, 0..h, &mut out[..h]),
            ExactValues::Split {
                low,
                up,
                exceptions,
            } => (low, up, exceptions),
        };
        for (c, o) in out.iter_mut().enumerate().take(h) {
            let i = v * h + c;
            let carry = ((up[i / 64] >> (i % 64)) & 1) as u16;
            let hi = head.packed.bits(c, v).wrapping_sub(carry);
            *o = f32::from_bits(((hi as u32) << 16) | low[i] as u32);
        }
        let at = exceptions.partition_point(|&(i, _)| i < v * h);
        for &(i, val) in exceptions[at..]
            .iter()
            .take_while(|&&(i, _)| i < (v + 1) * h)
        {
            out[i - v * h] = val;
        }
    }

    /// The whole embedding [vocab, hidden] in f32, as it was.
    pub fn to_f32(&self, head: &Bf16Weight) -> Vec<f32> {
        let mut out = vec![0.0f32; self.vocab * self.hidden];
        for (v, row) in out.chunks_exact_mut(self.hidden.max(1)).enumerate() {
            self.row_into(head, v, row);
        }
        out
    }

    /// Bytes held (beside the head's packing).
    pub fn bytes(&self) -> usize {
        match &self.exact {
            ExactValues::Split {
                low,
                up,
                exceptions,
            } => low.len() * 2 + up.len() * 8 + exceptions.len() * 16,
            ExactValues::Blocks(q) => q.bytes(),
        }
    }
}

/// A frozen weight W [out, in] as its products read it.
#[derive(Debug, Clone, Copy)]
pub enum FrozenRef<'a> {
    /// Row-major `[out, in]`.
    F32(&'a [f32]),
    Bf16(&'a Bf16Weight),
    /// A GGUF file's quantised blocks (`--precision gguf`, QLoRA).
    Quant(&'a QuantMatrix),
    /// 8-bit rows (`--precision int8`, `gguf-int8`), for the input gradient only.
    Int8(&'a Int8Weight),
}

/// y = x Wᵀ.  x: [t, in], W: [out, in], y: [t, out].
pub fn frozen_forward(
    y: &mut [f32],
    x: &[f32],
    w: FrozenRef<'_>,
    t: usize,
    inp: usize,
    out: usize,
) {
    match w {
        FrozenRef::Bf16(b) => matmul_bf16(y, x, t, &b.packed, false),
        FrozenRef::F32(w) => matmul_nt(y, x, w, t, inp, out, false),
        FrozenRef::Quant(q) => q.matmul_nt(y, x, t),
        FrozenRef::Int8(q) => q.forward(y, x, t, false),
    }
}

/// dx (+)= dy W.  dy: [t, out], W: [out, in], dx: [t, in].
#[allow(clippy::too_many_arguments)]
pub fn frozen_backward(
    dx: &mut [f32],
    dy: &[f32],
    w: FrozenRef<'_>,
    t: usize,
    inp: usize,
    out: usize,
    accumulate: bool,
) {
    match w {
        FrozenRef::Bf16(b) => matmul_bf16_t(dx, dy, t, &b.packed, accumulate),
        FrozenRef::F32(w) => matmul(dx, dy, false, w, false, t, out, inp, accumulate),
        FrozenRef::Quant(q) => q.matmul_w(dx, dy, t, accumulate),
        FrozenRef::Int8(q) => q.backward(dx, dy, t, accumulate),
    }
}

/// Checks that the CPU can run `precision`: every CPU runs both (bf16 products are emulated,
/// with the instruction's rounding, where AVX512-BF16 is missing).
pub(crate) fn check_precision_supported(_precision: Precision) -> crate::Result<()> {
    Ok(())
}

/// An LM head's weight [vocab, hidden] as its products read it: the untied head's, or the
/// tied packing, or the embedding itself (f32 or blocks).
pub(crate) fn head_weight<'a>(
    untied: Option<&'a Linear>,
    tied_bf16: Option<&'a Bf16Weight>,
    embedding: &'a Weight,
) -> FrozenRef<'a> {
    match (untied, tied_bf16) {
        (Some(l), _) => l.frozen(),
        (None, Some(b)) => FrozenRef::Bf16(b),
        (None, None) => embedding.frozen(),
    }
}

/// How a frozen weight is stored: exactly one form, no copy beside it.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Row-major `[out, in]`.
    F32(Vec<f32>),
    /// Only its bf16 packing ([`Precision::Bf16`] keeps no f32 copy of a weight that only bf16
    /// products read); f32 readers unpack it, exactly.
    Bf16(Box<Bf16Weight>),
    /// A GGUF file's quantised blocks, rows `[out]` of `in` levels (`--precision gguf`, QLoRA):
    /// products dequantise panels on the fly; f32 values are made on demand.
    Quant(QuantMatrix),
}

impl Weight {
    /// The f32 values `[out, in]`: borrowed, or unpacked from bf16 (exact), or dequantised.
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match self {
            Weight::F32(w) => Cow::Borrowed(w),
            Weight::Bf16(b) => Cow::Owned(b.unpack()),
            Weight::Quant(q) => Cow::Owned((0..q.rows).flat_map(|r| q.dequantize_row(r)).collect()),
        }
    }

    /// The blocks, when quantised.
    pub fn quant(&self) -> Option<&QuantMatrix> {
        match self {
            Weight::Quant(q) => Some(q),
            _ => None,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::F32(w) => w.len() * 4,
            Weight::Bf16(b) => b.bytes(),
            Weight::Quant(q) => q.bytes(),
        }
    }

    /// The weight as the frozen-weight products read it.
    pub fn frozen(&self) -> FrozenRef<'_> {
        match self {
            Weight::F32(w) => FrozenRef::F32(w),
            Weight::Bf16(b) => FrozenRef::Bf16(b),
            Weight::Quant(q) => FrozenRef::Quant(q),
        }
    }

    /// The weight as 8-bit rows for the input-gradient product ([`Int8Weight::for_backward`]),
    /// quantised from its values (the blocks' dequantised rows, the bf16 packing's, the f32
    /// ones) row by row, with no f32 copy of blocks. `name` goes into the error for a value
    /// that is not finite.
    pub fn to_int8_rows(&self, out: usize, inp: usize, name: &str) -> crate::Result<Int8Weight> {
        let rows = match self {
            Weight::Quant(q) => {
                Int8Weight::for_backward(out, inp, |r, o| q.dequantize_into(r..r + 1, 0..inp, o))
            }
            Weight::F32(w) => Int8Weight::backward_from_f32(w, out, inp),
            Weight::Bf16(_) => Int8Weight::backward_from_f32(&self.to_f32(), out, inp),
        };
        rows.map_err(|r| {
            crate::Error::Invalid(format!(
                "tensor {name}: row {r} holds a value that is not finite; it cannot be quantised to 8 bits"
            ))
        })
    }

    /// Makes the weight f32 (unpacking bf16, dequantising blocks) and returns it `[out, in]`.
    pub fn make_f32(&mut self) -> &mut Vec<f32> {
        f32_in_place(self)
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
    /// A bf16 packing beside an f32 weight, read by the products: a bf16 layer after merging
    /// (which keeps the merged weight's f32 values for saving).
    pub bf16: Option<Box<Bf16Weight>>,
    /// The weight as 8-bit rows, read by the input-gradient product dx = dy·W only
    /// (`--precision int8`, `gguf-int8`); dropped whenever the weight changes.
    pub int8_backward: Option<Box<Int8Weight>>,
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
            int8_backward: None,
        }
    }

    /// A layer over a weight `[out, in]` in any form.
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
            int8_backward: None,
        }
    }

    /// The weight as f32 `[out, in]`: borrowed, or unpacked from bf16 (exact), or dequantised
    /// from blocks.
    pub fn weight_f32(&self) -> Cow<'_, [f32]> {
        self.weight.to_f32()
    }

    /// The weight as the frozen-weight products read it.
    pub fn frozen(&self) -> FrozenRef<'_> {
        match (&self.weight, &self.bf16) {
            (Weight::F32(_), Some(b)) => FrozenRef::Bf16(b),
            (w, _) => w.frozen(),
        }
    }

    /// Whether every product of the layer is f32 (no bf16 packing, no GGUF blocks).
    pub fn is_f32(&self) -> bool {
        matches!(self.frozen(), FrozenRef::F32(_))
    }

    /// Bytes held by the stored copies of the weight (f32, bf16 packing, GGUF blocks, 8-bit
    /// rows).
    pub fn weight_bytes(&self) -> usize {
        self.weight.bytes()
            + self.bf16.as_ref().map_or(0, |b| b.bytes())
            + self.int8_backward.as_ref().map_or(0, |q| q.bytes())
    }

    /// The f32 weight [out, in] and bias [out] for an optimiser step (full fine-tuning): a
    /// bf16-only weight is unpacked first and blocks are dequantised for good; a bf16 packing
    /// would go stale, so it is dropped (`set_precision` packs again).
    pub fn weight_and_bias_mut(&mut self) -> (&mut [f32], Option<&mut [f32]>) {
        self.bf16 = None;
        self.int8_backward = None;
        (f32_in_place(&mut self.weight), self.bias.as_deref_mut())
    }

    /// The f32 weight `[out, in]` to change in place (bf16 unpacked, blocks dequantised, for
    /// good; a bf16 packing beside it is dropped).
    pub fn weight_f32_mut(&mut self) -> &mut [f32] {
        self.bf16 = None;
        self.int8_backward = None;
        f32_in_place(&mut self.weight)
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
        frozen_forward(y, x, self.frozen(), t, self.in_features, self.out_features);
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.out_features) {
                for (yi, bi) in row.iter_mut().zip(b) {
                    *yi += bi;
                }
            }
        }
    }

    /// The weight as the input-gradient product reads it: its 8-bit rows where
    /// [`Linear::set_int8_backward`] made them, else [`Linear::frozen`].
    pub fn frozen_for_backward(&self) -> FrozenRef<'_> {
        match &self.int8_backward {
            Some(q) => FrozenRef::Int8(q),
            None => self.frozen(),
        }
    }

    /// dx (+)= dy W through the frozen weight.  dy: [T, out] → dx: [T, in].
    pub fn backward_base(&self, dx: &mut [f32], dy: &[f32], accumulate: bool) {
        let t = dy.len() / self.out_features;
        frozen_backward(
            dx,
            dy,
            self.frozen_for_backward(),
            t,
            self.in_features,
            self.out_features,
            accumulate,
        );
    }

    /// Stores the weight for `precision`'s products: bf16 keeps only the packing (the f32
    /// values are dropped); f32 unpacks a bf16-only weight (its values rounded to bf16 for
    /// good: the f32 originals are gone). Blocks stay blocks, their many-row products in
    /// `precision`'s arithmetic.
    pub fn set_precision(&mut self, precision: Precision) {
        if let Weight::Quant(q) = &mut self.weight {
            q.set_bf16_products(precision == Precision::Bf16);
            self.bf16 = None;
            self.int8_backward = None;
            return;
        }
        match precision {
            Precision::F32 => {
                self.bf16 = None;
                self.int8_backward = None;
                f32_in_place(&mut self.weight);
            }
            Precision::Bf16 => {
                if let Weight::F32(w) = &self.weight {
                    let packed = Bf16Weight::new(w, self.out_features, self.in_features);
                    self.weight = Weight::Bf16(Box::new(packed));
                }
                self.bf16 = None;
                self.int8_backward = None;
            }
        }
    }

    /// Adds the weight's 8-bit rows for the input-gradient product ([`Weight::to_int8_rows`];
    /// `name` for the error); the forward keeps reading the weight as it is stored.
    pub fn set_int8_backward(&mut self, name: &str) -> crate::Result<()> {
        let rows = self
            .weight
            .to_int8_rows(self.out_features, self.in_features, name)?;
        self.int8_backward = Some(Box::new(rows));
        Ok(())
    }

    /// The first element of W + sign·Σ s·B A that would not be finite, as (flat index, value);
    /// None when merging is safe (PEFT's `safe_merge`). Leaves the layer unchanged.
    pub fn check_merge(&self, sign: f32) -> Option<(usize, f32)> {
        if self.loras.is_empty() {
            return None;
        }
        let (out, inp) = (self.out_features, self.in_features);
        let mut merged = self.weight_f32().into_owned();
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
    /// −1 unmerges an adapter merged earlier). A bf16 layer keeps the merged weight in f32
    /// (its bf16 values plus the deltas: rounding the sum to bf16 would lose most of a small
    /// delta) beside a new packing for the products.
    pub fn merge_loras(&mut self, sign: f32) {
        let (out, inp) = (self.out_features, self.in_features);
        if self.loras.is_empty() {
            return;
        }
        // Merged values are not on the blocks' grid: a quantised weight becomes f32 here.
        let bf16 = matches!(self.frozen(), FrozenRef::Bf16(_));
        let loras = std::mem::take(&mut self.loras);
        let w = f32_in_place(&mut self.weight);
        for lora in &loras {
            for (wi, di) in w.iter_mut().zip(lora.delta(out, inp)) {
                *wi += sign * di;
            }
        }
        // A packing of the old weight would be stale (the 8-bit rows too: inference after a
        // merge has no backward).
        self.bf16 = bf16.then(|| Box::new(Bf16Weight::new(w, out, inp)));
        self.int8_backward = None;
    }
}

/// The weight's f32 values [out, in], made in place from bf16 (exact) or blocks (dequantised)
/// where it is stored so.
fn f32_in_place(weight: &mut Weight) -> &mut Vec<f32> {
    if !matches!(weight, Weight::F32(_)) {
        *weight = Weight::F32(weight.to_f32().into_owned());
    }
    match weight {
        Weight::F32(w) => w,
        _ => unreachable!("made f32 just above"),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Storage and arithmetic are separate parts of a `--precision` value.
    #[test]
    fn precision_choices_parse_into_storage_and_arithmetic() {
        let c = |s: &str| s.parse::<PrecisionChoice>().unwrap();
        let (f32, bf16) = (Some(Precision::F32), Some(Precision::Bf16));
        assert_eq!((c("f32").blocks, c("f32").arithmetic), (false, f32));
        assert_eq!((c("bf16").blocks, c("bf16").arithmetic), (false, bf16));
        assert_eq!((c("gguf").blocks, c("gguf").arithmetic), (true, None));
        assert_eq!(
            (c("gguf-f32").blocks, c("gguf-f32").arithmetic),
            (true, f32)
        );
        assert_eq!(
            (c("gguf-bf16").blocks, c("gguf-bf16").arithmetic),
            (true, bf16)
        );
        let e = "gguf-f16"
            .parse::<PrecisionChoice>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("gguf-f16") && e.contains("gguf-bf16"), "{e}");
    }

    /// The split storage of a tied embedding gives back every f32 bit pattern, the awkward ones
    /// included: exact ties (rounded down and up to even), carries into the exponent, the
    /// largest finite value rounding to infinity, subnormals (flushed by the packing), zeros of
    /// both signs, infinities and NaNs.
    #[test]
    fn tied_embedding_rebuilds_every_value_bit_for_bit() {
        let special = [
            0.0f32,
            -0.0,
            f32::from_bits(0x3f80_8000), // tie, upper half even: stays
            f32::from_bits(0x3f81_8000), // tie, upper half odd: rounds up
            f32::from_bits(0x3f7f_ffff), // carries into the exponent
            f32::MAX,                    // rounds to infinity
            f32::from_bits(0x0000_1234), // f32 subnormal
            f32::from_bits(0x807f_ffff), // negative subnormal, rounds to the smallest normal
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7fc0_0001), // NaN with a payload in the low half
            1.0,
            -3.5e-3,
        ];
        let (vocab, hidden) = (70, 9);
        let mut e: Vec<f32> = (0..vocab * hidden)
            .map(|i| ((i as u32).wrapping_mul(2654435761) >> 9) as f32 * 1e-6 - 2.0)
            .collect();
        for (i, &v) in special.iter().enumerate() {
            e[i * 41 % (vocab * hidden)] = v;
        }
        let head = Bf16Weight::new(&e, vocab, hidden);
        let split = TiedEmbedding::new(&e, &head, vocab, hidden);
        let back = split.to_f32(&head);
        for (i, (b, v)) in back.iter().zip(&e).enumerate() {
            assert_eq!(b.to_bits(), v.to_bits(), "[{i}]: {b} vs {v}");
        }
        // Beside the packing, a little over half of the f32 bytes.
        assert!(
            split.bytes() < vocab * hidden * 4 * 6 / 10,
            "{}",
            split.bytes()
        );
    }

    /// Blocks replace the split only where they give back every value bit for bit.
    #[test]
    fn tied_embedding_keeps_blocks_only_when_they_are_exact() {
        use crate::io::gguf::GgmlType;
        let (vocab, hidden) = (40, 64);
        let e: Vec<f32> = (0..vocab * hidden)
            .map(|i| ((i as u32).wrapping_mul(2654435761) >> 9) as f32 * 1e-7 - 0.8)
            .collect();
        let bytes = crate::io::gguf::quantize(GgmlType::Q8_0, &e, hidden).unwrap();
        let q = QuantMatrix::from_gguf_blocks(GgmlType::Q8_0, &bytes, vocab, hidden, None, "e")
            .unwrap();
        // Blocks of a lossy quantisation of e are not e.
        assert!(TiedEmbedding::from_blocks(&e, q.clone()).is_none());
        // The values the blocks hold are.
        let mut held = vec![0.0f32; vocab * hidden];
        q.dequantize_into(0..vocab, 0..hidden, &mut held);
        let head = Bf16Weight::new(&held, vocab, hidden);
        let kept = TiedEmbedding::from_blocks(&held, q).expect("exact blocks");
        assert!(kept.bytes() < TiedEmbedding::new(&held, &head, vocab, hidden).bytes());
        let back = kept.to_f32(&head);
        assert!(back
            .iter()
            .zip(&held)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
