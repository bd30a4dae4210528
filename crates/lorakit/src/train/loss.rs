//! The LM head and the conditional-LM loss, evaluated only at positions that carry a target.
//!
//! logits[b, t] predicts labels[b, t+1]; positions whose next label is −100 (prompt, padding,
//! the last position) cost nothing: no LM-head product, no softmax.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::engine::matmul;
use crate::engine::ops::exp_shifted_sum;
use crate::model::linear_train::Buf;
/// The trait lives with the models; re-exported where the loss that needs it is.
pub use crate::model::LmHead;

/// The LM head's chunk buffers ([rows, hidden] and [rows, vocab], rows =
/// [`LmHead::loss_chunk_rows`]), kept by the
/// thread for the next step: the logits alone are 12 MB for a 49k vocabulary, and a fresh
/// allocation per step paid page faults (or a memset) for all of it. Each chunk overwrites
/// what it reads.
#[derive(Default)]
struct HeadWork {
    xs: Buf,
    normed: Buf,
    logits: Buf,
    d_normed: Buf,
    d_xs: Buf,
    capped: Buf,
}

thread_local! {
    static HEAD_WORK: RefCell<HeadWork> = RefCell::default();
}

/// (row of the flattened batch, target token) for every position that carries loss.
pub fn target_positions(labels: &[i64], batch: usize, seq: usize) -> Vec<(usize, u32)> {
    let mut out = Vec::new();
    for b in 0..batch {
        for t in 0..seq.saturating_sub(1) {
            let y = labels[b * seq + t + 1];
            if y >= 0 {
                out.push((b * seq + t, y as u32));
            }
        }
    }
    out
}

/// Sum over targets of the cross-entropy (with label smoothing ε: (1−ε)·CE + ε·mean_v(−log p_v),
/// as torch's `label_smoothing`), and, when `dx_final` is given, ∂(sum / normalizer)/∂x_final
/// written into it ([N, hidden], zero at rows without a target).
///
/// x_final: [N, hidden], the residual stream after the last layer.
pub fn lm_head_loss<M: LmHead + ?Sized>(
    model: &M,
    x_final: &[f32],
    targets: &[(usize, u32)],
    label_smoothing: f32,
    normalizer: f64,
    dx_final: Option<&mut [f32]>,
) -> f64 {
    lm_head_loss_with_head_grads(
        model,
        x_final,
        targets,
        label_smoothing,
        normalizer,
        dx_final,
        None,
    )
}

/// Full fine-tuning's share of the head: the final norm's and the LM head's gradients.
pub struct HeadGrads<'a> {
    /// d loss / d final-norm weight, [hidden] (accumulated).
    pub norm: &'a mut [f32],
    /// d loss / d final-norm bias (LayerNorm), [hidden] (accumulated).
    pub norm_bias: Option<&'a mut [f32]>,
    /// d loss / d head weight, [vocab, hidden] (accumulated; the embedding's gradient when the
    /// head is tied).
    pub head: &'a mut [f32],
}

/// [`lm_head_loss`], also accumulating the final norm's and the head's gradients into
/// `head_grads` (which needs `dx_final`).
pub fn lm_head_loss_with_head_grads<M: LmHead + ?Sized>(
    model: &M,
    x_final: &[f32],
    targets: &[(usize, u32)],
    label_smoothing: f32,
    normalizer: f64,
    mut dx_final: Option<&mut [f32]>,
    head_grads: Option<HeadGrads<'_>>,
) -> f64 {
    let (h, _) = model.dims();
    if let Some(dx) = dx_final.as_deref_mut() {
        // Rows with a target are written below; only the others need clearing.
        let mut has_target = vec![false; dx.len() / h.max(1)];
        for &(row, _) in targets {
            if let Some(t) = has_target.get_mut(row) {
                *t = true;
            }
        }
        for (row, &t) in dx.chunks_mut(h.max(1)).zip(&has_target) {
            if !t {
                row.fill(0.0);
            }
        }
    }
    HEAD_WORK.with(|w| match w.try_borrow_mut() {
        Ok(mut w) => lm_head_loss_in(
            &mut w,
            model,
            x_final,
            targets,
            label_smoothing,
            normalizer,
            dx_final,
            head_grads,
        ),
        // Only a loss computed inside another one's model calls would get here.
        Err(_) => lm_head_loss_in(
            &mut HeadWork::default(),
            model,
            x_final,
            targets,
            label_smoothing,
            normalizer,
            dx_final,
            head_grads,
        ),
    })
}

/// The chunked loop of [`lm_head_loss_with_head_grads`] on the buffers `w`.
#[allow(clippy::too_many_arguments)]
fn lm_head_loss_in<M: LmHead + ?Sized>(
    w: &mut HeadWork,
    model: &M,
    x_final: &[f32],
    targets: &[(usize, u32)],
    label_smoothing: f32,
    normalizer: f64,
    mut dx_final: Option<&mut [f32]>,
    mut head_grads: Option<HeadGrads<'_>>,
) -> f64 {
    let (h, v) = model.dims();
    let eps = label_smoothing as f64;
    let mut total = 0.0f64;
    let chunk_rows = model.loss_chunk_rows().max(1);
    let rows = chunk_rows.min(targets.len());
    let softcap = model.logit_softcap();
    let xs = w.xs.fit(rows * h);
    let normed = w.normed.fit(rows * h);
    let logits = w.logits.fit(rows * v);
    let d_normed = w.d_normed.fit(rows * h);
    let d_xs = w.d_xs.fit(rows * h);
    // The capped logits, for the cap's derivative 1 − (z / cap)².
    let capped = w.capped.fit(if softcap.is_some() { rows * v } else { 0 });
    for chunk in targets.chunks(chunk_rows) {
        let m = chunk.len();
        for (i, &(row, _)) in chunk.iter().enumerate() {
            xs[i * h..(i + 1) * h].copy_from_slice(&x_final[row * h..(row + 1) * h]);
        }
        model.final_norm_forward(&mut normed[..m * h], &xs[..m * h]);
        model.head_forward(&mut logits[..m * v], &normed[..m * h], m);
        if softcap.is_some() {
            capped[..m * v].copy_from_slice(&logits[..m * v]);
        }
        // Per row: loss, and the logits turned into d loss / d logits in place.
        let want_grad = dx_final.is_some();
        let losses: Vec<f64> = logits[..m * v]
            .par_chunks_mut(v)
            .zip(chunk.par_iter())
            .map(|(row, &(_, y))| {
                let target_logit = row[y as usize] as f64;
                let mean_logit = if eps > 0.0 {
                    row.iter().map(|&z| z as f64).sum::<f64>() / v as f64
                } else {
                    0.0
                };
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                // row becomes exp(z − max); one exp per logit serves the loss and the gradient.
                let sum = exp_shifted_sum(row, max);
                let lse = max as f64 + sum.ln();
                let nll = lse - target_logit;
                let loss = if eps > 0.0 {
                    (1.0 - eps) * nll + eps * (lse - mean_logit)
                } else {
                    nll
                };
                if want_grad {
                    // d loss / d z = softmax(z) − ((1−ε)·onehot(y) + ε/V), over the normaliser.
                    let p_scale = (1.0 / (sum * normalizer)) as f32;
                    let smooth = (eps / v as f64 / normalizer) as f32;
                    for z in row.iter_mut() {
                        *z = *z * p_scale - smooth;
                    }
                    row[y as usize] -= ((1.0 - eps) / normalizer) as f32;
                }
                loss
            })
            .collect();
        // Row by row, not chunk sums: the total is then the same whatever the chunk size.
        for l in &losses {
            total += l;
        }
        if let (Some(cap), true) = (softcap, want_grad) {
            // Through the cap: d z_raw = d z · (1 − tanh²), tanh = z / cap.
            for (d, &z) in logits[..m * v].iter_mut().zip(&capped[..m * v]) {
                let t = z / cap;
                *d *= 1.0 - t * t;
            }
        }
        if let (Some(g), true) = (head_grads.as_mut(), want_grad) {
            // d head += d logitsᵀ · normed: [vocab, m] · [m, hidden]
            matmul(
                g.head,
                &logits[..m * v],
                true,
                &normed[..m * h],
                false,
                v,
                m,
                h,
                true,
            );
        }
        if let Some(dx) = dx_final.as_deref_mut() {
            // d normed = d logits · head: [m, vocab] · [vocab, hidden]
            model.head_backward(&mut d_normed[..m * h], &logits[..m * v], m, false);
            if let Some(g) = head_grads.as_mut() {
                model.final_norm_weight_grad(g.norm, &xs[..m * h], &d_normed[..m * h]);
                if let Some(db) = g.norm_bias.as_deref_mut() {
                    crate::model::decoder_train::bias_grad(db, &d_normed[..m * h]);
                }
            }
            model.final_norm_backward(&mut d_xs[..m * h], &xs[..m * h], &d_normed[..m * h]);
            for (i, &(row, _)) in chunk.iter().enumerate() {
                dx[row * h..(row + 1) * h].copy_from_slice(&d_xs[i * h..(i + 1) * h]);
            }
        }
    }
    total
}
