//! What differs between one model, thread replicas and the ranks of a job, in one step: where
//! the replicas' passes run, how their losses, routing statistics and gradients become the
//! batch's, and how the Adam update reaches every replica ([`Strategy`]), one file each:
//!
//! | | passes | losses and statistics | gradient | update |
//! |---|---|---|---|---|
//! | [`one_model`] | on a worker of the pool (on the CPU; elsewhere on the caller) | read with the gradient's squared norm in one device read | its own | Adam |
//! | [`threads`] | a thread each, on its shard | read per replica, averaged | summed on replica 0, or all-reduced by Burn | replica 0's Adam, its weights to the others; or each its own |
//! | [`ranks`] | this rank's shard | one all-reduce over the job | one all-reduce (with sharded experts: each rank's own experts') | Adam, the same on every rank |

pub(crate) mod one_model;
pub(crate) mod ranks;
pub(crate) mod threads;

use anyhow::Result;
use burn::tensor::{Device, Tensor};

use super::eval::LayerStats;
use super::reduce::BatchGradients;
use super::replicas::{Replica, Replicas};
use crate::data::Batch;
use crate::launches::Counts;
use crate::model::SwitchStats;
use crate::optim::ParamGrads;
use crate::routing::{RoutingRng, Shard};

/// One replica's forward and backward (`train::step`'s): `(replica, its shard of the batch,
/// its generator, its seat when the replicas route together, the devices to all-reduce its
/// gradients over)`.
pub(crate) type PassFn<'a> = dyn Fn(&Replica, &Batch, &mut RoutingRng, Option<Shard<'_>>, Option<&[Device]>) -> Pass
    + Sync
    + 'a;

/// One replica's forward and backward on its shard; what [`Strategy::combine`] sums.
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

/// What one kind of replicas does its own way in a step.
pub(crate) trait Strategy: Sync {
    /// `pass` on every replica (of this process) on its shard of `batch`, the results in
    /// replica order. Fails only when an exchange between ranks fails.
    fn passes(
        &self,
        replicas: &Replicas,
        batch: &Batch,
        rng: &mut RoutingRng,
        pass: &PassFn,
    ) -> Result<Vec<Pass>>;

    /// The batch's losses, statistics and gradient from `passes` (in replica order; one on a
    /// rank). Fails only when an exchange between ranks fails.
    fn combine(&self, replicas: &Replicas, passes: Vec<Pass>) -> Result<Combined>;

    /// Adam on `clip * grads` (`clip`: the global-norm clip's factor, applied in Adam's pass),
    /// after which every replica holds the same new weights.
    fn update(&self, replicas: &mut Replicas, grads: &BatchGradients, lr: f64, clip: f64);
}

/// The strategy for `replicas`: decided by where they are.
pub(crate) fn of(replicas: &Replicas) -> &'static dyn Strategy {
    match (replicas.world(), replicas.replicas.len()) {
        (Some(_), _) => &ranks::Ranks,
        (None, 1) => &one_model::OneModel,
        (None, _) => &threads::Threads,
    }
}
