//! No command deletes what it did not write (issue #18). For every command that writes a
//! directory or file, on the tiny fixtures: into a fresh path it works; into its own previous
//! output it is replaced (merge, analyze, eval), continued (sweep, `train --resume`) or refused
//! until `--resume` / `--overwrite` (train), as documented; into a non-empty directory lorakit did
//! not write it is refused with one error line naming the path, nothing touched; with
//! `--overwrite` only lorakit's files are replaced and a foreign file survives byte for byte;
//! into one of its inputs (or inside one, or a parent of one) and into a file where a directory
//! is expected (or the reverse) it is refused even with `--overwrite`. Then SIGKILL at random
//! moments of `merge` replacing its previous output: the output is always the old one or the
//! new one whole, and a foreign file beside it is never touched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::common::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const MARKER: &str = lorakit::io::output::MARKER;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Every file under `dir`, recursively, hidden ones included: relative path → bytes (a missing
/// directory is empty).
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, d: &Path, m: &mut BTreeMap<String, Vec<u8>>) {
        let Ok(rd) = std::fs::read_dir(d) else {
            return;
        };
        for e in rd {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&p).unwrap();
                m.insert(
                    format!("{rel} -> link"),
                    target.to_string_lossy().as_bytes().to_vec(),
                );
            } else if meta.is_dir() {
                m.insert(format!("{rel}/"), vec![]);
                walk(root, &p, m);
            } else {
                m.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut m = BTreeMap::new();
    walk(dir, dir, &mut m);
    m
}

/// Top-level entries of `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The marker's command and files.
fn marker(dir: &Path) -> (String, Vec<String>) {
    let m: lorakit::io::output::Marker =
        serde_json::from_str(&std::fs::read_to_string(dir.join(MARKER)).unwrap()).unwrap();
    (m.command, m.files)
}

#[track_caller]
fn ok(args: &[&str]) -> String {
    let o = lorakit(args);
    assert!(
        o.status.success(),
        "lorakit {args:?} failed:\n{}",
        stderr(&o)
    );
    stderr(&o)
}

/// lorakit must exit 1, without a panic, with exactly one `error:` line, the last one, holding
/// every needle. Returns stderr.
#[track_caller]
fn refused(args: &[&str], needles: &[&str]) -> String {
    let o = lorakit(args);
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "exit code of lorakit {args:?}:\n{err}"
    );
    assert!(
        !err.contains("panicked"),
        "lorakit {args:?} panicked:\n{err}"
    );
    let lines: Vec<&str> = err.trim_end().lines().collect();
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("error")).count(),
        1,
        "lorakit {args:?}: expected one error line:\n{err}"
    );
    assert!(
        lines.last().is_some_and(|l| l.starts_with("error: ")),
        "lorakit {args:?}: the error is not the last line:\n{err}"
    );
    for n in needles {
        assert!(
            err.contains(n),
            "stderr of lorakit {args:?} lacks {n:?}:\n{err}"
        );
    }
    err
}

/// `args` with `extra` appended.
fn with<'a>(args: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    v.extend_from_slice(extra);
    v
}

/// A directory of the user's: notes.txt plus `also` (files named like lorakit's, for instance).
fn foreign_dir(path: &Path, also: &[&str]) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    std::fs::write(path.join("notes.txt"), "my notes, not lorakit's\n").unwrap();
    for n in also {
        std::fs::write(path.join(n), format!("the user's own {n}\n")).unwrap();
    }
    path.to_path_buf()
}

/// The refusals every directory-writing command shares. `args(out)` runs the command into
/// `out`; `inputs` are paths of its inputs (files or directories) to try as `--out`, beside
/// a parent directory of all of them (`scratch`, which holds nothing else the test needs).
/// Nothing under `scratch` may change.
fn refuses_inputs_and_files(args: &dyn Fn(&Path) -> Vec<String>, inputs: &[&Path], scratch: &Path) {
    let before = tree(scratch);
    let mut outs: Vec<(PathBuf, &str)> = vec![(scratch.to_path_buf(), "contains the")];
    for i in inputs {
        outs.push((i.to_path_buf(), "input"));
        if i.is_dir() {
            outs.push((i.join("sub"), "lies inside the"));
        }
    }
    #[cfg(unix)]
    {
        let link = scratch.parent().unwrap().join(format!(
            "link-to-input-{}",
            scratch.file_name().unwrap().to_string_lossy()
        ));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(inputs[0], &link).unwrap();
        outs.push((link, "input"));
    }
    for (out, needle) in &outs {
        for overwrite in [false, true] {
            let mut a = args(out);
            if overwrite {
                a.push("--overwrite".into());
            }
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            refused(&a, &[s(out), needle, "never writes over its inputs"]);
        }
    }
    assert_eq!(
        tree(scratch),
        before,
        "a refused command changed its inputs"
    );

    // A file where a directory is expected (and a path below a file).
    let f = scratch.parent().unwrap().join(format!(
        "a-file-{}",
        scratch.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&f, "a file\n").unwrap();
    for out in [f.clone(), f.join("below")] {
        for overwrite in [false, true] {
            let mut a = args(&out);
            if overwrite {
                a.push("--overwrite".into());
            }
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            refused(&a, &[s(&f), "is a file, not a directory"]);
        }
    }
    assert_eq!(std::fs::read(&f).unwrap(), b"a file\n");
}

/// A foreign non-empty directory is refused, nothing touched; with `--overwrite` the command
/// works, the foreign file survives byte for byte and the marker lists only lorakit's names.
/// Returns the directory.
fn refuses_foreign_then_overwrites(
    args: &dyn Fn(&Path) -> Vec<String>,
    dir: &Path,
    named_like_ours: &[&str],
    command: &str,
) -> PathBuf {
    let d = foreign_dir(dir, named_like_ours);
    let before = tree(&d);
    let a = args(&d);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    refused(&a, &[s(&d), "notes.txt", "--overwrite"]);
    assert_eq!(tree(&d), before, "a refused command touched the directory");
    ok(&with(&a, &["--overwrite"]));
    assert_eq!(
        std::fs::read(d.join("notes.txt")).unwrap(),
        b"my notes, not lorakit's\n",
        "the foreign file did not survive --overwrite"
    );
    let (cmd, files) = marker(&d);
    assert_eq!(cmd, command);
    assert!(!files.contains(&"notes.txt".to_string()), "{files:?}");
    for n in named_like_ours {
        assert!(
            files.contains(&n.to_string()),
            "{n} was not replaced: {files:?}"
        );
        assert_ne!(
            std::fs::read(d.join(n)).unwrap(),
            format!("the user's own {n}\n").into_bytes(),
            "{n}: --overwrite replaces the files lorakit writes"
        );
    }
    d
}

fn tiny() -> PathBuf {
    fixture("tiny-llama")
}

fn tiny_adapter() -> PathBuf {
    fixture("tiny-llama/lora-a-r4-qv")
}

/// Copies a directory's files (not subdirectories) into `to`.
fn copy_files(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
    to.to_path_buf()
}

/// Six prompt/completion lines the tiny model trains on in milliseconds.
fn train_data(dir: &Path) -> PathBuf {
    let p = dir.join("chat.jsonl");
    let mut text = String::new();
    for i in 0..6 {
        let c = ["red", "blue", "green"][i % 3];
        text.push_str(&serde_json::json!({"prompt": format!("Item {i}:"), "completion": format!(" the colour is {c}")}).to_string());
        text.push('\n');
    }
    std::fs::write(&p, text).unwrap();
    p
}

// ---------------------------------------------------------------------------------------------
// The issue's two cases
// ---------------------------------------------------------------------------------------------

/// `lorakit train --out run1` then `lorakit merge --adapter run1 --out run1`: before the fix
/// the merge exited 0 and left run1/ holding only the merged model.
#[test]
fn issue_18_merge_into_the_run_it_merges_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = train_data(tmp.path());
    let run1 = tmp.path().join("run1");
    let model = tiny();
    ok(&[
        "train",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&run1),
        "--steps",
        "6",
        "--batch-size",
        "2",
        "--quiet",
    ]);
    for n in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoints",
        "metrics.jsonl",
        "loss.png",
    ] {
        assert!(run1.join(n).exists(), "train wrote no {n}");
    }
    let before = tree(&run1);
    for extra in [&[][..], &["--overwrite"][..]] {
        let args = with(
            &[
                "merge",
                "--model",
                s(&model),
                "--adapter",
                s(&run1),
                "--out",
                s(&run1),
            ],
            extra,
        );
        refused(&args, &[s(&run1), "--adapter"]);
        assert_eq!(tree(&run1), before, "run1/ changed (flags {extra:?})");
    }
}

/// `mkdir precious; echo notes > precious/notes.txt; lorakit merge --adapter run5 --out
/// precious`: before the fix precious/ held only the merged model afterwards.
#[test]
fn issue_18_merge_into_a_directory_of_notes_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let precious = tmp.path().join("precious");
    std::fs::create_dir(&precious).unwrap();
    std::fs::write(precious.join("notes.txt"), "notes\n").unwrap();
    let before = tree(&precious);
    refused(
        &[
            "merge",
            "--model",
            s(&tiny()),
            "--adapter",
            s(&tiny_adapter()),
            "--out",
            s(&precious),
        ],
        &[s(&precious), "notes.txt"],
    );
    assert_eq!(tree(&precious), before);
    assert_eq!(
        names(tmp.path()),
        vec!["precious"],
        "nothing left beside it"
    );
}

// ---------------------------------------------------------------------------------------------
// Every writing command
// ---------------------------------------------------------------------------------------------

#[test]
fn merge_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny();
    let adapter = tiny_adapter();
    let merge = |out: &Path, weight: &str| -> Vec<String> {
        [
            "merge",
            "--model",
            s(&model),
            "--adapter",
            &format!("{}:{weight}", adapter.display()),
            "--out",
            s(out),
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |v: Vec<String>| ok(&v.iter().map(String::as_str).collect::<Vec<_>>());

    // Fresh: the HF files and the marker, nothing beside the output.
    let out = tmp.path().join("merged");
    run(merge(&out, "1"));
    let (cmd, files) = marker(&out);
    assert_eq!(cmd, "merge");
    assert!(files.contains(&"model.safetensors".into()) && files.contains(&"config.json".into()));
    let mut want = files.clone();
    want.push(MARKER.into());
    want.sort();
    assert_eq!(names(&out), want);
    let first = tree(&out);

    // Its own previous output: replaced whole, equal to a fresh merge of the new weights.
    let fresh = tmp.path().join("fresh-half");
    run(merge(&fresh, "0.5"));
    assert_ne!(tree(&fresh), tree(&out));
    run(merge(&out, "0.5"));
    assert_eq!(tree(&out), tree(&fresh));
    assert_eq!(
        names(tmp.path()),
        vec!["fresh-half", "merged"],
        "no temporary left"
    );

    // Foreign: refused; --overwrite replaces config.json (a name merge writes), keeps notes.txt.
    let d = refuses_foreign_then_overwrites(
        &|o| merge(o, "1"),
        &tmp.path().join("foreign"),
        &["config.json"],
        "merge",
    );
    let now = tree(&d);
    for (name, bytes) in &first {
        assert_eq!(&now[name], bytes, "{name} after --overwrite");
    }
    // A later merge into that mixed directory (now merge's own) needs no --overwrite and keeps
    // the foreign file; the merged files equal a fresh merge's.
    run(merge(&d, "0.5"));
    let now = tree(&d);
    for (name, bytes) in tree(&fresh) {
        assert_eq!(now[&name], bytes, "{name}");
    }
    assert_eq!(
        std::fs::read(d.join("notes.txt")).unwrap(),
        b"my notes, not lorakit's\n"
    );

    // Inputs (copies: a broken guard must not damage the repository's fixtures) and files.
    let scratch = tmp.path().join("inputs");
    let model_copy = copy_files(&model, &scratch.join("model"));
    let adapter_copy = copy_files(&adapter, &scratch.join("adapter"));
    let args = |o: &Path| -> Vec<String> {
        [
            "merge",
            "--model",
            s(&model_copy),
            "--adapter",
            s(&adapter_copy),
            "--out",
            s(o),
        ]
        .map(String::from)
        .to_vec()
    };
    refuses_inputs_and_files(&args, &[&adapter_copy, &model_copy], &scratch);
}

#[test]
fn train_lora_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path().join("inputs");
    std::fs::create_dir(&scratch).unwrap();
    let data = train_data(&scratch);
    let eval = scratch.join("eval.jsonl");
    std::fs::copy(&data, &eval).unwrap();
    let config = scratch.join("train.toml");
    std::fs::write(&config, "batch_size = 2\nprecision = \"f32\"\n").unwrap();
    let model = tiny();
    let train = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--eval-data",
            s(&eval),
            "--config",
            s(&config),
            "--out",
            s(out),
            "--quiet",
        ]
        .map(String::from)
        .to_vec();
        let steps = if extra.contains(&"--steps") {
            &[][..]
        } else {
            &["--steps", "3"][..]
        };
        v.extend(steps.iter().chain(extra).map(|x| x.to_string()));
        v
    };
    let run = |v: Vec<String>| ok(&v.iter().map(String::as_str).collect::<Vec<_>>());
    let adapter_files = |d: &Path| -> BTreeMap<String, Vec<u8>> {
        tree(d)
            .into_iter()
            .filter(|(n, _)| n.starts_with("adapter_") || n.ends_with('/') || n == MARKER)
            .collect()
    };

    // Fresh.
    let out = tmp.path().join("run");
    run(train(&out, &[]));
    let (cmd, files) = marker(&out);
    assert_eq!(cmd, "train");
    assert_eq!(
        files,
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "checkpoints",
            "loss.png",
            "metrics.jsonl"
        ]
    );
    let reference = adapter_files(&out);

    // An earlier run: refused without --resume or --overwrite, nothing touched.
    let before = tree(&out);
    let a = train(&out, &[]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    refused(
        &a,
        &[
            s(&out),
            "holds an earlier training run (step 3)",
            "--resume",
            "--overwrite",
        ],
    );
    assert_eq!(tree(&out), before);
    // --resume continues it (to 5 steps) ...
    run(train(&out, &["--steps", "5", "--resume"]));
    assert!(out.join("checkpoints/step-000005").is_dir());
    // ... --overwrite starts over: only the earlier run's files go, a foreign file stays, and
    // the result is the fresh run's, byte for byte.
    std::fs::write(out.join("notes.txt"), "mine\n").unwrap();
    run(train(&out, &["--overwrite"]));
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"mine\n");
    assert_eq!(adapter_files(&out), reference);
    assert_eq!(names(&out.join("checkpoints")), vec!["step-000003"]);
    // --resume and --overwrite together are refused.
    let a = train(&out, &["--resume", "--overwrite"]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    refused(&a, &["--resume", "--overwrite"]);

    // A run directory from before the marker still resumes, and is still an earlier run.
    std::fs::remove_file(out.join(MARKER)).unwrap();
    let a = train(&out, &[]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    refused(&a, &["holds an earlier training run (step 3)"]);
    run(train(&out, &["--steps", "4", "--resume"]));
    assert_eq!(marker(&out).0, "train");

    // Foreign: refused; --overwrite replaces metrics.jsonl (train's name), keeps notes.txt.
    refuses_foreign_then_overwrites(
        &|o| train(o, &[]),
        &tmp.path().join("foreign"),
        &["metrics.jsonl"],
        "train",
    );
    // An empty directory is fresh.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    run(train(&empty, &[]));
    assert_eq!(adapter_files(&empty), reference);

    refuses_inputs_and_files(&|o| train(o, &[]), &[&data, &eval, &config], &scratch);
}

#[test]
fn train_full_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path().join("inputs");
    std::fs::create_dir(&scratch).unwrap();
    let data = train_data(&scratch);
    let model = copy_files(&tiny(), &scratch.join("model"));
    let train = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--full",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--quiet",
        ]
        .map(String::from)
        .to_vec();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let run = |v: Vec<String>| ok(&v.iter().map(String::as_str).collect::<Vec<_>>());

    let out = tmp.path().join("run");
    run(train(&out, &[]));
    let (cmd, files) = marker(&out);
    assert_eq!(cmd, "train");
    assert_eq!(files, ["checkpoints", "loss.png", "metrics.jsonl", "model"]);
    let weights = std::fs::read(out.join("model/model.safetensors")).unwrap();

    let before = tree(&out);
    let a = train(&out, &[]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    refused(
        &a,
        &[s(&out), "holds an earlier training run", "--overwrite"],
    );
    assert_eq!(tree(&out), before);
    // --overwrite starts over: the same model, a foreign file kept. A LoRA run's files (an
    // earlier LoRA run in the same directory) are removed when --full starts over there.
    std::fs::write(out.join("notes.txt"), "mine\n").unwrap();
    run(train(&out, &["--overwrite"]));
    assert_eq!(
        std::fs::read(out.join("model/model.safetensors")).unwrap(),
        weights
    );
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"mine\n");
    let mut lora = train(&out, &["--overwrite"]);
    lora.retain(|x| x != "--full");
    run(lora);
    assert!(!out.join("model").exists() && out.join("adapter_model.safetensors").exists());
    run(train(&out, &["--overwrite"]));
    assert!(out.join("model").exists() && !out.join("adapter_model.safetensors").exists());
    assert_eq!(
        names(&out),
        vec![MARKER, "loss.png", "metrics.jsonl", "model", "notes.txt"]
    );

    refuses_foreign_then_overwrites(
        &|o| train(o, &[]),
        &tmp.path().join("foreign"),
        &["loss.png"],
        "train",
    );
    refuses_inputs_and_files(&|o| train(o, &[]), &[&model, &data], &scratch);
}

#[test]
fn sweep_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path().join("inputs");
    std::fs::create_dir(&scratch).unwrap();
    let data = train_data(&scratch);
    let model = tiny();
    let cfg = scratch.join("sweep.toml");
    std::fs::write(
        &cfg,
        format!(
            "[train]\nmodel = \"{}\"\ndata = \"{}\"\neval_data = \"{}\"\nsteps = 1\nbatch_size = 2\nprecision = \"f32\"\n[grid]\nr = [1, 2]\ntargets = [\"q_proj\"]\n",
            model.display(),
            data.display(),
            data.display()
        ),
    )
    .unwrap();
    let sweep = |out: &Path| -> Vec<String> {
        ["sweep", "--config", s(&cfg), "--out", s(out)]
            .map(String::from)
            .to_vec()
    };
    let run = |v: Vec<String>| ok(&v.iter().map(String::as_str).collect::<Vec<_>>());

    let out = tmp.path().join("sweep");
    let err = run(sweep(&out));
    assert!(!err.contains("skipped"), "{err}");
    let (cmd, files) = marker(&out);
    assert_eq!(cmd, "sweep");
    assert_eq!(files, ["cells", "results.csv", "results.md"]);
    // Its own earlier output is continued: every finished cell skipped.
    let err = run(sweep(&out));
    assert_eq!(err.matches("skipped").count(), 2, "{err}");
    // --overwrite starts over (every cell trains again); a foreign file stays.
    std::fs::write(out.join("notes.txt"), "mine\n").unwrap();
    let mut a = sweep(&out);
    a.push("--overwrite".into());
    let err = run(a);
    assert!(!err.contains("skipped"), "{err}");
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"mine\n");
    // A sweep from before the marker is still its own (continued).
    std::fs::remove_file(out.join(MARKER)).unwrap();
    std::fs::remove_file(out.join("notes.txt")).unwrap();
    let err = run(sweep(&out));
    assert_eq!(err.matches("skipped").count(), 2, "{err}");

    refuses_foreign_then_overwrites(
        &sweep,
        &tmp.path().join("foreign"),
        &["results.md"],
        "sweep",
    );
    refuses_inputs_and_files(&sweep, &[&cfg, &data], &scratch);
}

#[test]
fn analyze_subspace_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path().join("inputs");
    let src = repo_root().join("tests/data/subspace");
    let a = copy_files(&src.join("adapter-r2"), &scratch.join("a"));
    let b = copy_files(&src.join("adapter-r6"), &scratch.join("b"));
    let sub = |out: &Path, seed: &str| -> Vec<String> {
        [
            "analyze",
            "subspace",
            "--a",
            s(&a),
            "--b",
            s(&b),
            "--seed",
            seed,
            "--out",
            s(out),
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |v: Vec<String>| ok(&v.iter().map(String::as_str).collect::<Vec<_>>());

    let out = tmp.path().join("sub");
    run(sub(&out, "0"));
    assert_eq!(marker(&out).0, "analyze subspace");
    // Replaced whole by a rerun: equal to a fresh output of the new settings.
    let fresh = tmp.path().join("fresh");
    run(sub(&fresh, "1"));
    assert_ne!(tree(&fresh), tree(&out));
    run(sub(&out, "1"));
    assert_eq!(tree(&out), tree(&fresh));
    // An output from before the marker (exactly analyze's files) is still its own.
    std::fs::remove_file(out.join(MARKER)).unwrap();
    run(sub(&out, "1"));
    assert_eq!(tree(&out), tree(&fresh));

    refuses_foreign_then_overwrites(
        &|o| sub(o, "0"),
        &tmp.path().join("foreign"),
        &["summary.txt"],
        "analyze subspace",
    );
    refuses_inputs_and_files(&|o| sub(o, "0"), &[&a, &b], &scratch);
}

#[test]
fn analyze_amplification_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path().join("inputs");
    let model = copy_files(&tiny(), &scratch.join("model"));
    let adapter = copy_files(
        &repo_root().join("tests/data/subspace/adapter-r6"),
        &scratch.join("adapter"),
    );
    let amp = |out: &Path, seed: &str| -> Vec<String> {
        [
            "analyze",
            "amplification",
            "--model",
            s(&model),
            "--adapter",
            s(&adapter),
            "--seed",
            seed,
            "--out",
            s(out),
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |v: Vec<String>| ok(&v.iter().map(String::as_str).collect::<Vec<_>>());

    let out = tmp.path().join("amp");
    run(amp(&out, "0"));
    assert_eq!(
        marker(&out),
        (
            "analyze amplification".into(),
            vec!["amplification.csv".into(), "amplification.md".into()]
        )
    );
    let fresh = tmp.path().join("fresh");
    run(amp(&fresh, "1"));
    assert_ne!(tree(&fresh), tree(&out));
    run(amp(&out, "1"));
    assert_eq!(tree(&out), tree(&fresh));

    refuses_foreign_then_overwrites(
        &|o| amp(o, "0"),
        &tmp.path().join("foreign"),
        &["amplification.md"],
        "analyze amplification",
    );
    refuses_inputs_and_files(&|o| amp(o, "0"), &[&adapter, &model], &scratch);
}

#[test]
fn eval_save_predictions_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path().join("inputs");
    std::fs::create_dir(&scratch).unwrap();
    let data = scratch.join("eval.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"Item 1:\", \"references\": [\"red\"]}\n{\"prompt\": \"Item 2:\", \"references\": [\"blue\"]}\n",
    )
    .unwrap();
    let adapter = copy_files(&tiny_adapter(), &scratch.join("adapter"));
    let model = copy_files(&tiny(), &scratch.join("model"));
    let a_dir = tmp.path().join("a-dir");
    std::fs::create_dir(&a_dir).unwrap();
    let eval = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "eval",
            "--model",
            s(&model),
            "--adapter",
            s(&adapter),
            "--data",
            s(&data),
            "--metric",
            "exact",
            "--max-new-tokens",
            "3",
            "--save-predictions",
            s(out),
        ]
        .map(String::from)
        .to_vec();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let run = |v: Vec<String>| ok(&v.iter().map(String::as_str).collect::<Vec<_>>());
    let refuse = |v: Vec<String>, needles: &[&str]| {
        refused(&v.iter().map(String::as_str).collect::<Vec<_>>(), needles);
    };

    // Fresh, then its own earlier file (one JSON string per line) replaced.
    let preds = tmp.path().join("preds.jsonl");
    run(eval(&preds, &[]));
    let first = std::fs::read(&preds).unwrap();
    assert_eq!(
        lorakit::eval::load_predictions(&preds).unwrap().len(),
        2,
        "one prediction per example"
    );
    std::fs::write(&preds, "\"an older prediction\"\n\"another\"\n").unwrap();
    run(eval(&preds, &[]));
    assert_eq!(std::fs::read(&preds).unwrap(), first);
    assert_eq!(
        names(tmp.path()),
        vec!["a-dir", "inputs", "preds.jsonl"],
        "no temporary left"
    );

    // A file eval did not write: refused, untouched; --overwrite replaces it.
    let notes = tmp.path().join("notes.txt");
    std::fs::write(&notes, "my notes\n").unwrap();
    refuse(
        eval(&notes, &[]),
        &[s(&notes), "not a predictions file", "--overwrite"],
    );
    assert_eq!(std::fs::read(&notes).unwrap(), b"my notes\n");
    run(eval(&notes, &["--overwrite"]));
    assert_eq!(std::fs::read(&notes).unwrap(), first);

    // Inputs, inside an input, and a directory where a file is expected: refused whatever the
    // flags, nothing changed.
    let before = tree(&scratch);
    for (out, needle) in [
        (data.clone(), "is the --data input"),
        (
            adapter.join("adapter_config.json"),
            "lies inside the --adapter input",
        ),
        (adapter.join("new.jsonl"), "lies inside the --adapter input"),
        (model.join("preds.jsonl"), "lies inside the --model input"),
        (a_dir.clone(), "is a directory, not a file"),
    ] {
        for extra in [&[][..], &["--overwrite"][..]] {
            refuse(eval(&out, extra), &[s(&out), needle]);
        }
    }
    assert_eq!(tree(&scratch), before);
}

/// quickstart needs the real model and NER data and trains for minutes, so its output rule is
/// tested through the function it uses (`TrainOutput::prepare` with `EarlierRun::Replace`,
/// driven here by the library's `train` on the tiny model) plus the CLI's refusals, which come
/// before anything is fetched.
#[test]
fn quickstart_outputs() {
    use lorakit::train::trainer::{train, EarlierRun, TrainOptions, TrainOutput, TrainPlan};
    let tmp = tempfile::tempdir().unwrap();
    let data = train_data(tmp.path());
    let loaded = tiny_llama();
    let quickstart = |out: &Path, overwrite: bool| -> lorakit::Result<()> {
        let output = TrainOutput::prepare(
            out,
            "quickstart",
            &[("NER data", data.as_path())],
            EarlierRun::Replace,
            overwrite,
        )?;
        let options = TrainOptions {
            data: Some(data.clone()),
            steps: Some(2),
            batch_size: 2,
            precision: Some("f32".into()),
            ..Default::default()
        };
        let plan = TrainPlan::new(options, loaded, "tiny")?;
        train(loaded, plan, &output, |_| {})?;
        Ok(())
    };
    let out = tmp.path().join("quickstart");
    quickstart(&out, false).unwrap();
    assert_eq!(marker(&out).0, "quickstart");
    let first = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    // Its own earlier run is replaced (no --resume, no --overwrite needed); a foreign file stays.
    std::fs::write(out.join("notes.txt"), "mine\n").unwrap();
    std::fs::write(out.join("metrics.jsonl"), "stale\n").unwrap();
    quickstart(&out, false).unwrap();
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        first
    );
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"mine\n");
    assert!(!std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .contains("stale"));
    // A `train` run directory is not the quickstart's: refused without --overwrite.
    let run = tmp.path().join("train-run");
    let output = TrainOutput::prepare(&run, "train", &[], EarlierRun::Refuse, false).unwrap();
    let plan = TrainPlan::new(
        TrainOptions {
            data: Some(data.clone()),
            steps: Some(1),
            batch_size: 2,
            precision: Some("f32".into()),
            ..Default::default()
        },
        loaded,
        "tiny",
    )
    .unwrap();
    train(loaded, plan, &output, |_| {}).unwrap();
    let before = tree(&run);
    let msg = quickstart(&run, false).unwrap_err().to_string();
    assert!(msg.contains("lorakit train, not of quickstart"), "{msg}");
    assert_eq!(tree(&run), before);
    // Foreign: refused; with overwrite only train's names are replaced.
    let d = foreign_dir(&tmp.path().join("foreign"), &["loss.png"]);
    let before = tree(&d);
    let msg = quickstart(&d, false).unwrap_err().to_string();
    assert!(
        msg.contains("notes.txt") && msg.contains("--overwrite"),
        "{msg}"
    );
    assert_eq!(tree(&d), before);
    quickstart(&d, true).unwrap();
    assert_eq!(
        std::fs::read(d.join("notes.txt")).unwrap(),
        b"my notes, not lorakit's\n"
    );
    // Inputs.
    for o in [data.clone(), tmp.path().to_path_buf()] {
        for overwrite in [false, true] {
            let msg = quickstart(&o, overwrite).unwrap_err().to_string();
            assert!(msg.contains("never writes over its inputs"), "{msg}");
        }
    }

    // The CLI checks --out before fetching anything.
    let d = foreign_dir(&tmp.path().join("cli-foreign"), &[]);
    let before = tree(&d);
    let t0 = Instant::now();
    refused(
        &["quickstart", "--out", s(&d)],
        &[s(&d), "notes.txt", "--overwrite"],
    );
    assert_eq!(tree(&d), before);
    let f = tmp.path().join("a-file");
    std::fs::write(&f, "x").unwrap();
    refused(
        &["quickstart", "--out", s(&f), "--overwrite"],
        &["is a file, not a directory"],
    );
    // models/ holds (or will hold) the default model: an input.
    refused(
        &["quickstart", "--out", "models", "--overwrite"],
        &["contains the model input"],
    );
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "refusals must not fetch or train"
    );
}

// ---------------------------------------------------------------------------------------------
// SIGKILL during the replacement of a previous output
// ---------------------------------------------------------------------------------------------

/// Runs `lorakit merge` into `out` with the adapter at `weight` and kills it with SIGKILL after
/// `delay` unless it has finished; true if it was killed.
fn merge_killed_after(out: &Path, weight: &str, extra: &[&str], delay: Duration) -> bool {
    merge_killed_or_timed(out, weight, extra, delay).is_none()
}

/// [`merge_killed_after`], returning how long the merge took when it finished before `delay`
/// (None: it was killed).
fn merge_killed_or_timed(
    out: &Path,
    weight: &str,
    extra: &[&str],
    delay: Duration,
) -> Option<Duration> {
    let mut args: Vec<String> = [
        "merge",
        "--model",
        s(&tiny()),
        "--adapter",
        &format!("{}:{weight}", tiny_adapter().display()),
        "--out",
        s(out),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|x| x.to_string()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .args(&args)
        .current_dir(repo_root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn lorakit");
    let started = Instant::now();
    let mut killed = false;
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() >= delay {
            child.kill().unwrap(); // SIGKILL
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let took = started.elapsed();
    let status = child.wait().unwrap();
    assert!(killed || status.success(), "merge failed: {status}");
    (!killed).then_some(took)
}

/// Two versions of the merged output (adapter weights 1 and 0.5) written into fresh
/// directories, and the measured time of one merge.
fn two_versions(tmp: &Path) -> ([BTreeMap<String, Vec<u8>>; 2], Duration) {
    let mut versions = Vec::new();
    let mut took = Duration::ZERO;
    for w in ["1", "0.5"] {
        let dir = tmp.join(format!("version-{w}"));
        let t0 = Instant::now();
        assert!(!merge_killed_after(&dir, w, &[], Duration::from_secs(60)));
        took += t0.elapsed();
        versions.push(tree(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }
    assert_ne!(versions[0], versions[1]);
    (versions.try_into().unwrap(), took / 2)
}

/// Names beside (and inside) the output that are lorakit's hidden temporaries.
fn temporaries(dir: &Path) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| n.contains(".lorakit-tmp.") || n.contains(".lorakit-old."))
        .collect()
}

/// `merge` into its own previous output, killed 30 times at fixed-seed random moments of a
/// run (in units of a measured merge): after every kill the output is exactly the old version
/// or the new one, every file of it, never a mix, never missing. Hidden temporaries a kill
/// leaves beside it are removed by the next run.
#[test]
fn sigkill_while_merge_replaces_its_output_leaves_the_old_or_the_new_whole() {
    const KILLS: usize = 30;
    let tmp = tempfile::tempdir().unwrap();
    let (versions, mut took) = two_versions(tmp.path());
    eprintln!("one merge: {:.0} ms", took.as_secs_f64() * 1e3);
    let out = tmp.path().join("merged");
    assert!(!merge_killed_after(&out, "1", &[], Duration::from_secs(60)));
    let mut current = 0usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let (mut killed, mut flipped, mut mid_write) = (0, 0, 0);
    let mut seen = std::collections::BTreeSet::new();
    for k in 0..KILLS {
        let target = 1 - current;
        let delay = took.mul_f64(rng.random_range(0.2..1.1));
        let finished = merge_killed_or_timed(&out, ["1", "0.5"][target], &[], delay);
        let was_killed = finished.is_none();
        killed += was_killed as usize;
        // A run that finished is the newest measure of a merge: the kill moments follow the
        // machine's speed when other work starts or stops beside this test.
        took = finished.unwrap_or(took);
        let now = tree(&out);
        let which = versions.iter().position(|v| *v == now).unwrap_or_else(|| {
            panic!(
                "kill {k} ({} ms): the output is neither the old nor the new version: {:?}",
                delay.as_millis(),
                now.keys().collect::<Vec<_>>()
            )
        });
        let left = temporaries(tmp.path());
        // A temporary this run made: the kill landed while it wrote or swapped.
        mid_write += left.iter().any(|n| !seen.contains(n)) as usize;
        seen.extend(left.iter().cloned());
        assert!(
            left.iter().all(|n| n.starts_with(".merged.lorakit-")),
            "kill {k}: unexpected entries {left:?}"
        );
        flipped += (which != current) as usize;
        eprintln!(
            "kill {k}: {} ms, killed {was_killed}, now version {which}, temporaries {left:?}",
            delay.as_millis()
        );
        current = which;
    }
    // A last, uninterrupted run: the new version, and no temporary left.
    assert!(!merge_killed_after(
        &out,
        ["1", "0.5"][1 - current],
        &[],
        Duration::from_secs(60)
    ));
    assert_eq!(tree(&out), versions[1 - current]);
    assert_eq!(temporaries(tmp.path()), Vec::<String>::new());
    assert_eq!(names(tmp.path()), vec!["merged"]);
    eprintln!(
        "{killed} of {KILLS} runs killed, {mid_write} during the write, {flipped} after the swap"
    );
    assert!(
        killed >= KILLS / 2 && mid_write >= 3,
        "only {killed} kills, {mid_write} during the write: the test proves little (machine too slow or too fast?)"
    );
}

/// The same into a directory that also holds a file lorakit did not write (`--overwrite`):
/// the directory is never swapped, the foreign file is never touched, and after every kill each
/// of lorakit's files is whole (the old or the new version of that file).
#[test]
fn sigkill_while_merge_replaces_files_beside_a_foreign_one_never_touches_it() {
    const KILLS: usize = 15;
    let tmp = tempfile::tempdir().unwrap();
    let (versions, mut took) = two_versions(tmp.path());
    let out = foreign_dir(&tmp.path().join("mixed"), &[]);
    let notes = std::fs::read(out.join("notes.txt")).unwrap();
    assert!(!merge_killed_after(
        &out,
        "1",
        &["--overwrite"],
        Duration::from_secs(60)
    ));
    let mut rng = rand::rngs::StdRng::seed_from_u64(1818);
    let mut killed = 0;
    for k in 0..KILLS {
        let delay = took.mul_f64(rng.random_range(0.2..1.1));
        let finished = merge_killed_or_timed(&out, ["0.5", "1"][k % 2], &["--overwrite"], delay);
        killed += finished.is_none() as usize;
        took = finished.unwrap_or(took);
        assert_eq!(
            std::fs::read(out.join("notes.txt")).unwrap(),
            notes,
            "kill {k}: the foreign file changed"
        );
        for (name, bytes) in tree(&out) {
            if name == MARKER {
                let m: lorakit::io::output::Marker = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| panic!("kill {k}: the marker is not whole: {e}"));
                assert!(!m.files.contains(&"notes.txt".to_string()));
                continue;
            }
            if name == "notes.txt" || name.contains(".lorakit-") {
                continue;
            }
            assert!(
                versions.iter().any(|v| v.get(&name) == Some(&bytes)),
                "kill {k}: {name} is neither version's"
            );
        }
        let left: Vec<String> = temporaries(tmp.path())
            .into_iter()
            .chain(temporaries(&out))
            .collect();
        assert!(
            left.iter()
                .all(|n| n.contains(".lorakit-tmp.") || n.contains(".lorakit-old.")),
            "{left:?}"
        );
    }
    assert!(!merge_killed_after(
        &out,
        "0.5",
        &["--overwrite"],
        Duration::from_secs(60)
    ));
    let mut want = versions[1].clone();
    want.insert("notes.txt".into(), notes);
    assert_eq!(tree(&out), want);
    assert_eq!(temporaries(tmp.path()), Vec::<String>::new());
    assert_eq!(temporaries(&out), Vec::<String>::new());
    assert!(killed >= KILLS / 2, "only {killed} of {KILLS} runs killed");
}
