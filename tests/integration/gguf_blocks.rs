//! `--precision gguf`: inference multiplies with the GGUF file's own Q4_1/Q8_0 blocks. Every
//! weight is used exactly as dequantised, so the result must equal the f32 path (and
//! transformers on the dequantised model) up to summation order.

use lorakit::generate::{generate, SamplingParams};
use lorakit::model::attach_gguf_blocks;

use crate::common::*;

#[test]
fn gguf_blocks_give_transformers_logits_and_greedy_text() {
    let mut model = real_model().model.clone();
    attach_gguf_blocks(&mut model, &real_model_path()).unwrap();
    assert!(
        model.layers.iter().all(|l| l.down_proj.quant.is_some()) && model.head_quant.is_some(),
        "the blocks were not attached: this test would check the f32 path"
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
    let mut model = real_model().model.clone();
    let adapter =
        lorakit::lora::peft::Adapter::load(&fixture("smollm2-peft-r8-qv/adapter"), &model.config)
            .unwrap();
    model.attach_adapter(&adapter, 1.0).unwrap();
    attach_gguf_blocks(&mut model, &real_model_path()).unwrap();
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
