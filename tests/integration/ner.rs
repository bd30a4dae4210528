//! The quickstart's data set, financial NER, as `scripts/fetch-data.sh ner` prepares it (fetched
//! here, never skipped): every line loads, only the completion carries loss, and no sentence is in
//! two splits.

use std::collections::HashSet;
use std::process::Command;
use std::sync::OnceLock;

use lorakit::data::{load_jsonl, Batcher, DataOptions};

use crate::common::*;

fn ner_dir() -> std::path::PathBuf {
    static FETCHED: OnceLock<std::path::PathBuf> = OnceLock::new();
    FETCHED
        .get_or_init(|| {
            let root = repo_root();
            let status = Command::new("bash")
                .arg(root.join("scripts/fetch-data.sh"))
                .arg("ner")
                .status()
                .expect("run fetch-data.sh");
            assert!(status.success(), "scripts/fetch-data.sh ner failed");
            root.join("data/ner")
        })
        .clone()
}

#[test]
fn ner_splits_load_mask_the_prompt_and_keep_sentences_apart() {
    let dir = ner_dir();
    let tok = tiny_llama().tokenizer().unwrap(); // the SmolLM2 tokenizer
    let mut sentences_per_split = Vec::new();
    let mut total = 0;
    for split in ["train", "validation", "test"] {
        let path = dir.join(format!("{split}.jsonl"));
        let (exs, stats) = load_jsonl(&path, tok, &DataOptions::default()).unwrap();
        assert_eq!(stats.truncated + stats.dropped_no_target, 0, "{split}");
        total += exs.len();
        for ex in &exs {
            // Exactly one labelled run: the completion (which starts with a space) and EOS.
            let first = ex.labels.iter().position(|&l| l != -100).unwrap();
            assert!(
                ex.labels[first..].iter().all(|&l| l != -100),
                "{split}: one contiguous target run"
            );
            let text = tok.decode(&ex.input_ids[first..], false).unwrap();
            assert!(
                text.starts_with(' ') && text.ends_with("<|im_end|>"),
                "{split}: {text:?}"
            );
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let sentences: HashSet<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["prompt"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let refs = v["references"].as_array().unwrap();
            let completion = v["completion"].as_str().unwrap();
            assert!(
                refs.iter().any(|r| Some(completion.trim()) == r.as_str()),
                "{split}: the completion is one of its sentence's references"
            );
        }
        sentences_per_split.push(sentences);
        if split == "train" {
            let b = Batcher::new(exs, 8, true, 1).unwrap();
            assert_eq!(b.epoch(0).len(), b.batches_per_epoch());
        }
    }
    // 1164 lines in evals' file: 1142 distinct sentences, one of them with two answers.
    assert_eq!(total, 1143, "one example per distinct (sentence, answer)");
    assert_eq!(
        sentences_per_split.iter().map(|m| m.len()).sum::<usize>(),
        1142,
        "1142 distinct sentences"
    );
    for i in 0..3 {
        for j in i + 1..3 {
            assert!(
                sentences_per_split[i].is_disjoint(&sentences_per_split[j]),
                "splits {i} and {j} share a sentence"
            );
        }
    }
}
