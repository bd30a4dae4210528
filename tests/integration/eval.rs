//! `lorakit eval` and the evaluation library: BLEU and ROUGE-L against sacrebleu / rouge-score
//! (`tests/data/bleu/`, made by `scripts/make-bleu-fixture.py`), SQL execution match, beam
//! search against greedy decoding, clear errors for bad input, and real-model runs on the
//! fetched NER, sarcasm and text-to-SQL data (fetched here, never skipped).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use lorakit::beam::{beam_search, BeamParams};
use lorakit::eval::{bleu::corpus_bleu, rouge::corpus_rouge_l, rouge::rouge_l_multi};
use lorakit::generate::{generate, SamplingParams};

use crate::common::*;

/// `scripts/fetch-data.sh NAME`, once per data set and test process.
fn data_dir(name: &str) -> PathBuf {
    static FETCHED: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let map = FETCHED.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(name.to_owned())
        .or_insert_with(|| {
            let root = repo_root();
            let status = Command::new("bash")
                .arg(root.join("scripts/fetch-data.sh"))
                .arg(name)
                .status()
                .expect("run fetch-data.sh");
            assert!(status.success(), "scripts/fetch-data.sh {name} failed");
            root.join("data").join(name)
        })
        .clone()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn bleu_and_rouge_l_match_sacrebleu_and_rouge_score() {
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/data/bleu/cases.json")).unwrap(),
    )
    .unwrap();
    let (mut max_bleu, mut max_rouge) = (0.0f64, 0.0f64);
    for (name, case) in fx["cases"].as_object().unwrap() {
        let hyps = strings(&case["hypotheses"]);
        let refs: Vec<Vec<String>> = case["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(strings)
            .collect();
        let want = &case["bleu"];
        let got = corpus_bleu(&hyps, &refs);
        let d = (got.score - want["score"].as_f64().unwrap()).abs();
        max_bleu = max_bleu.max(d);
        assert!(
            d <= 0.1,
            "{name}: BLEU {} vs sacrebleu {}",
            got.score,
            want["score"]
        );
        // The statistics themselves are integers: they must be equal.
        let ints = |v: &serde_json::Value| -> Vec<usize> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect()
        };
        assert_eq!(
            got.correct.to_vec(),
            ints(&want["counts"]),
            "{name}: matches"
        );
        assert_eq!(got.total.to_vec(), ints(&want["totals"]), "{name}: totals");
        assert_eq!(
            got.sys_len as u64,
            want["sys_len"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            got.ref_len as u64,
            want["ref_len"].as_u64().unwrap(),
            "{name}"
        );

        let rouge = &case["rouge_l"];
        for (i, f) in rouge["per_example_f"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let ours = rouge_l_multi(&refs[i], &hyps[i]);
            let d = (ours - f.as_f64().unwrap()).abs();
            assert!(d < 1e-9, "{name}[{i}]: ROUGE-L F {ours} vs rouge-score {f}");
        }
        let d = (corpus_rouge_l(&hyps, &refs) - rouge["score"].as_f64().unwrap()).abs();
        max_rouge = max_rouge.max(d);
        assert!(d < 1e-9, "{name}: corpus ROUGE-L");
    }
    eprintln!(
        "max |BLEU - sacrebleu| = {max_bleu:.2e}, max |ROUGE-L - rouge-score| = {max_rouge:.2e}"
    );
}

/// Runs lorakit and checks: exit code 1, no panic, one line of error naming every needle.
fn assert_fails_with(args: &[&str], needles: &[&str]) {
    let out = lorakit(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "lorakit {args:?}: {err}");
    assert!(
        !err.contains("panicked"),
        "lorakit {args:?} panicked: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line of error: {err}");
    for n in needles {
        assert!(
            err.contains(n),
            "stderr of lorakit {args:?} lacks {n:?}: {err}"
        );
    }
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

const SCHEMA: &str = "CREATE TABLE singer (id NUMERIC, name TEXT, age NUMERIC); \
                      INSERT INTO singer VALUES (1, 'Ann', 30), (2, 'Bob', 25), (3, 'Cy', 30);";

#[test]
fn sql_execution_match_holds_where_string_match_fails() {
    let dir = tempfile::tempdir().unwrap();
    let line = |q: &str, r: &str| {
        serde_json::json!({"prompt": q, "completion": format!(" {r}"), "references": [r], "schema": SCHEMA})
            .to_string()
    };
    let data = write(
        dir.path(),
        "sql.jsonl",
        &[
            line(
                "How many singers are 30?",
                "SELECT count(*) FROM singer WHERE age = 30",
            ),
            line(
                "Names of singers, oldest first",
                "SELECT name FROM singer ORDER BY age DESC, name",
            ),
        ]
        .join("\n"),
    );
    let preds = write(
        dir.path(),
        "preds.jsonl",
        "\"select COUNT(id) from singer where age >= 30;\"\n\"SELECT name FROM singer ORDER BY age, name\"\n",
    );
    let score = |metric: &str| {
        let out = lorakit(&[
            "eval",
            "--data",
            &data,
            "--predictions",
            &preds,
            "--metric",
            metric,
            "--json",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["n"], 2);
        v["score"].as_f64().unwrap()
    };
    // The first is the same result by another query; the second has the wrong order.
    assert_eq!(score("exact"), 0.0);
    assert_eq!(score("sql-exec"), 50.0);
}

#[test]
fn bad_eval_input_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let no_refs = write(
        dir.path(),
        "norefs.jsonl",
        "{\"prompt\": \"a\", \"completion\": \" b\", \"references\": [\"b\"]}\n{\"prompt\": \"c\", \"completion\": \" d\"}\n",
    );
    assert_fails_with(
        &["eval", "--data", &no_refs, "--metric", "blue"],
        &["unknown metric 'blue'", "bleu", "rouge-l", "sql-exec"],
    );
    assert_fails_with(
        &["eval", "--data", &no_refs, "--metric", "bleu"],
        &["norefs.jsonl", "line 2", "'references'"],
    );
    let no_schema = write(
        dir.path(),
        "noschema.jsonl",
        &format!(
            "{}\n{}\n",
            serde_json::json!({"prompt": "q", "completion": " SELECT 1", "schema": SCHEMA}),
            serde_json::json!({"prompt": "r", "completion": " SELECT 2"})
        ),
    );
    assert_fails_with(
        &["eval", "--data", &no_schema, "--metric", "sql-exec"],
        &["noschema.jsonl", "line 2", "'schema'"],
    );
    // A schema or reference that does not run is the data's fault: named, not a mismatch.
    let bad_ref = write(
        dir.path(),
        "badref.jsonl",
        &format!(
            "{}\n",
            serde_json::json!({"prompt": "q", "references": ["SELECT nope FROM singer"], "schema": SCHEMA})
        ),
    );
    let preds = write(dir.path(), "p1.jsonl", "\"SELECT 1\"\n");
    assert_fails_with(
        &[
            "eval",
            "--data",
            &bad_ref,
            "--metric",
            "sql-exec",
            "--predictions",
            &preds,
        ],
        &[
            "badref.jsonl",
            "line 1",
            "reference query does not run",
            "nope",
        ],
    );
    // Predictions: wrong count, not a JSON string.
    let two = write(dir.path(), "p2.jsonl", "\"b\"\n\"d\"\n");
    assert_fails_with(
        &[
            "eval",
            "--data",
            &bad_ref,
            "--metric",
            "exact",
            "--predictions",
            &two,
        ],
        &["p2.jsonl", "2 predictions", "1 examples"],
    );
    let not_str = write(dir.path(), "p3.jsonl", "{\"text\": \"b\"}\n");
    assert_fails_with(
        &[
            "eval",
            "--data",
            &bad_ref,
            "--metric",
            "exact",
            "--predictions",
            &not_str,
        ],
        &["p3.jsonl", "line 1", "JSON string"],
    );
    let choices = write(
        dir.path(),
        "choices.jsonl",
        "{\"prompt\": \"p\", \"completion\": \" x\", \"choices\": [\" y\", \" z\"]}\n",
    );
    assert_fails_with(
        &["eval", "--data", &choices, "--metric", "accuracy"],
        &["choices.jsonl", "line 1", "'completion'", "'choices'"],
    );
    assert_fails_with(
        &[
            "eval", "--data", &choices, "--metric", "bleu", "--decode", "sampled",
        ],
        &["--decode", "sampled"],
    );
}

fn ner_prompts(n: usize) -> Vec<Vec<u32>> {
    let tok = real_model().tokenizer().unwrap();
    let text = std::fs::read_to_string(data_dir("ner").join("test.jsonl")).unwrap();
    let mut seen = Vec::new();
    for l in text.lines() {
        let p = serde_json::from_str::<serde_json::Value>(l).unwrap()["prompt"]
            .as_str()
            .unwrap()
            .to_owned();
        if !seen.contains(&p) {
            seen.push(p);
        }
        if seen.len() == n {
            break;
        }
    }
    seen.iter().map(|p| tok.encode(p, true).unwrap()).collect()
}

#[test]
fn beam_search_with_one_beam_is_greedy() {
    let m = real_model();
    let eos = m.tokenizer().unwrap().eos_ids().to_vec();
    for (i, prompt) in ner_prompts(3).iter().enumerate() {
        // Stopping at EOS (length penalty 0: the finished hypothesis cannot be beaten), and
        // running to the token limit with the HF default length penalty 1.
        for (stop, lp) in [(eos.clone(), 0.0f32), (vec![], 1.0)] {
            let greedy = generate(
                &m.model,
                prompt,
                &SamplingParams {
                    max_new_tokens: 20,
                    stop_ids: stop.clone(),
                    ..Default::default()
                },
                |_| Ok(()),
            )
            .unwrap();
            let params = BeamParams {
                beams: 1,
                length_penalty: lp,
                no_repeat_ngram: 0,
                max_new_tokens: 20,
                stop_ids: stop,
            };
            let beam = beam_search(&m.model, prompt, &params).unwrap();
            assert_eq!(beam[0].tokens, greedy, "prompt {i}, length penalty {lp}");
        }
    }
}

#[test]
fn beam_search_blocks_repeated_ngrams_and_ranks_hypotheses() {
    let m = real_model();
    // The base model repeats itself on NER prompts (greedy: "the event is a Borrowing Event, and
    // the event is a Borrowing Event, ..."); find a prompt where a 3-gram repeats.
    let repeats = |t: &[u32], n: usize| {
        let mut seen = std::collections::HashSet::new();
        t.windows(n).any(|w| !seen.insert(w.to_vec()))
    };
    let prompts = ner_prompts(3);
    let base = BeamParams {
        beams: 3,
        length_penalty: 1.0,
        no_repeat_ngram: 0,
        max_new_tokens: 40,
        stop_ids: vec![],
    };
    let prompt = prompts
        .iter()
        .find(|p| repeats(&beam_search(&m.model, p, &base).unwrap()[0].tokens, 3))
        .expect("a prompt whose beam output repeats a 3-gram");
    let blocked = BeamParams {
        no_repeat_ngram: 3,
        ..base.clone()
    };
    let hyps = beam_search(&m.model, prompt, &blocked).unwrap();
    assert_eq!(hyps.len(), 3);
    for h in &hyps {
        assert_eq!(h.tokens.len(), 40);
        assert!(!repeats(&h.tokens, 3), "a 3-gram repeats: {:?}", h.tokens);
        assert!(
            (h.score - h.sum_logprob / 40f64).abs() < 1e-9,
            "score = sum / len^1"
        );
    }
    assert!(
        hyps.windows(2).all(|w| w[0].score >= w[1].score),
        "best first"
    );
}

fn eval_json(args: &[&str]) -> serde_json::Value {
    let out = lorakit(args);
    assert!(out.status.success(), "lorakit {args:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn real_model_bleu_on_ner_and_predictions_round_trip() {
    let _ = real_model_path();
    let test = data_dir("ner").join("test.jsonl");
    let test = test.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let preds = dir.path().join("preds.jsonl");
    let preds = preds.to_str().unwrap();
    let v = eval_json(&[
        "eval",
        "--data",
        test,
        "--metric",
        "bleu",
        "--limit",
        "6",
        "--max-new-tokens",
        "48",
        "--json",
        "--save-predictions",
        preds,
    ]);
    let bleu = v["score"].as_f64().unwrap();
    // The first 3 sentences share no word with the base model's answers (BLEU 0); 6 do.
    eprintln!("base SmolLM2, greedy, 6 NER test sentences: BLEU {bleu:.3}");
    assert!(bleu > 0.0 && bleu <= 100.0, "BLEU {bleu}");
    assert_eq!(v["n"], 6);
    assert_eq!(v["decode"]["method"], "greedy");
    // Scoring the saved predictions gives the same number without a model.
    let again = eval_json(&[
        "eval",
        "--data",
        test,
        "--metric",
        "bleu",
        "--limit",
        "6",
        "--predictions",
        preds,
        "--json",
    ]);
    assert_eq!(again["score"].as_f64().unwrap(), bleu);
}

#[test]
fn real_model_accuracy_on_sarcasm_and_sql_exec_run() {
    let _ = real_model_path();
    let sarcasm = data_dir("sarcasm").join("test.jsonl");
    let v = eval_json(&[
        "eval",
        "--data",
        sarcasm.to_str().unwrap(),
        "--metric",
        "accuracy",
        "--limit",
        "4",
        "--json",
    ]);
    let acc = v["score"].as_f64().unwrap();
    eprintln!("base SmolLM2, 4 sarcasm test headlines: accuracy {acc}%");
    assert_eq!(v["n"], 4);
    assert!(
        [0.0, 25.0, 50.0, 75.0, 100.0].contains(&acc),
        "accuracy {acc}"
    );
    let sql = data_dir("sql").join("test.jsonl");
    let v = eval_json(&[
        "eval",
        "--data",
        sql.to_str().unwrap(),
        "--metric",
        "sql-exec",
        "--limit",
        "2",
        "--max-new-tokens",
        "32",
        "--json",
    ]);
    assert_eq!(v["n"], 2);
    assert!((0.0..=100.0).contains(&v["score"].as_f64().unwrap()));
}

#[test]
fn loss_metric_matches_the_mean_target_token_loss() {
    let _ = real_model_path();
    let test = data_dir("ner").join("test.jsonl");
    let v = eval_json(&[
        "eval",
        "--data",
        test.to_str().unwrap(),
        "--metric",
        "loss",
        "--limit",
        "4",
        "--json",
    ]);
    let loss = v["score"].as_f64().unwrap();
    // The trainer's batched evaluation on the same 4 examples.
    let m = real_model();
    let (exs, _) =
        lorakit::data::load_jsonl(&test, m.tokenizer().unwrap(), &Default::default()).unwrap();
    let want = lorakit::train::trainer::evaluate_loss(&m.model, None, &exs[..4], 4).unwrap();
    assert!(
        (loss - want).abs() < 1e-3,
        "eval loss {loss} vs trainer {want}"
    );
}
