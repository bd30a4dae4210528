//! `lorakit sweep` end to end on the tiny Llama: cells, parameter counts r·(d+k), the
//! fixed-budget ranks, resuming, failed cells, and bad configs rejected before training.

use std::path::Path;

use crate::common::*;

/// A handful of prompt/completion lines the tiny model's tokenizer can encode.
fn write_data(dir: &Path) -> (String, String) {
    let mut s = String::new();
    for k in 0..12 {
        s.push_str(
            &serde_json::json!({
                "prompt": format!("name[Place {k}], food[Thai]\nDescription:"),
                "completion": format!(" Place {k} serves Thai food."),
            })
            .to_string(),
        );
        s.push('\n');
    }
    let (train, eval) = (dir.join("train.jsonl"), dir.join("eval.jsonl"));
    std::fs::write(&train, &s).unwrap();
    let half: Vec<&str> = s.lines().take(6).collect();
    std::fs::write(&eval, half.join("\n") + "\n").unwrap();
    (
        train.to_str().unwrap().to_owned(),
        eval.to_str().unwrap().to_owned(),
    )
}

fn config(dir: &Path, body: &str) -> String {
    let (train, eval) = write_data(dir);
    let model = fixture("tiny-llama");
    let text = format!(
        "out = \"{}\"\n[train]\nmodel = \"{}\"\ndata = \"{train}\"\neval_data = \"{eval}\"\nsteps = 2\nbatch_size = 4\nprecision = \"f32\"\n{body}",
        dir.join("out").display(),
        model.display()
    );
    let p = dir.join("sweep.toml");
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

/// results.csv rows as (cell, targets, r, trainable_params, status, eval_loss).
fn rows(out: &Path) -> Vec<(String, String, usize, usize, String, Option<f64>)> {
    let text = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(lorakit::sweep::CSV_HEADER));
    lines
        .map(|l| {
            // The targets field is quoted when it holds a comma.
            let (cell, rest) = l.split_once(',').unwrap();
            let (targets, rest) = match rest.strip_prefix('"') {
                Some(r) => {
                    let (t, r) = r.split_once("\",").unwrap();
                    (t.to_string(), r)
                }
                None => {
                    let (t, r) = rest.split_once(',').unwrap();
                    (t.to_string(), r)
                }
            };
            let f: Vec<&str> = rest.split(',').collect();
            // r,alpha,lr,seed,trainable_params,metric,metric_value,eval_loss,...,status,error
            (
                cell.to_string(),
                targets,
                f[0].parse().unwrap(),
                f[4].parse().unwrap(),
                f[11].to_string(),
                f[7].parse().ok(),
            )
        })
        .collect()
}

#[test]
fn sweep_counts_parameters_resumes_and_writes_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        "[grid]\nr = [1, 3]\ntargets = [\"q_proj\", \"q_proj,v_proj\"]\n[budget]\nr = 2\nreference = \"q_proj\"\ntargets = [\"q_proj\", \"v_proj\", \"q_proj,v_proj\"]\n",
    );
    let o = lorakit(&["sweep", "--config", &cfg]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = tmp.path().join("out");
    let rows = rows(&out);
    // tiny-llama: hidden 64, q_proj [64, 64], v_proj [32, 64], 2 layers.
    let per_layer = |t: &str| -> usize {
        t.split(',')
            .map(|m| match m {
                "q_proj" => 64 + 64,
                "v_proj" => 32 + 64,
                _ => unreachable!(),
            })
            .sum()
    };
    assert_eq!(
        rows.len(),
        3 + 4 - 1,
        "3 budget cells + 4 rank cells; q,v at r = 1 is in both"
    );
    for (cell, targets, r, params, status, loss) in &rows {
        assert_eq!(status, "ok", "{cell}");
        assert!(loss.is_some_and(f64::is_finite), "{cell}");
        assert_eq!(
            *params,
            r * per_layer(targets) * 2,
            "{cell}: r·(d+k) summed"
        );
    }
    // Budget = 2 · 128 · 2 layers = 512: v_proj (192 per rank) → r = 3 (576), q,v (448) → r = 1.
    let ranks_of =
        |t: &str| -> Vec<usize> { rows.iter().filter(|x| x.1 == t).map(|x| x.2).collect() };
    assert_eq!(ranks_of("v_proj"), vec![3]);
    assert_eq!(ranks_of("q_proj"), vec![2, 1, 3]);
    assert_eq!(ranks_of("q_proj,v_proj"), vec![1, 3]);
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("## Target sets at a fixed budget") && md.contains("## Rank r per target set"),
        "{md}"
    );
    assert!(md.contains("| v_proj | 3 | 576 |"), "{md}");
    assert!(md.contains("| q_proj,v_proj | 1 | 448 |"), "{md}");

    // A rerun skips every finished cell and leaves the results as they were.
    let before = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let o = lorakit(&["sweep", "--config", &cfg]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o).matches("skipped").count(), 6, "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(out.join("results.csv")).unwrap(),
        before
    );
}

#[test]
fn failed_cells_are_recorded_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    // Longer than the tiny model's context of 128: every cell fails when it plans its run.
    let cfg = config(
        tmp.path(),
        "max_seq_len = 4096\n[grid]\nr = [1, 2]\ntargets = [\"q_proj\"]\n",
    );
    let o = lorakit(&["sweep", "--config", &cfg]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = rows(&tmp.path().join("out"));
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.4 == "failed"));
    let csv = std::fs::read_to_string(tmp.path().join("out/results.csv")).unwrap();
    assert!(csv.contains("exceeds the model's context"), "{csv}");
}

#[test]
fn bad_sweep_configs_fail_before_training() {
    for (body, needle) in [
        (
            "[grid]\nr = [1]\ntargets = [\"q_proj\"]\nrank = [2]\n",
            "unknown field `rank`",
        ),
        (
            "stepz = 3\n[grid]\nr = [1]\ntargets = [\"q_proj\"]\n",
            "unknown field `stepz`",
        ),
        (
            "[grid]\nr = []\ntargets = [\"q_proj\"]\n",
            "'grid.r': is empty",
        ),
        (
            "[grid]\nr = [1]\ntargets = []\n",
            "'grid.targets': is empty",
        ),
        (
            "[grid]\nr = [1]\ntargets = [\"q_proj\"]\nseed = []\n",
            "'grid.seed': is empty",
        ),
        (
            "[grid]\nr = [1]\ntargets = [\"q_proj\", \"qq_proj\"]\n",
            "\"qq_proj\" matches no module",
        ),
        (
            "[grid]\nr = [1]\ntargets = [\"q_proj\"]\n[budget]\ntargets = [\"gate\"]\n",
            "'budget.targets'",
        ),
        (
            "[grid]\nr = [0]\ntargets = [\"q_proj\"]\n",
            "'grid.r': rank 0",
        ),
        (
            "epochs = 1\n[grid]\nr = [1]\ntargets = [\"q_proj\"]\n",
            "set steps or epochs, not both",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), body);
        let o = lorakit(&["sweep", "--config", &cfg]);
        let err = stderr(&o);
        assert!(!o.status.success(), "{body}");
        assert!(err.contains(needle), "{body}: {err}");
        assert!(err.contains("sweep.toml"), "names the file: {err}");
        assert!(
            !tmp.path().join("out").exists(),
            "{body}: nothing trained or written"
        );
    }
}
