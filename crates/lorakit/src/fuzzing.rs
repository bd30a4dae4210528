//! Entry points for the fuzz targets in `fuzz/` and their regression test: each takes arbitrary
//! bytes, runs one untrusted-input reader on them the way `lorakit` does, and must return
//! (usually with an error) for every input: never panic, hang, or allocate without bound.
//! Readers that take a path get the bytes through a per-process scratch file.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::data::{load_jsonl, DataOptions};
use crate::io::gguf::GgufFile;
use crate::io::safetensors_file::SafetensorsFile;
use crate::lora::config::LoraConfig;
use crate::model::Config;
use crate::tokenize::Tokenizer;

/// A scratch file for this process (and target), rewritten on every call.
fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let p = dir.join(format!("lorakit-fuzz-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).expect("write the fuzz scratch file");
    p
}

/// A safetensors file: header validation, then every tensor converted as a model load does.
pub fn safetensors(bytes: &[u8]) {
    let p = scratch("x.safetensors", bytes);
    if let Ok(f) = SafetensorsFile::open(&p) {
        for name in f.names() {
            let _ = f.tensor_f32(&name);
            let _ = f.tensor_i64(&name);
        }
    }
}

/// A GGUF file: header, metadata and tensor table, a model config from the metadata, and every
/// tensor dequantised.
pub fn gguf(bytes: &[u8]) {
    if let Ok(g) = GgufFile::from_bytes("fuzz.gguf", bytes.to_vec()) {
        let _ = Config::from_gguf(&g);
        let names: Vec<String> = g.tensors().iter().map(|t| t.name.clone()).collect();
        for name in names {
            let _ = g.tensor_f32(&name);
        }
    }
}

/// An `adapter_config.json`: parsed, validated and resolved against a 30-layer model.
pub fn adapter_config(bytes: &[u8]) {
    let path = Path::new("adapter_config.json");
    let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice(bytes) else {
        return;
    };
    if let Ok(c) = LoraConfig::from_peft_map(&obj, path) {
        if c.validate(path).is_ok() {
            let _ = c.resolve(30, path);
        }
    }
}

/// A training JSONL file, tokenised with the tiny Llama's tokenizer (SmolLM2's vocabulary and
/// chat template), given as `tokenizer_dir`.
pub fn jsonl(bytes: &[u8], tokenizer_dir: &Path) {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    let tok = TOKENIZER.get_or_init(|| {
        Tokenizer::from_hf_dir(tokenizer_dir).expect("the fuzz tokenizer directory loads")
    });
    let p = scratch("x.jsonl", bytes);
    let opts = DataOptions {
        max_seq_len: 64,
        add_eos: true,
    };
    let _ = load_jsonl(&p, tok, &opts);
}
