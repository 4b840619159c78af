//! Gradients summed over the replicas, and the weights handed back to them:
//!
//! ```text
//! threads, broadcast:  g = sum_r g_r on replica 0's device (replica order); its Adam step;
//!                      its weights to the others (shared storage on the same device)
//! threads, collective: Burn's all-reduce inside the pass; every replica steps
//! ranks:               g = all-reduce of one flat buffer (GradientWire) over the job
//! expert-sharded:      the replicated parameters as ranks; each rank's experts its own;
//!                      |g|^2 = |g_replicated|^2 + sum over ranks |g_experts,r|^2
//! ```
//! Every sum adds in the same order on every run (module order, then replica order), so a
//! step's result does not depend on timing.

use std::collections::{HashMap, HashSet};

use anyhow::Result;
use burn::module::ParamId;
use burn::tensor::{Device, Tensor, TensorData};

use crate::distributed::Collective;
use crate::model::SwitchTransformer;
use crate::model::params::{self, ParamInfo};
use crate::optim::ParamGrads;
use crate::store::host_f32;

use super::replica::Replica;

/// The gradient of a whole batch, as the reduction leaves it.
pub(crate) enum BatchGradients {
    /// Summed on the first replica's device.
    OnFirst(ParamGrads),
    /// On every replica, all-reduced (the same values everywhere).
    OnEach(Vec<ParamGrads>),
    /// With expert parallelism: the replicated parameters' gradients (all-reduced) and this
    /// rank's experts' own, and the global norm over every rank's.
    Sharded {
        /// Both kinds, keyed by this rank's parameters.
        grads: ParamGrads,
        /// Global L2 norm over the replicated gradients and every rank's expert gradients.
        norm: f64,
    },
}

impl BatchGradients {
    /// The gradient replica 0 (or this rank) steps with.
    pub(crate) fn first(&self) -> &ParamGrads {
        match self {
            Self::OnFirst(g) | Self::Sharded { grads: g, .. } => g,
            Self::OnEach(g) => &g[0],
        }
    }

    /// The global L2 norm over all gradients.
    pub(crate) fn global_norm(&self) -> f64 {
        match self {
            Self::OnFirst(g) => g.global_norm(),
            Self::OnEach(g) => g[0].global_norm(),
            Self::Sharded { norm, .. } => *norm,
        }
    }
}

/// The sum of the replicas' gradients, added in replica order on the first replica's device
/// and keyed by its parameters. A parameter without a gradient on a replica counts as zero.
pub(crate) fn sum_on_first(replicas: &[Replica], grads: Vec<ParamGrads>) -> ParamGrads {
    let ids: Vec<Vec<ParamId>> = replicas
        .iter()
        .map(|r| {
            params::trainable(&r.model)
                .into_iter()
                .map(|p| p.id)
                .collect()
        })
        .collect();
    let device = replicas[0].device.clone().inner();
    // Taken out, so that the first replica's gradient is the sum's only owner: on the CPU the
    // sum then adds into it instead of a new buffer (100 MB less at 64 experts).
    let mut grads: Vec<HashMap<ParamId, Tensor<1>>> = grads
        .into_iter()
        .map(|g| g.into_parts().into_iter().collect())
        .collect();
    let mut out = ParamGrads::default();
    for (i, &id) in ids[0].iter().enumerate() {
        let mut sum: Option<Tensor<1>> = None;
        for (r, g) in grads.iter_mut().enumerate() {
            if let Some(g) = g.remove(&ids[r][i]) {
                let g = g.to_device(&device);
                sum = Some(match sum {
                    None => g,
                    Some(s) => s + g,
                });
            }
        }
        if let Some(sum) = sum {
            out.insert(id, sum);
        }
    }
    out
}

/// The buffer one all-reduce of gradients carries between ranks: every parameter's gradient,
/// flattened, in module order (zeros where a rank has none), then one presence flag per
/// parameter (1 where the rank has its gradient; summed: how many ranks had it).
struct GradientWire {
    params: Vec<ParamInfo>,
    /// Values of all gradients, before the flags.
    values: usize,
}

impl GradientWire {
    /// The layout for `model`'s trainable parameters, but those in `except`.
    fn new(model: &SwitchTransformer, except: Option<&HashSet<ParamId>>) -> Self {
        let params: Vec<ParamInfo> = params::trainable(model)
            .into_iter()
            .filter(|p| !except.is_some_and(|x| x.contains(&p.id)))
            .collect();
        let values = params.iter().map(ParamInfo::len).sum();
        Self { params, values }
    }

    /// `grads` written in this layout.
    fn pack(&self, grads: ParamGrads) -> Vec<f32> {
        let mut grads: HashMap<ParamId, Tensor<1>> = grads.into_parts().into_iter().collect();
        let mut flat = Vec::with_capacity(self.values + self.params.len());
        let mut present = Vec::with_capacity(self.params.len());
        for p in &self.params {
            match grads.remove(&p.id) {
                Some(g) => {
                    flat.extend(host_f32(g));
                    present.push(1.0);
                }
                None => {
                    flat.resize(flat.len() + p.len(), 0.0);
                    present.push(0.0);
                }
            }
        }
        flat.extend(present);
        flat
    }

    /// The gradients of a summed buffer on `device`: those some rank had.
    fn unpack(&self, flat: &[f32], device: &Device) -> ParamGrads {
        let mut out = ParamGrads::default();
        let mut at = 0;
        for (i, p) in self.params.iter().enumerate() {
            let n = p.len();
            if flat[self.values + i] > 0.0 {
                let values = flat[at..at + n].to_vec();
                out.insert(
                    p.id,
                    Tensor::from_data(TensorData::new(values, [n]), device),
                );
            }
            at += n;
        }
        out
    }
}

/// The sum over the ranks of their gradients `grads`, in one all-reduce ([`GradientWire`]). A
/// parameter no rank has a gradient for stays without one, as in one process. The parameters
/// in `except` (each rank's own experts) are left out.
pub(crate) fn sum_across(
    world: &dyn Collective,
    model: &SwitchTransformer,
    grads: ParamGrads,
    device: &Device,
    except: Option<&HashSet<ParamId>>,
) -> Result<ParamGrads> {
    let wire = GradientWire::new(model, except);
    let mut flat = wire.pack(grads);
    world.all_reduce_sum("gradients", &mut flat)?;
    Ok(wire.unpack(&flat, &device.clone().inner()))
}

/// With expert parallelism: the replicated parameters' gradients summed over the ranks, this
/// rank's experts' (`experts`) its own, and the global norm over every rank's.
pub(crate) fn sum_sharded(
    world: &dyn Collective,
    model: &SwitchTransformer,
    grads: ParamGrads,
    device: &Device,
    experts: &HashSet<ParamId>,
) -> Result<BatchGradients> {
    let (replicated, own) = super::expert_parallel::split_grads(grads, experts);
    let mut grads = sum_across(world, model, replicated, device, Some(experts))?;
    let mut squares = [own.global_norm().powi(2)];
    world.all_reduce_sum_f64("expert gradient norms", &mut squares)?;
    let norm = (grads.global_norm().powi(2) + squares[0]).sqrt();
    for (id, g) in own.into_parts() {
        grads.insert(id, g);
    }
    Ok(BatchGradients::Sharded { grads, norm })
}

/// A checksum of the trainable parameters not in `except` (sum of every value times a weight
/// that depends on its place), equal on two ranks exactly when their weights almost surely are.
pub(crate) fn checksum_except(model: &SwitchTransformer, except: Option<&HashSet<ParamId>>) -> f64 {
    let (mut sum, mut i) = (0.0, 0u64);
    for (_, v) in params::values(model, |p| !except.is_some_and(|x| x.contains(&p.id))) {
        for v in host_f32(v) {
            i += 1;
            sum += v as f64 * (1.0 + (i % 7) as f64);
        }
    }
    sum
}

/// Gives every replica the first replica's weights, as fresh autodiff leaves of its own (on
/// the same device the storage is shared, not copied).
pub(crate) fn broadcast_weights(replicas: &mut [Replica]) {
    let (first, rest) = replicas.split_first_mut().expect("at least one replica");
    let values: Vec<Tensor<1>> = params::values(&first.model, |_| true)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    for r in rest {
        let mut next = values.iter();
        r.model = params::map(
            r.model.clone(),
            |_| true,
            |_, old| {
                let value = next.next().expect("replicas have the same parameters");
                value.clone().to_device(&old.device())
            },
        );
    }
}
