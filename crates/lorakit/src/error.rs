//! The library's one error type. Every variant names what failed: the file, the tensor,
//! the key or the field, so that a user can act on the message alone.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused to read or write a path. (The OS error is part of the
    /// message and deliberately not a `source`, so that error chains print it once.)
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },

    /// A file's bytes do not follow its format (bad magic, truncated, bad offsets, ...).
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },

    /// One tensor inside a file is missing, has the wrong shape or cannot be decoded.
    #[error("{}: tensor '{tensor}': {msg}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },

    /// A configuration key is missing or has a value we cannot use.
    #[error("{}: '{key}': {msg}", path.display())]
    Config {
        path: PathBuf,
        key: String,
        msg: String,
    },

    /// A well-formed input that asks for something lorakit does not support (yet).
    #[error("{}: unsupported {what}", path.display())]
    Unsupported { path: PathBuf, what: String },

    /// Building or running a tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// Rendering a chat template failed.
    #[error("chat template: {0}")]
    Template(String),

    /// An output path lorakit refuses to write (an input, a file where a directory is
    /// expected, a directory holding files lorakit did not write, ...).
    #[error("{}: {msg}", path.display())]
    Output { path: PathBuf, msg: String },

    /// An argument to a library call is out of range (empty prompt, too long, ...).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.into(),
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
    pub fn config(
        path: impl Into<PathBuf>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Config {
            path: path.into(),
            key: key.into(),
            msg: msg.into(),
        }
    }
    pub fn unsupported(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.into(),
            what: what.into(),
        }
    }
}
