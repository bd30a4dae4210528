//! `lorakit train` and `lorakit merge` end to end: PEFT's 20-step trajectory on the real model,
//! PEFT-format round trips, merged directories, and bad training input.

use std::path::Path;

use lorakit::io::safetensors_file::SafetensorsFile;
use lorakit::lora::peft::Adapter;
use lorakit::model::load_model;

use crate::common::*;

/// Writes the fixture's [20, 4, 128] batches as pre-tokenised JSONL lines in batch order.
fn trajectory_jsonl(path: &Path) {
    let f =
        SafetensorsFile::open(&fixture("smollm2-peft-r8-qv/training/batches.safetensors")).unwrap();
    let (ids, shape) = f.tensor_i64("input_ids").unwrap();
    let (labels, _) = f.tensor_i64("labels").unwrap();
    assert_eq!(shape, vec![20, 4, 128]);
    let mut out = String::new();
    for row in 0..80 {
        let r = row * 128..(row + 1) * 128;
        out.push_str(
            &serde_json::json!({ "input_ids": &ids[r.clone()], "labels": &labels[r] }).to_string(),
        );
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs the fixture's 20 steps from its step-0 adapter; returns (run dir guard, out dir, losses).
fn run_trajectory(precision: &str) -> (tempfile::TempDir, std::path::PathBuf, Vec<f64>) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("batches.jsonl");
    trajectory_jsonl(&data);
    let out = tmp.path().join("run");
    let model = real_model_path();
    let o = lorakit(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--init-adapter",
        fixture("smollm2-peft-r8-qv/training/adapter_step0")
            .to_str()
            .unwrap(),
        "--no-shuffle",
        "--batch-size",
        "4",
        "--steps",
        "20",
        "--lr",
        "1e-3",
        "--weight-decay",
        "0.01",
        "--schedule",
        "constant",
        "--max-seq-len",
        "128",
        "--precision",
        precision,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<_> = metrics(&out)
        .into_iter()
        .filter(|r| r.get("loss").is_some())
        .collect();
    assert_eq!(rows.len(), 20);
    for (k, row) in rows.iter().enumerate() {
        assert_eq!(row["step"].as_u64().unwrap(), k as u64 + 1);
        assert_eq!(row["target_tokens"].as_u64().unwrap(), 508);
    }
    let losses = rows.iter().map(|r| r["loss"].as_f64().unwrap()).collect();
    (tmp, out, losses)
}

#[test]
fn bf16_trajectory_stays_within_one_percent_of_peft_fp32() {
    let (_tmp, _out, losses) = run_trajectory("bf16");
    let traj = read_json("smollm2-peft-r8-qv/training/trajectory.json");
    let mut worst = 0.0f64;
    for (k, want) in traj["losses"].as_array().unwrap().iter().enumerate() {
        let want = want.as_f64().unwrap();
        let rel = (losses[k] - want).abs() / want;
        worst = worst.max(rel);
        assert!(
            rel < 1e-2,
            "bf16 step {}: loss {} vs PEFT fp32 {want}",
            k + 1,
            losses[k]
        );
    }
    eprintln!("bf16 trajectory: worst relative loss difference vs PEFT fp32 {worst:.2e}");
}

#[test]
fn twenty_steps_reproduce_peft_trajectory_on_smollm2() {
    let (_tmp, out, losses) = run_trajectory("f32");
    let traj = read_json("smollm2-peft-r8-qv/training/trajectory.json");
    let want: Vec<f64> = traj["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let mut worst = 0.0f64;
    for (k, &got) in losses.iter().enumerate() {
        let rel = (got - want[k]).abs() / want[k];
        worst = worst.max(rel);
        assert!(
            rel <= 1e-3,
            "step {}: loss {got} vs PEFT {}",
            k + 1,
            want[k]
        );
    }
    eprintln!("trajectory: worst relative loss difference over 20 steps {worst:.2e}");

    // The trained adapter, judged by the logits it gives (Adam amplifies rounding elementwise).
    let m = real_model();
    let adapter = Adapter::load(&out, &m.model.config).unwrap();
    let mut model = m.model.clone();
    model.attach_adapter(&adapter, 1.0).unwrap();
    let ids = ids_of(&traj["final"]["item_ids"]);
    let logits = model.logits(&ids).unwrap();
    let want = logits_record(
        "smollm2-peft-r8-qv/training/logits_step20.safetensors",
        "item",
    );
    compare_logits(
        &logits,
        m.model.config.vocab_size,
        &want,
        5e-2,
        "adapter after 20 steps",
    );
    // And by norms, per tensor (README: relative Frobenius ≤ 1e-2).
    let reference = Adapter::load(
        &fixture("smollm2-peft-r8-qv/training/adapter_step20"),
        &m.model.config,
    )
    .unwrap();
    for (id, w) in &adapter.modules {
        let r = &reference.modules[id];
        for (got, want, what) in [(&w.a, &r.a, "A"), (&w.b, &r.b, "B")] {
            let diff: f64 = got
                .iter()
                .zip(want)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
            assert!(
                diff / norm <= 1e-2,
                "{} {what}: relative Frobenius difference {}",
                id.path(),
                diff / norm
            );
        }
    }
}

fn tiny_train_data(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("train.jsonl");
    let mut s = String::new();
    for i in 0..6 {
        s.push_str(&serde_json::json!({"prompt": format!("Item {i}:"), "completion": format!(" the colour is {}", ["red", "blue", "green"][i % 3])}).to_string());
        s.push('\n');
    }
    std::fs::write(&p, s).unwrap();
    p
}

#[test]
fn trained_adapter_is_peft_format_and_reloads_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_train_data(tmp.path());
    let out = tmp.path().join("run");
    let tiny = fixture("tiny-llama");
    let o = lorakit(&[
        "train",
        "--model",
        tiny.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--r",
        "4",
        "--alpha",
        "8",
        "--targets",
        "q_proj,v_proj,down_proj",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("trainable parameters: "), "{err}");
    // Keys, shapes and dtypes exactly as PEFT writes them.
    let st = SafetensorsFile::open(&out.join("adapter_model.safetensors")).unwrap();
    let names = st.names();
    assert_eq!(names.len(), 2 * 3 * 2);
    assert!(
        names.contains(&"base_model.model.model.layers.1.mlp.down_proj.lora_B.weight".to_string())
    );
    assert_eq!(
        st.info("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
            .unwrap(),
        ("F32".to_string(), vec![4, 64])
    );
    assert_eq!(
        st.info("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight")
            .unwrap(),
        ("F32".to_string(), vec![32, 4])
    );
    assert_eq!(
        st.info("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight")
            .unwrap(),
        ("F32".to_string(), vec![4, 128])
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    for (k, v) in [
        ("peft_type", serde_json::json!("LORA")),
        ("task_type", serde_json::json!("CAUSAL_LM")),
        ("r", serde_json::json!(4)),
        ("lora_alpha", serde_json::json!(8)),
        (
            "target_modules",
            serde_json::json!(["down_proj", "q_proj", "v_proj"]),
        ),
        ("bias", serde_json::json!("none")),
        ("use_rslora", serde_json::json!(false)),
        ("fan_in_fan_out", serde_json::json!(false)),
    ] {
        assert_eq!(cfg[k], v, "adapter_config.json {k}");
    }
    // Save → load is exact: reload, save again, same bytes.
    let m = tiny_llama();
    let a = Adapter::load(&out, &m.model.config).unwrap();
    let again = tmp.path().join("again");
    a.save(&again).unwrap();
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(again.join("adapter_model.safetensors")).unwrap()
    );
    assert_eq!(Adapter::load(&again, &m.model.config).unwrap(), a);
    // Training changed B (it started at 0) and the loss went down.
    assert!(a.modules.values().all(|w| w.b.iter().any(|&x| x != 0.0)));
    let rows = metrics(&out);
    assert!(rows.last().unwrap()["loss"].as_f64().unwrap() < rows[0]["loss"].as_f64().unwrap());
    // Checkpoint of the last step, loadable.
    let ck = out.join("checkpoints/step-000003");
    assert!(Adapter::load(&ck, &m.model.config).is_ok());
    assert!(out.join("loss.png").is_file());
}

#[test]
fn merge_cli_writes_an_hf_dir_equal_to_the_unmerged_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let merged = tmp.path().join("merged");
    let tiny = fixture("tiny-llama");
    let adapter = fixture("tiny-llama/lora-b-r2-all-rslora");
    let o = lorakit(&[
        "merge",
        "--model",
        tiny.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = load_model(&merged).unwrap();
    let meta = read_json("tiny-llama/meta.json");
    let want = logits_record(
        "tiny-llama/lora-b-r2-all-rslora/logits_adapter.safetensors",
        "batch",
    );
    let ours: Vec<f32> = meta["batch"]["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| m.model.logits(&ids_of(r)).unwrap())
        .collect();
    compare_logits(&ours, 49152, &want, 1e-4, "merged HF dir");
    // generate/score accept the unmerged adapter with a weight; weight 0 is the base model.
    let ids = "504,2365,6354";
    let base = lorakit(&[
        "score",
        "--model",
        tiny.to_str().unwrap(),
        "--ids",
        ids,
        "--json",
    ]);
    let zero = lorakit(&[
        "score",
        "--model",
        tiny.to_str().unwrap(),
        "--adapter",
        &format!("{}:0", adapter.display()),
        "--ids",
        ids,
        "--json",
    ]);
    assert_eq!(base.stdout, zero.stdout);
    let full = lorakit(&[
        "score",
        "--model",
        tiny.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--ids",
        ids,
        "--json",
    ]);
    assert_ne!(base.stdout, full.stdout);
}

#[test]
fn smollm2_peft_adapter_matches_unmerged_merged_and_greedy() {
    let m = real_model();
    let adapter = Adapter::load(&fixture("smollm2-peft-r8-qv/adapter"), &m.model.config).unwrap();
    assert_eq!(adapter.modules.len(), 60);
    let meta = read_json("smollm2-peft-r8-qv/meta.json");
    let mut model = m.model.clone();
    model.attach_adapter(&adapter, 1.0).unwrap();
    let v = m.model.config.vocab_size;
    let records = ["plain", "chat", "item"];
    let unmerged: Vec<Vec<f32>> = records
        .iter()
        .map(|r| model.logits(&ids_of(&meta["prompts"][r]["ids"])).unwrap())
        .collect();
    for (r, l) in records.iter().zip(&unmerged) {
        compare_logits(
            l,
            v,
            &logits_record("smollm2-peft-r8-qv/logits_adapter.safetensors", r),
            1e-3,
            &format!("r8 {r}"),
        );
    }
    for r in ["plain", "chat"] {
        let want = ids_of(&meta["greedy_adapter"][r]["ids"]);
        let params = lorakit::generate::SamplingParams {
            max_new_tokens: 32,
            ..Default::default()
        };
        let got = lorakit::generate::generate(
            &model,
            &ids_of(&meta["prompts"][r]["ids"]),
            &params,
            |_| Ok(()),
        )
        .unwrap();
        assert_eq!(got, want, "greedy with adapter, {r}");
    }
    model.merge_adapters().unwrap();
    for (r, l) in records.iter().zip(&unmerged) {
        let merged = model.logits(&ids_of(&meta["prompts"][r]["ids"])).unwrap();
        compare_logits(
            &merged,
            v,
            &logits_record("smollm2-peft-r8-qv/logits_merged.safetensors", r),
            1e-3,
            &format!("r8 merged {r}"),
        );
        let d = merged
            .iter()
            .zip(l)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(d <= 1e-3, "merged vs unmerged {d}");
    }
}

#[test]
fn gradient_accumulation_equals_the_larger_batch() {
    // One step on 4 examples at once, or as 2 micro-batches of 2: the loss is the token-level
    // mean over the same targets, so the updates agree up to rounding.
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_train_data(tmp.path());
    let tiny = fixture("tiny-llama");
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = vec![
            "train",
            "--model",
            tiny.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(&[
            "--steps",
            "1",
            "--no-shuffle",
            "--lr",
            "1e-2",
            "--precision",
            "f32",
        ]);
        args.extend_from_slice(extra);
        let o = lorakit(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        (
            Adapter::load(&out, &tiny_llama().model.config).unwrap(),
            metrics(&out)[0]["loss"].as_f64().unwrap(),
        )
    };
    let (big, loss_big) = run("big", &["--batch-size", "4"]);
    let (acc, loss_acc) = run("accum", &["--batch-size", "2", "--grad-accum", "2"]);
    assert!(
        (loss_big - loss_acc).abs() < 1e-5,
        "{loss_big} vs {loss_acc}"
    );
    for (id, w) in &big.modules {
        let v = &acc.modules[id];
        for (a, b) in w.b.iter().zip(&v.b) {
            assert!((a - b).abs() < 1e-5, "{}: B differs {a} vs {b}", id.path());
        }
    }
}

#[test]
fn label_smoothing_matches_its_definition() {
    // (1−ε)·CE + ε·mean_v(−log p_v), computed here from the model's own logits in f64.
    use lorakit::model::decoder_train::{Activations, Dropout};
    use lorakit::train::loss::{lm_head_loss, target_positions};
    let m = tiny_llama();
    let ids = ids_of(&read_json("tiny-llama/meta.json")["batch"]["input_ids"][0]);
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let t = ids.len();
    let mut acts = Activations::default();
    m.model
        .train_forward(&ids, 1, t, None, Dropout::NONE, &mut acts)
        .unwrap();
    let targets = target_positions(&labels, 1, t);
    let eps = 0.1;
    let got =
        lm_head_loss(&m.model, &acts.x_final, &targets, eps, 1.0, None) / targets.len() as f64;
    let logits = m.model.logits(&ids).unwrap();
    let v = m.model.config.vocab_size;
    let mut want = 0.0;
    for p in 0..t - 1 {
        let row: Vec<f64> = logits[p * v..(p + 1) * v]
            .iter()
            .map(|&z| z as f64)
            .collect();
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
        let nll = lse - row[ids[p + 1] as usize];
        let uniform = lse - row.iter().sum::<f64>() / v as f64;
        want += (1.0 - eps as f64) * nll + eps as f64 * uniform;
    }
    want /= (t - 1) as f64;
    assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    let plain =
        lm_head_loss(&m.model, &acts.x_final, &targets, 0.0, 1.0, None) / targets.len() as f64;
    assert!((plain - got).abs() > 1e-3, "smoothing must change the loss");
}
