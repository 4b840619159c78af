//! Data-parallel replicas of the model (`train.replicas`, `switch train --devices`): identical
//! copies, one per device (several may share a device, e.g. CPU workers), each with a thread
//! pool of its own, or, across processes (`Replicas::across`, `switch train --distributed`),
//! this process's one replica among the ranks of a job, whose exchanges go through a
//! [`Collective`] (MPI). This file holds them and what they are set up with; how a step runs
//! on them (threads on `batch / N` windows each, or ranks) is `super::strategy`'s.
//!
//! Routing, two ways (`train.global_routing`): each replica routes its own tokens (capacity and
//! load balance per replica, as each core in the paper), or the replicas route the whole batch
//! together through a `RouteGroup` (or the ranks' exchanges: capacity, drops and the
//! load-balancing f_i over all tokens): the same step as one model, computed by N replicas.
//!
//! Two ways to combine the gradients ([`GradSync`], summed in `super::reduce`): summed on the
//! first replica's device, which takes the Adam step and hands its weights to the others
//! (shared, not copied, when they are on the same device); or Burn's collective all-reduce,
//! after which every replica takes the same step.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use burn::module::ParamId;
use burn::tensor::Device;
use burn::tensor::distributed::{DistributedConfig, DistributedContext, ReduceOperation};
use rand::{RngCore, SeedableRng};

use crate::distributed::Collective;
use crate::model::ModelConfig;
use crate::routing::{RouteGroup, RoutingRng};

use super::expert_parallel::{expert_ids, keep_own_experts};
use super::placement::GradSync;
use super::reduce::checksum_except;
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
            crate::cpu::replica_pools(n, &devices[0])?
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

    /// The replicas' routing group, if they route the batch together (threads).
    pub(crate) fn group(&self) -> Option<&RouteGroup> {
        self.group.as_deref()
    }

    /// Whether the replicas (threads or ranks) route the whole batch together.
    pub(crate) fn global_routing(&self) -> bool {
        self.global_routing
    }

    /// With Burn's all-reduce as the gradient sync: the devices it reduces over.
    pub(crate) fn collective(&self) -> Option<Vec<Device>> {
        (self.grad_sync == GradSync::Collective)
            .then(|| self.replicas.iter().map(|r| r.device.clone()).collect())
    }

    /// With expert parallelism: the ids of this rank's expert parameters.
    pub(crate) fn expert_ids(&self) -> Option<&HashSet<ParamId>> {
        self.expert_ids.as_ref()
    }

    /// How the replicas combine their gradients.
    pub(crate) fn grad_sync(&self) -> GradSync {
        self.grad_sync
    }

    /// `f` on each item at once, item `i` in a thread of its own inside replica `i`'s pool;
    /// the results in item order.
    pub(crate) fn on_each<T: Send, R: Send>(
        &self,
        items: impl Iterator<Item = T>,
        f: impl Fn(T) -> R + Sync,
    ) -> Vec<R> {
        let f = &f;
        std::thread::scope(|scope| {
            let handles: Vec<_> = items
                .zip(&self.pools)
                .map(|(item, pool)| scope.spawn(move || pool.install(|| f(item))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a replica's thread panicked"))
                .collect()
        })
    }
}

/// The random streams of a step's replicas, drawn from the run's generator: with `grouped`
/// routing, replica `i` continues the run's generator on stream `+i` (replica 0 routes the
/// batch with the run's own stream); without, replica `i` is seeded by the run's `i`-th draw.
/// Thread replicas and ranks draw the same streams.
pub(crate) struct Streams {
    base: RoutingRng,
    seeds: Option<Vec<u64>>,
}

impl Streams {
    /// The streams of `n` replicas; without `grouped`, `rng` advances by `n` draws.
    pub(crate) fn draw(rng: &mut RoutingRng, n: usize, grouped: bool) -> Self {
        let seeds = (!grouped).then(|| (0..n).map(|_| rng.next_u64()).collect());
        Self {
            base: rng.clone(),
            seeds,
        }
    }

    /// Replica `i`'s generator.
    pub(crate) fn replica(&self, i: usize) -> RoutingRng {
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
