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
//!
//! One model reads the device once per step: the losses, the routing statistics and the
//! squared gradient norm in one read, before the clip and the Adam step (which need the norm,
//! and which a non-finite loss must stop). No other host sync: on a GPU the phase times are
//! the host's time to issue each phase.

use std::time::Instant;

use burn::tensor::Tensor;
use burn::tensor::distributed::ReduceOperation;
use burn::tensor::{DType, Device, Int};

use anyhow::Result;

use super::eval::{LayerStats, layer_stats, layer_sums, layer_sums_of, summaries};
use super::reduce::BatchGradients;
use super::replicas::{Replica, Replicas};
use crate::data::Batch;
use crate::launches::Counts;
use crate::model::SwitchStats;
use crate::model::loss::Losses;
use crate::model::ops::cast_to;
use crate::optim::{ParamGrads, SumOfSquares, clip_coefficient};
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
    /// Seconds the host waited in the step's read of the device (one model: the losses,
    /// statistics and gradient norm), part of `update_s`: device work that the host's issuing
    /// did not hide. On the CPU backend the work is done as it is issued, and this is ~0.
    pub read_s: f64,
    /// Whether the weights were updated: not when a loss or the gradient norm is not finite
    /// (the step is skipped and nothing non-finite reaches the weights).
    pub updated: bool,
    /// Kernel launches and host syncs of the process in forward + loss, backward, and the
    /// rest ([`crate::launches`]). Under Burn's fusion a kernel launches when its queue is
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
    let share = 1.0 / replicas.total() as f64;
    // Forward, losses and backward: each replica on its shard of the batch.
    let mut passes = replicas.on_shards(batch, rng, |r, shard, rng, seat, all_reduce| {
        forward_backward(r, shard, rng, seat, s, share, all_reduce)
    })?;
    let t0 = Instant::now();
    let counts0 = Counts::now();
    let (forward_s, backward_s) = (passes[0].forward_s, passes[0].backward_s);
    let pass_counts = [passes[0].counts[0], passes[0].counts[1]];
    let one_model = passes.len() == 1 && replicas.world().is_none();
    let read_s;
    let (ce, lb, z, layers, grads, grad_norm) = if one_model {
        // One read: losses, routing statistics, and the squared gradient norm.
        let p = passes.remove(0);
        let squares = p.grads.sum_of_squares();
        let summary = summaries(&p.stats);
        let n_summary = summary.as_ref().map_or(0, |t| t.dims()[0]);
        let mut parts = vec![p.losses];
        parts.extend(summary);
        if let SumOfSquares::Device(t) = &squares {
            parts.push(t.clone());
        }
        let parts = parts.into_iter().map(|t| cast_to(t, DType::F32)).collect();
        let parts = Tensor::cat(parts, 0);
        let t_read = Instant::now();
        let read = host_f32(parts);
        read_s = t_read.elapsed().as_secs_f64();
        let [ce, lb, z] = [0, 1, 2].map(|i| read[i] as f64);
        let sums = layer_sums_of(&[p.stats], &[read[3..3 + n_summary].to_vec()]);
        let layers = LayerStats::from_sums(&sums);
        let norm = match squares {
            SumOfSquares::Host(total) => total.sqrt(),
            SumOfSquares::Device(_) => (read[3 + n_summary] as f64).sqrt(),
        };
        (ce, lb, z, layers, BatchGradients::OnFirst(p.grads), norm)
    } else {
        let t_read = Instant::now();
        let read: Vec<Vec<f32>> = passes.iter().map(|p| host_f32(p.losses.clone())).collect();
        read_s = t_read.elapsed().as_secs_f64();
        let sum = |i: usize| read.iter().map(|r| r[i] as f64 * share).sum::<f64>();
        let (mut ce, mut lb, mut z) = (sum(0), sum(1), sum(2));
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
        let norm = grads.global_norm();
        (ce, lb, z, layers, grads, norm)
    };
    let updated = replicas.on_worker(|replicas| {
        if !(grad_norm.is_finite() && ce.is_finite() && lb.is_finite() && z.is_finite()) {
            return false; // diverged: no update, the caller decides
        }
        // Clip to the global norm; Adam; every replica then holds the new weights.
        let clip = clip_coefficient(grad_norm, s.grad_clip);
        replicas.adam_step(&grads, s.lr, clip);
        true
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
        read_s,
        updated,
        counts: [pass_counts[0], pass_counts[1], Counts::now().since(counts0)],
    })
}

/// One replica's forward and backward; the losses are its share of the step's.
struct Pass {
    /// `[3]`: cross-entropy, load-balancing and z-loss, not scaled by the share (not read).
    losses: Tensor<1>,
    stats: Vec<SwitchStats>,
    grads: ParamGrads,
    forward_s: f64,
    backward_s: f64,
    /// Launches and syncs in the forward pass and in the backward pass.
    counts: [Counts; 2],
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
    let losses = Losses::new(out.logits, y, &out.stats, s.lb_coef, s.z_coef);
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
