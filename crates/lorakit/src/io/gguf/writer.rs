//! GGUF v3 writer.
//!
//! [`GgufWriter`] collects metadata and tensors and lays them out as llama.cpp's `gguf_write`
//! and the Python `gguf` package do: header, key/value pairs in insertion order, the tensor
//! directory, padding to `general.alignment` (32), each tensor's data padded to 32 bytes.
//! The tensor data comes from [`quantize`](super::quantize) (in `gguf/quantize.rs`).

use std::io::{self, Write};

use super::{GgmlType, GgufValue, DEFAULT_ALIGNMENT, GGUF_MAGIC};

/// A GGUF file being assembled in memory.
#[derive(Debug, Default)]
pub struct GgufWriter {
    kv: Vec<(String, GgufValue)>,
    /// (name, dims innermost first, type, data)
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// The GGUF value type id of `v` (for arrays: of the array itself).
fn type_id(v: &GgufValue) -> u32 {
    use super::vtype::*;
    match v {
        GgufValue::U8(_) => U8,
        GgufValue::I8(_) => I8,
        GgufValue::U16(_) => U16,
        GgufValue::I16(_) => I16,
        GgufValue::U32(_) => U32,
        GgufValue::I32(_) => I32,
        GgufValue::U64(_) => U64,
        GgufValue::I64(_) => I64,
        GgufValue::F32(_) => F32,
        GgufValue::F64(_) => F64,
        GgufValue::Bool(_) => BOOL,
        GgufValue::String(_) => STRING,
        GgufValue::Array(_) => ARRAY,
    }
}

/// The value without its type id (arrays: element type, count, elements).
fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend(x.to_le_bytes()),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(items) => {
            // An empty array is written as an array of u8 (the reader accepts any type).
            let elem = items.first().map_or(super::vtype::U8, type_id);
            out.extend(elem.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it);
            }
        }
    }
}

fn pad(out: &mut Vec<u8>, align: usize) {
    while !out.len().is_multiple_of(align) {
        out.push(0);
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces, keeping its place) the key `key`.
    pub fn kv(&mut self, key: &str, value: GgufValue) -> &mut Self {
        match self.kv.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.kv.push((key.to_owned(), value)),
        }
        self
    }

    pub fn kv_str(&mut self, key: &str, value: &str) -> &mut Self {
        self.kv(key, GgufValue::String(value.to_owned()))
    }

    pub fn kv_u32(&mut self, key: &str, value: u32) -> &mut Self {
        self.kv(key, GgufValue::U32(value))
    }

    pub fn kv_f32(&mut self, key: &str, value: f32) -> &mut Self {
        self.kv(key, GgufValue::F32(value))
    }

    /// Adds a tensor. `shape` is row-major, outermost first (`[out, in]` for a linear weight; the
    /// file stores it reversed); `data` is already in `dtype`'s layout ([`quantize`]).
    ///
    /// Panics if `data` does not hold `shape`'s values in `dtype` (a bug of the caller).
    pub fn tensor(&mut self, name: &str, shape: &[usize], dtype: GgmlType, data: Vec<u8>) {
        let n: usize = shape.iter().product();
        assert_eq!(
            n / dtype.block_size() * dtype.type_size(),
            data.len(),
            "tensor {name}: data does not match shape {shape:?} in {dtype}"
        );
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push((name.to_owned(), dims, dtype, data));
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = DEFAULT_ALIGNMENT as usize;
        let mut out = GGUF_MAGIC.to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut out, k);
            out.extend(type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for (name, dims, dtype, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(dtype.id().to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (data.len() as u64).next_multiple_of(DEFAULT_ALIGNMENT);
        }
        pad(&mut out, align);
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            pad(&mut out, align);
        }
        out
    }

    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.to_bytes())
    }
}
