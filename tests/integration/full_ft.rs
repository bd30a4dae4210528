//! Full fine-tuning (`lorakit train --full`): gradients of every parameter against a float64
//! PyTorch reference (tests/data/full-ft, made by scripts/make-full-ft-fixture.py), and the CLI.

use lorakit::io::safetensors_file::SafetensorsFile;
use lorakit::lora::ModuleKind;
use lorakit::model::llama_train::{Activations, Dropout, FullGrads};
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
        Some(HeadGrads { norm, head }),
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
            &lg.attn_norm,
            &get(&format!("{pre}.input_layernorm.weight")),
        );
        check(
            &format!("{pre}.post_attention_layernorm.weight"),
            &lg.mlp_norm,
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
