//! Atomic file and directory replacement.
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

/// Moves the fully written directory `tmp_dir` to `final_dir`.
///
/// Both should live in the same parent directory (a rename cannot cross file systems).
/// If `final_dir` already exists it is first renamed aside to a unique hidden name, then
/// `tmp_dir` is renamed into place, then the old one is deleted. A reader therefore sees
/// the old directory, briefly no directory, or the complete new one, never a mix or a
/// half-written one. If moving the new directory into place fails, the old one is moved
/// back. Failing to delete the old directory after a successful swap is not reported
/// as an error (the new content is in place); the leftover keeps a `.old.` name.
pub fn replace_dir_atomic(tmp_dir: &Path, final_dir: &Path) -> Result<()> {
    let meta = fs::metadata(tmp_dir).map_err(|e| Error::io(tmp_dir, e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            tmp_dir,
            io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
        ));
    }
    let parent = parent_dir(final_dir);
    let aside = match fs::symlink_metadata(final_dir) {
        Ok(_) => {
            let aside = unique_sibling(final_dir, ".old", "");
            fs::rename(final_dir, &aside).map_err(|e| {
                Error::io(
                    final_dir,
                    context(e, "moving the old version aside to", &aside),
                )
            })?;
            Some(aside)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(final_dir, e)),
    };
    if let Err(e) = fs::rename(tmp_dir, final_dir) {
        if let Some(aside) = &aside {
            let _ = fs::rename(aside, final_dir);
        }
        return Err(Error::io(
            final_dir,
            context(e, "renaming into place from", tmp_dir),
        ));
    }
    sync_dir(&parent)
        .map_err(|e| Error::io(&parent, context(e, "syncing the directory", &parent)))?;
    if let Some(aside) = aside {
        let removed = match fs::symlink_metadata(&aside) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&aside),
            Ok(_) => fs::remove_file(&aside),
            Err(e) => Err(e),
        };
        // The swap succeeded; a leftover old copy is untidy but not a failure.
        let _ = removed;
    }
    Ok(())
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
        let tmp = unique_sibling(path, ".tmp", suffix);
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

/// `<dir>/.<name><tag>.<pid>.<nanos>.<counter><suffix>`: hidden, unique, same directory.
fn unique_sibling(path: &Path, tag: &str, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let file = format!(".{name}{tag}.{}.{nanos}.{n}{suffix}", std::process::id());
    parent_dir(path).join(file)
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
fn sync_dir(dir: &Path) -> io::Result<()> {
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

/// Makes directory `dir` in one step: `fill` writes into a fresh temporary sibling, which then
/// takes `dir`'s place ([`replace_dir_atomic`]). Readers see the old directory or the complete
/// new one, never a half-written one; on failure the temporary directory is removed.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = fill(&tmp).and_then(|_| replace_dir_atomic(&tmp, dir));
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
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
    fn replace_dir_new_and_existing() {
        let dir = scratch("dir");
        let final_dir = dir.join("adapter");
        let tmp1 = dir.join("adapter.tmp1");
        fs::create_dir(&tmp1).unwrap();
        fs::write(tmp1.join("a.txt"), b"one").unwrap();
        replace_dir_atomic(&tmp1, &final_dir).unwrap();
        assert_eq!(fs::read(final_dir.join("a.txt")).unwrap(), b"one");

        let tmp2 = dir.join("adapter.tmp2");
        fs::create_dir_all(tmp2.join("sub")).unwrap();
        fs::write(tmp2.join("sub").join("b.txt"), b"two").unwrap();
        replace_dir_atomic(&tmp2, &final_dir).unwrap();
        assert!(!final_dir.join("a.txt").exists());
        assert_eq!(
            fs::read(final_dir.join("sub").join("b.txt")).unwrap(),
            b"two"
        );
        assert_eq!(entries(&dir), vec!["adapter"]);

        let missing = dir.join("nope");
        let msg = replace_dir_atomic(&missing, &final_dir)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("nope"), "{msg}");
        assert_eq!(
            fs::read(final_dir.join("sub").join("b.txt")).unwrap(),
            b"two"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
