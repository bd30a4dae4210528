//! PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<module path>.lora_A.weight` ([r, in]) and `.lora_B.weight` ([out, r]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use super::config::LoraConfig;
use super::{AdapterBase, LoraWeights, ModuleId};
use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;
use crate::io::safetensors_file::SafetensorsFile;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// A LoRA adapter for a whole model: its config and one [`LoraWeights`] per adapted module.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    pub config: LoraConfig,
    pub modules: BTreeMap<ModuleId, LoraWeights>,
}

pub fn key_a(id: &ModuleId) -> String {
    format!("base_model.model.{}.lora_A.weight", id.path())
}

pub fn key_b(id: &ModuleId) -> String {
    format!("base_model.model.{}.lora_B.weight", id.path())
}

impl Adapter {
    /// A fresh adapter for the model `base`: B = 0, A initialised from `seed`.
    pub fn init(
        mut config: LoraConfig,
        base: &impl AdapterBase,
        seed: u64,
        source: &Path,
    ) -> Result<Adapter> {
        use rand::SeedableRng;
        // PEFT sets fan_in_fan_out for Conv1D targets (GPT-2) and writes it to the config.
        let base = base.base_modules();
        config.fan_in_fan_out = base.conv1d;
        let targets = config.resolve_kinds(base.num_layers, &base.kinds(), source)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let modules = targets
            .iter()
            .map(|t| {
                let (out, inp) = base.shape(t.id.kind);
                (
                    t.id,
                    LoraWeights::init(t.r, t.scale, inp, out, config.init_lora_weights, &mut rng),
                )
            })
            .collect();
        Ok(Adapter { config, modules })
    }

    /// Trainable parameters: Σ r·(in + out) over adapted modules.
    pub fn parameter_count(&self) -> usize {
        self.modules.values().map(|w| w.a.len() + w.b.len()).sum()
    }

    /// Loads a PEFT adapter directory and checks it against the base model: every module the
    /// config targets must have both tensors with the right shapes, and the file must hold
    /// nothing else.
    pub fn load(dir: &Path, base: &impl AdapterBase) -> Result<Adapter> {
        let base = base.base_modules();
        if !dir.is_dir() {
            return Err(Error::format(dir, "not a directory; an adapter is a directory with adapter_config.json and adapter_model.safetensors"));
        }
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(Error::format(
                dir,
                format!("no {CONFIG_FILE} in the adapter directory"),
            ));
        }
        let config = LoraConfig::from_peft_json(&config_path)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.is_file() {
            let hint = if dir.join("adapter_model.bin").is_file() {
                " (adapter_model.bin is a pickle file, which lorakit never loads; convert it to safetensors)"
            } else {
                ""
            };
            return Err(Error::format(
                dir,
                format!("no {WEIGHTS_FILE} in the adapter directory{hint}"),
            ));
        }
        // PEFT forces fan_in_fan_out to match the layer type (with a warning); the tensors'
        // layout is the same either way. lorakit refuses true for nn.Linear models rather than
        // guessing what a writer that set it meant.
        if config.fan_in_fan_out && !base.conv1d {
            return Err(Error::config(
                &config_path,
                "fan_in_fan_out",
                format!(
                    "true is for GPT-2's Conv1D layers; this {} model has nn.Linear layers",
                    base.arch
                ),
            ));
        }
        let file = SafetensorsFile::open(&weights_path)?;
        let targets = config.resolve_kinds(base.num_layers, &base.kinds(), &config_path)?;
        let mut expected = BTreeSet::new();
        let mut modules = BTreeMap::new();
        for t in &targets {
            let (out, inp) = base.shape(t.id.kind);
            let (ka, kb) = (key_a(&t.id), key_b(&t.id));
            let read = |key: &str, want: [usize; 2]| -> Result<Vec<f32>> {
                if !file.contains(key) {
                    return Err(Error::tensor(
                        &weights_path,
                        key,
                        format!("missing: {CONFIG_FILE} targets {}", t.id.path()),
                    ));
                }
                let (data, shape) = file.tensor_f32(key)?;
                if shape != want {
                    return Err(Error::tensor(
                        &weights_path,
                        key,
                        format!("shape {shape:?} does not fit the base model, which needs {want:?} (r = {})", t.r),
                    ));
                }
                if let Some(bad) = data.iter().find(|v| !v.is_finite()) {
                    return Err(Error::tensor(
                        &weights_path,
                        key,
                        format!("holds a non-finite value ({bad})"),
                    ));
                }
                Ok(data)
            };
            let a = read(&ka, [t.r, inp])?;
            let b = read(&kb, [out, t.r])?;
            expected.insert(ka);
            expected.insert(kb);
            modules.insert(
                t.id,
                LoraWeights {
                    r: t.r,
                    scale: t.scale,
                    a,
                    b,
                },
            );
        }
        if let Some(extra) = file.names().into_iter().find(|n| !expected.contains(n)) {
            return Err(Error::tensor(
                &weights_path,
                &extra,
                format!("is not a LoRA tensor of a module that {CONFIG_FILE} targets for this base model"),
            ));
        }
        Ok(Adapter { config, modules })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32) into `dir`, each
    /// atomically, creating `dir` if needed.
    pub fn save(&self, dir: &Path) -> Result<()> {
        // Never write an adapter that PEFT (or our own loader) would turn into NaN outputs.
        for (id, w) in &self.modules {
            for (key, data) in [(key_a(id), &w.a), (key_b(id), &w.b)] {
                if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                    return Err(Error::tensor(
                        dir.join(WEIGHTS_FILE),
                        &key,
                        format!(
                            "element {i} is {}; refusing to write a non-finite adapter",
                            data[i]
                        ),
                    ));
                }
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let bytes = self.safetensors_bytes(dir)?;
        write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
        let json = serde_json::to_string_pretty(&self.config.to_peft_json())
            .map_err(|e| Error::format(dir.join(CONFIG_FILE), e.to_string()))?;
        write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())?;
        Ok(())
    }

    fn safetensors_bytes(&self, dir: &Path) -> Result<Vec<u8>> {
        let mut raw: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (id, w) in &self.modules {
            let inp = w.a.len() / w.r;
            let out = w.b.len() / w.r;
            raw.push((
                key_a(id),
                vec![w.r, inp],
                w.a.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
            raw.push((
                key_b(id),
                vec![out, w.r],
                w.b.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
        }
        let views = raw
            .iter()
            .map(|(k, shape, bytes)| {
                TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| Error::tensor(dir.join(WEIGHTS_FILE), k, e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let metadata = Some(std::collections::HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )]));
        safetensors::serialize(views, metadata)
            .map_err(|e| Error::format(dir.join(WEIGHTS_FILE), e.to_string()))
    }
}
