//! The ranks of a distributed job (`--distributed`), one replica each: the losses and routing
//! statistics summed over the job in one all-reduce, the gradients in another
//! ([`crate::train::reduce::sum_across`]); with expert parallelism the replicated parameters'
//! gradients are summed and each rank keeps its own experts' ([`crate::train::reduce::sum_sharded`]),
//! the global norm taken over all of them.

use anyhow::{Result, bail};

use super::Pass;
use super::threads::read_losses;
use super::{Combine, Combined, StepLosses};
use crate::train::eval::{LayerStats, RoutingSums, layer_sums};
use crate::train::reduce::{BatchGradients, sum_across, sum_sharded};
use crate::train::replicas::Replicas;

/// Replicas as ranks.
pub(crate) struct Ranks;

impl Combine for Ranks {
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
}
