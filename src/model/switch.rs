//! The Switch layer: the FFN of a Transformer block replaced by `n_experts` FFNs, one chosen per
//! token by the [`Router`].
//!
//! ```text
//! p = softmax(x W_r + b_r);  e(t) = argmax p_t
//! y_t = p_t[e(t)] * E_{e(t)}(x_t)      kept tokens
//! y_t = p_t[e(t)] * x_t                tokens dropped over capacity (labml: the input passes;
//!                                      `DroppedTokens::Zero`: 0, the paper's choice)
//! ```
//! Multiplying by the probability is what trains the router (with `is_scale_prob = false` the
//! factor is `p / stop_gradient(p)`: value 1, same gradient path). With top-k routing (k >= 2)
//! each token's output is the sum over its k experts, weighted by the k probabilities
//! renormalized to sum to 1. Shared experts (`model.shared_experts`, DeepSeek-MoE) see every
//! token: `y_t += FFN_shared(x_t)`.
//!
//! Computation: one gather packs each expert's tokens into `[n_experts, slots, d]`, one batched
//! matmul pair runs all experts, one gather per choice unpacks. No expert sees another's tokens.
//! On the CPU kernels ([`crate::cpu`]) the tokens are packed without padding, `[kept, d]`
//! grouped by expert, and each expert multiplies exactly its rows.

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::expert::Experts;
use super::ffn::DenseFeedForward;
use crate::distributed::ExpertExchange;
use crate::routing::{
    DeviceRoutes, ExpertBias, RoutePlan, Router, RoutingOptions, RoutingRng, Shard, index_tensor,
};
use crate::store::host_f32;

pub(crate) mod noise;
mod stats;
pub(crate) use noise::{dropout_mask, uniform_tensor};
pub use stats::{HostStats, SwitchStats};

/// What a token dropped over capacity contributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DroppedTokens {
    /// Its (normalized) input passes through, scaled by p (labml).
    #[default]
    PassThrough,
    /// Nothing: the Switch sub-layer adds 0 and the token continues on the residual (paper).
    Zero,
}

/// Output of [`SwitchFeedForward::forward`].
#[derive(Debug, Clone)]
pub struct SwitchOutput {
    /// `[tokens, d_model]`
    pub out: Tensor<2>,
    /// Routing statistics of the pass.
    pub stats: SwitchStats,
}

/// The Switch layer (labml's `SwitchFeedForward`): a router and `n_experts` FFNs. Build one
/// with [`crate::model::SwitchFeedForwardConfig`], or from labml weights with
/// [`crate::interop::weights::switch_from_state_dict`].
#[derive(Module, Debug)]
pub struct SwitchFeedForward {
    /// The router (`softmax(x W_r + b_r)`).
    pub router: Router,
    /// The experts' stacked weights.
    pub experts: Experts,
    /// The shared experts (`model.shared_experts`), as one FFN every token passes through,
    /// added to the routed output; `None` in the Switch Transformer.
    pub shared: Option<DenseFeedForward>,
    /// Experts per token, capacity, drop policy, where the decision is made.
    #[module(skip)]
    pub routing: RoutingOptions,
    /// Capacity factor outside training (0 = the training one).
    pub eval_capacity_factor: f64,
    /// Scale each expert's output by its probability (else by p / stop_gradient(p) = 1).
    pub is_scale_prob: bool,
    /// What a dropped token contributes.
    #[module(skip)]
    pub dropped_tokens: DroppedTokens,
    /// Multiplicative router-input noise `U(1 - eps, 1 + eps)` in training (0 = off).
    pub jitter: f64,
    /// Dropout on the experts' hidden activations in training.
    pub expert_dropout: f64,
    /// With auxiliary-loss-free balancing: the biases the experts are chosen by
    /// ([`ExpertBias`]).
    #[module(skip)]
    pub expert_bias: Option<ExpertBias>,
    /// Training mode: jitter and expert dropout on, training capacity factor.
    pub training: bool,
}

impl SwitchFeedForward {
    /// Number of experts (the router's choices; with expert parallelism this rank holds
    /// [`local_experts`](Self::local_experts) of them).
    pub fn n_experts(&self) -> usize {
        self.router.switch.weight.dims()[1]
    }

    /// Number of experts this layer holds: all of them, or with expert parallelism this rank's
    /// share (experts `rank * local .. (rank + 1) * local`).
    pub fn local_experts(&self) -> usize {
        self.experts.n_experts()
    }

    /// Routing in the current mode (the capacity factor differs outside training if set).
    pub fn routing_options(&self) -> RoutingOptions {
        let mut r = self.routing;
        if !self.training && self.eval_capacity_factor > 0.0 {
            r.capacity_factor = self.eval_capacity_factor;
        }
        r
    }

    /// `x`: `[tokens, d_model]` (any token order; statistics follow it).
    pub fn forward(&self, x: Tensor<2>, rng: &mut RoutingRng) -> SwitchOutput {
        self.forward_routed(x, rng, None)
    }

    /// [`forward`](Self::forward) for one shard of a batch whose shards route together
    /// (`shard`: its seat in the [`crate::routing::RouteGroup`]); `None` routes `x` alone.
    pub(crate) fn forward_routed(
        &self,
        x: Tensor<2>,
        rng: &mut RoutingRng,
        shard: Option<Shard<'_>>,
    ) -> SwitchOutput {
        let shared_out = self.shared.as_ref().map(|s| s.forward(x.clone()));
        // Selective precision: the router, its softmax and z-loss run in f32.
        let x32 = super::precision::f32(x.clone());
        let router_in = if self.training && self.jitter > 0.0 {
            // The experts must see the un-noised x: the noise goes on a copy.
            let noise = uniform_tensor(
                rng,
                x.dims(),
                1.0 - self.jitter,
                1.0 + self.jitter,
                &x.device(),
            );
            x32 * noise
        } else {
            x32
        };
        let logits = self.router.logits(router_in);
        let route_prob = burn::tensor::activation::softmax(logits.clone(), 1);
        let opts = self.routing_options();
        let mut out = if let Some(shard) = shard {
            // Shards of one batch route together: probabilities through the host.
            let n_experts = self.n_experts();
            let scores = self.choice_scores_host(&route_prob, &logits);
            let r = shard.route(scores, |all| RoutePlan::new(all, n_experts, &opts, rng));
            let exchange = (self.local_experts() < n_experts).then(|| {
                Arc::new(shard.expert_exchange(&r.kept).expect(
                    "a layer that holds a share of the experts runs among the ranks of its job",
                ))
            });
            let mut out = self.dispatch_with(x, route_prob, &r.plan, rng, exchange);
            out.stats.group_counts = count_tensor(&r.group_counts, &out.out.device());
            out.stats.group_tokens = r.group_tokens;
            out
        } else if self.local_experts() < self.n_experts() {
            panic!(
                "this Switch layer holds {} of its {} experts: it runs among the ranks of its \
                 job (gather the experts to run it alone)",
                self.local_experts(),
                self.n_experts()
            );
        } else if opts.on_device(&x.device()) {
            let routes = DeviceRoutes::new(self.choice_scores(&route_prob, &logits), &opts, rng);
            let packing = Packing::Padded {
                slots: routes.slots,
                slot_token: routes.slot_token,
            };
            let assignment = Assignment {
                k: 1,
                packing,
                chosen: routes.routes.reshape([-1, 1]),
                token_source: routes.token_source.reshape([-1, 1]),
                fallback: true,
            };
            self.run(
                x,
                route_prob,
                assignment,
                routes.counts,
                routes.n_dropped,
                rng,
            )
        } else {
            let scores = self.choice_scores_host(&route_prob, &logits);
            let plan = RoutePlan::new(&scores, self.n_experts(), &opts, rng);
            self.dispatch(x, route_prob, &plan, rng)
        };
        out.stats.z_loss = z_loss(logits);
        if let Some(shared) = shared_out {
            out.out = out.out + shared;
        }
        out
    }

    /// What the experts are chosen by (`[tokens, n_experts]`, no gradient): the routing
    /// probabilities, or with auxiliary-loss-free balancing the logits plus each expert's bias
    /// (the gates stay the probabilities).
    fn choice_scores(&self, route_prob: &Tensor<2>, logits: &Tensor<2>) -> Tensor<2> {
        match &self.expert_bias {
            None => route_prob.clone(),
            Some(b) => {
                let bias = Tensor::<1>::from_data(
                    TensorData::new(b.values.clone(), [b.values.len()]),
                    &logits.device(),
                );
                logits.clone().detach() + bias.unsqueeze::<2>()
            }
        }
    }

    /// [`choice_scores`](Self::choice_scores) read to the host (one read, as the probabilities
    /// were read without a bias).
    fn choice_scores_host(&self, route_prob: &Tensor<2>, logits: &Tensor<2>) -> Vec<f32> {
        match &self.expert_bias {
            None => host_f32(route_prob.clone()),
            Some(b) => b.scores(host_f32(logits.clone().detach())),
        }
    }

    /// One step of auxiliary-loss-free balancing (nothing without it): each expert's bias moves
    /// towards an even load, from the fraction of the step's tokens whose first choice it was.
    pub fn update_expert_bias(&mut self, load: &[f64]) {
        if let Some(b) = &mut self.expert_bias {
            b.update(load);
        }
    }

    /// Whether this pass drops expert hidden units (training with `expert_dropout > 0`).
    fn expert_dropout_on(&self) -> bool {
        self.training && self.expert_dropout > 0.0
    }

    /// Runs the experts according to `plan` (from [`RoutePlan::new`] or a recorded one).
    pub fn dispatch(
        &self,
        x: Tensor<2>,
        route_prob: Tensor<2>,
        plan: &RoutePlan,
        rng: &mut RoutingRng,
    ) -> SwitchOutput {
        self.dispatch_with(x, route_prob, plan, rng, None)
    }

    /// [`dispatch`](Self::dispatch); with `exchange`, the kept rows travel to the ranks that
    /// hold their experts and back (expert parallelism: grouped rows on the CPU).
    fn dispatch_with(
        &self,
        x: Tensor<2>,
        route_prob: Tensor<2>,
        plan: &RoutePlan,
        rng: &mut RoutingRng,
        exchange: Option<Arc<ExpertExchange>>,
    ) -> SwitchOutput {
        let device = x.device();
        let [n_tokens, _] = x.dims();
        let k = plan.top_k;
        // The grouped rows go to the CPU kernels, which have no expert dropout.
        let grouped = exchange.is_some() || (!self.expert_dropout_on() && crate::cpu::applies(&x));
        let (packing, token_source) = if grouped {
            let (offsets, row_token, token_source) = grouped_rows(plan);
            let row_token = index_tensor(&row_token, &device);
            let packing = Packing::Grouped {
                offsets,
                row_token,
                exchange,
            };
            (packing, token_source)
        } else {
            let slot_token = index_tensor(&plan.slot_token, &device);
            let packing = Packing::Padded {
                slots: plan.slots,
                slot_token,
            };
            (packing, plan.token_source.clone())
        };
        let assignment = Assignment {
            k,
            packing,
            chosen: index_tensor(&plan.routes, &device).reshape([n_tokens, k]),
            token_source: index_tensor(&token_source, &device).reshape([n_tokens, k]),
            fallback: plan.n_dropped() > 0,
        };
        let counts = count_tensor(&plan.counts, &device);
        let dropped = count_tensor(&[plan.n_dropped()], &device);
        self.run(x, route_prob, assignment, counts, dropped, rng)
    }

    /// Gates, one gather into `[n_experts, slots, d]`, the experts, one select per choice back.
    fn run(
        &self,
        x: Tensor<2>,
        route_prob: Tensor<2>,
        a: Assignment,
        counts: Tensor<1>,
        n_dropped: Tensor<1>,
        rng: &mut RoutingRng,
    ) -> SwitchOutput {
        let device = x.device();
        let [n_tokens, d_model] = x.dims();
        let (n_experts, k) = (self.n_experts(), a.k);

        // Gates [tokens, k]: p of each chosen expert (renormalized over the k for k >= 2).
        let p = route_prob.clone().gather(1, a.chosen.clone());
        let route_prob_max = p
            .clone()
            .detach()
            .slice([0..n_tokens, 0..1])
            .reshape([n_tokens]);
        let gates = if k > 1 {
            p.clone() / p.sum_dim(1)
        } else if self.is_scale_prob {
            p
        } else {
            p.clone() / p.detach()
        };
        let gates = super::ops::cast_to(gates, x.dtype());

        let expert_out = match a.packing {
            Packing::Padded { slots, slot_token } => (slots > 0).then(|| {
                let packed = x
                    .clone()
                    .select(0, slot_token)
                    .reshape([n_experts, slots, d_model]);
                let dropout = self.expert_dropout_on().then(|| {
                    let [_, _, d_ff] = self.experts.w1.dims();
                    dropout_mask(rng, [n_experts, slots, d_ff], self.expert_dropout, &device)
                });
                self.experts
                    .forward(packed, dropout)
                    .reshape([n_experts * slots, d_model])
            }),
            Packing::Grouped {
                offsets,
                row_token,
                exchange: None,
            } => (offsets[n_experts] > 0).then(|| {
                let packed = x.clone().select(0, row_token);
                self.experts.forward_grouped(packed, &offsets)
            }),
            Packing::Grouped {
                row_token,
                exchange: Some(ex),
                ..
            } => {
                // Every rank exchanges, even with no rows: the others wait for its part.
                let packed = x.clone().select(0, row_token);
                let input = super::ops::to_experts(packed, &ex);
                let output = self.experts.forward_grouped(input, ex.offsets());
                Some(super::ops::from_experts(output, &ex))
            }
        };
        // Rows the assignments read: expert outputs, then the dropped-token fallback.
        let fallback = match self.dropped_tokens {
            DroppedTokens::PassThrough => x,
            DroppedTokens::Zero => x.zeros_like(),
        };
        let source = match expert_out {
            Some(e) if !a.fallback => e,
            Some(e) => Tensor::cat(vec![e, fallback], 0),
            None => fallback, // capacity 0: every assignment dropped
        };
        let mut out: Option<Tensor<2>> = None;
        for r in 0..k {
            let rows = a
                .token_source
                .clone()
                .slice([0..n_tokens, r..r + 1])
                .reshape([n_tokens]);
            let picked = source.clone().select(0, rows);
            let gate = gates.clone().slice([0..n_tokens, r..r + 1]);
            let term = picked * gate;
            out = Some(match out {
                Some(o) => o + term,
                None => term,
            });
        }
        SwitchOutput {
            out: out.expect("top_k >= 1"),
            stats: SwitchStats {
                group_counts: counts.clone(),
                group_tokens: n_tokens,
                counts,
                route_prob_sum: route_prob.clone().sum_dim(0).reshape([n_experts]),
                route_prob,
                z_loss: Tensor::zeros([1], &device),
                n_dropped,
                route_prob_max,
                routes: a.chosen.slice([0..n_tokens, 0..1]).reshape([n_tokens]),
            },
        }
    }
}

/// A routing decision as index tensors (from a [`RoutePlan`] or [`DeviceRoutes`]).
struct Assignment {
    /// Choices per token.
    k: usize,
    /// How the experts' input rows are laid out.
    packing: Packing,
    /// `[tokens, k]` expert of each assignment.
    chosen: Tensor<2, Int>,
    /// `[tokens, k]` row of `[expert outputs; fallback]` each assignment reads.
    token_source: Tensor<2, Int>,
    /// Whether any assignment reads a fallback row.
    fallback: bool,
}

/// The experts' input rows.
enum Packing {
    /// `[n_experts * slots]` token of each row: expert e owns rows `e * slots ..`, padded to
    /// the fullest expert (one batched matmul for all experts, any backend).
    Padded {
        slots: usize,
        slot_token: Tensor<1, Int>,
    },
    /// `[kept]` token of each row: expert e owns rows `offsets[e]..offsets[e + 1]`, no padding
    /// (the CPU kernels' grouped FFN).
    Grouped {
        offsets: Vec<usize>,
        row_token: Tensor<1, Int>,
        /// With expert parallelism: the rows' trip to their experts' ranks.
        exchange: Option<Arc<ExpertExchange>>,
    },
}

/// `plan` without padding: expert offsets (`n_experts + 1`), the token of each kept row, and
/// each assignment's row in `[kept rows; fallback rows]` (a dropped assignment reads the
/// fallback row of its token, `kept + token`).
fn grouped_rows(plan: &RoutePlan) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let (n_experts, slots) = (plan.n_experts, plan.slots);
    let padded = n_experts * slots;
    // A plan fills each expert's slots from 0, one kept assignment per slot.
    let kept = plan.kept_counts();
    let mut offsets = vec![0; n_experts + 1];
    for e in 0..n_experts {
        offsets[e + 1] = offsets[e] + kept[e];
    }
    let row_token = (0..n_experts)
        .flat_map(|e| {
            plan.slot_token[e * slots..e * slots + kept[e]]
                .iter()
                .copied()
        })
        .collect();
    let source = plan
        .token_source
        .iter()
        .map(|&src| {
            if src < padded {
                offsets[src / slots] + src % slots
            } else {
                offsets[n_experts] + (src - padded)
            }
        })
        .collect();
    (offsets, row_token, source)
}

/// Host counts as an f32 tensor (the form the statistics and the losses use).
fn count_tensor(counts: &[usize], device: &Device) -> Tensor<1> {
    let values: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
    Tensor::from_data(TensorData::new(values, [counts.len()]), device)
}

/// ST-MoE router z-loss: `mean_t (log sum_e exp(logits_te))^2`.
pub(crate) fn z_loss(logits: Tensor<2>) -> Tensor<1> {
    let [n, _] = logits.dims();
    let m = logits.clone().detach().max_dim(1);
    let lse = (logits - m.clone()).exp().sum_dim(1).log() + m;
    lse.reshape([n]).square().mean()
}
