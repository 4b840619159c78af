//! The shape and routing of a Switch Transformer. Defaults are labml's Tiny Shakespeare
//! experiment (`labml_nn.transformers.switch.experiment`). A configuration becomes a model
//! with [`ModelConfig::init`] (in [`crate::interop::init`], which draws labml's
//! initialisation as a PyTorch state dict).

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::precision::Precision;
use super::switch::DroppedTokens;
use super::switch_config::SwitchFeedForwardConfig;
use crate::routing::{Balance, BalanceScope, DropPolicy, RoutePlace, RoutingOptions};

/// Shape and routing of a Switch Transformer. The default is labml's experiment (6 blocks of
/// width 128, 4 experts of width 256); [`init`](Self::init) builds the model.
///
/// ```
/// use burn::tensor::{Device, Int, Tensor, TensorData};
/// use rand::SeedableRng;
/// use switch_transformer::{ModelConfig, RoutingRng};
///
/// let config = ModelConfig { n_vocab: 65, n_layers: 2, ..ModelConfig::default() };
/// let model = config.init(0, &Device::default())?;
/// // 2 sequences of 8 characters in, next-character logits out.
/// let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64; 16], [2, 8]), &Device::default());
/// let out = model.forward(ids, &mut RoutingRng::seed_from_u64(0));
/// assert_eq!(out.logits.dims(), [2, 8, 65]);
/// assert_eq!(out.stats.len(), 2); // routing statistics of each Switch layer
/// # anyhow::Ok(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Vocabulary size (the character set of the data for the reference experiment).
    pub n_vocab: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Attention heads; d_model must be divisible by it (d_k = d_model / heads).
    pub heads: usize,
    /// Hidden width of each expert FFN (and of the dense FFN of dense blocks).
    pub d_ff: usize,
    /// Hidden width of each expert alone, when it differs from `d_ff` (0 = `d_ff`): fine-grained
    /// experts, e.g. 16 experts of width 64 with top-4 against 4 of width 256 with top-1 at
    /// equal FLOPs per token.
    pub expert_d_ff: usize,
    /// Number of pre-LayerNorm blocks.
    pub n_layers: usize,
    /// Experts per Switch layer.
    pub n_experts: usize,
    /// capacity = floor(capacity_factor * tokens / n_experts).
    pub capacity_factor: f64,
    /// Drop the tokens routed beyond an expert's capacity.
    pub drop_tokens: bool,
    /// Scale the expert output by the router probability (else by p / stop_gradient(p) = 1).
    pub is_scale_prob: bool,
    /// Experts per token: 1 = Switch; k >= 2 = top-k MoE (gates renormalized over the k,
    /// capacity counted per assignment).
    pub top_k: usize,
    /// Which tokens an over-capacity expert drops: random (labml), position, confidence.
    pub drop_policy: DropPolicy,
    /// Where routing is decided: auto (host on the CPU, device on GPUs), host, device (top-1
    /// with dropping, random or position policy; otherwise the host).
    pub route_on: RoutePlace,
    /// What a dropped token contributes: pass_through (labml) or zero (paper).
    pub dropped_tokens: DroppedTokens,
    /// Capacity factor outside training; 0 = the training one (paper: 2.0 at evaluation).
    pub eval_capacity_factor: f64,
    /// Multiplicative jitter on the router input in training, U(1 - eps, 1 + eps) (paper: 0.01).
    pub router_jitter: f64,
    /// Dropout on the experts' hidden activations in training (paper: 0.4 when fine-tuning).
    pub expert_dropout: f64,
    /// How the load is balanced: aux (the auxiliary loss, weighted by train.lb_coef; the paper),
    /// bias (a per-expert bias on the choice, no auxiliary loss; DeepSeek-V3), none.
    pub balance: Balance,
    /// With balance = bias: how far each step moves an expert's bias (DeepSeek-V3: 0.001).
    pub bias_rate: f64,
    /// Over which tokens the load-balancing loss takes its fractions: the batch (the paper) or
    /// each sequence, averaged.
    pub balance_scope: BalanceScope,
    /// Always-on experts in each Switch layer, every token through them, their output added to
    /// the routed one (DeepSeek-MoE, Qwen-MoE); 0 = none (the Switch Transformer).
    pub shared_experts: usize,
    /// Hidden width of each shared expert (0 = the routed experts' width).
    pub shared_d_ff: usize,
    /// Dropout on each sub-layer's output before the residual add, in training (paper: 0.1).
    pub dropout: f64,
    /// A Switch layer every k-th block, dense FFN blocks between (1 = all Switch, labml;
    /// paper: 2); 0 = the dense baseline (no Switch layer).
    pub switch_every: usize,
    /// Learned positional embeddings (labml has none).
    pub pos_embedding: bool,
    /// Positions of the learned positional embedding (longest sequence).
    pub max_seq_len: usize,
    /// Initialisation: labml (PyTorch defaults, experts and layers identical copies),
    /// independent (PyTorch defaults, all drawn independently), truncated_normal (paper).
    pub init: InitScheme,
    /// truncated_normal: sigma = sqrt(init_scale / fan_in) (paper: 0.1).
    pub init_scale: f64,
    /// Compute type: f32, bf16 or f16; the router and losses stay f32 (selective precision).
    pub precision: Precision,
}

/// How parameters start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitScheme {
    /// PyTorch defaults, experts and layers identical copies (labml's `copy.deepcopy`).
    #[default]
    Labml,
    /// PyTorch defaults, every tensor drawn separately.
    Independent,
    /// The paper's truncated normal, sigma = sqrt(init_scale / fan_in).
    TruncatedNormal,
}

impl Default for ModelConfig {
    /// labml's experiment; the Switch layer's settings are [`SwitchFeedForwardConfig`]'s
    /// defaults (defined there only).
    fn default() -> Self {
        let (d_model, d_ff, n_experts) = (128, 256, 4);
        let switch = SwitchFeedForwardConfig::new(d_model, d_ff, n_experts);
        Self {
            n_vocab: 65,
            d_model,
            heads: 4,
            d_ff,
            expert_d_ff: 0,
            n_layers: 6,
            n_experts,
            capacity_factor: switch.capacity_factor,
            drop_tokens: switch.drop_tokens,
            is_scale_prob: switch.is_scale_prob,
            top_k: switch.top_k,
            drop_policy: switch.drop_policy,
            route_on: switch.route_on,
            dropped_tokens: switch.dropped_tokens,
            eval_capacity_factor: switch.eval_capacity_factor,
            router_jitter: switch.router_jitter,
            expert_dropout: switch.expert_dropout,
            balance: switch.balance,
            bias_rate: switch.bias_rate,
            balance_scope: BalanceScope::Batch,
            shared_experts: switch.shared_experts,
            shared_d_ff: 0,
            dropout: 0.0,
            switch_every: 1,
            pos_embedding: false,
            max_seq_len: 64,
            init: InitScheme::Labml,
            init_scale: 0.1,
            precision: Precision::F32,
        }
    }
}

impl ModelConfig {
    /// Checks every field; the error says which value is wrong and what is allowed.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("n_vocab", self.n_vocab),
            ("d_model", self.d_model),
            ("heads", self.heads),
            ("d_ff", self.d_ff),
            ("n_layers", self.n_layers),
            ("n_experts", self.n_experts),
        ];
        if !(self.bias_rate.is_finite() && self.bias_rate >= 0.0) {
            bail!(
                "model.bias_rate must be a finite number >= 0 (got {}): how far a step moves an \
                 expert's bias with model.balance = bias",
                self.bias_rate
            );
        }
        for (name, v) in positive {
            if v == 0 {
                bail!("model.{name} must be at least 1 (got 0)");
            }
        }
        if !self.d_model.is_multiple_of(self.heads) {
            bail!(
                "model.d_model ({}) must be divisible by model.heads ({})",
                self.d_model,
                self.heads
            );
        }
        if !(self.capacity_factor.is_finite() && self.capacity_factor > 0.0) {
            bail!(
                "model.capacity_factor must be a positive number (got {})",
                self.capacity_factor
            );
        }
        if !(self.eval_capacity_factor.is_finite() && self.eval_capacity_factor >= 0.0) {
            bail!(
                "model.eval_capacity_factor must be zero (= capacity_factor) or positive (got {})",
                self.eval_capacity_factor
            );
        }
        if self.top_k == 0 || self.top_k > self.n_experts {
            bail!(
                "model.top_k must be between 1 and model.n_experts = {} (got {})",
                self.n_experts,
                self.top_k
            );
        }
        for (name, v) in [
            ("router_jitter", self.router_jitter),
            ("expert_dropout", self.expert_dropout),
            ("dropout", self.dropout),
        ] {
            if !(0.0..1.0).contains(&v) {
                bail!("model.{name} must be in [0, 1) (got {v})");
            }
        }
        if self.route_on == RoutePlace::Device && !self.routing().device_capable() {
            bail!(
                "model.route_on = device needs model.top_k = 1, model.drop_tokens = true and \
                 model.drop_policy random or position; use auto or host"
            );
        }
        if self.pos_embedding && self.max_seq_len == 0 {
            bail!("model.max_seq_len must be at least 1 with model.pos_embedding");
        }
        if !(self.init_scale.is_finite() && self.init_scale > 0.0) {
            bail!(
                "model.init_scale must be a positive number (got {})",
                self.init_scale
            );
        }
        Ok(())
    }

    /// Whether block `l` has a Switch layer (else a dense FFN).
    pub(crate) fn is_switch_layer(&self, l: usize) -> bool {
        // Every k-th block counting from the last: with k = 2 blocks 1, 3, 5 (of 0..6).
        self.switch_every > 0 && (l + 1).is_multiple_of(self.switch_every)
    }

    /// Number of blocks with a Switch layer.
    pub fn n_switch_layers(&self) -> usize {
        (0..self.n_layers)
            .filter(|&l| self.is_switch_layer(l))
            .count()
    }

    /// The settings of this model's Switch layers (every one alike).
    pub fn switch_config(&self) -> SwitchFeedForwardConfig {
        SwitchFeedForwardConfig {
            d_model: self.d_model,
            d_ff: self.expert_width(),
            n_experts: self.n_experts,
            capacity_factor: self.capacity_factor,
            eval_capacity_factor: self.eval_capacity_factor,
            drop_tokens: self.drop_tokens,
            top_k: self.top_k,
            drop_policy: self.drop_policy,
            route_on: self.route_on,
            dropped_tokens: self.dropped_tokens,
            is_scale_prob: self.is_scale_prob,
            router_jitter: self.router_jitter,
            expert_dropout: self.expert_dropout,
            balance: self.balance,
            bias_rate: self.bias_rate,
            shared_experts: self.shared_experts,
            shared_d_ff: self.shared_d_ff,
        }
    }

    /// The weight of the auxiliary load-balancing loss in the training loss: `lb_coef` when
    /// the model balances with it (`balance = aux`), else 0 (the loss is still reported).
    pub(crate) fn aux_loss_weight(&self, lb_coef: f64) -> f64 {
        if self.balance == Balance::Aux {
            lb_coef
        } else {
            0.0
        }
    }

    /// Routing of the Switch layers.
    pub(crate) fn routing(&self) -> RoutingOptions {
        self.switch_config().routing()
    }

    /// Hidden width of each expert: `expert_d_ff`, or `d_ff` when that is 0.
    pub fn expert_width(&self) -> usize {
        if self.expert_d_ff == 0 {
            self.d_ff
        } else {
            self.expert_d_ff
        }
    }

    /// Forward FLOPs per token of the matrix products at context `seq_len` (a multiply-add
    /// counts 2): per block the attention projections `8 d^2`, its scores and weighted sum
    /// `4 s d`, and a dense FFN `4 d f` or a Switch layer's router `2 d E` plus `top_k` experts
    /// of `4 d f_e` each and the shared experts' `4 d f_s` (`f_s` their summed width); then the output layer `2 d V`. Equal for models of equal compute per
    /// token, whatever their expert count.
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        let (d, v, s) = (self.d_model as f64, self.n_vocab as f64, seq_len as f64);
        let attention = 8.0 * d * d + 4.0 * s * d;
        let dense = 4.0 * d * self.d_ff as f64;
        let k = self.top_k.clamp(1, self.n_experts) as f64;
        let shared = 4.0 * d * self.switch_config().shared_width() as f64;
        let switch =
            2.0 * d * self.n_experts as f64 + k * 4.0 * d * self.expert_width() as f64 + shared;
        let n_switch = self.n_switch_layers() as f64;
        self.n_layers as f64 * attention
            + n_switch * switch
            + (self.n_layers as f64 - n_switch) * dense
            + 2.0 * d * v
    }

    /// Parameter count, as PyTorch's `sum(p.numel())` would report it.
    pub fn num_params(&self) -> usize {
        let (d, f, e, v) = (self.d_model, self.d_ff, self.n_experts, self.n_vocab);
        let attn = 4 * (d * d + d);
        let norms = 4 * d;
        let router = d * e + e;
        // An FFN of hidden width w (its two layers with biases); none for w = 0.
        let ffn_of = |w: usize| if w > 0 { d * w + w + w * d + d } else { 0 };
        let ffn = ffn_of(f);
        let expert = ffn_of(self.expert_width());
        let shared = ffn_of(self.switch_config().shared_width());
        let switch = self.n_switch_layers();
        let pos = if self.pos_embedding {
            self.max_seq_len * d
        } else {
            0
        };
        v * d
            + pos
            + (d * v + v)
            + 2 * d
            + self.n_layers * (attn + norms)
            + switch * (router + e * expert + shared)
            + (self.n_layers - switch) * ffn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_parameter_count() {
        // labml's experiment reports 2,001,497 parameters.
        assert_eq!(ModelConfig::default().num_params(), 2_001_497);
        // Per block: 8 d^2 + 4 s d = 163,840 (attention), 2 d E + 4 d f = 132,096 (router and
        // one expert); 6 blocks and the output layer's 2 d V = 16,640.
        assert_eq!(ModelConfig::default().flops_per_token(64), 1_792_256.0);
    }

    #[test]
    fn invalid_values_are_errors() {
        let bad = [
            ModelConfig {
                heads: 3,
                ..Default::default()
            },
            ModelConfig {
                n_experts: 0,
                ..Default::default()
            },
            ModelConfig {
                capacity_factor: 0.0,
                ..Default::default()
            },
            ModelConfig {
                capacity_factor: f64::NAN,
                ..Default::default()
            },
        ];
        for c in bad {
            let err = c.validate().unwrap_err().to_string();
            assert!(err.starts_with("model."), "{err}");
        }
        ModelConfig::default().validate().unwrap();
    }
}
