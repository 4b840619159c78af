//! The Switch layer: the FFN of a Transformer block replaced by `n_experts` FFNs, one chosen per
//! token by the [`Router`].
//!
//! ```text
//! p = softmax(x W_r + b_r);  e(t) = argmax p_t
//! y_t = p_t[e(t)] * E_{e(t)}(x_t)      kept tokens
//! y_t = p_t[e(t)] * x_t                tokens dropped over capacity (labml: the input passes)
//! ```
//! Multiplying by the probability is what trains the router (with `is_scale_prob = false` the
//! factor is `p / stop_gradient(p)`: value 1, same gradient path).
//!
//! Computation: one gather packs each expert's tokens into `[n_experts, slots, d]`, one batched
//! matmul pair runs all experts, one gather unpacks. No expert ever sees another's tokens.

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::expert::Experts;
use crate::router::{RoutePlan, Router, RoutingRng};

/// Routing statistics of one Switch layer for one forward pass.
#[derive(Debug, Clone)]
pub struct SwitchStats {
    /// Tokens routed to each expert, before dropping (f_i numerator; constant).
    pub counts: Vec<f32>,
    /// Sum over all tokens of the full routing probabilities `[n_experts]` (P_i numerator;
    /// carries the gradient to the router).
    pub route_prob_sum: Tensor<1>,
    /// Tokens dropped over capacity.
    pub n_dropped: usize,
    /// Each token's top probability.
    pub route_prob_max: Vec<f32>,
    /// Each token's expert.
    pub routes: Vec<usize>,
}

/// Output of [`SwitchFeedForward::forward`].
#[derive(Debug, Clone)]
pub struct SwitchOutput {
    /// `[tokens, d_model]`
    pub out: Tensor<2>,
    pub stats: SwitchStats,
}

#[derive(Module, Debug)]
pub struct SwitchFeedForward {
    pub router: Router,
    pub experts: Experts,
    pub capacity_factor: f64,
    pub drop_tokens: bool,
    pub is_scale_prob: bool,
}

impl SwitchFeedForward {
    pub fn n_experts(&self) -> usize {
        self.experts.n_experts()
    }

    /// `x`: `[tokens, d_model]` (any token order; statistics follow it).
    pub fn forward(&self, x: Tensor<2>, rng: &mut RoutingRng) -> SwitchOutput {
        let route_prob = self.router.forward(x.clone());
        let probs = host_f32(route_prob.clone());
        let plan = RoutePlan::new(
            &probs,
            self.n_experts(),
            self.capacity_factor,
            self.drop_tokens,
            rng,
        );
        self.dispatch(x, route_prob, &probs, &plan)
    }

    /// Runs the experts according to `plan` (from [`RoutePlan::new`] or a recorded one).
    /// `probs` is `route_prob` read back to the host.
    pub fn dispatch(
        &self,
        x: Tensor<2>,
        route_prob: Tensor<2>,
        probs: &[f32],
        plan: &RoutePlan,
    ) -> SwitchOutput {
        let device = x.device();
        let [n_tokens, d_model] = x.dims();
        let n_experts = self.n_experts();

        let routes = index_tensor(&plan.routes, &device).reshape([n_tokens, 1]);
        let p_max = route_prob.clone().gather(1, routes); // [tokens, 1]
        let gate = if self.is_scale_prob {
            p_max
        } else {
            p_max.clone() / p_max.detach()
        };

        let out = if plan.slots == 0 {
            // Capacity 0: every token dropped.
            x
        } else {
            let packed = x
                .clone()
                .select(0, index_tensor(&plan.slot_token, &device))
                .reshape([n_experts, plan.slots, d_model]);
            let expert_out = self
                .experts
                .forward(packed)
                .reshape([n_experts * plan.slots, d_model]);
            let source = if plan.n_dropped() == 0 {
                expert_out
            } else {
                Tensor::cat(vec![expert_out, x], 0)
            };
            source.select(0, index_tensor(&plan.token_source, &device))
        };

        let route_prob_max = plan
            .routes
            .iter()
            .enumerate()
            .map(|(t, &e)| probs[t * n_experts + e])
            .collect();
        SwitchOutput {
            out: out * gate,
            stats: SwitchStats {
                counts: plan.counts.iter().map(|&c| c as f32).collect(),
                route_prob_sum: route_prob.sum_dim(0).reshape([n_experts]),
                n_dropped: plan.n_dropped(),
                route_prob_max,
                routes: plan.routes.clone(),
            },
        }
    }
}

/// Reads a float tensor back to the host.
pub(crate) fn host_f32<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("float tensor data")
}

/// Uploads indices as an int tensor.
pub(crate) fn index_tensor(idx: &[usize], device: &Device) -> Tensor<1, Int> {
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [idx.len()]), device)
}
