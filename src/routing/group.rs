//! Routing groups: the shards of one batch, each running the model in a thread of its own, that
//! route their tokens together, as one model routing the whole batch would
//! (`train.global_routing`).
//!
//! ```text
//! shard r:  p_r = router probabilities of its tokens          (tokens r*T/n .. (r+1)*T/n)
//! shard 0:  plan = RoutePlan::new([p_0; p_1; ...])           capacity, argmax and drops over
//!                                                             all T tokens, one generator
//! shard r:  runs the experts on its part of the plan; f_i of the load-balancing loss from
//!           the plan's counts over all T tokens
//! ```
//! One rendezvous per Switch layer per forward pass. A shard's forward pass takes its seat
//! ([`Shard`], from [`RouteGroup::run_as`], or [`Shard::rank`] for the ranks of a
//! multi-process job, which exchange the probabilities and the plan through a
//! [`Collective`]) as an argument; a forward pass without one (evaluation, generation) routes
//! on its own.

use std::sync::{Arc, Condvar, Mutex};

use super::RoutePlan;
use crate::distributed::{Collective, ExpertExchange, Fault};

/// The rendezvous of `n` shards.
pub(crate) struct RouteGroup {
    n: usize,
    state: Mutex<Round>,
    turn: Condvar,
}

#[derive(Default)]
struct Round {
    /// Each shard's probabilities for the current layer, until shard 0 takes them.
    probs: Vec<Option<Vec<f32>>>,
    arrived: usize,
    /// Counts decided rounds; a waiting shard leaves when it moves on.
    round: u64,
    plan: Option<Arc<RoutePlan>>,
    /// A shard failed: the others stop waiting.
    abandoned: bool,
}

/// A shard's part of the group's plan.
pub(crate) struct GroupRoute {
    /// The plan of this shard's tokens (local token indices, local slots).
    pub plan: RoutePlan,
    /// Tokens whose first choice is each expert, over the whole group (the f_i numerator).
    pub group_counts: Vec<usize>,
    /// Tokens of the whole group.
    pub group_tokens: usize,
    /// Assignments each shard keeps for each expert (`[shards][n_experts]`): what expert
    /// parallelism's exchange sends where.
    pub kept: Vec<Vec<usize>>,
}

impl RouteGroup {
    /// A group of `n` shards.
    pub(crate) fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            n,
            state: Mutex::new(Round {
                probs: vec![None; n],
                ..Round::default()
            }),
            turn: Condvar::new(),
        })
    }

    /// Shard `shard`'s routing for one layer: waits for every shard's `probs`
    /// (`[tokens, n_experts]`, equal token counts); shard 0 makes the decision with `decide`
    /// on all of them in shard order (the others never call it).
    pub(crate) fn route(
        &self,
        shard: usize,
        probs: Vec<f32>,
        decide: impl FnOnce(&[f32]) -> RoutePlan,
    ) -> GroupRoute {
        let mut s = self.state.lock().expect("routing group lock");
        let round = s.round;
        s.probs[shard] = Some(probs);
        s.arrived += 1;
        if shard == 0 {
            s = self.wait(s, |s| s.arrived == self.n);
            let all: Vec<f32> = s.probs.iter_mut().flat_map(|p| p.take().unwrap()).collect();
            s.plan = Some(Arc::new(decide(&all)));
            s.arrived = 0;
            s.round += 1;
            self.turn.notify_all();
        } else {
            self.turn.notify_all();
            s = self.wait(s, |s| s.round != round);
        }
        let plan = Arc::clone(s.plan.as_ref().expect("decided"));
        drop(s);
        part(&plan, shard, self.n)
    }

    fn wait<'a>(
        &self,
        mut s: std::sync::MutexGuard<'a, Round>,
        ready: impl Fn(&Round) -> bool,
    ) -> std::sync::MutexGuard<'a, Round> {
        while !ready(&s) {
            assert!(!s.abandoned, "another shard of the routing group failed");
            s = self.turn.wait(s).expect("routing group lock");
        }
        s
    }

    fn abandon(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.abandoned = true;
        }
        self.turn.notify_all();
    }
}

/// Shard `shard` of `n`'s part of the whole batch's `plan`.
fn part(plan: &RoutePlan, shard: usize, n: usize) -> GroupRoute {
    let k = plan.top_k;
    let per_shard = plan.n_tokens() / n;
    let range = |s: usize| s * per_shard * k..(s + 1) * per_shard * k;
    let kept = (0..n)
        .map(|s| {
            let mut kept = vec![0; plan.n_experts];
            for a in range(s).filter(|&a| !plan.dropped[a]) {
                kept[plan.routes[a]] += 1;
            }
            kept
        })
        .collect();
    GroupRoute {
        plan: RoutePlan::from_decisions(
            plan.routes[range(shard)].to_vec(),
            plan.dropped[range(shard)].to_vec(),
            plan.n_experts,
            k,
            plan.capacity,
        ),
        group_counts: plan.counts.clone(),
        group_tokens: plan.n_tokens(),
        kept,
    }
}

/// One shard's seat in a routing group, handed to its forward pass.
#[derive(Clone, Copy)]
pub(crate) struct Shard<'a> {
    group: Seat<'a>,
    index: usize,
}

#[derive(Clone, Copy)]
enum Seat<'a> {
    /// Threads of this process.
    Threads(&'a RouteGroup),
    /// The ranks of a multi-process job; `together`: they route the whole batch together,
    /// else each its own tokens (and they share only what each keeps for each expert, which
    /// expert parallelism needs).
    /// A failed exchange is recorded in `fault` (see [`Fault`]).
    Ranks {
        world: &'a Arc<dyn Collective>,
        together: bool,
        fault: &'a Arc<Fault>,
    },
}

impl<'a> Shard<'a> {
    /// This process's seat among the ranks of `world`: every rank's forward pass routes its
    /// tokens with the others', rank 0 deciding. A failed exchange is recorded in `fault`, for
    /// the caller to take after the pass.
    pub(crate) fn rank(world: &'a Arc<dyn Collective>, fault: &'a Arc<Fault>) -> Self {
        Self {
            group: Seat::Ranks {
                world,
                together: true,
                fault,
            },
            index: world.rank(),
        }
    }

    /// This process's seat among the ranks of `world` when each rank routes its own tokens
    /// (capacity and load balance per rank, as each core in the paper): the ranks exchange
    /// only the assignments each keeps for each expert.
    pub(crate) fn rank_alone(world: &'a Arc<dyn Collective>, fault: &'a Arc<Fault>) -> Self {
        Self {
            group: Seat::Ranks {
                world,
                together: false,
                fault,
            },
            index: world.rank(),
        }
    }

    /// This shard's index in its group.
    #[cfg(test)]
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// Expert parallelism's exchange of this seat's layer, for the assignments each rank keeps
    /// for each expert (`kept`, from [`route`](Self::route)); `None` when the shards are
    /// threads of this process, which hold every expert.
    pub(crate) fn expert_exchange(&self, kept: &[Vec<usize>]) -> Option<ExpertExchange> {
        match self.group {
            Seat::Ranks { world, fault, .. } => Some(ExpertExchange::new(
                Arc::clone(world),
                kept,
                Arc::clone(fault),
            )),
            Seat::Threads(_) => None,
        }
    }

    /// This shard's routing for one layer: the group's decision over every shard's `probs`
    /// (`[tokens, n_experts]`, equal token counts), made by shard 0 with `decide`.
    ///
    /// Among ranks, an exchange that fails (a rank failed or timed out), or failed earlier in
    /// this pass, is recorded in the seat's [`Fault`]; the pass goes on with this rank's own
    /// decision and no exchange, and the step returns the error after it.
    pub(crate) fn route(
        &self,
        probs: Vec<f32>,
        mut decide: impl FnMut(&[f32]) -> RoutePlan,
    ) -> GroupRoute {
        match self.group {
            Seat::Threads(g) => g.route(self.index, probs, decide),
            Seat::Ranks {
                world,
                together,
                fault,
            } => {
                let world = world.as_ref();
                if !fault.is_set() {
                    let routed = if together {
                        route_among_ranks(world, &probs, &mut decide)
                    } else {
                        route_alone(world, &probs, &mut decide)
                    };
                    match routed {
                        Ok(route) => return route,
                        Err(e) => fault.record(e),
                    }
                }
                stand_in(world, &probs, &mut decide)
            }
        }
    }
}

/// The route of a pass whose exchange failed: this rank's own decision, no rows kept by the
/// other ranks. Its values are never used (the step ends with the error); its shapes let the
/// pass finish.
fn stand_in(
    world: &dyn Collective,
    probs: &[f32],
    decide: &mut impl FnMut(&[f32]) -> RoutePlan,
) -> GroupRoute {
    let plan = decide(probs);
    let mut kept = vec![vec![0; plan.n_experts]; world.size()];
    kept[world.rank()] = plan.kept_counts();
    own_route(plan, kept)
}

/// This rank's route when it decided alone: its own plan, whose counts are the group's.
fn own_route(plan: RoutePlan, kept: Vec<Vec<usize>>) -> GroupRoute {
    GroupRoute {
        group_counts: plan.counts.clone(),
        group_tokens: plan.n_tokens(),
        kept,
        plan,
    }
}

/// Every rank's probabilities to every rank; rank 0 decides; its decisions (routes, drops,
/// capacity) to every rank, which takes its part.
fn route_among_ranks(
    world: &dyn Collective,
    probs: &[f32],
    decide: &mut impl FnMut(&[f32]) -> RoutePlan,
) -> anyhow::Result<GroupRoute> {
    let all = world.all_gather("routing probabilities", probs)?;
    let mut bytes = vec![];
    if world.rank() == 0 {
        let plan = decide(&all);
        bytes.extend((plan.n_experts as u64).to_le_bytes());
        bytes.extend((plan.top_k as u64).to_le_bytes());
        bytes.extend((plan.capacity as u64).to_le_bytes());
        for (&r, &d) in plan.routes.iter().zip(&plan.dropped) {
            bytes.extend((r as u32).to_le_bytes());
            bytes.push(d as u8);
        }
    }
    world.broadcast("routing plan", 0, &mut bytes)?;
    let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap()) as usize;
    let (n_experts, top_k, capacity) = (word(0), word(1), word(2));
    let (routes, dropped) = bytes[24..]
        .chunks_exact(5)
        .map(|c| {
            (
                u32::from_le_bytes(c[..4].try_into().unwrap()) as usize,
                c[4] != 0,
            )
        })
        .unzip();
    let plan = RoutePlan::from_decisions(routes, dropped, n_experts, top_k, capacity);
    Ok(part(&plan, world.rank(), world.size()))
}

/// This rank's own decision over its `probs`; every rank's kept assignments per expert
/// gathered.
fn route_alone(
    world: &dyn Collective,
    probs: &[f32],
    decide: &mut impl FnMut(&[f32]) -> RoutePlan,
) -> anyhow::Result<GroupRoute> {
    let plan = decide(probs);
    let mine: Vec<f32> = plan.kept_counts().iter().map(|&k| k as f32).collect();
    let all = world.all_gather("kept assignments per expert", &mine)?;
    let kept = all
        .chunks(plan.n_experts)
        .map(|c| c.iter().map(|&k| k as usize).collect())
        .collect();
    Ok(own_route(plan, kept))
}

impl RouteGroup {
    /// Runs `f` (one shard's forward pass) in the seat of shard `index`, which `f` passes to
    /// the model. A panic in `f` releases the other shards instead of leaving them waiting.
    pub(crate) fn run_as<R>(&self, index: usize, f: impl FnOnce(Shard<'_>) -> R) -> R {
        struct Release<'a>(&'a RouteGroup);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.abandon();
                }
            }
        }
        let _release = Release(self);
        f(Shard {
            group: Seat::Threads(self),
            index,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{RoutingOptions, RoutingRng};
    use rand::{Rng, SeedableRng};

    fn probs(n_tokens: usize, n_experts: usize, seed: u64) -> Vec<f32> {
        let mut rng = RoutingRng::seed_from_u64(seed);
        (0..n_tokens * n_experts).map(|_| rng.random()).collect()
    }

    #[test]
    fn each_shard_gets_its_part_of_the_whole_batch_plan() {
        let (shards, per_shard, experts) = (3, 20, 4);
        let opts = RoutingOptions::labml(0.7, true);
        let all = probs(shards * per_shard, experts, 1);
        let whole = RoutePlan::new(&all, experts, &opts, &mut RoutingRng::seed_from_u64(9));
        assert!(whole.n_dropped() > 0);
        let group = RouteGroup::new(shards);
        let parts: Vec<GroupRoute> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..shards)
                .map(|i| {
                    let (group, all) = (&group, &all);
                    scope.spawn(move || {
                        group.run_as(i, |shard| {
                            assert_eq!(shard.index(), i);
                            let mine =
                                all[i * per_shard * experts..][..per_shard * experts].to_vec();
                            let mut rng = RoutingRng::seed_from_u64(9);
                            shard.route(mine, |p| RoutePlan::new(p, experts, &opts, &mut rng))
                        })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, part) in parts.iter().enumerate() {
            let range = i * per_shard..(i + 1) * per_shard;
            assert_eq!(part.plan.routes, whole.routes[range.clone()]);
            assert_eq!(part.plan.dropped, whole.dropped[range]);
            assert_eq!(part.plan.capacity, whole.capacity);
            assert_eq!(part.group_counts, whole.counts);
            assert_eq!(part.group_tokens, shards * per_shard);
        }
    }

    #[test]
    fn ranks_route_as_the_threads_do() {
        let (ranks, per_rank, experts) = (3, 20, 4);
        let opts = RoutingOptions::labml(0.7, true);
        let all = probs(ranks * per_rank, experts, 2);
        let whole = RoutePlan::new(&all, experts, &opts, &mut RoutingRng::seed_from_u64(5));
        assert!(whole.n_dropped() > 0);
        let world: Vec<Arc<dyn Collective>> =
            crate::distributed::Threads::group(ranks, std::time::Duration::from_secs(30))
                .into_iter()
                .map(|w| Arc::new(w) as Arc<dyn Collective>)
                .collect();
        let parts: Vec<GroupRoute> = std::thread::scope(|scope| {
            let handles: Vec<_> = world
                .iter()
                .map(|w| {
                    let all = &all;
                    let opts = &opts;
                    scope.spawn(move || {
                        let fault = Arc::default();
                        let seat = Shard::rank(w, &fault);
                        let i = seat.index();
                        let mine = all[i * per_rank * experts..][..per_rank * experts].to_vec();
                        // Only rank 0 decides: the others' generators would decide otherwise.
                        let mut rng = RoutingRng::seed_from_u64(if i == 0 { 5 } else { 99 });
                        let route =
                            seat.route(mine, |p| RoutePlan::new(p, experts, opts, &mut rng));
                        assert!(!fault.is_set());
                        route
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, part) in parts.iter().enumerate() {
            let range = i * per_rank..(i + 1) * per_rank;
            assert_eq!(part.plan.routes, whole.routes[range.clone()]);
            assert_eq!(part.plan.dropped, whole.dropped[range]);
            assert_eq!(part.group_counts, whole.counts);
            assert_eq!(part.group_tokens, ranks * per_rank);
        }
    }

    #[test]
    fn a_failed_shard_releases_the_others() {
        let group = RouteGroup::new(2);
        let opts = RoutingOptions::labml(1.0, true);
        let results: Vec<bool> = std::thread::scope(|scope| {
            let leader = scope.spawn(|| {
                group.run_as(0, |shard| {
                    let mut rng = RoutingRng::seed_from_u64(0);
                    shard.route(probs(4, 2, 0), |p| RoutePlan::new(p, 2, &opts, &mut rng))
                })
            });
            let other = scope.spawn(|| group.run_as(1, |_| panic!("shard 1 fails")));
            vec![leader.join().is_err(), other.join().is_err()]
        });
        assert_eq!(results, vec![true, true]);
    }
}
