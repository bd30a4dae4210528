//! Data-parallel LoRA training under `mpirun` (the `mpi` feature; `scripts/install-mpi.sh`
//! installs OpenMPI, and the first test builds `lorakit-mpi`, the CLI with MPI compiled in).
//! A run on 2 ranks must produce the bytes of the same run in one process: the per-step losses,
//! gradient norms and the adapter; a checkpoint resumes exactly on another rank count; a rank
//! that dies stops the job with a non-zero exit, and its last checkpoint still loads.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::common::*;

/// `lorakit-mpi`, built once per test run beside the plain binary (same profile, features and
/// target directory, so only the crates that MPI adds are compiled: not the engine).
fn mpi_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let install = Command::new(repo_root().join("scripts/install-mpi.sh"))
            .output()
            .expect("run scripts/install-mpi.sh");
        assert!(
            install.status.success(),
            "install-mpi.sh: {}",
            stderr(&install)
        );
        let plain = Path::new(env!("CARGO_BIN_EXE_lorakit"));
        let profile_dir = plain.parent().unwrap();
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build
            .args([
                "build",
                "-p",
                "lorakit-cli",
                "--features",
                "mpi",
                "--bin",
                "lorakit-mpi",
            ])
            .arg("--target-dir")
            .arg(profile_dir.parent().unwrap())
            .current_dir(repo_root());
        // The profile `cargo test` built the library and the plain binary with (test, or bench
        // under --release), so that this build reuses them and compiles only MPI's crates and
        // the CLI.
        let profile = if profile_dir.file_name().unwrap() == "release" {
            "bench"
        } else {
            "test"
        };
        build.args(["--profile", profile]);
        let o = build.output().expect("run cargo build");
        assert!(o.status.success(), "building lorakit-mpi: {}", stderr(&o));
        profile_dir.join("lorakit-mpi")
    })
}

/// One training run at a time: they use both cores.
static RUNS: Mutex<()> = Mutex::new(());

/// `args` for `lorakit train` on `ranks` ranks (1: the plain binary, no mpirun), one thread each.
fn train_cmd(ranks: usize, args: &[&str]) -> Command {
    let mut c = if ranks == 1 {
        Command::new(env!("CARGO_BIN_EXE_lorakit"))
    } else {
        let mut c = Command::new("mpirun");
        c.args(["--oversubscribe", "-np", &ranks.to_string()]);
        c.args(["-x", "RAYON_NUM_THREADS", "--mca", "btl", "self,vader"]);
        c.arg(mpi_binary());
        c
    };
    c.arg("train").args(args).current_dir(repo_root());
    // The tests may run as root (CI containers); one thread per rank, as the README advises.
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1");
    c
}

fn run(ranks: usize, args: &[&str]) -> Output {
    let _one = RUNS.lock().unwrap_or_else(|e| e.into_inner());
    train_cmd(ranks, args).output().expect("start training")
}

fn data(dir: &Path) -> PathBuf {
    let p = dir.join("train.jsonl");
    let mut s = String::new();
    for i in 0..24 {
        let colour = ["red", "blue", "green", "yellow"][i % 4];
        let line = serde_json::json!({"prompt": format!("Item {i} of the list:"), "completion": format!(" the colour is {colour}, number {}", i * 7 % 11)});
        s.push_str(&line.to_string());
        s.push('\n');
    }
    std::fs::write(&p, s).unwrap();
    p
}

/// The shared arguments: the tiny Llama, LoRA r = 4 with dropout, batches of 2, 2 micro-batches
/// per step (one per rank on 2 ranks), clipping on.
fn args<'a>(data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    let tiny = Box::leak(
        fixture("tiny-llama")
            .to_str()
            .unwrap()
            .to_owned()
            .into_boxed_str(),
    );
    vec![
        "--model",
        tiny,
        "--data",
        data,
        "--out",
        out,
        "--r",
        "4",
        "--dropout",
        "0.1",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--steps",
        steps,
        "--lr",
        "5e-3",
        "--max-grad-norm",
        "1.0",
        "--precision",
        "f32",
        "--save-every",
        "5",
        "--quiet",
    ]
}

/// (loss, grad_norm) of every step, as the bits of the f64 values.
fn steps_of(out: &Path) -> Vec<(u64, u64, u64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap().to_bits(),
                v["grad_norm"].as_f64().unwrap().to_bits(),
            )
        })
        .collect()
}

fn adapter_bytes(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter_model.safetensors")).unwrap()
}

#[test]
fn two_ranks_give_the_bytes_of_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path());
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let (d, one_s, two_s) = (
        d.to_str().unwrap(),
        one.to_str().unwrap(),
        two.to_str().unwrap(),
    );
    let o = run(1, &args(d, one_s, "10"));
    assert!(o.status.success(), "1 process: {}", stderr(&o));
    let o = run(2, &args(d, two_s, "10"));
    assert!(o.status.success(), "2 ranks: {}", stderr(&o));
    let (a, b) = (steps_of(&one), steps_of(&two));
    assert_eq!(a.len(), 10);
    assert_eq!(a, b, "per-step (loss, gradient norm) bits differ");
    assert_eq!(
        adapter_bytes(&one),
        adapter_bytes(&two),
        "the adapters differ"
    );
    // Rank 0 alone wrote: the same files in both runs.
    let names = |p: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&one), names(&two));
}

/// Starts a long run, kills one of its processes once the first checkpoint exists, and returns
/// the killed job's exit status and how long it took to end after the kill.
fn kill_mid_run(ranks: usize, args: &[&str], out: &Path) -> (std::process::ExitStatus, Duration) {
    let _one = RUNS.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = train_cmd(ranks, args).spawn().expect("start training");
    let first = out.join("checkpoints/step-000005");
    let t0 = Instant::now();
    while !first.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint after 300 s"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before the kill"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The processes of this run: the rank(s) of lorakit(-mpi) whose command line names `out`.
    let exe = if ranks == 1 { "lorakit" } else { "lorakit-mpi" };
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            comm.trim() == exe && String::from_utf8_lossy(&cmd).contains(out.to_str().unwrap())
        })
        .collect();
    assert_eq!(pids.len(), ranks, "the run's processes: {pids:?}");
    let victim = *pids.iter().max().unwrap();
    let killed_at = Instant::now();
    unsafe_kill(victim);
    let t1 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t1.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("the job did not stop within 120 s of a rank's death");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, killed_at.elapsed())
}

fn unsafe_kill(pid: u32) {
    let o = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "kill {pid}: {}", stderr(&o));
}

fn newest_checkpoint(out: &Path) -> PathBuf {
    let mut v: Vec<PathBuf> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("step-")
        })
        .collect();
    v.sort();
    v.pop().expect("a checkpoint")
}

#[test]
fn a_dead_rank_stops_the_job_and_its_checkpoint_resumes_exactly_on_another_rank_count() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path());
    let d = d.to_str().unwrap();
    const STEPS: &str = "300";
    let reference = tmp.path().join("reference");
    let o = run(1, &args(d, reference.to_str().unwrap(), STEPS));
    assert!(o.status.success(), "reference: {}", stderr(&o));

    // 2 ranks, rank 1 killed; then 1 process resumes it.
    let out = tmp.path().join("killed-2");
    let a = args(d, out.to_str().unwrap(), STEPS);
    let (status, took) = kill_mid_run(2, &a, &out);
    assert!(!status.success(), "mpirun exited 0 after a rank was killed");
    eprintln!("2 ranks: rank killed, job ended in {took:?} with {status}");
    let ckpt = newest_checkpoint(&out);
    let config = lorakit::model::load_model(&fixture("tiny-llama"))
        .unwrap()
        .model
        .config;
    lorakit::lora::peft::Adapter::load(&ckpt, &config).expect("the last checkpoint loads");
    let mut resume = a.clone();
    resume.push("--resume");
    let o = run(1, &resume);
    assert!(o.status.success(), "resume on 1 process: {}", stderr(&o));
    assert_eq!(steps_of(&out), steps_of(&reference));
    assert_eq!(adapter_bytes(&out), adapter_bytes(&reference));

    // 1 process killed; then 2 ranks resume it.
    let out = tmp.path().join("killed-1");
    let a = args(d, out.to_str().unwrap(), STEPS);
    let (status, _) = kill_mid_run(1, &a, &out);
    assert!(!status.success());
    let mut resume = a.clone();
    resume.push("--resume");
    let o = run(2, &resume);
    assert!(o.status.success(), "resume on 2 ranks: {}", stderr(&o));
    assert_eq!(steps_of(&out), steps_of(&reference));
    assert_eq!(adapter_bytes(&out), adapter_bytes(&reference));
}

#[test]
fn steps_the_ranks_cannot_share_and_full_fine_tuning_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path());
    let out = tmp.path().join("run");
    let mut a = args(d.to_str().unwrap(), out.to_str().unwrap(), "4");
    let i = a.iter().position(|x| *x == "--grad-accum").unwrap();
    a[i + 1] = "3";
    let o = run(2, &a);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--grad-accum 3"), "{}", stderr(&o));

    let tiny = fixture("tiny-llama");
    let o = run(
        2,
        &[
            "--model",
            tiny.to_str().unwrap(),
            "--data",
            d.to_str().unwrap(),
            "--out",
            tmp.path().join("full").to_str().unwrap(),
            "--full",
            "--grad-accum",
            "2",
            "--quiet",
        ],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--full cannot run on several ranks"),
        "{}",
        stderr(&o)
    );
}

/// mpirun's multiple-program form: one `lorakit-mpi train` per rank, each with its own arguments.
fn run_per_rank(per_rank: &[Vec<&str>]) -> Output {
    let _one = RUNS.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "--mca", "btl", "self,vader"]);
    for (i, args) in per_rank.iter().enumerate() {
        if i > 0 {
            c.arg(":");
        }
        c.args(["-np", "1", "-x", "RAYON_NUM_THREADS"])
            .arg(mpi_binary())
            .arg("train")
            .args(args);
    }
    c.current_dir(repo_root())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("start mpirun")
}

#[test]
fn ranks_that_disagree_or_fail_before_training_stop_every_rank_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path());
    let other = tmp.path().join("other.jsonl");
    let text = std::fs::read_to_string(&d).unwrap();
    std::fs::write(&other, text.replacen("red", "crimson", 1)).unwrap();
    let out = tmp.path().join("run");
    let (d, other, out_s) = (
        d.to_str().unwrap(),
        other.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    // Rank 1 reads a different data file.
    let o = run_per_rank(&[args(d, out_s, "4"), args(other, out_s, "4")]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("rank(s) [1] disagree with rank 0 on the model, data and options"),
        "{}",
        stderr(&o)
    );
    assert!(!out.join("adapter_model.safetensors").exists());

    // Rank 0 refuses its output (a directory lorakit did not write); rank 1 says it stopped
    // because of rank 0 instead of waiting for it.
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let o = run(2, &args(d, foreign.to_str().unwrap(), "4"));
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("rank 1: stopping because rank(s) [0] failed"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(foreign.join("notes.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn a_plain_build_started_by_mpirun_says_it_has_no_mpi() {
    // mpirun starting the binary built without the feature: each rank refuses instead of
    // training alone into the same directory.
    let _ = mpi_binary(); // mpirun is installed
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path());
    let _one = RUNS.lock().unwrap_or_else(|e| e.into_inner());
    let o = Command::new("mpirun")
        .args([
            "--oversubscribe",
            "-np",
            "2",
            env!("CARGO_BIN_EXE_lorakit"),
            "train",
        ])
        .args(args(
            d.to_str().unwrap(),
            tmp.path().join("run").to_str().unwrap(),
            "2",
        ))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("built without MPI"), "{}", stderr(&o));
    assert!(!tmp.path().join("run").exists());
}
