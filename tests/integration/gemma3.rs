//! Gemma 3 270M (base, Q4_K_M GGUF, fetched by `scripts/fetch-model.sh gemma3-270m`) against the
//! `gguf` package and transformers on the same file (`tests/data/gemma3-270m/`, made by
//! `scripts/make-gemma3-fixture.py`): the tensor types and their dequantisation, and the tokenizer
//! built from the GGUF metadata.

use std::collections::BTreeMap;
use std::time::Instant;

use lorakit::io::gguf::GgufFile;
use lorakit::io::safetensors_file::SafetensorsFile;
use lorakit::tokenize::{ChatMessage, Tokenizer};

use crate::common::*;

fn gemma3_json(name: &str) -> serde_json::Value {
    let p = data_file(&format!("gemma3-270m/{name}"));
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn gemma3_tensor_types_all_dequantise() {
    let f = GgufFile::open(&gemma3_path()).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), "gemma3");
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for t in f.tensors() {
        *counts.entry(t.dtype.name()).or_default() += 1;
    }
    let want: BTreeMap<&str, usize> = [
        ("F32", 109),
        ("Q4_K", 27),
        ("Q5_0", 81),
        ("Q6_K", 9),
        ("Q8_0", 10),
    ]
    .into_iter()
    .collect();
    assert_eq!(counts, want);
    // Every tensor turns into finite f32 values of its shape.
    let mut n_values = 0usize;
    for t in f.tensors() {
        let (values, shape) = f.tensor_f32(&t.name).unwrap();
        assert_eq!(shape, t.shape(), "{}", t.name);
        assert_eq!(values.len() as u64, t.n_elements(), "{}", t.name);
        assert!(
            values.iter().all(|v| v.is_finite()),
            "{}: a value is not finite",
            t.name
        );
        n_values += values.len();
    }
    assert_eq!(f.tensors().len(), 236);
    eprintln!("gemma3: {n_values} values in {} tensors", f.tensors().len());
}

#[test]
fn gemma3_blocks_equal_the_model_file_and_python_gguf() {
    // The fixture's blocks are the model's own first rows, and both dequantise to the values
    // of `gguf.quants.dequantize` bit for bit.
    let model = GgufFile::open(&gemma3_path()).unwrap();
    let blocks = GgufFile::open(&data_file("gemma3-270m/blocks.gguf")).unwrap();
    let expected =
        SafetensorsFile::open(&data_file("gemma3-270m/blocks.expected.safetensors")).unwrap();
    assert_eq!(blocks.tensors().len(), 5);
    for t in blocks.tensors() {
        let m = model.tensor_info(&t.name).expect("tensor in the model");
        assert_eq!(m.dtype, t.dtype, "{}", t.name);
        let fixture_bytes = blocks.tensor_bytes(t);
        assert_eq!(
            &model.tensor_bytes(m)[..fixture_bytes.len()],
            fixture_bytes,
            "{}: the fixture's blocks are not the model's first rows",
            t.name
        );
        let (want, _) = expected.tensor_f32(&t.name).unwrap();
        let (got, _) = model.tensor_f32(&t.name).unwrap();
        for (i, (g, w)) in got[..want.len()].iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{} value {i}: {g} vs {w}", t.name);
        }
    }
}

/// FNV-1a 64, as `scripts/make-gemma3-fixture.py` computes it.
fn fnv1a64<'a>(chunks: impl IntoIterator<Item = Vec<u8>> + 'a) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for chunk in chunks {
        for b in chunk {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn gemma3_tokenizer() -> &'static Tokenizer {
    static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    TOK.get_or_init(|| {
        let path = gemma3_path();
        let start = Instant::now();
        let f = GgufFile::open(&path).unwrap();
        let opened = start.elapsed().as_secs_f64();
        let tok = Tokenizer::from_gguf(&f).unwrap();
        eprintln!(
            "gemma3 tokenizer: GGUF open {opened:.2} s, tokenizer built {:.2} s later",
            start.elapsed().as_secs_f64() - opened
        );
        tok
    })
}

#[test]
fn gemma3_tokenizer_matches_transformers_on_every_case() {
    let tok = gemma3_tokenizer();
    let doc = gemma3_json("tokenizer_cases.json");
    let cases = doc["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 55);
    assert_eq!(doc["n_shared_cases"], 45);
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = ids_of(&case["ids"]);
        let got = tok.encode(text, true).unwrap();
        if got != want {
            failures.push(format!("encode({text:?}) = {got:?}, want {want:?}"));
        }
        let want_plain = ids_of(&case["ids_without_special_tokens"]);
        let got_plain = tok.encode(text, false).unwrap();
        if got_plain != want_plain {
            failures.push(format!(
                "encode({text:?}, false) = {got_plain:?}, want {want_plain:?}"
            ));
        }
        for (skip, key) in [(false, "decoded"), (true, "decoded_skip_special_tokens")] {
            let got = tok.decode(&want, skip).unwrap();
            if got != case[key].as_str().unwrap() {
                failures.push(format!(
                    "decode({want:?}, skip={skip}) = {got:?}, want {}",
                    case[key]
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn gemma3_tokenizer_specials_vocabulary_and_merges_equal_transformers() {
    let tok = gemma3_tokenizer();
    let doc = gemma3_json("tokenizer_cases.json");
    assert_eq!(
        tok.vocab_size(),
        doc["vocab_size"].as_u64().unwrap() as usize
    );
    assert_eq!(
        tok.bos_id(),
        Some(doc["bos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        tok.eos_id(),
        Some(doc["eos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        tok.pad_id(),
        Some(doc["pad_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        tok.unk_id(),
        Some(doc["unk_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        tok.adds_bos(),
        doc["bos_added_by_default"].as_bool().unwrap()
    );
    assert!(tok.adds_bos());
    // <end_of_turn> ends generation too.
    assert!(tok.eos_ids().contains(&106), "{:?}", tok.eos_ids());

    // No chat template in the file, none in transformers: rendering one is an error.
    assert!(doc["chat_template"].is_null());
    assert_eq!(tok.chat_template(), None);
    assert!(tok
        .apply_chat_template(&[ChatMessage::new("user", "hi")], true)
        .is_err());

    // The whole tokenizer, as tokenizer.json documents: every component and the digests of
    // the vocabulary, the merges and the added tokens.
    let ours: serde_json::Value =
        serde_json::from_str(&tok.hf().to_string(false).unwrap()).unwrap();
    let want = &doc["backend"];
    for key in ["normalizer", "pre_tokenizer", "post_processor", "decoder"] {
        assert_eq!(ours[key], want[key], "{key}");
    }
    let model = &ours["model"];
    for (key, value) in want["model"].as_object().unwrap() {
        assert_eq!(&model[key], value, "model.{key}");
    }
    let vocab = model["vocab"].as_object().unwrap();
    let mut by_id = vec![""; vocab.len()];
    for (t, id) in vocab {
        by_id[id.as_u64().unwrap() as usize] = t;
    }
    assert_eq!(vocab.len(), want["n_vocab"].as_u64().unwrap() as usize);
    let merges = model["merges"].as_array().unwrap();
    assert_eq!(merges.len(), want["n_merges"].as_u64().unwrap() as usize);
    assert_eq!(
        merges[..20].to_vec(),
        want["first_merges"].as_array().unwrap().clone()
    );
    let added = ours["added_tokens"].as_array().unwrap();
    assert_eq!(
        added.len(),
        want["n_added_tokens"].as_u64().unwrap() as usize
    );
    let mut added: Vec<(u64, &str, bool)> = added
        .iter()
        .map(|a| {
            (
                a["id"].as_u64().unwrap(),
                a["content"].as_str().unwrap(),
                a["special"].as_bool().unwrap(),
            )
        })
        .collect();
    added.sort();
    let digests = [
        (
            "vocab_fnv1a64",
            fnv1a64(by_id.iter().map(|t| [t.as_bytes(), b"\0"].concat())),
        ),
        (
            "merges_fnv1a64",
            fnv1a64(merges.iter().map(|m| {
                let (l, r) = (m[0].as_str().unwrap(), m[1].as_str().unwrap());
                [l.as_bytes(), b"\0", r.as_bytes(), b"\x01"].concat()
            })),
        ),
        (
            "added_tokens_fnv1a64",
            fnv1a64(
                added
                    .iter()
                    .map(|(id, c, s)| format!("{id}\0{c}\0{}\x01", *s as u8).into_bytes()),
            ),
        ),
    ];
    for (key, got) in digests {
        assert_eq!(got, want[key].as_str().unwrap(), "{key}");
    }
}

/// The model as `load_model` opens it (shared by the forward tests: 0.5 s to load).
fn gemma3_model() -> &'static lorakit::model::LoadedModel {
    static MODEL: std::sync::OnceLock<lorakit::model::LoadedModel> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| lorakit::model::load_model(&gemma3_path()).expect("load Gemma 3 270M"))
}

fn ids_at(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Per-token log-probs of a prompt against transformers on the same GGUF (f32, eager), within
/// 1e-3; the argmax equal wherever transformers' top-2 gap exceeds 2e-3.
fn check_logprobs(prompt: &str) {
    check_logprobs_of(&gemma3_model().model, prompt);
}

fn check_logprobs_of(model: &lorakit::model::Decoder, prompt: &str) {
    let r = gemma3_json("reference.json");
    let p = &r["prompts"][prompt];
    let ids = ids_at(&p["ids"]);
    let ours = lorakit::generate::token_logprobs(model, &ids).unwrap();
    let want: Vec<f64> = p["next_token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(ours.len(), want.len() + 1);
    let worst = ours[1..]
        .iter()
        .zip(&want)
        .map(|(o, w)| (o.unwrap() - w).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "gemma3 {prompt} ({} tokens): max |Δ logprob| = {worst:.2e}",
        ids.len()
    );
    assert!(worst < 1e-3, "{prompt}: log-probs differ by {worst}");
}

/// Gemma 3 270M written as an HF directory (what `merge` writes from this GGUF: a config.json
/// built from the GGUF metadata, f32 safetensors, the tokenizer) computes transformers' log-probs
/// on both prompts, the one past the sliding window included: the local/global layer types,
/// `query_pre_attn_scalar`, both RoPE tables and the stored-as-(1 + w) norms survive the trip.
#[test]
fn gemma3_written_as_an_hf_directory_keeps_transformers_logprobs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hf");
    let out = lorakit::io::output::prepare_output_dir(&dir, "merge", &[], false).unwrap();
    gemma3_model().save_hf_dir(&out).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "gemma3_text");
    assert_eq!(cfg["query_pre_attn_scalar"], 256);
    let hf = lorakit::model::load_model(&dir).unwrap();
    assert_eq!(hf.model.config.layers, gemma3_model().model.config.layers);
    check_logprobs_of(&hf.model, "short");
    check_logprobs_of(&hf.model, "long");
    let text = "The capital of France is";
    assert_eq!(
        hf.tokenizer().unwrap().encode(text, true).unwrap(),
        gemma3_model()
            .tokenizer()
            .unwrap()
            .encode(text, true)
            .unwrap()
    );
}

#[test]
fn gemma3_logprobs_match_transformers_short_prompt() {
    check_logprobs("short");
}

#[test]
fn gemma3_logprobs_match_transformers_past_the_sliding_window() {
    let r = gemma3_json("reference.json");
    let window = r["config"]["sliding_window"].as_u64().unwrap() as usize;
    assert!(ids_at(&r["prompts"]["long"]["ids"]).len() > window);
    check_logprobs("long");
}

#[test]
fn gemma3_greedy_32_tokens_equal_transformers() {
    let r = gemma3_json("reference.json");
    let p = &r["prompts"]["short"];
    let prompt = ids_at(&p["ids"]);
    let want = ids_at(&p["greedy_new_ids"]);
    let m = gemma3_model();
    let params = lorakit::generate::SamplingParams {
        temperature: 0.0,
        max_new_tokens: want.len(),
        stop_ids: vec![],
        ..Default::default()
    };
    let got = lorakit::generate::generate(&m.model, &prompt, &params, |_| Ok(())).unwrap();
    assert_eq!(got, want, "greedy continuation differs from transformers'");
}
