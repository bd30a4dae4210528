//! `lorakit analyze`: φ and the amplification numbers against an independent NumPy/SciPy
//! computation (`scripts/make-subspace-fixture.py` → `tests/data/subspace/`), on adapters of
//! different ranks (r = 2 vs r = 6) for the tiny Llama.

use std::collections::HashMap;

use lorakit::analysis::subspace::{compare, Factor};
use lorakit::analysis::{amplification, load_factors};

use crate::common::*;

/// A file of the subspace reference (tests/data/subspace, made by scripts/make-subspace-fixture.py).
fn subspace_data(rel: &str) -> std::path::PathBuf {
    repo_root().join("tests/data/subspace").join(rel)
}

/// `module,layer,i,j,phi` rows -> {(module, layer, i, j): phi}.
fn read_phi_csv(text: &str) -> HashMap<(String, usize, usize, usize), f64> {
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("module,layer,i,j,phi"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), 5, "{l}");
            (
                (
                    f[0].to_string(),
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                    f[3].parse().unwrap(),
                ),
                f[4].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn subspace_similarity_matches_numpy_across_ranks() {
    let a = load_factors(&subspace_data("adapter-r2")).unwrap();
    let b = load_factors(&subspace_data("adapter-r6")).unwrap();
    for (which, file) in [(Factor::A, "expected_A.csv"), (Factor::B, "expected_B.csv")] {
        let want = read_phi_csv(&std::fs::read_to_string(subspace_data(file)).unwrap());
        let got = compare(&a, &b, None, None, which, 0).unwrap();
        let mut n = 0;
        let mut max_diff = 0.0f64;
        for m in &got {
            assert_eq!((m.p1, m.p2), (2, 6));
            for i in 1..=m.p1 {
                for j in 1..=m.p2 {
                    let w = want[&(m.id.kind.name().to_string(), m.id.layer, i, j)];
                    max_diff = max_diff.max((m.at(i, j) - w).abs());
                    n += 1;
                }
            }
            // r2's subspace lies nearly inside r6's by construction; a random one's does not.
            let (p1, p2) = (m.p1, m.p2);
            assert!(
                m.at(p1, p2) > 0.8 && m.random_at(p1, p2) < 0.5,
                "{:?}",
                m.id
            );
        }
        assert_eq!(n, want.len(), "{which:?}: every expected value compared");
        eprintln!("φ of {which:?} vs NumPy/SciPy: max |diff| = {max_diff:.2e} over {n} values");
        assert!(max_diff <= 1e-5, "{which:?}: max |diff| {max_diff}");
    }
}

#[test]
fn analyze_subspace_cli_writes_csv_heatmaps_and_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sub");
    let o = lorakit(&[
        "analyze",
        "subspace",
        "--a",
        subspace_data("adapter-r2").to_str().unwrap(),
        "--b",
        subspace_data("adapter-r6").to_str().unwrap(),
        "--module",
        "v_proj",
        "--matrix",
        "B",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = read_phi_csv(&std::fs::read_to_string(out.join("similarity.csv")).unwrap());
    let want = read_phi_csv(&std::fs::read_to_string(subspace_data("expected_B.csv")).unwrap());
    assert_eq!(got.len(), 2 * 2 * 6, "v_proj only, two layers, 2 × 6 pairs");
    for (k, v) in &got {
        assert!((v - want[k]).abs() <= 1e-5, "{k:?}: {v} vs {}", want[k]);
    }
    for layer in 0..2 {
        let png = std::fs::read(out.join(format!("phi_v_proj_{layer}.png"))).unwrap();
        assert_eq!(&png[..4], b"\x89PNG");
    }
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    assert!(
        summary.contains("phi(1,1)") && summary.contains("v_proj"),
        "{summary}"
    );
    assert!(out.join("similarity_random.csv").is_file());

    let (a_dir, b_dir) = (subspace_data("adapter-r2"), subspace_data("adapter-r6"));
    for (args, needle) in [
        (vec!["--matrix", "C"], "--matrix must be A or B"),
        (vec!["--module", "x_proj"], "--module x_proj"),
        (vec!["--layer", "7"], "no adapted module in common"),
    ] {
        let mut full = vec![
            "analyze",
            "subspace",
            "--a",
            a_dir.to_str().unwrap(),
            "--b",
            b_dir.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        full.extend(args);
        let o = lorakit(&full);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(needle), "{}", stderr(&o));
    }
    // An adapter directory without adapter_config.json (not --out's parent: an output may not
    // lie inside an input).
    let empty = tmp.path().join("not-an-adapter");
    std::fs::create_dir(&empty).unwrap();
    let o = lorakit(&[
        "analyze",
        "subspace",
        "--a",
        empty.to_str().unwrap(),
        "--b",
        subspace_data("adapter-r6").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("adapter_config.json"), "{}", stderr(&o));
}

#[test]
fn amplification_matches_numpy() {
    let model = tiny_llama();
    let f = load_factors(&subspace_data("adapter-r6")).unwrap();
    let rows = amplification::analyze(&model.model, &f, 0).unwrap();
    let text = std::fs::read_to_string(subspace_data("expected_amplification.csv")).unwrap();
    let mut checked = 0;
    for line in text.lines().skip(1) {
        let v: Vec<&str> = line.split(',').collect();
        let row = rows
            .iter()
            .find(|r| r.id.kind.name() == v[0] && r.id.layer == v[1].parse::<usize>().unwrap())
            .unwrap();
        assert_eq!(row.r, v[2].parse::<usize>().unwrap());
        let want: Vec<f64> = v[3..].iter().map(|x| x.parse().unwrap()).collect();
        let got = [
            row.norm_w0,
            row.norm_delta,
            row.proj_delta_dirs,
            row.proj_w0_dirs,
        ];
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{line}: {got:?}");
        }
        // Random directions see about r/√(out·in) of W0's mass; W0's own see the most.
        assert!(row.proj_random_dirs < row.proj_w0_dirs);
        checked += 1;
    }
    assert_eq!(checked, 4);
    assert_eq!(rows.len(), 4);
}
