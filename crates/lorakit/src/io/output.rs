//! Output directories and files: lorakit replaces only what it wrote itself.
//!
//! Every command that writes a directory first checks it with [`prepare_output_dir`] (a file
//! output with [`prepare_output_file`]), and can only write through the [`OutputDir`] (or
//! [`OutputFile`]) that the check returns. The rule:
//!
//! - An output may never be, contain or lie inside one of the command's inputs (compared as
//!   canonical paths, symbolic links resolved), and a directory output may not be a file (nor a
//!   file output a directory), whatever the flags.
//! - An existing directory is used if it is empty or was written by the same command: lorakit
//!   leaves a marker file, [`MARKER`] = `{"format": 1, "command": "merge", "files": [...]}`,
//!   in every output directory, listing the top-level names it wrote. (Outputs from before the
//!   marker are recognised by the caller's `legacy` test, from their exact set of files.) Any
//!   other directory is refused, naming the path and what is in it, unless `overwrite` is set;
//!   even then only the names lorakit writes are replaced and every other entry is kept.
//!
//! Writing a whole output ([`OutputDir::write_whole`]) fills a hidden temporary sibling and
//! then, when the directory holds nothing but lorakit's own files, exchanges the two in one
//! `renameat2(RENAME_EXCHANGE)` (Linux; elsewhere two renames, with recovery of the old copy by
//! the next run if killed in between): a reader, or a run killed at any moment, sees the old
//! output or the new one whole. When the directory also holds files lorakit did not write, it is
//! never swapped: each file is renamed into place on its own (each one whole; after a kill the
//! set may mix old and new files), names of the earlier output that the new one lacks are
//! removed, and the foreign entries are never renamed, moved or deleted.
//!
//! Temporary and set-aside copies are hidden siblings named `.<name>.lorakit-tmp.<pid>.…` and
//! `.<name>.lorakit-old.<pid>.…`; a run killed mid-write can leave one behind, and the next run
//! writing the same output removes those of processes that no longer exist.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::atomic::{leftover_pid, sync_dir, unique_sibling, write_atomic};

/// The marker file inside every output directory lorakit writes.
pub const MARKER: &str = ".lorakit-output.json";
const MARKER_FORMAT: u32 = 1;

/// The content of [`MARKER`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub format: u32,
    /// The command that wrote the directory (`merge`, `train`, `sweep`, ...).
    pub command: String,
    /// The top-level names it wrote there (files or directories).
    pub files: Vec<String>,
}

/// A test that recognises an output written before the marker existed: given the directory and
/// its entries, the entries that are the command's own (`None`: not such an output).
pub type Legacy<'a> = &'a dyn Fn(&Path, &[String]) -> Option<Vec<String>>;

/// What a checked output directory held when it was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Missing (`exists: false`, created when written) or an empty directory.
    Fresh { exists: bool },
    /// Written before by the same command: `files` are the names it wrote (from the marker, or
    /// recognised as a `legacy` output), `foreign` the other entries, which are kept.
    Own {
        files: Vec<String>,
        foreign: Vec<String>,
        legacy: bool,
    },
    /// A directory lorakit did not write (or another command did), used because of
    /// `overwrite`: entries with the names this command writes are replaced, the others kept.
    Overwrite { entries: Vec<String> },
    /// A directory inside a checked output that is lorakit's alone (a checkpoint, `train
    /// --full`'s `model/`): replaced whole, no marker of its own.
    Nested,
}

/// An output directory that passed [`prepare_output_dir`]; the only way to write one.
#[derive(Debug, Clone)]
pub struct OutputDir {
    /// Where to write (an existing path with its symbolic links resolved).
    path: PathBuf,
    /// The path as given, for messages.
    shown: PathBuf,
    command: String,
    overwrite: bool,
    state: State,
}

/// An output file that passed [`prepare_output_file`].
#[derive(Debug, Clone)]
pub struct OutputFile {
    path: PathBuf,
}

fn refuse(path: &Path, msg: impl Into<String>) -> Error {
    Error::Output {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// `a, b, c and 4 more`.
fn some_names(names: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut s = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// The absolute path `p` names, with symbolic links resolved as far as it exists: the deepest
/// existing ancestor is canonicalised and the rest appended (`.` dropped, `..` going up).
fn resolve(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io(p, e))?
            .join(p)
    };
    let mut base = abs.as_path();
    let mut rest: Vec<Component> = Vec::new();
    loop {
        match fs::canonicalize(base) {
            Ok(mut c) => {
                for comp in rest.iter().rev() {
                    match comp {
                        Component::ParentDir => {
                            c.pop();
                        }
                        Component::CurDir => {}
                        other => c.push(other.as_os_str()),
                    }
                }
                return Ok(c);
            }
            Err(_) => {
                let Some(parent) = base.parent() else {
                    return Ok(abs);
                };
                if let Some(last) = base.components().next_back() {
                    rest.push(last);
                }
                base = parent;
            }
        }
    }
}

/// The deepest existing ancestor of `p` must be a directory; returns an error naming it if not.
fn check_ancestors(shown: &Path, p: &Path) -> Result<()> {
    let mut a = p.parent();
    while let Some(dir) = a {
        match fs::metadata(dir) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(_) => {
                return Err(refuse(
                    shown,
                    format!("{} is a file, not a directory", dir.display()),
                ))
            }
            Err(_) => a = dir.parent(),
        }
    }
    Ok(())
}

/// Refuses an output that is, contains or lies inside one of `inputs` (`(flag, path)` pairs).
fn check_inputs(shown: &Path, out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    for (what, input) in inputs {
        let i = resolve(input)?;
        let why = if i == out {
            format!("is the {what} input")
        } else if i.starts_with(out) {
            format!("contains the {what} input {}", input.display())
        } else if out.starts_with(&i) {
            format!("lies inside the {what} input {}", input.display())
        } else {
            continue;
        };
        return Err(refuse(
            shown,
            format!("{why}; lorakit never writes over its inputs, with or without --overwrite: choose another output path"),
        ));
    }
    Ok(())
}

/// Whether a process with this id is running (leftovers of live processes are not touched).
fn pid_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    #[cfg(unix)]
    {
        let Ok(p) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let r = unsafe { libc::kill(p, 0) };
        r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        true
    }
}

/// A hidden temporary or set-aside copy written through this module (any process).
fn is_leftover(name: &str) -> bool {
    leftover_pid(name).is_some()
}

/// The entries of directory `dir`, sorted, without lorakit's hidden leftovers.
fn entries(dir: &Path) -> Result<Vec<String>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !is_leftover(&name) {
            v.push(name);
        }
    }
    v.sort();
    Ok(v)
}

/// A name lorakit can have written at the top of an output directory: one plain component.
fn plain_name(n: &str) -> bool {
    !n.is_empty() && n != "." && n != ".." && !n.contains('/') && !n.contains('\\') && n != MARKER
}

/// Reads `dir`'s marker: `Ok(None)` without one; an unreadable or malformed one is an error
/// message (the directory is then treated as foreign).
fn read_marker(dir: &Path) -> std::result::Result<Option<Marker>, String> {
    let path = dir.join(MARKER);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let m: Marker = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    if m.format != MARKER_FORMAT {
        return Err(format!(
            "format {} (this lorakit reads {MARKER_FORMAT})",
            m.format
        ));
    }
    if let Some(bad) = m.files.iter().find(|n| !plain_name(n)) {
        return Err(format!("it lists {bad:?}, not a plain file name"));
    }
    Ok(Some(m))
}

fn marker_bytes(command: &str, files: &BTreeSet<String>) -> Vec<u8> {
    let m = Marker {
        format: MARKER_FORMAT,
        command: command.to_owned(),
        files: files.iter().cloned().collect(),
    };
    let mut s = serde_json::to_string_pretty(&m).unwrap_or_default();
    s.push('\n');
    s.into_bytes()
}

/// Puts back a previous output that a run killed between its two renames (the fallback where
/// the file system cannot exchange directories) left set aside, if `dir` is missing.
fn recover_set_aside(dir: &Path) {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return;
    };
    let prefix = format!(".{}.lorakit-old.", name.to_string_lossy());
    let Ok(rd) = fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(&prefix) && leftover_pid(&n).is_some_and(|p| !pid_alive(p)) {
            if fs::rename(e.path(), dir).is_ok() {
                let _ = sync_dir(parent);
            }
            return;
        }
    }
}

/// Removes the hidden leftovers of dead processes: siblings of `dir` for its name, and those
/// inside it.
fn clean_leftovers(dir: &Path) {
    let remove = |p: &Path| {
        let _ = match fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(p),
            Ok(_) => fs::remove_file(p),
            Err(_) => Ok(()),
        };
    };
    if let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) {
        let prefix = format!(".{}.lorakit-", name.to_string_lossy());
        for e in fs::read_dir(parent).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&prefix) && leftover_pid(&n).is_some_and(|p| !pid_alive(p)) {
                remove(&e.path());
            }
        }
    }
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if leftover_pid(&n).is_some_and(|p| !pid_alive(p)) {
            remove(&e.path());
        }
    }
}

/// Checks `out` as the output directory of `command` (see the module documentation) and
/// returns the handle to write it through. `inputs` are the command's inputs as
/// `(flag, path)`. Nothing is written or deleted (except that a previous output a killed run
/// left set aside is put back in place).
pub fn prepare_output_dir(
    out: &Path,
    command: &str,
    inputs: &[(&str, &Path)],
    overwrite: bool,
) -> Result<OutputDir> {
    prepare_output_dir_with(out, command, inputs, overwrite, &|_, _| None)
}

/// [`prepare_output_dir`] that also recognises the command's outputs from before the marker
/// (`legacy`).
pub fn prepare_output_dir_with(
    out: &Path,
    command: &str,
    inputs: &[(&str, &Path)],
    overwrite: bool,
    legacy: Legacy,
) -> Result<OutputDir> {
    if out.as_os_str().is_empty() {
        return Err(Error::Invalid("the output path is empty".into()));
    }
    let shown = out.to_path_buf();
    let path = resolve(out)?;
    if path.parent().is_none() || path.file_name().is_none() {
        return Err(refuse(
            &shown,
            "cannot write an output at the file system's root",
        ));
    }
    check_ancestors(&shown, &path)?;
    check_inputs(&shown, &path, inputs)?;
    match fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(refuse(&shown, "is a dangling symbolic link"));
        }
        Ok(m) if !m.is_dir() => {
            return Err(refuse(
                &shown,
                "is a file, not a directory; the output must be a directory",
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => recover_set_aside(&path),
        Err(e) => return Err(Error::io(&shown, e)),
    }
    let mut plan = OutputDir {
        path,
        shown,
        command: command.to_owned(),
        overwrite,
        state: State::Fresh { exists: false },
    };
    if !plan.path.is_dir() {
        return Ok(plan);
    }
    let all = entries(&plan.path)?;
    if all.is_empty() {
        plan.state = State::Fresh { exists: true };
        return Ok(plan);
    }
    let others = |own: &[String]| -> Vec<String> {
        all.iter()
            .filter(|n| n.as_str() != MARKER && !own.contains(n))
            .cloned()
            .collect()
    };
    let why = match read_marker(&plan.path) {
        Ok(Some(m)) if m.command == command => {
            plan.state = State::Own {
                foreign: others(&m.files),
                files: m.files,
                legacy: false,
            };
            return Ok(plan);
        }
        Ok(Some(m)) => format!(
            "holds the output of lorakit {}, not of {command} ({})",
            m.command,
            some_names(&all)
        ),
        Ok(None) => match legacy(&plan.path, &all) {
            Some(files) => {
                plan.state = State::Own {
                    foreign: others(&files),
                    files,
                    legacy: true,
                };
                return Ok(plan);
            }
            None => format!(
                "is not empty and was not written by lorakit {command} (it holds {})",
                some_names(&all)
            ),
        },
        Err(e) => format!("holds a {MARKER} that lorakit cannot read ({e})"),
    };
    if overwrite {
        plan.state = State::Overwrite { entries: all };
        return Ok(plan);
    }
    Err(refuse(
        &plan.shown,
        format!(
            "{why}; pass --overwrite to write there anyway (only the files {command} writes are replaced, nothing else is touched) or choose another output path"
        ),
    ))
}

impl OutputDir {
    /// Where the output is written.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The path as the user gave it (for messages).
    pub fn shown(&self) -> &Path {
        &self.shown
    }
    pub fn state(&self) -> &State {
        &self.state
    }
    /// Whether `--overwrite` was given.
    pub fn overwrite(&self) -> bool {
        self.overwrite
    }
    /// The names of an earlier output of this command that are still there.
    pub fn earlier_files(&self) -> Vec<String> {
        match &self.state {
            State::Own { files, .. } => files
                .iter()
                .filter(|n| fs::symlink_metadata(self.path.join(n)).is_ok())
                .cloned()
                .collect(),
            _ => vec![],
        }
    }

    /// A directory inside this output that is lorakit's alone (`rel` plain components), to be
    /// replaced whole by [`OutputDir::write_whole`].
    pub(crate) fn nested(&self, rel: impl AsRef<Path>) -> OutputDir {
        let rel = rel.as_ref();
        debug_assert!(rel.components().all(|c| matches!(c, Component::Normal(_))));
        OutputDir {
            path: self.path.join(rel),
            shown: self.shown.join(rel),
            command: self.command.clone(),
            overwrite: false,
            state: State::Nested,
        }
    }

    /// Entries that are not this output's (nor its marker), as the directory is now.
    fn foreign_now(&self, own: &BTreeSet<String>) -> Result<Vec<String>> {
        if !self.path.is_dir() || self.state == State::Nested {
            return Ok(vec![]);
        }
        Ok(entries(&self.path)?
            .into_iter()
            .filter(|n| n != MARKER && !own.contains(n))
            .collect())
    }

    /// The names this output wrote before (`Own`), or for `Overwrite`, those of `names`
    /// present.
    fn own_before(&self, names: &BTreeSet<String>) -> BTreeSet<String> {
        match &self.state {
            State::Own { files, .. } => files
                .iter()
                .filter(|n| fs::symlink_metadata(self.path.join(n)).is_ok())
                .cloned()
                .collect(),
            State::Overwrite { .. } => names
                .iter()
                .filter(|n| fs::symlink_metadata(self.path.join(n)).is_ok())
                .cloned()
                .collect(),
            _ => BTreeSet::new(),
        }
    }

    /// Writes the whole output: `fill` writes every file into an empty temporary directory,
    /// which then replaces the output as the module documentation describes. On failure
    /// nothing at the output changes and the temporary directory is removed.
    pub fn write_whole(&self, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let parent = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        clean_leftovers(&self.path);
        let staging = unique_sibling(&self.path, "tmp", "");
        fs::create_dir(&staging).map_err(|e| Error::io(&staging, e))?;
        let result = fill(&staging).and_then(|()| self.commit(&staging));
        if fs::symlink_metadata(&staging).is_ok() {
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }

    fn commit(&self, staging: &Path) -> Result<()> {
        let names: BTreeSet<String> = entries(staging)?
            .into_iter()
            .filter(|n| n != MARKER)
            .collect();
        let own = match &self.state {
            State::Own { files, .. } => files.iter().cloned().collect(),
            _ => BTreeSet::new(),
        };
        let foreign = match &self.state {
            State::Overwrite { .. } => vec![String::new()],
            _ => self.foreign_now(&own)?,
        };
        if foreign.is_empty() {
            if self.state != State::Nested {
                write_atomic(&staging.join(MARKER), &marker_bytes(&self.command, &names))?;
            }
            sync_dir(staging).map_err(|e| Error::io(staging, e))?;
            return swap_in(staging, &self.path, &self.shown);
        }
        self.commit_file_by_file(staging, &names)
    }

    /// The mixed case: the directory holds entries lorakit did not write, so it is never
    /// swapped; each of lorakit's entries is replaced on its own.
    fn commit_file_by_file(&self, staging: &Path, names: &BTreeSet<String>) -> Result<()> {
        let dir = &self.path;
        let before = self.own_before(names);
        let both: BTreeSet<String> = before.union(names).cloned().collect();
        // The marker first lists everything lorakit may have in the directory after a kill.
        write_atomic(&dir.join(MARKER), &marker_bytes(&self.command, &both))?;
        for n in names {
            replace_entry(&staging.join(n), &dir.join(n))?;
        }
        for n in before.difference(names) {
            remove_entry(&dir.join(n))?;
        }
        write_atomic(&dir.join(MARKER), &marker_bytes(&self.command, names))?;
        sync_dir(dir).map_err(|e| Error::io(dir, e))
    }

    /// For outputs written over time (`train`, `sweep`): creates the directory, removes the
    /// earlier output's entries if `start_over` (for `Overwrite`, always: the entries named in
    /// `files`), and writes the marker listing `files` (and, continuing an earlier output, its
    /// names). Foreign entries are never touched.
    pub fn begin(&self, files: &[&str], start_over: bool) -> Result<()> {
        let dir = &self.path;
        fs::create_dir_all(dir).map_err(|e| Error::io(&self.shown, e))?;
        clean_leftovers(dir);
        let mut listed: BTreeSet<String> = files.iter().map(|s| s.to_string()).collect();
        let earlier: BTreeSet<String> = match &self.state {
            State::Own { .. } => self.earlier_files().into_iter().collect(),
            State::Overwrite { .. } => self.own_before(&listed),
            _ => BTreeSet::new(),
        };
        let remove = start_over || matches!(self.state, State::Overwrite { .. });
        if remove {
            for n in &earlier {
                remove_entry(&dir.join(n))?;
            }
        } else {
            listed.extend(earlier);
        }
        if self.state != State::Nested {
            write_atomic(&dir.join(MARKER), &marker_bytes(&self.command, &listed))?;
        }
        Ok(())
    }

    /// Writes one more file `name` into an output that [`OutputDir::begin`] started (atomically)
    /// and lists it in the marker, so that a later run recognises it as its own (`train
    /// --gguf-adapter`).
    pub fn add_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let dir = &self.path;
        write_atomic(&dir.join(name), bytes)?;
        if self.state != State::Nested {
            let mut listed: BTreeSet<String> = read_marker(dir)
                .ok()
                .flatten()
                .map(|m| m.files.into_iter().collect())
                .unwrap_or_default();
            listed.insert(name.to_owned());
            write_atomic(&dir.join(MARKER), &marker_bytes(&self.command, &listed))?;
        }
        sync_dir(dir).map_err(|e| Error::io(dir, e))
    }

    /// Undoes [`OutputDir::begin`] of a fresh output after a failure: removes `files` and the
    /// marker, and the directory itself if it was created and is now empty.
    pub fn discard(&self, files: &[&str]) {
        let State::Fresh { exists } = self.state else {
            return;
        };
        for n in files.iter().copied().chain([MARKER]) {
            let _ = remove_entry(&self.path.join(n));
        }
        clean_leftovers(&self.path);
        if !exists {
            let _ = fs::remove_dir(&self.path);
        }
    }
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let cb = CString::new(b.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: two valid NUL-terminated paths; renameat2 reads them and touches no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// Whether an exchange failed because the system or file system cannot do it (then the
/// two-rename fallback is used).
fn exchange_unsupported(e: &io::Error) -> bool {
    #[cfg(unix)]
    if let Some(code) = e.raw_os_error() {
        return code == libc::EINVAL || code == libc::ENOSYS || code == libc::EOPNOTSUPP;
    }
    e.kind() == io::ErrorKind::Unsupported
}

fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Moves the complete `staging` directory to `dir`: a rename if `dir` is missing, otherwise an
/// atomic exchange (the old copy, now at `staging`, is then deleted), or where that is not
/// available the old one is renamed aside first (put back by the next run if killed between).
fn swap_in(staging: &Path, dir: &Path, shown: &Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let synced =
        |r: Result<()>| r.and_then(|()| sync_dir(parent).map_err(|e| Error::io(parent, e)));
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return synced(fs::rename(staging, dir).map_err(|e| Error::io(shown, e)));
        }
        Err(e) => return Err(Error::io(shown, e)),
        Ok(_) => {}
    }
    match exchange(staging, dir) {
        Ok(()) => {
            synced(Ok(()))?;
            // The swap is done; a leftover old copy is untidy, not a failure (and the next
            // run removes it).
            let _ = remove_any(staging);
            return Ok(());
        }
        Err(e) if !exchange_unsupported(&e) => return Err(Error::io(shown, e)),
        Err(_) => {}
    }
    let aside = unique_sibling(dir, "old", "");
    fs::rename(dir, &aside).map_err(|e| Error::io(shown, e))?;
    if let Err(e) = fs::rename(staging, dir) {
        let _ = fs::rename(&aside, dir);
        return Err(Error::io(shown, e));
    }
    synced(Ok(()))?;
    let _ = remove_any(&aside);
    Ok(())
}

/// Renames `src` over `dst` (each a file or a directory) so that `dst` is the old entry or the
/// new one, never missing or partial.
fn replace_entry(src: &Path, dst: &Path) -> Result<()> {
    let src_dir = fs::symlink_metadata(src).is_ok_and(|m| m.is_dir());
    let dst_dir = match fs::symlink_metadata(dst) {
        Ok(m) => Some(m.is_dir()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(dst, e)),
    };
    if dst_dir.is_none() || (!src_dir && dst_dir == Some(false)) {
        return fs::rename(src, dst).map_err(|e| Error::io(dst, e));
    }
    match exchange(src, dst) {
        Ok(()) => {
            let _ = remove_any(src);
            return Ok(());
        }
        Err(e) if !exchange_unsupported(&e) => return Err(Error::io(dst, e)),
        Err(_) => {}
    }
    let aside = unique_sibling(dst, "old", "");
    fs::rename(dst, &aside).map_err(|e| Error::io(dst, e))?;
    if let Err(e) = fs::rename(src, dst) {
        let _ = fs::rename(&aside, dst);
        return Err(Error::io(dst, e));
    }
    let _ = remove_any(&aside);
    Ok(())
}

/// Removes `p` (file or directory): renamed to a hidden leftover name first, so that a kill
/// during a long deletion never leaves a half-deleted entry under the real name.
fn remove_entry(p: &Path) -> Result<()> {
    if fs::symlink_metadata(p).is_err() {
        return Ok(());
    }
    let aside = unique_sibling(p, "old", "");
    fs::rename(p, &aside).map_err(|e| Error::io(p, e))?;
    remove_any(&aside).map_err(|e| Error::io(&aside, e))
}

/// Checks `out` as an output file (see the module documentation): it may not be a directory
/// nor one of `inputs` (or inside one), and an existing file is replaced only if `is_own` says
/// lorakit wrote it (`what` names such a file in the message) or with `overwrite`.
pub fn prepare_output_file(
    out: &Path,
    inputs: &[(&str, &Path)],
    overwrite: bool,
    what: &str,
    is_own: &dyn Fn(&Path) -> bool,
) -> Result<OutputFile> {
    if out.as_os_str().is_empty() {
        return Err(Error::Invalid("the output path is empty".into()));
    }
    let path = resolve(out)?;
    check_ancestors(out, &path)?;
    check_inputs(out, &path, inputs)?;
    match fs::metadata(out) {
        Ok(m) if m.is_dir() => Err(refuse(
            out,
            "is a directory, not a file; the output must be a file",
        )),
        Ok(_) if overwrite || is_own(out) => Ok(OutputFile {
            path: out.to_path_buf(),
        }),
        Ok(_) => Err(refuse(
            out,
            format!("exists and is not {what}; pass --overwrite to replace it or choose another output path"),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(OutputFile {
            path: out.to_path_buf(),
        }),
        Err(e) => Err(Error::io(out, e)),
    }
}

impl OutputFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Writes the file atomically (see [`crate::io::atomic::write_atomic_with`]).
    pub fn write_with(&self, f: impl FnOnce(&mut fs::File) -> io::Result<()>) -> Result<()> {
        crate::io::atomic::write_atomic_with(&self.path, f)
    }
    pub fn write(&self, bytes: &[u8]) -> Result<()> {
        self.write_with(|f| f.write_all(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn scratch() -> tempfile_like::Dir {
        tempfile_like::Dir::new()
    }

    /// A minimal self-removing temporary directory (the library has no tempfile dependency).
    mod tempfile_like {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        pub struct Dir(PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let p = std::env::temp_dir().join(format!(
                    "lorakit-output-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    /// Every file under `dir` (relative path → bytes), hidden ones included.
    fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut m = BTreeMap::new();
        fn walk(root: &Path, d: &Path, m: &mut BTreeMap<String, Vec<u8>>) {
            for e in fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(root, &p, m);
                } else {
                    let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                    m.insert(rel, fs::read(&p).unwrap());
                }
            }
        }
        walk(dir, dir, &mut m);
        m
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Writes `files` (name → content) as the whole output.
    fn write(out: &OutputDir, files: &[(&str, &str)]) -> Result<()> {
        out.write_whole(|tmp| {
            for (n, c) in files {
                write_atomic(&tmp.join(n), c.as_bytes())?;
            }
            Ok(())
        })
    }

    fn marker(dir: &Path) -> Marker {
        serde_json::from_str(&fs::read_to_string(dir.join(MARKER)).unwrap()).unwrap()
    }

    /// The id of a process that has exited.
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    }

    #[test]
    fn fresh_then_own_output_is_replaced_whole() {
        let t = scratch();
        let out = t.path().join("merged");
        let plan = prepare_output_dir(&out, "merge", &[], false).unwrap();
        assert_eq!(plan.state(), &State::Fresh { exists: false });
        write(&plan, &[("a.json", "1"), ("b.bin", "2")]).unwrap();
        assert_eq!(names(&out), vec![MARKER, "a.json", "b.bin"]);
        assert_eq!(marker(&out).files, vec!["a.json", "b.bin"]);
        assert_eq!(marker(&out).command, "merge");

        // Its own previous output: replaced, the name the new one lacks is gone.
        let plan = prepare_output_dir(&out, "merge", &[], false).unwrap();
        assert!(matches!(plan.state(), State::Own { foreign, .. } if foreign.is_empty()));
        write(&plan, &[("a.json", "3"), ("c.txt", "4")]).unwrap();
        assert_eq!(names(&out), vec![MARKER, "a.json", "c.txt"]);
        assert_eq!(fs::read(out.join("a.json")).unwrap(), b"3");
        // No temporary sibling left behind.
        assert_eq!(names(t.path()), vec!["merged"]);
    }

    #[test]
    fn an_empty_directory_is_fresh() {
        let t = scratch();
        let plan = prepare_output_dir(t.path(), "merge", &[], false).unwrap();
        assert_eq!(plan.state(), &State::Fresh { exists: true });
    }

    #[test]
    fn a_foreign_directory_is_refused_and_untouched() {
        let t = scratch();
        let out = t.path().join("precious");
        fs::create_dir(&out).unwrap();
        fs::write(out.join("notes.txt"), "notes").unwrap();
        fs::write(out.join("config.json"), "{}").unwrap();
        let before = snapshot(&out);
        let msg = prepare_output_dir(&out, "merge", &[], false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("precious"), "{msg}");
        assert!(
            msg.contains("notes.txt") && msg.contains("--overwrite"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
        assert_eq!(snapshot(&out), before);
    }

    #[test]
    fn overwrite_replaces_only_lorakits_names_and_keeps_the_rest() {
        let t = scratch();
        let out = t.path().join("mixed");
        fs::create_dir(&out).unwrap();
        fs::write(out.join("notes.txt"), "keep me").unwrap();
        fs::write(out.join("a.json"), "theirs").unwrap();
        let plan = prepare_output_dir(&out, "merge", &[], true).unwrap();
        assert!(matches!(plan.state(), State::Overwrite { .. }));
        write(&plan, &[("a.json", "ours"), ("b.bin", "ours")]).unwrap();
        assert_eq!(names(&out), vec![MARKER, "a.json", "b.bin", "notes.txt"]);
        assert_eq!(fs::read(out.join("notes.txt")).unwrap(), b"keep me");
        assert_eq!(fs::read(out.join("a.json")).unwrap(), b"ours");
        assert_eq!(marker(&out).files, vec!["a.json", "b.bin"]);

        // Now the directory is merge's own, with one foreign file: used without --overwrite,
        // never swapped, the foreign file kept and stale names of the earlier output removed.
        let plan = prepare_output_dir(&out, "merge", &[], false).unwrap();
        assert!(matches!(plan.state(), State::Own { foreign, .. } if foreign == &["notes.txt"]));
        write(&plan, &[("c.txt", "new")]).unwrap();
        assert_eq!(names(&out), vec![MARKER, "c.txt", "notes.txt"]);
        assert_eq!(fs::read(out.join("notes.txt")).unwrap(), b"keep me");
        assert_eq!(marker(&out).files, vec!["c.txt"]);
        assert_eq!(names(t.path()), vec!["mixed"]);
    }

    #[test]
    fn another_commands_output_is_foreign() {
        let t = scratch();
        let out = t.path().join("run");
        write(
            &prepare_output_dir(&out, "train", &[], false).unwrap(),
            &[("x", "1")],
        )
        .unwrap();
        let msg = prepare_output_dir(&out, "merge", &[], false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("lorakit train, not of merge"), "{msg}");
        let plan = prepare_output_dir(&out, "merge", &[], true).unwrap();
        write(&plan, &[("y", "2")]).unwrap();
        assert_eq!(names(&out), vec![MARKER, "x", "y"]);
        assert_eq!(marker(&out).command, "merge");
    }

    #[test]
    fn a_marker_listing_paths_is_not_trusted() {
        let t = scratch();
        let out = t.path().join("odd");
        fs::create_dir(&out).unwrap();
        fs::write(
            out.join(MARKER),
            r#"{"format": 1, "command": "merge", "files": ["../elsewhere"]}"#,
        )
        .unwrap();
        let msg = prepare_output_dir(&out, "merge", &[], false)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("cannot read") && msg.contains("elsewhere"),
            "{msg}"
        );
    }

    #[test]
    fn outputs_that_are_contain_or_lie_inside_inputs_are_refused_even_with_overwrite() {
        let t = scratch();
        let input = t.path().join("adapter");
        fs::create_dir(&input).unwrap();
        fs::write(input.join("adapter_config.json"), "{}").unwrap();
        let file_input = t.path().join("data.jsonl");
        fs::write(&file_input, "{}\n").unwrap();
        let link = t.path().join("link");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&input, &link).unwrap();
        let mut cases = vec![
            (input.clone(), "is the --adapter input"),
            (input.join("sub"), "lies inside the --adapter input"),
            (input.join("new/deeper"), "lies inside the --adapter input"),
            (t.path().to_path_buf(), "contains the --adapter input"),
            (input.join("x/../../adapter"), "is the --adapter input"),
        ];
        if cfg!(unix) {
            cases.push((link.clone(), "is the --adapter input"));
        }
        let before = snapshot(t.path());
        for (out, needle) in cases {
            for overwrite in [false, true] {
                let msg = prepare_output_dir(
                    &out,
                    "merge",
                    &[("--adapter", &input), ("--data", &file_input)],
                    overwrite,
                )
                .unwrap_err()
                .to_string();
                assert!(msg.contains(needle), "{}: {msg}", out.display());
            }
        }
        let msg = prepare_output_dir(&file_input, "merge", &[("--data", &file_input)], true)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("is the --data input"), "{msg}");
        assert_eq!(snapshot(t.path()), before);
    }

    #[test]
    fn a_file_where_a_directory_is_expected_and_the_reverse() {
        let t = scratch();
        let f = t.path().join("file.txt");
        fs::write(&f, "x").unwrap();
        for overwrite in [false, true] {
            let msg = prepare_output_dir(&f, "merge", &[], overwrite)
                .unwrap_err()
                .to_string();
            assert!(msg.contains("is a file, not a directory"), "{msg}");
            let msg = prepare_output_dir(&f.join("sub"), "merge", &[], overwrite)
                .unwrap_err()
                .to_string();
            assert!(msg.contains("is a file, not a directory"), "{msg}");
            let msg = prepare_output_file(t.path(), &[], overwrite, "x", &|_| true)
                .unwrap_err()
                .to_string();
            assert!(msg.contains("is a directory, not a file"), "{msg}");
        }
        assert_eq!(fs::read(&f).unwrap(), b"x");
    }

    #[test]
    fn output_files_replace_only_their_own_kind() {
        let t = scratch();
        let f = t.path().join("preds.jsonl");
        let own = |p: &Path| fs::read_to_string(p).is_ok_and(|s| s.starts_with('"'));
        prepare_output_file(&f, &[], false, "a predictions file", &own)
            .unwrap()
            .write(b"\"a\"\n")
            .unwrap();
        prepare_output_file(&f, &[], false, "a predictions file", &own)
            .unwrap()
            .write(b"\"b\"\n")
            .unwrap();
        fs::write(&f, "notes").unwrap();
        let msg = prepare_output_file(&f, &[], false, "a predictions file", &own)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("is not a predictions file") && msg.contains("--overwrite"),
            "{msg}"
        );
        assert_eq!(fs::read(&f).unwrap(), b"notes");
        prepare_output_file(&f, &[], true, "a predictions file", &own)
            .unwrap()
            .write(b"\"c\"\n")
            .unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"\"c\"\n");
        let msg = prepare_output_file(&f, &[("--data", &f)], true, "x", &own)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("is the --data input"), "{msg}");
    }

    #[test]
    fn leftovers_of_dead_processes_are_removed_and_live_ones_kept() {
        let t = scratch();
        let out = t.path().join("out");
        write(
            &prepare_output_dir(&out, "merge", &[], false).unwrap(),
            &[("a", "1")],
        )
        .unwrap();
        let dead = dead_pid();
        let live = std::process::id();
        let stale_sibling = t.path().join(format!(".out.lorakit-tmp.{dead}.1.2"));
        let live_sibling = t.path().join(format!(".out.lorakit-tmp.{live}.1.999999"));
        let stale_inside = out.join(format!(".a.lorakit-old.{dead}.3.4"));
        fs::create_dir(&stale_sibling).unwrap();
        fs::write(stale_sibling.join("a"), "half").unwrap();
        fs::create_dir(&live_sibling).unwrap();
        fs::write(&stale_inside, "old").unwrap();
        // Leftovers are lorakit's: they do not make the output foreign.
        let plan = prepare_output_dir(&out, "merge", &[], false).unwrap();
        assert!(matches!(plan.state(), State::Own { foreign, .. } if foreign.is_empty()));
        write(&plan, &[("a", "2")]).unwrap();
        assert!(!stale_sibling.exists() && !stale_inside.exists());
        assert!(live_sibling.exists());
        assert_eq!(names(&out), vec![MARKER, "a"]);
    }

    #[test]
    fn a_previous_output_set_aside_by_a_killed_run_is_put_back() {
        let t = scratch();
        let out = t.path().join("out");
        write(
            &prepare_output_dir(&out, "merge", &[], false).unwrap(),
            &[("a", "old")],
        )
        .unwrap();
        let aside = t
            .path()
            .join(format!(".out.lorakit-old.{}.5.6", dead_pid()));
        fs::rename(&out, &aside).unwrap();
        let plan = prepare_output_dir(&out, "merge", &[], false).unwrap();
        assert!(matches!(plan.state(), State::Own { .. }));
        assert_eq!(fs::read(out.join("a")).unwrap(), b"old");
        assert!(!aside.exists());
    }

    #[test]
    fn a_failing_fill_changes_nothing() {
        let t = scratch();
        let out = t.path().join("out");
        write(
            &prepare_output_dir(&out, "merge", &[], false).unwrap(),
            &[("a", "1")],
        )
        .unwrap();
        let before = snapshot(&out);
        let plan = prepare_output_dir(&out, "merge", &[], false).unwrap();
        let err = plan.write_whole(|tmp| {
            fs::write(tmp.join("a"), "partial").unwrap();
            Err(Error::Invalid("gave up".into()))
        });
        assert!(err.is_err());
        assert_eq!(snapshot(&out), before);
        assert_eq!(names(t.path()), vec!["out"]);
    }

    #[test]
    fn begin_and_discard_for_outputs_written_over_time() {
        let t = scratch();
        let out = t.path().join("run");
        let plan = prepare_output_dir(&out, "train", &[], false).unwrap();
        plan.begin(&["metrics.jsonl", "checkpoints"], false)
            .unwrap();
        fs::write(out.join("metrics.jsonl"), "{}").unwrap();
        assert_eq!(marker(&out).files, vec!["checkpoints", "metrics.jsonl"]);
        plan.discard(&["metrics.jsonl", "checkpoints"]);
        assert!(!out.exists());

        // Starting over removes the earlier run's names only.
        let plan = prepare_output_dir(&out, "train", &[], false).unwrap();
        plan.begin(&["metrics.jsonl", "loss.png"], false).unwrap();
        fs::write(out.join("metrics.jsonl"), "{}").unwrap();
        fs::write(out.join("loss.png"), "png").unwrap();
        fs::write(out.join("notes.txt"), "mine").unwrap();
        let plan = prepare_output_dir(&out, "train", &[], false).unwrap();
        assert_eq!(plan.earlier_files(), vec!["loss.png", "metrics.jsonl"]);
        plan.begin(&["metrics.jsonl", "model"], true).unwrap();
        assert_eq!(names(&out), vec![MARKER, "notes.txt"]);
        assert_eq!(marker(&out).files, vec!["metrics.jsonl", "model"]);
        // Discarding an output that was not fresh removes nothing.
        plan.discard(&["metrics.jsonl", "model"]);
        assert_eq!(names(&out), vec![MARKER, "notes.txt"]);
    }
}
