//! `lorakit`: the command-line face of the library. Each subcommand turns clap arguments into
//! validated options and calls the library; errors are printed as one line and exit non-zero.
//! The program is this crate's [`run`]; `src/main.rs` (and, with the `mpi` feature,
//! `src/bin/lorakit-mpi.rs`) only call it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use lorakit::generate::{generate, token_logprobs, SamplingParams};
use lorakit::model::{load_model, LoadedModel, ModelSource};
use lorakit::tokenize::{ChatMessage, StreamDecoder};

mod adapter_arg;
mod analyze_cmd;
mod eval_cmd;
mod export_cmd;
mod quickstart;
mod serve_api;
mod serve_cmd;
mod sweep_cmd;
mod train_cmd;

/// The model fetched by `scripts/fetch-model.sh`.
pub(crate) const DEFAULT_MODEL_FILE: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(
    name = "lorakit",
    version,
    about = "LoRA fine-tuning of real LLMs on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt or answer a chat message, streaming tokens as they come.
    Generate(GenerateArgs),
    /// Per-token log-probabilities of a text under the model, as JSON.
    Score(ScoreArgs),
    /// Architecture, parameter count, dtypes, tokenizer and chat template of a model.
    Inspect(InspectArgs),
    /// Train a LoRA adapter (PEFT format) on JSONL data.
    Train(Box<train_cmd::TrainArgs>),
    /// Merge adapters into the base weights and write an HF model directory.
    Merge(train_cmd::MergeArgs),
    /// Convert a PEFT adapter to llama.cpp's GGUF LoRA format.
    Export(export_cmd::ExportArgs),
    /// Fetch the default model and the financial NER data, fine-tune LoRA for a few minutes, show
    /// before/after.
    Quickstart(quickstart::QuickstartArgs),
    /// Train and evaluate a grid of LoRA runs (rank, targets, alpha, lr, seed) on one task.
    Sweep(sweep_cmd::SweepArgs),
    /// The LoRA paper's analyses of trained adapters: subspace similarity, amplification.
    Analyze(analyze_cmd::AnalyzeArgs),
    /// Score a model or a predictions file on evaluation data (loss, exact, accuracy, BLEU, ROUGE-L, SQL).
    Eval(Box<eval_cmd::EvalArgs>),
    /// An OpenAI-compatible HTTP server for the model and its adapters (continuous batching).
    Serve(serve_cmd::ServeArgs),
}

#[derive(Args)]
struct ModelArg {
    /// A .gguf file or an HF model directory [default: the fetched SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// An adapter applied unmerged: a PEFT directory or a GGUF adapter file, PATH or
    /// PATH:WEIGHT (repeatable).
    #[arg(long)]
    adapter: Vec<String>,
    /// Frozen-weight arithmetic: f32 (exact, default), bf16 (faster with AVX512-BF16, emulated
    /// elsewhere), or gguf (keep the weights only in the GGUF file's own quantised blocks and
    /// multiply with them: the least memory and the fastest decode; many-row products in f32,
    /// or bf16 with gguf-bf16); int8 and gguf-int8 (train's 8-bit backward) read as bf16 and
    /// gguf-bf16 here.
    #[arg(long, default_value = "f32")]
    precision: String,
}

impl ModelArg {
    fn open(self) -> Result<LoadedModel> {
        let choice: lorakit::model::PrecisionChoice = self.precision.parse()?;
        let gguf_blocks = choice.blocks;
        // Plain `gguf` multiplies in f32 here (prefill); decode's dot products are f32 anyway.
        let precision = choice.arithmetic.unwrap_or(lorakit::model::Precision::F32);
        let mut m = if gguf_blocks {
            let path = resolve_model(self.model)?;
            if path.is_dir() {
                bail!("--precision gguf needs a .gguf model (this one is an HF directory)");
            }
            // The weights stay in the file's blocks, with no f32 copy.
            lorakit::model::load_model_blocks(&path, None)
                .with_context(|| format!("cannot load model {}", path.display()))?
        } else {
            open_model(self.model)?
        };
        attach_adapters(&mut m, &self.adapter)?;
        m.model.set_precision(precision)?;
        Ok(m)
    }
}

/// Loads each `DIR[:WEIGHT]` adapter and attaches it unmerged.
fn attach_adapters(m: &mut LoadedModel, specs: &[String]) -> Result<()> {
    for spec in specs {
        let (adapter, w) = adapter_arg::load_adapter(spec, &m.model.config)?;
        m.model.attach_adapter(&adapter, w)?;
    }
    Ok(())
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Plain text to continue (no chat template).
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    prompt: Option<String>,
    /// A user message, wrapped in the model's chat template with a generation prompt.
    #[arg(long)]
    chat: Option<String>,
    /// A system message for --chat (default: the template's own, if it has one).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = no top-k cut.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating after the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print tokens/s and timings to stderr at the end.
    #[arg(long)]
    stats: bool,
}

#[derive(Args)]
struct ScoreArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Text to score (tokenised without added special tokens).
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    text: Option<String>,
    /// Comma-separated token ids to score.
    #[arg(long, value_delimiter = ',')]
    ids: Option<Vec<u32>>,
    /// Print JSON (the only output format for now; accepted for explicitness).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InspectArgs {
    /// A .gguf file or an HF model directory [default: the fetched SmolLM2-135M-Instruct]
    path: Option<PathBuf>,
}

/// The whole program: parses the command line, runs the command, reports an error as one line.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        // The server keeps its own threads (blocking on sockets) and hands compute to the pool.
        command @ Command::Serve(_) => dispatch(command),
        // The rest runs on a worker of rayon's pool, so that each parallel kernel starts on the
        // thread that calls it. Called from the main thread, every one of the thousands of
        // parallel calls in a training step was handed over to the pool and waited for: two
        // futex wake-ups and a thread switch each, about 5% of a step on 2 cores.
        command => rayon::scope(move |_| dispatch(command)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command.
fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Generate(a) => cmd_generate(a),
        Command::Score(a) => cmd_score(a),
        Command::Inspect(a) => cmd_inspect(a),
        Command::Train(a) => train_cmd::cmd_train(*a),
        Command::Merge(a) => train_cmd::cmd_merge(a),
        Command::Export(a) => export_cmd::cmd_export(a),
        Command::Quickstart(a) => quickstart::cmd_quickstart(a),
        Command::Sweep(a) => sweep_cmd::cmd_sweep(a),
        Command::Analyze(a) => analyze_cmd::cmd_analyze(a),
        Command::Eval(a) => eval_cmd::cmd_eval(*a),
        Command::Serve(a) => serve_cmd::cmd_serve(a),
    }
}

/// The source tree this binary was built from (scripts/, models/, data/ live there).
pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `--model`, or the default model in ./models or in the source tree's models/.
pub(crate) fn resolve_model(arg: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p);
    }
    let candidates = [
        PathBuf::from(DEFAULT_MODEL_FILE),
        repo_root().join(DEFAULT_MODEL_FILE),
    ];
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    bail!("no --model given and the default model is not fetched; run scripts/fetch-model.sh (it puts {DEFAULT_MODEL_FILE} in place)")
}

pub(crate) fn open_model(arg: Option<PathBuf>) -> Result<LoadedModel> {
    let path = resolve_model(arg)?;
    load_model(&path).with_context(|| format!("cannot load model {}", path.display()))
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let m = a.model.open()?;
    let (lm, tok) = (&m.model, m.tokenizer()?);
    let (ids, echo) = match (&a.prompt, &a.chat) {
        (Some(p), _) => {
            if p.is_empty() {
                bail!("--prompt is empty: give some text to continue");
            }
            (tok.encode(p, true)?, Some(p.clone()))
        }
        (None, Some(c)) => {
            if c.trim().is_empty() {
                bail!("--chat is empty: give a message to answer");
            }
            let mut messages = Vec::new();
            if let Some(s) = &a.system {
                messages.push(ChatMessage {
                    role: "system".into(),
                    content: s.clone(),
                });
            }
            messages.push(ChatMessage {
                role: "user".into(),
                content: c.clone(),
            });
            let text = tok
                .apply_chat_template(&messages, true)
                .context("the model has no usable chat template; use --prompt")?;
            (tok.encode(&text, false)?, None)
        }
        (None, None) => bail!("give --prompt TEXT or --chat TEXT"),
    };
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        max_new_tokens: a.max_new_tokens,
        stop_ids: if a.ignore_eos {
            vec![]
        } else {
            tok.eos_ids().to_vec()
        },
    };
    let mut stdout = std::io::stdout().lock();
    if let Some(p) = echo {
        write!(stdout, "{p}")?;
    }
    let mut stream = StreamDecoder::new(tok, &ids);
    let stop_ids = params.stop_ids.clone();
    let start = std::time::Instant::now();
    let mut first_token_at = None;
    let new = generate(lm, &ids, &params, |id| {
        first_token_at.get_or_insert_with(std::time::Instant::now);
        if stop_ids.contains(&id) {
            return Ok(());
        }
        let piece = stream.push(id)?;
        write!(stdout, "{piece}")
            .and_then(|_| stdout.flush())
            .map_err(|e| lorakit::Error::io("<stdout>", e))
    })?;
    writeln!(stdout)?;
    stdout.flush()?;
    if a.stats {
        let total = start.elapsed().as_secs_f64();
        let prefill = first_token_at
            .map(|t| (t - start).as_secs_f64())
            .unwrap_or(total);
        let decoded = new.len().saturating_sub(1).max(1);
        eprintln!(
            "prompt {} tokens, prefill {:.3} s; {} new tokens, decode {:.2} tokens/s",
            ids.len(),
            prefill,
            new.len(),
            decoded as f64 / (total - prefill).max(1e-9)
        );
    }
    Ok(())
}

fn cmd_score(a: ScoreArgs) -> Result<()> {
    let m = a.model.open()?;
    let (lm, tok) = (&m.model, m.tokenizer_opt());
    let ids = match (&a.text, &a.ids) {
        (Some(t), _) => {
            if t.is_empty() {
                bail!("--text is empty: nothing to score");
            }
            m.tokenizer()
                .context("score the model's token ids with --ids instead")?
                .encode(t, false)?
        }
        (None, Some(ids)) => ids.clone(),
        (None, None) => bail!("give --text TEXT or --ids 1,2,3"),
    };
    if ids.is_empty() {
        bail!("nothing to score: the input has no tokens");
    }
    let lps = token_logprobs(lm, &ids)?;
    let tokens: Vec<serde_json::Value> = ids
        .iter()
        .zip(&lps)
        .map(|(&id, lp)| {
            serde_json::json!({
                "id": id,
                // Without a tokenizer (a bare test model) there is no text: null.
                "text": tok.map(|t| t.decode(&[id], false).unwrap_or_default()),
                "logprob": lp,
            })
        })
        .collect();
    let total: f64 = lps.iter().flatten().sum();
    let n = lps.iter().flatten().count();
    let perplexity = if n > 0 {
        (-total / n as f64).exp()
    } else {
        f64::NAN
    };
    let out = serde_json::json!({
        "tokens": tokens,
        "total_logprob": total,
        "perplexity": if perplexity.is_finite() { serde_json::json!(perplexity) } else { serde_json::Value::Null },
    });
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

fn cmd_inspect(a: InspectArgs) -> Result<()> {
    let m = open_model(a.path)?;
    let c = &m.model.config;
    match &m.source {
        ModelSource::Gguf { path, tensor_types } => {
            println!("source:        GGUF file {}", path.display());
            println!("tensor types:  {}", fmt_counts(tensor_types));
        }
        ModelSource::HfDir { dir, files, dtypes } => {
            println!(
                "source:        HF directory {} ({} safetensors file(s))",
                dir.display(),
                files.len()
            );
            println!("tensor dtypes: {}", fmt_counts(dtypes));
        }
    }
    println!("architecture:  {}", c.arch.name());
    println!(
        "parameters:    {} ({:.1} M)",
        c.parameter_count(),
        c.parameter_count() as f64 / 1e6
    );
    println!(
        "shape:         {} layers, hidden {}, intermediate {}, {} heads ({} KV) of {}, vocab {}",
        c.num_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.vocab_size
    );
    let positions = match c.block.positions {
        lorakit::model::spec::Positions::Learned => "learned".to_string(),
        lorakit::model::spec::Positions::Rope => format!("RoPE theta {}", c.rope_theta),
    };
    let norm = match c.block.norm {
        lorakit::model::spec::NormKind::Layer => "LayerNorm",
        lorakit::model::spec::NormKind::Rms { .. } => "RMSNorm",
    };
    println!(
        "context:       {} positions ({positions}), {norm} eps {:e}, tied embeddings: {}",
        c.max_position_embeddings, c.rms_norm_eps, c.tie_word_embeddings
    );
    println!("compute dtype: f32 (weights dequantised on load)");
    println!(
        "tokenizer:     {}",
        match m.tokenizer_opt() {
            Some(t) => t.describe(),
            None => "absent (no tokenizer.json: token ids only)".into(),
        }
    );
    println!(
        "chat template: {}",
        match &m.chat_template {
            Some(t) => format!("present ({} bytes)", t.len()),
            None => "absent".into(),
        }
    );
    Ok(())
}

fn fmt_counts(v: &[(String, usize)]) -> String {
    v.iter()
        .map(|(k, n)| format!("{k} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
