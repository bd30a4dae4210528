//! Evaluation on tasks: data with references, decoding, and the metrics (loss, exact match,
//! accuracy over choices, corpus BLEU, ROUGE-L, SQL execution match).
//!
//! An evaluation file is JSONL like the training data, one `{"prompt", "completion", ...}`
//! object per line, with the keys the metric needs:
//! - `bleu`, `rouge-l`: `"references"`, a non-empty array of strings;
//! - `exact`: `"references"`, or else `"completion"`;
//! - `sql-exec`: `"references"` (or `"completion"`) and `"schema"`, an SQL script that builds
//!   the database (CREATE TABLE, INSERT, ...);
//! - `accuracy`: `"choices"`, the alternative completions (at least two), one of which is the
//!   `"completion"`.
//!
//! For the generation metrics (`bleu`, `rouge-l`, `exact`, `sql-exec`) lines that repeat an
//! earlier line's prompt are one example (E2E lists one line per reference of a meaning
//! representation); their references are merged. Predictions are one per such example.

pub mod bleu;
pub mod rouge;
pub mod sql;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::str::FromStr;

use serde_json::{json, Map, Value};

use crate::beam::{beam_search, BeamParams};
use crate::data::{Example, IGNORE_INDEX};
use crate::engine::ops::logsumexp;
use crate::generate::{generate, SamplingParams};
use crate::model::decoder::Logits;
use crate::model::CausalLm;
use crate::tokenize::Tokenizer;
use crate::{Error, Result};

/// What `lorakit eval --metric` computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Mean cross-entropy (nats per target token) of the completions, as training reports it.
    Loss,
    /// % of predictions equal to a reference after whitespace and case normalisation.
    Exact,
    /// % of examples whose completion has the highest log-likelihood among the choices.
    Accuracy,
    /// sacrebleu's corpus BLEU (0..100).
    Bleu,
    /// Mean ROUGE-L F (0..100), rouge-score's tokenisation.
    RougeL,
    /// % of predicted queries whose result equals the reference's on the example's database.
    SqlExec,
}

pub const METRIC_NAMES: &str = "loss, exact, accuracy, bleu, rouge-l, sql-exec";

impl FromStr for Metric {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "loss" => Metric::Loss,
            "exact" => Metric::Exact,
            "accuracy" => Metric::Accuracy,
            "bleu" => Metric::Bleu,
            "rouge-l" => Metric::RougeL,
            "sql-exec" => Metric::SqlExec,
            other => {
                return Err(Error::Invalid(format!(
                    "unknown metric '{other}' (known: {METRIC_NAMES})"
                )))
            }
        })
    }
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Loss => "loss",
            Metric::Exact => "exact",
            Metric::Accuracy => "accuracy",
            Metric::Bleu => "bleu",
            Metric::RougeL => "rouge-l",
            Metric::SqlExec => "sql-exec",
        }
    }

    /// Whether the metric scores generated text (the others score log-likelihoods).
    pub fn generates(self) -> bool {
        matches!(
            self,
            Metric::Exact | Metric::Bleu | Metric::RougeL | Metric::SqlExec
        )
    }
}

/// One example of an evaluation file.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalItem {
    /// 1-based line of the file where the example starts.
    pub line: usize,
    pub prompt: String,
    pub completion: Option<String>,
    /// What a generated prediction is compared with.
    pub references: Vec<String>,
    pub schema: Option<String>,
    pub choices: Vec<String>,
}

fn line_error(path: &Path, line: usize, msg: impl std::fmt::Display) -> Error {
    Error::format(path, format!("line {line}: {msg}"))
}

fn str_key(obj: &Map<String, Value>, key: &str) -> std::result::Result<Option<String>, String> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("'{key}' must be a string")),
    }
}

fn str_list(
    obj: &Map<String, Value>,
    key: &str,
) -> std::result::Result<Option<Vec<String>>, String> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("'{key}'[{i}] must be a string"))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(format!("'{key}' must be an array of strings")),
    }
}

/// Reads an evaluation file for `metric` (not `loss`, which reads training data), checking that
/// every line has what the metric needs; errors name the file, the line and the key.
pub fn load_eval_data(path: &Path, metric: Metric) -> Result<Vec<EvalItem>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut items: Vec<EvalItem> = Vec::new();
    let mut by_prompt: HashMap<String, usize> = HashMap::new();
    let need = metric.name();
    for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
        let n = i + 1;
        let bytes = line.map_err(|e| Error::io(path, e))?;
        let text =
            std::str::from_utf8(&bytes).map_err(|_| line_error(path, n, "not valid UTF-8"))?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        if text.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(text)
            .map_err(|e| line_error(path, n, format!("invalid JSON at column {}", e.column())))?;
        let Value::Object(obj) = v else {
            return Err(line_error(path, n, "not a JSON object"));
        };
        let err = |m: String| line_error(path, n, m);
        let prompt = str_key(&obj, "prompt")
            .map_err(err)?
            .ok_or_else(|| line_error(path, n, "missing 'prompt'"))?;
        let completion = str_key(&obj, "completion").map_err(err)?;
        let refs = str_list(&obj, "references").map_err(err)?;
        let schema = str_key(&obj, "schema").map_err(err)?;
        let choices = str_list(&obj, "choices").map_err(err)?.unwrap_or_default();
        let references = match (metric, refs) {
            (_, Some(r)) if r.is_empty() => {
                return Err(line_error(path, n, "'references' is empty"))
            }
            (Metric::Bleu | Metric::RougeL, None) => {
                return Err(line_error(
                    path,
                    n,
                    format!(
                    "missing 'references' (an array of reference texts, needed by --metric {need})"
                ),
                ))
            }
            (Metric::Exact | Metric::SqlExec, None) => match &completion {
                Some(c) => vec![c.trim().to_owned()],
                None => {
                    return Err(line_error(
                        path,
                        n,
                        format!("missing 'references' or 'completion' (needed by --metric {need})"),
                    ))
                }
            },
            (_, r) => r.unwrap_or_default(),
        };
        if metric == Metric::SqlExec && schema.is_none() {
            return Err(line_error(
                path,
                n,
                "missing 'schema' (the SQL script that builds the database, needed by --metric sql-exec)",
            ));
        }
        if metric == Metric::Accuracy {
            if choices.len() < 2 {
                return Err(line_error(
                    path,
                    n,
                    "'choices' must list at least two alternative completions (needed by --metric accuracy)",
                ));
            }
            match &completion {
                None => {
                    return Err(line_error(
                        path,
                        n,
                        "missing 'completion' (the right choice)",
                    ))
                }
                Some(c) if !choices.contains(c) => {
                    return Err(line_error(
                        path,
                        n,
                        format!("'completion' {c:?} is not one of 'choices'"),
                    ))
                }
                _ => {}
            }
        }
        if metric.generates() {
            if let Some(&j) = by_prompt.get(&prompt) {
                let item = &mut items[j];
                for r in references {
                    if !item.references.contains(&r) {
                        item.references.push(r);
                    }
                }
                continue;
            }
            by_prompt.insert(prompt.clone(), items.len());
        }
        items.push(EvalItem {
            line: n,
            prompt,
            completion,
            references,
            schema,
            choices,
        });
    }
    if items.is_empty() {
        return Err(Error::format(
            path,
            "no examples: the file is empty or has only blank lines",
        ));
    }
    Ok(items)
}

/// Reads predictions: one JSON string per line (blank lines skipped), in data order.
pub fn load_predictions(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::String(s)) => out.push(s),
            _ => {
                return Err(line_error(
                    path,
                    i + 1,
                    "not a JSON string (predictions are one JSON string per line)",
                ))
            }
        }
    }
    Ok(out)
}

/// Lowercased, whitespace runs collapsed to one space, trimmed.
pub fn normalize(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// A metric's value and what else is worth reporting (JSON object).
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub score: f64,
    pub n: usize,
    pub details: Value,
}

/// Scores predictions (one per item, in order) with a generation metric, or `accuracy` (a
/// prediction is then the chosen completion). `data` names the file in errors.
pub fn score_predictions(
    metric: Metric,
    items: &[EvalItem],
    predictions: &[String],
    data: &Path,
) -> Result<Score> {
    assert_eq!(items.len(), predictions.len(), "one prediction per item");
    let n = items.len();
    let pct = |k: usize| {
        if n == 0 {
            0.0
        } else {
            100.0 * k as f64 / n as f64
        }
    };
    Ok(match metric {
        Metric::Loss => {
            return Err(Error::Invalid(
                "--metric loss needs a model (log-likelihoods), not predictions".into(),
            ))
        }
        Metric::Bleu => {
            let refs: Vec<Vec<String>> = items.iter().map(|i| i.references.clone()).collect();
            let b = bleu::corpus_bleu(predictions, &refs);
            Score {
                score: b.score,
                n,
                details: json!({
                    "precisions": b.precisions, "brevity_penalty": b.brevity_penalty,
                    "sys_len": b.sys_len, "ref_len": b.ref_len,
                    "signature": "sacrebleu nrefs:var|case:mixed|eff:no|tok:13a|smooth:exp|version:2.x",
                }),
            }
        }
        Metric::RougeL => {
            let refs: Vec<Vec<String>> = items.iter().map(|i| i.references.clone()).collect();
            Score {
                score: rouge::corpus_rouge_l(predictions, &refs),
                n,
                details: json!({"tokenizer": "rouge-score default (lowercase, [a-z0-9]+ tokens, no stemming)"}),
            }
        }
        Metric::Exact => {
            let k = items
                .iter()
                .zip(predictions)
                .filter(|(it, p)| {
                    let p = normalize(p);
                    it.references.iter().any(|r| normalize(r) == p)
                })
                .count();
            Score {
                score: pct(k),
                n,
                details: json!({"correct": k}),
            }
        }
        Metric::Accuracy => {
            let k = items
                .iter()
                .zip(predictions)
                .filter(|(it, p)| it.completion.as_deref().map(str::trim) == Some(p.trim()))
                .count();
            Score {
                score: pct(k),
                n,
                details: json!({"correct": k}),
            }
        }
        Metric::SqlExec => {
            let (mut k, mut failed) = (0usize, 0usize);
            for (it, p) in items.iter().zip(predictions) {
                let schema = it.schema.as_deref().unwrap_or_default();
                let mut any = false;
                let mut errored = true;
                for r in &it.references {
                    let m = sql::execution_match(schema, r, p).map_err(|e| {
                        line_error(data, it.line, format!("'schema'/'references': {e}"))
                    })?;
                    errored &= m.prediction_error.is_some();
                    any |= m.matched;
                }
                k += any as usize;
                failed += errored as usize;
            }
            Score {
                score: pct(k),
                n,
                details: json!({"correct": k, "predictions_that_fail_to_run": failed}),
            }
        }
    })
}

/// How to generate a prediction.
#[derive(Debug, Clone)]
pub enum Decode {
    Greedy,
    Beam(BeamParams),
}

/// Every token whose text contains a line break: generation stops there, since every task here
/// has one-line completions.
pub fn newline_ids(tok: &Tokenizer) -> Vec<u32> {
    (0..tok.vocab_size() as u32)
        .filter(|&id| tok.decode(&[id], false).is_ok_and(|s| s.contains('\n')))
        .collect()
}

/// The model's completion of `prompt` (encoded with the tokenizer's special tokens, as in
/// training): generated until EOS, a line break after some text, or `max_new_tokens`; the text
/// before that line break, trimmed. Line breaks before any text are skipped (a base model often
/// starts its answer on a new line): decoding continues after them within the same budget.
/// `stop_ids` must hold the EOS and newline ids.
pub fn predict<M: CausalLm + ?Sized>(
    model: &M,
    tok: &Tokenizer,
    prompt: &str,
    decode: &Decode,
    max_new_tokens: usize,
    stop_ids: &[u32],
) -> Result<String> {
    let mut ids = tok.encode(prompt, true)?;
    let mut budget = max_new_tokens;
    loop {
        let mut new = match decode {
            Decode::Greedy => {
                let params = SamplingParams {
                    max_new_tokens: budget,
                    stop_ids: stop_ids.to_vec(),
                    ..Default::default()
                };
                generate(model, &ids, &params, |_| Ok(()))?
            }
            Decode::Beam(b) => {
                let params = BeamParams {
                    max_new_tokens: budget,
                    stop_ids: stop_ids.to_vec(),
                    ..b.clone()
                };
                beam_search(model, &ids, &params)?
                    .into_iter()
                    .next()
                    .map(|h| h.tokens)
                    .unwrap_or_default()
            }
        };
        let all = new.clone();
        // The stop token's own text may hold the line break, and something before it.
        let mut tail = String::new();
        let mut at_line_break = false;
        if let Some(&last) = new.last() {
            if stop_ids.contains(&last) {
                new.pop();
                if !tok.eos_ids().contains(&last) {
                    tail = tok.decode(&[last], true)?;
                    at_line_break = true;
                }
            }
        }
        let text = tok.decode(&new, true)? + &tail;
        let can_continue = all.len() < budget
            && ids.len() + all.len() + 1 < model.config().max_position_embeddings;
        if at_line_break && text.trim().is_empty() && can_continue {
            budget -= all.len();
            ids.extend(all);
            continue;
        }
        return Ok(text
            .split('\n')
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned());
    }
}

/// log P(choice | prompt) for each choice: `encode(prompt, true) ++ encode(choice, false)`, the
/// same split as training's prompt/completion. The prompt runs once; each choice continues a
/// copy of its KV cache.
pub fn choice_logprobs<M: CausalLm + ?Sized>(
    model: &M,
    tok: &Tokenizer,
    prompt: &str,
    choices: &[String],
) -> Result<Vec<f64>> {
    let ids = tok.encode(prompt, true)?;
    let encoded: Vec<Vec<u32>> = choices
        .iter()
        .map(|c| tok.encode(c, false))
        .collect::<Result<_>>()?;
    let longest = encoded.iter().map(Vec::len).max().unwrap_or(0);
    if ids.is_empty() {
        return Err(Error::Invalid("the prompt has no tokens".into()));
    }
    let mut cache = model.new_cache(ids.len() + longest)?;
    // [vocab]: the distribution of the first choice token.
    let first = model.forward(&ids, &mut cache, Logits::Last)?;
    let v = model.config().vocab_size;
    let mut out = Vec::with_capacity(choices.len());
    for (c, toks) in choices.iter().zip(&encoded) {
        if toks.is_empty() {
            return Err(Error::Invalid(format!("the choice {c:?} has no tokens")));
        }
        let mut lp = first[toks[0] as usize] as f64 - logsumexp(&first);
        if toks.len() > 1 {
            let mut cc = cache.clone();
            // [T-1, vocab]: row t predicts toks[t + 1].
            let logits = model.forward(&toks[..toks.len() - 1], &mut cc, Logits::All)?;
            for (t, &next) in toks[1..].iter().enumerate() {
                let row = &logits[t * v..(t + 1) * v];
                lp += row[next as usize] as f64 - logsumexp(row);
            }
        }
        out.push(lp);
    }
    Ok(out)
}

/// Summed negative log-likelihood of an example's target tokens and their count (the trainer's
/// next-token shift: logits at t score labels[t + 1]).
pub fn example_nll<M: CausalLm + ?Sized>(model: &M, ex: &Example) -> Result<(f64, usize)> {
    let v = model.config().vocab_size;
    // [T, vocab]
    let logits = model.logits(&ex.input_ids)?;
    let (mut sum, mut count) = (0.0, 0usize);
    for t in 0..ex.input_ids.len().saturating_sub(1) {
        let label = ex.labels[t + 1];
        if label == IGNORE_INDEX {
            continue;
        }
        let row = &logits[t * v..(t + 1) * v];
        sum += logsumexp(row) - row[label as usize] as f64;
        count += 1;
    }
    Ok((sum, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(refs: &[&str]) -> EvalItem {
        EvalItem {
            line: 1,
            prompt: "p".into(),
            completion: None,
            references: refs.iter().map(|s| s.to_string()).collect(),
            schema: Some("CREATE TABLE t (x NUMERIC); INSERT INTO t VALUES (1), (2);".into()),
            choices: vec![],
        }
    }

    #[test]
    fn exact_match_normalises_case_and_whitespace() {
        let items = [item(&["The  Cat"]), item(&["a", "b"])];
        let preds = [" the cat ".to_string(), "c".to_string()];
        let s = score_predictions(Metric::Exact, &items, &preds, Path::new("d")).unwrap();
        assert_eq!(s.score, 50.0);
    }

    #[test]
    fn sql_exec_matches_where_exact_match_fails() {
        let items = [item(&["SELECT count(*) FROM t"])];
        let preds = ["select count(x) from t where x > 0".to_string()];
        let d = Path::new("d");
        assert_eq!(
            score_predictions(Metric::Exact, &items, &preds, d)
                .unwrap()
                .score,
            0.0
        );
        assert_eq!(
            score_predictions(Metric::SqlExec, &items, &preds, d)
                .unwrap()
                .score,
            100.0
        );
    }

    #[test]
    fn unknown_metric_is_named() {
        let e = "blue".parse::<Metric>().unwrap_err().to_string();
        assert!(e.contains("'blue'") && e.contains("rouge-l"), "{e}");
    }
}
