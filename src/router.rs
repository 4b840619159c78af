//! The router: `p = softmax(x W_r + b_r)`, each token to its argmax expert, at most
//! `capacity = floor(capacity_factor * tokens / n_experts)` tokens per expert.
//!
//! The decision (argmax, capacity, which tokens drop) is discrete. It is made either on the host
//! from the probabilities read back ([`RoutePlan`]: index lists; any top-k, policy, dropless;
//! the fastest way on the CPU) or on the device with tensor ops ([`DeviceRoutes`]: top-1 with
//! capacity, no read-back; GPU backends). Either way it ends as index tensors that one gather
//! and one select use. Gradients reach the router through the probabilities only.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Device, IndexingUpdateOp, Int, Tensor, TensorData};
use rand::Rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

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

/// Which tokens an over-capacity expert drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// A uniformly random subset keeps its place (labml: `torch.randperm`).
    #[default]
    Random,
    /// First come, first served: first choices before second choices, then by position in the
    /// batch (Mesh TensorFlow, Hugging Face).
    Position,
    /// The most confident assignments keep their place (batch-prioritized routing).
    Confidence,
}

/// Where the routing decision is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutePlace {
    /// On the host on the CPU backend (fastest there), on the device on the others, where
    /// [`RoutingOptions::device_capable`].
    #[default]
    Auto,
    /// On the host, from the probabilities read back (one read per layer per forward).
    Host,
    /// On the device wherever [`RoutingOptions::device_capable`] (else on the host).
    Device,
}

/// How tokens are assigned to experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingOptions {
    /// Experts per token (1 = Switch; 2 = the top-2 MoE the paper compares against).
    pub top_k: usize,
    pub capacity_factor: f64,
    /// Enforce capacity; off = dropless (capacity grows to the largest load).
    pub drop_tokens: bool,
    pub drop_policy: DropPolicy,
    pub place: RoutePlace,
}

impl RoutingOptions {
    /// labml's Switch routing.
    pub fn labml(capacity_factor: f64, drop_tokens: bool) -> Self {
        Self {
            top_k: 1,
            capacity_factor,
            drop_tokens,
            drop_policy: DropPolicy::Random,
            place: RoutePlace::Auto,
        }
    }

    /// Whether [`DeviceRoutes`] can make this decision: top-1 with a fixed capacity, dropping
    /// at random or by position (dropless needs the largest load, confidence a sort: both
    /// would read back to the host).
    pub fn device_capable(&self) -> bool {
        self.top_k == 1 && self.drop_tokens && self.drop_policy != DropPolicy::Confidence
    }

    /// Whether to route on the device for tensors on `device`.
    pub fn on_device(&self, device: &Device) -> bool {
        self.device_capable()
            && match self.place {
                RoutePlace::Host => false,
                RoutePlace::Device => true,
                RoutePlace::Auto => *device != Device::flex(),
            }
    }
}

/// labml's capacity: `int(capacity_factor * tokens / n_experts)`, evaluated in f64 in the same
/// order as Python so the floor lands on the same integer. With top-k routing every assignment
/// takes a slot, so `tokens` counts assignments (`k * tokens`).
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

/// Indices of the `k` largest values, largest first (earlier index first on ties).
pub fn top_k(row: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Where every token goes, after capacity is enforced.
///
/// An *assignment* is one (token, expert) pair: token `t`'s `r`-th choice is assignment
/// `t * top_k + r`. Expert `e` owns the slot rows `e * slots .. (e + 1) * slots` of the packed
/// expert input; unused slots point at token 0 and their outputs are never read (so they get
/// no gradient).
#[derive(Debug, Clone, PartialEq)]
pub struct RoutePlan {
    pub n_experts: usize,
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
    pub fn from_decisions(
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

    pub fn n_tokens(&self) -> usize {
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

    /// Assignments routed to each expert, before dropping.
    pub fn assigned_counts(&self) -> Vec<usize> {
        let mut n = vec![0; self.n_experts];
        for &e in &self.routes {
            n[e] += 1;
        }
        n
    }
}

/// A top-1 routing decision with capacity, made and held on the device (no read-back):
///
/// ```text
/// e_t    = argmax p_t
/// order  = a random permutation of the tokens (policy random) or their positions (position)
/// pos_t  = number of tokens routed to e_t before t in that order   (a cumulative sum)
/// kept   = pos_t < capacity;  slot_t = e_t * capacity + pos_t
/// ```
/// The permutation is drawn on the host from the run's generator and uploaded with its
/// inverse, so the decision reproduces from the seed like [`RoutePlan`]'s (with a different
/// draw: the two places drop different, equally random, subsets).
pub struct DeviceRoutes {
    /// Slots per expert: the capacity.
    pub slots: usize,
    /// `[tokens]` expert of each token.
    pub routes: Tensor<1, Int>,
    /// `[n_experts * slots]` token of each slot (token 0 in unused slots, never read).
    pub slot_token: Tensor<1, Int>,
    /// `[tokens]` slot row of each kept token; `n_experts * slots + t` for a dropped token `t`
    /// (that row of `[expert outputs; dropped-token fallback]`).
    pub token_source: Tensor<1, Int>,
    /// `[n_experts]` tokens routed to each expert before dropping.
    pub counts: Tensor<1>,
    /// `[1]` tokens dropped.
    pub n_dropped: Tensor<1>,
}

impl DeviceRoutes {
    /// `route_prob`: `[tokens, n_experts]` (its value only is used). Needs
    /// [`RoutingOptions::device_capable`].
    pub fn new(route_prob: Tensor<2>, opts: &RoutingOptions, rng: &mut impl Rng) -> Self {
        assert!(
            opts.device_capable(),
            "device routing needs top-1 with dropping"
        );
        let device = route_prob.device();
        let [n, e] = route_prob.dims();
        let cap = capacity(opts.capacity_factor, n, e);
        let routes: Tensor<1, Int> = route_prob.detach().argmax(1).reshape([n]);
        let order = (opts.drop_policy == DropPolicy::Random).then(|| {
            let mut perm: Vec<usize> = (0..n).collect();
            perm.shuffle(rng);
            let mut inverse = vec![0; n];
            for (i, &t) in perm.iter().enumerate() {
                inverse[t] = i;
            }
            (
                index_tensor(&perm, &device),
                index_tensor(&inverse, &device),
            )
        });
        let ordered = match &order {
            Some((perm, _)) => routes.clone().select(0, perm.clone()),
            None => routes.clone(),
        };
        // [n, e] one-hot of the experts (without `one_hot`, which checks its input on the host).
        let experts = Tensor::<1, Int>::arange(0..e as i64, &device).reshape([1, e]);
        let hot: Tensor<2, Int> = ordered
            .clone()
            .reshape([n, 1])
            .expand([n, e])
            .equal(experts.expand([n, e]))
            .int();
        let before = hot.clone().cumsum(0).gather(1, ordered.reshape([n, 1])) - 1;
        let pos = match order {
            Some((_, inverse)) => before.reshape([n]).select(0, inverse),
            None => before.reshape([n]),
        };
        let kept: Tensor<1, Bool> = pos.clone().lower_elem(cap as i64);
        let tokens = Tensor::<1, Int>::arange(0..n as i64, &device);
        let dropped_row = tokens.clone() + (e * cap) as i64;
        let slot = routes.clone() * cap as i64 + pos;
        let token_source = dropped_row.mask_where(kept.clone(), slot);
        let slot_token = Tensor::<1, Int>::zeros([e * cap + n], &device)
            .scatter(0, token_source.clone(), tokens, IndexingUpdateOp::Assign)
            .slice(0..e * cap);
        let n_kept = kept.int().sum().float();
        Self {
            slots: cap,
            routes,
            slot_token,
            token_source,
            counts: hot.sum_dim(0).reshape([e]).float(),
            n_dropped: n_kept.neg() + n as f64,
        }
    }
}

/// Uploads indices as an int tensor.
pub(crate) fn index_tensor(idx: &[usize], device: &Device) -> Tensor<1, Int> {
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [idx.len()]), device)
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
