//! `lorakit train` and `lorakit merge`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lorakit::io::output::prepare_output_dir;
use lorakit::train::parallel::{check_agreement, Collective, SingleProcess};
use lorakit::train::trainer::{
    train, train_model_on_rank, EarlierRun, Event, TrainOptions, TrainOutput, TrainPlan,
};

use crate::adapter_arg::parse_adapter_spec;
use crate::{open_model, resolve_model};

#[derive(Args)]
pub struct TrainArgs {
    /// A .gguf file or HF directory [default: the fetched SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data, JSONL: {"prompt","completion"}, {"messages"}, {"text"} or {"input_ids","labels"}.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Held-out JSONL for the eval loss.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Output directory: the adapter at its root, checkpoints/, metrics.jsonl, loss.png.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A TOML file with any of these options (flags given here win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue from the newest checkpoint under --out.
    #[arg(long)]
    resume: bool,
    /// Start over in an --out holding an earlier run (only its files are removed), or write into
    /// a directory lorakit did not write (its other files are kept).
    #[arg(long)]
    overwrite: bool,
    /// Start from this PEFT adapter (its own config is used).
    #[arg(long)]
    init_adapter: Option<PathBuf>,
    #[arg(long)]
    r: Option<usize>,
    #[arg(long)]
    alpha: Option<f64>,
    #[arg(long)]
    dropout: Option<f32>,
    /// Comma-separated module names (q_proj,v_proj), all-linear, or a regex over module paths.
    #[arg(long)]
    targets: Option<String>,
    /// Only these layers (PEFT's layers_to_transform), comma-separated.
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    #[arg(long)]
    use_rslora: bool,
    /// kaiming (PEFT's default) or gaussian (the paper's).
    #[arg(long)]
    init: Option<String>,
    #[arg(long, conflicts_with = "steps")]
    epochs: Option<usize>,
    #[arg(long)]
    steps: Option<usize>,
    /// Examples per micro-batch (with --packing: rows of packed examples).
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Several whole examples per row of --max-seq-len tokens (best-fit decreasing), each
    /// attending only to itself: less padding, fewer optimiser steps per epoch.
    #[arg(long)]
    packing: bool,
    /// Micro-batches of at most N tokens, padding included, instead of --batch-size examples.
    #[arg(long, value_name = "N")]
    max_tokens_per_batch: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Warm-up steps.
    #[arg(long)]
    warmup: Option<u64>,
    /// constant | linear | cosine (after the warm-up).
    #[arg(long)]
    schedule: Option<String>,
    /// Clip the global gradient norm to this value (0 = off).
    #[arg(long)]
    max_grad_norm: Option<f64>,
    #[arg(long)]
    label_smoothing: Option<f32>,
    #[arg(long)]
    max_seq_len: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep file order: batch k holds lines k·B … k·B+B−1.
    #[arg(long)]
    no_shuffle: bool,
    #[arg(long)]
    eval_every: Option<usize>,
    /// A checkpoint every N steps under OUT/checkpoints (LoRA: adapter + optimiser state, for
    /// --resume; --full: model snapshots)
    #[arg(long)]
    save_every: Option<usize>,
    #[arg(long)]
    keep_checkpoints: Option<usize>,
    /// Frozen-weight arithmetic: bf16 (default where the CPU has AVX512-BF16; emulated elsewhere),
    /// f32 (exact), or gguf (QLoRA: the frozen base kept only in the GGUF file's quantised
    /// blocks, or an HF base's quantised at load with --quantize; their products in bf16 where
    /// bf16 is the default, else f32). gguf-f32 and gguf-bf16 keep the blocks and force the
    /// products' arithmetic. int8 and gguf-int8: as bf16 and gguf-bf16, and the backward's
    /// input-gradient products dx = dy·W in 8-bit integers (AMX-INT8 tiles, AVX512-VNNI, or a
    /// portable kernel) over 8-bit rows of the weights (1 byte a weight more) and dy quantised
    /// per row; the forward, so the loss, is bf16's.
    #[arg(long)]
    precision: Option<String>,
    /// With --precision gguf and an HF base: quantise its weights at load to this block type
    /// (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k).
    #[arg(long)]
    quantize: Option<String>,
    /// Keep only each layer's input from the forward and recompute the rest in the backward
    /// (activation checkpointing): much less memory for about one more forward pass per step.
    #[arg(long)]
    recompute: bool,
    /// Full fine-tuning: every weight trainable (the baseline LoRA replaces); writes OUT/model.
    #[arg(long)]
    full: bool,
    /// Skip (and record) a step whose loss or gradient is NaN/Inf instead of stopping.
    #[arg(long)]
    skip_nonfinite: bool,
    /// No progress bar (one line per step on stderr instead).
    #[arg(long)]
    quiet: bool,
    /// Also write the adapter as llama.cpp's GGUF LoRA, OUT/adapter_model.gguf, in this type
    /// (f32, f16, bf16 or q8_0).
    #[arg(long, value_name = "TYPE")]
    gguf_adapter: Option<String>,
}

impl TrainArgs {
    fn options(&self) -> Result<TrainOptions> {
        let mut o = match &self.config {
            Some(p) => TrainOptions::from_toml(p)?,
            None => TrainOptions::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { o.$f = v.clone().into(); } )* };
        }
        set!(
            r,
            alpha,
            dropout,
            targets,
            init,
            batch_size,
            grad_accum,
            lr,
            weight_decay,
            warmup,
            schedule,
            max_grad_norm,
            label_smoothing,
            seed,
            eval_every,
            save_every,
            keep_checkpoints
        );
        if self.max_seq_len.is_some() {
            o.max_seq_len = self.max_seq_len;
        }
        if self.max_tokens_per_batch.is_some() {
            o.max_tokens_per_batch = self.max_tokens_per_batch;
        }
        if self.model.is_some() {
            o.model = self.model.clone();
        }
        if self.precision.is_some() {
            o.precision = self.precision.clone();
        }
        if self.quantize.is_some() {
            o.quantize = self.quantize.clone();
        }
        if self.data.is_some() {
            o.data = self.data.clone();
        }
        if self.eval_data.is_some() {
            o.eval_data = self.eval_data.clone();
        }
        if self.out.is_some() {
            o.out = self.out.clone();
        }
        if self.init_adapter.is_some() {
            o.init_adapter = self.init_adapter.clone();
        }
        if self.layers.is_some() {
            o.layers = self.layers.clone();
        }
        if self.epochs.is_some() {
            o.epochs = self.epochs;
            o.steps = None;
        }
        if self.steps.is_some() {
            o.steps = self.steps;
            o.epochs = None;
        }
        o.use_rslora |= self.use_rslora;
        o.no_shuffle |= self.no_shuffle;
        o.packing |= self.packing;
        o.skip_nonfinite |= self.skip_nonfinite;
        o.full |= self.full;
        o.recompute |= self.recompute;
        o.overwrite |= self.overwrite;
        Ok(o)
    }
}

/// The ranks this process is one of: MPI's when `mpirun` started it (in a build with the `mpi`
/// feature), otherwise this process alone.
fn ranks() -> Result<Box<dyn Collective>> {
    // OpenMPI sets OMPI_COMM_WORLD_SIZE, MPICH and Slurm's PMI set PMI_SIZE.
    let launched_size = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse::<usize>().ok());
    #[cfg(feature = "mpi")]
    if launched_size.is_some() {
        let world =
            lorakit_mpi::MpiWorld::init().context("MPI is already initialised in this process")?;
        return Ok(Box::new(world));
    }
    #[cfg(not(feature = "mpi"))]
    if let Some(n) = launched_size.filter(|&n| n > 1) {
        bail!("started by mpirun as one of {n} ranks, but this lorakit was built without MPI: build it with `cargo build --release -p lorakit-cli --features mpi` (scripts/install-mpi.sh installs OpenMPI)");
    }
    Ok(Box::new(SingleProcess))
}

pub fn cmd_train(a: TrainArgs) -> Result<()> {
    let mut options = a.options()?;
    anyhow::ensure!(
        !(options.full && a.resume),
        "--resume cannot be combined with --full: its --save-every snapshots hold no optimiser state"
    );
    let model_path = resolve_model(options.model.clone())?;
    options.model = Some(model_path.clone());
    // The output is checked before anything loads: an --out that is an input, a file, a
    // directory lorakit did not write or an earlier run (without --resume / --overwrite) is
    // refused with nothing touched.
    let out = options
        .out
        .clone()
        .context("no output directory: give --out DIR")?;
    let input_paths: Vec<(&str, PathBuf)> = [
        ("--data", &options.data),
        ("--eval-data", &options.eval_data),
        ("--init-adapter", &options.init_adapter),
        ("--config", &a.config),
    ]
    .into_iter()
    .filter_map(|(flag, p)| Some((flag, p.clone()?)))
    .collect();
    let mut inputs = vec![("--model", model_path.as_path())];
    inputs.extend(input_paths.iter().map(|(flag, p)| (*flag, p.as_path())));
    let earlier = if a.resume {
        EarlierRun::Resume
    } else {
        EarlierRun::Refuse
    };
    let gguf_type = a
        .gguf_adapter
        .as_deref()
        .map(crate::export_cmd::adapter_type)
        .transpose()?;
    anyhow::ensure!(
        !(gguf_type.is_some() && options.full),
        "--gguf-adapter writes a LoRA adapter; --full trains the whole model (merge it to GGUF instead)"
    );
    // Under mpirun only rank 0 touches the output; every rank loads the model and data, and all
    // check that they agree (or that one of them failed) before the first step.
    let comm = ranks()?;
    let root = comm.rank() == 0;
    // Refused on every rank alike, before anything loads, so that each one says why.
    if comm.size() > 1 {
        anyhow::ensure!(
            !options.full,
            "--full cannot run on several ranks: data-parallel training shares LoRA adapters only"
        );
        anyhow::ensure!(
            options.grad_accum.is_multiple_of(comm.size()),
            "--grad-accum {} micro-batches per step cannot be shared by {} ranks: give a multiple of {}",
            options.grad_accum,
            comm.size(),
            comm.size()
        );
    }
    let prepared = (|| -> Result<_> {
        let output = match root {
            true => Some(TrainOutput::prepare(
                &out,
                "train",
                &inputs,
                earlier,
                options.overwrite,
            )?),
            false => None,
        };
        let model_name = model_path.display().to_string();
        let mut loaded = match options.blocks()? {
            Some(quantize) => {
                anyhow::ensure!(
                    !options.full,
                    "--full cannot train a base kept in quantised blocks (--precision gguf): blocks cannot take an optimiser step; drop --full to train LoRA over them"
                );
                lorakit::model::load_model_blocks(&model_path, quantize)
                    .with_context(|| format!("cannot load model {}", model_path.display()))?
            }
            None => open_model(Some(model_path.clone()))?,
        };
        let precision = options.apply_precision(&mut loaded.model)?;
        let plan = TrainPlan::new(options, &loaded, &model_name)?;
        Ok((output, loaded, plan, precision))
    })();
    if comm.size() > 1 {
        let hash = prepared
            .as_ref()
            .map_or(0, |(_, loaded, plan, _)| plan.fingerprint(&loaded.model));
        let agreed = check_agreement(
            &*comm,
            hash,
            prepared.is_ok(),
            "the model, data and options",
        );
        if let Err(e) = &prepared {
            bail!("rank {}: {e:#}", comm.rank());
        }
        agreed?;
    }
    let (output, mut loaded, plan, precision) = prepared?;
    if !root {
        let summary =
            train_model_on_rank(&loaded.model, plan, None, &out, a.resume, &*comm, |_| {})?;
        eprintln!("rank {}: {} steps done", comm.rank(), summary.steps);
        return Ok(());
    }
    let output = output.context("rank 0 holds the output")?;
    let config = loaded.model.config.clone();
    let total = config.parameter_count();
    let full = plan.options.full;
    match &plan.adapter {
        None => eprintln!(
            "trainable parameters: {total} of {total} (100% of the model): full fine-tuning"
        ),
        Some(adapter) => {
            let trainable = adapter.parameter_count();
            eprintln!(
                "trainable parameters: {trainable} of {total} ({:.4}% of the model), {} adapted modules",
                100.0 * trainable as f64 / total as f64,
                adapter.modules.len()
            );
        }
    }
    eprintln!(
        "data: {} examples, {} target tokens, {} batches per epoch; {} optimiser steps",
        plan.train_stats.examples,
        plan.train_stats.target_tokens,
        plan.batcher.batches_per_epoch(),
        plan.total_steps
    );
    if let lorakit::data::Grouping::Packed { row_len, rows } = plan.batcher.grouping() {
        eprintln!(
            "packing: {} rows of up to {row_len} tokens, {rows} per micro-batch",
            plan.batcher.packed_rows().len()
        );
    }
    for w in plan
        .train_stats
        .warnings(plan.options.max_seq_len.unwrap_or_default())
    {
        eprintln!("warning: {w}");
    }
    let frozen_bytes = loaded.model.frozen_bytes();
    let weights_mb = frozen_bytes.total() as f64 / 1e6;
    // `--precision int8`: the backward's 8-bit rows beside the weights.
    let int8 = match frozen_bytes.int8 {
        0 => String::new(),
        b => format!(
            ", {:.0} MB 8-bit rows for the input gradients",
            b as f64 / 1e6
        ),
    };
    let what = if full {
        format!(
            "{weights_mb:.0} MB f32 weights + {:.0} MB gradients + {:.0} MB AdamW moments",
            weights_mb,
            2.0 * weights_mb
        )
    } else if frozen_bytes.blocks > 0 {
        // Blocks' products dequantise panels into small per-thread scratch: no weight copy.
        let products = match precision {
            lorakit::model::Precision::Bf16 => "bf16",
            lorakit::model::Precision::F32 => "f32",
        };
        // (Weights the file holds unquantised are packed in bf16 for bf16 products.)
        let bf16 = match frozen_bytes.bf16 {
            0 => String::new(),
            b => format!(", {:.0} MB bf16", b as f64 / 1e6),
        };
        format!(
            "{weights_mb:.0} MB frozen weights ({:.0} MB quantised blocks{bf16}, {:.0} MB f32{int8}; {products} products)",
            frozen_bytes.blocks as f64 / 1e6,
            frozen_bytes.f32 as f64 / 1e6
        )
    } else {
        let held = match precision {
            lorakit::model::Precision::Bf16 => "bf16; the embedding in f32",
            lorakit::model::Precision::F32 => "f32",
        };
        format!("{weights_mb:.0} MB frozen weights ({held}{int8})")
    };
    eprintln!(
        "memory estimate: {what} + {:.0} MB saved activations (up to {} tokens per micro-batch)",
        plan.activation_bytes_estimate(&loaded.model) as f64 / 1e6,
        plan.batcher.max_batch_tokens()
    );
    let quiet = a.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = ProgressBar::hidden();
    let mut tokens_done = 0usize;
    let start = std::time::Instant::now();
    let on_event = |ev: Event| match ev {
        Event::Started {
            total_steps,
            start_step,
        } => {
            if !quiet {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                bar.set_length(total_steps);
                bar.set_position(start_step);
                bar.set_style(
                    ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  eta {eta}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
            }
        }
        Event::Step(m) => {
            tokens_done += m.tokens;
            let rate = tokens_done as f64 / start.elapsed().as_secs_f64().max(1e-9);
            if let Some(why) = &m.skipped {
                bar.suspend(|| eprintln!("warning: step {} skipped: {why}", m.step));
                bar.inc(1);
            } else if quiet {
                eprintln!(
                    "step {} loss {:.4} lr {:.2e} {:.0} tokens/s",
                    m.step, m.loss, m.lr, rate
                );
            } else {
                bar.set_message(format!("loss {:.4}  {:.0} tokens/s", m.loss, rate));
                bar.inc(1);
            }
        }
        Event::Eval { step, eval_loss } => {
            bar.suspend(|| eprintln!("step {step}: eval loss {eval_loss:.4}"));
        }
        Event::Checkpoint { step, dir } => {
            bar.suspend(|| eprintln!("step {step}: checkpoint {}", dir.display()));
        }
    };
    // A run that fails before its first checkpoint leaves nothing behind in a directory it made
    // (the library removes what it wrote there).
    let result = match full {
        true if comm.size() > 1 => Err(lorakit::Error::Invalid(
            "--full cannot run on several ranks: data-parallel training shares LoRA adapters only"
                .into(),
        )),
        true => lorakit::train::full::train_full(&mut loaded, plan, &output, on_event),
        false if comm.size() > 1 => train_model_on_rank(
            &loaded.model,
            plan,
            Some(&output),
            &out,
            a.resume,
            &*comm,
            on_event,
        ),
        false => train(&loaded, plan, &output, on_event),
    };
    bar.finish_and_clear();
    let summary = result?;
    if let Some(t) = gguf_type {
        crate::export_cmd::write_train_gguf(&output, &config, t)?;
    }
    if summary.skipped_steps > 0 {
        eprintln!(
            "warning: {} of {} steps were skipped for a non-finite loss or gradient",
            summary.skipped_steps, summary.steps
        );
    }
    eprintln!(
        "done: {} steps, final loss {}, eval loss {}; {} written to {} ({:.1} s, {:.0} tokens/s)",
        summary.steps,
        summary.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.eval_loss.map_or("-".into(), |l| format!("{l:.4}")),
        if full { "model" } else { "adapter" },
        summary.adapter_dir.display(),
        start.elapsed().as_secs_f64(),
        tokens_done as f64 / start.elapsed().as_secs_f64().max(1e-9)
    );
    Ok(())
}

#[derive(Args)]
pub struct MergeArgs {
    /// A .gguf file or HF directory [default: the fetched SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// A PEFT adapter directory, optionally with a weight: DIR or DIR:0.5 (repeatable).
    #[arg(long, required = true)]
    adapter: Vec<String>,
    /// The HF directory to write (config.json, model.safetensors, tokenizer files), or a
    /// FILE.gguf llama.cpp runs (from a .gguf base its metadata, tokenizer and chat template
    /// kept; from an HF directory built as llama.cpp's converter builds them).
    #[arg(long)]
    out: PathBuf,
    /// Tensor type of a .gguf output: f32, f16, bf16, q8_0, q6_k, q5_k, q5_1, q5_0, q4_k,
    /// q4_1, q4_0, or llama.cpp's mixes q4_k_m and q5_k_m.
    #[arg(long = "type", default_value = "f32")]
    dtype: String,
    /// Write into a directory lorakit did not write (replacing only the files merge writes).
    #[arg(long)]
    overwrite: bool,
}

pub fn cmd_merge(a: MergeArgs) -> Result<()> {
    let path = resolve_model(a.model.clone())?;
    if a.out.extension().is_some_and(|e| e == "gguf") {
        return crate::export_cmd::merge_gguf(&path, &a.adapter, &a.out, &a.dtype, a.overwrite);
    }
    // Checked before anything loads: --out may not be an input, a file, or a directory that
    // lorakit did not write (without --overwrite).
    let adapters = a
        .adapter
        .iter()
        .map(|s| parse_adapter_spec(s).map(|(dir, _)| dir))
        .collect::<Result<Vec<_>>>()?;
    let mut inputs = vec![("--model", path.as_path())];
    inputs.extend(adapters.iter().map(|d| ("--adapter", d.as_path())));
    let out = prepare_output_dir(&a.out, "merge", &inputs, a.overwrite)?;
    let mut loaded = open_model(Some(path))?;
    crate::attach_adapters(&mut loaded, &a.adapter)?;
    loaded.model.merge_adapters()?;
    loaded
        .save_hf_dir(&out)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    eprintln!("merged model written to {}", a.out.display());
    Ok(())
}
