//! One model (no replicas): its pass on the whole batch; the losses, every layer's routing
//! statistics and the gradient's squared norm read from the device in one read (on a GPU the
//! only sync of the step, before the clip and Adam, which need the norm); then Adam.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{DType, Tensor};

use super::{Combined, Pass, PassFn, StepLosses, Strategy};
use crate::data::Batch;
use crate::model::ops::cast_to;
use crate::optim::SumOfSquares;
use crate::routing::RoutingRng;
use crate::store::host_f32;
use crate::train::eval::{LayerStats, layer_sums_of, summaries};
use crate::train::reduce::BatchGradients;
use crate::train::replicas::Replicas;

/// One model, one read.
pub(crate) struct OneModel;

impl Strategy for OneModel {
    fn passes(
        &self,
        replicas: &Replicas,
        batch: &Batch,
        rng: &mut RoutingRng,
        pass: &PassFn,
    ) -> Result<Vec<Pass>> {
        let model = replicas.first();
        Ok(vec![crate::cpu::on_worker(&model.device, || {
            pass(model, batch, rng, None, None)
        })])
    }

    fn combine(&self, _: &Replicas, mut passes: Vec<Pass>) -> Result<Combined> {
        let p = passes.remove(0);
        let squares = p.grads.sum_of_squares();
        let summary = summaries(&p.stats);
        let n_summary = summary.as_ref().map_or(0, |t| t.dims()[0]);
        // [ce, lb, z | every layer's summary | the squared norm, unless already on the host].
        let mut parts = vec![p.losses];
        parts.extend(summary);
        if let SumOfSquares::Device(t) = &squares {
            parts.push(t.clone());
        }
        let parts = parts.into_iter().map(|t| cast_to(t, DType::F32)).collect();
        let t_read = Instant::now();
        let read = host_f32(Tensor::cat(parts, 0));
        let read_s = t_read.elapsed().as_secs_f64();
        let losses =
            StepLosses::from_slice(&read[..3].iter().map(|&v| v as f64).collect::<Vec<_>>());
        let sums = layer_sums_of(&[p.stats], &[read[3..3 + n_summary].to_vec()]);
        let grad_norm = match squares {
            SumOfSquares::Host(total) => total.sqrt(),
            SumOfSquares::Device(_) => (read[3 + n_summary] as f64).sqrt(),
        };
        Ok(Combined {
            losses,
            layers: sums.iter().map(LayerStats::from_sums).collect(),
            grads: BatchGradients::OnFirst(p.grads),
            grad_norm,
            read_s,
        })
    }

    fn update(&self, replicas: &mut Replicas, grads: &BatchGradients, lr: f64, clip: f64) {
        // The replica is handed to Adam, not cloned: on the CPU its weights update in place.
        let replica = replicas.replicas.remove(0);
        let replica = crate::cpu::on_worker(&replica.device.clone(), || {
            replica.adam_step(grads.first(), lr, clip)
        });
        replicas.replicas.push(replica);
    }
}
