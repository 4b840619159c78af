//! Data-parallel replicas in threads of this process: each replica's pass in a thread of its
//! own on `batch / N` consecutive windows (routing its own tokens, or the whole batch with the
//! others through their `RouteGroup`); each replica's losses read and averaged (its loss was
//! already scaled by its share), statistics summed over the replicas' tokens, gradients summed
//! on replica 0's device (`GradSync::Broadcast`: replica 0 takes the Adam step and hands its
//! weights to the others) or left all-reduced by Burn's collective inside the pass
//! (`GradSync::Collective`: every replica takes the same step).

use std::time::Instant;

use anyhow::Result;

use super::{Combined, Pass, PassFn, StepLosses, Strategy};
use crate::data::Batch;
use crate::routing::RoutingRng;
use crate::store::host_f32;
use crate::train::eval::layer_stats;
use crate::train::placement::GradSync;
use crate::train::reduce::{BatchGradients, broadcast_weights, sum_on_first};
use crate::train::replicas::{Replicas, Streams};

/// Replicas as threads.
pub(crate) struct Threads;

impl Strategy for Threads {
    /// Replica `i` draws from its stream of `rng` ([`Streams`]), so that a checkpointed `rng`
    /// replays the step exactly, the same stream whether the replicas are threads or ranks.
    fn passes(
        &self,
        replicas: &Replicas,
        batch: &Batch,
        rng: &mut RoutingRng,
        pass: &PassFn,
    ) -> Result<Vec<Pass>> {
        let n = replicas.replicas.len();
        let shards = batch.split(n);
        let group = replicas.group();
        let streams = Streams::draw(rng, n, group.is_some());
        let rngs: Vec<RoutingRng> = (0..n).map(|i| streams.replica(i)).collect();
        let collective = replicas.collective();
        let work = (replicas.replicas.iter().zip(shards.iter()).zip(rngs)).enumerate();
        let done = replicas.on_each(work, |(i, ((r, shard), mut rng))| {
            let devices = collective.as_deref();
            let out = match group {
                Some(g) => g.run_as(i, |seat| pass(r, shard, &mut rng, Some(seat), devices)),
                None => pass(r, shard, &mut rng, None, devices),
            };
            (out, rng)
        });
        let (passes, mut rngs): (Vec<Pass>, Vec<RoutingRng>) = done.into_iter().unzip();
        if group.is_some() {
            // Replica 0 routed the batch with the run's generator, as one model would.
            *rng = rngs.swap_remove(0);
        }
        Ok(passes)
    }

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

    fn update(&self, replicas: &mut Replicas, grads: &BatchGradients, lr: f64, clip: f64) {
        if let BatchGradients::OnEach(each) = grads {
            // Every replica its own step on the same all-reduced gradient.
            let work = std::mem::take(&mut replicas.replicas).into_iter().zip(each);
            replicas.replicas = replicas.on_each(work, |(r, g)| r.adam_step(g, lr, clip));
            return;
        }
        // Replica 0 takes the step and hands its weights to the others.
        let first = replicas
            .replicas
            .remove(0)
            .adam_step(grads.first(), lr, clip);
        replicas.replicas.insert(0, first);
        broadcast_weights(&mut replicas.replicas);
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
