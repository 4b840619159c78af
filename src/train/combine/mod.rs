//! What differs between one model, thread replicas and the ranks of a job, in one step: how
//! the passes' losses, routing statistics and gradients become the batch's ([`Combine`]), one
//! file each:
//!
//! | | losses and statistics | gradient |
//! |---|---|---|
//! | [`one_model`] | read with the gradient's squared norm in one device read | its own |
//! | [`threads`] | read per replica, averaged | summed on replica 0, or all-reduced by Burn |
//! | [`ranks`] | one all-reduce over the job | one all-reduce (with sharded experts: each rank's own experts') |

pub(crate) mod one_model;
pub(crate) mod ranks;
pub(crate) mod threads;

use anyhow::Result;
use burn::tensor::Tensor;

use super::eval::LayerStats;
use super::reduce::BatchGradients;
use super::replicas::Replicas;
use crate::launches::Counts;
use crate::model::SwitchStats;
use crate::optim::ParamGrads;

/// One replica's forward and backward on its shard; what [`Combine`] sums.
pub(crate) struct Pass {
    /// `[3]`: cross-entropy, load-balancing and z-loss, not scaled by the share (not read).
    pub(crate) losses: Tensor<1>,
    pub(crate) stats: Vec<SwitchStats>,
    pub(crate) grads: ParamGrads,
    pub(crate) forward_s: f64,
    pub(crate) backward_s: f64,
    /// Launches and syncs in the forward pass and in the backward pass.
    pub(crate) counts: [Counts; 2],
}

/// The step's losses: means over all replicas' tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct StepLosses {
    /// Cross-entropy.
    pub ce: f64,
    /// Load-balancing loss, summed over layers.
    pub lb: f64,
    /// Router z-loss, summed over layers.
    pub z: f64,
}

impl StepLosses {
    /// From `[ce, lb, z]`.
    pub(crate) fn from_slice(v: &[f64]) -> Self {
        Self {
            ce: v[0],
            lb: v[1],
            z: v[2],
        }
    }

    /// Whether all three are finite.
    pub(crate) fn is_finite(&self) -> bool {
        self.ce.is_finite() && self.lb.is_finite() && self.z.is_finite()
    }
}

/// The batch's losses, routing statistics and gradient, from every replica's pass.
pub(crate) struct Combined {
    /// The losses.
    pub losses: StepLosses,
    /// Routing statistics per Switch layer, over all replicas' tokens.
    pub layers: Vec<LayerStats>,
    /// The gradient of the whole batch.
    pub grads: BatchGradients,
    /// Its global L2 norm.
    pub grad_norm: f64,
    /// Seconds the host waited reading the device.
    pub read_s: f64,
}

/// How one kind of replicas combines its passes.
pub(crate) trait Combine: Sync {
    /// The batch's losses, statistics and gradient from `passes` (in replica order; one on a
    /// rank). Fails only when an exchange between ranks fails.
    fn combine(&self, replicas: &Replicas, passes: Vec<Pass>) -> Result<Combined>;
}

/// The strategy for `replicas`: decided by where they are, once per step.
pub(crate) fn strategy(replicas: &Replicas) -> &'static dyn Combine {
    match (replicas.world(), replicas.replicas.len()) {
        (Some(_), _) => &ranks::Ranks,
        (None, 1) => &one_model::OneModel,
        (None, _) => &threads::Threads,
    }
}
