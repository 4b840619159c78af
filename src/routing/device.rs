//! The top-1 routing decision with capacity made with tensor ops on the device, without
//! reading the probabilities back (GPU backends).

use burn::tensor::{Bool, IndexingUpdateOp, Int, Tensor};
use rand::Rng;
use rand::seq::SliceRandom;

use super::index_tensor;
use super::options::{DropPolicy, RoutingOptions, capacity};
use super::scan::cumsum_rows;

/// A top-1 routing decision with capacity, made and held on the device (no read-back):
///
/// ```text
/// e_t    = argmax p_t
/// order  = a random permutation of the tokens (policy random) or their positions (position)
/// pos_t  = number of tokens routed to e_t before t in that order   (a blocked prefix sum:
///          O(tokens x experts), see [`super::scan`])
/// kept   = pos_t < capacity;  slot_t = e_t * capacity + pos_t
/// ```
/// The permutation is drawn on the host from the run's generator and uploaded with its
/// inverse, so the decision reproduces from the seed like [`super::RoutePlan`]'s (with a different
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
        // The index ranges are uploaded (no kernel) rather than made by `arange` (a fill and a
        // cumulative sum on the device, 2-3 kernels each).
        let experts = index_tensor(&(0..e).collect::<Vec<_>>(), &device).reshape([1, e]);
        let hot: Tensor<2, Int> = ordered
            .clone()
            .reshape([n, 1])
            .expand([n, e])
            .equal(experts.expand([n, e]))
            .int();
        let before = cumsum_rows(hot.clone()).gather(1, ordered.reshape([n, 1])) - 1;
        let pos = match order {
            Some((_, inverse)) => before.reshape([n]).select(0, inverse),
            None => before.reshape([n]),
        };
        let kept: Tensor<1, Bool> = pos.clone().lower_elem(cap as i64);
        let tokens = index_tensor(&(0..n).collect::<Vec<_>>(), &device);
        let dropped_row = tokens.clone() + (e * cap) as i64;
        let slot = routes.clone() * cap as i64 + pos;
        let token_source = dropped_row.mask_where(kept, slot);
        let slot_token = Tensor::<1, Int>::zeros([e * cap + n], &device)
            .scatter(0, token_source.clone(), tokens, IndexingUpdateOp::Assign)
            .slice(0..e * cap);
        // Each expert keeps its first `cap` tokens: drops = sum_e max(count_e - cap, 0).
        let counts = hot.sum_dim(0).reshape([e]).float();
        let n_dropped = (counts.clone() - cap as f64).clamp_min(0.0).sum();
        Self {
            slots: cap,
            routes,
            slot_token,
            token_source,
            counts,
            n_dropped,
        }
    }
}
