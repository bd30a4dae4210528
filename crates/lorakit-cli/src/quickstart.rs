//! `lorakit quickstart`: the README's main job. Fetches the default model and the financial NER
//! data (`scripts/fetch-data.sh ner`), shows the base model on a few held-out sentences, trains
//! LoRA r=4 α=32 on q_proj,v_proj (the paper's E2E setting) for a few minutes, and shows the
//! difference.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;
use lorakit::data::{load_jsonl, DataOptions, Example};
use lorakit::generate::{generate, SamplingParams};
use lorakit::lora::peft::Adapter;
use lorakit::model::{Decoder, LoadedModel};
use lorakit::train::trainer::{
    evaluate_loss, train, EarlierRun, Event, TrainOptions, TrainOutput, TrainPlan,
};

use crate::{open_model, repo_root, DEFAULT_MODEL_FILE};

/// The answer of a sentence that names no entity.
const NO_ENTITY: &str = "No entities found";

#[derive(Args)]
pub struct QuickstartArgs {
    /// The model to fine-tune (a .gguf file or an HF directory) [default: the fetched
    /// SmolLM2-135M-Instruct]. `scripts/fetch-model.sh gemma3-270m` fetches Gemma 3 270M.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where the adapter, metrics and loss curve go.
    #[arg(long, default_value = "runs/quickstart")]
    out: PathBuf,
    /// Training epochs over the NER training split.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Held-out examples shown before and after training.
    #[arg(long, default_value_t = 3)]
    show: usize,
    /// Write into a directory lorakit did not write (its other files are kept). An earlier
    /// quickstart run there is replaced without it.
    #[arg(long)]
    overwrite: bool,
}

fn run_script(script: &str, args: &[&str]) -> Result<()> {
    let path = repo_root().join("scripts").join(script);
    let status = Command::new("bash")
        .arg(&path)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {}", path.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", path.display());
    }
    Ok(())
}

/// The first `n` held-out examples, in file order, whose sentence names an entity (half the
/// sentences name none; those show less of what training changed).
fn read_prompts(path: &Path, n: usize) -> Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        // One example per sentence: a repeated sentence lists each of its answers.
        if out.len() == n
            || v["completion"].as_str().map(str::trim) == Some(NO_ENTITY)
            || out
                .iter()
                .any(|(p, _): &(String, String)| Some(p.as_str()) == v["prompt"].as_str())
        {
            continue;
        }
        out.push((
            v["prompt"].as_str().unwrap_or_default().to_owned(),
            v["completion"]
                .as_str()
                .unwrap_or_default()
                .trim()
                .to_owned(),
        ));
    }
    Ok(out)
}

fn complete(model: &Decoder, loaded: &LoadedModel, prompt: &str) -> Result<String> {
    let tok = loaded.tokenizer()?;
    let ids = tok.encode(prompt, true)?;
    let mut stop = tok.eos_ids().to_vec();
    // An answer is one line: stop at the first newline token too.
    stop.extend(tok.token_to_id("Ċ"));
    let params = SamplingParams {
        max_new_tokens: 96,
        stop_ids: stop.clone(),
        ..Default::default()
    };
    let mut new = generate(model, &ids, &params, |_| Ok(()))?;
    new.retain(|id| !stop.contains(id));
    Ok(tok.decode(&new, true)?.trim().to_owned())
}

fn mean_loss(model: &Decoder, adapter: Option<&Adapter>, examples: &[Example]) -> Result<f64> {
    Ok(evaluate_loss(model, adapter, examples, 8)?)
}

pub fn cmd_quickstart(a: QuickstartArgs) -> Result<()> {
    let t_start = std::time::Instant::now();
    let data = repo_root().join("data/ner");
    // Checked before anything is fetched: an earlier quickstart run in --out is replaced; an
    // input, a file or a directory lorakit did not write is refused.
    let (model_here, model_in_tree) = match &a.model {
        Some(m) => (m.clone(), m.clone()),
        None => (
            PathBuf::from(DEFAULT_MODEL_FILE),
            repo_root().join(DEFAULT_MODEL_FILE),
        ),
    };
    let output = TrainOutput::prepare(
        &a.out,
        "quickstart",
        &[
            ("model", model_here.as_path()),
            ("model", model_in_tree.as_path()),
            ("NER data", data.as_path()),
        ],
        EarlierRun::Replace,
        a.overwrite,
    )?;
    eprintln!("== 1/5 fetching the model and the financial NER data (once) ==");
    if a.model.is_none() {
        run_script("fetch-model.sh", &[])?;
    }
    run_script("fetch-data.sh", &["ner"])?;
    let mut loaded = open_model(a.model.clone())?;
    // The fastest precision this CPU has (bf16 with AVX512-BF16), for training and decoding.
    let precision = TrainOptions::default().precision()?;
    loaded.model.set_precision(precision)?;
    eprintln!("precision: {precision:?}");
    let shown = read_prompts(&data.join("test.jsonl"), a.show)?;
    let test_opts = DataOptions {
        max_seq_len: 1024,
        add_eos: true,
    };
    let (test, _) = load_jsonl(&data.join("test.jsonl"), loaded.tokenizer()?, &test_opts)?;

    eprintln!("== 2/5 the base model on held-out sentences ==");
    let mut before = Vec::new();
    for (prompt, _) in &shown {
        before.push(complete(&loaded.model, &loaded, prompt)?);
    }
    let base_loss = mean_loss(&loaded.model, None, &test)?;
    eprintln!(
        "base model: test loss {base_loss:.4} over {} held-out examples",
        test.len()
    );

    eprintln!("== 3/5 training LoRA r=4, alpha=32 on q_proj,v_proj ==");
    let options = TrainOptions {
        data: Some(data.join("train.jsonl")),
        eval_data: Some(data.join("validation.jsonl")),
        out: Some(a.out.clone()),
        r: 4,
        alpha: 32.0,
        targets: "q_proj,v_proj".into(),
        epochs: Some(a.epochs),
        batch_size: 8,
        lr: a.lr,
        warmup: 10,
        schedule: "linear".into(),
        seed: 0,
        ..Default::default()
    };
    let plan = TrainPlan::new(options, &loaded, "HuggingFaceTB/SmolLM2-135M-Instruct")?;
    let trainable = plan.trainable_parameters(&loaded.model.config);
    eprintln!(
        "trainable parameters: {} ({:.3}% of {}); {} examples, {} steps",
        trainable,
        100.0 * trainable as f64 / loaded.model.config.parameter_count() as f64,
        loaded.model.config.parameter_count(),
        plan.train_stats.examples,
        plan.total_steps
    );
    let t_train = std::time::Instant::now();
    let mut tokens = 0usize;
    let summary = train(&loaded, plan, &output, |ev| match ev {
        Event::Step(m) => {
            tokens += m.tokens;
            if m.step % 10 == 0 || m.step == 1 {
                eprintln!(
                    "  step {:>4}  loss {:.4}  {:.0} tokens/s",
                    m.step,
                    m.loss,
                    tokens as f64 / t_train.elapsed().as_secs_f64().max(1e-9)
                );
            }
        }
        Event::Eval { step, eval_loss } => {
            eprintln!("  step {step:>4}  validation loss {eval_loss:.4}")
        }
        _ => {}
    })?;

    eprintln!("== 4/5 the adapted model on the same sentences ==");
    let adapter = Adapter::load(&summary.adapter_dir, &loaded.model.config)?;
    let mut adapted = loaded.model.clone();
    adapted.attach_adapter(&adapter, 1.0)?;
    let after_loss = mean_loss(&loaded.model, Some(&adapter), &test)?;
    for (i, (prompt, reference)) in shown.iter().enumerate() {
        let sentence = prompt
            .lines()
            .find_map(|l| l.strip_prefix("Sentence: "))
            .unwrap_or_default();
        println!("\nsentence:  {sentence}");
        println!("reference: {reference}");
        println!("base:      {}", before[i]);
        println!("LoRA:      {}", complete(&adapted, &loaded, prompt)?);
    }

    eprintln!("\n== 5/5 summary ==");
    let drop = 100.0 * (base_loss - after_loss) / base_loss;
    println!(
        "\ntest loss on {} held-out NER examples: base {base_loss:.4} -> LoRA {after_loss:.4} ({drop:.1}% lower)",
        test.len()
    );
    println!(
        "adapter (PEFT format): {}   total time {:.0} s",
        summary.adapter_dir.display(),
        t_start.elapsed().as_secs_f64()
    );
    Ok(())
}
