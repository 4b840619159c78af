//! One optimizer step, as nanoGPT writes it, on the model's replicas (one replica = one model):
//!
//! ```text
//! replica r, on its shard of the batch (a thread each):
//!     forward -> loss_r = (ce_r + lb_coef * lb_r + z_coef * z_r) / N -> backward
//! g = sum_r grad(loss_r)                           module order, replica order
//! clip g to its global norm                        PyTorch's clip_grad_norm_
//! Adam (labml's) with the Noam learning rate       the same new weights on every replica
//! ```
//! Across processes (`--distributed`) the replicas are the job's ranks: the sums are
//! all-reduces ([`crate::distributed`]), the rest is the same.

use std::time::Instant;

use burn::tensor::Tensor;
use burn::tensor::distributed::ReduceOperation;
use burn::tensor::{Device, Int};

use anyhow::Result;

use super::eval::{LayerStats, layer_stats, layer_sums};
use super::replicas::{Replica, Replicas};
use crate::data::Batch;
use crate::model::SwitchStats;
use crate::model::loss::Losses;
use crate::optim::{ParamGrads, clip_coefficient};
use crate::routing::{RoutingRng, Shard};
use crate::store::host_f32;

/// Loss weights, clipping and learning rate of one step.
#[derive(Debug, Clone, Copy)]
pub struct StepSettings {
    /// Weight of the load-balancing loss.
    pub lb_coef: f64,
    /// Weight of the router z-loss.
    pub z_coef: f64,
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
    /// Whether the weights were updated: not when a loss or the gradient norm is not finite
    /// (the step is skipped and nothing non-finite reaches the weights).
    pub updated: bool,
}

/// One optimizer step on `batch`, drawing routing and dropout from `rng`. Fails only when an
/// exchange between the ranks of a distributed job fails.
pub fn step(
    replicas: &mut Replicas,
    batch: &Batch,
    rng: &mut RoutingRng,
    s: StepSettings,
) -> Result<StepOutput> {
    let share = 1.0 / replicas.total() as f64;
    // Forward, losses and backward: each replica on its shard of the batch.
    let passes = replicas.on_shards(batch, rng, |r, shard, rng, seat, all_reduce| {
        forward_backward(r, shard, rng, seat, s, share, all_reduce)
    });
    let t0 = Instant::now();
    let sum = |f: fn(&Pass) -> f64| passes.iter().map(f).sum::<f64>();
    let (mut ce, mut lb, mut z) = (sum(|p| p.ce), sum(|p| p.lb), sum(|p| p.z));
    let (forward_s, backward_s) = (passes[0].forward_s, passes[0].backward_s);
    let (stats, grads): (Vec<Vec<SwitchStats>>, Vec<ParamGrads>) =
        passes.into_iter().map(|p| (p.stats, p.grads)).unzip();
    let layers = match replicas.world() {
        None => layer_stats(&stats),
        Some(world) => {
            // Every rank's losses and routing statistics, summed: one exchange.
            let sums = layer_sums(&stats);
            let mut flat = vec![ce, lb, z];
            for (sum, tokens) in &sums {
                flat.extend(sum);
                flat.push(*tokens as f64);
            }
            world.all_reduce_sum_f64("losses and routing statistics", &mut flat)?;
            [ce, lb, z] = [flat[0], flat[1], flat[2]];
            let mut at = 3;
            sums.iter()
                .map(|(sum, _)| {
                    let n = sum.len();
                    let layer = LayerStats::from_sum(&flat[at..at + n], flat[at + n] as usize);
                    at += sum.len() + 1;
                    layer
                })
                .collect()
        }
    };
    // The gradient of the whole batch.
    let grads = replicas.sum_gradients(grads)?;
    let (grad_norm, updated) = replicas.on_worker(|replicas| {
        // Clip it to its global norm.
        let grad_norm = grads.global_norm();
        if !(grad_norm.is_finite() && ce.is_finite() && lb.is_finite() && z.is_finite()) {
            return (grad_norm, false); // diverged: no update, the caller decides
        }
        let clip = clip_coefficient(grad_norm, s.grad_clip);
        // Adam; every replica then holds the new weights.
        replicas.adam_step(&grads, s.lr, clip);
        (grad_norm, true)
    });
    Ok(StepOutput {
        ce,
        lb,
        z,
        grad_norm,
        layers,
        forward_s,
        backward_s,
        update_s: t0.elapsed().as_secs_f64(),
        updated,
    })
}

/// One replica's forward and backward; the losses are its share of the step's.
struct Pass {
    ce: f64,
    lb: f64,
    z: f64,
    stats: Vec<SwitchStats>,
    grads: ParamGrads,
    forward_s: f64,
    backward_s: f64,
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
    let (x, y): (Tensor<2, Int>, Tensor<2, Int>) = batch.tensors(&r.device);
    let out = match seat {
        Some(seat) => r.model.forward_in_group(x, rng, seat),
        None => r.model.forward(x, rng),
    };
    let losses = Losses::new(out.logits, y, &out.stats, s.lb_coef, s.z_coef);
    // One read for the three.
    let read = host_f32(Tensor::cat(vec![losses.ce, losses.lb, losses.z], 0));
    let [ce, lb, z] = [0, 1, 2].map(|i| read[i] as f64 * share);
    let t1 = Instant::now();
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
    let _ = r.device.sync();
    Pass {
        ce,
        lb,
        z,
        stats: out.stats,
        grads,
        forward_s: (t1 - t0).as_secs_f64(),
        backward_s: t1.elapsed().as_secs_f64(),
    }
}
