//! One optimizer step, as nanoGPT writes it, on the model's replicas (one replica = one model):
//!
//! ```text
//! replica r, on its shard of the batch (a thread or a rank each):
//!     forward -> loss_r = (ce_r + lb_coef * lb_r + z_coef * z_r) / N -> backward
//! g = sum_r grad(loss_r)                           module order, replica order
//! clip g to its global norm                        PyTorch's clip_grad_norm_
//! Adam (labml's) with the Noam learning rate       the same new weights on every replica
//! balance = bias: b_e += rate * sign(mean - load_e)  every replica's expert biases, same load
//! ```
//! What differs between one model, threads and ranks (where the passes run, how their losses,
//! statistics and gradients are summed, how the update reaches every replica) is a
//! `Strategy`, a file each in `train/strategy/`. One model reads the device once per step
//! (losses, routing statistics and the squared gradient norm together); on a GPU the phase
//! times are the host's time to issue each phase.

use std::time::Instant;

use burn::tensor::Tensor;
use burn::tensor::distributed::ReduceOperation;
use burn::tensor::{Device, Int};

use anyhow::Result;

use super::eval::LayerStats;
use super::replicas::{Replica, Replicas};
use super::strategy::{self, Pass};
use crate::data::Batch;
use crate::launches::Counts;
use crate::model::loss::Losses;
use crate::optim::{ParamGrads, clip_coefficient};
use crate::routing::{RoutingRng, Shard};

/// Loss weights, clipping and learning rate of one step.
#[derive(Debug, Clone, Copy)]
pub struct StepSettings {
    /// Weight of the load-balancing loss.
    pub lb_coef: f64,
    /// Weight of the router z-loss.
    pub z_coef: f64,
    /// Over which tokens the load-balancing loss is taken.
    pub balance_scope: crate::routing::BalanceScope,
    /// Maximum global gradient norm.
    pub grad_clip: f64,
    /// Learning rate of this step.
    pub lr: f64,
}

/// What one step measured (losses over all replicas' tokens: the mean of theirs).
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Cross-entropy.
    pub ce: f64,
    /// Load-balancing loss, summed over layers.
    pub lb: f64,
    /// Router z-loss, summed over layers.
    pub z: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Routing statistics per Switch layer, over all replicas' tokens.
    pub layers: Vec<LayerStats>,
    /// Seconds in forward + loss (replica 0).
    pub forward_s: f64,
    /// Seconds in backward (replica 0).
    pub backward_s: f64,
    /// Seconds in the rest: gradient sum, clip, Adam.
    pub update_s: f64,
    /// Seconds the host waited in the step's read of the device (one model: the losses,
    /// statistics and gradient norm), part of `update_s`: device work that the host's issuing
    /// did not hide. On the CPU backend the work is done as it is issued, and this is ~0.
    pub read_s: f64,
    /// Whether the weights were updated: not when a loss or the gradient norm is not finite
    /// (the step is skipped and nothing non-finite reaches the weights).
    pub updated: bool,
    /// Kernel launches and host syncs of the process in forward + loss, backward, and the
    /// rest (`crate::launches`). Under Burn's fusion a kernel launches when its queue is
    /// flushed, so launches may fall in a later phase than the op that queued them.
    pub counts: [Counts; 3],
}

/// One optimizer step on `batch`, drawing routing and dropout from `rng`. Fails only when an
/// exchange between the ranks of a distributed job fails.
pub fn step(
    replicas: &mut Replicas,
    batch: &Batch,
    rng: &mut RoutingRng,
    s: StepSettings,
) -> Result<StepOutput> {
    // One model, replicas in threads or the ranks of a job: each its own way (a file each).
    let how = strategy::of(replicas);

    // Forward, loss and backward: each replica on its shard of the batch.
    let share = 1.0 / replicas.total() as f64;
    let passes = how.passes(replicas, batch, rng, &|r, shard, rng, seat, all_reduce| {
        forward_backward(r, shard, rng, seat, s, share, all_reduce)
    })?;
    let t0 = Instant::now();
    let counts0 = Counts::now();
    let (forward_s, backward_s) = (passes[0].forward_s, passes[0].backward_s);
    let pass_counts = passes[0].counts;

    // The batch's losses, routing statistics and gradient, summed over the replicas.
    let c = how.combine(replicas, passes)?;

    // A non-finite loss or gradient stops here: nothing non-finite reaches the weights.
    let updated = c.losses.is_finite() && c.grad_norm.is_finite();
    if updated {
        // Clip to the global norm (a factor Adam applies in its pass), then Adam.
        let clip = clip_coefficient(c.grad_norm, s.grad_clip);
        how.update(replicas, &c.grads, s.lr, clip);
        // Auxiliary-loss-free balancing (model.balance = bias): each expert's bias follows the
        // batch's load, the same on every replica and rank.
        for r in &mut replicas.replicas {
            r.model
                .update_expert_bias(c.layers.iter().map(|l| l.expert_frac.as_slice()));
        }
    }
    Ok(StepOutput {
        ce: c.losses.ce,
        lb: c.losses.lb,
        z: c.losses.z,
        grad_norm: c.grad_norm,
        layers: c.layers,
        forward_s,
        backward_s,
        update_s: t0.elapsed().as_secs_f64(),
        read_s: c.read_s,
        updated,
        counts: [pass_counts[0], pass_counts[1], Counts::now().since(counts0)],
    })
}

/// Forward, losses and backward of replica `r` on `batch` (its shard), its loss scaled by
/// `share`; with `all_reduce`, its gradients are summed with those of the other devices.
fn forward_backward(
    r: &Replica,
    batch: &Batch,
    rng: &mut RoutingRng,
    seat: Option<Shard<'_>>,
    s: StepSettings,
    share: f64,
    all_reduce: Option<&[Device]>,
) -> Pass {
    let t0 = Instant::now();
    let c0 = Counts::now();
    let (x, y): (Tensor<2, Int>, Tensor<2, Int>) = batch.tensors(&r.device);
    let out = match seat {
        Some(seat) => r.model.forward_in_group(x, rng, seat),
        None => r.model.forward(x, rng),
    };
    let losses = Losses::new(
        out.logits,
        y,
        &out.stats,
        s.lb_coef,
        s.z_coef,
        s.balance_scope,
    );
    let read = Tensor::cat(vec![losses.ce, losses.lb, losses.z], 0).detach();
    let t1 = Instant::now();
    let c1 = Counts::now();
    let total = if share == 1.0 {
        losses.total
    } else {
        losses.total.mul_scalar(share)
    };
    let mut grads = ParamGrads::from_gradients(&r.model, total.backward());
    if let Some(devices) = all_reduce {
        grads.map(|g| {
            burn::tensor::distributed::all_reduce(g, ReduceOperation::Sum, devices.to_vec())
                .resolve()
        });
    }
    Pass {
        losses: read,
        stats: out.stats,
        grads,
        forward_s: (t1 - t0).as_secs_f64(),
        backward_s: t1.elapsed().as_secs_f64(),
        counts: [c1.since(c0), Counts::now().since(c1)],
    }
}
