//! Atomic file replacement (whole output directories are written through `io::output`).
//!
//! A reader of a path written through this module sees either the old content or the
//! complete new content, never a partial write: the bytes go to a uniquely named temporary
//! file in the target's own directory (so the final `rename` stays on one file system),
//! are flushed to disk with `fsync`, and the temporary file is then renamed over the
//! target, after which the directory itself is synced so that the rename survives a
//! crash. On any error the temporary file is removed and the error names the target.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// Per-process counter that makes temporary names unique across threads.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically (see the module documentation).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// Like [`write_atomic`], for streaming writers: `f` receives the open temporary file and
/// writes the whole content to it (wrap it in a `BufWriter` for many small writes, and
/// flush that before returning). If `f` fails, the temporary file is removed, the target
/// is left untouched and the error is returned, naming `path`.
pub fn write_atomic_with(path: &Path, f: impl FnOnce(&mut File) -> io::Result<()>) -> Result<()> {
    let (tmp, mut file) = create_temp_file(path, "")?;
    let written = f(&mut file).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(
            path,
            context(e, "writing the temporary file", &tmp),
        ));
    }
    commit(&tmp, path)
}

/// For writers that insist on opening a path themselves (an image encoder, ...):
/// `f` receives the path of a fresh temporary file in `path`'s directory whose name ends
/// with the same extension as `path` (so encoders that look at the extension pick the
/// right format), writes the complete content there, and the file is then synced and
/// renamed over `path`. On any error the temporary file is removed.
pub fn write_atomic_via_path(path: &Path, f: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let suffix = match path.extension() {
        Some(ext) => {
            let mut s = OsString::from(".");
            s.push(ext);
            s
        }
        None => OsString::new(),
    };
    let (tmp, file) = create_temp_file(path, &suffix.to_string_lossy())?;
    drop(file);
    if let Err(e) = f(&tmp) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let synced = File::options()
        .read(true)
        .write(true)
        .open(&tmp)
        .and_then(|file| file.sync_all());
    if let Err(e) = synced {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(
            path,
            context(e, "syncing the temporary file", &tmp),
        ));
    }
    commit(&tmp, path)
}

/// Renames the synced temporary file over `path` and syncs the directory.
fn commit(tmp: &Path, path: &Path) -> Result<()> {
    if let Err(e) = fs::rename(tmp, path) {
        let _ = fs::remove_file(tmp);
        return Err(Error::io(
            path,
            context(e, "renaming the temporary file", tmp),
        ));
    }
    let parent = parent_dir(path);
    sync_dir(&parent).map_err(|e| Error::io(path, context(e, "syncing the directory", &parent)))
}

/// Creates a new, empty temporary file next to `path` (never reusing an existing name).
fn create_temp_file(path: &Path, suffix: &str) -> Result<(PathBuf, File)> {
    if path.file_name().is_none() {
        return Err(Error::io(
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"),
        ));
    }
    let mut last_err = None;
    for _ in 0..16 {
        let tmp = unique_sibling(path, "tmp", suffix);
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => {
                return Err(Error::io(
                    path,
                    context(e, "creating the temporary file", &tmp),
                ))
            }
        }
    }
    let e = last_err.unwrap_or_else(|| io::Error::other("no unique temporary name"));
    Err(Error::io(path, e))
}

/// `<dir>/.<name>.lorakit-<tag>.<pid>.<nanos>.<counter><suffix>`: hidden, unique, same
/// directory. Every temporary or set-aside copy lorakit makes has such a name, so that the
/// leftovers of a killed run can be recognised ([`leftover_pid`]) and removed by the next.
pub(crate) fn unique_sibling(path: &Path, tag: &str, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let file = format!(
        ".{name}.lorakit-{tag}.{}.{nanos}.{n}{suffix}",
        std::process::id()
    );
    parent_dir(path).join(file)
}

/// The process id in a name made by [`unique_sibling`] (`None` for any other name).
pub(crate) fn leftover_pid(name: &str) -> Option<u32> {
    if !name.starts_with('.') {
        return None;
    }
    let at = ["lorakit-tmp.", "lorakit-old."]
        .iter()
        .filter_map(|t| name.rfind(&format!(".{t}")).map(|i| i + 1 + t.len()))
        .max()?;
    let mut fields = name[at..].split('.');
    let pid = fields.next()?.parse().ok()?;
    for _ in 0..2 {
        let f = fields.next()?;
        if f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    Some(pid)
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Flushes a directory's entries (the rename) to disk. File systems that cannot sync a
/// directory (they answer "invalid argument" or "unsupported") are not an error.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        match File::open(dir).and_then(|d| d.sync_all()) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Adds what we were doing, and with which path, to an I/O error's message.
fn context(e: io::Error, doing: &str, with: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{doing} {}: {e}", with.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty directory under the system temp dir for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "lorakit-atomic-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_and_overwrites_without_leftovers() {
        let dir = scratch("write");
        let path = dir.join("a.json");
        write_atomic(&path, b"first").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first");
        write_atomic(&path, b"second, longer content").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second, longer content");
        write_atomic(&path, b"").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"");
        assert_eq!(entries(&dir), vec!["a.json"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn streaming_writer() {
        let dir = scratch("stream");
        let path = dir.join("big.bin");
        write_atomic_with(&path, |f| {
            let mut w = io::BufWriter::new(f);
            for i in 0..10_000u32 {
                w.write_all(&i.to_le_bytes())?;
            }
            w.flush()
        })
        .unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 40_000);
        assert_eq!(&bytes[4..8], &1u32.to_le_bytes());
        assert_eq!(entries(&dir), vec!["big.bin"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failing_writer_leaves_target_and_no_temp() {
        let dir = scratch("fail");
        let path = dir.join("keep.txt");
        write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, |f| {
            f.write_all(b"partial")?;
            Err(io::Error::other("writer gave up"))
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("keep.txt"), "{msg}");
        assert!(msg.contains("writer gave up"), "{msg}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(&dir), vec!["keep.txt"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_directory_is_an_error_naming_the_path() {
        let dir = scratch("missing");
        let path = dir.join("no-such-dir").join("x.txt");
        let msg = write_atomic(&path, b"x").unwrap_err().to_string();
        assert!(msg.contains("x.txt"), "{msg}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn via_path_keeps_extension_and_cleans_up() {
        let dir = scratch("via");
        let path = dir.join("plot.png");
        write_atomic_via_path(&path, |tmp| {
            assert_eq!(tmp.extension().unwrap(), "png");
            assert_eq!(tmp.parent().unwrap(), dir.as_path());
            fs::write(tmp, b"png bytes").map_err(|e| Error::io(tmp, e))
        })
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"png bytes");
        let err = write_atomic_via_path(&path, |_| Err(Error::Invalid("no".into())));
        assert!(err.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"png bytes");
        assert_eq!(entries(&dir), vec!["plot.png"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn leftover_names() {
        let p = unique_sibling(Path::new("/x/out"), "tmp", ".png");
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(".out.lorakit-tmp."), "{name}");
        assert_eq!(leftover_pid(name), Some(std::process::id()));
        let old = unique_sibling(Path::new("out"), "old", "");
        assert_eq!(
            leftover_pid(old.to_str().unwrap()),
            Some(std::process::id())
        );
        for other in [
            "out",
            ".out",
            ".out.lorakit-tmp.",
            ".out.lorakit-tmp.12",
            ".out.lorakit-tmp.12.x.3",
            "a.lorakit-tmp.1.2.3",
        ] {
            assert_eq!(leftover_pid(other), None, "{other}");
        }
        assert_eq!(leftover_pid(".a.b.lorakit-old.42.7.0.png"), Some(42));
    }
}
