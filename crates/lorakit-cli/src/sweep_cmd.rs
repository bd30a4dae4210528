//! `lorakit sweep`: a grid of LoRA runs on one task (see `lorakit::sweep`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use lorakit::sweep::{
    load_config, per_rank_counts, plan_cells, prepare_sweep_output, run_sweep, SweepEvent,
};

use crate::{open_model, resolve_model};

#[derive(Args)]
pub struct SweepArgs {
    /// The sweep's TOML file ([train], [grid], optional [budget]; see README).
    #[arg(long)]
    config: PathBuf,
    /// Output directory [default: the config's `out`].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Base model [default: the config's train.model, else the fetched SmolLM2-135M-Instruct].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print the cells and their parameter counts, train nothing.
    #[arg(long)]
    dry_run: bool,
    /// Start over in an --out holding an earlier sweep (only its files are removed), or write
    /// into a directory lorakit did not write (its other files are kept). Also a config key.
    #[arg(long)]
    overwrite: bool,
}

pub fn cmd_sweep(a: SweepArgs) -> Result<()> {
    let mut cfg = load_config(&a.config)?;
    let out = a.out.clone().or_else(|| cfg.out.clone()).with_context(|| {
        format!(
            "{}: no output directory: set `out` or give --out",
            a.config.display()
        )
    })?;
    let model_path = resolve_model(a.model.clone().or_else(|| cfg.train.model.clone()))?;
    cfg.train.model = Some(model_path.clone());
    // Checked before anything loads or trains (an earlier sweep there is continued).
    let mut inputs = vec![
        ("--config", a.config.as_path()),
        ("the model", model_path.as_path()),
    ];
    for (what, p) in [
        ("train.data", &cfg.train.data),
        ("train.eval_data", &cfg.train.eval_data),
    ] {
        if let Some(p) = p {
            inputs.push((what, p.as_path()));
        }
    }
    let output = prepare_sweep_output(&out, &inputs, a.overwrite || cfg.overwrite)?;
    let mut loaded = open_model(Some(model_path.clone()))?;
    // Everything is checked before the first cell trains.
    let cells = plan_cells(&cfg, &loaded.model.config, &a.config)?;
    cfg.train.apply_precision(&mut loaded.model)?;
    eprintln!("sweep: {} cells into {}", cells.len(), out.display());
    for (t, n) in per_rank_counts(&cells) {
        eprintln!("  {t}: {n} trainable parameters per unit of rank");
    }
    for c in &cells {
        eprintln!(
            "  {} ({} trainable parameters; {:?})",
            c.id, c.trainable_params, c.tables
        );
    }
    if a.dry_run {
        return Ok(());
    }
    let results = run_sweep(
        &loaded,
        &model_path.display().to_string(),
        &cfg,
        &cells,
        &output,
        |ev| match ev {
            SweepEvent::Skipped(r) => eprintln!("[done] {} (finished before; skipped)", r.id),
            SweepEvent::Started { index, total, cell } => {
                eprintln!("[{}/{}] {} ...", index + 1, total, cell.id)
            }
            SweepEvent::Finished(r) => match &r.error {
                None => eprintln!(
                    "       eval loss {} ({:.0} s)",
                    r.eval_loss.map_or("-".into(), |l| format!("{l:.4}")),
                    r.seconds
                ),
                Some(e) => eprintln!("       FAILED: {e}"),
            },
        },
    )?;
    let failed = results.iter().filter(|r| r.status == "failed").count();
    eprintln!(
        "sweep done: {} cells, {} failed; {}/results.csv and results.md",
        results.len(),
        failed,
        out.display()
    );
    Ok(())
}
