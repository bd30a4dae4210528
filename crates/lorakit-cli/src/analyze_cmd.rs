//! `lorakit analyze subspace` and `lorakit analyze amplification`: the LoRA paper's
//! sections 7.2 and 7.3 on adapters trained by lorakit (or PEFT).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use lorakit::analysis::{amplification, load_factors, subspace};
use lorakit::lora::ModuleKind;

use crate::{open_model, resolve_model};

#[derive(Args)]
pub struct AnalyzeArgs {
    #[command(subcommand)]
    what: Analysis,
}

#[derive(Subcommand)]
enum Analysis {
    /// Normalised subspace similarity φ(i, j) between two adapters' top singular directions,
    /// and against a random Gaussian matrix: similarity.csv, heatmaps, summary.txt.
    Subspace(SubspaceArgs),
    /// ‖UᵀW0V‖_F for ΔW's top-r directions beside ‖ΔW‖_F (the amplification factor), W0's own
    /// and random directions: amplification.csv and a table.
    Amplification(AmplificationArgs),
}

#[derive(Args)]
struct SubspaceArgs {
    /// First PEFT adapter directory.
    #[arg(long)]
    a: PathBuf,
    /// Second PEFT adapter directory (any rank).
    #[arg(long)]
    b: PathBuf,
    /// Only this module (q_proj, v_proj, ...).
    #[arg(long)]
    module: Option<String>,
    /// Only this layer.
    #[arg(long)]
    layer: Option<usize>,
    /// A: right singular vectors of lora_A (input space); B: left singular vectors of lora_B.
    #[arg(long, default_value = "A")]
    matrix: String,
    /// Seed of the random baseline matrices.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Names of the two adapters in the summary and heatmaps [default: their directory names].
    #[arg(long)]
    label_a: Option<String>,
    #[arg(long)]
    label_b: Option<String>,
    #[arg(long)]
    out: PathBuf,
    /// Write into a directory lorakit did not write (replacing only the files this writes).
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct AmplificationArgs {
    /// The base model the adapter was trained on [default: the fetched SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    adapter: PathBuf,
    /// Only this module.
    #[arg(long)]
    module: Option<String>,
    /// Only this layer.
    #[arg(long)]
    layer: Option<usize>,
    /// Seed of the random directions.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write amplification.csv and amplification.md here (the table is printed either way).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write into a directory lorakit did not write (replacing only the files this writes).
    #[arg(long, requires = "out")]
    overwrite: bool,
}

pub fn cmd_analyze(a: AnalyzeArgs) -> Result<()> {
    match a.what {
        Analysis::Subspace(s) => cmd_subspace(s),
        Analysis::Amplification(s) => cmd_amplification(s),
    }
}

fn module_arg(m: &Option<String>) -> Result<Option<ModuleKind>> {
    m.as_deref()
        .map(|name| {
            ModuleKind::from_name(name).with_context(|| {
                format!("--module {name}: not a Llama linear module (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
            })
        })
        .transpose()
}

fn label(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn cmd_subspace(a: SubspaceArgs) -> Result<()> {
    let which: subspace::Factor = a.matrix.parse()?;
    let module = module_arg(&a.module)?;
    let out = subspace::prepare_output(
        &a.out,
        &[("--a", a.a.as_path()), ("--b", a.b.as_path())],
        a.overwrite,
    )?;
    let f1 =
        load_factors(&a.a).with_context(|| format!("cannot read adapter {}", a.a.display()))?;
    let f2 =
        load_factors(&a.b).with_context(|| format!("cannot read adapter {}", a.b.display()))?;
    let results = subspace::compare(&f1, &f2, module, a.layer, which, a.seed)?;
    let la = a.label_a.clone().unwrap_or_else(|| label(&a.a));
    let lb = a.label_b.clone().unwrap_or_else(|| label(&a.b));
    let pngs = subspace::write_outputs(&out, &results, &la, &lb, which)?;
    print!("{}", subspace::summary(&results, &la, &lb, which));
    eprintln!(
        "wrote {}/similarity.csv, similarity_random.csv, summary.txt and {} heatmap(s)",
        a.out.display(),
        pngs.len()
    );
    Ok(())
}

fn cmd_amplification(a: AmplificationArgs) -> Result<()> {
    let module = module_arg(&a.module)?;
    let model = resolve_model(a.model)?;
    let out = match &a.out {
        Some(out) => Some(amplification::prepare_output(
            out,
            &[
                ("--adapter", a.adapter.as_path()),
                ("--model", model.as_path()),
            ],
            a.overwrite,
        )?),
        None => None,
    };
    let loaded = open_model(Some(model))?;
    let mut factors = load_factors(&a.adapter)
        .with_context(|| format!("cannot read adapter {}", a.adapter.display()))?;
    factors.retain(|id, _| {
        module.is_none_or(|m| m == id.kind) && a.layer.is_none_or(|l| l == id.layer)
    });
    anyhow::ensure!(
        !factors.is_empty(),
        "the adapter has no module matching --module / --layer"
    );
    let rows = amplification::analyze(&loaded.model, &factors, a.seed)?;
    let table = amplification::to_table(&rows);
    print!("{table}");
    if let Some(out) = &out {
        amplification::write_outputs(out, &rows)?;
        eprintln!(
            "wrote {}/amplification.csv and amplification.md",
            out.shown().display()
        );
    }
    Ok(())
}
