//! Shared helpers: fixture paths, fixture readers, the real model, running the CLI.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use lorakit::engine::ops::{argmax, logsumexp};
use lorakit::io::safetensors_file::SafetensorsFile;
use lorakit::model::{load_model, LoadedModel};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

pub fn fixture(rel: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(rel)
}

pub fn read_json(rel: &str) -> serde_json::Value {
    let p = fixture(rel);
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Runs `scripts/fetch-model.sh ARGS` (safe against concurrent runs from other processes) and
/// returns `models/FILE`; the real-model tests cannot run, and fail, if it fails.
fn fetch_model(args: &[&str], file: &str) -> PathBuf {
    let root = repo_root();
    let status = Command::new("bash")
        .arg(root.join("scripts/fetch-model.sh"))
        .args(args)
        .status()
        .expect("run scripts/fetch-model.sh");
    assert!(
        status.success(),
        "scripts/fetch-model.sh {} failed: the real-model tests cannot run",
        args.join(" ")
    );
    root.join("models").join(file)
}

/// The real default model, fetched once per test process through the project's own script.
pub fn real_model_path() -> PathBuf {
    static FETCHED: OnceLock<PathBuf> = OnceLock::new();
    FETCHED
        .get_or_init(|| fetch_model(&[], "SmolLM2-135M-Instruct.Q4_1.gguf"))
        .clone()
}

/// Gemma 3 270M (base, Q4_K_M GGUF), fetched once per test process through the project's own
/// script (`scripts/fetch-model.sh gemma3-270m`).
pub fn gemma3_path() -> PathBuf {
    static FETCHED: OnceLock<PathBuf> = OnceLock::new();
    FETCHED
        .get_or_init(|| fetch_model(&["gemma3-270m"], "gemma-3-270m.Q4_K_M.gguf"))
        .clone()
}

/// A file under `tests/data/`.
pub fn data_file(rel: &str) -> PathBuf {
    repo_root().join("tests/data").join(rel)
}

/// The real model, loaded once and shared by every test that needs it.
pub fn real_model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| load_model(&real_model_path()).expect("load the real model"))
}

pub fn tiny_llama() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| load_model(&fixture("tiny-llama")).expect("load tiny-llama"))
}

/// Runs the `lorakit` binary. Tests that run it concurrently with model-heavy tests are
/// serialised, so that a 2-core machine is not oversubscribed many times over.
pub fn lorakit(args: &[&str]) -> Output {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("run lorakit")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One logits record of a fixture file (`R`, `R.strided16`, `R.lse`, `R.argmax`, `R.top2gap`).
pub struct LogitsRecord {
    pub full: Option<Vec<f32>>,
    /// [rows, vocab / 16]
    pub strided: Vec<f32>,
    pub lse: Vec<f32>,
    pub argmax: Vec<i64>,
    pub top2gap: Vec<f32>,
}

pub fn logits_record(rel: &str, record: &str) -> LogitsRecord {
    let f = SafetensorsFile::open(&fixture(rel)).expect("fixture file");
    let get = |k: &str| f.tensor_f32(k).expect(k).0;
    LogitsRecord {
        full: f.contains(record).then(|| get(record)),
        strided: get(&format!("{record}.strided16")),
        lse: get(&format!("{record}.lse")),
        argmax: f.tensor_i64(&format!("{record}.argmax")).expect("argmax").0,
        top2gap: get(&format!("{record}.top2gap")),
    }
}

/// Compares our logits [rows, vocab] with a fixture record; returns the max |diff| seen over
/// the full logits (when present), the strided columns and the log-sum-exp, and checks argmax
/// at every row whose top-1/top-2 gap exceeds twice the tolerance.
pub fn compare_logits(
    ours: &[f32],
    vocab: usize,
    want: &LogitsRecord,
    atol: f32,
    what: &str,
) -> f32 {
    let rows = ours.len() / vocab;
    assert_eq!(want.lse.len(), rows, "{what}: row count");
    let mut max_diff = 0.0f32;
    for r in 0..rows {
        let row = &ours[r * vocab..(r + 1) * vocab];
        if let Some(full) = &want.full {
            for (a, b) in row.iter().zip(&full[r * vocab..(r + 1) * vocab]) {
                max_diff = max_diff.max((a - b).abs());
            }
        }
        let sv = vocab / 16;
        for (j, b) in want.strided[r * sv..(r + 1) * sv].iter().enumerate() {
            max_diff = max_diff.max((row[j * 16] - b).abs());
        }
        max_diff = max_diff.max((logsumexp(row) as f32 - want.lse[r]).abs());
        if want.top2gap[r] > 2.0 * atol {
            assert_eq!(
                argmax(row) as i64,
                want.argmax[r],
                "{what}: argmax at row {r}"
            );
        }
    }
    assert!(
        max_diff <= atol,
        "{what}: max |logit diff| {max_diff} > {atol}"
    );
    eprintln!("{what}: max |logit diff| = {max_diff:.3e} (tolerance {atol:.0e})");
    max_diff
}

/// A minimal GGUF v3 writer for hand-made bad files.
pub struct GgufWriter {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter {
            kv: vec![],
            n_kv: 0,
            tensors: vec![],
            n_tensors: 0,
            data: vec![],
        }
    }
    pub fn string(buf: &mut Vec<u8>, s: &str) {
        buf.extend((s.len() as u64).to_le_bytes());
        buf.extend(s.as_bytes());
    }
    pub fn kv_str(&mut self, k: &str, v: &str) -> &mut Self {
        Self::string(&mut self.kv, k);
        self.kv.extend(8u32.to_le_bytes());
        Self::string(&mut self.kv, v);
        self.n_kv += 1;
        self
    }
    pub fn kv_u32(&mut self, k: &str, v: u32) -> &mut Self {
        Self::string(&mut self.kv, k);
        self.kv.extend(4u32.to_le_bytes());
        self.kv.extend(v.to_le_bytes());
        self.n_kv += 1;
        self
    }
    pub fn kv_f32(&mut self, k: &str, v: f32) -> &mut Self {
        Self::string(&mut self.kv, k);
        self.kv.extend(6u32.to_le_bytes());
        self.kv.extend(v.to_le_bytes());
        self.n_kv += 1;
        self
    }
    pub fn kv_str_array(&mut self, k: &str, items: &[&str]) -> &mut Self {
        Self::string(&mut self.kv, k);
        self.kv.extend(9u32.to_le_bytes());
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((items.len() as u64).to_le_bytes());
        for s in items {
            Self::string(&mut self.kv, s);
        }
        self.n_kv += 1;
        self
    }
    /// dims in GGUF order (innermost first); `bytes` of raw data.
    pub fn tensor(&mut self, name: &str, dims: &[u64], type_id: u32, bytes: &[u8]) -> &mut Self {
        Self::string(&mut self.tensors, name);
        self.tensors.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.tensors.extend(d.to_le_bytes());
        }
        self.tensors.extend(type_id.to_le_bytes());
        self.tensors.extend((self.data.len() as u64).to_le_bytes());
        self.data.extend(bytes);
        while !self.data.len().is_multiple_of(32) {
            self.data.push(0);
        }
        self.n_tensors += 1;
        self
    }
    /// A tensor-table entry with an explicit data offset and no data (for bad offsets).
    pub fn tensor_at(&mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> &mut Self {
        Self::string(&mut self.tensors, name);
        self.tensors.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.tensors.extend(d.to_le_bytes());
        }
        self.tensors.extend(type_id.to_le_bytes());
        self.tensors.extend(offset.to_le_bytes());
        self.n_tensors += 1;
        self
    }
    pub fn write(&self, path: &Path) {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.tensors);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend(&self.data);
        std::fs::write(path, out).unwrap();
    }
}
