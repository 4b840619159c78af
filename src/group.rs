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
//! One rendezvous per Switch layer per forward pass. The group is entered for the duration of
//! one shard's forward pass ([`within`]); outside it (evaluation, generation) every model
//! routes on its own.

use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex};

use crate::router::RoutePlan;

/// The rendezvous of `n` shards.
pub struct RouteGroup {
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
pub struct GroupRoute {
    /// The plan of this shard's tokens (local token indices, local slots).
    pub plan: RoutePlan,
    /// Tokens whose first choice is each expert, over the whole group (the f_i numerator).
    pub group_counts: Vec<usize>,
    /// Tokens of the whole group.
    pub group_tokens: usize,
}

impl RouteGroup {
    pub fn new(n: usize) -> Arc<Self> {
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
    pub fn route(
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
        let k = plan.top_k;
        let per_shard = plan.n_tokens() / self.n;
        let range = shard * per_shard * k..(shard + 1) * per_shard * k;
        GroupRoute {
            plan: RoutePlan::from_decisions(
                plan.routes[range.clone()].to_vec(),
                plan.dropped[range].to_vec(),
                plan.n_experts,
                k,
                plan.capacity,
            ),
            group_counts: plan.counts.clone(),
            group_tokens: plan.n_tokens(),
        }
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

thread_local! {
    static CURRENT: RefCell<Option<(Arc<RouteGroup>, usize)>> = const { RefCell::new(None) };
}

/// Runs `f` (one shard's forward pass) as shard `shard` of `group`: every Switch layer it runs
/// on this thread routes through the group. A panic in `f` releases the other shards.
pub fn within<R>(group: &Arc<RouteGroup>, shard: usize, f: impl FnOnce() -> R) -> R {
    struct Leave(Arc<RouteGroup>);
    impl Drop for Leave {
        fn drop(&mut self) {
            CURRENT.with(|c| c.borrow_mut().take());
            if std::thread::panicking() {
                self.0.abandon();
            }
        }
    }
    CURRENT.with(|c| *c.borrow_mut() = Some((Arc::clone(group), shard)));
    let _leave = Leave(Arc::clone(group));
    f()
}

/// The group and shard index of this thread's forward pass, if inside [`within`].
pub fn current() -> Option<(Arc<RouteGroup>, usize)> {
    CURRENT.with(|c| c.borrow().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::{RoutingOptions, RoutingRng};
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
                        within(group, i, || {
                            let (g, shard) = current().expect("inside the group");
                            let mine =
                                all[i * per_shard * experts..][..per_shard * experts].to_vec();
                            let mut rng = RoutingRng::seed_from_u64(9);
                            g.route(shard, mine, |p| RoutePlan::new(p, experts, &opts, &mut rng))
                        })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(current().is_none());
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
    fn a_failed_shard_releases_the_others() {
        let group = RouteGroup::new(2);
        let opts = RoutingOptions::labml(1.0, true);
        let results: Vec<bool> = std::thread::scope(|scope| {
            let leader = scope.spawn(|| {
                within(&group, 0, || {
                    let mut rng = RoutingRng::seed_from_u64(0);
                    group.route(0, probs(4, 2, 0), |p| RoutePlan::new(p, 2, &opts, &mut rng))
                })
            });
            let other = scope.spawn(|| within(&group, 1, || panic!("shard 1 fails")));
            vec![leader.join().is_err(), other.join().is_err()]
        });
        assert_eq!(results, vec![true, true]);
    }
}
