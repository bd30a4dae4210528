//! Normalised subspace similarity (the paper's section 7.2, equation 4):
//! φ(A1, A2, i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j) ∈ [0, 1], where U·[:, :i] holds the
//! top-i right singular vectors of A (A is [r, in]: its row space lives in the input space) or,
//! for B ([out, r]), the top-i left singular vectors (the output space). 1 means the smaller
//! subspace lies inside the larger one; two random i- and j-dimensional subspaces of ℝⁿ give
//! about max(i, j)/n.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use nalgebra::DMatrix;

use super::{csv_field, gaussian, sorted_svd, to_dmatrix, Factors};
use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;
use crate::io::output::{prepare_output_dir_with, OutputDir};
use crate::lora::{ModuleId, ModuleKind};

/// Which LoRA factor's singular vectors span the compared subspaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    A,
    B,
}

impl std::str::FromStr for Factor {
    type Err = Error;
    fn from_str(s: &str) -> Result<Factor> {
        match s {
            "A" | "a" => Ok(Factor::A),
            "B" | "b" => Ok(Factor::B),
            other => Err(Error::Invalid(format!(
                "--matrix must be A or B, got \"{other}\""
            ))),
        }
    }
}

/// φ for one module present in both adapters, and the same against a random matrix.
#[derive(Debug, Clone)]
pub struct ModuleSimilarity {
    pub id: ModuleId,
    /// Number of singular directions of the first / second adapter (min(r, dim)).
    pub p1: usize,
    pub p2: usize,
    /// [p1, p2] row-major: `phi[(i-1) * p2 + (j-1)]` = φ(i, j).
    pub phi: Vec<f64>,
    /// φ between the first adapter and a standard-Gaussian matrix of the second's shape.
    pub phi_random: Vec<f64>,
}

impl ModuleSimilarity {
    /// φ(i, j), both 1-based.
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.phi[(i - 1) * self.p2 + (j - 1)]
    }
    pub fn random_at(&self, i: usize, j: usize) -> f64 {
        self.phi_random[(i - 1) * self.p2 + (j - 1)]
    }
}

/// The subspace basis of one factor, as orthonormal columns.
/// A: [r, in] -> V [in, min(r, in)] (right singular vectors);
/// B: [out, r] -> U [out, min(out, r)] (left singular vectors).
pub fn basis(f: &Factors, which: Factor) -> Result<DMatrix<f64>> {
    match which {
        Factor::A => Ok(sorted_svd(&to_dmatrix(&f.a, f.r, f.inp))?.2),
        Factor::B => Ok(sorted_svd(&to_dmatrix(&f.b, f.out, f.r))?.0),
    }
}

/// φ(i, j) for every 1 ≤ i ≤ p1, 1 ≤ j ≤ p2.
/// u1: [n, p1], u2: [n, p2], orthonormal columns sorted by singular value -> [p1, p2] row-major.
pub fn phi_grid(u1: &DMatrix<f64>, u2: &DMatrix<f64>) -> Vec<f64> {
    // ‖U1[:, :i]ᵀ U2[:, :j]‖²_F is a 2-D prefix sum of the squared entries of G = U1ᵀ U2.
    let g = u1.transpose() * u2;
    let (p1, p2) = (g.nrows(), g.ncols());
    let mut prefix = vec![0.0f64; (p1 + 1) * (p2 + 1)];
    for i in 1..=p1 {
        for j in 1..=p2 {
            let v = g[(i - 1, j - 1)];
            prefix[i * (p2 + 1) + j] =
                v * v + prefix[(i - 1) * (p2 + 1) + j] + prefix[i * (p2 + 1) + j - 1]
                    - prefix[(i - 1) * (p2 + 1) + j - 1];
        }
    }
    let mut out = Vec::with_capacity(p1 * p2);
    for i in 1..=p1 {
        for j in 1..=p2 {
            out.push(prefix[i * (p2 + 1) + j] / i.min(j) as f64);
        }
    }
    out
}

/// Compares every module present in both adapters (optionally only `module` / `layer`).
/// The random baseline for a module is a seeded Gaussian matrix of the second adapter's
/// factor shape, so it has the same rank and ambient dimension.
pub fn compare(
    first: &BTreeMap<ModuleId, Factors>,
    second: &BTreeMap<ModuleId, Factors>,
    module: Option<ModuleKind>,
    layer: Option<usize>,
    which: Factor,
    seed: u64,
) -> Result<Vec<ModuleSimilarity>> {
    let mut out = Vec::new();
    for (id, f1) in first {
        if module.is_some_and(|m| m != id.kind) || layer.is_some_and(|l| l != id.layer) {
            continue;
        }
        let Some(f2) = second.get(id) else { continue };
        let (dim1, dim2) = match which {
            Factor::A => (f1.inp, f2.inp),
            Factor::B => (f1.out, f2.out),
        };
        if dim1 != dim2 {
            return Err(Error::Invalid(format!(
                "{}: the adapters' {which:?} factors live in spaces of different dimension ({dim1} vs {dim2}); are they for the same base model?",
                id.path()
            )));
        }
        let u1 = basis(f1, which)?;
        let u2 = basis(f2, which)?;
        // Random matrix of the second factor's shape: [r2, in] for A, [out, r2] for B.
        let module_seed =
            seed ^ ((id.layer as u64) << 8 | id.kind as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let random = match which {
            Factor::A => sorted_svd(&gaussian(f2.r, f2.inp, module_seed))?.2,
            Factor::B => sorted_svd(&gaussian(f2.out, f2.r, module_seed))?.0,
        };
        out.push(ModuleSimilarity {
            id: *id,
            p1: u1.ncols(),
            p2: u2.ncols(),
            phi: phi_grid(&u1, &u2),
            phi_random: phi_grid(&u1, &random),
        });
    }
    if out.is_empty() {
        return Err(Error::Invalid(
            "the two adapters have no adapted module in common (after --module / --layer)".into(),
        ));
    }
    Ok(out)
}

/// `module,layer,i,j,phi` rows (i, j 1-based); `random` selects the baseline grid.
pub fn to_csv(results: &[ModuleSimilarity], random: bool) -> String {
    let mut s = String::from("module,layer,i,j,phi\n");
    for m in results {
        let grid = if random { &m.phi_random } else { &m.phi };
        for i in 1..=m.p1 {
            for j in 1..=m.p2 {
                let _ = writeln!(
                    s,
                    "{},{},{i},{j},{:.9}",
                    csv_field(m.id.kind.name()),
                    m.id.layer,
                    grid[(i - 1) * m.p2 + (j - 1)]
                );
            }
        }
    }
    s
}

/// A short text summary: φ(1,1), the mean over the top-min(p1,p2) diagonal block, and the
/// same for the random baseline, per module.
pub fn summary(
    results: &[ModuleSimilarity],
    label_a: &str,
    label_b: &str,
    which: Factor,
) -> String {
    let mut s = format!(
        "subspace similarity φ of {which:?} (top singular directions): {label_a} vs {label_b}; baseline: {label_a} vs a random Gaussian matrix of {label_b}'s shape\n"
    );
    let _ = writeln!(
        s,
        "{:<10} {:>5} {:>4} {:>4} {:>9} {:>12} {:>11} {:>14}",
        "module", "layer", "p1", "p2", "phi(1,1)", "random(1,1)", "mean phi", "mean random"
    );
    for m in results {
        let k = m.p1.min(m.p2);
        let mean = |g: &[f64]| -> f64 {
            let mut t = 0.0;
            for i in 1..=k {
                for j in 1..=k {
                    t += g[(i - 1) * m.p2 + (j - 1)];
                }
            }
            t / (k * k) as f64
        };
        let _ = writeln!(
            s,
            "{:<10} {:>5} {:>4} {:>4} {:>9.4} {:>12.4} {:>11.4} {:>14.4}",
            m.id.kind.name(),
            m.id.layer,
            m.p1,
            m.p2,
            m.at(1, 1),
            m.random_at(1, 1),
            mean(&m.phi),
            mean(&m.phi_random)
        );
    }
    let _ = writeln!(
        s,
        "(mean over 1 ≤ i, j ≤ min(p1, p2); φ = 1: the smaller subspace lies in the larger one)"
    );
    s
}

/// The files `write_outputs` writes (and the heatmaps, `phi_<module>_<layer>.png`).
pub const OUTPUT_FILES: [&str; 3] = ["similarity.csv", "similarity_random.csv", "summary.txt"];

/// An output directory from before the output marker: nothing but these files and heatmaps,
/// with a `similarity.csv` of this layout.
pub fn legacy_output(dir: &Path, entries: &[String]) -> Option<Vec<String>> {
    let ours = |n: &String| {
        OUTPUT_FILES.contains(&n.as_str()) || (n.starts_with("phi_") && n.ends_with(".png"))
    };
    let header = std::fs::read_to_string(dir.join("similarity.csv"))
        .ok()
        .is_some_and(|t| t.lines().next() == Some("module,layer,i,j,phi"));
    (header && entries.iter().all(ours)).then(|| entries.to_vec())
}

/// Checks `out` as the output directory of `analyze subspace` (see [`crate::io::output`]).
pub fn prepare_output(out: &Path, inputs: &[(&str, &Path)], overwrite: bool) -> Result<OutputDir> {
    prepare_output_dir_with(out, "analyze subspace", inputs, overwrite, &legacy_output)
}

/// Writes `similarity.csv`, `similarity_random.csv`, `summary.txt` and one heatmap PNG per
/// module and layer (`phi_<module>_<layer>.png`: adapters left, random baseline right) as the
/// whole output `out`; returns the heatmaps' paths.
pub fn write_outputs(
    out: &OutputDir,
    results: &[ModuleSimilarity],
    label_a: &str,
    label_b: &str,
    which: Factor,
) -> Result<Vec<std::path::PathBuf>> {
    let mut names = Vec::new();
    out.write_whole(|dir| {
        write_atomic(
            &dir.join("similarity.csv"),
            to_csv(results, false).as_bytes(),
        )?;
        write_atomic(
            &dir.join("similarity_random.csv"),
            to_csv(results, true).as_bytes(),
        )?;
        write_atomic(
            &dir.join("summary.txt"),
            summary(results, label_a, label_b, which).as_bytes(),
        )?;
        for m in results {
            let name = format!("phi_{}_{}.png", m.id.kind.name(), m.id.layer);
            let title = format!("φ of {which:?}, {} layer {}", m.id.kind.name(), m.id.layer);
            super::heatmap::plot_heatmaps(
                &dir.join(&name),
                &title,
                &[
                    super::heatmap::Panel {
                        title: format!("{label_a} vs {label_b}"),
                        rows: m.p1,
                        cols: m.p2,
                        values: &m.phi,
                    },
                    super::heatmap::Panel {
                        title: format!("{label_a} vs random"),
                        rows: m.p1,
                        cols: m.p2,
                        values: &m.phi_random,
                    },
                ],
            )?;
            names.push(name);
        }
        Ok(())
    })?;
    Ok(names.iter().map(|n| out.path().join(n)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn factors(a: DMatrix<f64>) -> Factors {
        let (r, inp) = (a.nrows(), a.ncols());
        Factors {
            r,
            out: 3,
            inp,
            scale: 1.0,
            a: (0..r * inp).map(|k| a[(k / inp, k % inp)] as f32).collect(),
            b: vec![0.0; 3 * r],
        }
    }

    #[test]
    fn identical_and_nested_subspaces_give_one() {
        let a = gaussian(4, 20, 1);
        let u1 = basis(&factors(a.clone()), Factor::A).unwrap();
        let phi = phi_grid(&u1, &u1);
        for i in 0..4 {
            assert!((phi[i * 4 + i] - 1.0).abs() < 1e-6, "{phi:?}");
        }
        // A2's rows = A1's rows plus more rows: span(A1) ⊂ span(A2), so φ(4, 8) = 1.
        let mut a2 = DMatrix::zeros(8, 20);
        a2.rows_mut(0, 4).copy_from(&a);
        a2.rows_mut(4, 4).copy_from(&gaussian(4, 20, 2));
        let u2 = basis(&factors(a2), Factor::A).unwrap();
        let phi = phi_grid(&u1, &u2);
        assert!((phi[3 * 8 + 7] - 1.0).abs() < 1e-6);
        for v in phi {
            assert!((-1e-9..=1.0 + 1e-9).contains(&v));
        }
    }

    #[test]
    fn phi_is_prefix_sum_of_squared_overlaps() {
        let u1 = sorted_svd(&gaussian(10, 3, 3)).unwrap().0;
        let u2 = sorted_svd(&gaussian(10, 5, 4)).unwrap().0;
        let phi = phi_grid(&u1, &u2);
        for i in 1..=3 {
            for j in 1..=5 {
                let m = u1.columns(0, i).transpose() * u2.columns(0, j);
                let want = m.norm_squared() / i.min(j) as f64;
                assert!((phi[(i - 1) * 5 + j - 1] - want).abs() < 1e-12);
            }
        }
    }
}
