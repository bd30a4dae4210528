//! The corrupted-input suite: model, adapter, data and checkpoint files damaged the ways files
//! from strangers and killed machines are damaged. For every case, `lorakit` must exit with code
//! 1, print one `error:` line that names the file (and the tensor, key or line where there is
//! one), never panic, and leave no output file behind.
//!
//! Each case starts from an input that the same command accepts (checked by the `*_is_accepted`
//! controls), so every rejection below is caused by the one corruption the case makes.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::common::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Runs lorakit; checks exit code 1, no panic, exactly one `error:` line (the last one) that
/// contains every needle, and that none of `outputs` exists afterwards. Returns the error line.
#[track_caller]
fn rejects(args: &[&str], needles: &[&str], outputs: &[&Path]) -> String {
    let out = lorakit(args);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "lorakit {args:?} should fail with exit code 1; stderr:\n{err}"
    );
    assert!(
        !err.contains("panicked"),
        "lorakit {args:?} panicked:\n{err}"
    );
    let error_lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        error_lines.len(),
        1,
        "lorakit {args:?}: expected one error line:\n{err}"
    );
    let line = error_lines[0];
    assert_eq!(
        err.trim_end().lines().last(),
        Some(line),
        "the error must be the last thing printed:\n{err}"
    );
    for n in needles {
        assert!(
            line.contains(n),
            "error of lorakit {args:?} lacks {n:?}:\n{line}"
        );
    }
    for o in outputs {
        assert!(
            !o.exists(),
            "lorakit {args:?} failed but left {} behind",
            o.display()
        );
    }
    // Shown with --nocapture, for reading every message the suite produces.
    eprintln!("CASE {line}");
    line.to_owned()
}

#[track_caller]
fn accepts(args: &[&str]) {
    let out = lorakit(args);
    assert!(
        out.status.success(),
        "lorakit {args:?} should succeed:\n{}",
        stderr(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// GGUF: the real model's file with one field of its header damaged.
// ---------------------------------------------------------------------------------------------

/// A copy of the real GGUF with `patch` applied to its bytes, then `generate` on it.
#[track_caller]
fn real_gguf_rejected(name: &str, patch: impl FnOnce(&mut Vec<u8>), needles: &[&str]) {
    let mut bytes = std::fs::read(real_model_path()).unwrap();
    patch(&mut bytes);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join(name);
    std::fs::write(&f, &bytes).unwrap();
    let mut all = vec![name];
    all.extend(needles);
    rejects(
        &[
            "generate",
            "--model",
            s(&f),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "1",
        ],
        &all,
        &[],
    );
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn gguf_wrong_magic() {
    real_gguf_rejected("magic.gguf", |b| b[..4].copy_from_slice(b"GGUX"), &["GGUF"]);
}

#[test]
fn gguf_unsupported_version() {
    real_gguf_rejected("version.gguf", |b| put_u32(b, 4, 99), &["version 99"]);
}

#[test]
fn gguf_huge_tensor_count() {
    real_gguf_rejected(
        "ntensors.gguf",
        |b| put_u64(b, 8, u64::MAX / 2),
        &["tensor"],
    );
}

#[test]
fn gguf_huge_metadata_count() {
    real_gguf_rejected("nkv.gguf", |b| put_u64(b, 16, 1 << 50), &["metadata"]);
}

#[test]
fn gguf_huge_key_length() {
    // The first metadata key's length field follows the 24-byte header.
    real_gguf_rejected("keylen.gguf", |b| put_u64(b, 24, 1 << 40), &["length"]);
}

#[test]
fn gguf_invalid_metadata_value_type() {
    real_gguf_rejected(
        "valtype.gguf",
        |b| {
            let key_len = u64::from_le_bytes(b[24..32].try_into().unwrap()) as usize;
            put_u32(b, 32 + key_len, 999);
        },
        &["type 999"],
    );
}

#[test]
fn gguf_empty_file() {
    real_gguf_rejected("empty.gguf", |b| b.clear(), &[]);
}

#[test]
fn gguf_truncated_inside_tensor_data() {
    real_gguf_rejected("cut.gguf", |b| b.truncate(b.len() - 4096), &[]);
}

// ---------------------------------------------------------------------------------------------
// GGUF: a hand-made one-layer Llama (hidden 32, 2 heads, vocab 4), valid unless a case breaks it.
// ---------------------------------------------------------------------------------------------

struct TinyTensor {
    name: &'static str,
    /// GGUF order, innermost first.
    dims: Vec<u64>,
    type_id: u32,
    bytes: Vec<u8>,
}

fn f32_bytes(n: usize, seed: u32) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            let x = ((i as u32).wrapping_mul(2654435761) ^ seed) % 1000;
            (x as f32 / 1000.0 - 0.5).to_le_bytes()
        })
        .collect()
}

fn tiny_tensors() -> Vec<TinyTensor> {
    let (h, ff, vocab) = (32u64, 64u64, 4u64);
    let t = |name, dims: Vec<u64>| {
        let n = dims.iter().product::<u64>() as usize;
        TinyTensor {
            name,
            bytes: f32_bytes(n, name.len() as u32),
            dims,
            type_id: 0,
        }
    };
    vec![
        t("token_embd.weight", vec![h, vocab]),
        t("blk.0.attn_norm.weight", vec![h]),
        t("blk.0.attn_q.weight", vec![h, h]),
        t("blk.0.attn_k.weight", vec![h, h]),
        t("blk.0.attn_v.weight", vec![h, h]),
        t("blk.0.attn_output.weight", vec![h, h]),
        t("blk.0.ffn_norm.weight", vec![h]),
        t("blk.0.ffn_gate.weight", vec![h, ff]),
        t("blk.0.ffn_up.weight", vec![h, ff]),
        t("blk.0.ffn_down.weight", vec![ff, h]),
        t("output_norm.weight", vec![h]),
    ]
}

fn tiny_gguf(path: &Path, heads: u32, tensors: &[TinyTensor]) {
    let mut w = GgufWriter::new();
    w.kv_str("general.architecture", "llama")
        .kv_u32("llama.embedding_length", 32)
        .kv_u32("llama.feed_forward_length", 64)
        .kv_u32("llama.block_count", 1)
        .kv_u32("llama.attention.head_count", heads)
        .kv_u32("llama.attention.head_count_kv", heads)
        .kv_u32("llama.context_length", 16)
        .kv_u32("llama.vocab_size", 4)
        .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .kv_str("tokenizer.ggml.model", "gpt2")
        .kv_str_array("tokenizer.ggml.tokens", &["a", "b", "c", "d"])
        .kv_str_array("tokenizer.ggml.merges", &[]);
    for t in tensors {
        w.tensor(t.name, &t.dims, t.type_id, &t.bytes);
    }
    w.write(path);
}

fn generate_args(model: &Path) -> Vec<&str> {
    vec![
        "generate",
        "--model",
        s(model),
        "--prompt",
        "ab",
        "--max-new-tokens",
        "1",
    ]
}

#[track_caller]
fn tiny_gguf_rejected(name: &str, edit: impl FnOnce(&mut Vec<TinyTensor>), needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join(name);
    let mut tensors = tiny_tensors();
    edit(&mut tensors);
    tiny_gguf(&f, 2, &tensors);
    let mut all = vec![name];
    all.extend(needles);
    rejects(&generate_args(&f), &all, &[]);
}

fn find<'a>(ts: &'a mut [TinyTensor], name: &str) -> &'a mut TinyTensor {
    ts.iter_mut().find(|t| t.name == name).unwrap()
}

#[test]
fn tiny_gguf_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("tiny.gguf");
    tiny_gguf(&f, 2, &tiny_tensors());
    accepts(&generate_args(&f));
}

#[test]
fn gguf_tensor_missing() {
    tiny_gguf_rejected(
        "missing.gguf",
        |ts| ts.retain(|t| t.name != "blk.0.ffn_down.weight"),
        &["blk.0.ffn_down.weight"],
    );
}

#[test]
fn gguf_tensor_shape_disagrees_with_metadata() {
    tiny_gguf_rejected(
        "shape.gguf",
        |ts| {
            let t = find(ts, "blk.0.attn_q.weight");
            t.dims = vec![32, 16];
            t.bytes.truncate(32 * 16 * 4);
        },
        &["blk.0.attn_q.weight", "shape"],
    );
}

#[test]
fn gguf_unknown_tensor_type_id() {
    tiny_gguf_rejected(
        "typeid.gguf",
        |ts| find(ts, "blk.0.attn_v.weight").type_id = 200,
        &["blk.0.attn_v.weight", "200"],
    );
}

#[test]
fn gguf_nan_inside_f32_weights() {
    tiny_gguf_rejected(
        "nan.gguf",
        |ts| find(ts, "blk.0.ffn_up.weight").bytes[12..16].copy_from_slice(&f32::NAN.to_le_bytes()),
        &["blk.0.ffn_up.weight", "NaN"],
    );
}

#[test]
fn gguf_infinite_scale_in_a_quantised_block() {
    // Q8_0 (type 8): blocks of 32 weights = an f16 scale + 32 int8. Scale 0x7C00 is +Inf, in
    // the last of the 64 rows' blocks.
    tiny_gguf_rejected(
        "q8inf.gguf",
        |ts| {
            let t = find(ts, "blk.0.ffn_gate.weight");
            t.type_id = 8;
            let mut block = vec![0x00, 0x3C];
            block.extend([1u8; 32]);
            t.bytes = block.repeat(64);
            t.bytes[63 * 34 + 1] = 0x7C;
        },
        &["blk.0.ffn_gate.weight", "inf"],
    );
}

#[test]
fn gguf_duplicate_tensor_name() {
    tiny_gguf_rejected(
        "dup.gguf",
        |ts| {
            let copy = TinyTensor {
                name: "blk.0.attn_k.weight",
                dims: vec![32, 32],
                type_id: 0,
                bytes: f32_bytes(32 * 32, 7),
            };
            ts.push(copy);
        },
        &["blk.0.attn_k.weight"],
    );
}

#[test]
fn gguf_zero_attention_heads() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("heads.gguf");
    tiny_gguf(&f, 0, &tiny_tensors());
    rejects(&generate_args(&f), &["heads.gguf", "head_count"], &[]);
}

/// The tiny model's header with one extra tensor-table entry written by `entry`.
#[track_caller]
fn tiny_gguf_with_entry(name: &str, entry: impl FnOnce(&mut GgufWriter), needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join(name);
    let mut w = GgufWriter::new();
    w.kv_str("general.architecture", "llama")
        .kv_u32("llama.embedding_length", 8)
        .kv_u32("llama.block_count", 1);
    entry(&mut w);
    w.write(&f);
    let mut all = vec![name];
    all.extend(needles);
    rejects(&["inspect", s(&f)], &all, &[]);
}

#[test]
fn gguf_tensor_offset_beyond_the_file() {
    tiny_gguf_with_entry(
        "offset.gguf",
        |w| {
            w.tensor_at("token_embd.weight", &[32, 4], 0, 1 << 30);
        },
        &["token_embd.weight"],
    );
}

#[test]
fn gguf_misaligned_tensor_offset() {
    tiny_gguf_with_entry(
        "align.gguf",
        |w| {
            w.tensor_at("token_embd.weight", &[32, 4], 0, 3);
        },
        &["token_embd.weight", "align"],
    );
}

#[test]
fn gguf_dimension_product_overflows() {
    tiny_gguf_with_entry(
        "dims.gguf",
        |w| {
            w.tensor_at("token_embd.weight", &[1 << 40, 1 << 40], 0, 0);
        },
        &["token_embd.weight"],
    );
}

// ---------------------------------------------------------------------------------------------
// HF directory (the tiny Llama fixture): safetensors, config.json, tokenizer.json.
// ---------------------------------------------------------------------------------------------

fn tiny_hf_copy(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir(&m).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixture("tiny-llama").join(f), m.join(f)).unwrap();
    }
    m
}

/// Six prompt/completion lines the tiny model trains on in milliseconds.
fn good_data(dir: &Path) -> PathBuf {
    let p = dir.join("train.jsonl");
    let text: String = (0..6)
        .map(|i| {
            json!({"prompt": format!("Item {i}:"), "completion": " the colour is red"}).to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

/// `train --steps 1` on a damaged copy of the tiny model: rejected, `--out` never created.
#[track_caller]
fn tiny_hf_rejected(edit: impl FnOnce(&Path), needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_hf_copy(tmp.path());
    edit(&model);
    let data = good_data(tmp.path());
    let out = tmp.path().join("out");
    rejects(
        &[
            "train",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--steps",
            "1",
            "--quiet",
        ],
        needles,
        &[&out],
    );
}

/// Rewrites a safetensors file's JSON header with `edit`, keeping the data bytes.
fn edit_safetensors_header(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let text = serde_json::to_vec(&Value::Object(header)).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(&text);
    out.extend(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

fn patch_file(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(path).unwrap();
    f(&mut b);
    std::fs::write(path, b).unwrap();
}

const DOWN: &str = "model.layers.1.mlp.down_proj.weight";

#[test]
fn tiny_hf_copy_is_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_hf_copy(tmp.path());
    let data = good_data(tmp.path());
    let out = tmp.path().join("out");
    accepts(&[
        "train",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--steps",
        "1",
        "--quiet",
    ]);
}

#[test]
fn safetensors_huge_declared_header_size() {
    tiny_hf_rejected(
        |m| patch_file(&m.join("model.safetensors"), |b| put_u64(b, 0, 1 << 40)),
        &["model.safetensors"],
    );
}

#[test]
fn safetensors_header_is_not_json() {
    tiny_hf_rejected(
        |m| patch_file(&m.join("model.safetensors"), |b| b[8] = b'#'),
        &["model.safetensors"],
    );
}

#[test]
fn safetensors_truncated_in_the_data() {
    tiny_hf_rejected(
        |m| patch_file(&m.join("model.safetensors"), |b| b.truncate(b.len() / 2)),
        &["model.safetensors"],
    );
}

#[test]
fn safetensors_offsets_beyond_the_file() {
    tiny_hf_rejected(
        |m| {
            edit_safetensors_header(&m.join("model.safetensors"), |h| {
                let end = h[DOWN]["data_offsets"][1].as_u64().unwrap();
                h[DOWN]["data_offsets"][1] = json!(end + (1 << 30));
            })
        },
        &["model.safetensors"],
    );
}

#[test]
fn safetensors_shape_disagrees_with_byte_length() {
    tiny_hf_rejected(
        |m| {
            edit_safetensors_header(&m.join("model.safetensors"), |h| {
                h[DOWN]["shape"] = json!([64, 129]);
            })
        },
        &["model.safetensors"],
    );
}

#[test]
fn safetensors_unsupported_dtype() {
    tiny_hf_rejected(
        |m| {
            edit_safetensors_header(&m.join("model.safetensors"), |h| {
                h[DOWN]["dtype"] = json!("I32");
            })
        },
        &["model.safetensors", DOWN, "I32"],
    );
}

#[test]
fn safetensors_tensor_missing() {
    tiny_hf_rejected(
        |m| {
            edit_safetensors_header(&m.join("model.safetensors"), |h| {
                let v = h.remove(DOWN).unwrap();
                h.insert("renamed.weight".into(), v);
            })
        },
        &[DOWN],
    );
}

#[test]
fn safetensors_nan_inside_weights() {
    tiny_hf_rejected(
        |m| {
            let path = m.join("model.safetensors");
            let bytes = std::fs::read(&path).unwrap();
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
            let start = header[DOWN]["data_offsets"][0].as_u64().unwrap() as usize + 8 + n;
            patch_file(&path, |b| {
                b[start + 40..start + 44].copy_from_slice(&f32::INFINITY.to_le_bytes())
            });
        },
        &["model.safetensors", DOWN, "inf"],
    );
}

#[test]
fn config_json_is_not_json() {
    tiny_hf_rejected(
        |m| std::fs::write(m.join("config.json"), "{\"hidden_size\": 64,").unwrap(),
        &["config.json"],
    );
}

#[test]
fn config_json_lacks_a_required_key() {
    tiny_hf_rejected(
        |m| {
            let p = m.join("config.json");
            let mut c: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            c.as_object_mut().unwrap().remove("hidden_size");
            std::fs::write(&p, c.to_string()).unwrap();
        },
        &["config.json", "hidden_size"],
    );
}

#[test]
fn config_json_zero_attention_heads() {
    tiny_hf_rejected(
        |m| {
            let p = m.join("config.json");
            let mut c: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            c["num_attention_heads"] = json!(0);
            std::fs::write(&p, c.to_string()).unwrap();
        },
        &["config.json", "num_attention_heads"],
    );
}

#[test]
fn config_json_disagrees_with_the_weights() {
    tiny_hf_rejected(
        |m| {
            let p = m.join("config.json");
            let mut c: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            c["intermediate_size"] = json!(96);
            std::fs::write(&p, c.to_string()).unwrap();
        },
        &["model.safetensors", "shape"],
    );
}

#[test]
fn config_json_absurd_vocabulary_size() {
    // Must fail on the shape check, not by trying to allocate 10^15 floats.
    tiny_hf_rejected(
        |m| {
            let p = m.join("config.json");
            let mut c: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            c["vocab_size"] = json!(1_000_000_000_000_000u64);
            std::fs::write(&p, c.to_string()).unwrap();
        },
        &["vocab_size"],
    );
}

#[test]
fn shard_index_pointing_outside_the_model_directory() {
    tiny_hf_rejected(
        |m| {
            std::fs::rename(
                m.join("model.safetensors"),
                m.join("../escaped.safetensors"),
            )
            .unwrap();
            std::fs::write(
                m.join("model.safetensors.index.json"),
                json!({"weight_map": {"model.embed_tokens.weight": "../escaped.safetensors"}})
                    .to_string(),
            )
            .unwrap();
        },
        &["model.safetensors.index.json", "../escaped.safetensors"],
    );
}

#[test]
fn tokenizer_json_is_binary_garbage() {
    tiny_hf_rejected(
        |m| std::fs::write(m.join("tokenizer.json"), [0xFFu8, 0xFE, 0x00, 0x81, 0x07]).unwrap(),
        &["tokenizer.json"],
    );
}

// ---------------------------------------------------------------------------------------------
// PEFT adapters, through `merge` (whose --out must never appear) and `generate --adapter`.
// ---------------------------------------------------------------------------------------------

fn adapter_copy(dir: &Path, which: &str) -> PathBuf {
    let a = dir.join("adapter");
    std::fs::create_dir(&a).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture(which).join(f), a.join(f)).unwrap();
    }
    a
}

#[track_caller]
fn adapter_rejected(edit: impl FnOnce(&Path), needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = adapter_copy(tmp.path(), "tiny-llama/lora-a-r4-qv");
    edit(&adapter);
    let out = tmp.path().join("merged");
    let model = fixture("tiny-llama");
    rejects(
        &[
            "merge",
            "--model",
            s(&model),
            "--adapter",
            s(&adapter),
            "--out",
            s(&out),
        ],
        needles,
        &[&out],
    );
}

fn edit_adapter_config(a: &Path, f: impl FnOnce(&mut Value)) {
    let p = a.join("adapter_config.json");
    let mut c: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut c);
    std::fs::write(&p, c.to_string()).unwrap();
}

/// Overwrites the first f32 of the first lora_A tensor of the adapter.
fn poison_adapter(a: &Path, value: f32) {
    let p = a.join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let (_, info) = header
        .iter()
        .find(|(k, _)| k.ends_with("lora_A.weight"))
        .unwrap();
    let start = info["data_offsets"][0].as_u64().unwrap() as usize + 8 + n;
    patch_file(&p, |b| {
        b[start..start + 4].copy_from_slice(&value.to_le_bytes())
    });
}

#[test]
fn adapter_copy_is_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = adapter_copy(tmp.path(), "tiny-llama/lora-a-r4-qv");
    let out = tmp.path().join("merged");
    let model = fixture("tiny-llama");
    accepts(&[
        "merge",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--out",
        s(&out),
    ]);
}

#[test]
fn adapter_config_is_not_json() {
    adapter_rejected(
        |a| std::fs::write(a.join("adapter_config.json"), "r = 4").unwrap(),
        &["adapter_config.json"],
    );
}

#[test]
fn adapter_config_is_binary() {
    adapter_rejected(
        |a| std::fs::write(a.join("adapter_config.json"), [0x80u8, 0xFF, 0x00, 0x12]).unwrap(),
        &["adapter_config.json"],
    );
}

#[test]
fn adapter_config_names_modules_the_model_lacks() {
    adapter_rejected(
        |a| edit_adapter_config(a, |c| c["target_modules"] = json!(["query_key_value"])),
        &["adapter_config.json", "query_key_value"],
    );
}

#[test]
fn adapter_config_rank_zero() {
    adapter_rejected(
        |a| edit_adapter_config(a, |c| c["r"] = json!(0)),
        &["adapter_config.json", "r"],
    );
}

#[test]
fn adapter_for_a_different_base_model() {
    // SmolLM2's r=8 adapter (576-wide) on the 64-wide tiny Llama.
    let tmp = tempfile::tempdir().unwrap();
    let adapter = adapter_copy(tmp.path(), "smollm2-peft-r8-qv/adapter");
    let out = tmp.path().join("merged");
    let model = fixture("tiny-llama");
    rejects(
        &[
            "merge",
            "--model",
            s(&model),
            "--adapter",
            s(&adapter),
            "--out",
            s(&out),
        ],
        &["adapter_model.safetensors", "shape"],
        &[&out],
    );
}

#[test]
fn adapter_weights_truncated() {
    adapter_rejected(
        |a| {
            patch_file(&a.join("adapter_model.safetensors"), |b| {
                b.truncate(b.len() - 100)
            })
        },
        &["adapter_model.safetensors"],
    );
}

#[test]
fn adapter_weights_header_byte_flipped() {
    adapter_rejected(
        |a| patch_file(&a.join("adapter_model.safetensors"), |b| b[9] ^= 0x55),
        &["adapter_model.safetensors"],
    );
}

#[test]
fn adapter_weights_contain_nan() {
    adapter_rejected(
        |a| poison_adapter(a, f32::NAN),
        &["adapter_model.safetensors", "lora_A"],
    );
}

#[test]
fn adapter_weights_contain_infinity() {
    adapter_rejected(
        |a| poison_adapter(a, f32::NEG_INFINITY),
        &["adapter_model.safetensors", "lora_A"],
    );
}

#[test]
fn adapter_whose_merge_would_overflow() {
    // Finite but absurd values: B·A overflows f32, so merging must refuse (PEFT's safe_merge).
    adapter_rejected(
        |a| {
            let p = a.join("adapter_model.safetensors");
            let bytes = std::fs::read(&p).unwrap();
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let header: serde_json::Map<String, Value> =
                serde_json::from_slice(&bytes[8..8 + n]).unwrap();
            let mut out = bytes.clone();
            for info in header.values().filter(|v| v.get("data_offsets").is_some()) {
                let (lo, hi) = (
                    info["data_offsets"][0].as_u64().unwrap() as usize + 8 + n,
                    info["data_offsets"][1].as_u64().unwrap() as usize + 8 + n,
                );
                for c in out[lo..hi].chunks_exact_mut(4) {
                    c.copy_from_slice(&1e30f32.to_le_bytes());
                }
            }
            std::fs::write(&p, out).unwrap();
        },
        &["non-finite", "nothing was merged"],
    );
}

#[test]
fn adapter_only_as_a_pickle() {
    // PEFT's legacy adapter_model.bin is a pickle: never unpickled, and the error says why.
    adapter_rejected(
        |a| {
            std::fs::remove_file(a.join("adapter_model.safetensors")).unwrap();
            std::fs::write(a.join("adapter_model.bin"), b"\x80\x02}q\x00.").unwrap();
        },
        &["adapter_model.bin", "pickle"],
    );
}

#[test]
fn adapter_directory_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-llama");
    let gone = tmp.path().join("no-such-adapter");
    rejects(
        &[
            "generate",
            "--model",
            s(&model),
            "--adapter",
            s(&gone),
            "--prompt",
            "hi",
        ],
        &["no-such-adapter"],
        &[],
    );
}

// ---------------------------------------------------------------------------------------------
// Training data, configs and checkpoints.
// ---------------------------------------------------------------------------------------------

/// `train` on the tiny model with the data file holding `bytes`.
#[track_caller]
fn data_rejected(bytes: &[u8], extra: &[&str], needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.jsonl");
    std::fs::write(&data, bytes).unwrap();
    let out = tmp.path().join("out");
    let model = fixture("tiny-llama");
    let mut args = vec![
        "train",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--steps",
        "1",
        "--quiet",
    ];
    args.extend(extra);
    let mut all = vec!["data.jsonl"];
    all.extend(needles);
    rejects(&args, &all, &[&out]);
}

#[test]
fn data_file_empty() {
    data_rejected(b"", &[], &["no examples"]);
}

#[test]
fn data_file_binary() {
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    data_rejected(&bytes, &[], &["line 1"]);
}

#[test]
fn data_line_is_not_an_object() {
    data_rejected(b"{\"text\": \"fine\"}\n[1, 2, 3]\n", &[], &["line 2"]);
}

#[test]
fn data_line_lacks_the_completion() {
    data_rejected(
        b"{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"only a prompt\"}\n",
        &[],
        &["line 2", "completion"],
    );
}

#[test]
fn data_token_ids_out_of_vocabulary() {
    data_rejected(
        b"{\"input_ids\": [1, 2, 999999], \"labels\": [1, 2, 3]}\n",
        &[],
        &["line 1", "999999"],
    );
}

#[test]
fn train_config_toml_does_not_parse() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("train.toml");
    std::fs::write(&cfg, "r = 8\nlr = [unclosed\n").unwrap();
    let data = good_data(tmp.path());
    let out = tmp.path().join("out");
    let model = fixture("tiny-llama");
    rejects(
        &[
            "train",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--config",
            s(&cfg),
        ],
        &["train.toml", "line 2"],
        &[&out],
    );
}

#[test]
fn prompt_longer_than_the_context() {
    // The tiny Llama has 128 positions.
    let model = fixture("tiny-llama");
    let prompt = "word ".repeat(400);
    rejects(
        &[
            "generate",
            "--model",
            s(&model),
            "--prompt",
            &prompt,
            "--max-new-tokens",
            "1",
        ],
        &["context"],
        &[],
    );
}

/// A one-step run with a checkpoint, damaged by `edit(checkpoint_dir)`, then `--resume`d.
#[track_caller]
fn resume_rejected(edit: impl FnOnce(&Path), needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let data = good_data(tmp.path());
    let out = tmp.path().join("out");
    let model = fixture("tiny-llama");
    let args = [
        "train",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--steps",
        "1",
        "--quiet",
        "--precision",
        "f32",
    ];
    accepts(&args);
    let ckpt = out.join("checkpoints/step-000001");
    assert!(ckpt.is_dir(), "no checkpoint at {}", ckpt.display());
    edit(&ckpt);
    let mut resume = args.to_vec();
    let steps = resume.len() - 4;
    resume[steps] = "2";
    resume.push("--resume");
    rejects(&resume, needles, &[]);
    assert!(
        ckpt.is_dir(),
        "a failed resume must not delete the checkpoint"
    );
}

#[test]
fn resume_from_a_corrupted_trainer_state() {
    resume_rejected(
        |c| std::fs::write(c.join("trainer_state.json"), "{\"step\": ").unwrap(),
        &["trainer_state.json"],
    );
}

#[test]
fn resume_from_a_truncated_optimizer_state() {
    resume_rejected(
        |c| {
            patch_file(&c.join("optimizer.safetensors"), |b| {
                b.truncate(b.len() / 3)
            })
        },
        &["optimizer.safetensors"],
    );
}

#[test]
fn gguf_only_the_magic() {
    // Also checks that the error names the path as the user gave it (here with a space).
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("weird name.gguf");
    std::fs::write(&f, b"GGUF").unwrap();
    let line = rejects(&["inspect", s(&f)], &[], &[]);
    assert!(line.contains(s(&f)), "{line}");
}
