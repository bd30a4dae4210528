//! How ΔW relates to W0 (the paper's section 7.3 and Table 7): project W0 onto the
//! r-dimensional subspace of ΔW, ‖Uᵀ W0 V‖_F with U, V the top-r left/right singular vectors
//! of ΔW, and compare with ‖ΔW‖_F. A large "amplification factor" ‖ΔW‖_F / ‖Uᵀ W0 V‖_F
//! means ΔW boosts directions that W0 hardly uses. Baselines: the same projection onto
//! r random orthonormal directions, and onto W0's own top-r singular directions
//! (= √(σ1² + … + σr²) of W0).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use nalgebra::DMatrix;

use super::{csv_field, gaussian, singular_values, sorted_svd, to_dmatrix, Factors};
use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;
use crate::io::output::{prepare_output_dir_with, OutputDir};
use crate::lora::ModuleId;
use crate::model::Decoder;

/// One adapted module's row of the table.
#[derive(Debug, Clone)]
pub struct Amplification {
    pub id: ModuleId,
    pub r: usize,
    /// ‖W0‖_F
    pub norm_w0: f64,
    /// ‖ΔW‖_F, ΔW = s·B·A
    pub norm_delta: f64,
    /// ‖Uᵀ W0 V‖_F with U, V the top-r singular vectors of ΔW.
    pub proj_delta_dirs: f64,
    /// ‖Uᵀ W0 V‖_F with W0's own top-r singular vectors.
    pub proj_w0_dirs: f64,
    /// ‖Uᵀ W0 V‖_F with r random orthonormal directions on each side.
    pub proj_random_dirs: f64,
}

impl Amplification {
    /// ‖ΔW‖_F / ‖Uᵀ W0 V‖_F (the paper's amplification factor).
    pub fn factor(&self) -> f64 {
        self.norm_delta / self.proj_delta_dirs
    }
}

/// Top-r singular triplets of ΔW = s·B·A without forming the [out, in] product:
/// B = Qb Rb and Aᵀ = Qa Ra (thin QR) give ΔW = Qb (s·Rb Raᵀ) Qaᵀ, so the SVD of the r × r core
/// C = Uc Σ Vcᵀ yields ΔW = (Qb Uc) Σ (Qa Vc)ᵀ.
/// f: A [r, in], B [out, r] -> (U [out, r], σ [r] descending, V [in, r]).
pub fn delta_svd(f: &Factors) -> Result<(DMatrix<f64>, Vec<f64>, DMatrix<f64>)> {
    let b = to_dmatrix(&f.b, f.out, f.r);
    let at = to_dmatrix(&f.a, f.r, f.inp).transpose();
    if f.out < f.r || f.inp < f.r {
        // More rank than dimensions: the thin QR is not square in r; a direct SVD is cheap then.
        let (u, s, v) = sorted_svd(&(&b * at.transpose() * f.scale))?;
        return Ok((u, s, v));
    }
    let (qb, rb) = b.qr().unpack();
    let (qa, ra) = at.qr().unpack();
    let core = rb * ra.transpose() * f.scale;
    let (uc, s, vc) = sorted_svd(&core)?;
    Ok((qb * uc, s, qa * vc))
}

/// ‖Uᵀ W V‖_F. u: [out, r], w: [out, in], v: [in, r].
fn projected_norm(u: &DMatrix<f64>, w: &DMatrix<f64>, v: &DMatrix<f64>) -> f64 {
    (u.transpose() * (w * v)).norm()
}

/// r orthonormal random directions in ℝⁿ: the Q of a seeded Gaussian [n, r]. -> [n, r]
fn random_directions(n: usize, r: usize, seed: u64) -> DMatrix<f64> {
    gaussian(n, r, seed).qr().q()
}

/// One row per module of `factors`, with W0 taken from `model`.
pub fn analyze(
    model: &Decoder,
    factors: &BTreeMap<ModuleId, Factors>,
    seed: u64,
) -> Result<Vec<Amplification>> {
    let mut rows = Vec::new();
    for (id, f) in factors {
        if id.layer >= model.config.num_layers {
            return Err(Error::Invalid(format!(
                "{}: the adapter adapts layer {} but the model has {} layers",
                id.path(),
                id.layer,
                model.config.num_layers
            )));
        }
        let lin = model.linear(*id)?;
        if (lin.out_features, lin.in_features) != (f.out, f.inp) {
            return Err(Error::Invalid(format!(
                "{}: the adapter's ΔW is [{}, {}] but the model's weight is [{}, {}]",
                id.path(),
                f.out,
                f.inp,
                lin.out_features,
                lin.in_features
            )));
        }
        let w0 = to_dmatrix(&lin.weight_f32(), f.out, f.inp);
        let (u, s, v) = delta_svd(f)?;
        let r = f.r.min(u.ncols());
        let (u, v) = (u.columns(0, r).into_owned(), v.columns(0, r).into_owned());
        let norm_delta = s.iter().map(|x| x * x).sum::<f64>().sqrt();
        let sw = singular_values(&w0);
        let proj_w0_dirs = sw.iter().take(r).map(|x| x * x).sum::<f64>().sqrt();
        let module_seed =
            seed ^ ((id.layer as u64) << 8 | id.kind as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let ur = random_directions(f.out, r, module_seed);
        let vr = random_directions(f.inp, r, module_seed.wrapping_add(1));
        rows.push(Amplification {
            id: *id,
            r,
            norm_w0: w0.norm(),
            norm_delta,
            proj_delta_dirs: projected_norm(&u, &w0, &v),
            proj_w0_dirs,
            proj_random_dirs: projected_norm(&ur, &w0, &vr),
        });
    }
    Ok(rows)
}

pub const CSV_HEADER: &str =
    "module,layer,r,norm_w0,norm_delta,proj_delta_dirs,proj_w0_dirs,proj_random_dirs,amplification";

pub fn to_csv(rows: &[Amplification]) -> String {
    let mut s = format!("{CSV_HEADER}\n");
    for a in rows {
        let _ = writeln!(
            s,
            "{},{},{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6}",
            csv_field(a.id.kind.name()),
            a.id.layer,
            a.r,
            a.norm_w0,
            a.norm_delta,
            a.proj_delta_dirs,
            a.proj_w0_dirs,
            a.proj_random_dirs,
            a.factor()
        );
    }
    s
}

/// The files [`write_outputs`] writes.
pub const OUTPUT_FILES: [&str; 2] = ["amplification.csv", "amplification.md"];

/// An output directory from before the output marker: these files only, the CSV in this layout.
pub fn legacy_output(dir: &Path, entries: &[String]) -> Option<Vec<String>> {
    let header = std::fs::read_to_string(dir.join("amplification.csv"))
        .ok()
        .is_some_and(|t| t.lines().next() == Some(CSV_HEADER));
    (header && entries.iter().all(|n| OUTPUT_FILES.contains(&n.as_str()))).then(|| entries.to_vec())
}

/// Checks `out` as the output directory of `analyze amplification` (see [`crate::io::output`]).
pub fn prepare_output(out: &Path, inputs: &[(&str, &Path)], overwrite: bool) -> Result<OutputDir> {
    prepare_output_dir_with(
        out,
        "analyze amplification",
        inputs,
        overwrite,
        &legacy_output,
    )
}

/// Writes `amplification.csv` and `amplification.md` (the table) as the whole output `out`.
pub fn write_outputs(out: &OutputDir, rows: &[Amplification]) -> Result<()> {
    out.write_whole(|dir| {
        write_atomic(&dir.join("amplification.csv"), to_csv(rows).as_bytes())?;
        write_atomic(&dir.join("amplification.md"), to_table(rows).as_bytes())
    })
}

/// A Markdown table (readable as plain text too).
pub fn to_table(rows: &[Amplification]) -> String {
    let mut s = String::from(
        "| module | layer | r | ‖W0‖F | ‖ΔW‖F | ‖UᵀW0V‖F, ΔW dirs | W0 top-r dirs | random dirs | ‖ΔW‖F / ‖UᵀW0V‖F |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for a in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} | {:.4} | {:.4} | {:.3} | {:.4} | {:.2} |",
            a.id.kind.name(),
            a.id.layer,
            a.r,
            a.norm_w0,
            a.norm_delta,
            a.proj_delta_dirs,
            a.proj_w0_dirs,
            a.proj_random_dirs,
            a.factor()
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_factors(r: usize, out: usize, inp: usize, seed: u64) -> Factors {
        let a = gaussian(r, inp, seed);
        let b = gaussian(out, r, seed + 1);
        Factors {
            r,
            out,
            inp,
            scale: 2.5,
            a: (0..r * inp).map(|k| a[(k / inp, k % inp)] as f32).collect(),
            b: (0..out * r).map(|k| b[(k / r, k % r)] as f32).collect(),
        }
    }

    /// The factored SVD equals a direct SVD of the dense ΔW: same singular values, same
    /// subspaces (compared through the projectors U Uᵀ, which are sign-free).
    #[test]
    fn factored_svd_matches_direct_svd() {
        for (r, out, inp) in [(4, 30, 50), (8, 64, 20), (1, 5, 7)] {
            let f = random_factors(r, out, inp, r as u64);
            let dense = to_dmatrix(&f.b, out, r) * to_dmatrix(&f.a, r, inp) * f.scale;
            let (ud, sd, vd) = sorted_svd(&dense).unwrap();
            let (u, s, v) = delta_svd(&f).unwrap();
            for k in 0..r {
                assert!(
                    (s[k] - sd[k]).abs() <= 1e-9 * sd[0],
                    "σ{k}: {} vs {}",
                    s[k],
                    sd[k]
                );
            }
            let pu = &u * u.transpose() - ud.columns(0, r) * ud.columns(0, r).transpose();
            let pv = &v * v.transpose() - vd.columns(0, r) * vd.columns(0, r).transpose();
            assert!(pu.amax() < 1e-9 && pv.amax() < 1e-9);
            // And U Σ Vᵀ rebuilds ΔW.
            let rebuilt =
                &u * DMatrix::from_diagonal(&nalgebra::DVector::from_vec(s)) * v.transpose();
            assert!((rebuilt - dense).amax() < 1e-9);
        }
    }

    #[test]
    fn projection_onto_own_top_directions_is_the_top_singular_mass() {
        let w = gaussian(12, 9, 5);
        let (u, s, v) = sorted_svd(&w).unwrap();
        let r = 3;
        let p = projected_norm(
            &u.columns(0, r).into_owned(),
            &w,
            &v.columns(0, r).into_owned(),
        );
        let want = s.iter().take(r).map(|x| x * x).sum::<f64>().sqrt();
        assert!((p - want).abs() < 1e-10);
    }
}
