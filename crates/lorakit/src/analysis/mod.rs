//! The LoRA paper's analyses (Hu et al., 2021, sections 7.2 and 7.3): subspace similarity
//! between learned adapters ([`subspace`]) and how ΔW amplifies directions of W0
//! ([`amplification`]).
//!
//! All linear algebra here is f64 through `nalgebra` (thin SVD, QR): the matrices are small
//! (r × k with k ≤ a few thousand), and f64 keeps the comparisons with NumPy at 1e-12 level.

pub mod amplification;
pub mod heatmap;
pub mod subspace;

use std::collections::BTreeMap;
use std::path::Path;

use nalgebra::DMatrix;

use crate::error::{Error, Result};
use crate::io::safetensors_file::SafetensorsFile;
use crate::lora::config::LoraConfig;
use crate::lora::peft::{CONFIG_FILE, WEIGHTS_FILE};
use crate::lora::{ModuleId, ModuleKind};

/// One adapted module's factors as stored, without a base model to check them against.
#[derive(Debug, Clone)]
pub struct Factors {
    pub r: usize,
    /// Rows of W (`out`) and columns (`in`).
    pub out: usize,
    pub inp: usize,
    /// s = alpha / r (or alpha / √r), from `adapter_config.json`.
    pub scale: f64,
    /// [r, in], row-major.
    pub a: Vec<f32>,
    /// [out, r], row-major.
    pub b: Vec<f32>,
}

/// Reads a PEFT adapter directory's factors by tensor name alone (the analyses need no base
/// model): every `…layers.N.<block>.<module>.lora_A.weight` with its `lora_B` twin. Shapes
/// must agree with each other (A [r, in], B [out, r]) and with the config's rank for that module.
pub fn load_factors(dir: &Path) -> Result<BTreeMap<ModuleId, Factors>> {
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(Error::format(
            dir,
            format!("no {CONFIG_FILE}: not a PEFT adapter directory"),
        ));
    }
    let config = LoraConfig::from_peft_json(&config_path)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.is_file() {
        return Err(Error::format(dir, format!("no {WEIGHTS_FILE}")));
    }
    let file = SafetensorsFile::open(&weights_path)?;
    let re = regex::Regex::new(
        r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.([a-z_]+)\.lora_A\.weight$",
    )
    .map_err(|e| Error::Invalid(e.to_string()))?;
    let mut out = BTreeMap::new();
    for name in file.names() {
        let Some(c) = re.captures(&name) else {
            continue;
        };
        let layer: usize = c[1]
            .parse()
            .map_err(|_| Error::tensor(&weights_path, &name, "layer index out of range"))?;
        let kind = ModuleKind::from_name(&c[2]).ok_or_else(|| {
            Error::tensor(
                &weights_path,
                &name,
                "not a Llama linear module lorakit knows",
            )
        })?;
        let id = ModuleId { layer, kind };
        let b_name = name.replace(".lora_A.", ".lora_B.");
        if !file.contains(&b_name) {
            return Err(Error::tensor(
                &weights_path,
                &b_name,
                "missing (its lora_A is present)",
            ));
        }
        let (a, sa) = file.tensor_f32(&name)?;
        let (b, sb) = file.tensor_f32(&b_name)?;
        if sa.len() != 2 || sb.len() != 2 || sa[0] != sb[1] || sa[0] == 0 {
            return Err(Error::tensor(
                &weights_path,
                &name,
                format!("lora_A {sa:?} and lora_B {sb:?} are not [r, in] and [out, r]"),
            ));
        }
        let r = sa[0];
        if let Some(v) = a.iter().chain(&b).find(|v| !v.is_finite()) {
            return Err(Error::tensor(
                &weights_path,
                &name,
                format!("holds a non-finite value ({v})"),
            ));
        }
        out.insert(
            id,
            Factors {
                r,
                out: sb[0],
                inp: sa[1],
                scale: 0.0,
                a,
                b,
            },
        );
    }
    let Some(max_layer) = out.keys().map(|id| id.layer).max() else {
        return Err(Error::format(
            &weights_path,
            "holds no lora_A/lora_B tensor of a Llama layer",
        ));
    };
    // Ranks and scales as PEFT computes them (rank/alpha patterns, rsLoRA), checked against
    // the tensors' shapes.
    let resolved = config.resolve(max_layer + 1, &config_path)?;
    for (id, f) in out.iter_mut() {
        let t = resolved.iter().find(|t| t.id == *id).ok_or_else(|| {
            Error::tensor(
                &weights_path,
                crate::lora::peft::key_a(id),
                format!("{CONFIG_FILE} does not target this module"),
            )
        })?;
        if t.r != f.r {
            return Err(Error::tensor(
                &weights_path,
                crate::lora::peft::key_a(id),
                format!("has rank {} but {CONFIG_FILE} says r = {}", f.r, t.r),
            ));
        }
        f.scale = if config.use_rslora {
            t.alpha / (t.r as f64).sqrt()
        } else {
            t.alpha / t.r as f64
        };
    }
    Ok(out)
}

/// A row-major f32 matrix [rows, cols] as an f64 nalgebra matrix.
pub fn to_dmatrix(m: &[f32], rows: usize, cols: usize) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |i, j| f64::from(m[i * cols + j]))
}

/// Thin SVD with the singular triplets sorted by descending singular value
/// (nalgebra documents sorting, but it has shipped unsorted results, so we sort ourselves).
/// m: [rows, cols] -> (U [rows, p], σ [p], V [cols, p]) with p = min(rows, cols).
pub fn sorted_svd(m: &DMatrix<f64>) -> Result<(DMatrix<f64>, Vec<f64>, DMatrix<f64>)> {
    let svd = m.clone().svd(true, true);
    let (Some(u), Some(v_t)) = (svd.u, svd.v_t) else {
        return Err(Error::Invalid(
            "SVD did not produce singular vectors".into(),
        ));
    };
    let s = svd.singular_values;
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.sort_by(|&i, &j| s[j].total_cmp(&s[i]));
    let u = DMatrix::from_fn(u.nrows(), order.len(), |r, c| u[(r, order[c])]);
    let v = DMatrix::from_fn(v_t.ncols(), order.len(), |r, c| v_t[(order[c], r)]);
    Ok((u, order.iter().map(|&i| s[i]).collect(), v))
}

/// Singular values only, descending. m: [rows, cols] -> σ [min(rows, cols)].
pub fn singular_values(m: &DMatrix<f64>) -> Vec<f64> {
    let mut s: Vec<f64> = m
        .clone()
        .singular_values_unordered()
        .iter()
        .copied()
        .collect();
    s.sort_by(|a, b| b.total_cmp(a));
    s
}

/// A seeded standard-Gaussian matrix [rows, cols] (the random baselines).
pub fn gaussian(rows: usize, cols: usize, seed: u64) -> DMatrix<f64> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Row-major fill so that the matrix does not depend on nalgebra's storage order.
    let data: Vec<f64> = (0..rows * cols)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    DMatrix::from_row_slice(rows, cols, &data)
}

/// A CSV field: quoted only when it needs to be.
pub(crate) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}
