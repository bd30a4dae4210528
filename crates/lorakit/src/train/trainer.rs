//! The training loop, one for LoRA and full fine-tuning ([`run_steps`] over a [`Trainee`]):
//! data → batches → forward / loss / backward → clipping → AdamW, with evaluation, metrics,
//! checkpoints (atomic, resumable for LoRA) and the result; and LoRA's trainee, whose result
//! is the PEFT adapter.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::{load_jsonl, Batch, Batcher, DataOptions, Grouping, LoadStats};
use crate::error::{Error, Result};
use crate::io::atomic::{leftover_pid, write_atomic};
use crate::io::output::{prepare_output_dir_with, OutputDir, State};
use crate::io::safetensors_file::SafetensorsFile;
use crate::lora::config::LoraConfig;
use crate::lora::peft::Adapter;
use crate::lora::{LoraInit, ModuleId};
use crate::model::decoder_train::{Activations, Dropout, LoraGrads};
use crate::model::param::Param;
use crate::model::{Config, Decoder, LoadedModel};
use crate::tokenize::Tokenizer;
use crate::train::loss::{lm_head_loss, target_positions};
use crate::train::optim::{clip_grad_norm, global_grad_norm, AdamW, AdamWConfig};
use crate::train::parallel::{Collective, SingleProcess};
use crate::train::schedule::{Schedule, ScheduleKind};

/// Every knob of `lorakit train`; each is a command-line flag and a key of the TOML config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainOptions {
    pub model: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub eval_data: Option<PathBuf>,
    pub out: Option<PathBuf>,
    /// An `out` holding an earlier run is started over (its files removed), and one lorakit
    /// did not write is used (its other files kept), instead of refusing.
    pub overwrite: bool,
    /// Start from this PEFT adapter instead of a fresh one (its config is used).
    pub init_adapter: Option<PathBuf>,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// `q_proj,v_proj`, `all-linear`, or a regex over module paths.
    pub targets: String,
    pub layers: Option<Vec<usize>>,
    pub use_rslora: bool,
    /// `kaiming` (PEFT's default) or `gaussian` (the paper's).
    pub init: String,
    pub epochs: Option<usize>,
    pub steps: Option<usize>,
    /// Examples per micro-batch (rows of packed examples with `packing`).
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Several whole examples per row (best-fit decreasing into rows of `max_seq_len` tokens),
    /// each attending only to itself, positions restarting with it.
    pub packing: bool,
    /// Micro-batches of at most this many tokens (padding included) instead of `batch_size`
    /// examples (packed: `max_tokens_per_batch / max_seq_len` rows).
    pub max_tokens_per_batch: Option<usize>,
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    /// Warm-up steps of the schedule.
    pub warmup: u64,
    pub schedule: String,
    /// Global gradient-norm clipping (0 = off).
    pub max_grad_norm: f64,
    pub label_smoothing: f32,
    /// Longer examples are truncated [default: min(1024, the model's context)].
    pub max_seq_len: Option<usize>,
    pub seed: u64,
    pub no_shuffle: bool,
    /// Evaluate every N optimiser steps (0 = only at the end), when eval data is given.
    pub eval_every: usize,
    /// Write a checkpoint every N steps (0 = only at the end).
    pub save_every: usize,
    pub keep_checkpoints: usize,
    /// Frozen-weight products: `bf16` (the default where the CPU has AVX512-BF16; emulated with the
    /// same rounding elsewhere), `f32`, or `gguf` (QLoRA: the frozen base kept only in quantised
    /// blocks, a GGUF file's own or `quantize`'s, their products in the default's arithmetic;
    /// `gguf-f32` and `gguf-bf16` choose it), or `int8` / `gguf-int8` (as `bf16` / `gguf-bf16`,
    /// with the backward's input-gradient products over 8-bit rows, `engine::int8_rows`).
    pub precision: Option<String>,
    /// With `precision = "gguf"` and an HF base: the block type its weights are quantised to at
    /// load (`q8_0`, `q4_0`, `q4_k`, ...).
    pub quantize: Option<String>,
    /// Keep only each layer's input from the forward and recompute the rest in the backward
    /// (activation checkpointing, LoRA): about one more forward pass per step for much less
    /// memory.
    pub recompute: bool,
    /// A step whose loss or gradient norm is NaN/Inf is skipped (no update, recorded in
    /// metrics.jsonl) instead of stopping the run.
    pub skip_nonfinite: bool,
    /// Full fine-tuning: every weight trainable, no adapter (the baseline LoRA replaces).
    pub full: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            model: None,
            data: None,
            eval_data: None,
            out: None,
            overwrite: false,
            init_adapter: None,
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: "q_proj,v_proj".into(),
            layers: None,
            use_rslora: false,
            init: "kaiming".into(),
            epochs: None,
            steps: None,
            batch_size: 4,
            grad_accum: 1,
            packing: false,
            max_tokens_per_batch: None,
            lr: 2e-4,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            warmup: 0,
            schedule: "constant".into(),
            max_grad_norm: 0.0,
            label_smoothing: 0.0,
            max_seq_len: None,
            seed: 0,
            no_shuffle: false,
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 2,
            precision: None,
            quantize: None,
            recompute: false,
            skip_nonfinite: false,
            full: false,
        }
    }
}

impl TrainOptions {
    /// Reads a TOML file of these keys; unknown keys are errors naming them.
    pub fn from_toml(path: &Path) -> Result<TrainOptions> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let o: TrainOptions = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let at = line.map_or(String::new(), |l| format!("line {l}: "));
            Error::format(
                path,
                format!("{at}{}", e.message().trim().replace('\n', " ")),
            )
        })?;
        if o.steps.is_some() && o.epochs.is_some() {
            return Err(Error::config(
                path,
                "steps",
                "set steps or epochs, not both",
            ));
        }
        Ok(o)
    }

    /// The precision asked for, or the fastest on this CPU: bf16 where bf16 products beat f32
    /// ones (AMX tiles, or AMD's AVX512-BF16; `engine::bf16::bf16_native`), f32 elsewhere; f32
    /// for full fine-tuning.
    pub fn precision(&self) -> Result<crate::model::Precision> {
        // The arithmetic, over blocks (`gguf`, QLoRA) as over f32 or bf16 weights.
        let choice = self.precision_choice()?;
        match choice.and_then(|c| c.arithmetic) {
            Some(p) => Ok(p),
            None if self.full => Ok(crate::model::Precision::F32),
            None if crate::engine::bf16::bf16_native() => Ok(crate::model::Precision::Bf16),
            None => Ok(crate::model::Precision::F32),
        }
    }

    /// Sets `model`'s frozen-weight storage and arithmetic as chosen: [`TrainOptions::precision`],
    /// then the 8-bit rows of the backward for `int8` and `gguf-int8`. Returns the arithmetic.
    pub fn apply_precision(&self, model: &mut Decoder) -> Result<crate::model::Precision> {
        let precision = self.precision()?;
        model.set_precision(precision)?;
        if self.precision_choice()?.is_some_and(|c| c.int8_rows) {
            model.set_int8_backward()?;
        }
        Ok(precision)
    }

    /// `precision` parsed: storage and arithmetic.
    fn precision_choice(&self) -> Result<Option<crate::model::PrecisionChoice>> {
        self.precision.as_deref().map(str::parse).transpose()
    }

    /// Whether the frozen base is kept in quantised blocks (`precision = "gguf"`), and the type
    /// an HF base is quantised to (`quantize`), checked.
    pub fn blocks(&self) -> Result<Option<Option<crate::io::gguf::GgmlType>>> {
        let blocks = self.precision_choice()?.is_some_and(|c| c.blocks);
        let quantize = match self.quantize.as_deref() {
            None => None,
            Some(name) => Some(crate::model::gguf_model::parse_type(name).ok_or_else(|| {
                let names: Vec<String> = crate::engine::quant::GGUF_TYPES
                    .iter()
                    .map(|t| t.name().to_ascii_lowercase())
                    .collect();
                Error::Invalid(format!(
                    "--quantize {name}: not a block type lorakit trains over ({})",
                    names.join(", ")
                ))
            })?),
        };
        match (blocks, quantize) {
            (false, Some(t)) => Err(Error::Invalid(format!(
                "--quantize {} keeps the base in quantised blocks: pass it with --precision gguf",
                t.name().to_ascii_lowercase()
            ))),
            (false, None) => Ok(None),
            (true, q) => Ok(Some(q)),
        }
    }

    /// How the examples become micro-batches, with examples truncated to `max_seq_len`: packed
    /// rows of `max_seq_len` tokens (of the token budget, when it is smaller), `batch_size` rows
    /// per micro-batch or as many as the budget holds; or by token budget; or `batch_size`
    /// examples.
    pub fn grouping(&self, max_seq_len: usize) -> Result<Grouping> {
        if self.max_tokens_per_batch == Some(0) {
            return Err(Error::Invalid("--max-tokens-per-batch must be ≥ 1".into()));
        }
        Ok(match (self.packing, self.max_tokens_per_batch) {
            (false, None) => Grouping::Examples,
            (false, Some(max_tokens)) => Grouping::Tokens { max_tokens },
            (true, None) => Grouping::Packed {
                row_len: max_seq_len,
                rows: self.batch_size,
            },
            (true, Some(n)) => {
                let row_len = max_seq_len.min(n);
                Grouping::Packed {
                    row_len,
                    rows: n / row_len,
                }
            }
        })
    }

    /// Options that mean nothing, or are not implemented, for full fine-tuning are errors
    /// rather than silently ignored.
    fn check_full(&self) -> Result<()> {
        let d = TrainOptions::default();
        let lora_only = [
            ("r", self.r != d.r),
            ("alpha", self.alpha != d.alpha),
            ("dropout", self.dropout != d.dropout),
            ("targets", self.targets != d.targets),
            ("layers", self.layers != d.layers),
            ("use-rslora", self.use_rslora != d.use_rslora),
            ("init", self.init != d.init),
            ("init-adapter", self.init_adapter.is_some()),
            ("recompute", self.recompute),
        ];
        if let Some((name, _)) = lora_only.iter().find(|(_, set)| *set) {
            return Err(Error::Invalid(format!(
                "--{name} is a LoRA option and cannot be combined with --full (which trains every weight)"
            )));
        }
        if self.precision_choice()?.is_some_and(|c| c.blocks) || self.quantize.is_some() {
            return Err(Error::Invalid(
                "--full cannot train a base kept in quantised blocks (--precision gguf, --quantize): \
                 blocks cannot take an optimiser step; train LoRA over them (drop --full), or \
                 fully fine-tune in f32"
                    .into(),
            ));
        }
        if self.precision.as_deref().is_some_and(|p| p != "f32") {
            return Err(Error::Invalid(
                "--full trains in f32 (bf16 packs would go stale at every step); drop --precision or pass f32".into(),
            ));
        }
        Ok(())
    }

    fn lora_config(&self, model_name: &str) -> Result<LoraConfig> {
        let init_lora_weights = match self.init.as_str() {
            "kaiming" | "true" => LoraInit::Kaiming,
            "gaussian" => LoraInit::Gaussian,
            other => {
                return Err(Error::Invalid(format!(
                    "--init must be kaiming or gaussian, got \"{other}\""
                )))
            }
        };
        Ok(LoraConfig {
            r: self.r,
            lora_alpha: self.alpha,
            lora_dropout: self.dropout,
            target_modules: LoraConfig::parse_targets(&self.targets),
            layers_to_transform: self.layers.clone(),
            rank_pattern: vec![],
            alpha_pattern: vec![],
            use_rslora: self.use_rslora,
            init_lora_weights,
            base_model_name_or_path: Some(model_name.to_owned()),
            fan_in_fan_out: false,
        })
    }
}

/// One optimiser step's record in `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based.
    pub step: u64,
    /// Mean loss over the step's target tokens, from the forward pass before the update.
    pub loss: f64,
    pub lr: f64,
    /// Tokens processed (padding excluded).
    pub tokens: usize,
    pub target_tokens: usize,
    pub grad_norm: f64,
    /// Wall time of the step.
    pub seconds: f64,
    /// Of which waiting for and receiving the other ranks' gradients (data-parallel runs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gather_seconds: Option<f64>,
    /// Why the step made no update (`--skip-nonfinite`); absent for normal steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// What the caller (the CLI's progress bar) hears during training.
pub enum Event<'a> {
    Started { total_steps: u64, start_step: u64 },
    Step(&'a StepMetrics),
    Eval { step: u64, eval_loss: f64 },
    Checkpoint { step: u64, dir: &'a Path },
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: u64,
    pub final_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub adapter_dir: PathBuf,
    pub trainable_parameters: usize,
    /// Steps skipped for a non-finite loss or gradient (`skip_nonfinite`).
    pub skipped_steps: u64,
}

/// Everything fixed before the first step: data, the adapter to train, the schedule.
pub struct TrainPlan {
    pub options: TrainOptions,
    pub train_stats: LoadStats,
    pub eval_examples: Option<Vec<crate::data::Example>>,
    pub batcher: Batcher,
    /// The adapter to train (its initial state); `None` for full fine-tuning.
    pub adapter: Option<Adapter>,
    pub total_steps: u64,
    pub schedule: Schedule,
    pub adam: AdamWConfig,
}

impl TrainPlan {
    /// Validates every option and loads the data before anything trains.
    pub fn new(options: TrainOptions, loaded: &LoadedModel, model_name: &str) -> Result<TrainPlan> {
        Self::for_model(
            options,
            &loaded.model.config,
            loaded.tokenizer()?,
            model_name,
        )
    }

    /// [`TrainPlan::new`] for any model with this `config` (GPT-2 too) and `tokenizer`.
    pub fn for_model(
        options: TrainOptions,
        model_config: &Config,
        tokenizer: &Tokenizer,
        model_name: &str,
    ) -> Result<TrainPlan> {
        let o = &options;
        let data = o
            .data
            .as_deref()
            .ok_or_else(|| Error::Invalid("no training data: give --data FILE".into()))?;
        if o.batch_size == 0 || o.grad_accum == 0 {
            return Err(Error::Invalid(
                "--batch-size and --grad-accum must be ≥ 1".into(),
            ));
        }
        if !(0.0..1.0).contains(&o.label_smoothing) {
            return Err(Error::Invalid(format!(
                "--label-smoothing must be in [0, 1), got {}",
                o.label_smoothing
            )));
        }
        let context = model_config.max_position_embeddings;
        let max_seq_len = o.max_seq_len.unwrap_or(context.min(1024));
        if max_seq_len < 2 {
            return Err(Error::Invalid("--max-seq-len must be ≥ 2".into()));
        }
        if max_seq_len > context {
            return Err(Error::Invalid(format!(
                "--max-seq-len {max_seq_len} exceeds the model's context of {context} tokens"
            )));
        }
        let kind: ScheduleKind = o.schedule.parse()?;
        let adam = AdamWConfig {
            lr: o.lr,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.adam_eps,
            weight_decay: o.weight_decay,
        };
        adam.validate()?;
        if o.full {
            o.check_full()?;
        }
        let adapter = match &o.init_adapter {
            _ if o.full => None,
            Some(dir) => {
                // The adapter's own config decides; a LoRA option given beside it would be ignored.
                let d = TrainOptions::default();
                let conflicting = [
                    ("r", o.r != d.r),
                    ("alpha", o.alpha != d.alpha),
                    ("dropout", o.dropout != d.dropout),
                    ("targets", o.targets != d.targets),
                    ("layers", o.layers != d.layers),
                    ("use_rslora", o.use_rslora != d.use_rslora),
                    ("init", o.init != d.init),
                ];
                if let Some((name, _)) = conflicting.iter().find(|(_, differs)| *differs) {
                    return Err(Error::Invalid(format!(
                        "--{name} cannot be combined with --init-adapter: the adapter's own adapter_config.json decides its LoRA settings"
                    )));
                }
                Some(Adapter::load(dir, model_config)?)
            }
            None => Some(
                Adapter::init(
                    o.lora_config(model_name)?,
                    model_config,
                    o.seed,
                    Path::new("LoRA options"),
                )
                .map_err(|e| match e {
                    // Name the option the user set (flag or TOML key), not PEFT's field.
                    Error::Config { key, msg, .. } => {
                        let flag = match key.as_str() {
                            "r" => "--r",
                            "lora_alpha" => "--alpha",
                            "lora_dropout" => "--dropout",
                            "target_modules" => "--targets",
                            "layers_to_transform" => "--layers",
                            other => other,
                        };
                        Error::Invalid(format!("{flag} ('{key}'): {msg}"))
                    }
                    other => other,
                })?,
            ),
        };
        let data_opts = DataOptions {
            max_seq_len,
            add_eos: true,
        };
        let (examples, train_stats) = load_jsonl(data, tokenizer, &data_opts)?;
        if examples.is_empty() {
            return Err(Error::format(
                data,
                format!(
                    "no example has a target token ({} dropped)",
                    train_stats.dropped_no_target
                ),
            ));
        }
        let grouping = o.grouping(max_seq_len)?;
        let eval_examples = match &o.eval_data {
            Some(p) => {
                let (ex, stats) = load_jsonl(p, tokenizer, &data_opts)?;
                if ex.is_empty() {
                    return Err(Error::format(
                        p,
                        format!(
                            "no example has a target token ({} dropped)",
                            stats.dropped_no_target
                        ),
                    ));
                }
                // A token budget smaller than an eval example is an error now, not at the first eval.
                Batcher::new(ex.clone(), o.batch_size, false, 0)?
                    .with_grouping(grouping)
                    .map_err(|e| Error::format(p, e.to_string()))?;
                Some(ex)
            }
            None => None,
        };
        let pad = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0);
        let batcher = Batcher::new(examples, o.batch_size, !o.no_shuffle, o.seed)?
            .with_pad_id(pad)
            .with_grouping(grouping)?;
        let per_epoch = batcher.batches_per_epoch().div_ceil(o.grad_accum) as u64;
        let total_steps = match (o.steps, o.epochs) {
            (Some(s), None) => s as u64,
            (None, Some(e)) => e as u64 * per_epoch,
            (None, None) => per_epoch,
            (Some(_), Some(_)) => {
                return Err(Error::Invalid("give --steps or --epochs, not both".into()))
            }
        };
        if total_steps == 0 {
            return Err(Error::Invalid("nothing to train: 0 steps".into()));
        }
        let schedule = Schedule::new(kind, o.lr, o.warmup, total_steps);
        let mut options = options;
        options.max_seq_len = Some(max_seq_len);
        Ok(TrainPlan {
            options,
            train_stats,
            eval_examples,
            batcher,
            adapter,
            total_steps,
            schedule,
            adam,
        })
    }

    /// A hash of what every rank of a data-parallel run must agree on
    /// ([`crate::train::parallel::check_agreement`]): the options (the output directory aside),
    /// every example's tokens and labels, and the model (its configuration, embedding and final
    /// norm: enough to tell two different files apart).
    pub fn fingerprint(&self, model: &Decoder) -> u64 {
        use crate::train::parallel::{fnv1a, FNV_START};
        let mut o = self.options.clone();
        o.out = None;
        let mut h = fnv1a(
            FNV_START,
            serde_json::to_string(&o).unwrap_or_default().as_bytes(),
        );
        for e in self.batcher.examples() {
            for &id in &e.input_ids {
                h = fnv1a(h, &id.to_le_bytes());
            }
            for &l in &e.labels {
                h = fnv1a(h, &l.to_le_bytes());
            }
        }
        h = fnv1a(h, format!("{:?}", model.config.block).as_bytes());
        for w in [&*model.embedding_f32(), &model.norm] {
            for v in w.iter() {
                h = fnv1a(h, &v.to_le_bytes());
            }
        }
        h
    }

    /// The number of parameters the run trains: the adapter's, or every one of the model's.
    pub fn trainable_parameters(&self, model_config: &Config) -> usize {
        match &self.adapter {
            Some(a) => a.parameter_count(),
            None => model_config.parameter_count(),
        }
    }

    /// Saved-activation bytes for the largest batch this plan can produce.
    pub fn activation_bytes_estimate(&self, model: &Decoder) -> usize {
        let c = &model.config;
        let n = self.batcher.max_batch_tokens();
        let (h, q, kv, i) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        let r_sum: usize = self
            .adapter
            .iter()
            .flat_map(|a| a.modules.values())
            .map(|w| w.r)
            .sum::<usize>()
            / c.num_layers.max(1);
        // x_in, x_mid, q, attention output, k, v, gate, up, lse, x·Aᵀ (see decoder_train::LayerActs).
        let per_token_layer = 2 * h + 2 * q + 2 * kv + 2 * i + c.num_heads + r_sum;
        if self.options.recompute {
            // Every layer's input, and one layer recomputed at a time.
            return (n * h * c.num_layers + n * per_token_layer + n * h) * 4;
        }
        (n * per_token_layer * c.num_layers + n * h) * 4
    }
}

/// The micro-batches of optimiser step `step`, in order (data order is a pure function of
/// the seed and the step, which makes `--resume` exact).
pub(crate) struct BatchStream<'a> {
    batcher: &'a Batcher,
    epoch: usize,
    batches: Vec<Batch>,
}

impl<'a> BatchStream<'a> {
    pub(crate) fn new(batcher: &'a Batcher) -> Self {
        BatchStream {
            batcher,
            epoch: usize::MAX,
            batches: vec![],
        }
    }

    pub(crate) fn micro_batch(&mut self, global_index: u64) -> &Batch {
        let per_epoch = self.batcher.batches_per_epoch() as u64;
        let epoch = (global_index / per_epoch) as usize;
        if epoch != self.epoch {
            self.batches = self.batcher.epoch(epoch);
            self.epoch = epoch;
        }
        &self.batches[(global_index % per_epoch) as usize]
    }
}

/// Mean loss of `model` + `adapter` over examples (token-level mean), in batches of `batch_size`.
pub fn evaluate_loss(
    model: &Decoder,
    adapter: Option<&Adapter>,
    examples: &[crate::data::Example],
    batch_size: usize,
) -> Result<f64> {
    evaluate_loss_grouped(model, adapter, examples, batch_size, Grouping::Examples)
}

/// [`evaluate_loss`] with the batches formed as `grouping` says (packed rows, token budget): the
/// same mean, up to the order of the sums.
pub fn evaluate_loss_grouped(
    model: &Decoder,
    adapter: Option<&Adapter>,
    examples: &[crate::data::Example],
    batch_size: usize,
    grouping: Grouping,
) -> Result<f64> {
    let batcher = Batcher::new(examples.to_vec(), batch_size, false, 0)?.with_grouping(grouping)?;
    let mut acts = Activations::default();
    let (mut sum, mut count) = (0.0, 0usize);
    for batch in batcher.epoch(0) {
        model.train_forward_packed(
            &batch.input_ids,
            batch.batch_size,
            batch.seq_len,
            &batch.segments,
            adapter,
            Dropout::NONE,
            &mut acts,
        )?;
        let targets = target_positions(&batch.labels, batch.batch_size, batch.seq_len);
        sum += lm_head_loss(model, &acts.x_final, &targets, 0.0, 1.0, None);
        count += targets.len();
    }
    if count == 0 {
        return Err(Error::Invalid(
            "the evaluation data has no target tokens".into(),
        ));
    }
    Ok(sum / count as f64)
}

/// Subdirectory of the output directory that holds `step-NNNNNN` checkpoints.
pub const CHECKPOINTS: &str = "checkpoints";
const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const METRICS_FILE: &str = "metrics.jsonl";
const LOSS_PLOT: &str = "loss.png";

/// The top-level names a LoRA run writes in its output directory.
pub const LORA_OUTPUT_FILES: [&str; 5] = [
    crate::lora::peft::CONFIG_FILE,
    crate::lora::peft::WEIGHTS_FILE,
    CHECKPOINTS,
    METRICS_FILE,
    LOSS_PLOT,
];
/// Where full fine-tuning (`--full`) puts the fine-tuned model inside the output directory.
pub const MODEL_DIR: &str = "model";
/// The top-level names a full fine-tuning run (`--full`) writes in its output directory.
pub const FULL_OUTPUT_FILES: [&str; 4] = [MODEL_DIR, CHECKPOINTS, METRICS_FILE, LOSS_PLOT];

/// What training does when its output directory holds an earlier run of the same command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlierRun {
    /// Continue it from its newest checkpoint (`--resume`).
    Resume,
    /// Refuse, unless `overwrite` starts over (`lorakit train`).
    Refuse,
    /// Start over (`lorakit quickstart`, whose output is its own fixed directory).
    Replace,
}

/// A run directory from before the output marker: `checkpoints/step-*` written by lorakit; its
/// entries with train's names are the run's.
pub fn legacy_train_output(dir: &Path, entries: &[String]) -> Option<Vec<String>> {
    checkpoint_dirs(dir).last()?;
    Some(
        entries
            .iter()
            .filter(|n| {
                LORA_OUTPUT_FILES.contains(&n.as_str()) || FULL_OUTPUT_FILES.contains(&n.as_str())
            })
            .cloned()
            .collect(),
    )
}

/// The output directory of a training run, checked ([`TrainOutput::prepare`]); the training
/// loops write only through it.
#[derive(Debug, Clone)]
pub struct TrainOutput {
    dir: OutputDir,
    resume: bool,
    start_over: bool,
}

impl TrainOutput {
    /// Checks `out` as the output of `command` (`train`, `quickstart`) with these `inputs`
    /// (see [`crate::io::output`]): a missing or empty directory is used; an earlier run of the
    /// same command is continued, refused or started over as `earlier` says (`overwrite`
    /// always starts over); a directory lorakit did not write is refused unless `overwrite`.
    /// Starting over removes only the earlier run's files, and only when training starts.
    pub fn prepare(
        out: &Path,
        command: &str,
        inputs: &[(&str, &Path)],
        earlier: EarlierRun,
        overwrite: bool,
    ) -> Result<TrainOutput> {
        if earlier == EarlierRun::Resume && overwrite {
            return Err(Error::Invalid(
                "--resume continues the earlier run and --overwrite starts over: give one of them"
                    .into(),
            ));
        }
        let dir = prepare_output_dir_with(out, command, inputs, overwrite, &legacy_train_output)?;
        let mut start_over = false;
        if matches!(dir.state(), State::Own { .. }) && !dir.earlier_files().is_empty() {
            match (earlier, overwrite) {
                (_, true) | (EarlierRun::Replace, _) => start_over = true,
                (EarlierRun::Resume, false) => {}
                (EarlierRun::Refuse, false) => {
                    return Err(Error::Output {
                        path: out.to_path_buf(),
                        msg: format!(
                            "holds an earlier training run ({}); pass --resume to continue it or --overwrite to start over",
                            earlier_progress(dir.path())
                        ),
                    })
                }
            }
        }
        Ok(TrainOutput {
            dir,
            resume: earlier == EarlierRun::Resume,
            start_over,
        })
    }

    /// The output directory (symbolic links resolved).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    /// Whether the run continues from the newest checkpoint.
    pub fn resume(&self) -> bool {
        self.resume
    }
    pub fn dir(&self) -> &OutputDir {
        &self.dir
    }

    /// Runs `f` after creating the directory and its marker (and removing the earlier run's
    /// files when starting over); if `f` fails and the directory was fresh, what the run wrote
    /// is removed again unless it got as far as a checkpoint.
    pub(crate) fn run<T>(&self, files: &[&str], f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.dir.begin(files, self.start_over)?;
        let result = f();
        if result.is_err()
            && matches!(self.dir.state(), State::Fresh { .. })
            && !self.path().join(CHECKPOINTS).exists()
        {
            self.dir.discard(files);
        }
        result
    }
}

/// "step N" of the newest checkpoint (or the last row of metrics.jsonl) of a run directory.
fn earlier_progress(dir: &Path) -> String {
    if let Some((step, _)) = checkpoint_dirs(dir).pop() {
        return format!("step {step}");
    }
    let last = std::fs::read_to_string(dir.join(METRICS_FILE))
        .ok()
        .and_then(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter_map(|v| v["step"].as_u64())
                .max()
        });
    match last {
        Some(step) => format!("step {step}, no checkpoint"),
        None => "no step finished".into(),
    }
}

fn checkpoint_dirs(out: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(out.join(CHECKPOINTS))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Where checkpoint `step` goes inside the output directory.
pub(crate) fn checkpoint_dir(out: &OutputDir, step: u64) -> OutputDir {
    out.nested(Path::new(CHECKPOINTS).join(format!("step-{step:06}")))
}

/// Writes adapter + optimiser state + step into `out/checkpoints/step-N`, atomically (a
/// temporary directory renamed into place), and prunes old checkpoints.
fn save_checkpoint(
    out: &OutputDir,
    step: u64,
    adapter: &Adapter,
    adam: &AdamW,
    options: &TrainOptions,
    keep: usize,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(out, step);
    dir.write_whole(|tmp| {
        adapter.save(tmp)?;
        let (t, m, v) = adam.state();
        let mut tensors: Vec<(String, Vec<u8>, usize)> = Vec::new();
        for (i, (mi, vi)) in m.iter().zip(v).enumerate() {
            tensors.push((
                format!("exp_avg.{i}"),
                mi.iter().flat_map(|x| x.to_le_bytes()).collect(),
                mi.len(),
            ));
            tensors.push((
                format!("exp_avg_sq.{i}"),
                vi.iter().flat_map(|x| x.to_le_bytes()).collect(),
                vi.len(),
            ));
        }
        let views = tensors
            .iter()
            .map(|(k, b, n)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*n], b)
                    .map(|view| (k.clone(), view))
                    .map_err(|e| Error::format(tmp.join(OPTIMIZER_FILE), e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let bytes = safetensors::serialize(views, None)
            .map_err(|e| Error::format(tmp.join(OPTIMIZER_FILE), e.to_string()))?;
        write_atomic(&tmp.join(OPTIMIZER_FILE), &bytes)?;
        let state =
            json!({ "step": step, "optimizer_step": t, "seed": options.seed, "options": options });
        write_atomic(
            &tmp.join(STATE_FILE),
            serde_json::to_string_pretty(&state)
                .unwrap_or_default()
                .as_bytes(),
        )
    })?;
    prune_checkpoints(out.path(), keep);
    Ok(dir.shown().to_path_buf())
}

/// Keeps the newest `keep` checkpoints under `out/checkpoints` and removes what runs killed while
/// writing or pruning left behind.
pub(crate) fn prune_checkpoints(out: &Path, keep: usize) {
    let root = out.join(CHECKPOINTS);
    let all = checkpoint_dirs(out);
    for (step, old) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        // Rename first, so that a kill during the deletion leaves a hidden directory that is
        // never mistaken for a checkpoint. A failure here costs only disk space.
        let aside = root.join(format!(".deleting-step-{step:06}"));
        if std::fs::rename(old, &aside).is_ok() {
            let _ = std::fs::remove_dir_all(&aside);
        }
    }
    // Leftovers of runs killed while writing or pruning (this process's own are done).
    for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // (`.tmp-step-*` and `.step-*.tmp-*`: the names lorakit used before the output marker.)
        if name.starts_with(".deleting-")
            || name.starts_with(".tmp-step-")
            || (name.starts_with(".step-") && name.contains(".tmp-"))
            || leftover_pid(&name).is_some()
        {
            let p = e.path();
            let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
        }
    }
}

/// Loads the newest checkpoint: (step, adapter, optimiser).
fn load_checkpoint(
    out: &Path,
    model_config: &Config,
    adam_config: AdamWConfig,
) -> Result<Option<(u64, Adapter, AdamW)>> {
    let Some((step, dir)) = checkpoint_dirs(out).pop() else {
        return Ok(None);
    };
    let adapter = Adapter::load(&dir, model_config)?;
    let state_path = dir.join(STATE_FILE);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?,
    )
    .map_err(|e| Error::format(&state_path, e.to_string()))?;
    let t = state["optimizer_step"]
        .as_u64()
        .ok_or_else(|| Error::config(&state_path, "optimizer_step", "missing"))?;
    let opt = SafetensorsFile::open(&dir.join(OPTIMIZER_FILE))?;
    let sizes = param_sizes(&adapter);
    let (mut m, mut v) = (Vec::new(), Vec::new());
    for i in 0..sizes.len() {
        m.push(opt.tensor_f32(&format!("exp_avg.{i}"))?.0);
        v.push(opt.tensor_f32(&format!("exp_avg_sq.{i}"))?.0);
    }
    let adam = AdamW::from_state(adam_config, t, m, v, &sizes)?;
    Ok(Some((step, adapter, adam)))
}

/// Parameter tensors in a fixed order: (A, B) of each module in `Adapter::modules` order.
fn param_sizes(adapter: &Adapter) -> Vec<usize> {
    adapter
        .modules
        .values()
        .flat_map(|w| [w.a.len(), w.b.len()])
        .collect()
}

pub(crate) fn append_jsonl(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(f, "{value}").map_err(|e| Error::io(path, e))
}

/// The non-finite guard shared by the LoRA and full fine-tuning loops: `Ok(None)` for a finite
/// step, `Ok(Some(why))` for a step to skip (`skip_nonfinite`), otherwise an error naming the
/// step; `what` is what would have been written ("adapter", "model").
pub(crate) fn check_step_finite(
    step: u64,
    loss: f64,
    grad_norm: f64,
    skip_nonfinite: bool,
    what: &str,
) -> Result<Option<String>> {
    let why = if !loss.is_finite() {
        format!("the loss is {loss}")
    } else if !grad_norm.is_finite() {
        format!("the gradient norm is {grad_norm}")
    } else {
        return Ok(None);
    };
    if skip_nonfinite {
        return Ok(Some(why));
    }
    Err(Error::Invalid(format!(
        "step {}: {why}; stopping before writing a non-finite {what} \
         (--skip-nonfinite skips such steps instead)",
        step + 1
    )))
}

/// What one run trains, as the training loop ([`run_steps`]) sees it: LoRA's adapter over a
/// frozen model ([`LoraRun`]) or every weight of the model ([`crate::train::full`]). The loop
/// (data order, accumulation, clipping, the non-finite guard, AdamW, metrics, evaluation,
/// checkpoints) is written once over this.
pub(crate) trait Trainee {
    /// What a non-finite step would have written ("adapter", "model").
    const WHAT: &'static str;
    /// The loss plot's title.
    const TITLE: &'static str;
    /// Whether the loop may keep one gradient per micro-batch and add them in order afterwards
    /// (needed to share a step between ranks, [`crate::train::parallel`]); a trainee whose
    /// gradients are as large as the model (full fine-tuning) accumulates in place instead.
    const GRADIENT_PER_MICRO_BATCH: bool;
    /// Forward, loss and backward of one micro-batch, adding to the gradients; returns the
    /// loss summed over its target tokens, each divided by `normalizer` (the step's target
    /// tokens). `micro_index` is the batch's global index (it seeds LoRA dropout).
    fn accumulate(
        &mut self,
        batch: &Batch,
        micro_index: u64,
        options: &TrainOptions,
        normalizer: f64,
    ) -> Result<f64>;
    fn zero_grads(&mut self);
    /// Every trainable tensor beside its gradient, in the same order every time (the order of
    /// the optimiser state).
    fn params(&mut self) -> Result<Vec<Param<'_>>>;
    /// Mean loss over held-out examples.
    fn eval_loss(
        &self,
        examples: &[crate::data::Example],
        batch_size: usize,
        grouping: Grouping,
    ) -> Result<f64>;
    /// The checkpoint after `step` (`last`: the run's final step), with the optimiser state
    /// `adam`; returns its directory, or `None` when this trainee writes none at that step.
    fn checkpoint(
        &self,
        out: &OutputDir,
        step: u64,
        last: bool,
        adam: &AdamW,
        options: &TrainOptions,
    ) -> Result<Option<PathBuf>>;
    /// Writes the trained result into `output`; returns where it went.
    fn save(&self, output: &TrainOutput) -> Result<PathBuf>;
}

/// Where a run starts: a fresh optimiser at step 0, or a checkpoint's state (`--resume`) with
/// the metrics rows its steps produced.
pub(crate) struct Start {
    pub step: u64,
    pub adam: AdamW,
    pub history: Vec<serde_json::Value>,
}

/// The training loop, for LoRA and full fine-tuning alike: steps `start.step ..` of `plan`,
/// writing metrics, evaluations and checkpoints into `output`, then the result. With several
/// ranks (`comm`), each computes its share of every step's micro-batches and only the rank
/// given an `output` (rank 0) evaluates and writes; every rank ends each step with the same
/// parameters.
pub(crate) fn run_steps<T: Trainee>(
    trainee: &mut T,
    plan: &TrainPlan,
    output: Option<&TrainOutput>,
    comm: &dyn Collective,
    start: Start,
    mut on_event: impl FnMut(Event),
) -> Result<TrainSummary> {
    let o = &plan.options;
    let metrics_path = output.map(|out| out.path().join(METRICS_FILE));
    let Start {
        step: start_step,
        mut adam,
        history,
    } = start;
    if !o.grad_accum.is_multiple_of(comm.size()) {
        return Err(Error::Invalid(format!(
            "--grad-accum {} micro-batches per step cannot be shared by {} ranks: give a multiple of {}",
            o.grad_accum,
            comm.size(),
            comm.size()
        )));
    }
    if comm.size() > 1 && !T::GRADIENT_PER_MICRO_BATCH {
        return Err(Error::Invalid(format!(
            "{} cannot be trained on several ranks (only LoRA adapters are)",
            T::WHAT
        )));
    }
    if let Some(path) = &metrics_path {
        let mut rewritten = String::new();
        for row in &history {
            rewritten.push_str(&row.to_string());
            rewritten.push('\n');
        }
        write_atomic(path, rewritten.as_bytes())?;
    }
    let trainable: usize = trainee.params()?.iter().map(|p| p.value.len()).sum();

    on_event(Event::Started {
        total_steps: plan.total_steps,
        start_step,
    });
    let mut stream = BatchStream::new(&plan.batcher);
    let (mut last_loss, mut last_eval) = (None, None);
    let mut train_curve: Vec<(u64, f64)> = history
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r["loss"].as_f64()?)))
        .collect();
    let mut eval_curve: Vec<(u64, f64)> = history
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r["eval_loss"].as_f64()?)))
        .collect();
    let mut skipped_steps = 0u64;

    for step in start_step..plan.total_steps {
        let t0 = Instant::now();
        let first = step * o.grad_accum as u64;
        let normalizer: usize = (0..o.grad_accum as u64)
            .map(|i| stream.micro_batch(first + i).target_tokens)
            .sum();
        let mut gather_seconds = None;
        let (loss_sum, tokens) = if T::GRADIENT_PER_MICRO_BATCH
            && (o.grad_accum > 1 || comm.size() > 1)
        {
            let (loss_sum, tokens, gather) =
                shared_step_gradients(trainee, &mut stream, first, o, normalizer, comm)?;
            gather_seconds = (comm.size() > 1).then_some(gather);
            (loss_sum, tokens)
        } else {
            trainee.zero_grads();
            let (mut loss_sum, mut tokens) = (0.0f64, 0usize);
            for i in 0..o.grad_accum as u64 {
                let batch = stream.micro_batch(first + i);
                if batch.target_tokens == 0 {
                    continue;
                }
                loss_sum += trainee.accumulate(batch, first + i, o, normalizer.max(1) as f64)?;
                tokens += batch.lengths.iter().sum::<usize>();
            }
            (loss_sum, tokens)
        };
        let loss = loss_sum / normalizer.max(1) as f64;
        let lr = plan.schedule.lr_at(step);
        let mut params = trainee.params()?;
        let grad_norm = {
            let mut grads: Vec<&mut [f32]> = params.iter_mut().map(|p| &mut *p.grad).collect();
            if !loss.is_finite() {
                f64::NAN
            } else if o.max_grad_norm > 0.0 {
                clip_grad_norm(&mut grads, o.max_grad_norm)
            } else {
                global_grad_norm(&grads.iter().map(|g| &**g).collect::<Vec<_>>())
            }
        };
        let skipped = check_step_finite(step, loss, grad_norm, o.skip_nonfinite, T::WHAT)?;
        skipped_steps += skipped.is_some() as u64;
        // A skipped step (like torch.amp's GradScaler) consumes its batch and leaves parameters
        // and optimiser state as they were.
        if skipped.is_none() {
            adam.step_params(lr, &mut params)?;
        }
        drop(params);
        let metrics = StepMetrics {
            step: step + 1,
            loss,
            lr,
            tokens,
            target_tokens: normalizer,
            grad_norm,
            seconds: t0.elapsed().as_secs_f64(),
            gather_seconds,
            skipped,
        };
        if let Some(path) = &metrics_path {
            append_jsonl(path, &serde_json::to_value(&metrics).unwrap_or_default())?;
        }
        if metrics.skipped.is_none() {
            train_curve.push((metrics.step, loss));
            last_loss = Some(loss);
        }
        on_event(Event::Step(&metrics));

        let done = step + 1 == plan.total_steps;
        let Some(output) = output else {
            continue;
        };
        if let (Some(eval), Some(path)) = (&plan.eval_examples, &metrics_path) {
            if done || (o.eval_every > 0 && (step + 1) % o.eval_every as u64 == 0) {
                let eval_loss = trainee.eval_loss(eval, o.batch_size, plan.batcher.grouping())?;
                append_jsonl(path, &json!({ "step": step + 1, "eval_loss": eval_loss }))?;
                eval_curve.push((step + 1, eval_loss));
                last_eval = Some(eval_loss);
                on_event(Event::Eval {
                    step: step + 1,
                    eval_loss,
                });
            }
        }
        if done || (o.save_every > 0 && (step + 1) % o.save_every as u64 == 0) {
            if let Some(dir) = trainee.checkpoint(output.dir(), step + 1, done, &adam, o)? {
                on_event(Event::Checkpoint {
                    step: step + 1,
                    dir: &dir,
                });
            }
        }
    }

    let saved = match output {
        None => PathBuf::new(),
        Some(output) => {
            let saved = trainee.save(output)?;
            // With every step skipped (--skip-nonfinite) there is no curve to draw.
            if !(train_curve.is_empty() && eval_curve.is_empty()) {
                crate::train::plot::plot_loss_curve(
                    &output.path().join(LOSS_PLOT),
                    &train_curve,
                    &eval_curve,
                    T::TITLE,
                )?;
            }
            saved
        }
    };
    Ok(TrainSummary {
        steps: plan.total_steps,
        final_loss: last_loss,
        eval_loss: last_eval,
        adapter_dir: saved,
        trainable_parameters: trainable,
        skipped_steps,
    })
}

/// One step's gradients when they are kept per micro-batch: this rank computes the micro-batches
/// `i` of the step with `i % ranks == rank`, each from zero gradients; every rank then receives
/// all of them and adds them into the trainee's gradients in the order `i = 0, 1, …`, so the sum
/// is the same on any number of ranks. Returns (the step's summed loss, its tokens, the seconds
/// spent in the gathers).
fn shared_step_gradients<T: Trainee>(
    trainee: &mut T,
    stream: &mut BatchStream,
    first: u64,
    o: &TrainOptions,
    normalizer: usize,
    comm: &dyn Collective,
) -> Result<(f64, usize, f64)> {
    let (ranks, rank) = (comm.size(), comm.rank());
    let width: usize = trainee.params()?.iter().map(|p| p.grad.len()).sum();
    let mine: Vec<u64> = (0..o.grad_accum as u64)
        .filter(|i| *i as usize % ranks == rank)
        .collect();
    let mut grads = Vec::with_capacity(mine.len() * width);
    let mut stats = Vec::with_capacity(2 * mine.len());
    for &i in &mine {
        trainee.zero_grads();
        let batch = stream.micro_batch(first + i);
        let (loss, tokens) = match batch.target_tokens {
            0 => (0.0, 0),
            _ => (
                trainee.accumulate(batch, first + i, o, normalizer.max(1) as f64)?,
                batch.lengths.iter().sum::<usize>(),
            ),
        };
        for p in trainee.params()? {
            grads.extend_from_slice(p.grad);
        }
        stats.extend([loss, tokens as f64]);
    }
    let t = Instant::now();
    let (all_grads, all_stats) = (comm.all_gather_f32(&grads)?, comm.all_gather_f64(&stats)?);
    let gather_seconds = t.elapsed().as_secs_f64();
    let per_rank = mine.len();
    trainee.zero_grads();
    let mut params = trainee.params()?;
    let (mut loss_sum, mut tokens) = (0.0f64, 0usize);
    for i in 0..o.grad_accum {
        // Micro-batch i went to rank i % ranks, its slot (i / ranks) there.
        let at = (i % ranks) * per_rank + i / ranks;
        let mut g = &all_grads[at * width..(at + 1) * width];
        for p in params.iter_mut() {
            let (head, rest) = g.split_at(p.grad.len());
            p.grad.iter_mut().zip(head).for_each(|(acc, x)| *acc += x);
            g = rest;
        }
        loss_sum += all_stats[2 * at];
        tokens += all_stats[2 * at + 1] as usize;
    }
    Ok((loss_sum, tokens, gather_seconds))
}

/// The training forward of one micro-batch into `acts`, with `dx` sized for the gradient of its
/// final hidden states, [batch·seq, hidden] (the loss writes all of it); returns the target
/// positions.
pub(crate) fn micro_batch_forward(
    model: &Decoder,
    batch: &Batch,
    adapter: Option<&Adapter>,
    dropout: Dropout,
    acts: &mut Activations,
    dx: &mut Vec<f32>,
) -> Result<Vec<(usize, u32)>> {
    let (b, t) = (batch.batch_size, batch.seq_len);
    let segs = &batch.segments;
    model.train_forward_packed(&batch.input_ids, b, t, segs, adapter, dropout, acts)?;
    // Not cleared: lm_head_loss writes every row (zeros where no target is).
    let n = b * t * model.config.hidden_size;
    if dx.len() < n {
        dx.resize(n, 0.0);
    }
    dx.truncate(n);
    Ok(target_positions(&batch.labels, b, t))
}

/// A LoRA run: the adapter and its gradients over a frozen model.
struct LoraRun<'m> {
    model: &'m Decoder,
    adapter: Adapter,
    grads: LoraGrads,
    acts: Activations,
    /// ∂loss/∂x_final, [batch·seq, hidden] (a work buffer of the backward).
    dx: Vec<f32>,
}

impl Trainee for LoraRun<'_> {
    const WHAT: &'static str = "adapter";
    const TITLE: &'static str = "lorakit train";
    const GRADIENT_PER_MICRO_BATCH: bool = true;

    fn accumulate(
        &mut self,
        batch: &Batch,
        micro_index: u64,
        o: &TrainOptions,
        normalizer: f64,
    ) -> Result<f64> {
        let dropout = Dropout {
            p: self.adapter.config.lora_dropout,
            seed: o.seed ^ micro_index.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        };
        let (model, acts) = (self.model, &mut self.acts);
        acts.recompute = o.recompute;
        let targets = micro_batch_forward(
            model,
            batch,
            Some(&self.adapter),
            dropout,
            acts,
            &mut self.dx,
        )?;
        let loss = lm_head_loss(
            model,
            &acts.x_final,
            &targets,
            o.label_smoothing,
            normalizer,
            Some(&mut self.dx),
        );
        model.train_backward(&mut self.dx, acts, &self.adapter, dropout, &mut self.grads)?;
        Ok(loss)
    }

    fn zero_grads(&mut self) {
        self.grads.zero();
    }

    fn params(&mut self) -> Result<Vec<Param<'_>>> {
        self.grads.params_with(&mut self.adapter)
    }

    fn eval_loss(
        &self,
        examples: &[crate::data::Example],
        batch_size: usize,
        grouping: Grouping,
    ) -> Result<f64> {
        evaluate_loss_grouped(
            self.model,
            Some(&self.adapter),
            examples,
            batch_size,
            grouping,
        )
    }

    fn checkpoint(
        &self,
        out: &OutputDir,
        step: u64,
        _last: bool,
        adam: &AdamW,
        options: &TrainOptions,
    ) -> Result<Option<PathBuf>> {
        save_checkpoint(
            out,
            step,
            &self.adapter,
            adam,
            options,
            options.keep_checkpoints,
        )
        .map(Some)
    }

    fn save(&self, output: &TrainOutput) -> Result<PathBuf> {
        self.adapter.save(output.path())?;
        Ok(output.dir().shown().to_path_buf())
    }
}

/// Runs the plan's LoRA training of `loaded` into the checked `output`; with
/// [`TrainOutput::resume`], continues from its newest checkpoint.
pub fn train(
    loaded: &LoadedModel,
    plan: TrainPlan,
    output: &TrainOutput,
    on_event: impl FnMut(Event),
) -> Result<TrainSummary> {
    train_model(&loaded.model, plan, output, on_event)
}

/// [`train`] for a bare decoder (a test model without a tokenizer, for instance).
pub fn train_model(
    model: &Decoder,
    plan: TrainPlan,
    output: &TrainOutput,
    on_event: impl FnMut(Event),
) -> Result<TrainSummary> {
    output.run(&LORA_OUTPUT_FILES, || {
        train_lora(
            model,
            &plan,
            Some(output),
            output.path(),
            output.resume(),
            &SingleProcess,
            on_event,
        )
    })
}

/// [`train_model`] as one rank of a data-parallel run ([`crate::train::parallel`]): rank 0
/// passes the checked `output` and writes everything; the other ranks pass `None` and, with
/// `resume`, read the checkpoint from `out`, which must then be a directory every rank sees.
/// Every rank returns the same summary; the adapter it names is rank 0's.
pub fn train_model_on_rank(
    model: &Decoder,
    plan: TrainPlan,
    output: Option<&TrainOutput>,
    out: &Path,
    resume: bool,
    comm: &dyn Collective,
    on_event: impl FnMut(Event),
) -> Result<TrainSummary> {
    match output {
        Some(output) => output.run(&LORA_OUTPUT_FILES, || {
            train_lora(model, &plan, Some(output), out, resume, comm, on_event)
        }),
        None => train_lora(model, &plan, None, out, resume, comm, on_event),
    }
}

fn train_lora(
    model: &Decoder,
    plan: &TrainPlan,
    output: Option<&TrainOutput>,
    out: &Path,
    resume: bool,
    comm: &dyn Collective,
    on_event: impl FnMut(Event),
) -> Result<TrainSummary> {
    let Some(mut adapter) = plan.adapter.clone() else {
        return Err(Error::Invalid(
            "the plan is for full fine-tuning (--full); it has no adapter to train".into(),
        ));
    };
    let mut start = Start {
        step: 0,
        adam: AdamW::new(plan.adam, &param_sizes(&adapter)),
        history: Vec::new(),
    };
    if resume {
        let Some((step, a, adam)) = load_checkpoint(out, &model.config, plan.adam)? else {
            return Err(Error::Invalid(format!(
                "--resume: no checkpoint under {}",
                out.join(CHECKPOINTS).display()
            )));
        };
        adapter = a;
        // Keep the metrics of the steps the checkpoint covers; later rows are redone.
        let history = std::fs::read_to_string(out.join(METRICS_FILE))
            .map(|text| {
                text.lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter(|v| v["step"].as_u64().is_some_and(|s| s <= step))
                    .collect()
            })
            .unwrap_or_default();
        start = Start {
            step,
            adam,
            history,
        };
    }
    let grads = LoraGrads::zeros_like(&adapter);
    let mut run = LoraRun {
        model,
        adapter,
        grads,
        acts: Activations::default(),
        dx: Vec::new(),
    };
    run_steps(&mut run, plan, output, comm, start, on_event)
}

/// Used by tests and tools: module ids of an adapter, in parameter order.
pub fn module_order(adapter: &Adapter) -> Vec<ModuleId> {
    adapter.modules.keys().copied().collect()
}
