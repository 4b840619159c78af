//! The ranks of a distributed job (`--distributed`), one replica each: each rank's pass on its
//! shard of the batch (routing with the others when they route together, rank 0 deciding; with
//! sharded experts its tokens travel to their experts' ranks and back); the losses and routing
//! statistics summed over the job in one all-reduce, the gradients in another
//! ([`crate::train::reduce::sum_across`]); with expert parallelism the replicated parameters'
//! gradients are summed and each rank keeps its own experts' ([`crate::train::reduce::sum_sharded`]),
//! the global norm taken over all of them; then the same Adam step on every rank.

use std::sync::Arc;

use anyhow::{Context, Result, bail};

use super::threads::read_losses;
use super::{Combined, Pass, PassFn, StepLosses, Strategy};
use crate::data::Batch;
use crate::distributed::Fault;
use crate::routing::{RoutingRng, Shard};
use crate::train::eval::{LayerStats, RoutingSums, layer_sums};
use crate::train::reduce::{BatchGradients, sum_across, sum_sharded};
use crate::train::replicas::{Replicas, Streams};

/// Replicas as ranks.
pub(crate) struct Ranks;

impl Strategy for Ranks {
    /// This rank's shard of `batch`, its generator drawn as replica `rank` of the threads would
    /// draw it; with global routing, rank 0's generator continues the run on every rank
    /// afterwards.
    fn passes(
        &self,
        replicas: &Replicas,
        batch: &Batch,
        rng: &mut RoutingRng,
        pass: &PassFn,
    ) -> Result<Vec<Pass>> {
        let Some(world) = replicas.world_handle() else {
            bail!("the ranks' passes need the job's ranks");
        };
        let (n, rank) = (world.size(), world.rank());
        let shard = &batch.split(n)[rank];
        let global = replicas.global_routing();
        let mut mine = Streams::draw(rng, n, global).replica(rank);
        // An exchange that fails inside the pass is recorded here and returned after it.
        let fault = Arc::new(Fault::default());
        let seat = if global {
            Some(Shard::rank(&world, &fault))
        } else {
            // Each rank routes its own tokens; with sharded experts they still travel.
            replicas
                .expert_parallel()
                .then(|| Shard::rank_alone(&world, &fault))
        };
        let r = replicas.first();
        // A rank waits for the others in the pass: on a pool worker only when the others are
        // other processes (thread ranks would take every worker and wait for each other).
        let out = if world.in_process() {
            pass(r, shard, &mut mine, seat, None)
        } else {
            crate::cpu::on_worker(&r.device, || pass(r, shard, &mut mine, seat, None))
        };
        if let Some(e) = fault.take() {
            return Err(e);
        }
        if global {
            let mut state = serde_json::to_vec(&mine).context("cannot serialise the generator")?;
            world.broadcast("the routing generator", 0, &mut state)?;
            *rng = serde_json::from_slice(&state).context("rank 0 sent no routing generator")?;
        }
        Ok(vec![out])
    }

    fn combine(&self, replicas: &Replicas, mut passes: Vec<Pass>) -> Result<Combined> {
        let Some(world) = replicas.world() else {
            bail!("the ranks' combination needs the job's ranks");
        };
        let (read_s, losses) = read_losses(&passes, replicas.total());
        let p = passes.remove(0);
        // Every rank's losses and routing statistics, summed: one exchange.
        let sums = layer_sums(&[p.stats]);
        let mut flat = vec![losses.ce, losses.lb, losses.z];
        flat.extend(RoutingSums::to_wire(&sums));
        world.all_reduce_sum_f64("losses and routing statistics", &mut flat)?;
        let losses = StepLosses::from_slice(&flat[..3]);
        let layers = RoutingSums::from_wire(&flat[3..], &sums);
        // The gradient of the whole batch.
        let (model, device) = (&replicas.first().model, &replicas.first().device);
        let grads = match replicas.expert_ids() {
            None => BatchGradients::OnFirst(sum_across(world, model, p.grads, device, None)?),
            Some(experts) => sum_sharded(world, model, p.grads, device, experts)?,
        };
        Ok(Combined {
            losses,
            layers: layers.iter().map(LayerStats::from_sums).collect(),
            grad_norm: grads.global_norm(),
            grads,
            read_s,
        })
    }

    fn update(&self, replicas: &mut Replicas, grads: &BatchGradients, lr: f64, clip: f64) {
        // Every rank the same step on the job's gradient (with sharded experts, its experts'
        // own), so every rank holds the same replicated weights.
        let replica = replicas.replicas.remove(0);
        let replica = crate::cpu::on_worker(&replica.device.clone(), || {
            replica.adam_step(grads.first(), lr, clip)
        });
        replicas.replicas.push(replica);
    }
}
