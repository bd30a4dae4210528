//! LoRA (Hu et al., 2021) with PEFT's names and meaning.
//!
//! For a frozen weight W0 [out, in], an adapter adds `s · B A` with A [r, in], B [out, r] and
//! s = lora_alpha / r (or lora_alpha / √r with rsLoRA): `y = x W0ᵀ + s · (x Aᵀ) Bᵀ`. B starts at
//! zero, so training starts exactly at the base model.

pub mod config;
pub mod peft;

pub use config::{LoraConfig, LoraInit, TargetModules};

use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, Normal};

/// One adapter's tensors on one linear layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeights {
    pub r: usize,
    /// s = alpha / r (or alpha / √r), times any user weight given when the adapter was loaded.
    pub scale: f32,
    /// [r, in]
    pub a: Vec<f32>,
    /// [out, r]
    pub b: Vec<f32>,
}

impl LoraWeights {
    /// A fresh adapter: B = 0, A from `init` (PEFT's default Kaiming-uniform with a = √5, i.e.
    /// U(±1/√in), or the paper's Gaussian with std 1/r as PEFT's `"gaussian"`).
    pub fn init(
        r: usize,
        scale: f32,
        in_features: usize,
        out_features: usize,
        init: LoraInit,
        rng: &mut StdRng,
    ) -> Self {
        let a = match init {
            LoraInit::Kaiming => {
                let bound = 1.0 / (in_features as f32).sqrt();
                (0..r * in_features)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect()
            }
            LoraInit::Gaussian => {
                // std = 1/r > 0 always, so the distribution is valid.
                let normal = Normal::new(0.0f32, 1.0 / r as f32).unwrap_or_else(|_| unreachable!());
                (0..r * in_features).map(|_| normal.sample(rng)).collect()
            }
        };
        LoraWeights {
            r,
            scale,
            a,
            b: vec![0.0; out_features * r],
        }
    }

    /// ΔW = s · B A, [out, in].
    pub fn delta(&self, out_features: usize, in_features: usize) -> Vec<f32> {
        let mut d = vec![0.0f32; out_features * in_features];
        // d[o, i] = Σ_k B[o, k] A[k, i]: B [out, r] · A [r, in], both row-major.
        for o in 0..out_features {
            let row = &mut d[o * in_features..(o + 1) * in_features];
            for k in 0..self.r {
                let bk = self.b[o * self.r + k] * self.scale;
                if bk != 0.0 {
                    for (di, ai) in row
                        .iter_mut()
                        .zip(&self.a[k * in_features..(k + 1) * in_features])
                    {
                        *di += bk * ai;
                    }
                }
            }
        }
        d
    }
}

/// The linear layers an adapter can target: Llama's seven, GPT-2's four (its Conv1D layers;
/// both `c_proj` share one PEFT name), Phi-3's two fused ones. New variants go at the end: the
/// order is the order of an adapter's modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModuleKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    /// GPT-2 `attn.c_attn`: fused q, k, v.
    CAttn,
    /// GPT-2 `attn.c_proj`.
    AttnCProj,
    /// GPT-2 `mlp.c_fc`.
    CFc,
    /// GPT-2 `mlp.c_proj`.
    MlpCProj,
    /// Phi-3 `self_attn.qkv_proj`: fused q, k, v.
    Qkv,
    /// Phi-3 `mlp.gate_up_proj`: fused gate, up.
    GateUp,
}

impl ModuleKind {
    /// The Llama family's modules.
    pub const ALL: [ModuleKind; 7] = [
        ModuleKind::Q,
        ModuleKind::K,
        ModuleKind::V,
        ModuleKind::O,
        ModuleKind::Gate,
        ModuleKind::Up,
        ModuleKind::Down,
    ];

    /// GPT-2's modules, in the order of its module paths.
    pub const GPT2: [ModuleKind; 4] = [
        ModuleKind::CAttn,
        ModuleKind::AttnCProj,
        ModuleKind::CFc,
        ModuleKind::MlpCProj,
    ];

    /// Phi-3's modules (fused projections), in the order of its module paths.
    pub const PHI3: [ModuleKind; 4] = [
        ModuleKind::Qkv,
        ModuleKind::O,
        ModuleKind::GateUp,
        ModuleKind::Down,
    ];

    /// True for GPT-2's Conv1D modules, whose HF weights are stored [in, out].
    pub fn is_gpt2(self) -> bool {
        Self::GPT2.contains(&self)
    }

    /// HF's module name (`q_proj`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ModuleKind::Q => "q_proj",
            ModuleKind::K => "k_proj",
            ModuleKind::V => "v_proj",
            ModuleKind::O => "o_proj",
            ModuleKind::Gate => "gate_proj",
            ModuleKind::Up => "up_proj",
            ModuleKind::Down => "down_proj",
            ModuleKind::CAttn => "c_attn",
            ModuleKind::AttnCProj | ModuleKind::MlpCProj => "c_proj",
            ModuleKind::CFc => "c_fc",
            ModuleKind::Qkv => "qkv_proj",
            ModuleKind::GateUp => "gate_up_proj",
        }
    }

    /// HF's module path, e.g. `model.layers.3.self_attn.q_proj` (Llama) or
    /// `transformer.h.3.attn.c_attn` (GPT-2).
    pub fn path(self, layer: usize) -> String {
        let (stack, block) = match self {
            ModuleKind::Q | ModuleKind::K | ModuleKind::V | ModuleKind::O | ModuleKind::Qkv => {
                ("model.layers", "self_attn")
            }
            ModuleKind::Gate | ModuleKind::Up | ModuleKind::Down | ModuleKind::GateUp => {
                ("model.layers", "mlp")
            }
            ModuleKind::CAttn | ModuleKind::AttnCProj => ("transformer.h", "attn"),
            ModuleKind::CFc | ModuleKind::MlpCProj => ("transformer.h", "mlp"),
        };
        format!("{stack}.{layer}.{block}.{}", self.name())
    }

    /// A Llama-shaped module by its HF name (`q_proj`, ..., Phi-3's `qkv_proj`).
    pub fn from_name(name: &str) -> Option<ModuleKind> {
        ModuleKind::ALL
            .into_iter()
            .chain(ModuleKind::PHI3)
            .find(|k| k.name() == name)
    }
}

/// Identifies one adapted linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleId {
    pub layer: usize,
    pub kind: ModuleKind,
}

impl ModuleId {
    pub fn path(&self) -> String {
        self.kind.path(self.layer)
    }
}

/// What an adapter needs to know of its base model: its linear modules and their shapes. The
/// model side provides it ([`AdapterBase`]), so that this module knows no architecture.
#[derive(Debug, Clone)]
pub struct BaseModules {
    /// The architecture's name, for messages.
    pub arch: &'static str,
    pub num_layers: usize,
    /// Each linear module of a layer: (kind, out_features, in_features), in path order.
    pub modules: Vec<(ModuleKind, usize, usize)>,
    /// The layers are Conv1D (GPT-2), which PEFT records as `fan_in_fan_out`.
    pub conv1d: bool,
}

impl BaseModules {
    pub fn kinds(&self) -> Vec<ModuleKind> {
        self.modules.iter().map(|m| m.0).collect()
    }

    /// [out, in] of module `kind` (0 × 0 for a kind the model lacks, which target resolution
    /// never yields).
    pub fn shape(&self, kind: ModuleKind) -> (usize, usize) {
        self.modules
            .iter()
            .find(|m| m.0 == kind)
            .map_or((0, 0), |m| (m.1, m.2))
    }
}

/// A base model that adapters can be made for and checked against.
pub trait AdapterBase {
    fn base_modules(&self) -> BaseModules;
}
