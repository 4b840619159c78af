//! One model (no replicas): the losses, every layer's routing statistics and the gradient's
//! squared norm are read from the device in one read (on a GPU the only sync of the step,
//! before the clip and Adam, which need the norm).

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{DType, Tensor};

use super::Pass;
use super::{Combine, Combined, StepLosses};
use crate::model::ops::cast_to;
use crate::optim::SumOfSquares;
use crate::store::host_f32;
use crate::train::eval::{LayerStats, layer_sums_of, summaries};
use crate::train::reduce::BatchGradients;
use crate::train::replicas::Replicas;

/// One model, one read.
pub(crate) struct OneModel;

impl Combine for OneModel {
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
}
