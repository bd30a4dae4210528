//! Bad input gets a clear one-line error naming what is wrong, a non-zero exit code, and no
//! panic.

use crate::common::*;

/// Runs lorakit and checks: failure exit code, no panic, and every `needle` in stderr.
fn assert_fails_with(args: &[&str], needles: &[&str]) {
    let out = lorakit(args);
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "lorakit {args:?} should fail; stderr: {err}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit code of lorakit {args:?}: {err}"
    );
    assert!(
        !err.contains("panicked"),
        "lorakit {args:?} panicked: {err}"
    );
    for n in needles {
        assert!(
            err.contains(n),
            "stderr of lorakit {args:?} lacks {n:?}: {err}"
        );
    }
}

#[test]
fn missing_model_path_is_named() {
    assert_fails_with(
        &["inspect", "/nonexistent/model.gguf"],
        &["/nonexistent/model.gguf", "No such file"],
    );
}

#[test]
fn directory_without_config_json() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().to_str().unwrap();
    assert_fails_with(&["inspect", p], &[p, "no config.json"]);
}

#[test]
fn non_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("notes.txt");
    std::fs::write(&f, "hello, I am not a model").unwrap();
    assert_fails_with(
        &["generate", "--model", f.to_str().unwrap(), "--prompt", "hi"],
        &["notes.txt", "not a GGUF file"],
    );
}

#[test]
fn truncated_gguf_files() {
    let real = std::fs::read(real_model_path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Inside the header, inside the metadata, inside the tensor table, inside the data.
    for cut in [3usize, 20, 1000, 500_000, 60_000_000] {
        let f = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&f, &real[..cut]).unwrap();
        assert_fails_with(
            &["inspect", f.to_str().unwrap()],
            &[&format!("cut{cut}.gguf")],
        );
    }
}

#[test]
fn unsupported_gguf_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("falcon.gguf");
    GgufWriter::new()
        .kv_str("general.architecture", "falcon")
        .write(&f);
    assert_fails_with(
        &["inspect", f.to_str().unwrap()],
        &["falcon.gguf", "falcon", "unsupported"],
    );
}

#[test]
fn unsupported_tensor_type_is_named() {
    // A valid one-layer llama header whose embedding is IQ2_XXS (ggml type 16), which lorakit
    // does not decode.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("iq2.gguf");
    let mut w = GgufWriter::new();
    w.kv_str("general.architecture", "llama")
        .kv_u32("llama.embedding_length", 256)
        .kv_u32("llama.feed_forward_length", 512)
        .kv_u32("llama.block_count", 1)
        .kv_u32("llama.attention.head_count", 4)
        .kv_u32("llama.attention.head_count_kv", 4)
        .kv_u32("llama.context_length", 64)
        .kv_u32("llama.vocab_size", 4)
        .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .kv_str("tokenizer.ggml.model", "gpt2")
        .kv_str_array("tokenizer.ggml.tokens", &["a", "b", "c", "d"])
        .kv_str_array("tokenizer.ggml.merges", &[])
        // IQ2_XXS: 66 bytes per block of 256.
        .tensor("token_embd.weight", &[256, 4], 16, &[0u8; 4 * 66]);
    w.write(&f);
    assert_fails_with(
        &["inspect", f.to_str().unwrap()],
        &["iq2.gguf", "token_embd.weight", "IQ2_XXS"],
    );
}

#[test]
fn unsupported_hf_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 4}"#,
    )
    .unwrap();
    let p = dir.path().to_str().unwrap();
    assert_fails_with(&["inspect", p], &["config.json", "gpt_neox", "unsupported"]);
}

#[test]
fn tokenizer_json_that_does_not_parse() {
    // The tiny Llama's real config and weights, with a broken tokenizer.json.
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer_config.json"] {
        std::fs::copy(fixture("tiny-llama").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("tokenizer.json"), "{ this is not json").unwrap();
    let p = dir.path().to_str().unwrap();
    assert_fails_with(&["inspect", p], &["tokenizer.json"]);
}

#[test]
fn empty_prompt_and_empty_chat() {
    let tiny = fixture("tiny-llama");
    let m = tiny.to_str().unwrap();
    assert_fails_with(&["generate", "--model", m, "--prompt", ""], &["empty"]);
    assert_fails_with(&["generate", "--model", m, "--chat", "  "], &["empty"]);
    assert_fails_with(&["score", "--model", m, "--text", ""], &["empty"]);
}

#[test]
fn out_of_vocabulary_ids_are_rejected() {
    let tiny = fixture("tiny-llama");
    assert_fails_with(
        &[
            "score",
            "--model",
            tiny.to_str().unwrap(),
            "--ids",
            "1,2,49152",
        ],
        &["49152", "vocabulary"],
    );
}
