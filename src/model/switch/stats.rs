//! What a Switch layer's forward pass reports about its routing: per-expert counts (the f_i of
//! the load-balancing loss), the probability sums (P_i), the z-loss, drops and each token's
//! choice, as tensors on the layer's device until someone reads them.

use burn::tensor::{Int, Tensor};

use crate::store::host_f32;

/// Routing statistics of one Switch layer for one forward pass, as tensors on the layer's
/// device (reading them is the caller's choice: once per step for the logs).
#[derive(Debug, Clone)]
pub struct SwitchStats {
    /// `[n_experts]` tokens whose first choice is each expert, before dropping (constant).
    pub counts: Tensor<1>,
    /// `[n_experts]` the same over the tokens routed together (the f_i numerator of the
    /// load-balancing loss): `counts` itself, or the whole batch's in a
    /// `crate::routing::group`.
    pub group_counts: Tensor<1>,
    /// Tokens routed together (the f_i denominator).
    pub group_tokens: usize,
    /// Sum over all tokens of the full routing probabilities `[n_experts]` (P_i numerator;
    /// carries the gradient to the router).
    pub route_prob_sum: Tensor<1>,
    /// `[tokens, n_experts]` the routing probabilities themselves (with gradient; the
    /// sequence-level load-balancing loss sums them per sequence).
    pub route_prob: Tensor<2>,
    /// Router z-loss of this layer: mean over tokens of logsumexp(logits)^2 (with gradient).
    pub z_loss: Tensor<1>,
    /// `[1]` assignments dropped over capacity (= tokens with top-1 routing).
    pub n_dropped: Tensor<1>,
    /// `[tokens]` each token's top probability (no gradient).
    pub route_prob_max: Tensor<1>,
    /// `[tokens]` each token's first-choice expert.
    pub routes: Tensor<1, Int>,
}

/// [`SwitchStats`] read back to the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostStats {
    /// Tokens whose first choice is each expert, before dropping.
    pub counts: Vec<f32>,
    /// Assignments dropped over capacity.
    pub n_dropped: usize,
    /// Each token's top routing probability.
    pub route_prob_max: Vec<f32>,
    /// Each token's first-choice expert.
    pub routes: Vec<usize>,
}

impl SwitchStats {
    /// Tokens routed in this pass.
    pub(crate) fn n_tokens(&self) -> usize {
        self.routes.dims()[0]
    }

    /// `[n_experts + 2]`: the counts, the dropped count and the sum of the top probabilities
    /// (what the training log needs, so that all layers read back in one go).
    pub(crate) fn summary(&self) -> Tensor<1> {
        Tensor::cat(
            vec![
                self.counts.clone(),
                self.n_dropped.clone(),
                self.route_prob_max.clone().sum(),
            ],
            0,
        )
    }

    /// Reads everything back (four reads).
    pub fn host(&self) -> HostStats {
        let routes = crate::store::host_i64(self.routes.clone());
        HostStats {
            counts: host_f32(self.counts.clone()),
            n_dropped: host_f32(self.n_dropped.clone())[0].round() as usize,
            route_prob_max: host_f32(self.route_prob_max.clone()),
            routes: routes.into_iter().map(|r| r as usize).collect(),
        }
    }
}
