//! Data-parallel replicas in threads of this process: each replica's losses read and averaged
//! (its loss was already scaled by its share), statistics summed over the replicas' tokens,
//! gradients summed on replica 0's device (`GradSync::Broadcast`) or left all-reduced by
//! Burn's collective inside the pass (`GradSync::Collective`).

use std::time::Instant;

use anyhow::Result;

use super::Pass;
use super::{Combine, Combined, StepLosses};
use crate::store::host_f32;
use crate::train::eval::layer_stats;
use crate::train::placement::GradSync;
use crate::train::reduce::{BatchGradients, sum_on_first};
use crate::train::replicas::Replicas;

/// Replicas as threads.
pub struct Threads;

impl Combine for Threads {
    fn combine(&self, replicas: &Replicas, passes: Vec<Pass>) -> Result<Combined> {
        let (read_s, losses) = read_losses(&passes, replicas.total());
        let (stats, grads): (Vec<_>, Vec<_>) =
            passes.into_iter().map(|p| (p.stats, p.grads)).unzip();
        let grads = match replicas.grad_sync() {
            GradSync::Broadcast => BatchGradients::OnFirst(sum_on_first(&replicas.replicas, grads)),
            GradSync::Collective => BatchGradients::OnEach(grads),
        };
        Ok(Combined {
            losses,
            layers: layer_stats(&stats),
            grad_norm: grads.global_norm(),
            grads,
            read_s,
        })
    }
}

/// The passes' losses read (one read each), as the mean over `total` replicas, and the
/// seconds the reads waited.
pub(crate) fn read_losses(passes: &[Pass], total: usize) -> (f64, StepLosses) {
    let share = 1.0 / total as f64;
    let t_read = Instant::now();
    let read: Vec<Vec<f32>> = passes.iter().map(|p| host_f32(p.losses.clone())).collect();
    let read_s = t_read.elapsed().as_secs_f64();
    let sum = |i: usize| read.iter().map(|r| r[i] as f64 * share).sum::<f64>();
    (read_s, StepLosses::from_slice(&[sum(0), sum(1), sum(2)]))
}
