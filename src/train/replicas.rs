//! Data-parallel replicas of the model (`train.replicas`, `switch train --devices`): identical
//! copies, one per device (several may share a device, e.g. CPU workers), each in its own
//! thread on `batch / N` consecutive windows of every batch. [`super::step`] takes one
//! optimizer step on them.
//!
//! Routing, two ways (`train.global_routing`): each replica routes its own tokens (capacity and
//! load balance per replica, as each core in the paper), or the replicas route the whole batch
//! together through a `RouteGroup` (capacity, drops and the load-balancing f_i over all
//! tokens): the same step as one model, computed by N threads.
//!
//! Two ways to combine the gradients ([`GradSync`], summed in [`super::reduce`]): summed on the first replica's device,
//! which takes the Adam step and hands its weights to the others (shared, not copied, when
//! they are on the same device); or Burn's collective all-reduce, after which every replica
//! takes the same step. With one replica there are no threads.
//!
//! Across processes (`Replicas::across`, `switch train --distributed`): each process holds
//! one replica, the ranks of the job are the replicas, and the exchanges go through a
//! [`Collective`] (MPI): gradients, losses and statistics summed with an all-reduce, the
//! routing group's probabilities and plan exchanged between the ranks.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use burn::module::ParamId;
use burn::tensor::Device;
use burn::tensor::distributed::{DistributedConfig, DistributedContext, ReduceOperation};
use rand::{RngCore, SeedableRng};

use crate::data::Batch;
use crate::distributed::{Collective, Fault};
use crate::model::ModelConfig;
use crate::routing::{RouteGroup, RoutingRng, Shard};

use super::expert_parallel::{expert_ids, keep_own_experts};
use super::placement::GradSync;
use super::reduce::{BatchGradients, broadcast_weights, checksum_except};
pub use super::replica::Replica;

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
    pub(crate) fn across(
        mut self,
        world: Arc<dyn Collective>,
        expert_parallel: bool,
    ) -> Result<Self> {
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
    pub(crate) fn expert_parallel(&self) -> bool {
        self.expert_ids.is_some()
    }

    /// A checksum of the parameters every rank holds the same (all of them, or all but the
    /// experts with expert parallelism).
    pub(crate) fn replicated_checksum(&self) -> f64 {
        checksum_except(&self.replicas[0].model, self.expert_ids.as_ref())
    }

    /// The job's ranks, if this process is one of several.
    pub(crate) fn world(&self) -> Option<&dyn Collective> {
        self.world.as_deref()
    }

    /// A handle on the job's ranks, if this process is one of several.
    pub(crate) fn world_handle(&self) -> Option<Arc<dyn Collective>> {
        self.world.clone()
    }

    /// Replicas over all processes: this process's, or the job's ranks.
    pub(crate) fn total(&self) -> usize {
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
    /// is the replica's place in the routing group when the replicas route together. With the
    /// collective gradient sync, `pass` receives the devices to all-reduce over. Fails only
    /// when an exchange between ranks fails.
    ///
    /// With one replica `pass` draws from `rng` directly; with more, replica `i` draws from
    /// [`replica_rng`]`(rng, i)` (so a checkpointed `rng` replays the step exactly), the same
    /// stream whether the replicas are threads or ranks.
    pub(crate) fn on_shards<R: Send>(
        &self,
        batch: &Batch,
        rng: &mut RoutingRng,
        pass: impl Fn(&Replica, &Batch, &mut RoutingRng, Option<Shard<'_>>, Option<&[Device]>) -> R
        + Sync,
    ) -> Result<Vec<R>> {
        if let Some(world) = &self.world {
            return Ok(vec![self.on_rank(world, batch, rng, pass)?]);
        }
        let n = self.replicas.len();
        if n == 1 {
            let r = &self.replicas[0];
            return Ok(vec![crate::cpu::on_worker(|| {
                pass(r, batch, rng, None, None)
            })]);
        }
        let shards = batch.split(n);
        let streams = Streams::draw(rng, n, self.group.is_some());
        let rngs: Vec<RoutingRng> = (0..n).map(|i| streams.replica(i)).collect();
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
            // Replica 0 routed the batch with the run's generator, as one model would.
            *rng = rngs.swap_remove(0);
        }
        Ok(outs)
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
    ) -> Result<R> {
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
        let mut mine = Streams::draw(rng, n, self.global_routing).replica(rank);
        // An exchange that fails inside the pass is recorded here and returned after it.
        let fault = Arc::new(Fault::default());
        let failed = |fault: &Fault| fault.take().map_or(Ok(()), Err);
        if !self.global_routing {
            // Each rank routes its own tokens; with sharded experts they still travel.
            let seat = self
                .expert_parallel()
                .then(|| Shard::rank_alone(world, &fault));
            let out = on_worker(&mut || pass(r, shard, &mut mine, seat, None));
            failed(&fault)?;
            return Ok(out);
        }
        let seat = Some(Shard::rank(world, &fault));
        let out = on_worker(&mut || pass(r, shard, &mut mine, seat, None));
        failed(&fault)?;
        let mut state = serde_json::to_vec(&mine).context("cannot serialise the generator")?;
        world.broadcast("the routing generator", 0, &mut state)?;
        *rng = serde_json::from_slice(&state).context("rank 0 sent no routing generator")?;
        Ok(out)
    }

    /// With expert parallelism: the ids of this rank's expert parameters.
    pub(crate) fn expert_ids(&self) -> Option<&HashSet<ParamId>> {
        self.expert_ids.as_ref()
    }

    /// How the replicas combine their gradients.
    pub(crate) fn grad_sync(&self) -> GradSync {
        self.grad_sync
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
    pub(crate) fn on_worker<R: Send>(&mut self, f: impl FnOnce(&mut Self) -> R + Send) -> R {
        if self.replicas.len() == 1 {
            crate::cpu::on_worker(|| f(self))
        } else {
            f(self)
        }
    }
}

/// The random streams of a step's replicas, drawn from the run's generator: with `grouped`
/// routing, replica `i` continues the run's generator on stream `+i` (replica 0 routes the
/// batch with the run's own stream); without, replica `i` is seeded by the run's `i`-th draw.
/// Thread replicas and ranks draw the same streams.
struct Streams {
    base: RoutingRng,
    seeds: Option<Vec<u64>>,
}

impl Streams {
    /// The streams of `n` replicas; without `grouped`, `rng` advances by `n` draws.
    fn draw(rng: &mut RoutingRng, n: usize, grouped: bool) -> Self {
        let seeds = (!grouped).then(|| (0..n).map(|_| rng.next_u64()).collect());
        Self {
            base: rng.clone(),
            seeds,
        }
    }

    /// Replica `i`'s generator.
    fn replica(&self, i: usize) -> RoutingRng {
        match &self.seeds {
            Some(seeds) => RoutingRng::seed_from_u64(seeds[i]),
            None => {
                let mut g = self.base.clone();
                g.set_stream(g.get_stream().wrapping_add(i as u64));
                g
            }
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
