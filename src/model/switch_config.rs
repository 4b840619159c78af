//! A Switch layer built the Burn way (`SwitchFeedForwardConfig::new(d_model, d_ff, n_experts)
//! .init(&device)`), to drop into any Burn model in place of its feed-forward network. It is a
//! [`Module`](burn::module::Module) like any other, so Burn's own optimizers train it; its
//! forward pass returns the routing statistics that the load-balancing loss
//! ([`crate::model::loss::load_balancing_loss`]) needs.
//!
//! Initialisation is PyTorch's `nn.Linear` default for the router and for every expert's two
//! layers: `W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, each expert drawn independently.
//!
//! This is the one definition of the layer's settings and their defaults (labml's experiment):
//! a model's configuration ([`crate::model::ModelConfig`]) takes its defaults from here and
//! builds its layers through `SwitchFeedForwardConfig::assemble`, so a layer built from code
//! routes exactly as one built from a config file.

use burn::config::Config;
use burn::module::Param;
use burn::nn::{Initializer, LinearConfig};
use burn::tensor::Device;

use super::expert::Experts;
use super::ffn::DenseFeedForward;
use super::switch::{DroppedTokens, SwitchFeedForward};
use crate::routing::{Balance, DropPolicy, ExpertBias, RoutePlace, Router, RoutingOptions};

/// Configuration of a [`SwitchFeedForward`] layer; [`init`](Self::init) builds one.
///
/// ```
/// use burn::tensor::{Device, Distribution, Tensor};
/// use rand::SeedableRng;
/// use switch_transformer::model::loss::load_balancing_loss;
/// use switch_transformer::{RoutingRng, SwitchFeedForwardConfig};
///
/// let device = Device::default().autodiff();
/// // 4 experts of width 32 on 16-wide tokens; capacity = floor(1.25 * 64 / 4) = 20 per expert.
/// let layer = SwitchFeedForwardConfig::new(16, 32, 4)
///     .with_capacity_factor(1.25)
///     .init(&device);
/// let x = Tensor::<2>::random([64, 16], Distribution::Normal(0.0, 1.0), &device);
/// let switch = layer.forward(x, &mut RoutingRng::seed_from_u64(0));
/// assert_eq!(switch.out.dims(), [64, 16]);
///
/// // Every token has a first choice; an expert keeps at most 20 of them.
/// let host = switch.stats.host();
/// assert_eq!(host.counts.iter().sum::<f32>(), 64.0);
/// let over: f32 = host.counts.iter().map(|&c| (c - 20.0).max(0.0)).sum();
/// assert_eq!(host.n_dropped as f32, over);
///
/// // The load-balancing loss trains the router: its gradient reaches the router's weight.
/// let lb = load_balancing_loss(std::slice::from_ref(&switch.stats), &device);
/// let grads = (switch.out.mean() + lb).backward();
/// assert!(layer.router.switch.weight.val().grad(&grads).is_some());
/// ```
#[derive(Config, Debug)]
pub struct SwitchFeedForwardConfig {
    /// Width of the tokens in and out.
    pub d_model: usize,
    /// Hidden width of each expert's FFN.
    pub d_ff: usize,
    /// Number of experts.
    pub n_experts: usize,
    /// capacity = floor(capacity_factor * tokens / n_experts) tokens per expert.
    #[config(default = 1.2)]
    pub capacity_factor: f64,
    /// Capacity factor outside training (0 = the training one).
    #[config(default = 0.0)]
    pub eval_capacity_factor: f64,
    /// Drop the tokens routed beyond an expert's capacity (off: dropless).
    #[config(default = true)]
    pub drop_tokens: bool,
    /// Experts per token: 1 = Switch; k >= 2 = top-k MoE.
    #[config(default = 1)]
    pub top_k: usize,
    /// Which tokens an over-capacity expert drops.
    #[config(default = "DropPolicy::Random")]
    pub drop_policy: DropPolicy,
    /// Where routing is decided: auto (host on the CPU, device on GPUs), host or device.
    #[config(default = "RoutePlace::Auto")]
    pub route_on: RoutePlace,
    /// What a dropped token contributes: its input scaled by p (labml) or nothing (paper).
    #[config(default = "DroppedTokens::PassThrough")]
    pub dropped_tokens: DroppedTokens,
    /// Scale each expert's output by its router probability (what trains the router).
    #[config(default = true)]
    pub is_scale_prob: bool,
    /// Multiplicative router-input noise U(1 - eps, 1 + eps) in training (paper: 0.01).
    #[config(default = 0.0)]
    pub router_jitter: f64,
    /// Dropout on the experts' hidden units in training.
    #[config(default = 0.0)]
    pub expert_dropout: f64,
    /// How the load is balanced: the auxiliary loss (the paper), a bias on the choice
    /// (auxiliary-loss-free, DeepSeek-V3), or neither.
    #[config(default = "Balance::Aux")]
    pub balance: Balance,
    /// With `balance = bias`: how far a step moves each expert's bias.
    #[config(default = "crate::routing::balance::DEFAULT_BIAS_RATE")]
    pub bias_rate: f64,
    /// Always-on experts, every token through them, added to the routed output (0 = none).
    #[config(default = 0)]
    pub shared_experts: usize,
    /// Hidden width of each shared expert (0 = `d_ff`).
    #[config(default = 0)]
    pub shared_d_ff: usize,
}

impl SwitchFeedForwardConfig {
    /// A new Switch layer on `device`, in training mode, with PyTorch's `nn.Linear`
    /// initialisation (see the module comment).
    pub fn init(&self, device: &Device) -> SwitchFeedForward {
        let (d, f, e) = (self.d_model, self.d_ff, self.n_experts);
        // U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as PyTorch's nn.Linear and Burn's LinearConfig.
        let uniform = |fan_in: usize| Initializer::Uniform {
            min: -1.0 / (fan_in as f64).sqrt(),
            max: 1.0 / (fan_in as f64).sqrt(),
        };
        let init3 =
            |shape: [usize; 3], fan_in: usize| -> Param<_> { uniform(fan_in).init(shape, device) };
        let init2 =
            |shape: [usize; 2], fan_in: usize| -> Param<_> { uniform(fan_in).init(shape, device) };
        let router = Router {
            switch: LinearConfig::new(d, e).init(device),
        };
        let experts = Experts {
            w1: init3([e, d, f], d),
            b1: init2([e, f], d),
            w2: init3([e, f, d], f),
            b2: init2([e, d], f),
        };
        let shared = (self.shared_experts > 0).then(|| {
            let width = self.shared_width();
            DenseFeedForward {
                layer1: LinearConfig::new(d, width).init(device),
                layer2: LinearConfig::new(width, d).init(device),
            }
        });
        self.assemble(router, experts, shared)
    }

    /// Hidden width of the one FFN that holds the shared experts: `shared_experts` times each
    /// one's width (`shared_d_ff`, or `d_ff` when that is 0).
    pub(crate) fn shared_width(&self) -> usize {
        let each = if self.shared_d_ff == 0 {
            self.d_ff
        } else {
            self.shared_d_ff
        };
        self.shared_experts * each
    }

    /// How this layer assigns tokens to experts.
    pub(crate) fn routing(&self) -> RoutingOptions {
        RoutingOptions {
            top_k: self.top_k,
            capacity_factor: self.capacity_factor,
            drop_tokens: self.drop_tokens,
            drop_policy: self.drop_policy,
            place: self.route_on,
        }
    }

    /// The layer of these settings around `router`, `experts` and the shared experts' FFN
    /// (freshly drawn, or loaded), in training mode.
    pub(crate) fn assemble(
        &self,
        router: Router,
        experts: Experts,
        shared: Option<DenseFeedForward>,
    ) -> SwitchFeedForward {
        SwitchFeedForward {
            router,
            experts,
            shared,
            routing: self.routing(),
            eval_capacity_factor: self.eval_capacity_factor,
            is_scale_prob: self.is_scale_prob,
            dropped_tokens: self.dropped_tokens,
            jitter: self.router_jitter,
            expert_dropout: self.expert_dropout,
            expert_bias: (self.balance == Balance::Bias)
                .then(|| ExpertBias::new(self.n_experts, self.bias_rate)),
            training: true,
        }
    }
}
