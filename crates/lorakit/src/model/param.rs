//! A trainable tensor side by side with its gradient. The optimiser, clipping and checkpoints
//! walk lists of these, built in one pass over a model (or adapter) and its gradients, so a
//! value can never be updated with another tensor's gradient.

use crate::error::{Error, Result};

/// One trainable tensor and its gradient (same length).
pub struct Param<'a> {
    /// The tensor's name in the saved file (`model.layers.0.self_attn.q_proj.weight`,
    /// `…q_proj.lora_A.weight`).
    pub name: String,
    /// Weight decay applies: matrices and embeddings, not norms or biases (HF's Trainer).
    pub decay: bool,
    pub value: &'a mut [f32],
    pub grad: &'a mut [f32],
}

impl<'a> Param<'a> {
    /// Pairs `value` with `grad`, refusing a length mismatch (gradients built for another model).
    pub fn new(
        name: String,
        decay: bool,
        value: &'a mut [f32],
        grad: &'a mut [f32],
    ) -> Result<Self> {
        if value.len() != grad.len() {
            return Err(Error::Invalid(format!(
                "{name}: {} values but {} gradient entries",
                value.len(),
                grad.len()
            )));
        }
        Ok(Param {
            name,
            decay,
            value,
            grad,
        })
    }
}
