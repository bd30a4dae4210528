//! Golden logits on the tiny Llama (an HF directory in the fixtures).

use crate::common::*;

#[test]
fn tiny_llama_base_logits_match_transformers() {
    let m = tiny_llama();
    let meta = read_json("tiny-llama/meta.json");
    let want = logits_record("tiny-llama/logits_base.safetensors", "batch");
    let v = m.model.config.vocab_size;
    let mut ours = Vec::new();
    for row in meta["batch"]["input_ids"].as_array().unwrap() {
        ours.extend(m.model.logits(&ids_of(row)).unwrap());
    }
    compare_logits(&ours, v, &want, 1e-4, "tiny-llama base");
}

#[test]
fn tiny_llama_cached_decode_equals_full_forward() {
    // Prefill 5 tokens, then feed the rest one at a time: the KV cache must reproduce the
    // logits of one full forward pass.
    use lorakit::model::llama::Logits;
    let m = tiny_llama();
    let meta = read_json("tiny-llama/meta.json");
    let ids = ids_of(&meta["batch"]["input_ids"][0]);
    let v = m.model.config.vocab_size;
    let full = m.model.logits(&ids).unwrap();
    let mut cache = m.model.new_cache(ids.len()).unwrap();
    let mut last = m
        .model
        .forward(&ids[..5], &mut cache, Logits::Last)
        .unwrap();
    assert_max_diff(&last, &full[4 * v..5 * v], 1e-5);
    for t in 5..ids.len() {
        last = m
            .model
            .forward(&ids[t..t + 1], &mut cache, Logits::Last)
            .unwrap();
        assert_max_diff(&last, &full[t * v..(t + 1) * v], 1e-5);
    }
}

fn assert_max_diff(a: &[f32], b: &[f32], tol: f32) {
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(d <= tol, "max diff {d} > {tol}");
}

#[test]
fn tiny_llama_score_cli_matches_fixture_log_softmax() {
    // The fixture stores every 16th logit column, so score prefixes of row 0 followed by a token
    // whose id is a multiple of 16: its logprob is then strided[t-1][id/16] - lse[t-1].
    let meta = read_json("tiny-llama/meta.json");
    let ids = ids_of(&meta["batch"]["input_ids"][0]);
    let want = logits_record("tiny-llama/logits_base.safetensors", "batch");
    let sv = 49152 / 16;
    let model = fixture("tiny-llama");
    let mut max_diff = 0.0f64;
    for t in 1..ids.len() {
        let probe = (ids[t] / 16) * 16;
        let mut seq: Vec<u32> = ids[..t].to_vec();
        seq.push(probe);
        let arg = seq.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let out = lorakit(&[
            "score",
            "--model",
            model.to_str().unwrap(),
            "--ids",
            &arg,
            "--json",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let got = json["tokens"][t]["logprob"].as_f64().unwrap();
        let expected =
            want.strided[(t - 1) * sv + (probe / 16) as usize] as f64 - want.lse[t - 1] as f64;
        max_diff = max_diff.max((got - expected).abs());
    }
    assert!(max_diff <= 1e-4, "max |logprob diff| {max_diff}");
}
