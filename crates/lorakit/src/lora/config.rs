//! `LoraConfig`: PEFT's `adapter_config.json` fields with PEFT's meaning.

use std::path::Path;

use regex::Regex;
use serde_json::{json, Map, Value};

use super::{ModuleId, ModuleKind};
use crate::error::{Error, Result};

/// `target_modules`: names matched as suffixes of module paths, one regex matched against the
/// whole path, or every linear layer except the LM head.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(String),
    AllLinear,
}

/// `init_lora_weights`: `true` (Kaiming-uniform A, PEFT's default) or `"gaussian"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInit {
    Kaiming,
    Gaussian,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    pub target_modules: TargetModules,
    pub layers_to_transform: Option<Vec<usize>>,
    /// Per-module rank overrides, in file order; the first key that matches wins.
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alpha overrides, in file order; the first key that matches wins.
    pub alpha_pattern: Vec<(String, f64)>,
    pub use_rslora: bool,
    pub init_lora_weights: LoraInit,
    pub base_model_name_or_path: Option<String>,
    /// PEFT's flag for layers whose weight is stored [in, out] (GPT-2's Conv1D). It never
    /// changes the lora_A / lora_B layouts; lorakit accepts true only for GPT-2 (checked when
    /// the adapter meets a model) and writes true for GPT-2 adapters, as PEFT does.
    pub fan_in_fan_out: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            layers_to_transform: None,
            rank_pattern: vec![],
            alpha_pattern: vec![],
            use_rslora: false,
            init_lora_weights: LoraInit::Kaiming,
            base_model_name_or_path: None,
            fan_in_fan_out: false,
        }
    }
}

/// One adapted module after resolving targets and patterns against a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedTarget {
    pub id: ModuleId,
    pub r: usize,
    pub alpha: f64,
    pub scale: f32,
}

/// A multi-line message (the regex crate draws a caret under the error) as one line.
fn one_line(msg: &str) -> String {
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `re.match(r"(.*\.)?(KEY)$", path)` as PEFT's `get_pattern_key` uses it.
fn pattern_matches(key: &str, path: &str) -> bool {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
        .map(|re| re.is_match(path))
        .unwrap_or(false)
}

impl LoraConfig {
    /// Parses `target_modules` as given on the command line: `all-linear`, a comma-separated
    /// list of names, or (if it contains regex syntax) one regex.
    pub fn parse_targets(s: &str) -> TargetModules {
        let s = s.trim();
        if s == "all-linear" {
            TargetModules::AllLinear
        } else if s.contains(['*', '(', '[', '|', '\\', '^', '$']) {
            TargetModules::Regex(s.to_owned())
        } else {
            TargetModules::Names(
                s.split(',')
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty())
                    .collect(),
            )
        }
    }

    pub fn validate(&self, source: &Path) -> Result<()> {
        if self.r == 0 {
            return Err(Error::config(source, "r", "must be ≥ 1"));
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err(Error::config(
                source,
                "lora_alpha",
                format!("must be > 0, got {}", self.lora_alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::config(
                source,
                "lora_dropout",
                format!("must be in [0, 1), got {}", self.lora_dropout),
            ));
        }
        match &self.target_modules {
            TargetModules::Names(v) if v.is_empty() => {
                return Err(Error::config(source, "target_modules", "is empty"));
            }
            TargetModules::Regex(re) => {
                Regex::new(&format!("^(?:{re})$")).map_err(|e| {
                    Error::config(
                        source,
                        "target_modules",
                        format!("invalid regex: {}", one_line(&e.to_string())),
                    )
                })?;
            }
            _ => {}
        }
        for (k, r) in &self.rank_pattern {
            Regex::new(k).map_err(|e| {
                Error::config(
                    source,
                    format!("rank_pattern.{k}"),
                    format!("invalid regex: {e}"),
                )
            })?;
            if *r == 0 {
                return Err(Error::config(
                    source,
                    format!("rank_pattern.{k}"),
                    "rank must be ≥ 1",
                ));
            }
        }
        for (k, a) in &self.alpha_pattern {
            Regex::new(k).map_err(|e| {
                Error::config(
                    source,
                    format!("alpha_pattern.{k}"),
                    format!("invalid regex: {e}"),
                )
            })?;
            if !(a.is_finite() && *a > 0.0) {
                return Err(Error::config(
                    source,
                    format!("alpha_pattern.{k}"),
                    "alpha must be > 0",
                ));
            }
        }
        Ok(())
    }

    /// The modules of a `num_layers`-layer Llama this config adapts, with their rank and scale.
    /// A target name that matches no module is an error listing the model's modules.
    pub fn resolve(&self, num_layers: usize, source: &Path) -> Result<Vec<ResolvedTarget>> {
        self.resolve_kinds(num_layers, &ModuleKind::ALL, source)
    }

    /// [`LoraConfig::resolve`] for a model whose layers hold the modules `kinds` (e.g.
    /// [`ModuleKind::GPT2`]).
    pub fn resolve_kinds(
        &self,
        num_layers: usize,
        kinds: &[ModuleKind],
        source: &Path,
    ) -> Result<Vec<ResolvedTarget>> {
        self.validate(source)?;
        if let Some(layers) = &self.layers_to_transform {
            if let Some(&bad) = layers.iter().find(|&&l| l >= num_layers) {
                return Err(Error::config(
                    source,
                    "layers_to_transform",
                    format!(
                        "layer {bad} does not exist; the model has layers 0..{}",
                        num_layers - 1
                    ),
                ));
            }
        }
        let available = || {
            let mut names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
            names.dedup();
            names.join(", ")
        };
        let regex = match &self.target_modules {
            TargetModules::Regex(re) => Some(Regex::new(&format!("^(?:{re})$")).map_err(|e| {
                Error::config(source, "target_modules", format!("invalid regex: {e}"))
            })?),
            _ => None,
        };
        if let TargetModules::Names(names) = &self.target_modules {
            for n in names {
                let matches_any = kinds.iter().any(|k| {
                    let p = k.path(0);
                    p == *n || p.ends_with(&format!(".{n}"))
                });
                if !matches_any {
                    return Err(Error::config(
                        source,
                        "target_modules",
                        format!(
                            "\"{n}\" matches no module of this model; its linear modules are: {}",
                            available()
                        ),
                    ));
                }
            }
        }
        let mut out = Vec::new();
        for layer in 0..num_layers {
            if let Some(layers) = &self.layers_to_transform {
                if !layers.contains(&layer) {
                    continue;
                }
            }
            for &kind in kinds {
                let path = kind.path(layer);
                let hit = match &self.target_modules {
                    TargetModules::AllLinear => true,
                    TargetModules::Names(names) => names
                        .iter()
                        .any(|n| path == *n || path.ends_with(&format!(".{n}"))),
                    TargetModules::Regex(_) => regex.as_ref().is_some_and(|re| re.is_match(&path)),
                };
                if !hit {
                    continue;
                }
                let r = self
                    .rank_pattern
                    .iter()
                    .find(|(k, _)| pattern_matches(k, &path))
                    .map_or(self.r, |(_, r)| *r);
                let alpha = self
                    .alpha_pattern
                    .iter()
                    .find(|(k, _)| pattern_matches(k, &path))
                    .map_or(self.lora_alpha, |(_, a)| *a);
                let scale = if self.use_rslora {
                    alpha / (r as f64).sqrt()
                } else {
                    alpha / r as f64
                } as f32;
                out.push(ResolvedTarget {
                    id: ModuleId { layer, kind },
                    r,
                    alpha,
                    scale,
                });
            }
        }
        if out.is_empty() {
            return Err(Error::config(
                source,
                "target_modules",
                format!(
                    "matches no module of this model; its linear modules are: {}",
                    available()
                ),
            ));
        }
        Ok(out)
    }

    /// Parses PEFT's `adapter_config.json`. Options lorakit cannot honour are errors naming the
    /// key, never silently ignored.
    pub fn from_peft_json(path: &Path) -> Result<LoraConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::format(path, "expected a JSON object"))?;
        Self::from_peft_map(obj, path)
    }

    pub fn from_peft_map(obj: &Map<String, Value>, path: &Path) -> Result<LoraConfig> {
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let bad = |k: &str, msg: String| Error::config(path, k, msg);
        match get("peft_type").and_then(Value::as_str) {
            Some("LORA") | None => {}
            Some(other) => {
                return Err(bad(
                    "peft_type",
                    format!("\"{other}\" is not supported (only LORA)"),
                ))
            }
        }
        // Options that change the math: refuse rather than compute something else.
        for (key, ok) in [
            (
                "use_dora",
                get("use_dora").is_none_or(|v| v == &json!(false)),
            ),
            (
                "lora_bias",
                get("lora_bias").is_none_or(|v| v == &json!(false)),
            ),
            (
                "modules_to_save",
                get("modules_to_save").is_none_or(|v| v.as_array().is_some_and(|a| a.is_empty())),
            ),
            ("layer_replication", get("layer_replication").is_none()),
            (
                "use_qalora",
                get("use_qalora").is_none_or(|v| v == &json!(false)),
            ),
            (
                "target_parameters",
                get("target_parameters").is_none_or(|v| v.as_array().is_some_and(|a| a.is_empty())),
            ),
            (
                "trainable_token_indices",
                get("trainable_token_indices").is_none(),
            ),
            (
                "exclude_modules",
                get("exclude_modules").is_none_or(|v| v.as_array().is_some_and(|a| a.is_empty())),
            ),
        ] {
            if !ok {
                return Err(bad(
                    key,
                    format!(
                        "{} is not supported by lorakit",
                        get(key).cloned().unwrap_or_default()
                    ),
                ));
            }
        }
        match get("bias").and_then(Value::as_str) {
            Some("none") | None => {}
            Some(other) => {
                return Err(bad(
                    "bias",
                    format!("\"{other}\" is not supported (only \"none\")"),
                ))
            }
        }
        let r = get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0 && r < 1 << 20)
            .ok_or_else(|| {
                bad(
                    "r",
                    format!(
                        "expected a positive integer, found {}",
                        get("r").cloned().unwrap_or_default()
                    ),
                )
            })? as usize;
        let lora_alpha = match get("lora_alpha") {
            None => 8.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad("lora_alpha", format!("expected a number, found {v}")))?,
        };
        let lora_dropout = match get("lora_dropout") {
            None => 0.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad("lora_dropout", format!("expected a number, found {v}")))?
                as f32,
        };
        let target_modules = match get("target_modules") {
            None => return Err(bad("target_modules", "missing".into())),
            Some(Value::String(s)) if s == "all-linear" => TargetModules::AllLinear,
            Some(Value::String(s)) => TargetModules::Regex(s.clone()),
            Some(Value::Array(a)) => TargetModules::Names(
                a.iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| bad("target_modules", format!("{x} is not a string")))
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(v) => {
                return Err(bad(
                    "target_modules",
                    format!("expected a list or a string, found {v}"),
                ))
            }
        };
        let layers_to_transform = match get("layers_to_transform") {
            None => None,
            Some(Value::Number(n)) => Some(vec![n
                .as_u64()
                .ok_or_else(|| bad("layers_to_transform", format!("{n}")))?
                as usize]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| {
                        x.as_u64().map(|v| v as usize).ok_or_else(|| {
                            bad("layers_to_transform", format!("{x} is not a layer index"))
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(v) => {
                return Err(bad(
                    "layers_to_transform",
                    format!("expected an int or a list, found {v}"),
                ))
            }
        };
        let pattern = |key: &str| -> Result<Vec<(String, f64)>> {
            match get(key) {
                None => Ok(vec![]),
                Some(Value::Object(m)) => m
                    .iter()
                    .map(|(k, v)| {
                        v.as_f64().map(|x| (k.clone(), x)).ok_or_else(|| {
                            bad(
                                &format!("{key}.{k}"),
                                format!("expected a number, found {v}"),
                            )
                        })
                    })
                    .collect(),
                Some(v) => Err(bad(key, format!("expected an object, found {v}"))),
            }
        };
        let rank_pattern = pattern("rank_pattern")?
            .into_iter()
            .map(|(k, r)| {
                if r >= 1.0 && r.fract() == 0.0 {
                    Ok((k, r as usize))
                } else {
                    Err(bad(
                        &format!("rank_pattern.{k}"),
                        format!("rank {r} is not a positive integer"),
                    ))
                }
            })
            .collect::<Result<_>>()?;
        let alpha_pattern = pattern("alpha_pattern")?;
        let use_rslora = match get("use_rslora") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| bad("use_rslora", format!("expected true or false, found {v}")))?,
        };
        let init_lora_weights = match get("init_lora_weights") {
            None => LoraInit::Kaiming,
            Some(Value::Bool(true)) => LoraInit::Kaiming,
            Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
            // A trained adapter's file says how it was initialised; other inits (false, pissa,
            // olora, ...) change nothing once the tensors are loaded, but we cannot re-create them.
            Some(v) => {
                return Err(bad(
                    "init_lora_weights",
                    format!("{v} is not supported (true or \"gaussian\")"),
                ))
            }
        };
        let fan_in_fan_out = match get("fan_in_fan_out") {
            None => false,
            Some(v) => v.as_bool().ok_or_else(|| {
                bad(
                    "fan_in_fan_out",
                    format!("expected true or false, found {v}"),
                )
            })?,
        };
        let cfg = LoraConfig {
            fan_in_fan_out,
            r,
            lora_alpha,
            lora_dropout,
            target_modules,
            layers_to_transform,
            rank_pattern,
            alpha_pattern,
            use_rslora,
            init_lora_weights,
            base_model_name_or_path: get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_owned),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// PEFT's `adapter_config.json` for this config (the fields PEFT 0.21 writes; unset
    /// optional features as PEFT writes them, so `PeftModel.from_pretrained` loads it as is).
    pub fn to_peft_json(&self) -> Value {
        let targets = match &self.target_modules {
            TargetModules::Names(v) => {
                let mut v = v.clone();
                v.sort();
                json!(v)
            }
            TargetModules::Regex(s) => json!(s),
            TargetModules::AllLinear => json!("all-linear"),
        };
        let num = |x: f64| {
            if x.fract() == 0.0 && x.abs() < 1e15 {
                json!(x as i64)
            } else {
                json!(x)
            }
        };
        json!({
            "alpha_pattern": Map::from_iter(self.alpha_pattern.iter().map(|(k, a)| (k.clone(), num(*a)))),
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": self.fan_in_fan_out,
            "inference_mode": true,
            "init_lora_weights": match self.init_lora_weights { LoraInit::Kaiming => json!(true), LoraInit::Gaussian => json!("gaussian") },
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": self.layers_to_transform,
            "loftq_config": {},
            "lora_alpha": num(self.lora_alpha),
            "lora_bias": false,
            "lora_dropout": self.lora_dropout,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": Map::from_iter(self.rank_pattern.iter().map(|(k, r)| (k.clone(), json!(r)))),
            "revision": null,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": self.use_rslora,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("adapter_config.json")
    }

    #[test]
    fn names_match_as_suffixes_and_unknown_names_are_errors() {
        let cfg = LoraConfig::default();
        let t = cfg.resolve(2, p()).unwrap();
        let ids: Vec<String> = t.iter().map(|t| t.id.path()).collect();
        assert_eq!(
            ids,
            [
                "model.layers.0.self_attn.q_proj",
                "model.layers.0.self_attn.v_proj",
                "model.layers.1.self_attn.q_proj",
                "model.layers.1.self_attn.v_proj"
            ]
        );
        assert!(t.iter().all(|t| t.scale == 2.0));
        let bad = LoraConfig {
            target_modules: TargetModules::Names(vec!["q_proj".into(), "query".into()]),
            ..Default::default()
        };
        let e = bad.resolve(2, p()).unwrap_err().to_string();
        assert!(
            e.contains("\"query\"")
                && e.contains("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
            "{e}"
        );
    }

    #[test]
    fn regex_all_linear_layers_and_patterns() {
        let cfg = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: TargetModules::Regex(r".*\.layers\.1\..*(k_proj|down_proj)".into()),
            ..Default::default()
        };
        let t = cfg.resolve(3, p()).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[0].id,
            ModuleId {
                layer: 1,
                kind: ModuleKind::K
            }
        );
        let all = LoraConfig {
            target_modules: TargetModules::AllLinear,
            layers_to_transform: Some(vec![0, 2]),
            ..Default::default()
        };
        assert_eq!(all.resolve(3, p()).unwrap().len(), 14);
        let pat = LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            rank_pattern: vec![
                ("layers.1.self_attn.q_proj".into(), 2),
                ("q_proj".into(), 4),
            ],
            alpha_pattern: vec![("v_proj".into(), 32.0)],
            use_rslora: true,
            ..Default::default()
        };
        let t = pat.resolve(2, p()).unwrap();
        let find = |l, k| {
            t.iter()
                .find(|x| x.id == ModuleId { layer: l, kind: k })
                .unwrap()
                .clone()
        };
        assert_eq!(find(0, ModuleKind::Q).r, 4);
        assert_eq!(find(1, ModuleKind::Q).r, 2);
        assert_eq!(find(1, ModuleKind::V).r, 8);
        assert!((find(1, ModuleKind::V).scale - 32.0 / 8f32.sqrt()).abs() < 1e-6);
        assert!((find(0, ModuleKind::Q).scale - 16.0 / 2.0).abs() < 1e-6);
        let bad_layer = LoraConfig {
            layers_to_transform: Some(vec![5]),
            ..Default::default()
        };
        assert!(bad_layer
            .resolve(2, p())
            .unwrap_err()
            .to_string()
            .contains("layer 5"));
    }

    #[test]
    fn peft_json_round_trip_and_unsupported_options() {
        let cfg = LoraConfig {
            r: 4,
            lora_alpha: 32.0,
            ..Default::default()
        };
        let v = cfg.to_peft_json();
        let back = LoraConfig::from_peft_map(v.as_object().unwrap(), p()).unwrap();
        assert_eq!(back, cfg);
        for (key, val, needle) in [
            ("use_dora", json!(true), "use_dora"),
            ("bias", json!("all"), "bias"),
            ("peft_type", json!("IA3"), "IA3"),
            ("init_lora_weights", json!("pissa"), "init_lora_weights"),
            ("r", json!(0), "'r'"),
            ("target_modules", json!(5), "target_modules"),
        ] {
            let mut m = v.as_object().unwrap().clone();
            m.insert(key.into(), val);
            let e = LoraConfig::from_peft_map(&m, p()).unwrap_err().to_string();
            assert!(
                e.contains(needle) && e.contains("adapter_config.json"),
                "{key}: {e}"
            );
        }
    }
}
