//! Full fine-tuning (`lorakit train --full`): every weight, norm and the embedding trainable,
//! with AdamW state for all of them: the baseline LoRA replaces. Same data order, schedule,
//! loss, clipping, metrics and non-finite guards as the LoRA loop; the result is an HF model
//! directory (`OUT/model`). Runs in f32 (no bf16 packs: the weights change every step).

use std::time::Instant;

use serde_json::json;

use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;
use crate::model::decoder_train::{Activations, Dropout, FullGrads};
use crate::model::save::save_hf_dir;
use crate::model::{LoadedModel, Precision};
use crate::train::loss::{lm_head_loss_with_head_grads, target_positions, HeadGrads};
use crate::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::train::trainer::{
    append_jsonl, check_step_finite, checkpoint_dir, evaluate_loss, prune_checkpoints, BatchStream,
    Event, StepMetrics, TrainOutput, TrainPlan, TrainSummary, FULL_OUTPUT_FILES,
};

pub use crate::train::trainer::MODEL_DIR;

/// Runs `plan` as full fine-tuning of `loaded.model` (changed in place) and writes the result
/// to `output/model`; with `--save-every N`, also a model snapshot every N steps under
/// `output/checkpoints/step-N` (HF directories; the newest `--keep-checkpoints` are kept).
/// `--resume` is not supported.
pub fn train_full(
    loaded: &mut LoadedModel,
    plan: TrainPlan,
    output: &TrainOutput,
    on_event: impl FnMut(Event),
) -> Result<TrainSummary> {
    if output.resume() {
        return Err(Error::Invalid(
            "--resume cannot be combined with --full: its --save-every snapshots hold no optimiser state".into(),
        ));
    }
    if loaded.model.precision != Precision::F32 {
        return Err(Error::Invalid(
            "full fine-tuning runs in f32: load the model with --precision f32".into(),
        ));
    }
    output.run(&FULL_OUTPUT_FILES, || {
        train_full_inner(loaded, plan, output, on_event)
    })
}

fn train_full_inner(
    loaded: &mut LoadedModel,
    plan: TrainPlan,
    output: &TrainOutput,
    mut on_event: impl FnMut(Event),
) -> Result<TrainSummary> {
    let o = &plan.options;
    let out = output.path();
    let metrics_path = out.join("metrics.jsonl");
    write_atomic(&metrics_path, b"")?;

    let mut grads = FullGrads::zeros_like(&loaded.model);
    // HF's Trainer: weight decay on matrices and embeddings, not on norms and biases.
    let (decay_sizes, plain_sizes): (Vec<_>, Vec<_>) = {
        let params = loaded.model.parameters_mut();
        let d = params.iter().filter(|p| p.decay).map(|p| p.data.len());
        let n = params.iter().filter(|p| !p.decay).map(|p| p.data.len());
        (d.collect(), n.collect())
    };
    let trainable: usize = decay_sizes.iter().chain(&plain_sizes).sum();
    let mut adam_decay = AdamW::new(plan.adam, &decay_sizes);
    let mut adam_plain = AdamW::new(
        AdamWConfig {
            weight_decay: 0.0,
            ..plan.adam
        },
        &plain_sizes,
    );

    on_event(Event::Started {
        total_steps: plan.total_steps,
        start_step: 0,
    });
    let h = loaded.model.config.hidden_size;
    let mut acts = Activations::default();
    let mut stream = BatchStream::new(&plan.batcher);
    let mut dx = Vec::new();
    let (mut last_loss, mut last_eval) = (None, None);
    let (mut train_curve, mut eval_curve) = (Vec::new(), Vec::new());
    let mut skipped_steps = 0u64;

    for step in 0..plan.total_steps {
        let t0 = Instant::now();
        grads.zero();
        let first = step * o.grad_accum as u64;
        let normalizer: usize = (0..o.grad_accum as u64)
            .map(|i| stream.micro_batch(first + i).target_tokens)
            .sum();
        let (mut loss_sum, mut tokens) = (0.0f64, 0usize);
        for i in 0..o.grad_accum as u64 {
            let batch = stream.micro_batch(first + i);
            if batch.target_tokens == 0 {
                continue;
            }
            let model = &loaded.model;
            model.train_forward(
                &batch.input_ids,
                batch.batch_size,
                batch.seq_len,
                None,
                Dropout::NONE,
                &mut acts,
            )?;
            let targets = target_positions(&batch.labels, batch.batch_size, batch.seq_len);
            dx.clear();
            dx.resize(batch.batch_size * batch.seq_len * h, 0.0);
            let FullGrads {
                embed_tokens,
                norm,
                norm_bias,
                lm_head,
                ..
            } = &mut grads;
            // A tied head's gradient is the embedding's.
            let head = lm_head.as_deref_mut().unwrap_or(embed_tokens);
            loss_sum += lm_head_loss_with_head_grads(
                model,
                &acts.x_final,
                &targets,
                o.label_smoothing,
                normalizer.max(1) as f64,
                Some(&mut dx),
                Some(HeadGrads {
                    norm,
                    norm_bias: norm_bias.as_deref_mut(),
                    head,
                }),
            );
            model.train_backward_full(&mut dx, &acts, &mut grads)?;
            tokens += batch.lengths.iter().sum::<usize>();
        }
        let loss = loss_sum / normalizer.max(1) as f64;
        let grad_norm = if loss.is_finite() {
            let mut g = grads.tensors_mut();
            let max = if o.max_grad_norm > 0.0 {
                o.max_grad_norm
            } else {
                f64::INFINITY
            };
            clip_grad_norm(&mut g, max)
        } else {
            f64::NAN
        };
        let lr = plan.schedule.lr_at(step);
        let nonfinite = check_step_finite(step, loss, grad_norm, o.skip_nonfinite, "model")?;
        skipped_steps += nonfinite.is_some() as u64;
        if nonfinite.is_none() {
            let params = loaded.model.parameters_mut();
            let grad_views = grads.tensors_mut();
            let (mut dp, mut dg, mut pp, mut pg) = (vec![], vec![], vec![], vec![]);
            for (p, g) in params.into_iter().zip(grad_views) {
                if p.decay {
                    dp.push(p.data);
                    dg.push(&*g);
                } else {
                    pp.push(p.data);
                    pg.push(&*g);
                }
            }
            adam_decay.step(lr, &mut dp, &dg);
            adam_plain.step(lr, &mut pp, &pg);
        }
        let metrics = StepMetrics {
            step: step + 1,
            loss,
            lr,
            tokens,
            target_tokens: normalizer,
            grad_norm,
            seconds: t0.elapsed().as_secs_f64(),
            skipped: nonfinite,
        };
        append_jsonl(
            &metrics_path,
            &serde_json::to_value(&metrics).unwrap_or_default(),
        )?;
        if metrics.skipped.is_none() {
            train_curve.push((metrics.step, loss));
            last_loss = Some(loss);
        }
        on_event(Event::Step(&metrics));

        let done = step + 1 == plan.total_steps;
        if let Some(eval) = &plan.eval_examples {
            if done || (o.eval_every > 0 && (step + 1) % o.eval_every as u64 == 0) {
                let eval_loss = evaluate_loss(&loaded.model, None, eval, o.batch_size)?;
                append_jsonl(
                    &metrics_path,
                    &json!({ "step": step + 1, "eval_loss": eval_loss }),
                )?;
                eval_curve.push((step + 1, eval_loss));
                last_eval = Some(eval_loss);
                on_event(Event::Eval {
                    step: step + 1,
                    eval_loss,
                });
            }
        }
        // Snapshots of the model (not resumable: no optimiser state, which would triple their
        // size), for choosing a step afterwards, e.g. by validation score.
        if !done && o.save_every > 0 && (step + 1) % o.save_every as u64 == 0 {
            let dir = checkpoint_dir(output.dir(), step + 1);
            save_hf_dir(&loaded.model, &loaded.tokenizer, &dir)?;
            prune_checkpoints(out, o.keep_checkpoints);
            on_event(Event::Checkpoint {
                step: step + 1,
                dir: dir.shown(),
            });
        }
    }

    let model_dir = output.dir().nested(MODEL_DIR);
    save_hf_dir(&loaded.model, &loaded.tokenizer, &model_dir)?;
    if !(train_curve.is_empty() && eval_curve.is_empty()) {
        crate::train::plot::plot_loss_curve(
            &out.join("loss.png"),
            &train_curve,
            &eval_curve,
            "lorakit train --full",
        )?;
    }
    Ok(TrainSummary {
        steps: plan.total_steps,
        final_loss: last_loss,
        eval_loss: last_eval,
        adapter_dir: model_dir.shown().to_path_buf(),
        trainable_parameters: trainable,
        skipped_steps,
    })
}
