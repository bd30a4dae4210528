//! Tests with the real SmolLM2 tokenizer and chat template (tests/fixtures/smollm2).

use std::path::{Path, PathBuf};

use super::*;
use crate::tokenize::{ChatMessage, Tokenizer};
use crate::Result;

const IM_END: u32 = 2;

fn tok() -> Tokenizer {
    Tokenizer::from_hf_dir(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/smollm2"
    )))
    .unwrap()
}

/// A unique scratch directory (no tempfile crate in the library's dependencies).
fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lorakit-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let p = scratch_dir(name).join("train.jsonl");
    std::fs::write(&p, bytes).unwrap();
    p
}

fn load(name: &str, body: &str, opts: &DataOptions) -> Result<(Vec<Example>, LoadStats)> {
    let p = write(name, body.as_bytes());
    load_jsonl(&p, &tok(), opts)
}

fn opts() -> DataOptions {
    DataOptions::default()
}

/// The decoded text of each maximal run of labelled tokens.
fn labelled_runs(tok: &Tokenizer, ex: &Example) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    for (&id, &l) in ex.input_ids.iter().zip(&ex.labels) {
        if l == IGNORE_INDEX {
            if !cur.is_empty() {
                runs.push(tok.decode(&cur, false).unwrap());
                cur.clear();
            }
        } else {
            assert_eq!(l, id as i64, "a label differs from its input id");
            cur.push(id);
        }
    }
    if !cur.is_empty() {
        runs.push(tok.decode(&cur, false).unwrap());
    }
    runs
}

#[test]
fn prompt_completion_masks_exactly_the_prompt() {
    let t = tok();
    let prompt = "Meaning representation: name[The Eagle], eatType[coffee shop]\nDescription:";
    let completion = " The Eagle is a coffee shop.";
    let line = serde_json::json!({"prompt": prompt, "completion": completion, "references": ["x"]});
    let (exs, stats) = load("pc", &format!("{line}\n"), &opts()).unwrap();
    assert_eq!(exs.len(), 1);
    let ex = &exs[0];
    let p = t.encode(prompt, true).unwrap();
    let c = t.encode(completion, false).unwrap();
    assert!(p.len() > 5 && c.len() > 3);
    let mut want = p.clone();
    want.extend(&c);
    want.push(IM_END);
    assert_eq!(ex.input_ids, want);
    assert_eq!(ex.labels.len(), want.len());
    for (i, &l) in ex.labels.iter().enumerate() {
        if i < p.len() {
            assert_eq!(l, IGNORE_INDEX, "prompt position {i}");
        } else {
            assert_eq!(l, want[i] as i64, "completion position {i}");
        }
    }
    // The leading space joins the first word of the completion.
    assert_eq!(t.id_to_token(c[0]).unwrap(), "ĠThe");
    assert_eq!(
        labelled_runs(&t, ex),
        vec![format!("{completion}<|im_end|>")]
    );
    assert_eq!(stats.target_tokens, c.len() + 1);
    assert_eq!(ex.target_tokens(), c.len() + 1);
    assert_eq!(
        stats,
        LoadStats {
            examples: 1,
            truncated: 0,
            target_tokens: c.len() + 1,
            dropped_no_target: 0
        }
    );

    // Without EOS.
    let no_eos = DataOptions {
        add_eos: false,
        ..opts()
    };
    let (exs, _) = load("pc-noeos", &format!("{line}\n"), &no_eos).unwrap();
    assert_eq!(exs[0].input_ids.len(), p.len() + c.len());
    assert_eq!(exs[0].input_ids.last(), c.last());
}

#[test]
fn text_and_pretokenised() {
    let t = tok();
    let body = concat!(
        "{\"text\": \"Hello world, this is text.\"}\n",
        "{\"input_ids\": [5, 6, 7, 8]}\n",
        "{\"input_ids\": [5, 6, 7, 8], \"labels\": [-100, -100, 7, 8], \"schema\": \"s\"}\n",
    );
    let (exs, stats) = load("text", body, &opts()).unwrap();
    assert_eq!(exs.len(), 3);
    let mut want = t.encode("Hello world, this is text.", true).unwrap();
    want.push(IM_END);
    assert_eq!(exs[0].input_ids, want);
    let all: Vec<i64> = want.iter().map(|&x| x as i64).collect();
    assert_eq!(exs[0].labels, all);
    assert_eq!(exs[1].input_ids, vec![5, 6, 7, 8]);
    assert_eq!(exs[1].labels, vec![5, 6, 7, 8]);
    assert_eq!(exs[2].labels, vec![-100, -100, 7, 8]);
    // labels[0] never counts after the shift.
    assert_eq!(stats.target_tokens, (want.len() - 1) + 3 + 2, "{stats:?}");
}

#[test]
fn messages_label_assistant_contents_and_end_of_turn() {
    let t = tok();
    let msgs = serde_json::json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "Tell me a fact about owls."},
        {"role": "assistant", "content": "Owls can rotate their heads about 270 degrees."},
    ]);
    let line = serde_json::json!({ "messages": msgs });
    let (exs, stats) = load("chat", &format!("{line}\n"), &opts()).unwrap();
    let ex = &exs[0];
    let chat: Vec<ChatMessage> = serde_json::from_value(msgs).unwrap();
    let rendered = t.apply_chat_template(&chat, false).unwrap();
    assert_eq!(ex.input_ids, t.encode(&rendered, false).unwrap());
    assert_eq!(
        labelled_runs(&t, ex),
        vec![
            "hi<|im_end|>".to_string(),
            "Owls can rotate their heads about 270 degrees.<|im_end|>".to_string()
        ]
    );
    // The labelled tokens are the ones after "<|im_start|>assistant\n".
    let header = t.encode("<|im_start|>assistant\n", false).unwrap();
    let first = ex.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap();
    assert_eq!(&ex.input_ids[first - header.len()..first], &header[..]);
    assert_eq!(stats.target_tokens, ex.target_tokens());

    // The same labels from the in-order search (the fallback for unusual templates).
    let (ids, labels) = chat::encode_with(&t, &chat, true).unwrap();
    assert_eq!(ids, ex.input_ids);
    assert_eq!(labels, ex.labels);
}

#[test]
fn messages_default_system_whitespace_and_assistant_first() {
    let t = tok();
    // No system message: the template adds its default one; content with surrounding space.
    let msgs = vec![
        ChatMessage::new("user", "What is 2+2?"),
        ChatMessage::new("assistant", " 4 \n"),
    ];
    let ex = encode_messages(&t, &msgs).unwrap();
    assert_eq!(labelled_runs(&t, &ex), vec![" 4 \n<|im_end|>".to_string()]);

    // Assistant first: the prefix rendering is not a prefix (default system prompt), so the
    // search is used.
    let msgs = vec![
        ChatMessage::new("assistant", "Hello! How can I help?"),
        ChatMessage::new("user", "Nothing."),
        ChatMessage::new("assistant", "Alright."),
    ];
    let ex = encode_messages(&t, &msgs).unwrap();
    assert_eq!(
        labelled_runs(&t, &ex),
        vec![
            "Hello! How can I help?<|im_end|>".to_string(),
            "Alright.<|im_end|>".to_string()
        ]
    );

    // No assistant turn: dropped and counted.
    let body = concat!(
        "{\"messages\": [{\"role\": \"user\", \"content\": \"only a question\"}]}\n",
        "{\"text\": \"kept\"}\n"
    );
    let (exs, stats) = load("chat-noassist", body, &opts()).unwrap();
    assert_eq!(exs.len(), 1);
    assert_eq!(stats.dropped_no_target, 1);
    assert_eq!(stats.examples, 1);
}

#[test]
fn truncation_keeps_the_beginning_and_is_counted() {
    let t = tok();
    let long = "one two three four five six seven eight nine ten eleven twelve";
    let o = DataOptions {
        max_seq_len: 8,
        add_eos: true,
    };
    let body = format!(
        "{}\n{}\n{}\n",
        serde_json::json!({"text": long}),
        serde_json::json!({"text": "short"}),
        // A prompt longer than the limit leaves no target: truncated and dropped.
        serde_json::json!({"prompt": long, "completion": " yes"}),
    );
    let (exs, stats) = load("trunc", &body, &o).unwrap();
    assert_eq!(exs.len(), 2);
    assert_eq!(
        exs[0].input_ids,
        t.encode(long, true).unwrap()[..8].to_vec()
    );
    assert_eq!(exs[0].labels.len(), 8);
    assert_eq!(
        exs[1].input_ids,
        [t.encode("short", true).unwrap(), vec![IM_END]].concat()
    );
    assert_eq!(stats.truncated, 2);
    assert_eq!(stats.dropped_no_target, 1);
    assert_eq!(stats.examples, 2);
    assert_eq!(stats.target_tokens, 7 + (exs[1].len() - 1));
    assert_eq!(stats.warnings(8).len(), 2);

    let zero = DataOptions {
        max_seq_len: 0,
        add_eos: true,
    };
    assert!(load("trunc0", "{\"text\": \"a\"}\n", &zero).is_err());
}

#[test]
fn blank_lines_crlf_bom_and_mixed_formats() {
    let body = "\u{feff}{\"text\": \"a b c\"}\r\n\n   \n{\"prompt\": \"Q:\", \"completion\": \" A\"}\r\n\n";
    let (exs, stats) = load("mixed", body, &opts()).unwrap();
    assert_eq!(exs.len(), 2);
    assert_eq!(stats.examples, 2);
}

/// The error for `body`, checked to name the file and `line {line}:` and to contain `what`.
fn expect_error(name: &str, body: &[u8], line: Option<usize>, what: &str) {
    let p = write(name, body);
    let err = match load_jsonl(&p, &tok(), &opts()) {
        Ok((exs, _)) => panic!("{name}: expected an error, got {} examples", exs.len()),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&p.display().to_string()),
        "{name}: the error does not name the file: {err}"
    );
    if let Some(n) = line {
        assert!(
            err.contains(&format!("line {n}: ")),
            "{name}: the error does not name line {n}: {err}"
        );
    }
    assert!(err.contains(what), "{name}: {err:?} lacks {what:?}");
}

#[test]
fn malformed_lines_name_file_and_line() {
    let good = "{\"text\": \"fine\"}\n\n";
    let cases: &[(&str, &str, &str)] = &[
        ("json", "{\"text\": \"a\"", "invalid JSON"),
        ("notobj", "[1, 2]", "not a JSON object but an array"),
        ("notobj2", "\"text\"", "not a JSON object but a string"),
        ("format", "{\"foo\": 1}", "none of the known formats"),
        (
            "type",
            "{\"prompt\": \"a\", \"completion\": 5}",
            "'completion' must be a string, got a number",
        ),
        (
            "nocompl",
            "{\"prompt\": \"a\"}",
            "'prompt' without 'completion'",
        ),
        (
            "texttype",
            "{\"text\": null}",
            "'text' must be a string, got null",
        ),
        (
            "ambiguous",
            "{\"text\": \"a\", \"prompt\": \"b\", \"completion\": \"c\"}",
            "ambiguous",
        ),
        ("emptymsgs", "{\"messages\": []}", "'messages' is empty"),
        (
            "msgstype",
            "{\"messages\": \"hi\"}",
            "'messages' must be an array",
        ),
        (
            "role",
            "{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}",
            "messages[0]: unknown role \"bot\"",
        ),
        (
            "content",
            "{\"messages\": [{\"role\": \"user\", \"content\": [\"x\"]}]}",
            "messages[0]: 'content' must be a string, got an array",
        ),
        (
            "msgnotobj",
            "{\"messages\": [\"hi\"]}",
            "messages[0] must be an object",
        ),
        (
            "lenmismatch",
            "{\"input_ids\": [1, 2, 3], \"labels\": [1, 2]}",
            "'labels' has 2 entries but 'input_ids' has 3",
        ),
        (
            "oov",
            "{\"input_ids\": [1, 49152]}",
            "'input_ids'[1] = 49152 is out of the vocabulary (0..49152)",
        ),
        (
            "negid",
            "{\"input_ids\": [-1]}",
            "'input_ids'[0] = -1 is out of the vocabulary",
        ),
        (
            "floatid",
            "{\"input_ids\": [1.5]}",
            "'input_ids'[0] must be an integer, got a number",
        ),
        (
            "badlabel",
            "{\"input_ids\": [1, 2], \"labels\": [1, -5]}",
            "'labels'[1] = -5 is neither -100 nor in the vocabulary",
        ),
        (
            "labelsonly",
            "{\"labels\": [1]}",
            "'labels' without 'input_ids'",
        ),
        ("emptyids", "{\"input_ids\": []}", "'input_ids' is empty"),
    ];
    for (name, line, what) in cases {
        // The bad line is line 3 (after a good line and a blank one).
        expect_error(
            name,
            format!("{good}{line}\n{good}").as_bytes(),
            Some(3),
            what,
        );
    }
    assert_eq!(tok().vocab_size(), 49152);
}

#[test]
fn empty_and_binary_files_are_errors() {
    expect_error("empty", b"", None, "no examples");
    expect_error("blank", b"\n  \n\r\n\n", None, "no examples");
    expect_error(
        "utf8",
        b"{\"text\": \"ok\"}\n\xff\xfe\x00garbage\n",
        Some(2),
        "not valid UTF-8",
    );
    // Pseudo-random bytes (xorshift): an error, never a panic.
    let mut x: u64 = 0x1234_5678_9abc_def1;
    for round in 0..20 {
        let bytes: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let p = write(&format!("garbage{round}"), &bytes);
        let err = load_jsonl(&p, &tok(), &opts()).unwrap_err().to_string();
        assert!(err.contains("line "), "{err}");
    }
    // A missing file is an I/O error naming it.
    let missing = scratch_dir("missing").join("nope.jsonl");
    let err = load_jsonl(&missing, &tok(), &opts())
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.jsonl"), "{err}");
}

fn ex(len: usize, tag: u32) -> Example {
    Example {
        input_ids: (0..len as u32).map(|i| tag * 1000 + i).collect(),
        labels: (0..len)
            .map(|i| {
                if i == 0 {
                    -100
                } else {
                    (tag * 1000) as i64 + i as i64
                }
            })
            .collect(),
    }
}

#[test]
fn batches_in_file_order_with_padding() {
    let exs: Vec<Example> = (0..7).map(|i| ex(3 + (i * 5) % 4, i as u32)).collect();
    let b = Batcher::new(exs.clone(), 3, false, 0)
        .unwrap()
        .with_pad_id(IM_END);
    assert_eq!(b.batches_per_epoch(), 3);
    for epoch in 0..2 {
        let batches = b.epoch(epoch);
        assert_eq!(batches.len(), 3);
        let order: Vec<Vec<usize>> = batches.iter().map(|x| x.indices.clone()).collect();
        assert_eq!(order, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        for batch in &batches {
            let want_len = batch.indices.iter().map(|&i| exs[i].len()).max().unwrap();
            assert_eq!(batch.seq_len, want_len);
            assert_eq!(batch.input_ids.len(), batch.batch_size * batch.seq_len);
            assert_eq!(batch.labels.len(), batch.batch_size * batch.seq_len);
            let mut targets = 0;
            for (r, &i) in batch.indices.iter().enumerate() {
                let e = &exs[i];
                assert_eq!(batch.lengths[r], e.len());
                assert_eq!(&batch.row_ids(r)[..e.len()], &e.input_ids[..]);
                assert_eq!(&batch.row_labels(r)[..e.len()], &e.labels[..]);
                assert!(batch.row_ids(r)[e.len()..].iter().all(|&x| x == IM_END));
                assert!(batch.row_labels(r)[e.len()..].iter().all(|&x| x == -100));
                targets += e.len() - 1;
            }
            assert_eq!(batch.target_tokens, targets);
        }
    }
    // Some row is padded in this data.
    let first = &b.epoch(0)[0];
    assert!(first.lengths.iter().any(|&l| l < first.seq_len));

    assert!(Batcher::new(exs.clone(), 0, false, 0).is_err());
    assert!(Batcher::new(Vec::new(), 2, false, 0).is_err());
    let mut bad = exs.clone();
    bad[2].labels.pop();
    assert!(Batcher::new(bad, 2, false, 0).is_err());
}

#[test]
fn shuffle_is_deterministic_and_groups_by_length() {
    // Lengths 1..=40 in a scrambled order, 250 examples.
    let exs: Vec<Example> = (0..250).map(|i| ex(2 + (i * 37) % 40, i as u32)).collect();
    let bs = 4;
    let a = Batcher::new(exs.clone(), bs, true, 42).unwrap();
    let same = Batcher::new(exs.clone(), bs, true, 42).unwrap();
    let other = Batcher::new(exs.clone(), bs, true, 43).unwrap();
    assert_eq!(a.batches_per_epoch(), 63);
    assert_eq!(a.epoch(0), same.epoch(0));
    assert_eq!(a.epoch(3), same.epoch(3));
    assert_ne!(a.epoch_order(0), other.epoch_order(0));
    assert_ne!(a.epoch_order(0), a.epoch_order(1));
    for epoch in 0..3 {
        let order = a.epoch_order(epoch);
        assert_eq!(order.len(), 63);
        // Every example exactly once; only one batch is short.
        let mut seen: Vec<usize> = order.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..250).collect::<Vec<_>>());
        assert_eq!(order.iter().filter(|b| b.len() < bs).count(), 1);
        // Not file order.
        assert_ne!(
            order,
            Batcher::new(exs.clone(), bs, false, 42)
                .unwrap()
                .epoch_order(0)
        );
        // Length grouping: far less padding than file-order batches.
        let pad = |batches: &[Batch]| -> usize {
            batches
                .iter()
                .map(|b| b.batch_size * b.seq_len - b.lengths.iter().sum::<usize>())
                .sum()
        };
        let shuffled = pad(&a.epoch(epoch));
        let plain = pad(&Batcher::new(exs.clone(), bs, false, 0).unwrap().epoch(0));
        assert!(
            shuffled * 5 < plain,
            "padding {shuffled} vs {plain} in file order"
        );
    }
}

#[test]
fn best_fit_decreasing_packs_like_trl_bfd() {
    // Longest first, each into the fullest row that still holds it.
    let lens = [3, 8, 5, 2, 6, 4, 1, 7];
    let bins = pack_best_fit_decreasing(&lens, 10);
    // 8 → row 0 (2 left); 7 → row 1 (3 left); 6 → row 2 (4 left); 5 → row 3 (5 left);
    // 4 → row 2 (full); 3 → row 1 (full); 2 → row 0 (full); 1 → row 3 (4 left).
    assert_eq!(bins, vec![vec![1, 3], vec![7, 0], vec![4, 5], vec![2, 6]]);
    // Equal lengths keep file order, row after row.
    assert_eq!(
        pack_best_fit_decreasing(&[4; 7], 12),
        vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]
    );
}

#[test]
fn packed_batches_keep_every_example_whole_and_mask_their_first_label() {
    let exs: Vec<Example> = (0..9).map(|i| ex(2 + (i * 5) % 7, i as u32)).collect();
    let b = Batcher::new(exs.clone(), 2, true, 7)
        .unwrap()
        .with_pad_id(IM_END)
        .with_grouping(Grouping::Packed {
            row_len: 10,
            rows: 2,
        })
        .unwrap();
    let rows = b.packed_rows().to_vec();
    assert_eq!(b.batches_per_epoch(), rows.len().div_ceil(2));
    let mut seen: Vec<usize> = rows.iter().flatten().copied().collect();
    seen.sort();
    assert_eq!(seen, (0..9).collect::<Vec<_>>());
    for row in &rows {
        assert!(row.iter().map(|&i| exs[i].len()).sum::<usize>() <= 10);
    }
    // Epochs visit the same rows in another order, reproducibly.
    assert_eq!(b.epoch(1), b.epoch(1));
    let mut e0 = b.epoch_rows(0).concat();
    let mut e1 = b.epoch_rows(1).concat();
    assert_ne!(e0, e1);
    e0.sort();
    e1.sort();
    assert_eq!(e0, e1);
    for batch in b.epoch(0) {
        assert_eq!(batch.segments.rows().len(), batch.batch_size);
        let mut targets = 0;
        let mut k = 0;
        for r in 0..batch.batch_size {
            let (ids, labels) = (batch.row_ids(r), batch.row_labels(r));
            let mut at = 0;
            for &len in &batch.segments.rows()[r] {
                let e = &exs[batch.indices[k]];
                assert_eq!(len, e.len());
                assert_eq!(&ids[at..at + len], &e.input_ids[..]);
                // The first label never counts (the previous example must not predict it).
                assert_eq!(labels[at], -100);
                assert_eq!(&labels[at + 1..at + len], &e.labels[1..]);
                targets += e.target_tokens();
                at += len;
                k += 1;
            }
            assert_eq!(batch.lengths[r], at);
            assert!(ids[at..].iter().all(|&x| x == IM_END));
            assert!(labels[at..].iter().all(|&x| x == -100));
        }
        assert_eq!(k, batch.indices.len());
        assert_eq!(batch.target_tokens, targets);
    }
}

#[test]
fn token_budget_batches_hold_at_most_the_budget_padding_included() {
    let exs: Vec<Example> = (0..60).map(|i| ex(2 + (i * 37) % 20, i as u32)).collect();
    for shuffle in [false, true] {
        let b = Batcher::new(exs.clone(), 4, shuffle, 3)
            .unwrap()
            .with_grouping(Grouping::Tokens { max_tokens: 48 })
            .unwrap();
        let batches = b.epoch(0);
        assert_eq!(batches.len(), b.batches_per_epoch());
        let mut seen: Vec<usize> = batches.iter().flat_map(|x| x.indices.clone()).collect();
        seen.sort();
        assert_eq!(seen, (0..60).collect::<Vec<_>>());
        for x in &batches {
            assert!(
                x.batch_size * x.seq_len <= 48,
                "{} × {}",
                x.batch_size,
                x.seq_len
            );
            assert!(!x.segments.is_packed());
        }
        assert!(b.max_batch_tokens() <= 48);
    }
}

#[test]
fn an_example_longer_than_the_row_or_budget_is_an_error() {
    let exs: Vec<Example> = vec![ex(5, 0), ex(12, 1)];
    for g in [
        Grouping::Packed {
            row_len: 10,
            rows: 1,
        },
        Grouping::Tokens { max_tokens: 10 },
    ] {
        let err = Batcher::new(exs.clone(), 2, false, 0)
            .unwrap()
            .with_grouping(g)
            .unwrap_err()
            .to_string();
        assert!(err.contains("example 1 has 12 tokens, more than"), "{err}");
    }
    assert!(Batcher::new(exs, 2, false, 0)
        .unwrap()
        .with_grouping(Grouping::Packed {
            row_len: 12,
            rows: 1
        })
        .is_ok());
}
