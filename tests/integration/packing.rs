//! Packing (`train --packing`, `--max-tokens-per-batch`): several examples in one row, each
//! attending only to itself with positions from 0, compute what the examples compute alone. On
//! the tiny random models of tests/data/arch (every family, GPT-2's learned positions included)
//! and the tiny-llama fixture through the CLI.

use std::path::{Path, PathBuf};

use lorakit::data::{Batch, Batcher, Example, Grouping, IGNORE_INDEX};
use lorakit::lora::peft::Adapter;
use lorakit::model::decoder_train::{Activations, Dropout, FullGrads, LoraGrads};
use lorakit::model::load::load_hf_weights;
use lorakit::model::{Config, Decoder, Precision};
use lorakit::train::loss::{
    lm_head_loss, lm_head_loss_with_head_grads, target_positions, HeadGrads,
};
use lorakit::train::trainer::{evaluate_loss, evaluate_loss_grouped};

use crate::common::*;

const FAMILIES: [&str; 9] = [
    "llama",
    "llama3",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "olmo2",
    "gemma3_text",
    "gpt2",
];

fn arch_dir(family: &str) -> PathBuf {
    repo_root().join("tests/data/arch").join(family)
}

fn load(family: &str) -> (Decoder, Adapter) {
    let dir = arch_dir(family);
    let config = Config::from_hf_json(&dir.join("config.json")).unwrap();
    let model = load_hf_weights(&dir, config).unwrap();
    let adapter = Adapter::load(&dir.join("lora"), &model.config).unwrap();
    (model, adapter)
}

/// Examples of the given lengths with pseudo-random ids; the first third of each is prompt
/// (label -100), the rest target.
fn examples(vocab: usize, lens: &[usize], seed: u64) -> Vec<Example> {
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    lens.iter()
        .map(|&len| {
            let input_ids: Vec<u32> = (0..len)
                .map(|_| {
                    z ^= z << 13;
                    z ^= z >> 7;
                    z ^= z << 17;
                    (z % vocab as u64) as u32
                })
                .collect();
            let labels = input_ids
                .iter()
                .enumerate()
                .map(|(t, &id)| if t < len / 3 { IGNORE_INDEX } else { id as i64 })
                .collect();
            Example { input_ids, labels }
        })
        .collect()
}

/// max|a − b| / max|b|.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().map(|v| v.abs() as f64).fold(0.0, f64::max);
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max);
    diff / scale.max(1e-30)
}

fn forward(model: &Decoder, adapter: Option<&Adapter>, batch: &Batch, acts: &mut Activations) {
    model
        .train_forward_packed(
            &batch.input_ids,
            batch.batch_size,
            batch.seq_len,
            &batch.segments,
            adapter,
            Dropout::NONE,
            acts,
        )
        .unwrap();
}

/// The batch's mean loss over its target tokens and the adapter's gradients.
fn lora_loss_and_grads(model: &Decoder, adapter: &Adapter, batch: &Batch) -> (f64, LoraGrads) {
    let mut acts = Activations::default();
    forward(model, Some(adapter), batch, &mut acts);
    let targets = target_positions(&batch.labels, batch.batch_size, batch.seq_len);
    assert_eq!(targets.len(), batch.target_tokens);
    let n = targets.len() as f64;
    let mut dx = vec![0.0f32; batch.input_ids.len() * model.config.hidden_size];
    let loss = lm_head_loss(model, &acts.x_final, &targets, 0.0, n, Some(&mut dx)) / n;
    let mut grads = LoraGrads::zeros_like(adapter);
    model
        .train_backward(&mut dx, &acts, adapter, Dropout::NONE, &mut grads)
        .unwrap();
    (loss, grads)
}

/// The batch's mean loss and every parameter's gradient (full fine-tuning: the embedding and
/// GPT-2's learned positions included), named.
fn full_loss_and_grads(model: &Decoder, batch: &Batch) -> (f64, Vec<(String, Vec<f32>)>) {
    let mut acts = Activations::default();
    forward(model, None, batch, &mut acts);
    let targets = target_positions(&batch.labels, batch.batch_size, batch.seq_len);
    let n = targets.len() as f64;
    let mut dx = vec![0.0f32; batch.input_ids.len() * model.config.hidden_size];
    let mut grads = FullGrads::zeros_like(model);
    let FullGrads {
        embed_tokens,
        norm,
        norm_bias,
        lm_head,
        ..
    } = &mut grads;
    let head = lm_head.as_deref_mut().unwrap_or(embed_tokens);
    let loss = lm_head_loss_with_head_grads(
        model,
        &acts.x_final,
        &targets,
        0.0,
        n,
        Some(&mut dx),
        Some(HeadGrads {
            norm,
            norm_bias: norm_bias.as_deref_mut(),
            head,
        }),
    ) / n;
    model
        .train_backward_full(&mut dx, &acts, &mut grads)
        .unwrap();
    let mut m = model.clone();
    let named = m
        .params_with_grads(&mut grads)
        .unwrap()
        .into_iter()
        .map(|p| (p.name.clone(), p.grad.to_vec()))
        .collect();
    (loss, named)
}

/// Five examples unpacked (one per row, padded to the longest) and packed into two rows (one of
/// them padded): the same loss and the same gradients, for LoRA and full fine-tuning, on every
/// family, within 1e-6 relative.
#[test]
fn a_packed_batch_gives_the_unpacked_loss_and_gradients_on_every_family() {
    for family in FAMILIES {
        let (model, adapter) = load(family);
        let exs = examples(model.config.vocab_size, &[7, 3, 9, 5, 4], 11);
        let batcher = Batcher::new(exs, 5, false, 0).unwrap();
        let unpacked = batcher.batch(&[0, 1, 2, 3, 4]);
        let packed = batcher.packed_batch(&[vec![0, 1], vec![2, 3, 4]]);
        assert_eq!((packed.batch_size, packed.seq_len), (2, 18));
        assert_eq!(packed.target_tokens, unpacked.target_tokens);

        let (lu, gu) = lora_loss_and_grads(&model, &adapter, &unpacked);
        let (lp, gp) = lora_loss_and_grads(&model, &adapter, &packed);
        let rel = (lp - lu).abs() / lu.abs();
        eprintln!("{family}: LoRA loss unpacked {lu} packed {lp} (rel {rel:.1e})");
        assert!(rel <= 1e-6, "{family}: LoRA loss {lp} vs {lu}");
        let mut worst = 0.0f64;
        for ((id, (ua, ub)), (_, (pa, pb))) in gu.modules.iter().zip(&gp.modules) {
            for (what, p, u) in [("A", pa, ua), ("B", pb, ub)] {
                assert!(
                    u.iter().any(|v| *v != 0.0),
                    "{family} {id:?} d{what} is zero"
                );
                let e = rel_err(p, u);
                worst = worst.max(e);
                assert!(e <= 1e-6, "{family}: {id:?} d{what}: {e:.2e}");
            }
        }
        eprintln!("{family}: LoRA gradients worst max|Δg|/max|g| {worst:.1e}");

        let (lu, gu) = full_loss_and_grads(&model, &unpacked);
        let (lp, gp) = full_loss_and_grads(&model, &packed);
        assert!(
            (lp - lu).abs() / lu.abs() <= 1e-6,
            "{family}: full loss {lp} vs {lu}"
        );
        let mut worst = 0.0f64;
        for ((name, u), (_, p)) in gu.iter().zip(&gp) {
            let e = rel_err(p, u);
            worst = worst.max(e);
            assert!(e <= 1e-6, "{family}: {name}: {e:.2e}");
        }
        eprintln!("{family}: full fine-tuning gradients worst {worst:.1e}");
    }
}

/// The bf16 path honours the segments too: packed and unpacked agree as closely as f32 ones do
/// (bf16 rounds each element, so the layout does not change what is rounded).
#[test]
fn bf16_packed_batch_gives_the_unpacked_loss_and_gradients() {
    for family in ["llama", "gpt2"] {
        let (mut model, adapter) = load(family);
        model.set_precision(Precision::Bf16).unwrap();
        let exs = examples(model.config.vocab_size, &[7, 3, 9, 5, 4], 12);
        let batcher = Batcher::new(exs, 5, false, 0).unwrap();
        let (lu, gu) = lora_loss_and_grads(&model, &adapter, &batcher.batch(&[0, 1, 2, 3, 4]));
        let packed = batcher.packed_batch(&[vec![0, 1], vec![2, 3, 4]]);
        let (lp, gp) = lora_loss_and_grads(&model, &adapter, &packed);
        assert!(
            (lp - lu).abs() / lu.abs() <= 1e-6,
            "{family}: bf16 loss {lp} vs {lu}"
        );
        for ((id, (ua, ub)), (_, (pa, pb))) in gu.modules.iter().zip(&gp.modules) {
            let (ea, eb) = (rel_err(pa, ua), rel_err(pb, ub));
            assert!(
                ea <= 1e-6 && eb <= 1e-6,
                "{family} bf16 {id:?}: {ea:.2e} {eb:.2e}"
            );
        }
    }
}

/// In a packed row [A, B, C], changing A's tokens leaves B's and C's final hidden states (hence
/// logits and loss) bit for bit as they were and changes A's: nothing crosses an example's
/// boundary. The GPT-2 row is longer than its 32 learned positions, which only works because
/// positions restart with every example.
#[test]
fn no_example_of_a_packed_row_sees_another() {
    for family in ["llama", "qwen3", "gemma3_text", "gpt2"] {
        let (model, adapter) = load(family);
        let vocab = model.config.vocab_size;
        let lens = [14, 12, 14];
        let exs = examples(vocab, &lens, 5);
        let mut changed = exs.clone();
        for id in &mut changed[0].input_ids {
            *id = (*id + 1) % vocab as u32;
        }
        let h = model.config.hidden_size;
        let run = |exs: Vec<Example>| {
            let batcher = Batcher::new(exs, 3, false, 0).unwrap();
            let batch = batcher.packed_batch(&[vec![0, 1, 2]]);
            assert_eq!(batch.seq_len, 40);
            let mut acts = Activations::default();
            forward(&model, Some(&adapter), &batch, &mut acts);
            acts.x_final
        };
        let (before, after) = (run(exs.clone()), run(changed));
        let a = 0..lens[0] * h;
        let rest = lens[0] * h..before.len();
        assert!(
            before[a.clone()] != after[a],
            "{family}: changing example A did not change A"
        );
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&before[rest.clone()]),
            bits(&after[rest]),
            "{family}: changing example A changed B or C"
        );

        // And B computed in the row is B computed alone (its positions start at 0).
        let alone = {
            let batcher = Batcher::new(vec![exs[1].clone()], 1, false, 0).unwrap();
            let mut acts = Activations::default();
            forward(&model, Some(&adapter), &batcher.batch(&[0]), &mut acts);
            acts.x_final
        };
        let in_row = &before[lens[0] * h..(lens[0] + lens[1]) * h];
        let e = rel_err(in_row, &alone);
        assert!(e <= 1e-6, "{family}: B in the row vs alone: {e:.2e}");
    }
}

/// The eval loss over packed rows (and token-budget batches) is the unpacked one.
#[test]
fn eval_loss_is_the_same_packed() {
    for family in ["llama", "gpt2"] {
        let (model, adapter) = load(family);
        let exs = examples(model.config.vocab_size, &[7, 3, 9, 5, 4, 11, 2, 6], 3);
        let want = evaluate_loss(&model, Some(&adapter), &exs, 3).unwrap();
        for grouping in [
            Grouping::Packed {
                row_len: 16,
                rows: 2,
            },
            Grouping::Tokens { max_tokens: 20 },
        ] {
            let got = evaluate_loss_grouped(&model, Some(&adapter), &exs, 3, grouping).unwrap();
            assert!(
                (got - want).abs() / want <= 1e-6,
                "{family} {grouping:?}: {got} vs {want}"
            );
        }
    }
}

/// Pre-tokenised lines: example 2j is 40 − 8 − j tokens long, example 2j + 1 fills its row of 40
/// (8 + j tokens), so that best-fit decreasing packs rows [0, 1], [2, 3], … in file order.
fn paired_jsonl(path: &Path, rows: usize, seed: u64) -> Vec<Example> {
    let lens: Vec<usize> = (0..rows).flat_map(|j| [32 - j, 8 + j]).collect();
    let exs = examples(tiny_llama().model.config.vocab_size, &lens, seed);
    let mut text = String::new();
    for e in &exs {
        text.push_str(
            &serde_json::json!({ "input_ids": e.input_ids, "labels": e.labels }).to_string(),
        );
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
    exs
}

fn metric_rows(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn train_tiny_llama(tmp: &Path, name: &str, extra: &[&str]) -> (PathBuf, Vec<serde_json::Value>) {
    let out = tmp.join(name);
    let model = fixture("tiny-llama");
    let (data, eval) = (tmp.join("train.jsonl"), tmp.join("eval.jsonl"));
    let mut args = vec![
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--eval-data",
        eval.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--targets",
        "all-linear",
        "--no-shuffle",
        "--max-seq-len",
        "40",
        "--grad-accum",
        "2",
        "--steps",
        "3",
        "--lr",
        "1e-2",
        "--eval-every",
        "1",
        "--precision",
        "f32",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let o = lorakit(&args);
    assert!(o.status.success(), "{name}: {}", stderr(&o));
    let rows = metric_rows(&out);
    (out, rows)
}

/// Three optimiser steps of 2 micro-batches: unpacked, 4 examples per micro-batch; packed, 2 rows
/// of 2 examples (by `--batch-size 2`, and by `packing = true` + `max_tokens_per_batch = 80` in
/// the TOML). The same examples in every step: the same per-step losses, gradient norms and
/// eval losses (1e-5 relative), and the same adapter.
#[test]
fn a_packed_run_reproduces_the_unpacked_run_step_by_step() {
    let tmp = tempfile::tempdir().unwrap();
    let exs = paired_jsonl(&tmp.path().join("train.jsonl"), 12, 1);
    paired_jsonl(&tmp.path().join("eval.jsonl"), 3, 2);
    // The packing these runs rely on, as the library forms it.
    let packed = Batcher::new(exs, 2, false, 0)
        .unwrap()
        .with_grouping(Grouping::Packed {
            row_len: 40,
            rows: 2,
        })
        .unwrap();
    let want_rows: Vec<Vec<usize>> = (0..12).map(|j| vec![2 * j, 2 * j + 1]).collect();
    assert_eq!(packed.packed_rows(), &want_rows[..]);

    let (plain_out, plain) = train_tiny_llama(tmp.path(), "plain", &["--batch-size", "4"]);
    let (rows_out, rows) =
        train_tiny_llama(tmp.path(), "packed", &["--packing", "--batch-size", "2"]);
    let toml = tmp.path().join("packed.toml");
    std::fs::write(&toml, "packing = true\nmax_tokens_per_batch = 80\n").unwrap();
    let (_, budget) = train_tiny_llama(tmp.path(), "budget", &["--config", toml.to_str().unwrap()]);

    let steps = |m: &[serde_json::Value]| -> Vec<(f64, f64, u64)> {
        m.iter()
            .filter(|r| r.get("loss").is_some())
            .map(|r| {
                (
                    r["loss"].as_f64().unwrap(),
                    r["grad_norm"].as_f64().unwrap(),
                    r["target_tokens"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let evals = |m: &[serde_json::Value]| -> Vec<f64> {
        m.iter().filter_map(|r| r["eval_loss"].as_f64()).collect()
    };
    let want = steps(&plain);
    assert_eq!(want.len(), 3);
    assert!(want[2].0 < want[0].0 - 0.01, "the run must learn: {want:?}");
    for (what, m) in [("packed rows", &rows), ("token budget", &budget)] {
        let got = steps(m);
        assert_eq!(got.len(), 3, "{what}");
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            eprintln!("{what} step {}: loss {} vs unpacked {}", k + 1, g.0, w.0);
            assert_eq!(g.2, w.2, "{what} step {}: target tokens", k + 1);
            assert!(
                (g.0 - w.0).abs() / w.0 <= 1e-5,
                "{what} step {}: loss {} vs {}",
                k + 1,
                g.0,
                w.0
            );
            assert!(
                (g.1 - w.1).abs() / w.1 <= 1e-4,
                "{what} step {}: grad norm {} vs {}",
                k + 1,
                g.1,
                w.1
            );
        }
        let (ge, we) = (evals(m), evals(&plain));
        assert_eq!(ge.len(), 3);
        for (g, w) in ge.iter().zip(&we) {
            assert!((g - w).abs() / w <= 1e-5, "{what}: eval loss {g} vs {w}");
        }
    }
    let config = &tiny_llama().model.config;
    let a = Adapter::load(&plain_out, config).unwrap();
    let b = Adapter::load(&rows_out, config).unwrap();
    for ((id, wa), (_, wb)) in a.modules.iter().zip(&b.modules) {
        let e = rel_err(&wb.b, &wa.b).max(rel_err(&wb.a, &wa.a));
        assert!(e <= 1e-4, "{id:?}: adapters differ by {e:.2e}");
    }
}

/// An example longer than the packed row (or the token budget) is an error naming it; longer
/// than --max-seq-len, it is truncated when loaded, as without packing.
#[test]
fn an_example_longer_than_the_row_is_an_error_or_truncated_as_unpacked() {
    let tmp = tempfile::tempdir().unwrap();
    paired_jsonl(&tmp.path().join("train.jsonl"), 2, 1);
    let data = tmp.path().join("train.jsonl");
    let model = fixture("tiny-llama");
    let run = |extra: &[&str]| {
        let out = tmp.path().join("run");
        let mut args = vec![
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--overwrite",
            "--steps",
            "1",
            "--precision",
            "f32",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        lorakit(&args)
    };
    for extra in [
        &["--packing", "--max-tokens-per-batch", "20"][..],
        &["--max-tokens-per-batch", "20"][..],
    ] {
        let o = run(extra);
        assert!(!o.status.success(), "{extra:?} trained");
        let err = stderr(&o);
        assert!(
            err.contains("example 0 has 32 tokens, more than") && err.contains("20"),
            "{extra:?}: {err}"
        );
    }
    // Truncated to --max-seq-len on loading, exactly as the unpacked run does: same warning,
    // same first-step loss.
    let first_loss = |extra: &[&str]| {
        let o = run(extra);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("were truncated"), "{}", stderr(&o));
        metric_rows(&tmp.path().join("run"))[0]["loss"]
            .as_f64()
            .unwrap()
    };
    let plain = first_loss(&["--max-seq-len", "16", "--batch-size", "4", "--no-shuffle"]);
    let packed = first_loss(&["--max-seq-len", "16", "--batch-size", "4", "--packing"]);
    assert!(
        (plain - packed).abs() / plain <= 1e-5,
        "{plain} vs {packed}"
    );
}

/// LoRA loss and gradients of `batch` through `acts` and `dx` as a run keeps them between
/// steps: the loss's bits and each gradient's bits.
fn lora_step_bits(
    model: &Decoder,
    adapter: &Adapter,
    batch: &Batch,
    dropout: Dropout,
    acts: &mut Activations,
    dx: &mut Vec<f32>,
) -> (u64, Vec<Vec<u32>>) {
    model
        .train_forward_packed(
            &batch.input_ids,
            batch.batch_size,
            batch.seq_len,
            &batch.segments,
            Some(adapter),
            dropout,
            acts,
        )
        .unwrap();
    let targets = target_positions(&batch.labels, batch.batch_size, batch.seq_len);
    let n = targets.len() as f64;
    // As the trainer does: sized, not cleared (the loss writes every row).
    dx.resize(batch.input_ids.len() * model.config.hidden_size, f32::NAN);
    dx.truncate(batch.input_ids.len() * model.config.hidden_size);
    let loss = lm_head_loss(model, &acts.x_final, &targets, 0.0, n, Some(dx));
    let mut grads = LoraGrads::zeros_like(adapter);
    model
        .train_backward(dx, acts, adapter, dropout, &mut grads)
        .unwrap();
    let tensors: Vec<&Vec<f32>> = grads.modules.values().flat_map(|(a, b)| [a, b]).collect();
    // dx starts as NaN where it grew: a row the loss failed to write would show here.
    assert!(
        loss.is_finite() && tensors.iter().all(|g| g.iter().all(|v| v.is_finite())),
        "a non-finite loss or gradient"
    );
    let bits = tensors
        .iter()
        .map(|g| g.iter().map(|v| v.to_bits()).collect())
        .collect();
    (loss.to_bits(), bits)
}

/// A run plans its buffers for the largest batch and reuses them every step without clearing
/// them: steps through buffers that served a larger batch (a packed one, then a smaller and a
/// longer one) give the bits of steps on fresh buffers; with dropout and with recomputation.
#[test]
fn reused_step_buffers_give_the_bits_of_fresh_ones() {
    for family in ["llama", "qwen3", "phi3", "gemma3_text", "gpt2"] {
        let (model, adapter) = load(family);
        let exs = examples(model.config.vocab_size, &[7, 3, 9, 5, 4, 12], 13);
        let batcher = Batcher::new(exs, 6, false, 0).unwrap();
        let batches = [
            batcher.packed_batch(&[vec![0, 1, 3], vec![2, 4], vec![5]]),
            batcher.batch(&[1, 4]),
            batcher.batch(&[5]),
            batcher.packed_batch(&[vec![2, 3, 4], vec![1]]),
        ];
        for (dropout, recompute) in [(0.0, false), (0.1, true)] {
            let dropout = Dropout {
                p: dropout,
                seed: 5,
            };
            let mut acts = Activations::default();
            acts.recompute = recompute;
            let mut dx = Vec::new();
            for (i, batch) in batches.iter().enumerate() {
                let reused = lora_step_bits(&model, &adapter, batch, dropout, &mut acts, &mut dx);
                let mut fresh_acts = Activations::default();
                fresh_acts.recompute = recompute;
                let fresh = lora_step_bits(
                    &model,
                    &adapter,
                    batch,
                    dropout,
                    &mut fresh_acts,
                    &mut Vec::new(),
                );
                assert!(
                    reused == fresh,
                    "{family}: batch {i} (dropout {}, recompute {recompute}) differs",
                    dropout.p
                );
            }
        }
    }
}
