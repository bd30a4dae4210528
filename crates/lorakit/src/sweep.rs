//! `lorakit sweep`: the LoRA paper's grids (Hu et al., 2021, tables 5 and 6) on one task.
//!
//! A sweep config (TOML) names the shared training options, a grid over rank, target set,
//! alpha, learning rate and seed, and optionally a fixed parameter budget for the
//! target-set table. Every cell trains one adapter into `out/cells/<id>/` and is evaluated on
//! held-out data; a finished cell leaves `result.json` there and is skipped on a rerun, a failed
//! cell is recorded and the sweep goes on. After every cell `results.csv` and `results.md` are
//! rewritten (atomically), so an interrupted sweep still shows what it has.
//!
//! ```toml
//! out = "runs/sweep"
//! metric = "loss"                 # held-out loss (perplexity is reported beside it)
//! [train]                         # any `lorakit train` key shared by every cell
//! data = "data/ner/train.jsonl"
//! eval_data = "data/ner/validation.jsonl"
//! steps = 60
//! [grid]                          # the rank table: every r × every target set
//! r = [1, 2, 4, 8, 64]
//! targets = ["q_proj", "q_proj,v_proj", "q_proj,k_proj,v_proj,o_proj"]
//! alpha = [16]                    # optional, default: train.alpha
//! lr = [2e-4]                     # optional, default: train.lr
//! seed = [0]                      # optional, default: train.seed
//! [budget]                        # optional: the target-set table at a fixed budget
//! r = 8                           # the budget is what r = 8 on `reference` costs
//! reference = "q_proj"
//! targets = ["q_proj", "k_proj", "v_proj", "o_proj", "q_proj,k_proj", "q_proj,v_proj", "q_proj,k_proj,v_proj,o_proj"]
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;
use crate::io::output::{prepare_output_dir_with, OutputDir};
use crate::lora::config::{LoraConfig, TargetModules};
use crate::model::{Config, LoadedModel};
use crate::train::trainer::{train, EarlierRun, TrainOptions, TrainOutput, TrainPlan};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// Output directory (the command line's --out wins).
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// Start over in an `out` holding an earlier sweep (its cells and tables are removed), or
    /// use one lorakit did not write (its other files kept), instead of continuing / refusing.
    #[serde(default)]
    pub overwrite: bool,
    /// What ranks cells: only `loss` (held-out loss) for now; generation metrics can join here.
    #[serde(default = "default_metric")]
    pub metric: String,
    /// Options shared by every cell, with `lorakit train`'s keys.
    #[serde(default)]
    pub train: TrainOptions,
    pub grid: Grid,
    #[serde(default)]
    pub budget: Option<Budget>,
}

fn default_metric() -> String {
    "loss".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    pub r: Vec<usize>,
    /// Target sets as `--targets` takes them (`q_proj,v_proj`, `all-linear`, a regex).
    pub targets: Vec<String>,
    #[serde(default)]
    pub alpha: Option<Vec<f64>>,
    #[serde(default)]
    pub lr: Option<Vec<f64>>,
    #[serde(default)]
    pub seed: Option<Vec<u64>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub targets: Vec<String>,
    /// The budget is the trainable-parameter count of rank `r` on `reference`.
    #[serde(default = "default_budget_r")]
    pub r: usize,
    #[serde(default = "default_reference")]
    pub reference: String,
}

fn default_budget_r() -> usize {
    8
}
fn default_reference() -> String {
    "q_proj".into()
}

/// Which table of `results.md` a cell belongs to (a cell can be in both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Table {
    Rank,
    Budget,
}

/// One training run of the sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// Directory name under `cells/`; a pure function of the settings, which makes resuming work.
    pub id: String,
    pub targets: String,
    pub r: usize,
    pub alpha: f64,
    pub lr: f64,
    pub seed: u64,
    pub tables: Vec<Table>,
    /// r · (in + out) summed over the adapted matrices.
    pub trainable_params: usize,
}

/// What a finished (or failed) cell reports; `result.json` in its directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellResult {
    pub id: String,
    pub targets: String,
    pub r: usize,
    pub alpha: f64,
    pub lr: f64,
    pub seed: u64,
    pub trainable_params: usize,
    pub metric: String,
    pub metric_value: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eval_perplexity: Option<f64>,
    /// Loss of the last optimiser step (training batch).
    pub train_loss: Option<f64>,
    pub seconds: f64,
    /// `ok`, `failed` (with `error`) or `pending` (not run yet).
    pub status: String,
    pub error: Option<String>,
}

/// Parses and checks a sweep config file: unknown keys anywhere are errors naming the key
/// and line.
pub fn load_config(path: &Path) -> Result<SweepConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let at = line.map_or(String::new(), |l| format!("line {l}: "));
        Error::format(
            path,
            format!("{at}{}", e.message().trim().replace('\n', " ")),
        )
    })
}

/// Trainable parameters of `targets` at rank `r` on a model: Σ r·(in + out) over the
/// modules the target set resolves to (with the base options' layer selection).
/// Errors name `key` in `source` when the target set matches nothing.
pub fn parameter_count(
    model: &Config,
    targets: &str,
    r: usize,
    layers: Option<&[usize]>,
    source: &Path,
    key: &str,
) -> Result<usize> {
    let lc = LoraConfig {
        r,
        target_modules: LoraConfig::parse_targets(targets),
        layers_to_transform: layers.map(|l| l.to_vec()),
        ..LoraConfig::default()
    };
    if matches!(&lc.target_modules, TargetModules::Names(v) if v.is_empty()) {
        return Err(Error::config(source, key, "a target set is empty"));
    }
    let resolved = lc
        .resolve_kinds(model.num_layers, model.module_kinds(), source)
        .map_err(|e| match e {
            Error::Config { msg, .. } => {
                Error::config(source, key, format!("\"{targets}\": {msg}"))
            }
            other => other,
        })?;
    Ok(resolved
        .iter()
        .map(|t| {
            let (out, inp) = model.module_shape(t.id.kind);
            t.r * (out + inp)
        })
        .sum())
}

/// The rank whose cost on `targets` is closest to `budget` (ties: the smaller rank), ≥ 1.
pub fn rank_for_budget(budget: usize, per_rank: usize) -> usize {
    let lo = (budget / per_rank.max(1)).max(1);
    let hi = lo + 1;
    if budget.abs_diff(hi * per_rank) < budget.abs_diff(lo * per_rank) {
        hi
    } else {
        lo
    }
}

/// A directory-safe name for a target set: `q_proj,v_proj` -> `q_proj+v_proj`.
fn targets_slug(t: &str) -> String {
    t.split(',')
        .map(|s| s.trim())
        .collect::<Vec<_>>()
        .join("+")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '+' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Every cell of the sweep, validated against the model before anything trains.
/// `source` is the config file (named in errors).
pub fn plan_cells(cfg: &SweepConfig, model: &Config, source: &Path) -> Result<Vec<Cell>> {
    if cfg.metric != "loss" {
        return Err(Error::config(
            source,
            "metric",
            format!(
                "\"{}\" is not supported; the sweep ranks cells by held-out \"loss\"",
                cfg.metric
            ),
        ));
    }
    let t = &cfg.train;
    if t.eval_data.is_none() {
        return Err(Error::config(
            source,
            "train.eval_data",
            "missing: every cell is evaluated on held-out data",
        ));
    }
    if t.data.is_none() {
        return Err(Error::config(source, "train.data", "missing"));
    }
    for (key, p) in [("train.data", &t.data), ("train.eval_data", &t.eval_data)] {
        if let Some(p) = p {
            if !p.is_file() {
                return Err(Error::config(
                    source,
                    key,
                    format!("{} is not a file", p.display()),
                ));
            }
        }
    }
    if t.steps.is_some() && t.epochs.is_some() {
        return Err(Error::config(
            source,
            "train.steps",
            "set steps or epochs, not both",
        ));
    }
    for (key, set) in [
        ("train.out", t.out.is_some()),
        ("train.overwrite", t.overwrite),
        ("train.init_adapter", t.init_adapter.is_some()),
    ] {
        if set {
            return Err(Error::config(
                source,
                key,
                "is decided per cell by the sweep; remove it",
            ));
        }
    }
    let g = &cfg.grid;
    let alphas = g.alpha.clone().unwrap_or_else(|| vec![t.alpha]);
    let lrs = g.lr.clone().unwrap_or_else(|| vec![t.lr]);
    let seeds = g.seed.clone().unwrap_or_else(|| vec![t.seed]);
    for (key, empty) in [
        ("grid.r", g.r.is_empty()),
        ("grid.targets", g.targets.is_empty()),
        ("grid.alpha", alphas.is_empty()),
        ("grid.lr", lrs.is_empty()),
        ("grid.seed", seeds.is_empty()),
    ] {
        if empty {
            return Err(Error::config(
                source,
                key,
                "is empty: the grid has no cell to train",
            ));
        }
    }
    if let Some(&bad) = g.r.iter().find(|&&r| r == 0) {
        return Err(Error::config(
            source,
            "grid.r",
            format!("rank {bad}: must be ≥ 1"),
        ));
    }
    if let Some(bad) = alphas.iter().find(|a| !(a.is_finite() && **a > 0.0)) {
        return Err(Error::config(
            source,
            "grid.alpha",
            format!("{bad}: must be > 0"),
        ));
    }
    if let Some(bad) = lrs.iter().find(|a| !(a.is_finite() && **a > 0.0)) {
        return Err(Error::config(
            source,
            "grid.lr",
            format!("{bad}: must be > 0"),
        ));
    }
    let layers = t.layers.as_deref();
    // (targets, r, table) before the alpha × lr × seed product; a cell in both tables once.
    let mut runs: Vec<(String, usize, usize, Table)> = Vec::new();
    if let Some(b) = &cfg.budget {
        if b.targets.is_empty() {
            return Err(Error::config(source, "budget.targets", "is empty"));
        }
        if b.r == 0 {
            return Err(Error::config(source, "budget.r", "must be ≥ 1"));
        }
        let budget = parameter_count(model, &b.reference, b.r, layers, source, "budget.reference")?;
        for ts in &b.targets {
            let per_rank = parameter_count(model, ts, 1, layers, source, "budget.targets")?;
            let r = rank_for_budget(budget, per_rank);
            runs.push((ts.clone(), r, per_rank * r, Table::Budget));
        }
    }
    for ts in &g.targets {
        let per_rank = parameter_count(model, ts, 1, layers, source, "grid.targets")?;
        for &r in &g.r {
            runs.push((ts.clone(), r, per_rank * r, Table::Rank));
        }
    }
    let mut cells: Vec<Cell> = Vec::new();
    for (ts, r, params, table) in runs {
        for &alpha in &alphas {
            for &lr in &lrs {
                for &seed in &seeds {
                    let id = format!("{}-r{r}-a{alpha}-lr{lr:e}-s{seed}", targets_slug(&ts));
                    if let Some(c) = cells.iter_mut().find(|c| c.id == id) {
                        if !c.tables.contains(&table) {
                            c.tables.push(table);
                        }
                        continue;
                    }
                    cells.push(Cell {
                        id,
                        targets: ts.clone(),
                        r,
                        alpha,
                        lr,
                        seed,
                        tables: vec![table],
                        trainable_params: params,
                    });
                }
            }
        }
    }
    Ok(cells)
}

/// What the CLI hears while the sweep runs.
pub enum SweepEvent<'a> {
    Skipped(&'a CellResult),
    Started {
        index: usize,
        total: usize,
        cell: &'a Cell,
    },
    Finished(&'a CellResult),
}

const RESULT_FILE: &str = "result.json";

impl CellResult {
    fn pending(c: &Cell, metric: &str) -> CellResult {
        CellResult {
            id: c.id.clone(),
            targets: c.targets.clone(),
            r: c.r,
            alpha: c.alpha,
            lr: c.lr,
            seed: c.seed,
            trainable_params: c.trainable_params,
            metric: metric.into(),
            metric_value: None,
            eval_loss: None,
            eval_perplexity: None,
            train_loss: None,
            seconds: 0.0,
            status: "pending".into(),
            error: None,
        }
    }
}

/// Reads a finished cell's `result.json`; anything unreadable counts as not finished.
fn finished(dir: &Path, cell: &Cell) -> Option<CellResult> {
    let text = std::fs::read_to_string(dir.join(RESULT_FILE)).ok()?;
    let r: CellResult = serde_json::from_str(&text).ok()?;
    (r.status == "ok" && r.id == cell.id).then_some(r)
}

/// Trains and evaluates one cell into `dir` (emptied first: a half-run cell starts over).
fn run_cell(
    loaded: &LoadedModel,
    model_name: &str,
    cfg: &SweepConfig,
    cell: &Cell,
    dir: &Path,
) -> Result<CellResult> {
    // The cell directory is inside the sweep's own `cells/`: all of it is lorakit's.
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut o = cfg.train.clone();
    o.r = cell.r;
    o.alpha = cell.alpha;
    o.lr = cell.lr;
    o.seed = cell.seed;
    o.targets = cell.targets.clone();
    o.out = Some(dir.to_path_buf());
    let start = Instant::now();
    let plan = TrainPlan::new(o, loaded, model_name)?;
    let actual = plan.trainable_parameters(&loaded.model.config);
    if actual != cell.trainable_params {
        return Err(Error::Invalid(format!(
            "cell {}: the adapter has {actual} trainable parameters, the plan expected {}",
            cell.id, cell.trainable_params
        )));
    }
    let output = TrainOutput::prepare(dir, "train", &[], EarlierRun::Refuse, false)?;
    let summary = train(loaded, plan, &output, |_| {})?;
    let mut res = CellResult::pending(cell, &cfg.metric);
    res.eval_loss = summary.eval_loss;
    res.eval_perplexity = summary.eval_loss.map(f64::exp);
    res.metric_value = summary.eval_loss;
    res.train_loss = summary.final_loss;
    res.trainable_params = summary.trainable_parameters;
    res.seconds = start.elapsed().as_secs_f64();
    res.status = "ok".into();
    let json = serde_json::to_string_pretty(&res)
        .map_err(|e| Error::format(dir.join(RESULT_FILE), e.to_string()))?;
    write_atomic(&dir.join(RESULT_FILE), json.as_bytes())?;
    Ok(res)
}

/// The top-level names a sweep writes in its output directory.
pub const SWEEP_OUTPUT_FILES: [&str; 3] = ["cells", "results.csv", "results.md"];

/// A sweep directory from before the output marker: nothing but the sweep's names, with its
/// `results.csv` (or at least `cells/`).
pub fn legacy_sweep_output(dir: &Path, entries: &[String]) -> Option<Vec<String>> {
    if !entries
        .iter()
        .all(|n| SWEEP_OUTPUT_FILES.contains(&n.as_str()))
    {
        return None;
    }
    let header = std::fs::read_to_string(dir.join("results.csv"))
        .ok()
        .is_some_and(|t| t.lines().next() == Some(CSV_HEADER));
    (header || dir.join("cells").is_dir()).then(|| entries.to_vec())
}

/// Checks `out` as a sweep's output directory (see [`crate::io::output`]): missing, empty or an
/// earlier sweep (continued: finished cells are skipped; started over with `overwrite`);
/// anything else is refused unless `overwrite`, which then replaces only the sweep's names.
pub fn prepare_sweep_output(
    out: &Path,
    inputs: &[(&str, &Path)],
    overwrite: bool,
) -> Result<OutputDir> {
    prepare_output_dir_with(out, "sweep", inputs, overwrite, &legacy_sweep_output)
}

/// Runs every cell not finished yet, in order; rewrites `results.csv` / `results.md` in `out`
/// after each. A failing cell is recorded (status `failed`) and does not stop the sweep.
pub fn run_sweep(
    loaded: &LoadedModel,
    model_name: &str,
    cfg: &SweepConfig,
    cells: &[Cell],
    out: &OutputDir,
    mut on_event: impl FnMut(SweepEvent),
) -> Result<Vec<CellResult>> {
    out.begin(&SWEEP_OUTPUT_FILES, out.overwrite())?;
    let out = out.path();
    std::fs::create_dir_all(out.join("cells")).map_err(|e| Error::io(out, e))?;
    let mut results: Vec<CellResult> = cells
        .iter()
        .map(|c| CellResult::pending(c, &cfg.metric))
        .collect();
    for (k, cell) in cells.iter().enumerate() {
        let dir = out.join("cells").join(&cell.id);
        if let Some(r) = finished(&dir, cell) {
            on_event(SweepEvent::Skipped(&r));
            results[k] = r;
            continue;
        }
        on_event(SweepEvent::Started {
            index: k,
            total: cells.len(),
            cell,
        });
        let t0 = Instant::now();
        results[k] = match run_cell(loaded, model_name, cfg, cell, &dir) {
            Ok(r) => r,
            Err(e) => {
                let mut r = CellResult::pending(cell, &cfg.metric);
                r.status = "failed".into();
                r.error = Some(e.to_string());
                r.seconds = t0.elapsed().as_secs_f64();
                r
            }
        };
        on_event(SweepEvent::Finished(&results[k]));
        write_reports(out, cfg, cells, &results)?;
    }
    write_reports(out, cfg, cells, &results)?;
    Ok(results)
}

pub const CSV_HEADER: &str = "cell,targets,r,alpha,lr,seed,trainable_params,metric,metric_value,eval_loss,eval_perplexity,train_loss,seconds,status,error";

fn opt(v: Option<f64>) -> String {
    v.map_or(String::new(), |x| format!("{x:.6}"))
}

pub fn results_csv(results: &[CellResult]) -> String {
    use crate::analysis::csv_field;
    let mut s = format!("{CSV_HEADER}\n");
    for r in results {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{:.1},{},{}",
            csv_field(&r.id),
            csv_field(&r.targets),
            r.r,
            r.alpha,
            r.lr,
            r.seed,
            r.trainable_params,
            r.metric,
            opt(r.metric_value),
            opt(r.eval_loss),
            opt(r.eval_perplexity),
            opt(r.train_loss),
            r.seconds,
            r.status,
            csv_field(r.error.as_deref().unwrap_or(""))
        );
    }
    s
}

/// Mean and count of the finished cells' metric.
fn mean(vals: &[f64]) -> Option<(f64, usize)> {
    (!vals.is_empty()).then(|| (vals.iter().sum::<f64>() / vals.len() as f64, vals.len()))
}

fn fmt_mean(m: Option<(f64, usize)>) -> String {
    match m {
        Some((v, 1)) => format!("{v:.4}"),
        Some((v, n)) => format!("{v:.4} (n={n})"),
        None => "–".into(),
    }
}

/// `results.md`: the paper-shaped tables (mean over seeds of the held-out loss) and every cell.
pub fn results_markdown(cfg: &SweepConfig, cells: &[Cell], results: &[CellResult]) -> String {
    let mut s = String::from("# Sweep results\n\n");
    let _ = writeln!(
        s,
        "Metric: held-out {} (lower is better), mean over seeds; perplexity = exp(loss). {} of {} cells finished, {} failed.\n",
        cfg.metric,
        results.iter().filter(|r| r.status == "ok").count(),
        results.len(),
        results.iter().filter(|r| r.status == "failed").count()
    );
    let metric_of = |pred: &dyn Fn(&Cell) -> bool| -> Vec<f64> {
        cells
            .iter()
            .zip(results)
            .filter(|(c, r)| pred(c) && r.status == "ok")
            .filter_map(|(_, r)| r.metric_value)
            .collect()
    };
    let mut combos: Vec<(f64, f64)> = Vec::new();
    for c in cells {
        if !combos.contains(&(c.alpha, c.lr)) {
            combos.push((c.alpha, c.lr));
        }
    }
    if let Some(b) = &cfg.budget {
        let _ = writeln!(
            s,
            "## Target sets at a fixed budget\n\nBudget: r = {} on {} ; r chosen per target set to come as close as possible.\n",
            b.r, b.reference
        );
        for &(alpha, lr) in &combos {
            let _ = writeln!(s, "α = {alpha}, lr = {lr:e}\n");
            let _ = writeln!(
                s,
                "| targets | r | trainable params | loss | perplexity |\n|---|---:|---:|---:|---:|"
            );
            for ts in &b.targets {
                let Some(c) = cells.iter().find(|c| {
                    &c.targets == ts
                        && c.tables.contains(&Table::Budget)
                        && c.alpha == alpha
                        && c.lr == lr
                }) else {
                    continue;
                };
                let vals = metric_of(&|x: &Cell| {
                    x.targets == c.targets && x.r == c.r && x.alpha == alpha && x.lr == lr
                });
                let m = mean(&vals);
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} |",
                    ts,
                    c.r,
                    c.trainable_params,
                    fmt_mean(m),
                    m.map_or("–".into(), |(v, _)| format!("{:.3}", v.exp()))
                );
            }
            s.push('\n');
        }
    }
    let g = &cfg.grid;
    let _ = writeln!(s, "## Rank r per target set\n");
    for &(alpha, lr) in &combos {
        let _ = writeln!(s, "α = {alpha}, lr = {lr:e}: held-out loss\n");
        s.push_str("| targets |");
        for r in &g.r {
            let _ = write!(s, " r = {r} |");
        }
        s.push_str("\n|---|");
        for _ in &g.r {
            s.push_str("---:|");
        }
        s.push('\n');
        for ts in &g.targets {
            let _ = write!(s, "| {ts} |");
            for &r in &g.r {
                let vals = metric_of(&|x: &Cell| {
                    &x.targets == ts && x.r == r && x.alpha == alpha && x.lr == lr
                });
                let _ = write!(s, " {} |", fmt_mean(mean(&vals)));
            }
            s.push('\n');
        }
        s.push('\n');
    }
    let _ = writeln!(s, "## All cells\n\n| cell | trainable params | eval loss | perplexity | last train loss | seconds | status |\n|---|---:|---:|---:|---:|---:|---|");
    let f = |v: Option<f64>| v.map_or("–".into(), |x| format!("{x:.4}"));
    for r in results {
        let status = match &r.error {
            Some(e) => format!("{}: {}", r.status, e.replace('|', "\\|")),
            None => r.status.clone(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.0} | {} |",
            r.id,
            r.trainable_params,
            f(r.eval_loss),
            f(r.eval_perplexity),
            f(r.train_loss),
            r.seconds,
            status
        );
    }
    s
}

fn write_reports(
    out: &Path,
    cfg: &SweepConfig,
    cells: &[Cell],
    results: &[CellResult],
) -> Result<()> {
    write_atomic(&out.join("results.csv"), results_csv(results).as_bytes())?;
    write_atomic(
        &out.join("results.md"),
        results_markdown(cfg, cells, results).as_bytes(),
    )
}

/// Parameter counts per target set at rank 1, for printing the plan.
pub fn per_rank_counts(cells: &[Cell]) -> BTreeMap<String, usize> {
    cells
        .iter()
        .map(|c| (c.targets.clone(), c.trainable_params / c.r))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_rank_is_the_closest() {
        // SmolLM2: q/o cost 1152 per rank and layer, k/v 768.
        let budget = 8 * 1152;
        assert_eq!(rank_for_budget(budget, 1152), 8);
        assert_eq!(rank_for_budget(budget, 768), 12);
        assert_eq!(rank_for_budget(budget, 1152 + 768), 5); // 9600 vs 7680
        assert_eq!(rank_for_budget(budget, 2 * 1152 + 2 * 768), 2); // 7680 vs 11520
        assert_eq!(rank_for_budget(10, 1000), 1);
    }

    #[test]
    fn slugs_are_directory_safe() {
        assert_eq!(targets_slug("q_proj, v_proj"), "q_proj+v_proj");
        assert_eq!(targets_slug(".*q_proj"), "__q_proj");
    }
}
