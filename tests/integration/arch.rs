//! Every architecture of the decoder against transformers 5.24 + PEFT 0.21 in float64
//! (tests/data/arch, made by scripts/make-arch-fixtures.py): per-token logits of the base model,
//! with a random PEFT adapter unmerged and merged, the LoRA gradients and the full fine-tuning
//! gradients. Tolerances as that README: logits 1e-4 absolute, loss 1e-5, gradients
//! max|Δg| / max|g| ≤ 1e-5 per tensor (f32 arithmetic against f64 references; HF's own f32 run
//! reaches 5.3e-6 on one of them).

use std::path::{Path, PathBuf};

use lorakit::io::safetensors_file::SafetensorsFile;
use lorakit::lora::peft::{key_a, key_b, Adapter};
use lorakit::model::decoder_train::{Activations, Dropout, FullGrads, LoraGrads};
use lorakit::model::load::load_hf_weights;
use lorakit::model::{Config, Decoder};
use lorakit::train::loss::{
    lm_head_loss, lm_head_loss_with_head_grads, target_positions, HeadGrads,
};

use crate::common::*;

pub(crate) fn arch_dir(family: &str) -> PathBuf {
    repo_root().join("tests/data/arch").join(family)
}

fn load(family: &str) -> Decoder {
    let dir = arch_dir(family);
    let config = Config::from_hf_json(&dir.join("config.json")).unwrap();
    load_hf_weights(&dir, config).unwrap()
}

/// The batch: ids [2, T] and labels [2, T].
pub(crate) fn batch(dir: &Path) -> (Vec<Vec<u32>>, Vec<i64>, usize) {
    let f = SafetensorsFile::open(&dir.join("batch.safetensors")).unwrap();
    let (ids, shape) = f.tensor_i64("input_ids").unwrap();
    let (labels, _) = f.tensor_i64("labels").unwrap();
    let t = shape[1];
    let rows = ids
        .chunks(t)
        .map(|r| r.iter().map(|&i| i as u32).collect())
        .collect();
    (rows, labels, t)
}

pub(crate) fn tensor(dir: &Path, file: &str, key: &str) -> Vec<f32> {
    SafetensorsFile::open(&dir.join(file))
        .unwrap()
        .tensor_f32(key)
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .0
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// max|ours − want| / max|want|.
fn rel_err(ours: &[f32], want: &[f32]) -> f64 {
    assert_eq!(ours.len(), want.len());
    let scale = want.iter().map(|v| v.abs() as f64).fold(0.0, f64::max);
    let diff = ours
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max);
    diff / scale.max(1e-30)
}

fn all_logits(model: &Decoder, rows: &[Vec<u32>]) -> Vec<f32> {
    rows.iter().flat_map(|r| model.logits(r).unwrap()).collect()
}

/// Base, unmerged and merged logits against the float64 references.
fn check_logits(family: &str) {
    let dir = arch_dir(family);
    let model = load(family);
    let (rows, _, _) = batch(&dir);
    let base = all_logits(&model, &rows);
    let want = tensor(&dir, "logits_base.safetensors", "logits");
    let e = max_abs_diff(&base, &want);
    assert!(e < 1e-4, "{family}: base logits differ by {e}");

    let adapter = Adapter::load(&dir.join("lora"), &model.config).unwrap();
    let mut m = model.clone();
    m.attach_adapter(&adapter, 1.0).unwrap();
    let unmerged = all_logits(&m, &rows);
    let want_u = tensor(&dir, "logits_lora.safetensors", "unmerged");
    let eu = max_abs_diff(&unmerged, &want_u);
    assert!(
        eu < 1e-4,
        "{family}: unmerged adapter logits differ by {eu}"
    );
    // The adapter must matter, or the two checks above prove nothing about it.
    assert!(
        max_abs_diff(&want_u, &want) > 1.0,
        "{family}: adapter has no effect"
    );
    m.merge_adapters().unwrap();
    let merged = all_logits(&m, &rows);
    let want_m = tensor(&dir, "logits_lora.safetensors", "merged");
    let em = max_abs_diff(&merged, &want_m);
    assert!(em < 1e-4, "{family}: merged logits differ by {em}");
}

/// The training forward + backward of LoRA against the float64 gradients.
fn check_lora_grads(family: &str) {
    let dir = arch_dir(family);
    let model = load(family);
    let (rows, labels, t) = batch(&dir);
    let ids: Vec<u32> = rows.concat();
    let b = rows.len();
    let adapter = Adapter::load(&dir.join("lora"), &model.config).unwrap();
    let mut acts = Activations::default();
    model
        .train_forward(&ids, b, t, Some(&adapter), Dropout::NONE, &mut acts)
        .unwrap();
    let targets = target_positions(&labels, b, t);
    let n = targets.len() as f64;
    let mut dx = vec![0.0f32; b * t * model.config.hidden_size];
    let loss = lm_head_loss(&model, &acts.x_final, &targets, 0.0, n, Some(&mut dx)) / n;
    let mut grads = LoraGrads::zeros_like(&adapter);
    model
        .train_backward(&mut dx, &acts, &adapter, Dropout::NONE, &mut grads)
        .unwrap();
    let meta = read_json_path(&dir.join("meta.json"));
    let want_loss = meta["loss"]["lora_f64"].as_f64().unwrap();
    assert!(
        (loss - want_loss).abs() < 1e-5,
        "{family}: LoRA loss {loss} vs {want_loss}"
    );
    let want = SafetensorsFile::open(&dir.join("grads_lora.safetensors")).unwrap();
    assert_eq!(
        want.names().len(),
        2 * grads.modules.len(),
        "{family}: module count"
    );
    for (id, (da, db)) in &grads.modules {
        for (key, g) in [(key_a(id), da), (key_b(id), db)] {
            let (w, _) = want.tensor_f32(&key).unwrap();
            let e = rel_err(g, &w);
            assert!(e <= 1e-5, "{family}: {key}: max|Δg|/max|g| = {e:.3e}");
        }
    }
}

/// Full fine-tuning's gradients of every parameter against the float64 ones.
fn check_full_grads(family: &str) {
    let dir = arch_dir(family);
    let mut model = load(family);
    let (rows, labels, t) = batch(&dir);
    let ids: Vec<u32> = rows.concat();
    let b = rows.len();
    let mut acts = Activations::default();
    model
        .train_forward(&ids, b, t, None, Dropout::NONE, &mut acts)
        .unwrap();
    let targets = target_positions(&labels, b, t);
    let n = targets.len() as f64;
    let mut grads = FullGrads::zeros_like(&model);
    let mut dx = vec![0.0f32; b * t * model.config.hidden_size];
    let FullGrads {
        embed_tokens,
        norm,
        norm_bias,
        lm_head,
        ..
    } = &mut grads;
    let head = lm_head.as_deref_mut().unwrap_or(embed_tokens);
    let loss = lm_head_loss_with_head_grads(
        &model,
        &acts.x_final,
        &targets,
        0.0,
        n,
        Some(&mut dx),
        Some(HeadGrads {
            norm,
            norm_bias: norm_bias.as_deref_mut(),
            head,
        }),
    ) / n;
    model
        .train_backward_full(&mut dx, &acts, &mut grads)
        .unwrap();
    let meta = read_json_path(&dir.join("meta.json"));
    let want_loss = meta["loss"]["base_f64"].as_f64().unwrap();
    assert!(
        (loss - want_loss).abs() < 1e-5,
        "{family}: loss {loss} vs {want_loss}"
    );
    let want = SafetensorsFile::open(&dir.join("grads_full.safetensors")).unwrap();
    let conv1d = lorakit::model::arch::model_names(model.config.arch).conv1d;
    let params = model.params_with_grads(&mut grads).unwrap();
    let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names.len(),
        want.names().len(),
        "{family}: parameters {names:?} vs the reference's {:?}",
        want.names()
    );
    for p in &params {
        let (name, g) = (&p.name, &*p.grad);
        let (w, shape) = want
            .tensor_f32(name)
            .unwrap_or_else(|e| panic!("{family}: {name} has no reference gradient: {e}"));
        // GPT-2's Conv1D layers are [in, out] in HF, [out, in] here.
        let w = if conv1d && shape.len() == 2 && name.contains(".h.") {
            lorakit::model::load::transpose(&w, shape[0], shape[1])
        } else {
            w
        };
        let e = rel_err(g, &w);
        assert!(e <= 1e-5, "{family}: {name}: max|Δg|/max|g| = {e:.3e}");
    }
}

/// The same weights as llama.cpp's converter lays them out (`model.f32.gguf`): lorakit's GGUF
/// reader (names, q/k row order, rope_freqs, fused tensors) gives the HF logits.
fn check_gguf_logits(family: &str) {
    let dir = arch_dir(family);
    let loaded = lorakit::model::load_model(&dir.join("model.f32.gguf")).unwrap();
    let (rows, _, _) = batch(&dir);
    let got = all_logits(&loaded.model, &rows);
    let want = tensor(&dir, "logits_base.safetensors", "logits");
    let e = max_abs_diff(&got, &want);
    assert!(e < 1e-4, "{family}: GGUF logits differ by {e}");
}

fn read_json_path(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// `expected ⊇ got` up to float rounding: every key `got` has that `expected` also has holds the
/// same value (numbers within 1e-6 relative: GGUF keeps some as f32). Returns the keys compared.
fn json_agrees(got: &serde_json::Value, expected: &serde_json::Value, at: &str) -> usize {
    use serde_json::Value;
    match (got, expected) {
        (Value::Object(g), Value::Object(e)) => g
            .iter()
            .filter(|(k, _)| e.contains_key(*k))
            .map(|(k, v)| json_agrees(v, &e[k], &format!("{at}.{k}")))
            .sum(),
        (Value::Number(g), Value::Number(e)) => {
            let (g, e) = (g.as_f64().unwrap(), e.as_f64().unwrap());
            assert!(
                (g - e).abs() <= 1e-6 * e.abs(),
                "{at}: {g} vs transformers' {e}"
            );
            1
        }
        _ => {
            assert_eq!(got, expected, "{at}");
            1
        }
    }
}

/// A model read from GGUF and written as an HF directory (`merge`'s output when no config.json
/// came with the model): the config.json agrees with the one transformers wrote for the same
/// model, and the directory computes transformers' logits.
#[test]
fn gguf_models_write_the_config_json_transformers_wrote() {
    for family in ["llama", "qwen2", "qwen3", "phi3", "olmo2"] {
        let dir = arch_dir(family);
        let loaded = lorakit::model::load_model(&dir.join("model.f32.gguf")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let hf = tmp.path().join("hf");
        let out = lorakit::io::output::prepare_output_dir(&hf, "merge", &[], false).unwrap();
        loaded.save_hf_dir(&out).unwrap();
        let ours = read_json_path(&hf.join("config.json"));
        let theirs = read_json_path(&dir.join("config.json"));
        let n = json_agrees(&ours, &theirs, family);
        for key in [
            "model_type",
            "hidden_size",
            "num_key_value_heads",
            "head_dim",
            "rms_norm_eps",
            "tie_word_embeddings",
        ] {
            assert!(
                ours.get(key).is_some() || theirs.get(key).is_none(),
                "{family}: no {key}"
            );
        }
        eprintln!("{family}: {n} config values agree with transformers'");
        let back = lorakit::model::load_model(&hf).unwrap();
        let (rows, _, _) = batch(&dir);
        let e = max_abs_diff(
            &all_logits(&back.model, &rows),
            &tensor(&dir, "logits_base.safetensors", "logits"),
        );
        assert!(
            e < 1e-4,
            "{family}: the written directory's logits differ by {e}"
        );
    }
}

/// Llama 3's RoPE scaling reaches a GGUF only as llama.cpp's table of divisors, which
/// config.json cannot state: writing that model as an HF directory is refused by name, and
/// nothing is left behind.
#[test]
fn gguf_llama3_rope_table_is_refused_for_config_json() {
    let loaded = lorakit::model::load_model(&arch_dir("llama3").join("model.f32.gguf")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    let out = lorakit::io::output::prepare_output_dir(&hf, "merge", &[], false).unwrap();
    let e = loaded.save_hf_dir(&out).unwrap_err().to_string();
    assert!(e.contains("rope_freqs"), "{e}");
    assert!(!hf.join("config.json").exists());
}

/// The GGUF layouts that can say what the HF model computes. Not here: mistral (a GGUF has no
/// sliding window), gemma3 (no query_pre_attn_scalar nor layer_types: llama.cpp assumes the
/// 270M-style defaults, tested on the real model), gpt2 (read from HF directories only).
#[test]
fn gguf_layouts_match_transformers() {
    for family in ["llama", "llama3", "qwen2", "qwen3", "phi3", "olmo2"] {
        check_gguf_logits(family);
    }
}

macro_rules! family_tests {
    ($($name:ident => $family:literal),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn logits_base_unmerged_merged() {
                    super::check_logits($family);
                }
                #[test]
                fn lora_gradients() {
                    super::check_lora_grads($family);
                }
                #[test]
                fn full_gradients() {
                    super::check_full_grads($family);
                }
            }
        )*
    };
}

family_tests! {
    llama => "llama",
    llama3 => "llama3",
    qwen2 => "qwen2",
    mistral => "mistral",
    qwen3 => "qwen3",
    gemma3 => "gemma3_text",
    phi3 => "phi3",
    olmo2 => "olmo2",
    gpt2 => "gpt2",
}

// ---------------------------------------------------------------------------------------------
// The CLI on the new families: bad input, and train → merge → score.

/// A copy of a family's tiny model with a tokenizer beside it (the tiny models have none; the
/// SmolLM2 tokenizer of tiny-llama serves, since these tests pass ids below 256).
fn cli_model(family: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let src = arch_dir(family);
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tiny-llama").join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

/// Rewrites `key` of the copy's config.json with `f`.
fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let path = dir.join("config.json");
    let mut v = read_json_path(&path);
    f(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    path
}

/// Exit code 1, one line on stderr, naming each of `names`; never a panic.
fn assert_one_line_error(o: &std::process::Output, names: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in names {
        assert!(err.contains(n), "the error does not name {n}: {err}");
    }
}

fn score_ids(model: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "score",
        "--model",
        s(model),
        "--ids",
        "5,17,200,33,9,41",
        "--json",
    ];
    args.extend_from_slice(extra);
    lorakit(&args)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn unknown_rope_type_activation_and_layer_type_name_file_and_key() {
    let m = cli_model("llama3");
    let cfg = edit_config(m.path(), |v| {
        v["rope_parameters"]["rope_type"] = "yarn2".into()
    });
    let o = score_ids(m.path(), &[]);
    assert_one_line_error(&o, &[s(&cfg), "rope_parameters.rope_type", "yarn2"]);

    let m = cli_model("gemma3_text");
    let cfg = edit_config(m.path(), |v| v["hidden_activation"] = "relu".into());
    let o = score_ids(m.path(), &[]);
    assert_one_line_error(&o, &[s(&cfg), "hidden_activation", "relu"]);

    let m = cli_model("qwen3");
    let cfg = edit_config(m.path(), |v| {
        v["layer_types"] = serde_json::json!(["full_attention", "chunked_attention"])
    });
    let o = score_ids(m.path(), &[]);
    assert_one_line_error(&o, &[s(&cfg), "layer_types[1]", "chunked_attention"]);
}

#[test]
fn gguf_missing_key_names_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("no-width.gguf");
    let mut g = GgufWriter::new();
    g.kv_str("general.architecture", "qwen3")
        .kv_u32("qwen3.block_count", 1)
        .kv_u32("qwen3.attention.head_count", 2)
        .kv_str("tokenizer.ggml.model", "llama")
        .kv_str_array("tokenizer.ggml.tokens", &["a", "b"]);
    g.write(&path);
    let o = score_ids(&path, &[]);
    assert_one_line_error(&o, &[s(&path), "qwen3.embedding_length"]);
}

#[test]
fn adapter_for_modules_the_architecture_lacks_is_refused() {
    // A Llama-style adapter (q_proj, gate_proj, ...) on Phi-3, whose projections are fused.
    let m = cli_model("phi3");
    let adapter = arch_dir("llama").join("lora");
    let o = score_ids(m.path(), &["--adapter", s(&adapter)]);
    assert_one_line_error(&o, &["adapter_config.json", "target_modules", "qkv_proj"]);
}

/// `lorakit train` on ids, `merge`, and the merged model scores as base + adapter does.
fn train_merge_score(family: &str) {
    let m = cli_model(family);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("train.jsonl");
    let rows: Vec<String> = (0..6)
        .map(|i| {
            let ids: Vec<u32> = (0..12).map(|j| (i * 37 + j * 11) % 256).collect();
            let labels: Vec<i64> = ids
                .iter()
                .enumerate()
                .map(|(j, &t)| if j < 4 { -100 } else { t as i64 })
                .collect();
            serde_json::json!({ "input_ids": ids, "labels": labels }).to_string()
        })
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let run = tmp.path().join("run");
    // Every linear module, by PEFT's names for this family.
    let want: Vec<&str> = match family {
        "phi3" => vec!["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
        _ => vec![
            "down_proj",
            "gate_proj",
            "k_proj",
            "o_proj",
            "q_proj",
            "up_proj",
            "v_proj",
        ],
    };
    let targets = want.join(",");
    let o = lorakit(&[
        "train",
        "--model",
        s(m.path()),
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--r",
        "4",
        "--alpha",
        "8",
        "--targets",
        &targets,
        "--lr",
        "1e-2",
        "--precision",
        "f32",
        "--quiet",
    ]);
    assert!(o.status.success(), "{family}: train: {}", stderr(&o));
    let cfg: serde_json::Value = read_json_path(&run.join("adapter_config.json"));
    let mut got: Vec<String> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    got.sort();
    assert_eq!(got, want, "{family}: PEFT's module names");
    let merged = tmp.path().join("merged");
    let o = lorakit(&[
        "merge",
        "--model",
        s(m.path()),
        "--adapter",
        s(&run),
        "--out",
        s(&merged),
    ]);
    assert!(o.status.success(), "{family}: merge: {}", stderr(&o));
    let logprobs = |o: std::process::Output| -> Vec<f64> {
        assert!(o.status.success(), "{family}: score: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .skip(1)
            .map(|t| t["logprob"].as_f64().unwrap())
            .collect()
    };
    let base = logprobs(score_ids(m.path(), &[]));
    let unmerged = logprobs(score_ids(m.path(), &["--adapter", s(&run)]));
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert!(merged.join(f).is_file(), "{family}: merged dir lacks {f}");
    }
    let merged_lp = logprobs(score_ids(&merged, &[]));
    let moved = base
        .iter()
        .zip(&unmerged)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        moved > 1e-3,
        "{family}: 3 steps did not change the model ({moved})"
    );
    for (a, b) in unmerged.iter().zip(&merged_lp) {
        assert!((a - b).abs() < 1e-4, "{family}: merged {b} vs unmerged {a}");
    }
    // The merged config.json is the source's, so transformers reads the same architecture.
    let src = read_json_path(&m.path().join("config.json"));
    let out = read_json_path(&merged.join("config.json"));
    assert_eq!(src["model_type"], out["model_type"]);
    assert_eq!(src["layer_types"], out["layer_types"]);
}

#[test]
fn cli_train_merge_score_on_new_families() {
    for family in ["llama3", "qwen3", "gemma3_text", "phi3", "olmo2"] {
        train_merge_score(family);
    }
}
