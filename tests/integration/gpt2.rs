//! GPT-2 against the `tiny-gpt2` fixtures (HF transformers + PEFT): base, adapter (unmerged)
//! and merged logits, the Conv1D layout, and bad input.

use std::path::Path;
use std::sync::OnceLock;

use lorakit::lora::peft::Adapter;
use lorakit::lora::{ModuleId, ModuleKind};
use lorakit::model::load_hf_model;
use lorakit::model::Decoder as Gpt2Model;

use crate::common::*;

fn tiny_gpt2() -> &'static Gpt2Model {
    static MODEL: OnceLock<Gpt2Model> = OnceLock::new();
    MODEL.get_or_init(|| load_hf_model(&fixture("tiny-gpt2")).expect("load tiny-gpt2"))
}

/// Logits of both fixture rows, [2·12, vocab].
fn batch_logits(model: &Gpt2Model) -> Vec<f32> {
    let meta = read_json("tiny-gpt2/meta.json");
    let mut out = Vec::new();
    for row in meta["batch"]["input_ids"].as_array().unwrap() {
        out.extend(model.logits(&ids_of(row)).unwrap());
    }
    out
}

fn adapter() -> Adapter {
    Adapter::load(&fixture("tiny-gpt2/lora-r4-c_attn"), &tiny_gpt2().config).unwrap()
}

#[test]
fn tiny_gpt2_base_logits_match_transformers() {
    let m = tiny_gpt2();
    let want = logits_record("tiny-gpt2/logits_base.safetensors", "batch");
    assert!(want.full.is_some(), "the tiny-gpt2 fixture has full logits");
    compare_logits(&batch_logits(m), 512, &want, 1e-4, "tiny-gpt2 base");
}

#[test]
fn tiny_gpt2_adapter_unmerged_and_merged_match_peft() {
    let a = adapter();
    assert!(a.config.fan_in_fan_out);
    assert_eq!(
        a.modules.keys().map(|id| id.path()).collect::<Vec<_>>(),
        ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    );
    assert!(a.modules.values().all(|w| w.scale == 2.0));
    let mut m = tiny_gpt2().clone();
    m.attach_adapter(&a, 1.0).unwrap();
    let unmerged = batch_logits(&m);
    let want = logits_record(
        "tiny-gpt2/lora-r4-c_attn/logits_adapter.safetensors",
        "batch",
    );
    compare_logits(&unmerged, 512, &want, 1e-4, "tiny-gpt2 adapter (unmerged)");

    m.merge_adapters().unwrap();
    assert!(m.layers[0]
        .linear(ModuleKind::Qkv)
        .unwrap()
        .loras
        .is_empty());
    let merged = batch_logits(&m);
    let want = logits_record(
        "tiny-gpt2/lora-r4-c_attn/logits_merged.safetensors",
        "batch",
    );
    compare_logits(&merged, 512, &want, 1e-4, "tiny-gpt2 merged");
    let d = merged
        .iter()
        .zip(&unmerged)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("tiny-gpt2 merged vs unmerged: max |Δ| = {d:.2e}");
    assert!(d < 1e-4, "merged vs unmerged {d}");
    // The adapter changes the logits a lot (5.6 in the fixture), so the checks above see it.
    let base = batch_logits(tiny_gpt2());
    let effect = base
        .iter()
        .zip(&unmerged)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(effect > 1.0, "adapter effect {effect}");

    // Unmerge restores W0.
    m.unmerge_adapter(&a, 1.0).unwrap();
    let w0 = tiny_gpt2().layers[1]
        .linear(ModuleKind::Qkv)
        .unwrap()
        .weight_f32();
    let back = m.layers[1].linear(ModuleKind::Qkv).unwrap().weight_f32();
    let d = back
        .iter()
        .zip(w0.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(d < 1e-5, "unmerge: {d}");
}

/// The merge in HF's layout: W[in, out] += s·(B A)ᵀ, computed here from the files alone.
#[test]
fn merged_conv1d_weight_is_the_transposed_delta_and_saves_in_hf_layout() {
    let m0 = tiny_gpt2();
    let a = adapter();
    let mut m = m0.clone();
    m.attach_adapter(&a, 1.0).unwrap();
    m.merge_adapters().unwrap();
    let dir = tempfile_dir("gpt2-merged");
    let out = lorakit::io::output::prepare_output_dir(&dir, "merge", &[], false).unwrap();
    lorakit::model::save::save_hf_dir_copying(&m, &out, None).unwrap();

    let st = lorakit::io::safetensors_file::SafetensorsFile::open(&fixture(
        "tiny-gpt2/model.safetensors",
    ))
    .unwrap();
    let ad = lorakit::io::safetensors_file::SafetensorsFile::open(&fixture(
        "tiny-gpt2/lora-r4-c_attn/adapter_model.safetensors",
    ))
    .unwrap();
    let saved =
        lorakit::io::safetensors_file::SafetensorsFile::open(&dir.join("model.safetensors"))
            .unwrap();
    let key = "transformer.h.1.attn.c_attn.weight";
    let (w, shape) = st.tensor_f32(key).unwrap();
    assert_eq!(shape, [64, 192]);
    let (la, _) = ad
        .tensor_f32("base_model.model.transformer.h.1.attn.c_attn.lora_A.weight")
        .unwrap();
    let (lb, _) = ad
        .tensor_f32("base_model.model.transformer.h.1.attn.c_attn.lora_B.weight")
        .unwrap();
    let (got, gshape) = saved.tensor_f32(key).unwrap();
    assert_eq!(gshape, [64, 192]);
    let mut max = 0.0f64;
    for i in 0..64 {
        for o in 0..192 {
            let delta: f64 = (0..4)
                .map(|k| lb[o * 4 + k] as f64 * la[k * 64 + i] as f64)
                .sum();
            let want = w[i * 192 + o] as f64 + 2.0 * delta;
            max = max.max((got[i * 192 + o] as f64 - want).abs());
        }
    }
    assert!(max < 1e-5, "saved merged Conv1D weight off by {max}");
    // The saved directory loads back and gives the merged logits.
    let back = load_hf_model(&dir).unwrap();
    let want = logits_record(
        "tiny-gpt2/lora-r4-c_attn/logits_merged.safetensors",
        "batch",
    );
    compare_logits(
        &batch_logits(&back),
        512,
        &want,
        1e-4,
        "tiny-gpt2 merged, saved",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cached_decode_equals_full_forward() {
    let m = tiny_gpt2();
    let meta = read_json("tiny-gpt2/meta.json");
    let ids = ids_of(&meta["batch"]["input_ids"][1]);
    let full = m.logits(&ids).unwrap();
    let mut cache = m.new_cache(ids.len()).unwrap();
    m.forward(&ids[..5], &mut cache, lorakit::model::decoder::Logits::All)
        .unwrap();
    for (i, &id) in ids.iter().enumerate().skip(5) {
        let last = m
            .forward(&[id], &mut cache, lorakit::model::decoder::Logits::Last)
            .unwrap();
        let d = last
            .iter()
            .zip(&full[i * 512..(i + 1) * 512])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(d < 1e-5, "position {i}: {d}");
    }
    // Past n_positions the position table has no rows: an error, not a panic.
    assert!(m
        .new_cache(65)
        .unwrap_err()
        .to_string()
        .contains("n_positions"));
}

/// A copy of tiny-gpt2 in a fresh directory, with `edit` applied to its config.json.
fn copy_with_config(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> std::path::PathBuf {
    let dir = tempfile_dir(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = read_json("tiny-gpt2/config.json");
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        fixture("tiny-gpt2/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    dir
}

fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("lorakit-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn unknown_activation_is_an_error_naming_the_key() {
    let dir = copy_with_config("gpt2-relu", |c| c["activation_function"] = "relu".into());
    let e = load_hf_model(&dir).unwrap_err().to_string();
    assert!(
        e.contains("activation_function") && e.contains("relu") && e.contains("config.json"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_tensor_is_an_error_naming_tensor_and_file() {
    // Rewrite the weights without one tensor.
    let dir = copy_with_config("gpt2-missing", |_| {});
    let src = lorakit::io::safetensors_file::SafetensorsFile::open(&fixture(
        "tiny-gpt2/model.safetensors",
    ))
    .unwrap();
    let drop = "transformer.h.1.mlp.c_fc.bias";
    let kept: Vec<(String, Vec<usize>, Vec<u8>)> = src
        .names()
        .into_iter()
        .filter(|n| n != drop)
        .map(|n| {
            let (d, s) = src.tensor_f32(&n).unwrap();
            (n, s, d.iter().flat_map(|v| v.to_le_bytes()).collect())
        })
        .collect();
    let views: Vec<_> = kept
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
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let e = load_hf_model(&dir).unwrap_err().to_string();
    assert!(e.contains(drop) && e.contains("model.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bare_hub_names_load_like_prefixed_ones() {
    // The canonical `gpt2` hub repo stores `wte.weight`, `h.0.attn.c_attn.weight`, ...
    let dir = copy_with_config("gpt2-bare", |_| {});
    let src = lorakit::io::safetensors_file::SafetensorsFile::open(&fixture(
        "tiny-gpt2/model.safetensors",
    ))
    .unwrap();
    let renamed: Vec<(String, Vec<usize>, Vec<u8>)> = src
        .names()
        .into_iter()
        .map(|n| {
            let (d, s) = src.tensor_f32(&n).unwrap();
            let bare = n.strip_prefix("transformer.").unwrap().to_owned();
            (bare, s, d.iter().flat_map(|v| v.to_le_bytes()).collect())
        })
        .collect();
    let views: Vec<_> = renamed
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
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let m = load_hf_model(&dir).unwrap();
    let want = logits_record("tiny-gpt2/logits_base.safetensors", "batch");
    compare_logits(&batch_logits(&m), 512, &want, 1e-4, "tiny-gpt2 bare names");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn adapter_targets_that_gpt2_lacks_are_errors() {
    let m = tiny_gpt2();
    // A Llama target name in a GPT-2 adapter config.
    let dir = tempfile_dir("gpt2-qproj-adapter");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = read_json("tiny-gpt2/lora-r4-c_attn/adapter_config.json");
    cfg["target_modules"] = serde_json::json!(["q_proj"]);
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        fixture("tiny-gpt2/lora-r4-c_attn/adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let e = Adapter::load(&dir, &m.config).unwrap_err().to_string();
    assert!(
        e.contains("\"q_proj\"") && e.contains("c_attn, c_proj, c_fc"),
        "{e}"
    );
    // A Llama adapter cannot be attached to GPT-2, nor a GPT-2 one to Llama.
    let llama = tiny_llama();
    let la = Adapter::load(&fixture("tiny-llama/lora-a-r4-qv"), &llama.model.config).unwrap();
    let e = m.clone().attach_adapter(&la, 1.0).unwrap_err().to_string();
    assert!(
        e.contains("q_proj") && e.contains("not a GPT-2 module"),
        "{e}"
    );
    let ga = adapter();
    let e = llama
        .model
        .clone()
        .attach_adapter(&ga, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("transformer.h.0.attn.c_attn"), "{e}");
    // The GPT-2 adapter (fan_in_fan_out: true) against the Llama config: refused by name.
    let e = Adapter::load(&fixture("tiny-gpt2/lora-r4-c_attn"), &llama.model.config)
        .unwrap_err()
        .to_string();
    assert!(e.contains("fan_in_fan_out"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn c_proj_targets_both_projections_and_fresh_adapters_save_fan_in_fan_out() {
    let m = tiny_gpt2();
    let cfg = lorakit::lora::LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        target_modules: lorakit::lora::TargetModules::Names(vec!["c_proj".into()]),
        ..Default::default()
    };
    let a = Adapter::init(cfg, &m.config, 7, Path::new("test")).unwrap();
    let ids: Vec<ModuleId> = a.modules.keys().copied().collect();
    assert_eq!(
        ids.iter().map(|id| id.path()).collect::<Vec<_>>(),
        [
            "transformer.h.0.attn.c_proj",
            "transformer.h.0.mlp.c_proj",
            "transformer.h.1.attn.c_proj",
            "transformer.h.1.mlp.c_proj"
        ]
    );
    // mlp.c_proj is [out 64, in 256]: A [2, 256], B [64, 2].
    let w = &a.modules[&ModuleId {
        layer: 0,
        kind: ModuleKind::MlpCProj,
    }];
    assert_eq!((w.a.len(), w.b.len()), (2 * 256, 64 * 2));
    let dir = tempfile_dir("gpt2-fresh-adapter");
    a.save(&dir).unwrap();
    let saved = read_json_abs(&dir.join("adapter_config.json"));
    assert_eq!(saved["fan_in_fan_out"], serde_json::json!(true));
    assert_eq!(Adapter::load(&dir, &m.config).unwrap(), a);
    let _ = std::fs::remove_dir_all(&dir);
}

fn read_json_abs(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Loss and LoRA gradients of tiny-gpt2 with `adapter` on the `tests/data/gpt2-grads` batch.
fn gpt2_grads(adapter: &Adapter) -> (f64, lorakit::model::decoder_train::LoraGrads) {
    use lorakit::model::decoder_train::Activations as Gpt2Activations;
    use lorakit::model::decoder_train::{Dropout, LoraGrads};
    use lorakit::train::loss::{lm_head_loss, target_positions};
    let m = tiny_gpt2();
    let batch = lorakit::io::safetensors_file::SafetensorsFile::open(
        &repo_root().join("tests/data/gpt2-grads/batch.safetensors"),
    )
    .unwrap();
    let (ids, shape) = batch.tensor_i64("input_ids").unwrap();
    let (labels, _) = batch.tensor_i64("labels").unwrap();
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let (b, t) = (shape[0], shape[1]);
    let mut acts = Gpt2Activations::default();
    m.train_forward(&ids, b, t, Some(adapter), Dropout::NONE, &mut acts)
        .unwrap();
    let targets = target_positions(&labels, b, t);
    let n = targets.len() as f64;
    let mut dx = vec![0.0f32; b * t * m.config.hidden_size];
    let loss = lm_head_loss(m, &acts.x_final, &targets, 0.0, n, Some(&mut dx)) / n;
    let mut grads = LoraGrads::zeros_like(adapter);
    m.train_backward(&mut dx, &acts, adapter, Dropout::NONE, &mut grads)
        .unwrap();
    (loss, grads)
}

fn check_gpt2_grads(case: &str, adapter: &Adapter) {
    use lorakit::lora::peft::{key_a, key_b};
    let dir = repo_root().join("tests/data/gpt2-grads").join(case);
    let meta = read_json_abs(&dir.join("grad_meta.json"));
    let (loss, grads) = gpt2_grads(adapter);
    let want_loss = meta["loss"].as_f64().unwrap();
    eprintln!(
        "gpt2 {case}: loss {loss} vs {want_loss} (|Δ| {:.2e})",
        (loss - want_loss).abs()
    );
    assert!(
        (loss - want_loss).abs() <= 1e-5,
        "{case}: loss {loss} vs {want_loss}"
    );
    let want = lorakit::io::safetensors_file::SafetensorsFile::open(&dir.join("grads.safetensors"))
        .unwrap();
    assert_eq!(want.names().len(), 2 * grads.modules.len());
    let mut worst = 0.0f32;
    for (id, (da, db)) in &grads.modules {
        for (key, got) in [(key_a(id), da), (key_b(id), db)] {
            let (w, _) = want.tensor_f32(&key).unwrap();
            assert_eq!(w.len(), got.len(), "{key}");
            let max_g = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(max_g > 1e-3, "{key}: reference gradient is ~0");
            let max_d = got
                .iter()
                .zip(&w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            let rel = max_d / max_g;
            worst = worst.max(rel);
            assert!(rel <= 1e-5, "{case} {key}: max|Δg|/max|g| = {rel:e}");
        }
    }
    eprintln!("gpt2 {case}: worst per-tensor max|Δg|/max|g| = {worst:.2e}");
}

#[test]
fn gpt2_lora_gradients_match_float64_peft_on_c_attn() {
    check_gpt2_grads("c_attn", &adapter());
}

#[test]
fn gpt2_lora_gradients_match_float64_peft_on_c_attn_c_proj_c_fc() {
    let a = Adapter::load(
        &repo_root().join("tests/data/gpt2-grads/all/adapter"),
        &tiny_gpt2().config,
    )
    .unwrap();
    assert_eq!(a.modules.len(), 8);
    check_gpt2_grads("all", &a);
}

// ---------------------------------------------------------------------------------------------
// The CLI on a GPT-2 directory.

/// log P(ids[t] | ids[..t]) for t ≥ 1 from a fixture record's full logits: [T - 1].
fn fixture_logprobs(rel: &str, row: usize, ids: &[u32]) -> Vec<f32> {
    let want = logits_record(rel, "batch");
    let full = want.full.unwrap();
    let t_len = ids.len();
    (1..t_len)
        .map(|t| {
            let r = row * t_len + t - 1;
            full[r * 512 + ids[t] as usize] - want.lse[r]
        })
        .collect()
}

fn cli_logprobs(args: &[&str]) -> (Vec<f32>, serde_json::Value) {
    let o = lorakit(args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let lps = v["tokens"].as_array().unwrap()[1..]
        .iter()
        .map(|t| t["logprob"].as_f64().unwrap() as f32)
        .collect();
    (lps, v)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

#[test]
fn score_cli_on_gpt2_matches_fixture_with_and_without_adapter() {
    let meta = read_json("tiny-gpt2/meta.json");
    let ids = ids_of(&meta["batch"]["input_ids"][1]);
    let ids_arg = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let model = fixture("tiny-gpt2");
    let model = model.to_str().unwrap();
    let (lps, v) = cli_logprobs(&["score", "--model", model, "--ids", &ids_arg]);
    let d = max_abs_diff(
        &lps,
        &fixture_logprobs("tiny-gpt2/logits_base.safetensors", 1, &ids),
    );
    eprintln!("score CLI tiny-gpt2 base: max |Δ logprob| = {d:.2e}");
    assert!(d < 1e-4, "{d}");
    // No tokenizer.json: the token text is null, not made up.
    assert!(v["tokens"][0]["text"].is_null());

    let adapter = fixture("tiny-gpt2/lora-r4-c_attn");
    let (lps, _) = cli_logprobs(&[
        "score",
        "--model",
        model,
        "--adapter",
        adapter.to_str().unwrap(),
        "--ids",
        &ids_arg,
    ]);
    let d = max_abs_diff(
        &lps,
        &fixture_logprobs(
            "tiny-gpt2/lora-r4-c_attn/logits_adapter.safetensors",
            1,
            &ids,
        ),
    );
    eprintln!("score CLI tiny-gpt2 + adapter: max |Δ logprob| = {d:.2e}");
    assert!(d < 1e-4, "{d}");

    // Text needs a tokenizer: a clear error.
    let o = lorakit(&["score", "--model", model, "--text", "hello"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("tokenizer.json"), "{}", stderr(&o));
    let o = lorakit(&["generate", "--model", model, "--prompt", "hello"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("tokenizer.json"), "{}", stderr(&o));
}

#[test]
fn merge_cli_on_gpt2_writes_a_directory_with_the_merged_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = gpt2_with_tokenizer_and_data(tmp.path());
    let out = tmp.path().join("merged");
    let o = lorakit(&[
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        fixture("tiny-gpt2/lora-r4-c_attn").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = load_hf_model(&out).unwrap();
    assert!(m
        .layers
        .iter()
        .all(|b| b.linear(ModuleKind::Qkv).unwrap().loras.is_empty()));
    let want = logits_record(
        "tiny-gpt2/lora-r4-c_attn/logits_merged.safetensors",
        "batch",
    );
    compare_logits(&batch_logits(&m), 512, &want, 1e-4, "tiny-gpt2 merge CLI");
    // The tokenizer travels with the model, byte for byte; no temporary directory is left.
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(model.join("tokenizer.json")).unwrap()
    );
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A copy of tiny-gpt2 with a tokenizer.json, and the gpt2-grads batch as pre-tokenised JSONL
/// (whose reference loss under the c_attn adapter is known): (model dir, data file).
///
/// tiny-gpt2 has no tokenizer; the data are pre-tokenised, so any tokenizer.json that the
/// loader accepts will do (SmolLM2's: its vocabulary covers ids < 512).
fn gpt2_with_tokenizer_and_data(tmp: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let model = tmp.join("tiny-gpt2-tok");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-gpt2").join(f), model.join(f)).unwrap();
    }
    std::fs::copy(
        fixture("smollm2/tokenizer.json"),
        model.join("tokenizer.json"),
    )
    .unwrap();
    let batch = lorakit::io::safetensors_file::SafetensorsFile::open(
        &repo_root().join("tests/data/gpt2-grads/batch.safetensors"),
    )
    .unwrap();
    let (ids, shape) = batch.tensor_i64("input_ids").unwrap();
    let (labels, _) = batch.tensor_i64("labels").unwrap();
    let t = shape[1];
    let data = tmp.join("data.jsonl");
    let lines: Vec<String> = (0..shape[0])
        .map(|b| {
            serde_json::json!({
                "input_ids": ids[b * t..(b + 1) * t],
                "labels": labels[b * t..(b + 1) * t],
            })
            .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    (model, data)
}

/// The float64 HF/PEFT loss of the gpt2-grads batch under the lora-r4-c_attn adapter.
fn gpt2_reference_loss() -> f64 {
    let meta = read_json_abs(&repo_root().join("tests/data/gpt2-grads/c_attn/grad_meta.json"));
    meta["loss"].as_f64().unwrap()
}

#[test]
fn eval_cli_on_gpt2_gives_the_reference_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = gpt2_with_tokenizer_and_data(tmp.path());
    let o = lorakit(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        fixture("tiny-gpt2/lora-r4-c_attn").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--metric",
        "loss",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (got, want) = (v["score"].as_f64().unwrap(), gpt2_reference_loss());
    eprintln!("eval CLI tiny-gpt2 + adapter: loss {got} vs reference {want}");
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
}

#[test]
fn train_cli_on_gpt2_starts_at_the_reference_loss_and_learns() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = gpt2_with_tokenizer_and_data(tmp.path());
    let out = tmp.path().join("run");
    let o = lorakit(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--init-adapter",
        fixture("tiny-gpt2/lora-r4-c_attn").to_str().unwrap(),
        "--no-shuffle",
        "--batch-size",
        "2",
        "--steps",
        "5",
        "--lr",
        "1e-2",
        "--precision",
        "f32",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want = gpt2_reference_loss();
    let first = rows[0]["loss"].as_f64().unwrap();
    eprintln!("train CLI tiny-gpt2: step-1 loss {first} vs reference {want}");
    assert!((first - want).abs() < 1e-5, "{first} vs {want}");
    let last = rows.last().unwrap()["loss"].as_f64().unwrap();
    assert!(last < first - 0.1, "loss {first} → {last}");
    let cfg = read_json_abs(&out.join("adapter_config.json"));
    assert_eq!(cfg["fan_in_fan_out"], serde_json::json!(true));
    assert_eq!(cfg["target_modules"], serde_json::json!(["c_attn"]));
    let trained = Adapter::load(&out, &tiny_gpt2().config).unwrap();
    assert_ne!(trained, adapter());
}

/// Full fine-tuning of GPT-2 through the CLI: the first step's loss and gradient norm are the
/// float64 transformers reference's (tests/data/arch/gpt2: loss and every parameter's
/// gradient), the loss falls, and the result is an HF GPT-2 directory (Conv1D weights [in, out])
/// whose weights moved.
#[test]
fn train_full_cli_on_gpt2_matches_the_reference_first_step_and_writes_an_hf_model() {
    let tmp = tempfile::tempdir().unwrap();
    let arch = repo_root().join("tests/data/arch/gpt2");
    let model = tmp.path().join("gpt2");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(arch.join(f), model.join(f)).unwrap();
    }
    // Pre-tokenised data: any tokenizer the loader accepts will do.
    std::fs::copy(
        fixture("smollm2/tokenizer.json"),
        model.join("tokenizer.json"),
    )
    .unwrap();
    let batch =
        lorakit::io::safetensors_file::SafetensorsFile::open(&arch.join("batch.safetensors"))
            .unwrap();
    let (ids, shape) = batch.tensor_i64("input_ids").unwrap();
    let (labels, _) = batch.tensor_i64("labels").unwrap();
    let t = shape[1];
    let data = tmp.path().join("data.jsonl");
    let lines: Vec<String> = (0..shape[0])
        .map(|b| {
            serde_json::json!({"input_ids": ids[b * t..(b + 1) * t], "labels": labels[b * t..(b + 1) * t]})
                .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let out = tmp.path().join("full");
    let o = lorakit(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--full",
        "--no-shuffle",
        "--batch-size",
        &shape[0].to_string(),
        "--steps",
        "4",
        "--lr",
        "1e-3",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let meta = read_json_abs(&arch.join("meta.json"));
    let want_loss = meta["loss"]["base_f64"].as_f64().unwrap();
    let first = rows[0]["loss"].as_f64().unwrap();
    assert!(
        (first - want_loss).abs() < 1e-5,
        "step-1 loss {first} vs {want_loss}"
    );
    let grads =
        lorakit::io::safetensors_file::SafetensorsFile::open(&arch.join("grads_full.safetensors"))
            .unwrap();
    let want_norm = grads
        .names()
        .iter()
        .map(|n| {
            grads
                .tensor_f32(n)
                .unwrap()
                .0
                .iter()
                .map(|&g| f64::from(g).powi(2))
                .sum::<f64>()
        })
        .sum::<f64>()
        .sqrt();
    let norm = rows[0]["grad_norm"].as_f64().unwrap();
    assert!(
        (norm - want_norm).abs() <= 1e-5 * want_norm,
        "step-1 gradient norm {norm} vs {want_norm}"
    );
    let last = rows.last().unwrap()["loss"].as_f64().unwrap();
    assert!(last < first - 0.1, "loss {first} → {last}");
    let saved = out.join("model");
    assert_eq!(
        read_json_abs(&saved.join("config.json"))["model_type"],
        "gpt2"
    );
    let st = lorakit::io::safetensors_file::SafetensorsFile::open(&saved.join("model.safetensors"))
        .unwrap();
    let src =
        lorakit::io::safetensors_file::SafetensorsFile::open(&model.join("model.safetensors"))
            .unwrap();
    let name = "transformer.h.0.attn.c_attn.weight";
    let (w, w_shape) = st.tensor_f32(name).unwrap();
    let (w0, w0_shape) = src.tensor_f32(name).unwrap();
    assert_eq!(w_shape, w0_shape, "{name} keeps HF's Conv1D layout");
    assert!(
        w.iter().zip(&w0).any(|(a, b)| a != b),
        "{name} did not change"
    );
    assert!(saved.join("tokenizer.json").is_file());
}

#[test]
fn inspect_cli_describes_a_gpt2_directory() {
    let o = lorakit(&["inspect", fixture("tiny-gpt2").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    // 512·64 + 64·64 (wte, wpe) + 2 × 49 984 per block + 128 (ln_f) = 136 960.
    for needle in [
        "gpt2",
        "136960",
        "2 layers",
        "hidden 64",
        "learned",
        "LayerNorm",
        "absent",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
}
