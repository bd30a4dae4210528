//! Replays the fuzz seeds (`fuzz/seeds/TARGET/`) and every input a fuzzing run found worth
//! keeping (`fuzz/regressions/TARGET/`: crashes once fixed, minimised corpus entries) through
//! the same entry points the fuzz targets call. Each must return without panicking; `fuzz/run.sh`
//! does the fuzzing itself (not in CI: it needs the nightly toolchain and minutes per target).

use std::path::PathBuf;

use crate::common::*;

fn inputs(target: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for kind in ["seeds", "regressions"] {
        let dir = repo_root().join("fuzz").join(kind).join(target);
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            if p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.') {
                v.push(p);
            }
        }
    }
    v.sort();
    v
}

/// Runs `f` on every input of `target` and on a few damaged versions of each (truncations and
/// flipped bytes), so that the seeds also exercise the error paths.
fn replay(target: &str, f: impl Fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no seeds for fuzz target {target}");
    for p in &files {
        let bytes = std::fs::read(p).unwrap();
        f(&bytes);
        for cut in [
            0,
            1,
            8,
            bytes.len() / 3,
            bytes.len() / 2,
            bytes.len().saturating_sub(1),
        ] {
            f(&bytes[..cut.min(bytes.len())]);
        }
        for at in (0..bytes.len()).step_by((bytes.len() / 64).max(1)) {
            let mut b = bytes.clone();
            b[at] ^= 0xA5;
            f(&b);
        }
    }
}

#[test]
fn safetensors_inputs() {
    replay("safetensors", lorakit::fuzzing::safetensors);
}

#[test]
fn gguf_inputs() {
    replay("gguf", lorakit::fuzzing::gguf);
}

#[test]
fn adapter_config_inputs() {
    replay("adapter_config", lorakit::fuzzing::adapter_config);
}

#[test]
fn jsonl_inputs() {
    let tok = fixture("tiny-llama");
    replay("jsonl", |b| lorakit::fuzzing::jsonl(b, &tok));
}
