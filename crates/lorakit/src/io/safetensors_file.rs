//! One memory-mapped `.safetensors` file, its header validated by the `safetensors` crate
//! (offsets inside the file, dtype × shape = byte length) before any tensor is read.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

use crate::error::{Error, Result};

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
        let data = match info.dtype {
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
        Ok((data, info.shape.clone()))
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
