//! The router: `p = softmax(x W_r + b_r)`, each token to its argmax expert, at most
//! `capacity = floor(capacity_factor * tokens / n_experts)` tokens per expert.
//!
//! The decision (argmax, capacity, which tokens drop) is discrete, so it is made on the host
//! from the probabilities and handed to the switch layer as a [`RoutePlan`]: index lists that
//! one gather and one scatter use. Gradients reach the router through the probabilities only.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::activation::softmax;
use rand::Rng;
use rand::seq::SliceRandom;

/// Seeded random generator used for token dropping; the caller owns it so runs reproduce.
pub type RoutingRng = rand_chacha::ChaCha8Rng;

/// Linear layer d_model -> n_experts followed by a softmax over experts.
#[derive(Module, Debug)]
pub struct Router {
    /// PyTorch name `switch` (labml's `SwitchFeedForward.switch`).
    pub switch: Linear,
}

impl Router {
    /// Router logits `[tokens, n_experts]`.
    pub fn logits(&self, x: Tensor<2>) -> Tensor<2> {
        self.switch.forward(x)
    }

    /// Routing probabilities `[tokens, n_experts]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        softmax(self.logits(x), 1)
    }
}

/// labml's capacity: `int(capacity_factor * tokens / n_experts)`, evaluated in f64 in the same
/// order as Python so the floor lands on the same integer.
pub fn capacity(capacity_factor: f64, n_tokens: usize, n_experts: usize) -> usize {
    (capacity_factor * n_tokens as f64 / n_experts as f64) as usize
}

/// Index of the largest value (the first one on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Where every token goes, after capacity is enforced.
///
/// Expert `e` owns the slot rows `e * slots .. (e + 1) * slots` of the packed expert input;
/// unused slots point at token 0 and their outputs are never read (so they get no gradient).
#[derive(Debug, Clone, PartialEq)]
pub struct RoutePlan {
    pub n_experts: usize,
    /// Argmax expert of each token.
    pub routes: Vec<usize>,
    /// Tokens routed to each expert, before dropping.
    pub counts: Vec<usize>,
    /// labml's capacity (only enforced when dropping).
    pub capacity: usize,
    /// Whether each token was dropped.
    pub dropped: Vec<bool>,
    /// Rows per expert in the packed expert input.
    pub slots: usize,
    /// For each slot row, the token it holds (`n_experts * slots` entries).
    pub slot_token: Vec<usize>,
    /// For each token: its slot row if kept, `n_experts * slots + token` if dropped (that row
    /// of `[expert outputs; dropped-token fallback]`).
    pub token_source: Vec<usize>,
}

impl RoutePlan {
    /// Routes by argmax of `probs` (`[tokens, n_experts]`, row-major). With `drop_tokens`, an
    /// over-capacity expert keeps a uniformly random subset of `capacity` of its tokens (labml
    /// shuffles each expert's token list with `torch.randperm`).
    pub fn new(
        probs: &[f32],
        n_experts: usize,
        capacity_factor: f64,
        drop_tokens: bool,
        rng: &mut impl Rng,
    ) -> Self {
        let n_tokens = probs.len() / n_experts;
        let routes: Vec<usize> = probs.chunks_exact(n_experts).map(argmax).collect();
        let cap = capacity(capacity_factor, n_tokens, n_experts);
        let mut dropped = vec![false; n_tokens];
        if drop_tokens {
            for mut tokens in tokens_by_expert(&routes, n_experts) {
                if tokens.len() > cap {
                    tokens.shuffle(rng);
                    for &t in &tokens[cap..] {
                        dropped[t] = true;
                    }
                }
            }
        }
        Self::from_decisions(routes, dropped, n_experts, cap)
    }

    /// A plan from explicit decisions (used to replay a recorded drop set).
    pub fn from_decisions(
        routes: Vec<usize>,
        dropped: Vec<bool>,
        n_experts: usize,
        capacity: usize,
    ) -> Self {
        let n_tokens = routes.len();
        let mut counts = vec![0; n_experts];
        for &r in &routes {
            counts[r] += 1;
        }
        let kept: Vec<Vec<usize>> = tokens_by_expert(&routes, n_experts)
            .into_iter()
            .map(|ts| ts.into_iter().filter(|&t| !dropped[t]).collect())
            .collect();
        let slots = kept.iter().map(Vec::len).max().unwrap_or(0);
        let mut slot_token = vec![0; n_experts * slots];
        let mut token_source: Vec<usize> = (0..n_tokens).map(|t| n_experts * slots + t).collect();
        for (e, tokens) in kept.iter().enumerate() {
            for (i, &t) in tokens.iter().enumerate() {
                slot_token[e * slots + i] = t;
                token_source[t] = e * slots + i;
            }
        }
        Self {
            n_experts,
            routes,
            counts,
            capacity,
            dropped,
            slots,
            slot_token,
            token_source,
        }
    }

    pub fn n_tokens(&self) -> usize {
        self.routes.len()
    }

    pub fn n_dropped(&self) -> usize {
        self.dropped.iter().filter(|&&d| d).count()
    }

    /// Tokens kept by each expert.
    pub fn kept_counts(&self) -> Vec<usize> {
        let mut kept = vec![0; self.n_experts];
        for (t, &e) in self.routes.iter().enumerate() {
            if !self.dropped[t] {
                kept[e] += 1;
            }
        }
        kept
    }
}

/// Token indices routed to each expert, in token order.
fn tokens_by_expert(routes: &[usize], n_experts: usize) -> Vec<Vec<usize>> {
    let mut by_expert = vec![Vec::new(); n_experts];
    for (t, &e) in routes.iter().enumerate() {
        by_expert[e].push(t);
    }
    by_expert
}

#[cfg(test)]
mod tests {
    #![allow(clippy::needless_range_loop)]
    use super::*;
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
            let plan = RoutePlan::new(&probs, n_experts, cf, true, &mut rng);
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
        let plan = RoutePlan::new(&probs, 4, 0.1, false, &mut rng);
        assert_eq!(plan.n_dropped(), 0);
        assert_eq!(plan.slots, *plan.counts.iter().max().unwrap());
    }

    #[test]
    fn dropping_is_reproducible_from_the_seed() {
        let mut rng = RoutingRng::seed_from_u64(3);
        let probs = random_probs(&mut rng, 128, 4);
        let a = RoutePlan::new(&probs, 4, 0.5, true, &mut RoutingRng::seed_from_u64(11));
        let b = RoutePlan::new(&probs, 4, 0.5, true, &mut RoutingRng::seed_from_u64(11));
        let c = RoutePlan::new(&probs, 4, 0.5, true, &mut RoutingRng::seed_from_u64(12));
        assert_eq!(a, b);
        assert_ne!(a.dropped, c.dropped);
    }
}
