//! Gemma 3 270M (base, Q4_K_M GGUF, fetched by `scripts/fetch-model.sh gemma3-270m`) against the
//! `gguf` package and transformers on the same file (`tests/data/gemma3-270m/`, made by
//! `scripts/make-gemma3-fixture.py`): the tensor types and their dequantisation.

use std::collections::BTreeMap;

use lorakit::io::gguf::GgufFile;
use lorakit::io::safetensors_file::SafetensorsFile;

use crate::common::*;

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
