//! One memory-mapped `.safetensors` file, its header validated by the `safetensors` crate
//! (offsets inside the file, dtype × shape = byte length) before any tensor is read.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, TensorView};
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;

pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a file changed underneath us by another process could
        // change the bytes we read, but never memory safety of this process's own data.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        check_header(path, &mmap)?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
        Ok(SafetensorsFile {
            path: path.to_owned(),
            mmap,
            header_len,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.metadata.tensors().into_keys().collect();
        v.sort();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }

    /// (dtype name, shape) of a tensor.
    pub fn info(&self, name: &str) -> Option<(String, Vec<usize>)> {
        self.metadata
            .info(name)
            .map(|i| (format!("{:?}", i.dtype), i.shape.clone()))
    }

    /// The tensor converted to f32 (from F32, F16 or BF16), with its shape.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| Error::tensor(&self.path, name, "not found in file"))?;
        let start = 8 + self.header_len + info.data_offsets.0;
        let end = 8 + self.header_len + info.data_offsets.1;
        let bytes = &self.mmap[start..end];
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::tensor(
                    &self.path,
                    name,
                    format!("dtype {other:?} is not supported (F32, F16, BF16)"),
                ))
            }
        };
        self.release(start, end - start);
        Ok((data, info.shape.clone()))
    }

    /// Drops the mapped pages of bytes `start..start + len` from this process's memory once they
    /// are copied out: otherwise every tensor read stays resident in the map until the file is
    /// closed, and loading a model would hold its file's size on top of the weights.
    fn release(&self, start: usize, len: usize) {
        #[cfg(unix)]
        if start
            .checked_add(len)
            .is_some_and(|end| end <= self.mmap.len())
        {
            // SAFETY: the map is a read-only private mapping of a file this process never
            // writes, so MADV_DONTNEED discards nothing but clean pages: a later read of the
            // range faults the same bytes back in from the file.
            let _ = unsafe {
                self.mmap
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
            };
        }
    }

    /// The tensor's raw little-endian i64 values (token ids, labels).
    pub fn tensor_i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| Error::tensor(&self.path, name, "not found in file"))?;
        if info.dtype != Dtype::I64 {
            return Err(Error::tensor(
                &self.path,
                name,
                format!("dtype {:?}, expected I64", info.dtype),
            ));
        }
        let start = 8 + self.header_len + info.data_offsets.0;
        let end = 8 + self.header_len + info.data_offsets.1;
        let data = self.mmap[start..end]
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect();
        Ok((data, info.shape.clone()))
    }
}

/// The safetensors crate's limit on the JSON header.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Bytes per element of a safetensors dtype name; None for names we do not know.
fn dtype_size(name: &str) -> Option<u64> {
    Some(match name {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// Validates the header before the `safetensors` crate does, so that a damaged file is reported
/// with the tensor and the numbers that are wrong (the crate only says "invalid shape, data type,
/// or offset"). Every size is overflow-checked; nothing is allocated beyond the header itself,
/// whose size is bounded.
fn check_header(path: &Path, bytes: &[u8]) -> Result<()> {
    let bad = |msg: String| Error::format(path, msg);
    if bytes.len() < 8 {
        return Err(bad(format!(
            "{} bytes: too short for a safetensors file (an 8-byte header size comes first)",
            bytes.len()
        )));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "declared header size {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit"
        )));
    }
    let file_len = bytes.len() as u64;
    if 8 + n > file_len {
        return Err(bad(format!(
            "declared header size {n} bytes, but the file has only {file_len} bytes (truncated?)"
        )));
    }
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n as usize])
            .map_err(|e| bad(format!("the header is not a JSON object: {e}")))?;
    let data_len = file_len - 8 - n;
    for (name, info) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let t = |msg: String| Error::tensor(path, name, msg);
        let dtype = info["dtype"]
            .as_str()
            .ok_or_else(|| t("'dtype' missing or not a string".into()))?;
        let size = dtype_size(dtype).ok_or_else(|| t(format!("unknown dtype {dtype:?}")))?;
        let shape: Vec<u64> = info["shape"]
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect())
            .ok_or_else(|| t("'shape' missing or not a list of sizes".into()))?;
        let offsets: Vec<u64> = info["data_offsets"]
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect())
            .filter(|v: &Vec<u64>| v.len() == 2)
            .ok_or_else(|| t("'data_offsets' missing or not [start, end]".into()))?;
        let (start, end) = (offsets[0], offsets[1]);
        let need = shape
            .iter()
            .try_fold(size, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| t(format!("shape {shape:?} overflows")))?;
        if start > end || end > data_len {
            return Err(t(format!(
                "data_offsets [{start}, {end}] lie outside the {data_len}-byte data section \
                 (truncated or corrupted file)"
            )));
        }
        if end - start != need {
            return Err(t(format!(
                "shape {shape:?} of {dtype} needs {need} bytes, but data_offsets [{start}, {end}] \
                 span {}",
                end - start
            )));
        }
    }
    Ok(())
}

/// Writes f32 tensors (HF name, shape, row-major data) as a safetensors file with PyTorch's
/// `format: pt` metadata, atomically.
pub fn write_f32_safetensors<D: AsRef<[f32]>>(
    path: &Path,
    tensors: Vec<(String, Vec<usize>, D)>,
) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(k, s, d)| {
            let d = d.as_ref();
            (k, s, d.iter().flat_map(|v| v.to_le_bytes()).collect())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::tensor(path, k, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    let data =
        safetensors::serialize(views, metadata).map_err(|e| Error::format(path, e.to_string()))?;
    drop(bytes);
    write_atomic(path, &data)
}
