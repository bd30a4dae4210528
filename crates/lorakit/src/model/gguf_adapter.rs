//! LoRA adapters as llama.cpp's GGUF files (`llama_adapter_lora_init`, `convert_lora_to_gguf.py`).
//!
//! ```text
//! general.architecture = the base's GGUF architecture     general.type = "adapter"
//! adapter.type = "lora"                                    adapter.lora.alpha: f32
//! blk.{i}.{gguf name}.weight.lora_a   [r, in]   (GGUF dims [in, r])
//! blk.{i}.{gguf name}.weight.lora_b   [out, r]  (GGUF dims [r, out])
//! ```
//!
//! llama.cpp adds `scale · B A` with `scale = alpha / r` (r read from lora_b; alpha 0 means
//! scale 1) — one alpha for the whole file. A PEFT adapter whose every module has that scale
//! (same alpha everywhere, any rank pattern, no rsLoRA) is written as it is, alpha = lora_alpha;
//! any other (alpha patterns, rsLoRA, lora_alpha 0) is written with each module's scale folded
//! into B and alpha = 0, so llama.cpp computes the same ΔW. Layers without an adapter simply have
//! no tensors, so `layers_to_transform` needs nothing.
//!
//! Where llama.cpp's converter interleaves the rows of q and k (Llama-arch GGUFs, the weight
//! table's `gguf_permute_qk`), lora_b of q and k is permuted the same way (B's rows are ΔW's
//! rows); reading undoes it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::error::{Error, Result};
use crate::io::gguf::can_quantize;
use crate::io::gguf::{quantize, GgmlType, GgufFile, GgufValue, GgufWriter};
use crate::io::output::OutputFile;
use crate::lora::peft::Adapter;
use crate::lora::{LoraConfig, LoraWeights, ModuleId, ModuleKind, TargetModules};
use crate::model::arch::{self, Slot};
use crate::model::config::{Arch, Config};
use crate::model::load::{permute_rows, unpermute_rows};

/// The metadata key lorakit adds to the GGUF files it writes, so that it recognises them as its
/// own outputs (llama.cpp ignores unknown keys).
pub const LORAKIT_KEY: &str = "lorakit.output";

/// llama.cpp's `general.architecture` for `arch`, or None where lorakit has no GGUF form of it
/// (GPT-2).
pub fn gguf_arch(arch: Arch) -> Option<&'static str> {
    Some(match arch {
        // llama.cpp's converter writes Mistral (MistralForCausalLM) as a llama model.
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Qwen3 => "qwen3",
        Arch::Gemma3 => "gemma3",
        Arch::Phi3 => "phi3",
        Arch::Olmo2 => "olmo2",
        Arch::Gpt2 => return None,
    })
}

/// `general.file_type` (llama.cpp's `llama_ftype`) for a file whose tensors are `dtype`.
pub fn file_type(dtype: GgmlType) -> u32 {
    match dtype {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q8_0 => 7,
        GgmlType::BF16 => 32,
        GgmlType::Q4_K => 15, // MOSTLY_Q4_K_M
        _ => 0,
    }
}

/// The types an adapter can be written in.
pub const ADAPTER_TYPES: [GgmlType; 4] =
    [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0];

/// The number of heads whose q/k rows the GGUF interleaves, for module `kind` of `c`.
fn permuted_heads(c: &Config, kind: ModuleKind) -> Option<usize> {
    if !arch::weights(c.arch).gguf_permute_qk {
        return None;
    }
    match kind {
        ModuleKind::Q => Some(c.num_heads),
        ModuleKind::K => Some(c.num_kv_heads),
        _ => None,
    }
}

/// `blk.{layer}.{gguf name}.weight`, the base tensor an adapter module applies to.
fn base_tensor_name(c: &Config, id: ModuleId, source: &Path) -> Result<String> {
    let table = arch::weights(c.arch);
    let (_, gguf) = table.names(Slot::Linear(id.kind)).ok_or_else(|| {
        Error::unsupported(source, format!("module {} in a GGUF adapter", id.path()))
    })?;
    Ok(format!("blk.{}.{gguf}.weight", id.layer))
}

/// How an adapter was written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GgufAdapterInfo {
    /// `adapter.lora.alpha` as written.
    pub alpha: f32,
    /// Whether each module's scale was folded into B (alpha = 0).
    pub folded: bool,
    /// Modules written.
    pub modules: usize,
}

/// The GGUF adapter file for `adapter` on the model `c`, its tensors in `dtype` (F32, F16, BF16
/// or Q8_0; as llama.cpp's converter, a Q8_0 tensor whose rows are not whole 32-value blocks —
/// lora_b with r < 32 — is written in F16). `source` names the adapter in messages.
pub fn gguf_adapter_bytes(
    adapter: &Adapter,
    c: &Config,
    dtype: GgmlType,
    source: &Path,
) -> Result<(Vec<u8>, GgufAdapterInfo)> {
    let arch_name = gguf_arch(c.arch).ok_or_else(|| {
        Error::unsupported(
            source,
            format!("GGUF adapters for {} models (llama.cpp's GGUF form of this architecture is not supported by lorakit)", c.arch.name()),
        )
    })?;
    if !ADAPTER_TYPES.contains(&dtype) {
        return Err(Error::Invalid(format!(
            "a GGUF adapter is written in f32, f16, bf16 or q8_0, not {}",
            dtype.name().to_lowercase()
        )));
    }
    // One alpha for the file: keep PEFT's lora_alpha when it gives every module its scale.
    let alpha = adapter.config.lora_alpha as f32;
    let llama_scale = |r: usize| alpha / r as f32;
    let folded = alpha == 0.0
        || adapter
            .modules
            .values()
            .any(|w| w.scale != llama_scale(w.r));
    let mut g = GgufWriter::new();
    g.kv_str("general.architecture", arch_name)
        .kv_str("general.type", "adapter")
        .kv_u32("general.file_type", file_type(dtype))
        .kv_u32("general.quantization_version", 2)
        .kv_str("adapter.type", "lora")
        .kv_f32("adapter.lora.alpha", if folded { 0.0 } else { alpha })
        .kv_str(LORAKIT_KEY, "adapter");
    for (id, w) in &adapter.modules {
        let base = base_tensor_name(c, *id, source)?;
        let (out, inp) = c.module_shape(id.kind);
        if w.a.len() != w.r * inp || w.b.len() != out * w.r {
            return Err(Error::tensor(
                source,
                &base,
                format!(
                    "adapter of rank {} does not fit the base module [{out}, {inp}]",
                    w.r
                ),
            ));
        }
        let mut b = w.b.clone();
        if folded {
            b.iter_mut().for_each(|v| *v *= w.scale);
        }
        if let Some(n_head) = permuted_heads(c, id.kind) {
            b = permute_rows(&b, n_head, out, w.r);
        }
        for (suffix, data, shape) in [("lora_a", &w.a, [w.r, inp]), ("lora_b", &b, [out, w.r])] {
            let name = format!("{base}.{suffix}");
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                return Err(Error::tensor(
                    source,
                    &name,
                    format!(
                        "element {i} is {}; refusing to write a non-finite adapter",
                        data[i]
                    ),
                ));
            }
            let t = if can_quantize(dtype, shape[1]) {
                dtype
            } else {
                GgmlType::F16
            };
            let bytes = quantize(t, data, shape[1])
                .map_err(|e| Error::tensor(source, &name, e.to_string()))?;
            g.tensor(&name, &shape, t, bytes);
        }
    }
    let info = GgufAdapterInfo {
        alpha: if folded { 0.0 } else { alpha },
        folded,
        modules: adapter.modules.len(),
    };
    Ok((g.to_bytes(), info))
}

/// Writes [`gguf_adapter_bytes`] to `out` atomically.
pub fn save_gguf_adapter(
    adapter: &Adapter,
    c: &Config,
    dtype: GgmlType,
    out: &OutputFile,
    source: &Path,
) -> Result<GgufAdapterInfo> {
    let (bytes, info) = gguf_adapter_bytes(adapter, c, dtype, source)?;
    out.write(&bytes)?;
    Ok(info)
}

/// True when `path` is a GGUF file lorakit wrote (for replacing its own outputs).
pub fn is_lorakit_gguf(path: &Path) -> bool {
    GgufFile::open(path).is_ok_and(|g| g.get(LORAKIT_KEY).is_some())
}

/// True when `path` is a file that starts with the GGUF magic.
pub fn is_gguf_file(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && magic == *b"GGUF"
}

/// An adapter from a PEFT directory or a GGUF adapter file, checked against the model `c`.
pub fn load_adapter(path: &Path, c: &Config) -> Result<Adapter> {
    if is_gguf_file(path) {
        load_gguf_adapter(path, c)
    } else {
        Adapter::load(path, c)
    }
}

/// Reads a GGUF LoRA adapter for the model `c`. Every key and tensor is checked: general.type
/// "adapter", adapter.type "lora", the base's architecture, an f32 alpha ≥ 0, only
/// `.lora_a` / `.lora_b` pairs of the model's linear modules, with llama.cpp's shapes, finite.
/// Each module's scale is llama.cpp's alpha / r (1 when alpha is 0).
pub fn load_gguf_adapter(path: &Path, c: &Config) -> Result<Adapter> {
    let g = GgufFile::open(path)?;
    let key_str = |k: &str, want: &str| -> Result<()> {
        let v = g.get_str(k)?;
        if v != want {
            return Err(Error::config(
                path,
                k,
                format!("is \"{v}\"; a LoRA adapter has \"{want}\""),
            ));
        }
        Ok(())
    };
    key_str("general.type", "adapter")?;
    key_str("adapter.type", "lora")?;
    let arch_name = gguf_arch(c.arch).ok_or_else(|| {
        Error::unsupported(path, format!("GGUF adapters for {} models", c.arch.name()))
    })?;
    let got = g.get_str("general.architecture")?;
    if got != arch_name {
        return Err(Error::config(
            path,
            "general.architecture",
            format!("is \"{got}\", but the base model is \"{arch_name}\""),
        ));
    }
    if g.get("adapter.alora.invocation_tokens").is_some() {
        return Err(Error::unsupported(
            path,
            "activated LoRA (adapter.alora.invocation_tokens)",
        ));
    }
    let alpha = match g.get("adapter.lora.alpha") {
        None => return Err(Error::config(path, "adapter.lora.alpha", "missing")),
        Some(GgufValue::F32(a)) if a.is_finite() && *a >= 0.0 => *a,
        Some(v) => {
            return Err(Error::config(
                path,
                "adapter.lora.alpha",
                format!("expected a finite f32 ≥ 0, found {}", v.type_name()),
            ))
        }
    };

    // Base tensor name → module, for every linear module the model has.
    let mut by_name = BTreeMap::new();
    for layer in 0..c.num_layers {
        for &kind in c.module_kinds() {
            let id = ModuleId { layer, kind };
            if let Ok(name) = base_tensor_name(c, id, path) {
                by_name.insert(name, id);
            }
        }
    }
    let mut pairs: BTreeMap<ModuleId, (Option<String>, Option<String>)> = BTreeMap::new();
    for t in g.tensors() {
        let (base, is_a) = if let Some(b) = t.name.strip_suffix(".lora_a") {
            (b, true)
        } else if let Some(b) = t.name.strip_suffix(".lora_b") {
            (b, false)
        } else {
            return Err(Error::tensor(
                path,
                &t.name,
                "is not a LoRA tensor (.lora_a / .lora_b); lorakit reads adapters of linear layers only",
            ));
        };
        let id = *by_name.get(base).ok_or_else(|| {
            Error::tensor(
                path,
                &t.name,
                format!(
                    "'{base}' is not a linear layer of this {} model ({} layers)",
                    c.arch.name(),
                    c.num_layers
                ),
            )
        })?;
        let slot = pairs.entry(id).or_default();
        if is_a {
            slot.0 = Some(t.name.clone());
        } else {
            slot.1 = Some(t.name.clone());
        }
    }
    if pairs.is_empty() {
        return Err(Error::format(path, "holds no LoRA tensors"));
    }
    let mut modules = BTreeMap::new();
    for (id, (a_name, b_name)) in pairs {
        let base = base_tensor_name(c, id, path)?;
        let (a_name, b_name) = match (a_name, b_name) {
            (Some(a), Some(b)) => (a, b),
            (None, _) => {
                return Err(Error::tensor(
                    path,
                    format!("{base}.lora_a"),
                    "missing (lora_b is present)",
                ))
            }
            (_, None) => {
                return Err(Error::tensor(
                    path,
                    format!("{base}.lora_b"),
                    "missing (lora_a is present)",
                ))
            }
        };
        let (out, inp) = c.module_shape(id.kind);
        let read = |name: &str| -> Result<(Vec<f32>, Vec<usize>)> {
            let (data, shape) = g.tensor_f32(name)?;
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                return Err(Error::tensor(
                    path,
                    name,
                    format!("element {i} is {} (must be finite)", data[i]),
                ));
            }
            Ok((data, shape))
        };
        let (a, sa) = read(&a_name)?;
        let (b, sb) = read(&b_name)?;
        // lora_b is [out, r] row-major; llama.cpp reads the rank from it.
        let r = if sb.len() == 2 { sb[1] } else { 0 };
        if sb.len() != 2 || sb[0] != out || r == 0 {
            return Err(Error::tensor(
                path,
                &b_name,
                format!(
                    "shape {sb:?} (row-major) does not fit the base module, which needs [{out}, r]"
                ),
            ));
        }
        if sa != [r, inp] {
            return Err(Error::tensor(
                path,
                &a_name,
                format!("shape {sa:?} (row-major) does not fit the base module and lora_b's rank, which need [{r}, {inp}]"),
            ));
        }
        let b = match permuted_heads(c, id.kind) {
            Some(n_head) => unpermute_rows(&b, n_head, out, r),
            None => b,
        };
        let scale = if alpha == 0.0 { 1.0 } else { alpha / r as f32 };
        modules.insert(id, LoraWeights { r, scale, a, b });
    }
    Ok(Adapter {
        config: peft_config(&modules, alpha, c),
        modules,
    })
}

/// The PEFT config that gives `modules` the scales of a GGUF adapter with `alpha`: r the most
/// common rank (rank_pattern for the others), lora_alpha = alpha (alpha 0: alpha = r per
/// module), target_modules the module names with layers_to_transform where every name covers
/// the same layers, else one regex of the module paths.
fn peft_config(modules: &BTreeMap<ModuleId, LoraWeights>, alpha: f32, c: &Config) -> LoraConfig {
    let mut count: BTreeMap<usize, usize> = BTreeMap::new();
    for w in modules.values() {
        *count.entry(w.r).or_default() += 1;
    }
    let r = count
        .iter()
        .max_by_key(|(r, n)| (**n, std::cmp::Reverse(**r)))
        .map_or(8, |(r, _)| *r);
    let esc = |id: &ModuleId| regex::escape(&id.path());
    let rank_pattern = modules
        .iter()
        .filter(|(_, w)| w.r != r)
        .map(|(id, w)| (esc(id), w.r))
        .collect();
    let (lora_alpha, alpha_pattern) = if alpha == 0.0 {
        let pattern = modules
            .iter()
            .filter(|(_, w)| w.r != r)
            .map(|(id, w)| (esc(id), w.r as f64))
            .collect();
        (r as f64, pattern)
    } else {
        (alpha as f64, vec![])
    };
    let kinds: BTreeSet<ModuleKind> = modules.keys().map(|id| id.kind).collect();
    let layers: BTreeSet<usize> = modules.keys().map(|id| id.layer).collect();
    let product = kinds.len() * layers.len() == modules.len();
    let names: Vec<String> = kinds.iter().map(|k| k.name().to_owned()).collect();
    let (target_modules, layers_to_transform) = if product {
        let all = layers.len() == c.num_layers;
        (
            TargetModules::Names(names),
            (!all).then(|| layers.into_iter().collect()),
        )
    } else {
        let alts: Vec<String> = modules.keys().map(esc).collect();
        (TargetModules::Regex(alts.join("|")), None)
    };
    LoraConfig {
        r,
        lora_alpha,
        target_modules,
        layers_to_transform,
        rank_pattern,
        alpha_pattern,
        ..LoraConfig::default()
    }
}
