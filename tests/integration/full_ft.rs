//! Full fine-tuning (`lorakit train --full`): gradients of every parameter against a float64
//! PyTorch reference (tests/data/full-ft, made by scripts/make-full-ft-fixture.py), and the CLI.

use lorakit::io::safetensors_file::SafetensorsFile;
use lorakit::lora::ModuleKind;
use lorakit::model::arch::NormSlot;
use lorakit::model::decoder_train::{Activations, Dropout, FullGrads};
use lorakit::train::loss::{lm_head_loss_with_head_grads, target_positions, HeadGrads};

use crate::common::*;

/// max|ours − want| / max|want| over one tensor.
fn rel_err(ours: &[f32], want: &[f32]) -> f64 {
    assert_eq!(ours.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, &w| m.max(w.abs() as f64));
    let diff = ours
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    diff / scale.max(1e-30)
}

#[test]
fn full_gradients_match_pytorch_float64() {
    let loaded = tiny_llama();
    let model = &loaded.model;
    let c = &model.config;
    let batch =
        SafetensorsFile::open(&fixture("tiny-llama/lora-a-r4-qv/grad/batch.safetensors")).unwrap();
    let (ids, shape) = batch.tensor_i64("input_ids").unwrap();
    let (labels, _) = batch.tensor_i64("labels").unwrap();
    let (b, t) = (shape[0], shape[1]);
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();

    let mut acts = Activations::default();
    model
        .train_forward(&ids, b, t, None, Dropout::NONE, &mut acts)
        .unwrap();
    let targets = target_positions(&labels, b, t);
    let mut grads = FullGrads::zeros_like(model);
    let mut dx = vec![0.0f32; b * t * c.hidden_size];
    let FullGrads {
        embed_tokens,
        norm,
        norm_bias,
        lm_head,
        ..
    } = &mut grads;
    let head = lm_head.as_deref_mut().unwrap_or(embed_tokens);
    let loss = lm_head_loss_with_head_grads(
        model,
        &acts.x_final,
        &targets,
        0.0,
        targets.len() as f64,
        Some(&mut dx),
        Some(HeadGrads {
            norm,
            norm_bias: norm_bias.as_deref_mut(),
            head,
        }),
    ) / targets.len() as f64;
    model
        .train_backward_full(&mut dx, &acts, &mut grads)
        .unwrap();

    let meta = std::fs::read_to_string(repo_root().join("tests/data/full-ft/meta.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    let want_loss = meta["loss"].as_f64().unwrap();
    assert!(
        (loss - want_loss).abs() < 1e-5,
        "loss {loss} vs PyTorch f64 {want_loss}"
    );

    let want =
        SafetensorsFile::open(&repo_root().join("tests/data/full-ft/grads.safetensors")).unwrap();
    let get = |k: &str| want.tensor_f32(k).unwrap().0;
    let mut worst = (0.0f64, String::new());
    let mut check = |name: &str, ours: &[f32], want: &[f32]| {
        let e = rel_err(ours, want);
        if e > worst.0 {
            worst = (e, name.to_owned());
        }
        // f32 against f64: the LoRA gradients of the shared fixtures reach 1.8e-6 the same way.
        assert!(e <= 1e-5, "{name}: max|Δg|/max|g| = {e:.3e}");
    };
    let h = c.hidden_size;
    for (i, lg) in grads.layers.iter().enumerate() {
        let pre = format!("model.layers.{i}");
        check(
            &format!("{pre}.input_layernorm.weight"),
            lg.norm(NormSlot::AttnIn).unwrap(),
            &get(&format!("{pre}.input_layernorm.weight")),
        );
        check(
            &format!("{pre}.post_attention_layernorm.weight"),
            lg.norm(NormSlot::MlpIn).unwrap(),
            &get(&format!("{pre}.post_attention_layernorm.weight")),
        );
        for k in ModuleKind::ALL {
            let name = format!("{}.weight", k.path(i));
            check(&name, &lg.linears[&k].0, &get(&name));
        }
    }
    check("model.norm.weight", &grads.norm, &get("model.norm.weight"));
    // Embedding: the rows of the batch's ids, and nothing anywhere else.
    let (row_ids, _) = want
        .tensor_i64("model.embed_tokens.weight.row_ids")
        .unwrap();
    let rows: Vec<f32> = row_ids
        .iter()
        .flat_map(|&r| grads.embed_tokens[r as usize * h..(r as usize + 1) * h].to_vec())
        .collect();
    check(
        "model.embed_tokens.weight (used rows)",
        &rows,
        &get("model.embed_tokens.weight.rows"),
    );
    let sq: f64 = grads.embed_tokens.iter().map(|&g| (g as f64).powi(2)).sum();
    let want_sq = meta["embed_grad_sq_norm"].as_f64().unwrap();
    assert!(
        (sq - want_sq).abs() <= 1e-5 * want_sq,
        "embedding gradient ‖g‖² {sq} vs {want_sq}: rows outside the batch are not zero?"
    );
    // LM head (untied in the tiny Llama): every 64th row and the rows of the targets.
    let head = grads
        .lm_head
        .as_ref()
        .expect("the tiny Llama has an untied head");
    let strided: Vec<f32> = head
        .chunks_exact(h)
        .step_by(64)
        .flatten()
        .copied()
        .collect();
    check(
        "lm_head.weight (every 64th row)",
        &strided,
        &get("lm_head.weight.strided64"),
    );
    let (tids, _) = want.tensor_i64("lm_head.weight.target_ids").unwrap();
    let trows: Vec<f32> = tids
        .iter()
        .flat_map(|&r| head[r as usize * h..(r as usize + 1) * h].to_vec())
        .collect();
    check(
        "lm_head.weight (target rows)",
        &trows,
        &get("lm_head.weight.target_rows"),
    );
    eprintln!(
        "worst relative gradient error: {:.2e} ({})",
        worst.0, worst.1
    );
}

/// `lorakit train --full` for 3 steps on the fixture batch against PyTorch's AdamW in float64:
/// per-step losses and the weights it writes to OUT/model.
#[test]
fn full_fine_tuning_cli_follows_pytorch_adamw() {
    let batch =
        SafetensorsFile::open(&fixture("tiny-llama/lora-a-r4-qv/grad/batch.safetensors")).unwrap();
    let (ids, shape) = batch.tensor_i64("input_ids").unwrap();
    let (labels, _) = batch.tensor_i64("labels").unwrap();
    let t = shape[1];
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("batch.jsonl");
    let lines: String = (0..shape[0])
        .map(|r| {
            serde_json::json!({
                "input_ids": ids[r * t..(r + 1) * t],
                "labels": labels[r * t..(r + 1) * t],
            })
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let out = tmp.path().join("out");
    let model = fixture("tiny-llama");
    let o = lorakit(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--full",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--no-shuffle",
        "--lr",
        "1e-3",
        "--weight-decay",
        "0.01",
        // Snapshots must not change the run; the newest one is checked below.
        "--save-every",
        "1",
        "--keep-checkpoints",
        "1",
        "--quiet",
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let total = tiny_llama().model.config.parameter_count();
    assert!(
        err.contains(&format!(
            "trainable parameters: {total} of {total} (100% of the model)"
        )),
        "{err}"
    );

    let meta = std::fs::read_to_string(repo_root().join("tests/data/full-ft/meta.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    let want: Vec<f64> = meta["trajectory_losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let got: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs(),
            "step {}: loss {g} vs PyTorch {w}",
            i + 1
        );
    }

    // The written model: weights after 3 steps. Adam moves every element by about ±lr per step
    // whatever its gradient's size, so compare whole tensors by the relative Frobenius norm of
    // the difference (the shared fixtures' advice), not element by element.
    let written = SafetensorsFile::open(&out.join("model/model.safetensors")).unwrap();
    let reference =
        SafetensorsFile::open(&repo_root().join("tests/data/full-ft/grads.safetensors")).unwrap();
    let frob = |a: &[f32], b: &[f32]| -> f64 {
        let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (d / n).sqrt()
    };
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.input_layernorm.weight",
        "model.norm.weight",
    ] {
        let ours = written.tensor_f32(name).unwrap().0;
        let want = reference.tensor_f32(&format!("after3.{name}")).unwrap().0;
        let e = frob(&ours, &want);
        eprintln!("{name}: relative Frobenius difference {e:.2e}");
        assert!(e <= 1e-5, "{name}: relative Frobenius difference {e:.3e}");
    }
    let head = written.tensor_f32("lm_head.weight").unwrap().0;
    let h = tiny_llama().model.config.hidden_size;
    let strided: Vec<f32> = head
        .chunks_exact(h)
        .step_by(64)
        .flatten()
        .copied()
        .collect();
    let want = reference
        .tensor_f32("after3.lm_head.weight.strided64")
        .unwrap()
        .0;
    let e = frob(&strided, &want);
    eprintln!("lm_head (every 64th row): relative Frobenius difference {e:.2e}");
    assert!(e <= 1e-5, "lm_head: relative Frobenius difference {e:.3e}");

    // --save-every 1 --keep-checkpoints 1: only the step-2 snapshot is left (step 3 is the final
    // model), and it is the model after 2 steps: its loss on the batch is PyTorch's step-3 loss.
    let names: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["step-000002"]);
    let o = lorakit(&[
        "eval",
        "--model",
        out.join("checkpoints/step-000002").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--metric",
        "loss",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let snap_loss = v["score"].as_f64().unwrap();
    let step3 = meta["trajectory_losses"][2].as_f64().unwrap();
    eprintln!("snapshot step 2: loss {snap_loss} vs PyTorch step-3 loss {step3}");
    assert!((snap_loss - step3).abs() <= 1e-5 * step3.abs());
}

#[test]
fn full_fine_tuning_rejects_lora_options() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"hello there\"}\n").unwrap();
    let out = tmp.path().join("out");
    let model = fixture("tiny-llama");
    let base = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--full",
    ];
    for (extra, needle) in [
        (&["--r", "4"][..], "--r is a LoRA option"),
        (
            &["--targets", "all-linear"][..],
            "--targets is a LoRA option",
        ),
        (&["--precision", "bf16"][..], "--full trains in f32"),
        (&["--resume"][..], "--resume cannot be combined with --full"),
    ] {
        let mut args = base.to_vec();
        args.extend(extra);
        let o = lorakit(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} left {} behind", out.display());
    }
}
