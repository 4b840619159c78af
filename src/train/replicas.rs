//! Data-parallel replicas of the model (`train.replicas`, `switch train --devices`): identical
//! copies, one per device (several may share a device, e.g. CPU workers), each in its own
//! thread on `batch / N` consecutive windows of every batch. [`super::step`] takes one
//! optimizer step on them.
//!
//! Routing, two ways (`train.global_routing`): each replica routes its own tokens (capacity and
//! load balance per replica, as each core in the paper), or the replicas route the whole batch
//! together through a [`RouteGroup`] (capacity, drops and the load-balancing f_i over all
//! tokens): the same step as one model, computed by N threads.
//!
//! Two ways to combine the gradients ([`GradSync`]): summed on the first replica's device,
//! which takes the Adam step and hands its weights to the others (shared, not copied, when
//! they are on the same device); or Burn's collective all-reduce, after which every replica
//! takes the same step. With one replica there are no threads.
//!
//! Across processes ([`Replicas::across`], `switch train --distributed`): each process holds
//! one replica, the ranks of the job are the replicas, and the exchanges go through a
//! [`Collective`] (MPI): gradients, losses and statistics summed with an all-reduce, the
//! routing group's probabilities and plan exchanged between the ranks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::distributed::{DistributedConfig, DistributedContext, ReduceOperation};
use burn::tensor::{Device, Tensor};
use rand::{RngCore, SeedableRng};

use crate::data::Batch;
use crate::distributed::Collective;
use crate::interop::weights::{Source, model_from_state_dict, model_state_dict};
use crate::model::{ModelConfig, SwitchTransformer};
use crate::optim::{LabmlAdam, ParamGrads};
use crate::routing::{RouteGroup, RoutingRng, Shard};
use crate::store::host_f32;

use super::expert_parallel::{expert_ids, keep_own_experts, split_grads};

/// How replicas combine their gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradSync {
    /// Sum the gradients on the first replica's device (a move to it, free when shared), take
    /// the Adam step there, hand the weights back: works on every backend (Burn 0.22's
    /// collectives exist only on CUDA), and the replicas share one set of weights on the CPU.
    Broadcast,
    /// Burn's `all_reduce` (NCCL, sum) between CUDA devices; every replica then takes the
    /// same clip and Adam step.
    Collective,
}

impl GradSync {
    /// `broadcast` or `collective`; `collective` needs every device to be CUDA.
    pub fn parse(name: &str, device_specs: &[String]) -> Result<Self> {
        match name {
            "broadcast" => Ok(Self::Broadcast),
            "collective" => {
                if let Some(d) = device_specs.iter().find(|d| !d.starts_with("cuda")) {
                    bail!(
                        "--grad-sync collective needs CUDA devices (Burn 0.22 implements \
                         collectives only with NCCL), but `{d}` is not one: use --grad-sync \
                         broadcast"
                    );
                }
                Ok(Self::Collective)
            }
            _ => bail!("unknown --grad-sync `{name}`: use broadcast or collective"),
        }
    }
}

/// Where the replicas of a run go.
#[derive(Clone)]
pub struct Placement {
    /// One device per replica, or one device for all of them.
    pub devices: Vec<Device>,
    /// How their gradients are combined.
    pub grad_sync: GradSync,
    /// The ranks of the multi-process job this process is one of (`--distributed`): then this
    /// process holds one replica, on `devices[0]`, and the ranks are the run's replicas.
    pub world: Option<Arc<dyn Collective>>,
}

impl From<&Device> for Placement {
    fn from(device: &Device) -> Self {
        Self {
            devices: vec![device.clone()],
            grad_sync: GradSync::Broadcast,
            world: None,
        }
    }
}

impl Placement {
    /// From `--devices a,b,...` (empty: every replica on `default`) and `--grad-sync`.
    pub fn parse(specs: &[String], default: &Device, grad_sync: &str) -> Result<Self> {
        let devices = if specs.is_empty() {
            vec![default.clone()]
        } else {
            specs
                .iter()
                .map(|s| crate::device::parse_device(s))
                .collect::<Result<_>>()?
        };
        Ok(Self {
            devices,
            grad_sync: GradSync::parse(grad_sync, specs)?,
            world: None,
        })
    }

    /// Whether this process writes the run: the only process, or rank 0 of a job.
    pub fn writes(&self) -> bool {
        self.world.as_ref().is_none_or(|w| w.rank() == 0)
    }

    /// The device of each of `replicas` replicas (in this process).
    pub fn devices_for(&self, replicas: usize) -> Result<Vec<Device>> {
        if let Some(world) = &self.world {
            if replicas != world.size() {
                bail!(
                    "train.replicas = {replicas} but the job has {} ranks: a distributed run has \
                     one replica per rank",
                    world.size()
                );
            }
            return Ok(vec![self.devices[0].clone()]);
        }
        match self.devices.len() {
            1 => Ok(vec![self.devices[0].clone(); replicas]),
            n if n == replicas => Ok(self.devices.clone()),
            n => bail!(
                "{n} devices were given for a run with train.replicas = {replicas}: give one \
                 device per replica (or one for all of them)"
            ),
        }
    }
}

/// One copy of the model with its optimizer state, on its device.
pub struct Replica {
    /// This copy of the model.
    pub model: SwitchTransformer,
    /// Its optimizer state.
    pub adam: LabmlAdam,
    /// An autodiff device.
    pub device: Device,
}

impl Replica {
    /// One Adam step on this replica's weights with `grad_scale * g`. The model is handed to
    /// the step, not a clone of it, so that on the CPU weights no other tensor shares are
    /// updated in their own storage (`cpu::adam`; a clone kept here made every step copy every
    /// parameter).
    fn adam_step(self, g: &ParamGrads, lr: f64, grad_scale: f64) -> Self {
        let Replica {
            model,
            mut adam,
            device,
        } = self;
        let model = adam.step_scaled(model, g, lr, grad_scale);
        Replica {
            model,
            adam,
            device,
        }
    }

    /// A copy of `self` on `device`, with tensors of its own: the weights, and the optimizer
    /// moments if `with_moments` (only replicas that take their own Adam steps need them).
    fn copy_to(&self, config: &ModelConfig, device: &Device, with_moments: bool) -> Result<Self> {
        let device = device.clone().autodiff();
        let weights = model_state_dict(&self.model, Source::Values);
        let model = model_from_state_dict(config, &weights, &device)?;
        let mut adam = LabmlAdam::new(self.adam.beta1, self.adam.beta2, self.adam.eps);
        if with_moments {
            adam.load_state_tensors(
                self.adam.step,
                &self.adam.state_tensors().into_iter().collect(),
            )?;
        }
        Ok(Self {
            model,
            adam,
            device,
        })
    }
}

/// The model's replicas; replica 0 is the one validated and checkpointed.
pub struct Replicas {
    /// The copies of the model, replica 0 first.
    pub replicas: Vec<Replica>,
    grad_sync: GradSync,
    /// One thread pool per replica, splitting the global pool's threads between them, so that
    /// the backend's parallel kernels of concurrent replicas do not oversubscribe the cores.
    pools: Vec<rayon::ThreadPool>,
    /// The replicas' routing group, if they route the batch together.
    group: Option<Arc<RouteGroup>>,
    global_routing: bool,
    /// The ranks of the multi-process job this process's one replica belongs to.
    world: Option<Arc<dyn Collective>>,
    /// With expert parallelism: the ids of the expert parameters, of which this rank holds
    /// its share (their gradients are its own, never summed across ranks).
    expert_ids: Option<HashSet<ParamId>>,
    _context: Option<DistributedContext>,
}

/// The gradient of a whole batch, as [`Replicas::sum_gradients`] leaves it.
pub enum BatchGradients {
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
    /// The global L2 norm over all gradients.
    pub fn global_norm(&self) -> f64 {
        match self {
            Self::OnFirst(g) => g.global_norm(),
            Self::OnEach(g) => g[0].global_norm(),
            Self::Sharded { norm, .. } => *norm,
        }
    }
}

impl Replicas {
    /// `first` and copies of it, one replica per entry of `devices`; with `global_routing`
    /// they route every batch together (as one model).
    pub fn new(
        first: Replica,
        config: &ModelConfig,
        devices: &[Device],
        grad_sync: GradSync,
        global_routing: bool,
    ) -> Result<Self> {
        let mut replicas = vec![];
        for (i, d) in devices.iter().enumerate().skip(1) {
            replicas.push(
                first
                    .copy_to(config, d, grad_sync == GradSync::Collective)
                    .with_context(|| format!("cannot place replica {i} on its device"))?,
            );
        }
        replicas.insert(0, first);
        let context = (grad_sync == GradSync::Collective).then(|| {
            let config = DistributedConfig {
                all_reduce_op: ReduceOperation::Mean,
            };
            DistributedContext::init(devices.to_vec(), config)
        });
        let n = replicas.len();
        let pools = if n > 1 {
            let threads = (rayon::current_num_threads() / n).max(1);
            (0..n)
                .map(|_| rayon::ThreadPoolBuilder::new().num_threads(threads).build())
                .collect::<Result<_, _>>()
                .context("cannot start the replicas' thread pools")?
        } else {
            vec![]
        };
        Ok(Self {
            group: (global_routing && n > 1).then(|| RouteGroup::new(n)),
            global_routing,
            replicas,
            grad_sync,
            pools,
            world: None,
            expert_ids: None,
            _context: context,
        })
    }

    /// This process's one replica as one rank of `world`'s: every step runs on this rank's
    /// share of the batch and exchanges with the other ranks. With `expert_parallel` the
    /// replica keeps only its rank's share of the experts (see [`super::expert_parallel`]).
    pub fn across(mut self, world: Arc<dyn Collective>, expert_parallel: bool) -> Result<Self> {
        if self.replicas.len() != 1 {
            bail!(
                "a process of a distributed job holds one replica, not {}: the ranks are the \
                 replicas (leave out --devices)",
                self.replicas.len()
            );
        }
        if expert_parallel {
            let r = &mut self.replicas[0];
            r.model = keep_own_experts(r.model.clone(), &mut r.adam, world.rank(), world.size());
            self.expert_ids = Some(expert_ids(&r.model));
        }
        self.world = Some(world);
        Ok(self)
    }

    /// Whether this rank holds only its share of the experts.
    pub fn expert_parallel(&self) -> bool {
        self.expert_ids.is_some()
    }

    /// A checksum of the parameters every rank holds the same (all of them, or all but the
    /// experts with expert parallelism).
    pub fn replicated_checksum(&self) -> f64 {
        checksum_except(&self.replicas[0].model, self.expert_ids.as_ref())
    }

    /// The job's ranks, if this process is one of several.
    pub fn world(&self) -> Option<&dyn Collective> {
        self.world.as_deref()
    }

    /// A handle on the job's ranks, if this process is one of several.
    pub fn world_handle(&self) -> Option<Arc<dyn Collective>> {
        self.world.clone()
    }

    /// Replicas over all processes: this process's, or the job's ranks.
    pub fn total(&self) -> usize {
        self.world
            .as_ref()
            .map_or(self.replicas.len(), |w| w.size())
    }

    /// Replica 0.
    pub fn first(&self) -> &Replica {
        &self.replicas[0]
    }

    /// Whether the replicas combine their gradients with Burn's all-reduce.
    fn collective(&self) -> Option<Vec<Device>> {
        (self.grad_sync == GradSync::Collective)
            .then(|| self.replicas.iter().map(|r| r.device.clone()).collect())
    }

    /// `pass(replica, shard, rng, seat)` for every replica on its shard of `batch` (`batch / N`
    /// consecutive windows), each in a thread of its own; the results in replica order. `seat`
    /// is the replica's place in the routing group when the replicas route together.
    ///
    /// With one replica `pass` draws from `rng` directly; with more, each replica gets a
    /// generator derived from `rng` (so a checkpointed `rng` replays the step exactly). In a
    /// routing group replica 0 routes the batch with `rng` itself, as one model would; the
    /// others draw their own dropout and jitter from other streams. With the collective
    /// gradient sync, `pass` receives the devices to all-reduce over.
    pub fn on_shards<R: Send>(
        &self,
        batch: &Batch,
        rng: &mut RoutingRng,
        pass: impl Fn(&Replica, &Batch, &mut RoutingRng, Option<Shard<'_>>, Option<&[Device]>) -> R
        + Sync,
    ) -> Vec<R> {
        if let Some(world) = &self.world {
            return vec![self.on_rank(world, batch, rng, pass)];
        }
        let n = self.replicas.len();
        if n == 1 {
            let r = &self.replicas[0];
            return vec![crate::cpu::on_worker(|| pass(r, batch, rng, None, None))];
        }
        let shards = batch.split(n);
        let rngs: Vec<RoutingRng> = match &self.group {
            None => (0..n)
                .map(|_| RoutingRng::seed_from_u64(rng.next_u64()))
                .collect(),
            Some(_) => (0..n)
                .map(|i| {
                    let mut g = rng.clone();
                    g.set_stream(g.get_stream().wrapping_add(i as u64));
                    g
                })
                .collect(),
        };
        let collective = self.collective();
        let group = self.group.as_deref();
        let work = (self.replicas.iter().zip(shards.iter()).zip(rngs)).enumerate();
        let done = on_each(&self.pools, work, |(i, ((r, shard), mut rng))| {
            let devices = collective.as_deref();
            let out = match group {
                Some(g) => g.run_as(i, |seat| pass(r, shard, &mut rng, Some(seat), devices)),
                None => pass(r, shard, &mut rng, None, devices),
            };
            (out, rng)
        });
        let (outs, mut rngs): (Vec<R>, Vec<RoutingRng>) = done.into_iter().unzip();
        if self.group.is_some() {
            *rng = rngs.swap_remove(0);
        }
        outs
    }

    /// [`on_shards`](Self::on_shards) for this process's rank: its shard of `batch`, its
    /// generator drawn as replica `rank` of the threads would draw it; with global routing,
    /// rank 0's generator continues the run on every rank afterwards.
    fn on_rank<R: Send>(
        &self,
        world: &Arc<dyn Collective>,
        batch: &Batch,
        rng: &mut RoutingRng,
        pass: impl Fn(&Replica, &Batch, &mut RoutingRng, Option<Shard<'_>>, Option<&[Device]>) -> R
        + Sync,
    ) -> R {
        let (n, rank) = (world.size(), world.rank());
        let shard = &batch.split(n)[rank];
        let r = &self.replicas[0];
        // A rank waits for the others in the pass: on a pool worker only when the others are
        // other processes (thread ranks would take every worker and wait for each other).
        let on_worker = |f: &mut (dyn FnMut() -> R + Send)| {
            if world.in_process() {
                f()
            } else {
                crate::cpu::on_worker(f)
            }
        };
        if !self.global_routing {
            let seeds: Vec<u64> = (0..n).map(|_| rng.next_u64()).collect();
            let mut mine = RoutingRng::seed_from_u64(seeds[rank]);
            // Each rank routes its own tokens; with sharded experts they still travel.
            let seat = self.expert_parallel().then(|| Shard::rank_alone(world));
            return on_worker(&mut || pass(r, shard, &mut mine, seat, None));
        }
        let mut mine = rng.clone();
        mine.set_stream(mine.get_stream().wrapping_add(rank as u64));
        let out = on_worker(&mut || pass(r, shard, &mut mine, Some(Shard::rank(world)), None));
        let mut state = serde_json::to_vec(&mine).expect("a generator serialises");
        world
            .broadcast("the routing generator", 0, &mut state)
            .expect("the generator exchange failed");
        *rng = serde_json::from_slice(&state).expect("rank 0 sent a generator");
        out
    }

    /// The gradient of the whole batch from each replica's gradient of its shard: with one
    /// replica its own; else the sum on the first replica's device (replica order), or, after
    /// the collective all-reduce, every replica's.
    pub fn sum_gradients(&self, mut grads: Vec<ParamGrads>) -> Result<BatchGradients> {
        if let Some(world) = self.world.as_deref() {
            let (model, device) = (&self.replicas[0].model, &self.replicas[0].device);
            let Some(ids) = &self.expert_ids else {
                let grads = sum_across(world, model, grads.remove(0), device, None)?;
                return Ok(BatchGradients::OnFirst(grads));
            };
            let (replicated, experts) = split_grads(grads.remove(0), ids);
            let mut grads = sum_across(world, model, replicated, device, Some(ids))?;
            let mut squares = [experts.global_norm().powi(2)];
            world.all_reduce_sum_f64("expert gradient norms", &mut squares)?;
            let norm = (grads.global_norm().powi(2) + squares[0]).sqrt();
            for (id, g) in experts.into_parts() {
                grads.insert(id, g);
            }
            return Ok(BatchGradients::Sharded { grads, norm });
        }
        Ok(if grads.len() == 1 {
            BatchGradients::OnFirst(grads.remove(0))
        } else if self.grad_sync == GradSync::Broadcast {
            BatchGradients::OnFirst(sum_on_first(&self.replicas, grads))
        } else {
            BatchGradients::OnEach(grads)
        })
    }

    /// Adam on `grad_scale * grads` (`grad_scale`: the clip factor), after which every replica
    /// holds the same new weights: the first replica takes the step and hands its weights to
    /// the others, or each takes it on its own all-reduced gradients.
    pub fn adam_step(&mut self, grads: &BatchGradients, lr: f64, grad_scale: f64) {
        match grads {
            BatchGradients::OnFirst(g) | BatchGradients::Sharded { grads: g, .. } => {
                let n = self.replicas.len();
                let first = self.replicas.remove(0).adam_step(g, lr, grad_scale);
                self.replicas.insert(0, first);
                if n > 1 {
                    broadcast_weights(&mut self.replicas);
                }
            }
            BatchGradients::OnEach(g) => {
                let work = std::mem::take(&mut self.replicas).into_iter().zip(g.iter());
                self.replicas = on_each(&self.pools, work, |(r, g)| r.adam_step(g, lr, grad_scale));
            }
        }
    }

    /// `f(self)` on a worker of the global thread pool when there is one replica (see the
    /// free function `on_worker`), else on the calling thread.
    pub fn on_worker<R: Send>(&mut self, f: impl FnOnce(&mut Self) -> R + Send) -> R {
        if self.replicas.len() == 1 {
            crate::cpu::on_worker(|| f(self))
        } else {
            f(self)
        }
    }
}

/// `f` on each item at once, item `i` in a thread of its own inside `pools[i]`; the results
/// in item order.
fn on_each<T: Send, R: Send>(
    pools: &[rayon::ThreadPool],
    items: impl Iterator<Item = T>,
    f: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .zip(pools)
            .map(|(item, pool)| scope.spawn(move || pool.install(|| f(item))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a replica's thread panicked"))
            .collect()
    })
}

/// Each trainable parameter's id, in module order (the same order on every replica).
fn param_ids(model: &SwitchTransformer) -> Vec<ParamId> {
    struct Ids(Vec<ParamId>);
    impl ModuleVisitor for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.is_require_grad() {
                self.0.push(param.id);
            }
        }
    }
    let mut ids = Ids(vec![]);
    model.visit(&mut ids);
    ids.0
}

/// The sum of the replicas' gradients, added in replica order on the first replica's device
/// and keyed by its parameters. A parameter without a gradient on a replica counts as zero.
fn sum_on_first(replicas: &[Replica], grads: Vec<ParamGrads>) -> ParamGrads {
    let ids: Vec<_> = replicas.iter().map(|r| param_ids(&r.model)).collect();
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

/// Each trainable parameter's id and number of values, in module order, but for those in
/// `except`.
fn param_sizes(
    model: &SwitchTransformer,
    except: Option<&HashSet<ParamId>>,
) -> Vec<(ParamId, usize)> {
    struct Sizes<'a>(Vec<(ParamId, usize)>, Option<&'a HashSet<ParamId>>);
    impl ModuleVisitor for Sizes<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.is_require_grad() && !self.1.is_some_and(|x| x.contains(&param.id)) {
                self.0.push((param.id, param.shape().num_elements()));
            }
        }
    }
    let mut sizes = Sizes(vec![], except);
    model.visit(&mut sizes);
    sizes.0
}

/// The sum over the ranks of their gradients `grads` (one all-reduce of every gradient,
/// flattened in module order, followed by one flag per parameter: whether a rank has its
/// gradient). A parameter no rank has a gradient for stays without one, as in one process.
/// The parameters in `except` (each rank's own experts) are left out.
fn sum_across(
    world: &dyn Collective,
    model: &SwitchTransformer,
    grads: ParamGrads,
    device: &Device,
    except: Option<&HashSet<ParamId>>,
) -> Result<ParamGrads> {
    let params = param_sizes(model, except);
    let total: usize = params.iter().map(|(_, n)| n).sum();
    let mut grads: HashMap<ParamId, Tensor<1>> = grads.into_parts().into_iter().collect();
    let mut flat = Vec::with_capacity(total + params.len());
    let mut present = Vec::with_capacity(params.len());
    for (id, n) in &params {
        match grads.remove(id) {
            Some(g) => {
                flat.extend(host_f32(g));
                present.push(1.0);
            }
            None => {
                flat.resize(flat.len() + n, 0.0);
                present.push(0.0);
            }
        }
    }
    flat.extend(present);
    world.all_reduce_sum("gradients", &mut flat)?;
    let device = device.clone().inner();
    let mut out = ParamGrads::default();
    let mut at = 0;
    for (i, (id, n)) in params.into_iter().enumerate() {
        if flat[total + i] > 0.0 {
            let values = flat[at..at + n].to_vec();
            out.insert(
                id,
                Tensor::from_data(burn::tensor::TensorData::new(values, [n]), &device),
            );
        }
        at += n;
    }
    Ok(out)
}

/// A checksum of the trainable parameters (sum of every value times a weight that depends on
/// its place), equal on two ranks exactly when their weights almost surely are.
pub fn checksum(model: &SwitchTransformer) -> f64 {
    checksum_except(model, None)
}

/// [`checksum`] of the parameters not in `except`.
fn checksum_except(model: &SwitchTransformer, except: Option<&HashSet<ParamId>>) -> f64 {
    struct Sum<'a>(f64, u64, Option<&'a HashSet<ParamId>>);
    impl ModuleVisitor for Sum<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.is_require_grad() && !self.2.is_some_and(|x| x.contains(&param.id)) {
                let n = param.shape().num_elements();
                for v in host_f32(param.val().inner().reshape([n])) {
                    self.1 += 1;
                    self.0 += v as f64 * (1.0 + (self.1 % 7) as f64);
                }
            }
        }
    }
    let mut sum = Sum(0.0, 0, except);
    model.visit(&mut sum);
    sum.0
}

/// Gives every replica the first replica's weights, as fresh autodiff leaves of its own (on
/// the same device the storage is shared, not copied).
fn broadcast_weights(replicas: &mut [Replica]) {
    struct Values(Vec<Tensor<1>>);
    impl ModuleVisitor for Values {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.is_require_grad() {
                let v = param.val().inner();
                let n = v.shape().num_elements();
                self.0.push(v.reshape([n]));
            }
        }
    }
    struct Assign(std::vec::IntoIter<Tensor<1>>);
    impl ModuleMapper for Assign {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if !param.is_require_grad() {
                return param;
            }
            let (id, tensor, mapper) = param.consume();
            let device = tensor.device();
            let value = self.0.next().expect("replicas have the same parameters");
            let value = value
                .reshape(tensor.shape())
                .to_device(&device.clone().inner());
            let value = if device.is_autodiff() {
                value.autodiff()
            } else {
                value
            };
            Param::from_mapped_value(id, value.require_grad(), mapper)
        }
    }
    let (first, rest) = replicas.split_first_mut().expect("at least one replica");
    let mut values = Values(vec![]);
    first.model.visit(&mut values);
    for r in rest {
        let mut assign = Assign(values.0.clone().into_iter());
        r.model = r.model.clone().map(&mut assign);
    }
}
