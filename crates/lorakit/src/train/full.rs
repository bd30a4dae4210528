//! Full fine-tuning (`lorakit train --full`): every weight, norm and the embedding trainable,
//! with AdamW state for all of them: the baseline LoRA replaces. It runs in the same loop as
//! LoRA ([`run_steps`]: data order, schedule, loss, clipping, metrics, non-finite guards); the
//! result is an HF model directory (`OUT/model`). Runs in f32 (no bf16 packs: the weights change
//! every step).

use std::path::PathBuf;

use crate::data::{Batch, Grouping};
use crate::error::{Error, Result};
use crate::io::output::OutputDir;
use crate::model::decoder_train::{Activations, Dropout, FullGrads};
use crate::model::param::Param;
use crate::model::{LoadedModel, Precision};
use crate::train::loss::{lm_head_loss_with_head_grads, HeadGrads};
use crate::train::optim::AdamW;
use crate::train::parallel::SingleProcess;
use crate::train::trainer::{
    checkpoint_dir, evaluate_loss_grouped, micro_batch_forward, prune_checkpoints, run_steps,
    Event, Start, TrainOptions, TrainOutput, TrainPlan, TrainSummary, Trainee, FULL_OUTPUT_FILES,
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
        let grads = FullGrads::zeros_like(&loaded.model);
        let mut run = FullRun {
            loaded,
            grads,
            acts: Activations::default(),
            dx: Vec::new(),
        };
        let sizes: Vec<usize> = run.params()?.iter().map(|p| p.value.len()).collect();
        let start = Start {
            step: 0,
            adam: AdamW::new(plan.adam, &sizes),
            history: Vec::new(),
        };
        run_steps(
            &mut run,
            &plan,
            Some(output),
            &SingleProcess,
            start,
            on_event,
        )
    })
}

/// A full fine-tuning run: the model itself and a gradient for each of its tensors.
struct FullRun<'m> {
    loaded: &'m mut LoadedModel,
    grads: FullGrads,
    acts: Activations,
    /// ∂loss/∂x_final, [batch·seq, hidden] (a work buffer of the backward).
    dx: Vec<f32>,
}

impl Trainee for FullRun<'_> {
    const WHAT: &'static str = "model";
    const TITLE: &'static str = "lorakit train --full";
    const GRADIENT_PER_MICRO_BATCH: bool = false;

    fn accumulate(
        &mut self,
        batch: &Batch,
        _micro_index: u64,
        o: &TrainOptions,
        normalizer: f64,
    ) -> Result<f64> {
        let model = &self.loaded.model;
        let targets = micro_batch_forward(
            model,
            batch,
            None,
            Dropout::NONE,
            &mut self.acts,
            &mut self.dx,
        )?;
        let FullGrads {
            embed_tokens,
            norm,
            norm_bias,
            lm_head,
            ..
        } = &mut self.grads;
        // A tied head's gradient is the embedding's.
        let head = lm_head.as_deref_mut().unwrap_or(embed_tokens);
        let loss = lm_head_loss_with_head_grads(
            model,
            &self.acts.x_final,
            &targets,
            o.label_smoothing,
            normalizer,
            Some(&mut self.dx),
            Some(HeadGrads {
                norm,
                norm_bias: norm_bias.as_deref_mut(),
                head,
            }),
        );
        model.train_backward_full(&mut self.dx, &self.acts, &mut self.grads)?;
        Ok(loss)
    }

    fn zero_grads(&mut self) {
        self.grads.zero();
    }

    fn params(&mut self) -> Result<Vec<Param<'_>>> {
        self.loaded.model.params_with_grads(&mut self.grads)
    }

    fn eval_loss(
        &self,
        examples: &[crate::data::Example],
        batch_size: usize,
        grouping: Grouping,
    ) -> Result<f64> {
        evaluate_loss_grouped(&self.loaded.model, None, examples, batch_size, grouping)
    }

    /// Snapshots of the model (not resumable: no optimiser state, which would triple their
    /// size), for choosing a step afterwards, e.g. by validation score. The last step's is the
    /// result itself.
    fn checkpoint(
        &self,
        out: &OutputDir,
        step: u64,
        last: bool,
        _adam: &AdamW,
        options: &TrainOptions,
    ) -> Result<Option<PathBuf>> {
        if last {
            return Ok(None);
        }
        let dir = checkpoint_dir(out, step);
        self.loaded.save_hf_dir(&dir)?;
        prune_checkpoints(out.path(), options.keep_checkpoints);
        Ok(Some(dir.shown().to_path_buf()))
    }

    fn save(&self, output: &TrainOutput) -> Result<PathBuf> {
        let model_dir = output.dir().nested(MODEL_DIR);
        self.loaded.save_hf_dir(&model_dir)?;
        Ok(model_dir.shown().to_path_buf())
    }
}
