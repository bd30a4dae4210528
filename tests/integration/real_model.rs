//! The real SmolLM2-135M-Instruct GGUF against transformers' output on the same file
//! (fixtures in `tests/fixtures/smollm2/`). The model is fetched by `scripts/fetch-model.sh`.

use lorakit::generate::{generate, SamplingParams};
use lorakit::tokenize::ChatMessage;

use crate::common::*;

#[test]
fn smollm2_gguf_logits_match_transformers() {
    let m = real_model();
    let meta = read_json("smollm2/meta.json");
    let v = m.model.config.vocab_size;
    for record in ["plain", "chat"] {
        let ids = ids_of(&meta["prompts"][record]["ids"]);
        let want = logits_record("smollm2/logits_base.safetensors", record);
        assert!(want.full.is_some(), "the base fixture has full logits");
        let ours = m.model.logits(&ids).unwrap();
        compare_logits(&ours, v, &want, 1e-3, &format!("smollm2 {record}"));
    }
}

#[test]
fn smollm2_greedy_continuations_match_transformers() {
    let m = real_model();
    let meta = read_json("smollm2/meta.json");
    for record in ["plain", "chat"] {
        let ids = ids_of(&meta["prompts"][record]["ids"]);
        let want = ids_of(&meta["greedy_base"][record]["ids"]);
        // The fixture's generation does not stop at EOS: 32 new tokens every time.
        let params = SamplingParams {
            max_new_tokens: 32,
            ..Default::default()
        };
        let got = generate(&m.model, &ids, &params, |_| Ok(())).unwrap();
        assert_eq!(got, want, "greedy continuation of '{record}'");
    }
}

#[test]
fn gguf_tokenizer_matches_hf_on_every_fixture_string() {
    let tok = real_model().tokenizer().unwrap();
    let cases = read_json("tokenizer/tokenizer_cases.json");
    let cases = cases["cases"]
        .as_array()
        .or_else(|| cases.as_array())
        .expect("cases array");
    assert_eq!(cases.len(), 45);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = ids_of(&case["ids"]);
        let got = tok.encode(text, true).unwrap();
        assert_eq!(got, want, "ids of {text:?}");
        assert_eq!(
            tok.decode(&got, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decode of {text:?}"
        );
        assert_eq!(
            tok.decode(&got, true).unwrap(),
            case["decoded_skip_special_tokens"].as_str().unwrap(),
            "decode (skip special) of {text:?}"
        );
    }
}

#[test]
fn gguf_chat_template_renders_like_transformers() {
    let m = real_model();
    let cases = read_json("tokenizer/chat_template_cases.json");
    let main = &cases["main"];
    let messages: Vec<ChatMessage> = serde_json::from_value(main["messages"].clone()).unwrap();
    let text = m
        .tokenizer()
        .unwrap()
        .apply_chat_template(&messages, true)
        .unwrap();
    assert_eq!(text, main["text"].as_str().unwrap());
    assert_eq!(
        m.tokenizer().unwrap().encode(&text, true).unwrap(),
        ids_of(&main["ids"])
    );
}

#[test]
fn score_cli_logprobs_match_fixture_log_softmax() {
    // lorakit score on the real model vs log_softmax of transformers' full logits.
    let meta = read_json("smollm2/meta.json");
    let ids = ids_of(&meta["prompts"]["plain"]["ids"]);
    let want = logits_record("smollm2/logits_base.safetensors", "plain");
    let full = want.full.as_ref().unwrap();
    let v = 49152;
    let model = real_model_path();
    let ids_arg = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let out = lorakit(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        &ids_arg,
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tokens = json["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), ids.len());
    assert!(
        tokens[0]["logprob"].is_null(),
        "the first token has no logprob"
    );
    let mut total = 0.0;
    let mut max_diff = 0.0f64;
    for t in 1..ids.len() {
        let expected = full[(t - 1) * v + ids[t] as usize] as f64 - want.lse[t - 1] as f64;
        let got = tokens[t]["logprob"].as_f64().unwrap();
        max_diff = max_diff.max((got - expected).abs());
        total += got;
        assert_eq!(tokens[t]["id"].as_u64().unwrap() as u32, ids[t]);
    }
    assert!(max_diff <= 1e-3, "max |logprob diff| {max_diff}");
    assert!((json["total_logprob"].as_f64().unwrap() - total).abs() < 1e-6);
    let ppl = (-total / (ids.len() - 1) as f64).exp();
    assert!((json["perplexity"].as_f64().unwrap() - ppl).abs() < 1e-6 * ppl);
}

#[test]
fn generate_cli_streams_the_greedy_continuation() {
    let meta = read_json("smollm2/meta.json");
    let prompt = meta["prompts"]["plain"]["text"].as_str().unwrap();
    let continuation = meta["greedy_base"]["plain"]["text"].as_str().unwrap();
    let model = real_model_path();
    let out = lorakit(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "32",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{prompt}{continuation}\n")
    );
}

#[test]
fn generate_cli_chat_uses_the_template_and_stops_at_eos() {
    let meta = read_json("smollm2/meta.json");
    let greedy = &meta["greedy_base"]["chat"];
    let want_text = greedy["text_until_eos"].as_str().unwrap();
    let model = real_model_path();
    let out = lorakit(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--system",
        "You are a helpful assistant.",
        "--chat",
        "Why is the sky blue?",
        "--max-new-tokens",
        "32",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{want_text}\n")
    );
}

#[test]
fn inspect_cli_describes_the_real_model() {
    let model = real_model_path();
    let out = lorakit(&["inspect", model.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "architecture:  llama",
        "Q4_1",
        "Q8_0",
        "30 layers",
        "chat template: present",
        "134515008",
    ] {
        assert!(
            text.contains(needle),
            "inspect output lacks {needle:?}:\n{text}"
        );
    }
}

#[test]
fn tokenizer_from_gguf_file_equals_the_loaders_on_smollm2() {
    // `Tokenizer::from_gguf` (which reads `general.architecture` too) builds the same tokenizer
    // for SmolLM2 as the model loader does.
    let f = lorakit::io::gguf::GgufFile::open(&real_model_path()).unwrap();
    let tok = lorakit::tokenize::Tokenizer::from_gguf(&f).unwrap();
    let loaded = real_model().tokenizer().unwrap();
    assert_eq!(tok.describe(), loaded.describe());
    let cases = read_json("tokenizer/tokenizer_cases.json");
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids_of(&case["ids"]),
            "{text:?}"
        );
    }
}
