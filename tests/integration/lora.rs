//! LoRA against PEFT: adapter logits (unmerged and merged), the float64 gradient fixtures, and
//! the algebra every LoRA implementation must satisfy.

use lorakit::io::safetensors_file::SafetensorsFile;
use lorakit::lora::peft::{key_a, key_b, Adapter};
use lorakit::model::decoder_train::{Activations, Dropout, LoraGrads};
use lorakit::model::LoadedModel;
use lorakit::train::loss::{lm_head_loss, target_positions};

use crate::common::*;

/// Logits of `model` with `adapter` attached (unmerged) and merged, for every row of ids.
fn adapter_logits(m: &LoadedModel, adapter: &Adapter, rows: &[Vec<u32>]) -> (Vec<f32>, Vec<f32>) {
    let mut model = m.model.clone();
    model.attach_adapter(adapter, 1.0).unwrap();
    let unmerged: Vec<f32> = rows.iter().flat_map(|r| model.logits(r).unwrap()).collect();
    model.merge_adapters().unwrap();
    let merged: Vec<f32> = rows.iter().flat_map(|r| model.logits(r).unwrap()).collect();
    (unmerged, merged)
}

#[test]
fn tiny_llama_fixture_adapters_match_peft_unmerged_and_merged() {
    let m = tiny_llama();
    let meta = read_json("tiny-llama/meta.json");
    let rows: Vec<Vec<u32>> = meta["batch"]["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids_of)
        .collect();
    for name in ["lora-a-r4-qv", "lora-b-r2-all-rslora"] {
        let adapter =
            Adapter::load(&fixture(&format!("tiny-llama/{name}")), &m.model.config).unwrap();
        let (unmerged, merged) = adapter_logits(m, &adapter, &rows);
        let v = m.model.config.vocab_size;
        compare_logits(
            &unmerged,
            v,
            &logits_record(
                &format!("tiny-llama/{name}/logits_adapter.safetensors"),
                "batch",
            ),
            1e-4,
            name,
        );
        compare_logits(
            &merged,
            v,
            &logits_record(
                &format!("tiny-llama/{name}/logits_merged.safetensors"),
                "batch",
            ),
            1e-4,
            name,
        );
        let d = unmerged
            .iter()
            .zip(&merged)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(d <= 1e-4, "{name}: merged vs unmerged {d}");
    }
}

#[test]
fn rslora_scale_is_alpha_over_sqrt_r() {
    let m = tiny_llama();
    let adapter =
        Adapter::load(&fixture("tiny-llama/lora-b-r2-all-rslora"), &m.model.config).unwrap();
    assert_eq!(adapter.modules.len(), 14, "7 modules × 2 layers");
    for w in adapter.modules.values() {
        assert!((w.scale - 4.0 / 2f32.sqrt()).abs() < 1e-6);
    }
    let a = Adapter::load(&fixture("tiny-llama/lora-a-r4-qv"), &m.model.config).unwrap();
    assert!(a.modules.values().all(|w| w.scale == 2.0), "alpha 8 / r 4");
}

#[test]
fn zero_b_gives_the_base_model_and_unmerge_restores_w0() {
    let m = tiny_llama();
    let meta = read_json("tiny-llama/meta.json");
    let ids = ids_of(&meta["batch"]["input_ids"][0]);
    let mut adapter = Adapter::load(&fixture("tiny-llama/lora-a-r4-qv"), &m.model.config).unwrap();
    let base = m.model.logits(&ids).unwrap();
    // B = 0: exactly the base output, unmerged.
    for w in adapter.modules.values_mut() {
        w.b.fill(0.0);
    }
    let mut model = m.model.clone();
    model.attach_adapter(&adapter, 1.0).unwrap();
    assert_eq!(model.logits(&ids).unwrap(), base);
    // Merge then unmerge a real adapter: W0 comes back up to rounding.
    let adapter = Adapter::load(&fixture("tiny-llama/lora-a-r4-qv"), &m.model.config).unwrap();
    let mut model = m.model.clone();
    model.attach_adapter(&adapter, 1.0).unwrap();
    model.merge_adapters().unwrap();
    assert_ne!(q_weight(&model), q_weight(&m.model));
    model.unmerge_adapter(&adapter, 1.0).unwrap();
    for (a, b) in q_weight(&model).iter().zip(q_weight(&m.model).iter()) {
        assert!((a - b).abs() < 1e-6);
    }
}

/// Loss and gradients of the tiny Llama with adapter a on a fixture batch.
fn tiny_grads(dir: &str) -> (f64, Adapter, LoraGrads) {
    let m = tiny_llama();
    let adapter = Adapter::load(&fixture("tiny-llama/lora-a-r4-qv"), &m.model.config).unwrap();
    let batch = SafetensorsFile::open(&fixture(&format!(
        "tiny-llama/lora-a-r4-qv/{dir}/batch.safetensors"
    )))
    .unwrap();
    let (ids, shape) = batch.tensor_i64("input_ids").unwrap();
    let (labels, _) = batch.tensor_i64("labels").unwrap();
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let (b, t) = (shape[0], shape[1]);
    let mut acts = Activations::default();
    m.model
        .train_forward(&ids, b, t, Some(&adapter), Dropout::NONE, &mut acts)
        .unwrap();
    let targets = target_positions(&labels, b, t);
    let mut dx = vec![0.0f32; b * t * m.model.config.hidden_size];
    let n = targets.len() as f64;
    let loss = lm_head_loss(&m.model, &acts.x_final, &targets, 0.0, n, Some(&mut dx)) / n;
    let mut grads = LoraGrads::zeros_like(&adapter);
    m.model
        .train_backward(&mut dx, &acts, &adapter, Dropout::NONE, &mut grads)
        .unwrap();
    (loss, adapter, grads)
}

fn check_grads_against_fixture(dir: &str) {
    let meta = read_json(&format!("tiny-llama/lora-a-r4-qv/{dir}/grad_meta.json"));
    let (loss, _adapter, grads) = tiny_grads(dir);
    let want_loss = meta["loss"].as_f64().unwrap();
    assert!(
        (loss - want_loss).abs() <= 1e-5,
        "{dir}: loss {loss} vs {want_loss}"
    );
    let want = SafetensorsFile::open(&fixture(&format!(
        "tiny-llama/lora-a-r4-qv/{dir}/grads.safetensors"
    )))
    .unwrap();
    assert_eq!(want.names().len(), 2 * grads.modules.len());
    for (id, (da, db)) in &grads.modules {
        for (key, got) in [(key_a(id), da), (key_b(id), db)] {
            let (w, _) = want.tensor_f32(&key).unwrap();
            let max_g = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let max_d = got
                .iter()
                .zip(&w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            let rel = max_d / max_g;
            assert!(rel <= 1e-5, "{dir} {key}: max|Δg|/max|g| = {rel:e}");
            eprintln!("{dir} {key}: max|Δg|/max|g| = {rel:.2e}");
        }
    }
}

#[test]
fn gradients_match_float64_peft_reference() {
    check_grads_against_fixture("grad");
}

#[test]
fn gradients_with_unequal_masks_use_the_token_level_mean() {
    check_grads_against_fixture("grad-varmask");
}

#[test]
fn gradients_match_finite_differences() {
    // Central differences of the loss (f32 forward, f64 accumulation of the loss) along a few
    // coordinates of A and B. f32 rounding in the forward limits this check to ~1e-2 relative;
    // the f64 fixture comparison above is the precise one.
    let m = tiny_llama();
    let (_, adapter, grads) = tiny_grads("grad");
    let batch =
        SafetensorsFile::open(&fixture("tiny-llama/lora-a-r4-qv/grad/batch.safetensors")).unwrap();
    let (ids, shape) = batch.tensor_i64("input_ids").unwrap();
    let (labels, _) = batch.tensor_i64("labels").unwrap();
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let (b, t) = (shape[0], shape[1]);
    let targets = target_positions(&labels, b, t);
    let loss_of = |ad: &Adapter| {
        let mut acts = Activations::default();
        m.model
            .train_forward(&ids, b, t, Some(ad), Dropout::NONE, &mut acts)
            .unwrap();
        lm_head_loss(&m.model, &acts.x_final, &targets, 0.0, 1.0, None) / targets.len() as f64
    };
    let h = 1e-2f32;
    let mut checked = 0;
    for (id, (da, db)) in &grads.modules {
        for (is_a, g) in [(true, da), (false, db)] {
            // The coordinate with the largest gradient, where relative error is meaningful.
            let (i, &gi) = g
                .iter()
                .enumerate()
                .max_by(|x, y| x.1.abs().total_cmp(&y.1.abs()))
                .unwrap();
            let mut plus = adapter.clone();
            let mut minus = adapter.clone();
            let pick = |a: &mut Adapter| -> *mut f32 {
                let w = a.modules.get_mut(id).unwrap();
                if is_a {
                    &mut w.a[i]
                } else {
                    &mut w.b[i]
                }
            };
            unsafe {
                *pick(&mut plus) += h;
                *pick(&mut minus) -= h;
            }
            let fd = (loss_of(&plus) - loss_of(&minus)) / (2.0 * h as f64);
            let rel = (fd - gi as f64).abs() / (gi.abs() as f64);
            assert!(
                rel < 2e-2,
                "{} {}[{i}]: fd {fd} vs backward {gi}",
                id.path(),
                if is_a { "A" } else { "B" }
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 8);
}

/// Layer 0's q_proj weight [out, in].
fn q_weight(model: &lorakit::model::Decoder) -> Vec<f32> {
    model.layers[0]
        .linear(lorakit::lora::ModuleKind::Q)
        .expect("a Llama layer has q_proj")
        .weight_f32()
        .into_owned()
}
