//! The vocabulary of an architecture's spec: the per-layer tensor slots, the weight-name table
//! type, the model-level tensor names, and typed reads of GGUF keys. The family files and the
//! shared code both use these; nothing here knows a family.

use crate::error::{Error, Result};
use crate::io::gguf::GgufFile;
use crate::lora::ModuleKind;

/// A per-layer norm's place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NormSlot {
    AttnIn,
    AttnOut,
    MlpIn,
    MlpOut,
    /// The q / k norms (per head or over the whole projection).
    Q,
    K,
}

/// One per-layer tensor of an architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Linear(ModuleKind),
    Norm(NormSlot),
}

/// The names of an architecture's tensors. HF names are relative to the layer prefix
/// (`model.layers.{i}.` + name + `.weight` / `.bias`); GGUF names to `blk.{i}.`.
#[derive(Debug, Clone, Copy)]
pub struct WeightTable {
    /// The layer's linear modules (the Llama-shaped families share [`LLAMA_LINEARS`]).
    pub linears: &'static [(Slot, &'static str, &'static str)],
    /// The layer's norms.
    pub norms: &'static [(Slot, &'static str, &'static str)],
    /// llama.cpp's converter interleaves the rows of q and k of Llama-arch models (its RoPE
    /// pairs adjacent elements; HF pairs (i, i + d/2)); undone at load.
    pub gguf_permute_qk: bool,
    /// llama.cpp's converter stores Gemma's norm weights as 1 + w; HF holds w.
    pub gguf_norms_plus_one: bool,
}

impl WeightTable {
    /// The (HF, GGUF) names of `slot`, if the architecture has it.
    pub fn names(&self, slot: Slot) -> Option<(&'static str, &'static str)> {
        self.linears
            .iter()
            .chain(self.norms)
            .find(|(s, _, _)| *s == slot)
            .map(|&(_, hf, gguf)| (hf, gguf))
    }
}

/// An architecture's HF names outside the layers, and how its linears are stored.
#[derive(Debug, Clone, Copy)]
pub struct ModelNames {
    pub embed: &'static str,
    /// The learned position table, where the architecture has one.
    pub positions: Option<&'static str>,
    /// The final norm, without `.weight` / `.bias`.
    pub final_norm: &'static str,
    pub head: &'static str,
    /// The layer prefix: `{layers}.{i}.` + the table's name.
    pub layers: &'static str,
    /// Linear weights stored [in, out] (GPT-2's Conv1D), transposed at load and save.
    pub conv1d: bool,
}

/// The Llama-shaped families' names.
pub const LLAMA_NAMES: ModelNames = ModelNames {
    embed: EMBED.0,
    positions: None,
    final_norm: "model.norm",
    head: HEAD.0,
    layers: HF_LAYERS,
    conv1d: false,
};

/// Model-level tensors, the same in every Llama-shaped family: (HF, GGUF).
pub const EMBED: (&str, &str) = ("model.embed_tokens.weight", "token_embd.weight");
pub const FINAL_NORM: (&str, &str) = ("model.norm.weight", "output_norm.weight");
pub const HEAD: (&str, &str) = ("lm_head.weight", "output.weight");
pub const HF_LAYERS: &str = "model.layers";

/// The attention and MLP linears of the Llama-shaped families, with llama.cpp's names.
pub const LLAMA_LINEARS: [(Slot, &str, &str); 7] = [
    (Slot::Linear(ModuleKind::Q), "self_attn.q_proj", "attn_q"),
    (Slot::Linear(ModuleKind::K), "self_attn.k_proj", "attn_k"),
    (Slot::Linear(ModuleKind::V), "self_attn.v_proj", "attn_v"),
    (
        Slot::Linear(ModuleKind::O),
        "self_attn.o_proj",
        "attn_output",
    ),
    (Slot::Linear(ModuleKind::Gate), "mlp.gate_proj", "ffn_gate"),
    (Slot::Linear(ModuleKind::Up), "mlp.up_proj", "ffn_up"),
    (Slot::Linear(ModuleKind::Down), "mlp.down_proj", "ffn_down"),
];

/// Typed reads of a GGUF file's `{arch}.*` keys; every error names the file and the key.
pub struct GgufKeys<'a> {
    pub gguf: &'a GgufFile,
    pub arch: &'a str,
}

impl GgufKeys<'_> {
    pub fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    pub fn has(&self, k: &str) -> bool {
        self.gguf.get(&self.key(k)).is_some()
    }

    pub fn usize(&self, k: &str) -> Result<usize> {
        let n = self.gguf.get_u64(&self.key(k))?;
        if n == 0 || n >= (1 << 32) {
            return Err(Error::config(
                self.gguf.path(),
                self.key(k),
                format!("implausible value {n}"),
            ));
        }
        Ok(n as usize)
    }

    pub fn usize_or(&self, k: &str, default: usize) -> Result<usize> {
        if self.has(k) {
            self.usize(k)
        } else {
            Ok(default)
        }
    }

    pub fn f32(&self, k: &str) -> Result<f32> {
        self.gguf.get_f32(&self.key(k))
    }

    pub fn f32_or(&self, k: &str, default: f32) -> Result<f32> {
        if self.has(k) {
            self.f32(k)
        } else {
            Ok(default)
        }
    }
}
