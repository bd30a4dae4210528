//! Tests for the GGUF reader. The fixture and its expected values come from
//! `scripts/make-gguf-fixture.py` (see tests/data/gguf/README.md); the expected values are
//! computed by the Python `gguf` package, an independent implementation.

use std::path::{Path, PathBuf};

use super::quants::{dequantize_chunked, f16_to_f32};
use super::*;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/gguf")
}

fn fixture_path() -> PathBuf {
    fixture_dir().join("fixture.gguf")
}

fn fixture_bytes() -> Vec<u8> {
    std::fs::read(fixture_path()).expect("read fixture.gguf")
}

fn open_fixture() -> GgufFile {
    GgufFile::open(&fixture_path()).expect("open fixture.gguf")
}

/// The expected values: (name, shape, f32 values).
fn expected() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    expected_values(&fixture_dir().join("fixture.expected.safetensors"))
}

/// (name, shape, f32 values) of every tensor of an f32 safetensors file, by name.
fn expected_values(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse expected");
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, view.shape().to_vec(), values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Bitwise equality, with the first difference in the message.
fn assert_bits_eq(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{name}: value {i} differs: got {} ({:#010x}), want {} ({:#010x})",
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}

const FAKE: &str = "/fixture/hostile.gguf";

/// Parse a byte image as if it were the file FAKE; return the error message.
fn parse_err(bytes: &[u8]) -> String {
    match parse(Path::new(FAKE), bytes) {
        Ok(p) => panic!("expected an error, parsed {} tensors", p.tensors.len()),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(FAKE), "message does not name the file: {msg}");
            msg
        }
    }
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} does not contain {p:?}");
    }
}

/// Offset of the GGUF string `s` (u64 length + bytes) in `hay`; the position just after it.
fn after_string(hay: &[u8], s: &str) -> usize {
    let mut needle = (s.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(s.as_bytes());
    let pos = hay
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .unwrap_or_else(|| panic!("string {s:?} not in fixture"));
    pos + needle.len()
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Where the fields of tensor `name`'s directory entry are: (n_dims, first dim, type, offset).
fn tensor_fields(b: &[u8], name: &str) -> (usize, usize, usize, usize) {
    let p = after_string(b, name);
    let n_dims = u32::from_le_bytes([b[p], b[p + 1], b[p + 2], b[p + 3]]) as usize;
    (p, p + 4, p + 4 + 8 * n_dims, p + 8 + 8 * n_dims)
}

/// A minimal GGUF image writer for cases the fixture cannot express.
#[derive(Default)]
struct Builder(Vec<u8>);

impl Builder {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Builder {
        Builder(Vec::new())
            .raw(b"GGUF")
            .u32(version)
            .u64(n_tensors)
            .u64(n_kv)
    }
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn u32(self, v: u32) -> Self {
        self.raw(&v.to_le_bytes())
    }
    fn u64(self, v: u64) -> Self {
        self.raw(&v.to_le_bytes())
    }
    fn str(self, s: &str) -> Self {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    fn pad_to(mut self, align: usize) -> Self {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
        self
    }
}

// ---------------------------------------------------------------------------------------------
// The fixture: metadata, directory, exact values
// ---------------------------------------------------------------------------------------------

#[test]
fn fixture_header_and_metadata() {
    let f = open_fixture();
    assert_eq!(f.path(), fixture_path().as_path());
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(
        f.get_str("general.architecture").unwrap(),
        "lorakit-fixture"
    );
    assert_eq!(f.get_str("general.name").unwrap(), "lorakit GGUF fixture");

    assert_eq!(f.get("test.u8"), Some(&GgufValue::U8(200)));
    assert_eq!(f.get("test.i8"), Some(&GgufValue::I8(-100)));
    assert_eq!(f.get("test.u16"), Some(&GgufValue::U16(60000)));
    assert_eq!(f.get("test.i16"), Some(&GgufValue::I16(-30000)));
    assert_eq!(f.get("test.u32"), Some(&GgufValue::U32(4_000_000_000)));
    assert_eq!(f.get("test.i32"), Some(&GgufValue::I32(-2_000_000_000)));
    assert_eq!(f.get("test.u64"), Some(&GgufValue::U64((1 << 63) + 5)));
    assert_eq!(f.get("test.i64"), Some(&GgufValue::I64(-(1 << 62))));
    assert_eq!(f.get("test.f32"), Some(&GgufValue::F32(0.15625)));
    assert_eq!(f.get("test.f64"), Some(&GgufValue::F64(-1.0e-300)));
    assert_eq!(f.get("test.bool_true"), Some(&GgufValue::Bool(true)));
    assert_eq!(f.get("test.bool_false"), Some(&GgufValue::Bool(false)));
    assert_eq!(
        f.get_str("test.string").unwrap(),
        "h\u{e9}llo, GGUF \u{2713}"
    );
    assert_eq!(f.get_str("test.empty_string").unwrap(), "");
    assert_eq!(
        f.get_str_array("test.arr_str").unwrap(),
        vec!["a", "bc", "\u{fc}", ""]
    );
    assert_eq!(f.get_i64_array("test.arr_i32").unwrap(), vec![1, -2, 3]);
    assert_eq!(
        f.get("test.arr_u8"),
        Some(&GgufValue::Array(vec![
            GgufValue::U8(0),
            GgufValue::U8(255)
        ]))
    );
    assert_eq!(f.get_f32_array("test.arr_f32").unwrap(), vec![0.5, -2.0]);
    assert_eq!(
        f.get("test.arr_bool"),
        Some(&GgufValue::Array(vec![
            GgufValue::Bool(true),
            GgufValue::Bool(false),
            GgufValue::Bool(true)
        ]))
    );
    assert_eq!(
        f.get("test.arr_u64"),
        Some(&GgufValue::Array(vec![
            GgufValue::U64(1),
            GgufValue::U64(u64::MAX)
        ]))
    );
    assert_eq!(
        f.get("test.arr_nested"),
        Some(&GgufValue::Array(vec![
            GgufValue::Array(vec![GgufValue::I32(1), GgufValue::I32(2)]),
            GgufValue::Array(vec![GgufValue::I32(3)]),
        ]))
    );
    // 2 general + 16 scalar + 7 array keys + general.alignment.
    assert_eq!(f.metadata().len(), 26);
}

#[test]
fn typed_getters_convert_and_explain() {
    let f = open_fixture();
    // Conversions that are exact or sensible.
    assert_eq!(f.get_u64("test.u8").unwrap(), 200);
    assert_eq!(f.get_u64("test.u64").unwrap(), (1 << 63) + 5);
    assert_eq!(f.get_u32("test.u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get_i64("test.i8").unwrap(), -100);
    assert_eq!(f.get_f32("test.f32").unwrap(), 0.15625);
    assert_eq!(f.get_f32("test.int_as_float").unwrap(), 7.0);
    assert_eq!(f.get_f64("test.f64").unwrap(), -1.0e-300);
    assert!(f.get_bool("test.bool_true").unwrap());
    assert_eq!(f.get("test.i16").and_then(|v| v.as_f64()), Some(-30000.0));
    assert_eq!(f.get("test.u64").and_then(|v| v.as_i64()), None);

    let path = fixture_path().display().to_string();
    let err = |r: Result<String>| r.unwrap_err().to_string();
    let m = err(f.get_str("no.such.key").map(str::to_string));
    assert_contains(&m, &[&path, "'no.such.key'", "missing"]);
    let m = err(f.get_str("test.u32").map(str::to_string));
    assert_contains(
        &m,
        &[
            &path,
            "'test.u32'",
            "expected a string, found u32 4000000000",
        ],
    );
    let m = err(f.get_u64("test.negative_i32").map(|v| v.to_string()));
    assert_contains(
        &m,
        &["'test.negative_i32'", "non-negative integer, found i32 -1"],
    );
    let m = err(f.get_u32("test.u64").map(|v| v.to_string()));
    assert_contains(&m, &["'test.u64'", "found u64 9223372036854775813"]);
    let m = err(f.get_f32("test.string").map(|v| v.to_string()));
    assert_contains(&m, &["'test.string'", "expected a number, found string"]);
    let m = err(f.get_str_array("test.arr_i32").map(|v| v.join(",")));
    assert_contains(
        &m,
        &[
            "'test.arr_i32'",
            "expected an array of strings, found array of i32",
        ],
    );
    let m = err(f.get_str_array("test.string").map(|v| v.join(",")));
    assert_contains(
        &m,
        &[
            "'test.string'",
            "expected an array of strings, found string",
        ],
    );
    let m = err(f.get_bool("test.u8").map(|v| v.to_string()));
    assert_contains(&m, &["'test.u8'", "expected a bool, found u8 200"]);
}

#[test]
fn fixture_directory() {
    let f = open_fixture();
    let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names.len(), 18);
    assert_eq!(names[0], "t.f32");
    let t = f.tensor_info("t.f32_3d").unwrap();
    assert_eq!(t.dims, vec![8, 3, 2]);
    assert_eq!(t.shape(), vec![2, 3, 8]);
    assert_eq!(t.n_elements(), 48);
    assert_eq!(t.n_bytes(), 192);
    let t = f.tensor_info("t.q4_k").unwrap();
    assert_eq!(
        (t.dtype, t.shape(), t.n_bytes()),
        (GgmlType::Q4_K, vec![2, 512], 4 * 144)
    );
    assert_eq!(f.tensor_bytes(t).len(), 576);
    let t = f.tensor_info("t.tq2_0").unwrap();
    assert_eq!(t.dtype, GgmlType::TQ2_0);
    assert_eq!(f.tensor_bytes(t).len(), 66);
    for t in f.tensors() {
        assert_eq!(t.offset % 64, 0);
        assert_eq!(f.tensor_bytes(t).len() as u64, t.n_bytes());
    }
    // An info that does not belong to this file gives an empty slice, not a panic.
    let foreign = GgufTensorInfo {
        name: "x".into(),
        dims: vec![32, 1 << 40],
        dtype: GgmlType::Q4_0,
        offset: u64::MAX - 31,
    };
    assert!(f.tensor_bytes(&foreign).is_empty());
}

#[test]
fn fixture_values_match_python_gguf_bitwise() {
    let f = open_fixture();
    let expected = expected();
    let mut covered = Vec::new();
    for (name, shape, want) in &expected {
        let (got, got_shape) = f.tensor_f32(name).unwrap();
        assert_eq!(&got_shape, shape, "{name}: shape");
        // Exact: the kernels do the same f32 operations in the same order as the reference.
        assert_bits_eq(name, &got, want);
        covered.push(f.tensor_info(name).unwrap().dtype);

        let mut into = vec![f32::NAN; want.len()];
        f.tensor_f32_into(name, &mut into).unwrap();
        assert_bits_eq(name, &into, want);
    }
    // Every type that has a kernel is checked against the reference.
    for e in GgmlType::TABLE.iter() {
        if e.1.can_dequantize() {
            assert!(covered.contains(&e.1), "no fixture tensor of type {}", e.2);
        }
    }
    assert_eq!(covered.len(), 17);
}

/// Real blocks: the first rows of one tensor of each type in Gemma 3 270M's Q4_K_M file (F32,
/// Q8_0, Q5_0, Q4_K, Q6_K), copied by `scripts/make-gemma3-fixture.py` (tests/data/gemma3-270m).
#[test]
fn gemma3_blocks_match_python_gguf_bitwise() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/gemma3-270m");
    let f = GgufFile::open(&dir.join("blocks.gguf")).unwrap();
    let expected = expected_values(&dir.join("blocks.expected.safetensors"));
    let mut types: Vec<&str> = Vec::new();
    for (name, shape, want) in &expected {
        let (got, got_shape) = f.tensor_f32(name).unwrap();
        assert_eq!(&got_shape, shape, "{name}: shape");
        assert_bits_eq(name, &got, want);
        types.push(f.tensor_info(name).unwrap().dtype.name());
    }
    types.sort_unstable();
    assert_eq!(types, ["F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"]);
}

#[test]
fn parallel_chunks_match_serial() {
    let f = open_fixture();
    for (name, _, want) in expected() {
        let info = f.tensor_info(&name).unwrap();
        let bytes = f.tensor_bytes(info);
        let bs = info.dtype.block_size();
        // One block per task, a few blocks per task, and everything on one thread.
        for chunk in [1, bs, 3 * bs, 256, usize::MAX] {
            let mut out = vec![f32::NAN; want.len()];
            dequantize_chunked(info.dtype, bytes, &mut out, chunk).unwrap();
            assert_bits_eq(&format!("{name} (chunk {chunk})"), &out, &want);
        }
    }
    // A tensor big enough for dequantize() itself to go parallel: the Q4_K blocks repeated.
    let info = f.tensor_info("t.q4_k").unwrap();
    let block = f.tensor_bytes(info);
    let big: Vec<u8> = block
        .iter()
        .copied()
        .cycle()
        .take(block.len() * 200)
        .collect();
    let (_, _, want_block) = expected().into_iter().find(|e| e.0 == "t.q4_k").unwrap();
    let mut out = vec![0.0f32; want_block.len() * 200];
    dequantize(GgmlType::Q4_K, &big, &mut out).unwrap();
    for (i, chunk) in out.chunks(want_block.len()).enumerate() {
        assert_bits_eq(&format!("big Q4_K copy {i}"), chunk, &want_block);
    }
}

#[test]
fn dequantize_checks_lengths_and_types() {
    let mut out = vec![0.0f32; 32];
    assert_eq!(
        dequantize(GgmlType::Q4_0, &[0u8; 17], &mut out),
        Err(DequantError::Length {
            dtype: GgmlType::Q4_0,
            bytes: 17,
            out: 32
        })
    );
    let e = dequantize(GgmlType::Q4_0, &[0u8; 36], &mut out).unwrap_err();
    assert_eq!(
        e.to_string(),
        "36 bytes of Q4_0 data hold 64 values, but the output has room for 32"
    );
    let e = dequantize(GgmlType::Q8_0, &[0u8; 35], &mut out).unwrap_err();
    assert_contains(&e.to_string(), &["35 bytes of Q8_0", "34-byte blocks"]);
    assert_eq!(
        dequantize(GgmlType::IQ2_XXS, &[0u8; 66], &mut vec![0.0; 256]),
        Err(DequantError::Unsupported(GgmlType::IQ2_XXS))
    );
    assert!(dequantize(GgmlType::Q8_0, &[], &mut []).is_ok());
}

#[test]
fn unsupported_type_fails_only_when_dequantised() {
    let f = open_fixture(); // opens although it holds a TQ2_0 tensor
    let path = fixture_path().display().to_string();
    let m = f.tensor_f32("t.tq2_0").unwrap_err().to_string();
    assert_contains(
        &m,
        &[&path, "unsupported tensor type TQ2_0 of tensor 't.tq2_0'"],
    );
    let m = f
        .tensor_f32_into("t.tq2_0", &mut [0.0; 256])
        .unwrap_err()
        .to_string();
    assert_contains(&m, &["TQ2_0", "'t.tq2_0'"]);
    assert!(matches!(
        f.tensor_f32("t.tq2_0"),
        Err(Error::Unsupported { .. })
    ));

    let m = f.tensor_f32("blk.0.nope").unwrap_err().to_string();
    assert_contains(&m, &[&path, "tensor 'blk.0.nope'", "not found in file"]);
    let m = f
        .tensor_f32_into("t.q8_0", &mut [0.0; 3])
        .unwrap_err()
        .to_string();
    assert_contains(&m, &["'t.q8_0'", "has 128 values, the output buffer 3"]);
}

#[test]
fn version_2_reads_like_version_3() {
    let mut b = fixture_bytes();
    put_u32(&mut b, 4, 2);
    let f = GgufFile::from_bytes("/fixture/v2.gguf", b).unwrap();
    assert_eq!(f.version(), 2);
    let (vals, shape) = f.tensor_f32("t.q6_k").unwrap();
    let want = expected().into_iter().find(|e| e.0 == "t.q6_k").unwrap();
    assert_eq!(shape, want.1);
    assert_bits_eq("t.q6_k (v2)", &vals, &want.2);
}

#[test]
fn minimal_files_from_the_builder() {
    // No metadata, no tensors.
    let f = GgufFile::from_bytes("/m/empty.gguf", Builder::header(3, 0, 0).0).unwrap();
    assert!(f.tensors().is_empty() && f.metadata().is_empty());
    assert_eq!(f.alignment(), DEFAULT_ALIGNMENT);

    // Default alignment 32, a scalar (0-dim) tensor and a Q8_0 tensor.
    let mut d = vec![0u8; 32 + 34];
    d[..4].copy_from_slice(&1.5f32.to_le_bytes());
    d[32..34].copy_from_slice(&0x3c00u16.to_le_bytes()); // d = 1.0
    for j in 0..32 {
        d[34 + j] = (j as i8 - 16) as u8;
    }
    let b = Builder::header(3, 2, 1)
        .str("general.architecture")
        .u32(vtype::STRING)
        .str("llama")
        .str("scalar")
        .u32(0)
        .u32(0) // F32
        .u64(0)
        .str("q")
        .u32(1)
        .u64(32)
        .u32(8) // Q8_0
        .u64(32)
        .pad_to(32)
        .raw(&d);
    let f = GgufFile::from_bytes("/m/min.gguf", b.0).unwrap();
    assert_eq!(f.data_offset() % 32, 0);
    let (v, shape) = f.tensor_f32("scalar").unwrap();
    assert_eq!((v, shape), (vec![1.5], vec![]));
    let (v, shape) = f.tensor_f32("q").unwrap();
    assert_eq!(shape, vec![32]);
    assert_eq!(v, (0..32).map(|j| (j - 16) as f32).collect::<Vec<_>>());
}

#[test]
fn f16_conversion_is_exact() {
    for h in 0..=u16::MAX {
        let want = half::f16::from_bits(h).to_f32();
        let got = f16_to_f32(h);
        if want.is_nan() {
            assert!(got.is_nan());
            // Sign and payload are kept (signalling NaNs too), as numpy's conversion does.
            assert_eq!(got.to_bits() >> 31, (h >> 15) as u32);
            assert_eq!(got.to_bits() & 0x007f_ffff, ((h & 0x3ff) as u32) << 13);
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "f16 {h:#06x}");
        }
    }
}

#[test]
fn ggml_type_table_is_consistent() {
    for (i, e) in GgmlType::TABLE.iter().enumerate() {
        assert_eq!(e.1 as usize, i, "{} out of order", e.2);
        assert_eq!(GgmlType::from_u32(e.0), Some(e.1));
        assert_eq!(
            (e.1.id(), e.1.name(), e.1.block_size(), e.1.type_size()),
            (e.0, e.2, e.3, e.4)
        );
        assert_eq!(format!("{:?}", e.1), e.2);
    }
    for removed in [4, 5, 31, 32, 33, 36, 37, 38, 42, 1000, u32::MAX] {
        assert_eq!(GgmlType::from_u32(removed), None);
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile input: every case is an error that names the file and the problem, never a panic
// ---------------------------------------------------------------------------------------------

#[test]
fn truncation_at_every_header_offset_and_through_the_data() {
    let b = fixture_bytes();
    let f = GgufFile::from_bytes(FAKE, b.clone()).unwrap();
    let data_offset = f.data_offset() as usize;
    let data_end = f
        .tensors()
        .iter()
        .map(|t| data_offset + (t.offset + t.n_bytes()) as usize)
        .max()
        .unwrap();
    // Every offset in the header, metadata and directory.
    for len in 0..data_offset {
        let m = parse_err(&b[..len]);
        assert!(
            m.contains("truncated at byte")
                || m.contains("exceeds the")
                || m.contains("impossible")
                || m.contains("extends past the end of the file"),
            "truncated to {len}: unexpected message {m}"
        );
    }
    // A few specific ones.
    assert_contains(
        &parse_err(&b[..3]),
        &["truncated at byte 0 while reading the GGUF magic"],
    );
    assert_contains(
        &parse_err(&b[..6]),
        &["truncated at byte 4 while reading the GGUF version"],
    );
    // (Keys near the start cannot be truncated this way: the header's key and tensor counts are
    // checked against the file size first and fail as "impossible".)
    let key = after_string(&b, "test.negative_i32");
    assert_contains(
        &parse_err(&b[..key + 6]),
        &[&format!(
            "truncated at byte {} while reading the value of metadata key 'test.negative_i32' (needed 4 bytes",
            key + 4
        )],
    );
    let (_, dims, _, _) = tensor_fields(&b, "t.q5_k");
    assert_contains(
        &parse_err(&b[..dims + 9]),
        &[
            "truncated at byte",
            "while reading dimension 1 of tensor 't.q5_k'",
        ],
    );
    // Through the data: every 5th byte, then the exact boundary.
    for len in (data_offset..data_end).step_by(5).chain([data_end - 1]) {
        let m = parse_err(&b[..len]);
        assert_contains(&m, &["extends past the end of the file"]);
    }
    assert!(parse(Path::new(FAKE), &b[..data_end]).is_ok());
}

#[test]
fn wrong_magic_and_versions() {
    // Through a real file, so the message names the real path.
    let dir = std::env::temp_dir().join(format!("lorakit-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("not-gguf.bin");
    let mut b = fixture_bytes();
    b[..4].copy_from_slice(b"GGML");
    std::fs::write(&path, &b).unwrap();
    let m = GgufFile::open(&path).unwrap_err().to_string();
    assert_contains(
        &m,
        &[
            &path.display().to_string(),
            "not a GGUF file",
            "47 47 4d 4c",
        ],
    );
    let empty = dir.join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let m = GgufFile::open(&empty).unwrap_err().to_string();
    assert_contains(&m, &[&empty.display().to_string(), "empty file"]);
    let missing = dir.join("missing.gguf");
    let m = GgufFile::open(&missing).unwrap_err().to_string();
    assert!(m.contains(&missing.display().to_string()), "{m}");
    let _ = std::fs::remove_dir_all(&dir);

    let mut b = fixture_bytes();
    put_u32(&mut b, 4, 1);
    assert_contains(
        &parse_err(&b),
        &["unsupported GGUF version 1", "versions 2 and 3"],
    );
    put_u32(&mut b, 4, 99);
    assert_contains(
        &parse_err(&b),
        &["unsupported GGUF version 99", "versions 2 and 3"],
    );
    put_u32(&mut b, 4, 3u32.swap_bytes());
    assert_contains(&parse_err(&b), &["big-endian"]);
}

#[test]
fn impossible_counts_and_lengths() {
    let b = fixture_bytes();
    let mut h = b.clone();
    put_u64(&mut h, 8, u64::MAX / 2);
    assert_contains(
        &parse_err(&h),
        &["the tensor count is 9223372036854775807", "impossible"],
    );
    let mut h = b.clone();
    put_u64(&mut h, 8, 1 << 40);
    assert_contains(
        &parse_err(&h),
        &["the tensor count is 1099511627776", "impossible"],
    );
    let mut h = b.clone();
    put_u64(&mut h, 16, u64::MAX);
    assert_contains(
        &parse_err(&h),
        &[
            "the metadata key count is 18446744073709551615",
            "impossible",
        ],
    );
    // The first key's length.
    let mut h = b.clone();
    put_u64(&mut h, 24, u64::MAX - 3);
    assert_contains(
        &parse_err(&h),
        &[
            "string length 18446744073709551612 at byte 24",
            "metadata key #0",
            "exceeds",
        ],
    );
    // A string value's length.
    let mut h = b.clone();
    let p = after_string(&b, "test.string");
    put_u64(&mut h, p + 4, 1 << 50);
    assert_contains(
        &parse_err(&h),
        &[
            "string length 1125899906842624",
            "metadata key 'test.string'",
            "exceeds",
        ],
    );
    // An array's length (type u32 9, element type u32, count u64).
    let mut h = b.clone();
    let p = after_string(&b, "test.arr_i32");
    put_u64(&mut h, p + 8, u64::MAX / 3);
    assert_contains(
        &parse_err(&h),
        &[
            "array length of metadata key 'test.arr_i32' is 6148914691236517205",
            "impossible",
        ],
    );
    let mut h = b.clone();
    let p = after_string(&b, "test.arr_str");
    put_u64(&mut h, p + 8, 1 << 30);
    assert_contains(
        &parse_err(&h),
        &[
            "array length of metadata key 'test.arr_str' is 1073741824",
            "impossible",
        ],
    );
    // An element string's length inside an array.
    let mut h = b.clone();
    let p = after_string(&b, "test.arr_str");
    put_u64(&mut h, p + 16, u64::MAX);
    assert_contains(
        &parse_err(&h),
        &[
            "string length 18446744073709551615",
            "'test.arr_str'",
            "exceeds",
        ],
    );
}

#[test]
fn bad_metadata_values() {
    let b = fixture_bytes();
    let mut h = b.clone();
    put_u32(&mut h, after_string(&b, "test.u8"), 13);
    assert_contains(
        &parse_err(&h),
        &["metadata key 'test.u8' has unknown value type 13"],
    );
    let mut h = b.clone();
    put_u32(&mut h, after_string(&b, "test.arr_u8") + 4, 77);
    assert_contains(
        &parse_err(&h),
        &["'test.arr_u8' is an array of unknown value type 77"],
    );
    let mut h = b.clone();
    h[after_string(&b, "test.bool_false") + 4] = 2;
    assert_contains(
        &parse_err(&h),
        &["invalid bool byte 2", "'test.bool_false'"],
    );
    let mut h = b.clone();
    h[after_string(&b, "test.string") + 4 + 8 + 1] = 0xff;
    assert_contains(
        &parse_err(&h),
        &["the value of metadata key 'test.string'", "not valid UTF-8"],
    );
    // Rename test.u16 to test.i16: a duplicate key.
    let mut h = b.clone();
    let p = after_string(&b, "test.u16");
    h[p - 3] = b'i';
    assert_contains(&parse_err(&h), &["duplicate metadata key 'test.i16'"]);
    // general.alignment = 48.
    let mut h = b.clone();
    put_u32(&mut h, after_string(&b, "general.alignment") + 4, 48);
    assert_contains(
        &parse_err(&h),
        &["'general.alignment'", "power of two", "u32 48"],
    );
    let mut h = b.clone();
    put_u32(&mut h, after_string(&b, "general.alignment") + 4, 0);
    assert_contains(&parse_err(&h), &["'general.alignment'", "u32 0"]);

    // Arrays nested deeper than the limit.
    let mut nb = Builder::header(3, 0, 1).str("deep").u32(vtype::ARRAY);
    for _ in 0..MAX_ARRAY_DEPTH + 1 {
        nb = nb.u32(vtype::ARRAY).u64(1);
    }
    let nb = nb.u32(vtype::U8).u64(1).raw(&[7]);
    assert_contains(&parse_err(&nb.0), &["'deep'", "nested deeper than 4"]);
    // Exactly at the limit is fine.
    let mut ok = Builder::header(3, 0, 1).str("deep").u32(vtype::ARRAY);
    for _ in 0..MAX_ARRAY_DEPTH - 1 {
        ok = ok.u32(vtype::ARRAY).u64(1);
    }
    let ok = ok.u32(vtype::U8).u64(1).raw(&[7]);
    assert!(parse(Path::new(FAKE), &ok.0).is_ok());
}

#[test]
fn bad_tensor_directory_entries() {
    let b = fixture_bytes();

    // Offset past the end, and an offset so large the sum overflows.
    for off in [1u64 << 40, u64::MAX - 63] {
        let mut h = b.clone();
        let (_, _, _, o) = tensor_fields(&b, "t.tq2_0");
        put_u64(&mut h, o, off);
        assert_contains(
            &parse_err(&h),
            &["tensor 't.tq2_0'", "extends past the end of the file"],
        );
    }
    // Misaligned offset.
    let mut h = b.clone();
    let (_, _, _, o) = tensor_fields(&b, "t.q4_0");
    let old = u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
    put_u64(&mut h, o, old + 32);
    assert_contains(
        &parse_err(&h),
        &[
            "tensor 't.q4_0'",
            &format!(
                "data offset {} is not a multiple of the alignment 64",
                old + 32
            ),
        ],
    );
    // Overlapping data: t.q4_1 moved onto t.q4_0.
    let mut h = b.clone();
    let (_, _, _, o1) = tensor_fields(&b, "t.q4_1");
    h.copy_within(o..o + 8, o1);
    let m = parse_err(&h);
    assert_contains(&m, &["overlaps tensor"]);
    assert!(m.contains("'t.q4_0'") && m.contains("'t.q4_1'"), "{m}");
    // Dims whose product overflows u64.
    let mut h = b.clone();
    let (_, d, _, _) = tensor_fields(&b, "t.f16");
    put_u64(&mut h, d, 1 << 40);
    put_u64(&mut h, d + 8, 1 << 40);
    assert_contains(
        &parse_err(&h),
        &["tensor 't.f16'", "overflow", "1099511627776"],
    );
    // Dims whose product fits but whose byte size (x 4 for F32) does not.
    let mut h = b.clone();
    let (_, d, _, _) = tensor_fields(&b, "t.f32");
    put_u64(&mut h, d, 1 << 62);
    put_u64(&mut h, d + 8, 2);
    assert_contains(
        &parse_err(&h),
        &[
            "tensor 't.f32'",
            "of type F32 overflow",
            "byte size does not fit",
        ],
    );
    // A dim beyond i64 (ggml's int64 ne).
    let mut h = b.clone();
    let (_, d, _, _) = tensor_fields(&b, "t.q4_k");
    put_u64(&mut h, d, 1 << 63);
    put_u64(&mut h, d + 8, 0);
    assert_contains(
        &parse_err(&h),
        &["tensor 't.q4_k'", "dimension out of range"],
    );
    // Dims consistent with the type but larger than the data: the byte length runs past the file.
    let mut h = b.clone();
    put_u64(&mut h, d + 8, 1 << 20);
    assert_contains(
        &parse_err(&h),
        &["tensor 't.q4_k'", "extends past the end of the file"],
    );
    // Row length not a multiple of the block size.
    let mut h = b.clone();
    let (_, d, _, _) = tensor_fields(&b, "t.q4_0");
    put_u64(&mut h, d, 48);
    assert_contains(
        &parse_err(&h),
        &["tensor 't.q4_0'", "row length 48", "Q4_0 block size 32"],
    );
    // Too many dimensions.
    let mut h = b.clone();
    let (nd, _, _, _) = tensor_fields(&b, "t.f32");
    put_u32(&mut h, nd, 5);
    assert_contains(
        &parse_err(&h),
        &["tensor 't.f32'", "has 5 dimensions, GGUF allows at most 4"],
    );
    let mut h = b.clone();
    put_u32(&mut h, nd, u32::MAX);
    assert_contains(
        &parse_err(&h),
        &["tensor 't.f32'", "has 4294967295 dimensions"],
    );
    // Unknown and removed type ids.
    for id in [99u32, 4, 31] {
        let mut h = b.clone();
        let (_, _, t, _) = tensor_fields(&b, "t.q8_0");
        put_u32(&mut h, t, id);
        assert_contains(
            &parse_err(&h),
            &["tensor 't.q8_0'", &format!("unknown tensor type id {id}")],
        );
    }
    // Duplicate tensor names: t.q4_1 renamed to t.q4_0.
    let mut h = b.clone();
    let (nd, _, _, _) = tensor_fields(&b, "t.q4_1");
    h[nd - 1] = b'0';
    assert_contains(
        &parse_err(&h),
        &[
            "tensor 't.q4_0'",
            "duplicate tensor name (tensors #5 and #6)",
        ],
    );
    // A tensor name that is not UTF-8.
    let mut h = b.clone();
    h[nd - 2] = 0xc0;
    assert_contains(
        &parse_err(&h),
        &["the name of tensor #6", "not valid UTF-8"],
    );
}

/// Random byte flips in the header never panic (they may or may not parse).
#[test]
fn random_header_corruption_never_panics() {
    use rand::{Rng, SeedableRng};
    let b = fixture_bytes();
    let header_len = GgufFile::from_bytes(FAKE, b.clone()).unwrap().data_offset() as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..3000 {
        let mut h = b.clone();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..header_len);
            h[i] = rng.random();
        }
        if let Ok(f) = GgufFile::from_bytes(FAKE, h) {
            for t in f.tensors() {
                let _ = f.tensor_f32(&t.name);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The real model (manual): LORAKIT_GGUF=path/to/model.gguf cargo test -p lorakit --lib \
//   io::gguf::tests::real_model -- --ignored --nocapture
// With LORAKIT_GGUF_REF=ref.safetensors (tensor name -> f32 values from gguf.quants.dequantize),
// every tensor in the reference is compared bitwise.
// ---------------------------------------------------------------------------------------------
