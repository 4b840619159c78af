//! Training losses (labml `Configs.step`):
//! `loss = cross_entropy + lb_coef * n_experts * sum_layers sum_i f_i * P_i`
//! `       + z_coef * sum_layers mean_t logsumexp(router logits_t)^2` (ST-MoE; 0 in labml).
//! With `model.balance_scope = sequence` the load-balancing term is taken per sequence and
//! averaged ([`crate::routing::BalanceScope`]).

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor};

use super::switch::SwitchStats;
use crate::routing::BalanceScope;

/// Mean cross-entropy of `logits` `[tokens, n_vocab]` against `targets` `[tokens]`.
pub(crate) fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let [n, _] = logits.dims();
    let logp = log_softmax(super::precision::f32(logits), 1);
    logp.gather(1, targets.reshape([n, 1])).mean().neg()
}

/// Switch load-balancing loss summed over layers: `n_experts * sum_l sum_i f_li * P_li`, with
/// `f` the routed fraction (from counts before dropping, over the tokens routed together; a
/// constant) and `P` the mean routing probability over this pass's tokens (carries the
/// gradient). Equals the number of layers at perfect balance.
pub fn load_balancing_loss(stats: &[SwitchStats], device: &Device) -> Tensor<1> {
    sum_over_layers(stats, device, |s| {
        let n_experts = s.counts.dims()[0] as f64;
        let tokens = s.n_tokens() as f64;
        // n_experts * f_i / tokens folded into one constant vector: sum_i c_i * P_sum_i.
        let coef = s
            .group_counts
            .clone()
            .div_scalar(s.group_tokens as f64)
            .mul_scalar(n_experts)
            .div_scalar(tokens);
        (s.route_prob_sum.clone() * coef).sum()
    })
}

/// The sequence-level load-balancing loss summed over layers: for each layer
/// `(1/S) sum_s n_experts * sum_i f_si * P_si`, with `f_si` the fraction of sequence `s`'s
/// `seq_len` tokens whose first choice is expert `i` (a constant) and `P_si` their mean
/// probability for it (carries the gradient). Tokens are batch-major (token `s * seq_len + t`).
/// Equals the number of layers when every sequence is evenly spread.
pub fn sequence_balancing_loss(
    stats: &[SwitchStats],
    seq_len: usize,
    device: &Device,
) -> Tensor<1> {
    sum_over_layers(stats, device, |s| {
        let [tokens, n_experts] = s.route_prob.dims();
        let n_seq = tokens / seq_len.max(1);
        assert_eq!(n_seq * seq_len, tokens, "tokens are whole sequences");
        let per_sequence = |t: Tensor<2>| {
            t.reshape([n_seq, seq_len, n_experts])
                .sum_dim(1)
                .reshape([n_seq, n_experts])
        };
        let chosen = s.routes.clone().one_hot::<2>(n_experts).float().detach();
        let f = per_sequence(chosen);
        let p = per_sequence(s.route_prob.clone());
        // n_experts * sum_i (count_si / T) * (P_sum_si / T), averaged over the S sequences.
        let scale = n_experts as f64 / (seq_len * seq_len * n_seq) as f64;
        (f * p).sum().mul_scalar(scale)
    })
}

/// The load-balancing loss over `scope`'s tokens (sequences of `seq_len`).
pub fn balancing_loss(
    stats: &[SwitchStats],
    scope: BalanceScope,
    seq_len: usize,
    device: &Device,
) -> Tensor<1> {
    match scope {
        BalanceScope::Batch => load_balancing_loss(stats, device),
        BalanceScope::Sequence => sequence_balancing_loss(stats, seq_len, device),
    }
}

/// Router z-loss summed over layers.
pub(crate) fn router_z_loss(stats: &[SwitchStats], device: &Device) -> Tensor<1> {
    sum_over_layers(stats, device, |s| s.z_loss.clone())
}

/// `layer(s)` summed over the Switch layers in order (`[1]`; 0 without any).
fn sum_over_layers(
    stats: &[SwitchStats],
    device: &Device,
    layer: impl Fn(&SwitchStats) -> Tensor<1>,
) -> Tensor<1> {
    stats
        .iter()
        .map(layer)
        .reduce(|a, b| a + b)
        .unwrap_or_else(|| Tensor::zeros([1], device))
}

/// The losses of a training step.
pub struct Losses {
    /// Cross-entropy, `[1]`.
    pub ce: Tensor<1>,
    /// Load-balancing loss summed over layers, `[1]`.
    pub lb: Tensor<1>,
    /// Router z-loss summed over layers, `[1]`.
    pub z: Tensor<1>,
    /// `ce + lb_coef * lb + z_coef * z`: the one tensor to call `backward` on.
    pub total: Tensor<1>,
}

impl Losses {
    /// `logits` `[batch, seq, n_vocab]`, `targets` `[batch, seq]`; the load-balancing loss
    /// over `scope`.
    pub fn new(
        logits: Tensor<3>,
        targets: Tensor<2, Int>,
        stats: &[SwitchStats],
        lb_coef: f64,
        z_coef: f64,
        scope: BalanceScope,
    ) -> Self {
        let [b, s, v] = logits.dims();
        let device = logits.device();
        let ce = cross_entropy(logits.reshape([b * s, v]), targets.reshape([b * s]));
        let lb = balancing_loss(stats, scope, s, &device);
        let z = router_z_loss(stats, &device);
        let mut total = ce.clone() + lb.clone() * lb_coef;
        if z_coef > 0.0 {
            total = total + z.clone() * z_coef;
        }
        Self { ce, lb, z, total }
    }
}
