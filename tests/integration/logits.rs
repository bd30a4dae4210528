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
    use lorakit::model::decoder::Logits;
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

#[test]
fn sharded_hf_directory_loads_like_the_single_file() {
    // Split the tiny Llama's weights into two shards with an index, as transformers writes
    // large checkpoints; the logits must not change.
    use lorakit::io::safetensors_file::SafetensorsFile;
    let src = fixture("tiny-llama");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let st = SafetensorsFile::open(&src.join("model.safetensors")).unwrap();
    let names = st.names();
    let mut weight_map = serde_json::Map::new();
    for (shard, chunk) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = chunk
            .iter()
            .map(|n| {
                let (data, shape) = st.tensor_f32(n).unwrap();
                (
                    n.clone(),
                    shape,
                    data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .unwrap(),
                )
            })
            .collect();
        std::fs::write(
            dir.path().join(&file),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
        for n in chunk {
            weight_map.insert(n.clone(), serde_json::json!(file));
        }
    }
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let sharded = lorakit::model::load_model(dir.path()).unwrap();
    let ids = ids_of(&read_json("tiny-llama/meta.json")["batch"]["input_ids"][0]);
    assert_eq!(
        sharded.model.logits(&ids).unwrap(),
        tiny_llama().model.logits(&ids).unwrap()
    );
}

#[test]
fn qwen2_switch_adds_qkv_biases() {
    // The same weights as a Qwen2 checkpoint: q/k/v biases are read and applied. Zero biases
    // give exactly the Llama logits; non-zero ones change them.
    use lorakit::io::safetensors_file::SafetensorsFile;
    let src = fixture("tiny-llama");
    let st = SafetensorsFile::open(&src.join("model.safetensors")).unwrap();
    let ids = ids_of(&read_json("tiny-llama/meta.json")["batch"]["input_ids"][0]);
    let base = tiny_llama().model.logits(&ids).unwrap();
    for bias_value in [0.0f32, 0.05] {
        let dir = tempfile::tempdir().unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        let mut cfg = read_json("tiny-llama/config.json");
        cfg["model_type"] = serde_json::json!("qwen2");
        cfg["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
            .names()
            .iter()
            .map(|n| {
                let (data, shape) = st.tensor_f32(n).unwrap();
                (
                    n.clone(),
                    shape,
                    data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            })
            .collect();
        for layer in 0..2 {
            for (proj, out) in [("q_proj", 64usize), ("k_proj", 32), ("v_proj", 32)] {
                let b: Vec<u8> = (0..out)
                    .flat_map(|i| (bias_value * (i % 3) as f32).to_le_bytes())
                    .collect();
                tensors.push((
                    format!("model.layers.{layer}.self_attn.{proj}.bias"),
                    vec![out],
                    b,
                ));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .unwrap(),
                )
            })
            .collect();
        std::fs::write(
            dir.path().join("model.safetensors"),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
        let m = lorakit::model::load_model(dir.path()).unwrap();
        assert_eq!(m.model.config.arch, lorakit::model::Arch::Qwen2);
        let logits = m.model.logits(&ids).unwrap();
        if bias_value == 0.0 {
            assert_eq!(logits, base);
        } else {
            assert!(
                logits.iter().zip(&base).any(|(a, b)| (a - b).abs() > 1e-3),
                "biases must change the output"
            );
        }
    }
}
