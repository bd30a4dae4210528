//! `--precision gguf`: inference multiplies with the GGUF file's own blocks (Q4_1/Q8_0 for SmolLM2,
//! Q4_K/Q5_0/Q6_K/Q8_0 for Gemma 3 270M's Q4_K_M file). Every
//! weight is used exactly as dequantised, so the result must equal the f32 path (and
//! transformers on the dequantised model) up to summation order.

use lorakit::generate::{generate, SamplingParams};
use lorakit::lora::ModuleKind;
use lorakit::model::{load_model_blocks, Weight};

use crate::common::*;

#[test]
fn gguf_blocks_give_transformers_logits_and_greedy_text() {
    let model = load_model_blocks(&real_model_path(), None).unwrap().model;
    // Every matrix in blocks, none also in f32 (the tied head is the embedding's blocks).
    assert!(
        model.layers.iter().all(|l| {
            l.kinds()
                .into_iter()
                .all(|k| matches!(l.linear(k).unwrap().weight, Weight::Quant(_)))
        }) && matches!(model.embed_tokens, Weight::Quant(_))
            && model.lm_head.is_none(),
        "the weights are not all in blocks: this test would check the f32 path"
    );
    let bytes = model.frozen_bytes();
    assert!(
        bytes.bf16 == 0 && bytes.f32 < 1_000_000 && bytes.blocks < 130_000_000,
        "{bytes:?}"
    );
    let meta = read_json("smollm2/meta.json");
    for record in ["plain", "chat"] {
        let ids = ids_of(&meta["prompts"][record]["ids"]);
        let want = logits_record("smollm2/logits_base.safetensors", record);
        let logits = model.logits(&ids).unwrap();
        // The f32 path's tolerance for this model (fixtures README): the weights are the same
        // numbers, only the order of the sums differs.
        let diff = compare_logits(&logits, model.config.vocab_size, &want, 1e-3, record);
        eprintln!("gguf blocks, {record}: max |logit diff| {diff:.2e}");
        let greedy = ids_of(&meta["greedy_base"][record]["ids"]);
        let params = SamplingParams {
            max_new_tokens: 32,
            ..Default::default()
        };
        let got = generate(&model, &ids, &params, |_| Ok(())).unwrap();
        assert_eq!(got, greedy, "greedy continuation of '{record}'");
    }
}

#[test]
fn gguf_blocks_with_an_unmerged_adapter_match_peft() {
    let mut model = load_model_blocks(&real_model_path(), None).unwrap().model;
    let adapter =
        lorakit::lora::peft::Adapter::load(&fixture("smollm2-peft-r8-qv/adapter"), &model.config)
            .unwrap();
    model.attach_adapter(&adapter, 1.0).unwrap();
    let meta = read_json("smollm2-peft-r8-qv/meta.json");
    let record = "plain";
    let ids = ids_of(&meta["prompts"][record]["ids"]);
    let want = logits_record("smollm2-peft-r8-qv/logits_adapter.safetensors", record);
    let logits = model.logits(&ids).unwrap();
    let diff = compare_logits(&logits, model.config.vocab_size, &want, 1e-3, record);
    eprintln!("gguf blocks + adapter: max |logit diff| {diff:.2e}");
}

#[test]
fn gguf_precision_needs_a_gguf_model() {
    let tiny = fixture("tiny-llama");
    let out = lorakit(&[
        "generate",
        "--model",
        tiny.to_str().unwrap(),
        "--prompt",
        "hi",
        "--precision",
        "gguf",
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--precision gguf needs a .gguf model"),
        "{err}"
    );
}

#[test]
fn gguf_k_quant_blocks_give_transformers_greedy_text_on_gemma3() {
    // Gemma 3 270M's Q4_K_M file (Q4_K, Q5_0, Q6_K and Q8_0 tensors) with --precision gguf:
    // log-probs of the 13-token prompt within the f32 path's 1e-3 of transformers', and the
    // greedy 32 tokens transformers gives.
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data_file("gemma3-270m/reference.json")).unwrap(),
    )
    .unwrap();
    let p = &r["prompts"]["short"];
    let prompt = ids_of(&p["ids"]);
    let want = ids_of(&p["greedy_new_ids"]);
    let model = load_model_blocks(&gemma3_path(), None).unwrap().model;
    let types: std::collections::BTreeSet<&str> = model
        .layers
        .iter()
        .flat_map(|l| {
            [
                ModuleKind::Q,
                ModuleKind::V,
                ModuleKind::O,
                ModuleKind::Down,
            ]
            .map(|k| {
                let lin = l.linear(k).unwrap();
                lin.weight.quant().expect("blocks").dtype.name()
            })
        })
        .collect();
    assert_eq!(
        types.into_iter().collect::<Vec<_>>(),
        ["Q4_K", "Q5_0", "Q6_K", "Q8_0"]
    );
    let logits = model.logits(&prompt).unwrap();
    let vocab = model.config.vocab_size;
    let lp: Vec<f64> = p["next_token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let mut max_diff = 0.0f64;
    for (t, want_lp) in lp.iter().enumerate() {
        let row = &logits[t * vocab..(t + 1) * vocab];
        let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        let got = row[prompt[t + 1] as usize] as f64 - lse;
        max_diff = max_diff.max((got - want_lp).abs());
    }
    eprintln!("Gemma 3 gguf blocks: max |log-prob diff| vs transformers {max_diff:.2e}");
    assert!(max_diff <= 1e-3, "{max_diff}");
    let params = SamplingParams {
        max_new_tokens: want.len(),
        ..Default::default()
    };
    let got = generate(&model, &prompt, &params, |_| Ok(())).unwrap();
    assert_eq!(got, want, "greedy continuation");
}
