//! GGUF reader: metadata, tensor directory and dequantisation to f32.
//!
//! Reads GGUF versions 2 and 3 (little-endian), the format of llama.cpp / ggml:
//!
//! ```text
//! "GGUF" | u32 version | u64 tensor_count | u64 kv_count
//! kv_count × (string key | u32 value type | value)
//! tensor_count × (string name | u32 n_dims | n_dims × u64 dim | u32 ggml type | u64 offset)
//! padding to `general.alignment` (default 32) | tensor data
//! ```
//!
//! Strings are a u64 byte length and UTF-8 bytes; arrays are a u32 element type, a u64 count
//! and the elements. `dims[0]` is the innermost dimension (the row length).
//!
//! [`GgufFile::open`] memory-maps the file and validates everything it will later rely on
//! (every length against the bytes left, every tensor's size and offset against the data section),
//! so the accessors cannot fail on a file that opened. A hostile or damaged file yields an
//! [`Error`] that names the path and what is wrong; it never panics, and no allocation is sized by
//! a count before that count has been checked against the file size.
//!
//! [`GgufWriter`] (in `gguf/writer.rs`) writes files in the same format, [`quantize`] (in
//! `gguf/quantize.rs`) the data.
//!
//! Dequantisation ([`dequantize`], [`GgufFile::tensor_f32`]) is bit-identical to ggml's
//! `dequantize_row_*` and the Python `gguf` package (kernels in `gguf/quants.rs`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

mod quantize;
mod quants;
#[cfg(test)]
mod tests;
pub mod writer;

pub use quantize::{can_quantize, quantize, QuantizeError, WRITABLE};
pub use quants::{dequantize, scale_min_k4, DequantError};
pub use writer::GgufWriter;

/// The GGUF magic, the first four bytes of every file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most this many dimensions.
pub const MAX_DIMS: usize = 4;
/// Arrays of arrays deeper than this are rejected (real files use at most one level).
pub const MAX_ARRAY_DEPTH: usize = 4;

// ---------------------------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------------------------

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// Any integer that is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer that fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U8(v) => Some(v as i64),
            GgufValue::U16(v) => Some(v as i64),
            GgufValue::U32(v) => Some(v as i64),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            GgufValue::I8(v) => Some(v as i64),
            GgufValue::I16(v) => Some(v as i64),
            GgufValue::I32(v) => Some(v as i64),
            GgufValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Any number: floats as they are, integers converted (exact up to 2^53).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            GgufValue::U64(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The value's type for messages: `u32`, `string`, `array of string`, `empty array`, ...
    pub fn type_name(&self) -> String {
        match self {
            GgufValue::U8(_) => "u8".into(),
            GgufValue::I8(_) => "i8".into(),
            GgufValue::U16(_) => "u16".into(),
            GgufValue::I16(_) => "i16".into(),
            GgufValue::U32(_) => "u32".into(),
            GgufValue::I32(_) => "i32".into(),
            GgufValue::U64(_) => "u64".into(),
            GgufValue::I64(_) => "i64".into(),
            GgufValue::F32(_) => "f32".into(),
            GgufValue::F64(_) => "f64".into(),
            GgufValue::Bool(_) => "bool".into(),
            GgufValue::String(_) => "string".into(),
            GgufValue::Array(a) => match a.first() {
                Some(v) => format!("array of {}", v.type_name()),
                None => "empty array".into(),
            },
        }
    }

    /// `type_name` plus the value itself for scalars, e.g. `i32 -1`, for messages.
    fn describe(&self) -> String {
        match self {
            GgufValue::String(_) | GgufValue::Array(_) => self.type_name(),
            GgufValue::U8(v) => format!("u8 {v}"),
            GgufValue::I8(v) => format!("i8 {v}"),
            GgufValue::U16(v) => format!("u16 {v}"),
            GgufValue::I16(v) => format!("i16 {v}"),
            GgufValue::U32(v) => format!("u32 {v}"),
            GgufValue::I32(v) => format!("i32 {v}"),
            GgufValue::U64(v) => format!("u64 {v}"),
            GgufValue::I64(v) => format!("i64 {v}"),
            GgufValue::F32(v) => format!("f32 {v}"),
            GgufValue::F64(v) => format!("f64 {v}"),
            GgufValue::Bool(v) => format!("bool {v}"),
        }
    }
}

/// GGUF value type ids (`gguf_type`).
mod vtype {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;

    /// The fewest bytes one value of this type can take, or None for an unknown type.
    pub fn min_size(t: u32) -> Option<u64> {
        Some(match t {
            U8 | I8 | BOOL => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            STRING => 8,    // u64 length
            ARRAY => 4 + 8, // element type + count
            _ => return None,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor types
// ---------------------------------------------------------------------------------------------

/// A ggml tensor type (`ggml_type`). Every id the GGUF format currently defines is listed, so a
/// file can be inspected whatever it holds; [`GgmlType::can_dequantize`] says which lorakit can
/// turn into f32.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
}

impl GgmlType {
    /// `(id, type, name, block size in values, block size in bytes)` for every type.
    const TABLE: [(u32, GgmlType, &'static str, usize, usize); 34] = {
        use GgmlType::*;
        [
            (0, F32, "F32", 1, 4),
            (1, F16, "F16", 1, 2),
            (2, Q4_0, "Q4_0", 32, 18),
            (3, Q4_1, "Q4_1", 32, 20),
            (6, Q5_0, "Q5_0", 32, 22),
            (7, Q5_1, "Q5_1", 32, 24),
            (8, Q8_0, "Q8_0", 32, 34),
            (9, Q8_1, "Q8_1", 32, 40),
            (10, Q2_K, "Q2_K", 256, 84),
            (11, Q3_K, "Q3_K", 256, 110),
            (12, Q4_K, "Q4_K", 256, 144),
            (13, Q5_K, "Q5_K", 256, 176),
            (14, Q6_K, "Q6_K", 256, 210),
            (15, Q8_K, "Q8_K", 256, 292),
            (16, IQ2_XXS, "IQ2_XXS", 256, 66),
            (17, IQ2_XS, "IQ2_XS", 256, 74),
            (18, IQ3_XXS, "IQ3_XXS", 256, 98),
            (19, IQ1_S, "IQ1_S", 256, 50),
            (20, IQ4_NL, "IQ4_NL", 32, 18),
            (21, IQ3_S, "IQ3_S", 256, 110),
            (22, IQ2_S, "IQ2_S", 256, 82),
            (23, IQ4_XS, "IQ4_XS", 256, 136),
            (24, I8, "I8", 1, 1),
            (25, I16, "I16", 1, 2),
            (26, I32, "I32", 1, 4),
            (27, I64, "I64", 1, 8),
            (28, F64, "F64", 1, 8),
            (29, IQ1_M, "IQ1_M", 256, 56),
            (30, BF16, "BF16", 1, 2),
            (34, TQ1_0, "TQ1_0", 256, 54),
            (35, TQ2_0, "TQ2_0", 256, 66),
            (39, MXFP4, "MXFP4", 32, 17),
            (40, NVFP4, "NVFP4", 64, 36),
            (41, Q1_0, "Q1_0", 128, 18),
        ]
    };

    fn entry(self) -> &'static (u32, GgmlType, &'static str, usize, usize) {
        // The table lists the variants in declaration order.
        &Self::TABLE[self as usize]
    }

    /// The type with ggml id `id`, or None for an id that no current ggml defines (including the
    /// removed Q4_2, Q4_3 and the repacked Q4_0_4_4 family).
    pub fn from_u32(id: u32) -> Option<GgmlType> {
        Self::TABLE.iter().find(|e| e.0 == id).map(|e| e.1)
    }

    /// The ggml id.
    pub fn id(self) -> u32 {
        self.entry().0
    }

    /// The ggml name, e.g. `Q4_K`.
    pub fn name(self) -> &'static str {
        self.entry().2
    }

    /// Values per block (1 for plain types).
    pub fn block_size(self) -> usize {
        self.entry().3
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.entry().4
    }

    /// Whether [`dequantize`] has a kernel for this type: F32, F16, BF16, F64, Q4_0, Q4_1, Q5_0,
    /// Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS.
    pub fn can_dequantize(self) -> bool {
        quants::kernel(self).is_some()
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor directory
// ---------------------------------------------------------------------------------------------

/// One entry of the tensor directory. [`GgufFile::open`] has checked that its data lies inside
/// the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// As stored: `dims[0]` (ggml's `ne0`) is the innermost dimension, the row length.
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    /// Byte offset of the data, relative to the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Row-major shape, outermost first (`dims` reversed), e.g. `[out, in]` for a linear weight.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of values (1 for a tensor with no dimensions). Saturates instead of overflowing,
    /// which can only happen for an info that did not come from [`GgufFile::open`].
    pub fn n_elements(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .unwrap_or(u64::MAX)
    }

    /// Bytes of data: values / block size × bytes per block.
    pub fn n_bytes(&self) -> u64 {
        (self.n_elements() / self.dtype.block_size() as u64)
            .saturating_mul(self.dtype.type_size() as u64)
    }
}

// ---------------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------------

enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// An open, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Memory-map `path` and validate its header, metadata and tensor directory.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(Error::format(path, "empty file, not a GGUF file"));
        }
        // SAFETY: the map is read-only and private to this process; like every mmap-based model
        // loader we rely on nobody truncating or rewriting the file while it is open. Every read
        // goes through bounds-checked slices of the map.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_parts(path.to_path_buf(), Bytes::Mapped(map))
    }

    /// Parse a GGUF image already in memory. `path` only labels error messages.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<GgufFile> {
        Self::from_parts(path.into(), Bytes::Owned(bytes))
    }

    fn from_parts(path: PathBuf, bytes: Bytes) -> Result<GgufFile> {
        let parsed = parse(&path, bytes.as_slice())?;
        Ok(GgufFile {
            path,
            bytes,
            version: parsed.version,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            by_name: parsed.by_name,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version: 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment in bytes (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All metadata, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&GgufValue> {
        self.get(key)
            .ok_or_else(|| Error::config(&self.path, key, "missing"))
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &GgufValue) -> Error {
        Error::config(
            &self.path,
            key,
            format!("expected {expected}, found {}", found.describe()),
        )
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str()
            .ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    /// Any non-negative integer value.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    /// Any non-negative integer value that fits a u32.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self.require(key)?;
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.wrong_type(key, "an integer in 0..=4294967295", v))
    }

    /// Any integer value that fits an i64.
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        let v = self.require(key)?;
        v.as_i64()
            .ok_or_else(|| self.wrong_type(key, "an integer", v))
    }

    /// A float value (f64 rounded to f32), or an integer converted.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.require(key)?;
        match *v {
            GgufValue::F32(f) => Ok(f),
            _ => v
                .as_f64()
                .map(|f| f as f32)
                .ok_or_else(|| self.wrong_type(key, "a number", v)),
        }
    }

    /// A float value (f32 widened exactly), or an integer converted.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        v.as_f64()
            .ok_or_else(|| self.wrong_type(key, "a number", v))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| self.wrong_type(key, "a bool", v))
    }

    /// An array of strings (an empty array is an empty list).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.require(key)?;
        let arr = v
            .as_array()
            .ok_or_else(|| self.wrong_type(key, "an array of strings", v))?;
        arr.iter()
            .map(|e| e.as_str())
            .collect::<Option<Vec<&str>>>()
            .ok_or_else(|| self.wrong_type(key, "an array of strings", v))
    }

    /// An array of integers that fit an i64 (e.g. `tokenizer.ggml.token_type`).
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>> {
        let v = self.require(key)?;
        let arr = v
            .as_array()
            .ok_or_else(|| self.wrong_type(key, "an array of integers", v))?;
        arr.iter()
            .map(|e| e.as_i64())
            .collect::<Option<Vec<i64>>>()
            .ok_or_else(|| self.wrong_type(key, "an array of integers", v))
    }

    /// An array of numbers, as f32 (e.g. `tokenizer.ggml.scores`).
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        let v = self.require(key)?;
        let arr = v
            .as_array()
            .ok_or_else(|| self.wrong_type(key, "an array of numbers", v))?;
        arr.iter()
            .map(|e| match *e {
                GgufValue::F32(f) => Some(f),
                _ => e.as_f64().map(|f| f as f32),
            })
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| self.wrong_type(key, "an array of numbers", v))
    }

    /// The tensor directory, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw data of a tensor (whole blocks, as stored). For an info that does not describe
    /// data inside this file (it came from another file) the slice is empty.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        let range = || -> Option<std::ops::Range<usize>> {
            let start = usize::try_from(self.data_offset.checked_add(info.offset)?).ok()?;
            let len = usize::try_from(info.n_bytes()).ok()?;
            Some(start..start.checked_add(len)?)
        };
        range()
            .and_then(|r| self.bytes.as_slice().get(r))
            .unwrap_or(&[])
    }

    /// Lets the kernel drop the resident pages of a tensor's data (a hint; errors are
    /// ignored): a loader that has copied the tensor out keeps the peak resident memory at one
    /// copy of the weights, not the file plus its copy. Reading the tensor again pages it back
    /// in from the file.
    pub fn release(&self, info: &GgufTensorInfo) {
        #[cfg(unix)]
        if let Bytes::Mapped(map) = &self.bytes {
            let (Ok(start), Ok(len)) = (
                usize::try_from(self.data_offset + info.offset),
                usize::try_from(info.n_bytes()),
            ) else {
                return;
            };
            if start.checked_add(len).is_some_and(|end| end <= map.len()) {
                // SAFETY: the map is a read-only private mapping of a file this process never
                // writes, so MADV_DONTNEED discards nothing but clean pages: a later read of the
                // range faults the same bytes back in from the file, and no slice handed out
                // sees different data.
                let _ = unsafe {
                    map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
                };
            }
        }
    }

    fn info_or_err(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor_info(name)
            .ok_or_else(|| Error::tensor(&self.path, name, "not found in file"))
    }

    /// Dequantise tensor `name` into a new buffer; returns the values and the row-major shape.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self.info_or_err(name)?;
        self.check_can_dequantize(info)?;
        let n = info.n_elements() as usize; // fits: checked against the file size at open
        let mut out = Vec::new();
        out.try_reserve_exact(n).map_err(|_| {
            Error::tensor(&self.path, name, format!("cannot allocate {n} f32 values"))
        })?;
        out.resize(n, 0.0f32);
        self.dequantize_info(info, &mut out)?;
        Ok((out, info.shape()))
    }

    /// Dequantise tensor `name` into `out`, which must hold exactly its number of values.
    pub fn tensor_f32_into(&self, name: &str, out: &mut [f32]) -> Result<()> {
        let info = self.info_or_err(name)?;
        self.check_can_dequantize(info)?;
        if out.len() as u64 != info.n_elements() {
            return Err(Error::tensor(
                &self.path,
                name,
                format!(
                    "has {} values, the output buffer {}",
                    info.n_elements(),
                    out.len()
                ),
            ));
        }
        self.dequantize_info(info, out)
    }

    fn check_can_dequantize(&self, info: &GgufTensorInfo) -> Result<()> {
        if info.dtype.can_dequantize() {
            Ok(())
        } else {
            Err(Error::unsupported(
                &self.path,
                format!(
                    "tensor type {} of tensor '{}'",
                    info.dtype.name(),
                    info.name
                ),
            ))
        }
    }

    fn dequantize_info(&self, info: &GgufTensorInfo, out: &mut [f32]) -> Result<()> {
        dequantize(info.dtype, self.tensor_bytes(info), out).map_err(|e| match e {
            DequantError::Unsupported(t) => Error::unsupported(
                &self.path,
                format!("tensor type {} of tensor '{}'", t.name(), info.name),
            ),
            e => Error::tensor(&self.path, &info.name, e.to_string()),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

struct Parsed {
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

/// A bounds-checked little-endian cursor over the file. Its errors carry the file offset; the
/// parser adds what it was reading.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// A read that ran past the end: at `at`, `need` bytes wanted.
struct Short {
    at: usize,
    need: u64,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], Short> {
        let short = Short {
            at: self.pos,
            need: n,
        };
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n));
        let s = end
            .and_then(|end| self.buf.get(self.pos..end))
            .ok_or(short)?;
        self.pos += s.len();
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Short> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, Short> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, Short> {
        self.array().map(u64::from_le_bytes)
    }
}

/// Parser state: the cursor plus the path for messages.
struct Parser<'a> {
    path: &'a Path,
    cur: Cursor<'a>,
}

impl<'a> Parser<'a> {
    fn fail(&self, msg: impl Into<String>) -> Error {
        Error::format(self.path, msg)
    }

    /// Turn a short read into "truncated at byte N while reading WHAT".
    fn short(&self, s: Short, what: impl fmt::Display) -> Error {
        self.fail(format!(
            "truncated at byte {} while reading {what} (needed {} bytes, the file has {} bytes)",
            s.at,
            s.need,
            self.cur.buf.len()
        ))
    }

    fn u32(&mut self, what: impl fmt::Display) -> Result<u32> {
        self.cur.u32().map_err(|s| self.short(s, what))
    }

    fn u64(&mut self, what: impl fmt::Display) -> Result<u64> {
        self.cur.u64().map_err(|s| self.short(s, what))
    }

    /// Check that `count` items of at least `min_size` bytes each can fit in what is left.
    /// `at` is where the count was read, for the message.
    fn check_count(
        &self,
        count: u64,
        min_size: u64,
        at: usize,
        what: impl fmt::Display,
    ) -> Result<()> {
        let left = self.cur.remaining() as u64;
        match count.checked_mul(min_size) {
            Some(n) if n <= left => Ok(()),
            _ => Err(self.fail(format!(
                "{what} is {count} (at byte {at}), impossible: the {left} bytes left in the file \
                 could hold at most {} entries of {min_size} or more bytes",
                left / min_size.max(1)
            ))),
        }
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let start = self.cur.pos;
        let len = self.u64(format_args!("the length of {}", what()))?;
        let left = self.cur.remaining() as u64;
        if len > left {
            return Err(self.fail(format!(
                "string length {len} at byte {start} (in {}) exceeds the {left} bytes left in the file \
                 (truncated or corrupt file)",
                what()
            )));
        }
        let bytes = self.cur.take(len).map_err(|s| self.short(s, what()))?;
        String::from_utf8(bytes.to_vec()).map_err(|e| {
            self.fail(format!(
                "{} at byte {start} is not valid UTF-8 (invalid byte at string offset {})",
                what(),
                e.utf8_error().valid_up_to()
            ))
        })
    }

    fn value(&mut self, t: u32, key: &str, depth: usize) -> Result<GgufValue> {
        let what = || format!("the value of metadata key '{key}'");
        let at = self.cur.pos;
        macro_rules! num {
            ($ty:ty, $variant:ident) => {{
                let a = self.cur.array().map_err(|s| self.short(s, what()))?;
                GgufValue::$variant(<$ty>::from_le_bytes(a))
            }};
        }
        Ok(match t {
            vtype::U8 => num!(u8, U8),
            vtype::I8 => num!(i8, I8),
            vtype::U16 => num!(u16, U16),
            vtype::I16 => num!(i16, I16),
            vtype::U32 => num!(u32, U32),
            vtype::I32 => num!(i32, I32),
            vtype::U64 => num!(u64, U64),
            vtype::I64 => num!(i64, I64),
            vtype::F32 => num!(f32, F32),
            vtype::F64 => num!(f64, F64),
            vtype::BOOL => {
                let [b] = self.cur.array().map_err(|s| self.short(s, what()))?;
                match b {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    _ => {
                        return Err(self.fail(format!(
                            "invalid bool byte {b} at byte {at} in metadata key '{key}' (must be 0 or 1)"
                        )))
                    }
                }
            }
            vtype::STRING => GgufValue::String(self.string(&what)?),
            vtype::ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.fail(format!(
                        "metadata key '{key}' has arrays nested deeper than {MAX_ARRAY_DEPTH} levels (at byte {at})"
                    )));
                }
                let et = self.u32(format_args!(
                    "the array element type of metadata key '{key}'"
                ))?;
                let min = vtype::min_size(et).ok_or_else(|| {
                    self.fail(format!(
                        "metadata key '{key}' is an array of unknown value type {et} (at byte {at})"
                    ))
                })?;
                let count_at = self.cur.pos;
                let count = self.u64(format_args!("the array length of metadata key '{key}'"))?;
                self.check_count(
                    count,
                    min,
                    count_at,
                    format_args!("the array length of metadata key '{key}'"),
                )?;
                // count * min <= bytes left, so this allocation is bounded by the file size.
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(et, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            _ => {
                return Err(self.fail(format!(
                    "metadata key '{key}' has unknown value type {t} (at byte {})",
                    at.saturating_sub(4)
                )))
            }
        })
    }
}

fn parse(path: &Path, buf: &[u8]) -> Result<Parsed> {
    let mut p = Parser {
        path,
        cur: Cursor { buf, pos: 0 },
    };

    // Header.
    let magic: [u8; 4] = p.cur.array().map_err(|s| p.short(s, "the GGUF magic"))?;
    if magic != GGUF_MAGIC {
        return Err(p.fail(format!(
            "not a GGUF file: the first bytes are {:02x} {:02x} {:02x} {:02x} ({:?}), expected \"GGUF\"",
            magic[0],
            magic[1],
            magic[2],
            magic[3],
            String::from_utf8_lossy(&magic)
        )));
    }
    let version = p.u32("the GGUF version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(Error::unsupported(
                path,
                "GGUF version 1 (a 2023 pre-release format); lorakit reads versions 2 and 3, re-convert the model",
            ))
        }
        v if matches!(v.swap_bytes(), 2 | 3) => {
            return Err(Error::unsupported(
                path,
                format!("big-endian GGUF (version field reads {v:#010x}); lorakit reads little-endian files"),
            ))
        }
        v => {
            return Err(Error::unsupported(
                path,
                format!("GGUF version {v}; lorakit reads versions 2 and 3"),
            ))
        }
    }
    let tensor_count = p.u64("the tensor count")?;
    let kv_count = p.u64("the metadata key count")?;
    // Every key takes at least 8 (key length) + 4 (type) + 1 bytes, every tensor info at least
    // 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset).
    p.check_count(kv_count, 13, 16, "the metadata key count")?;
    p.check_count(tensor_count, 24, 8, "the tensor count")?;

    // Metadata.
    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = p.string(&|| format!("metadata key #{i}"))?;
        let t = p.u32(format_args!("the value type of metadata key '{key}'"))?;
        let value = p.value(t, &key, 0)?;
        if metadata.contains_key(&key) {
            return Err(p.fail(format!("duplicate metadata key '{key}' (key #{i})")));
        }
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 30 => a,
            _ => {
                return Err(Error::config(
                    path,
                    "general.alignment",
                    format!("must be a power of two up to 2^30, found {}", v.describe()),
                ))
            }
        },
    };

    // Tensor directory.
    p.check_count(tensor_count, 24, 8, "the tensor count")?;
    let mut tensors: Vec<GgufTensorInfo> = Vec::with_capacity(tensor_count as usize);
    let mut by_name: HashMap<String, usize> = HashMap::with_capacity(tensor_count as usize);
    for i in 0..tensor_count {
        let name = p.string(&|| format!("the name of tensor #{i}"))?;
        let tensor_err = |msg: String| Error::tensor(path, &name, msg);
        let n_dims = p.u32(format_args!("the dimension count of tensor '{name}'"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(tensor_err(format!(
                "has {n_dims} dimensions, GGUF allows at most {MAX_DIMS}"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(p.u64(format_args!("dimension {d} of tensor '{name}'"))?);
        }
        let type_id = p.u32(format_args!("the type of tensor '{name}'"))?;
        let offset = p.u64(format_args!("the data offset of tensor '{name}'"))?;
        let Some(dtype) = GgmlType::from_u32(type_id) else {
            return Err(tensor_err(format!("unknown tensor type id {type_id}")));
        };
        if let Some(&j) = by_name.get(&name) {
            return Err(tensor_err(format!(
                "duplicate tensor name (tensors #{j} and #{i})"
            )));
        }
        if dims.iter().any(|&d| d > i64::MAX as u64) {
            return Err(tensor_err(format!(
                "dimension out of range in dims {dims:?}"
            )));
        }
        let Some(n_elements) = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)) else {
            return Err(tensor_err(format!(
                "dims {dims:?} overflow: their product does not fit in 64 bits"
            )));
        };
        let (bs, ts) = (dtype.block_size() as u64, dtype.type_size() as u64);
        let row = dims.first().copied().unwrap_or(1);
        if row % bs != 0 {
            return Err(tensor_err(format!(
                "row length {row} (dims {dims:?}) is not a multiple of the {} block size {bs}",
                dtype.name()
            )));
        }
        if (n_elements / bs).checked_mul(ts).is_none() {
            return Err(tensor_err(format!(
                "dims {dims:?} of type {} overflow: the byte size does not fit in 64 bits",
                dtype.name()
            )));
        }
        if offset % alignment != 0 {
            return Err(tensor_err(format!(
                "data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        by_name.insert(name.clone(), tensors.len());
        tensors.push(GgufTensorInfo {
            name,
            dims,
            dtype,
            offset,
        });
    }

    // Data section.
    let end_of_directory = p.cur.pos as u64;
    let data_offset = end_of_directory.div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    for t in &tensors {
        let n_bytes = t.n_bytes();
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(n_bytes));
        match end {
            Some(end) if end <= file_len && usize::try_from(n_bytes).is_ok() => {}
            _ => {
                return Err(Error::tensor(
                    path,
                    &t.name,
                    format!(
                        "data ({n_bytes} bytes of {} at offset {} in the data section, which starts at byte {data_offset}) \
                         extends past the end of the file ({file_len} bytes)",
                        t.dtype.name(),
                        t.offset
                    ),
                ))
            }
        }
        if usize::try_from(t.n_elements()).is_err() {
            return Err(Error::tensor(
                path,
                &t.name,
                "too many values for this platform",
            ));
        }
    }
    // The byte length implied by each tensor's dims must not run into another tensor's data.
    let mut spans: Vec<(u64, u64, usize)> = tensors
        .iter()
        .enumerate()
        .filter(|(_, t)| t.n_bytes() > 0)
        .map(|(i, t)| (t.offset, t.offset + t.n_bytes(), i))
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        let ((a0, a1, ai), (b0, b1, bi)) = (w[0], w[1]);
        if a1 > b0 {
            let (a, b) = (&tensors[ai], &tensors[bi]);
            return Err(Error::tensor(
                path,
                &a.name,
                format!(
                    "data (data-section bytes {a0}..{a1}: {} values of {}) overlaps tensor '{}' (bytes {b0}..{b1})",
                    a.n_elements(),
                    a.dtype.name(),
                    b.name
                ),
            ));
        }
    }

    Ok(Parsed {
        version,
        metadata,
        tensors,
        by_name,
        alignment,
        data_offset,
    })
}
