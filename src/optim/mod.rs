//! labml's optimizer as the experiment configures it: Adam with eps added to `sqrt(v)` before
//! the bias correction, under the Noam learning-rate schedule, after PyTorch-style global-norm
//! gradient clipping (`clip_grad_norm_`: one norm over all gradients, not one per tensor).
//! Fine-tuning Hugging Face models uses [`adamw`] instead: PyTorch's AdamW under `Trainer`'s
//! linear schedule.
//!
//! ```text
//! lr_t  = lr * d_model^-0.5 * min(t^-0.5, t * warmup^-1.5)
//! m_t   = b1 m + (1 - b1) g;   v_t = b2 v + (1 - b2) g^2
//! theta = theta - lr_t * sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(v_t) + eps)
//! ```

mod adam;
pub mod adamw;
mod grads;

use serde::{Deserialize, Serialize};

pub use adam::LabmlAdam;
pub use adamw::{AdamW, AdamWConfig, LinearSchedule};
pub use grads::{ParamGrads, clip_coefficient};
pub(crate) use grads::{SumOfSquares, tensor_sum_of_squares};

/// Noam schedule (labml `Noam.get_lr`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct Noam {
    /// Base learning rate (labml: 1.0).
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: u64,
    /// The model width, whose inverse square root scales the rate.
    pub d_model: usize,
}

impl Noam {
    /// Learning rate at step `t` (1-based: the first update uses `t = 1`).
    pub(crate) fn lr(&self, t: u64) -> f64 {
        let t = t.max(1) as f64;
        let factor = t.powf(-0.5).min(t * (self.warmup as f64).powf(-1.5));
        self.lr * (self.d_model as f64).powf(-0.5) * factor
    }
}
