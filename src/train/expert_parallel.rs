//! Expert parallelism (`train.expert_parallel`, with `--distributed`): rank `r` of `N` holds
//! experts `r*E/N .. (r+1)*E/N` of every Switch layer, their gradients and their Adam moments;
//! everything else (embedding, attention, norms, routers) is data-parallel.
//!
//! ```text
//! start / resume: the whole model (init or checkpoint) on every rank -> each keeps its experts
//! each step:      tokens to their experts' ranks and back (crate::distributed::ExpertExchange)
//!                 replicated gradients all-reduced; expert gradients stay on their rank
//!                 |g|^2 = |g_replicated|^2 + sum over ranks |g_experts,r|^2
//! checkpoint / validation: the experts gathered to rank 0 (one labml state dict, any N)
//! ```
//! A rank's memory for the experts (weights, gradients, Adam moments) is `1/N` of one
//! process's.

use std::collections::{HashMap, HashSet};

use anyhow::{Result, bail};
use burn::module::ParamId;
use burn::tensor::{Tensor, TensorData};

use crate::distributed::Collective;
use crate::model::params;
use crate::model::{ModelConfig, SwitchTransformer};
use crate::optim::{LabmlAdam, ParamGrads};
use crate::store::host_f32;

/// An error unless `config` can run expert-parallel on `ranks` ranks on `device`: experts
/// divisible by ranks, the CPU backend in f32 (the exchange is a CPU kernel; Burn has no
/// all-to-all), no expert dropout (the grouped expert kernel has none).
pub(crate) fn check(
    config: &ModelConfig,
    ranks: Option<usize>,
    device: &burn::tensor::Device,
) -> Result<()> {
    let Some(ranks) = ranks else {
        bail!(
            "train.expert_parallel shards the experts over the ranks of a distributed job: run \
             under mpirun or srun with --distributed, or set train.expert_parallel=false"
        );
    };
    if !config.n_experts.is_multiple_of(ranks) {
        bail!(
            "train.expert_parallel: model.n_experts = {} cannot be split over {ranks} ranks: use a \
             number of ranks that divides {}",
            config.n_experts,
            config.n_experts
        );
    }
    if !crate::device::Paths::of(device).host_kernels
        || config.precision != crate::model::precision::Precision::F32
    {
        bail!(
            "train.expert_parallel runs on the CPU backend in f32 (its token exchange is a CPU \
             kernel): use --device cpu and model.precision=f32"
        );
    }
    if config.expert_dropout > 0.0 {
        bail!(
            "train.expert_parallel runs the experts with the grouped CPU kernel, which has no \
             expert dropout: set model.expert_dropout=0"
        );
    }
    Ok(())
}

/// The ids of the experts' parameters (`w1`, `b1`, `w2`, `b2` of every Switch layer).
pub(crate) fn expert_ids(model: &SwitchTransformer) -> HashSet<ParamId> {
    model
        .layers
        .iter()
        .filter_map(|b| b.switch())
        .flat_map(|s| {
            let e = &s.experts;
            [e.w1.id, e.b1.id, e.w2.id, e.b2.id]
        })
        .collect()
}

/// Each expert parameter's module path (the key of its Adam moments) and id, in module order.
fn expert_paths(model: &SwitchTransformer) -> Vec<(String, ParamId)> {
    let ids = expert_ids(model);
    params::trainable(model)
        .into_iter()
        .filter(|p| ids.contains(&p.id))
        .map(|p| (p.path, p.id))
        .collect()
}

/// Replaces the expert parameters of `model` by `f(id, value)` (`value` flattened, not read
/// unless `f` reads it; the new value's first dimension is its length over the old one's
/// inner size), as fresh leaves with storage of their own (the whole tensor is freed, not
/// kept alive under a view).
fn map_experts(
    model: SwitchTransformer,
    mut f: impl FnMut(ParamId, Tensor<1>) -> Vec<f32>,
) -> SwitchTransformer {
    let ids = expert_ids(&model);
    params::map(
        model,
        |p| ids.contains(&p.id),
        |p, value| {
            let device = value.device();
            let values = f(p.id, value);
            let n = values.len();
            Tensor::from_data(TensorData::new(values, [n]), &device)
        },
    )
}

/// Rank `rank` of `ranks`' part of the whole `model` and its optimizer state: its experts of
/// every Switch layer (a contiguous block), and their moments.
pub(crate) fn keep_own_experts(
    model: SwitchTransformer,
    adam: &mut LabmlAdam,
    rank: usize,
    ranks: usize,
) -> SwitchTransformer {
    let part = |v: Vec<f32>| {
        let per = v.len() / ranks;
        v[rank * per..(rank + 1) * per].to_vec()
    };
    for (path, _) in expert_paths(&model) {
        if let Some((m, v)) = adam.moments(&path) {
            adam.set_moments(&path, part(m), part(v));
        }
    }
    map_experts(model, |_, v| part(host_f32(v)))
}

/// The whole model and optimizer state at rank 0 (every rank's experts gathered, in rank
/// order); `None` on the other ranks. Every rank must call it.
pub(crate) fn gather_to_first(
    world: &dyn Collective,
    model: &SwitchTransformer,
    adam: &LabmlAdam,
    config: &ModelConfig,
) -> Result<Option<(SwitchTransformer, LabmlAdam)>> {
    let root = world.rank() == 0;
    let paths = expert_paths(model);
    let mut gathered: HashMap<ParamId, Vec<f32>> = HashMap::new();
    let ids: HashSet<ParamId> = paths.iter().map(|(_, id)| *id).collect();
    for (p, mine) in params::values(model, |p| ids.contains(&p.id)) {
        if let Some(all) = world.gather("experts to rank 0", 0, &host_f32(mine))? {
            gathered.insert(p.id, all);
        }
    }
    let mut full_adam = LabmlAdam::new(adam.beta1, adam.beta2, adam.eps);
    full_adam.step = adam.step;
    let expert_path: HashSet<&str> = paths.iter().map(|(p, _)| p.as_str()).collect();
    for path in adam.paths() {
        if !expert_path.contains(path.as_str()) {
            // Replicated: rank 0's own moments.
            if root {
                let (m, v) = adam.moments(&path).expect("listed");
                full_adam.set_moments(&path, m, v);
            }
            continue;
        }
        let (m, v) = adam.moments(&path).expect("listed");
        let m = world.gather("expert moments to rank 0", 0, &m)?;
        let v = world.gather("expert moments to rank 0", 0, &v)?;
        if let (Some(m), Some(v)) = (m, v) {
            full_adam.set_moments(&path, m, v);
        }
    }
    if !root {
        return Ok(None);
    }
    let full = map_experts(model.clone(), |id, _| {
        gathered.remove(&id).expect("gathered")
    });
    full_adam.check_matches(&full)?;
    let experts = full
        .layers
        .iter()
        .find_map(|b| b.switch())
        .map(|s| s.experts.n_experts());
    if experts.is_some_and(|e| e != config.n_experts) {
        bail!(
            "the gathered model has {experts:?} experts per layer, not {}",
            config.n_experts
        );
    }
    Ok(Some((full, full_adam)))
}

/// `grads` split into the replicated parameters' and the experts' (`ids`).
pub(crate) fn split_grads(grads: ParamGrads, ids: &HashSet<ParamId>) -> (ParamGrads, ParamGrads) {
    let (mut replicated, mut experts) = (ParamGrads::default(), ParamGrads::default());
    for (id, g) in grads.into_parts() {
        if ids.contains(&id) {
            experts.insert(id, g);
        } else {
            replicated.insert(id, g);
        }
    }
    (replicated, experts)
}
