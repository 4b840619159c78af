//! The routing decision made on the host from the probabilities read back: index lists for any
//! top-k, drop policy or dropless routing (the fastest way on the CPU).

use rand::Rng;
use rand::seq::SliceRandom;

use super::options::{DropPolicy, RoutingOptions, argmax, capacity, top_k};

/// Where every token goes, after capacity is enforced.
///
/// An *assignment* is one (token, expert) pair: token `t`'s `r`-th choice is assignment
/// `t * top_k + r`. Expert `e` owns the slot rows `e * slots .. (e + 1) * slots` of the packed
/// expert input; unused slots point at token 0 and their outputs are never read (so they get
/// no gradient).
#[derive(Debug, Clone, PartialEq)]
pub struct RoutePlan {
    /// Experts of the layer.
    pub n_experts: usize,
    /// Choices per token.
    pub top_k: usize,
    /// Expert of each assignment (with `top_k = 1`: each token's argmax expert).
    pub routes: Vec<usize>,
    /// Tokens whose first choice is each expert, before dropping (the f_i of the
    /// load-balancing loss).
    pub counts: Vec<usize>,
    /// Slots per expert when dropping.
    pub capacity: usize,
    /// Whether each assignment was dropped.
    pub dropped: Vec<bool>,
    /// Rows per expert in the packed expert input.
    pub slots: usize,
    /// For each slot row, the token it holds (`n_experts * slots` entries).
    pub slot_token: Vec<usize>,
    /// For each assignment: its slot row if kept, `n_experts * slots + token` if dropped (that
    /// row of `[expert outputs; dropped-token fallback]`).
    pub token_source: Vec<usize>,
}

impl RoutePlan {
    /// Routes by the top-k of `probs` (`[tokens, n_experts]`, row-major). With dropping, an
    /// over-capacity expert keeps `capacity` of its assignments, chosen by the drop policy.
    pub fn new(probs: &[f32], n_experts: usize, opts: &RoutingOptions, rng: &mut impl Rng) -> Self {
        let k = opts.top_k.clamp(1, n_experts);
        let n_tokens = probs.len() / n_experts;
        let routes: Vec<usize> = probs
            .chunks_exact(n_experts)
            .flat_map(|row| {
                if k == 1 {
                    vec![argmax(row)]
                } else {
                    top_k(row, k)
                }
            })
            .collect();
        let cap = capacity(opts.capacity_factor, n_tokens * k, n_experts);
        let mut dropped = vec![false; routes.len()];
        if opts.drop_tokens {
            for mut assignments in assignments_by_expert(&routes, n_experts) {
                if assignments.len() <= cap {
                    continue;
                }
                match opts.drop_policy {
                    DropPolicy::Random => assignments.shuffle(rng),
                    // (rank, token) order: first choices first, then by position.
                    DropPolicy::Position => assignments.sort_by_key(|&a| (a % k, a / k)),
                    DropPolicy::Confidence => {
                        let p = |a: usize| probs[(a / k) * n_experts + routes[a]];
                        assignments.sort_by(|&a, &b| p(b).total_cmp(&p(a)).then(a.cmp(&b)));
                    }
                }
                for &a in &assignments[cap..] {
                    dropped[a] = true;
                }
            }
        }
        Self::from_decisions(routes, dropped, n_experts, k, cap)
    }

    /// A plan from explicit decisions (used to replay a recorded drop set).
    pub(crate) fn from_decisions(
        routes: Vec<usize>,
        dropped: Vec<bool>,
        n_experts: usize,
        top_k: usize,
        capacity: usize,
    ) -> Self {
        let n_assign = routes.len();
        let mut counts = vec![0; n_experts];
        for &r in routes.iter().step_by(top_k) {
            counts[r] += 1;
        }
        let kept: Vec<Vec<usize>> = assignments_by_expert(&routes, n_experts)
            .into_iter()
            .map(|ts| ts.into_iter().filter(|&a| !dropped[a]).collect())
            .collect();
        let slots = kept.iter().map(Vec::len).max().unwrap_or(0);
        let mut slot_token = vec![0; n_experts * slots];
        let mut token_source: Vec<usize> = (0..n_assign)
            .map(|a| n_experts * slots + a / top_k)
            .collect();
        for (e, assignments) in kept.iter().enumerate() {
            for (i, &a) in assignments.iter().enumerate() {
                slot_token[e * slots + i] = a / top_k;
                token_source[a] = e * slots + i;
            }
        }
        Self {
            n_experts,
            top_k,
            routes,
            counts,
            capacity,
            dropped,
            slots,
            slot_token,
            token_source,
        }
    }

    /// Tokens routed.
    pub(crate) fn n_tokens(&self) -> usize {
        self.routes.len() / self.top_k
    }

    /// Dropped assignments (= dropped tokens with `top_k = 1`).
    pub fn n_dropped(&self) -> usize {
        self.dropped.iter().filter(|&&d| d).count()
    }

    /// Assignments kept by each expert.
    pub fn kept_counts(&self) -> Vec<usize> {
        let mut kept = vec![0; self.n_experts];
        for (a, &e) in self.routes.iter().enumerate() {
            if !self.dropped[a] {
                kept[e] += 1;
            }
        }
        kept
    }
}

/// Assignment indices routed to each expert, in assignment order.
fn assignments_by_expert(routes: &[usize], n_experts: usize) -> Vec<Vec<usize>> {
    let mut by_expert = vec![Vec::new(); n_experts];
    for (a, &e) in routes.iter().enumerate() {
        by_expert[e].push(a);
    }
    by_expert
}

#[cfg(test)]
mod tests {
    #![allow(clippy::needless_range_loop)]
    use super::*;
    use crate::routing::RoutingRng;
    use rand::SeedableRng;

    fn random_probs(rng: &mut RoutingRng, n_tokens: usize, n_experts: usize) -> Vec<f32> {
        let mut p = Vec::new();
        for _ in 0..n_tokens {
            // Skewed so some experts overflow.
            let row: Vec<f32> = (0..n_experts)
                .map(|e| rng.random::<f32>() * (1.0 + e as f32))
                .collect();
            let s: f32 = row.iter().sum();
            p.extend(row.iter().map(|v| v / s));
        }
        p
    }

    #[test]
    fn capacity_matches_python_floor() {
        assert_eq!(capacity(1.2, 2048, 4), 614);
        assert_eq!(capacity(0.5, 32, 4), 4);
        assert_eq!(capacity(1.0, 64, 4), 16);
        assert_eq!(capacity(1.2, 2048, 64), 38);
    }

    #[test]
    fn routing_invariants_on_random_inputs() {
        let mut rng = RoutingRng::seed_from_u64(7);
        for trial in 0..200 {
            let n_experts = 1 + trial % 9;
            let n_tokens = 1 + (trial * 37) % 300;
            let cf = 0.25 + (trial % 7) as f64 * 0.3;
            let probs = random_probs(&mut rng, n_tokens, n_experts);
            let plan = RoutePlan::new(
                &probs,
                n_experts,
                &RoutingOptions::labml(cf, true),
                &mut rng,
            );
            let cap = capacity(cf, n_tokens, n_experts);
            let kept = plan.kept_counts();
            let mut expected_dropped = 0;
            for e in 0..n_experts {
                // kept per expert = min(count, capacity); under capacity drops nothing
                assert_eq!(kept[e], plan.counts[e].min(cap));
                expected_dropped += plan.counts[e].saturating_sub(cap);
            }
            assert_eq!(plan.n_dropped(), expected_dropped);
            assert_eq!(plan.counts.iter().sum::<usize>(), n_tokens);
            // every token is either in exactly one slot of its argmax expert, or dropped
            let mut seen = vec![0; n_tokens];
            for e in 0..n_experts {
                for i in 0..kept[e] {
                    let t = plan.slot_token[e * plan.slots + i];
                    assert_eq!(plan.routes[t], e);
                    seen[t] += 1;
                }
            }
            for t in 0..n_tokens {
                assert_eq!(
                    plan.routes[t],
                    argmax(&probs[t * n_experts..(t + 1) * n_experts])
                );
                if plan.dropped[t] {
                    assert_eq!(seen[t], 0);
                    assert_eq!(plan.token_source[t], n_experts * plan.slots + t);
                } else {
                    assert_eq!(seen[t], 1);
                    assert_eq!(plan.slot_token[plan.token_source[t]], t);
                }
            }
        }
    }

    #[test]
    fn without_dropping_nothing_drops() {
        let mut rng = RoutingRng::seed_from_u64(1);
        let probs = random_probs(&mut rng, 100, 4);
        let plan = RoutePlan::new(&probs, 4, &RoutingOptions::labml(0.1, false), &mut rng);
        assert_eq!(plan.n_dropped(), 0);
        assert_eq!(plan.slots, *plan.counts.iter().max().unwrap());
    }

    #[test]
    fn dropping_is_reproducible_from_the_seed() {
        let mut rng = RoutingRng::seed_from_u64(3);
        let probs = random_probs(&mut rng, 128, 4);
        let a = RoutePlan::new(
            &probs,
            4,
            &RoutingOptions::labml(0.5, true),
            &mut RoutingRng::seed_from_u64(11),
        );
        let b = RoutePlan::new(
            &probs,
            4,
            &RoutingOptions::labml(0.5, true),
            &mut RoutingRng::seed_from_u64(11),
        );
        let c = RoutePlan::new(
            &probs,
            4,
            &RoutingOptions::labml(0.5, true),
            &mut RoutingRng::seed_from_u64(12),
        );
        assert_eq!(a, b);
        assert_ne!(a.dropped, c.dropped);
    }
}
