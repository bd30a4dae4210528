//! `lorakit eval`: scores a model (optionally with adapters) or a file of predictions on an
//! evaluation JSONL file with one metric, and prints the score (or a JSON summary).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lorakit::beam::BeamParams;
use lorakit::data::{load_jsonl, DataOptions};
use lorakit::eval::{
    choice_logprobs, example_nll, load_eval_data, load_predictions, newline_ids, predict,
    score_predictions, Decode, EvalItem, Metric, Score,
};
use lorakit::io::output::{prepare_output_file, OutputFile};
use serde_json::json;

use crate::ModelArg;

#[derive(Args)]
pub struct EvalArgs {
    /// A .gguf file or an HF model directory [default: the fetched SmolLM2-135M-Instruct]
    #[arg(long, conflicts_with = "predictions")]
    model: Option<PathBuf>,
    /// A PEFT adapter applied unmerged: DIR or DIR:WEIGHT (repeatable).
    #[arg(long, conflicts_with = "predictions")]
    adapter: Vec<String>,
    /// Frozen-weight arithmetic: f32 (exact, default), bf16 (faster with AVX512-BF16, emulated
    /// elsewhere), or gguf (the GGUF file's own quantised blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
    /// Q4_K, Q5_K, Q6_K).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Evaluation data: JSONL with "prompt" and the keys the metric needs ("references",
    /// "schema", "choices", "completion").
    #[arg(long)]
    data: PathBuf,
    /// loss | exact | accuracy | bleu | rouge-l | sql-exec
    #[arg(long)]
    metric: String,
    /// Score these predictions (one JSON string per line, in data order) instead of a model.
    #[arg(long)]
    predictions: Option<PathBuf>,
    /// Write the model's predictions here (one JSON string per line), for --predictions later.
    /// An existing file is replaced only if it is such a predictions file (or with --overwrite).
    #[arg(long, conflicts_with = "predictions")]
    save_predictions: Option<PathBuf>,
    /// Let --save-predictions replace a file that is not a predictions file.
    #[arg(long, requires = "save_predictions")]
    overwrite: bool,
    /// greedy | beam
    #[arg(long, default_value = "greedy")]
    decode: String,
    /// Beams for --decode beam.
    #[arg(long, default_value_t = 4)]
    beams: usize,
    /// Beam scores are sum logprob / length^L (Hugging Face's convention).
    #[arg(long, default_value_t = 1.0)]
    length_penalty: f32,
    /// Never generate an n-gram of this size twice in a prediction (0 = off).
    #[arg(long, default_value_t = 0)]
    no_repeat_ngram: usize,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Evaluate only the first N examples.
    #[arg(long)]
    limit: Option<usize>,
    /// Print a JSON summary (the metric's value under "score") instead of a line of text.
    #[arg(long)]
    json: bool,
}

fn progress(n: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(n as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(&format!("{{bar:30}} {{pos}}/{{len}} {what}  eta {{eta}}"))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn decode_options(a: &EvalArgs) -> Result<Decode> {
    match a.decode.as_str() {
        "greedy" => Ok(Decode::Greedy),
        "beam" => {
            let p = BeamParams {
                beams: a.beams,
                length_penalty: a.length_penalty,
                no_repeat_ngram: a.no_repeat_ngram,
                max_new_tokens: a.max_new_tokens,
                stop_ids: vec![],
            };
            p.validate()?;
            Ok(Decode::Beam(p))
        }
        other => bail!("unknown --decode '{other}' (known: greedy, beam)"),
    }
}

pub fn cmd_eval(a: EvalArgs) -> Result<()> {
    let metric: Metric = a.metric.parse()?;
    let decode = decode_options(&a)?;
    if a.limit == Some(0) {
        bail!("--limit 0 leaves nothing to evaluate");
    }
    // Checked before anything loads: not a directory, not an input, and not a file that eval
    // did not write (without --overwrite).
    let save = match &a.save_predictions {
        Some(p) => Some(predictions_output(&a, p)?),
        None => None,
    };
    let start = Instant::now();
    let (score, source) = match &a.predictions {
        Some(p) => (score_file(&a, metric, p)?, json!({ "predictions": p })),
        None => {
            let s = score_model(&a, metric, &decode, save.as_ref())?;
            let model = crate::resolve_model(a.model.clone())?;
            (
                s,
                json!({ "model": model, "adapter": a.adapter, "precision": a.precision }),
            )
        }
    };
    let decode_json = match (&decode, metric.generates() && a.predictions.is_none()) {
        (_, false) => serde_json::Value::Null,
        (Decode::Greedy, true) => json!({"method": "greedy", "max_new_tokens": a.max_new_tokens}),
        (Decode::Beam(b), true) => json!({
            "method": "beam", "beams": b.beams, "length_penalty": b.length_penalty,
            "no_repeat_ngram": b.no_repeat_ngram, "max_new_tokens": a.max_new_tokens,
        }),
    };
    if a.json {
        let mut out = json!({
            "metric": metric.name(),
            "score": score.score,
            "n": score.n,
            "data": a.data,
            "limit": a.limit,
            "decode": decode_json,
            "details": score.details,
            "seconds": start.elapsed().as_secs_f64(),
        });
        if let (Some(o), Some(s)) = (out.as_object_mut(), source.as_object()) {
            o.extend(s.clone());
        }
        println!("{}", serde_json::to_string(&out)?);
    } else {
        let unit = if metric == Metric::Loss {
            ""
        } else {
            " (0-100)"
        };
        println!(
            "{} {:.4}{unit} on {} examples of {}",
            metric.name(),
            score.score,
            score.n,
            a.data.display()
        );
    }
    Ok(())
}

fn limited(mut items: Vec<EvalItem>, limit: Option<usize>) -> Vec<EvalItem> {
    if let Some(l) = limit {
        items.truncate(l);
    }
    items
}

fn score_file(a: &EvalArgs, metric: Metric, path: &Path) -> Result<Score> {
    if metric == Metric::Loss {
        bail!("--metric loss needs a model (it scores log-likelihoods), not --predictions");
    }
    let items = limited(load_eval_data(&a.data, metric)?, a.limit);
    let preds = load_predictions(path)?;
    if preds.len() != items.len() {
        bail!(
            "{}: {} predictions, but {} has {} examples{} (lines with the same prompt count once)",
            path.display(),
            preds.len(),
            a.data.display(),
            items.len(),
            if a.limit.is_some() {
                " within --limit"
            } else {
                ""
            }
        );
    }
    Ok(score_predictions(metric, &items, &preds, &a.data)?)
}

/// Whether `path` is a predictions file as `--save-predictions` writes them (one JSON string
/// per line; an empty file too).
fn is_predictions_file(path: &Path) -> bool {
    // A predictions file of a few thousand lines is kilobytes; a huge file is something else.
    std::fs::metadata(path).is_ok_and(|m| m.len() <= 1 << 30) && load_predictions(path).is_ok()
}

fn predictions_output(a: &EvalArgs, path: &Path) -> Result<OutputFile> {
    let model = crate::resolve_model(a.model.clone()).ok();
    let adapters = a
        .adapter
        .iter()
        .map(|s| crate::adapter_arg::parse_adapter_spec(s).map(|(d, _)| d))
        .collect::<Result<Vec<_>>>()?;
    let mut inputs = vec![("--data", a.data.as_path())];
    if let Some(m) = &model {
        inputs.push(("--model", m.as_path()));
    }
    inputs.extend(adapters.iter().map(|d| ("--adapter", d.as_path())));
    Ok(prepare_output_file(
        path,
        &inputs,
        a.overwrite,
        "a predictions file written by lorakit eval (one JSON string per line)",
        &is_predictions_file,
    )?)
}

fn score_model(
    a: &EvalArgs,
    metric: Metric,
    decode: &Decode,
    save: Option<&OutputFile>,
) -> Result<Score> {
    // Check the data before the (slower) model load, so that bad input fails fast.
    let items = if metric == Metric::Loss {
        vec![]
    } else {
        limited(load_eval_data(&a.data, metric)?, a.limit)
    };
    // Any architecture, adapters attached unmerged, in the chosen precision.
    let opened = ModelArg {
        model: a.model.clone(),
        adapter: a.adapter.clone(),
        precision: a.precision.clone(),
    }
    .open()?;
    let model = &opened.model;
    let tok = opened.tokenizer().context("eval reads its data as text")?;
    match metric {
        Metric::Loss => {
            let opts = DataOptions {
                max_seq_len: model.config.max_position_embeddings,
                add_eos: true,
            };
            let (mut examples, _) = load_jsonl(&a.data, tok, &opts)?;
            if let Some(l) = a.limit {
                examples.truncate(l);
            }
            let bar = progress(examples.len(), "examples");
            let (mut sum, mut count) = (0.0, 0usize);
            for ex in &examples {
                let (s, c) = example_nll(model, ex)?;
                sum += s;
                count += c;
                bar.inc(1);
            }
            bar.finish_and_clear();
            if count == 0 {
                bail!("{}: no target tokens to score", a.data.display());
            }
            Ok(Score {
                score: sum / count as f64,
                n: examples.len(),
                details: json!({"target_tokens": count, "perplexity": (sum / count as f64).exp()}),
            })
        }
        Metric::Accuracy => {
            let bar = progress(items.len(), "examples");
            let mut preds = Vec::with_capacity(items.len());
            for it in &items {
                let lps = choice_logprobs(model, tok, &it.prompt, &it.choices)
                    .with_context(|| format!("{}: line {}", a.data.display(), it.line))?;
                let best = lps
                    .iter()
                    .enumerate()
                    .max_by(|x, y| x.1.total_cmp(y.1).then(y.0.cmp(&x.0)))
                    .map_or(0, |(i, _)| i);
                preds.push(it.choices[best].clone());
                bar.inc(1);
            }
            bar.finish_and_clear();
            save_predictions(save, &preds)?;
            Ok(score_predictions(metric, &items, &preds, &a.data)?)
        }
        _ => {
            let mut stop = tok.eos_ids().to_vec();
            stop.extend(newline_ids(tok));
            let bar = progress(items.len(), "examples");
            let mut preds = Vec::with_capacity(items.len());
            for it in &items {
                let p = predict(model, tok, &it.prompt, decode, a.max_new_tokens, &stop)
                    .with_context(|| format!("{}: line {}", a.data.display(), it.line))?;
                preds.push(p);
                bar.inc(1);
            }
            bar.finish_and_clear();
            save_predictions(save, &preds)?;
            Ok(score_predictions(metric, &items, &preds, &a.data)?)
        }
    }
}

fn save_predictions(save: Option<&OutputFile>, preds: &[String]) -> Result<()> {
    let Some(out) = save else {
        return Ok(());
    };
    out.write_with(|f| {
        let mut w = std::io::BufWriter::new(f);
        for p in preds {
            writeln!(
                w,
                "{}",
                serde_json::to_string(p).map_err(std::io::Error::other)?
            )?;
        }
        w.flush()
    })?;
    Ok(())
}
