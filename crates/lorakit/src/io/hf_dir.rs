//! The weights of an HF model directory: `model.safetensors`, or the shards listed in
//! `model.safetensors.index.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::safetensors_file::SafetensorsFile;

pub struct SafetensorsSet {
    files: Vec<SafetensorsFile>,
    paths: Vec<PathBuf>,
    /// tensor name → index into `files`
    index: HashMap<String, usize>,
}

impl SafetensorsSet {
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if single.is_file() {
            vec!["model.safetensors".into()]
        } else if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::format(&index_path, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    Error::config(&index_path, "weight_map", "missing or not an object")
                })?;
            let mut names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::config(&index_path, format!("weight_map.{tensor}"), "not a string")
                })?;
                // Shards must sit beside the index: never follow a path out of the directory.
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(Error::config(
                        &index_path,
                        format!("weight_map.{tensor}"),
                        format!("shard name \"{file}\" is not a plain file name in this directory"),
                    ));
                }
                if !names.iter().any(|n| n == file) {
                    names.push(file.to_owned());
                }
            }
            if names.is_empty() {
                return Err(Error::config(&index_path, "weight_map", "lists no tensors"));
            }
            names
        } else {
            return Err(Error::format(
                dir,
                "no model.safetensors or model.safetensors.index.json in this directory",
            ));
        };
        let mut files = Vec::new();
        let mut paths = Vec::new();
        let mut index = HashMap::new();
        for name in shard_names {
            let path = dir.join(&name);
            let file = SafetensorsFile::open(&path)?;
            for t in file.names() {
                if index.insert(t.clone(), files.len()).is_some() {
                    return Err(Error::tensor(&path, t, "appears in more than one shard"));
                }
            }
            files.push(file);
            paths.push(path);
        }
        Ok(SafetensorsSet {
            files,
            paths,
            index,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.paths
    }

    /// The file that holds `name` (the first file if none does, for error messages).
    pub fn file_of(&self, name: &str) -> &Path {
        let i = self.index.get(name).copied().unwrap_or(0);
        &self.paths[i]
    }

    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        match self.index.get(name) {
            Some(&i) => self.files[i].tensor_f32(name),
            None => Err(Error::tensor(
                self.paths
                    .first()
                    .map(PathBuf::as_path)
                    .unwrap_or(Path::new("")),
                name,
                "not found in the model's safetensors files",
            )),
        }
    }

    /// The dtype of every tensor, for `inspect`.
    pub fn dtypes(&self) -> Vec<String> {
        self.files
            .iter()
            .flat_map(|f| {
                f.names()
                    .into_iter()
                    .filter_map(|n| f.info(&n).map(|(d, _)| d))
            })
            .collect()
    }
}
