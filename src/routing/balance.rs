//! How the experts' load is kept even (`model.balance`): the Switch paper's auxiliary loss, or
//! load balancing without one (DeepSeek-V3; Wang et al. 2024, "Auxiliary-Loss-Free Load
//! Balancing Strategy for Mixture-of-Experts"), or nothing.
//!
//! ```text
//! aux    loss += lb_coef * N * sum_i f_i * P_i                  (the paper; labml)
//! bias   choice_t = top-k of (logits_t + b)     gate_t = softmax(logits_t)[choice_t]
//!        after each step, per expert: b_e += rate * sign(mean_load - load_e)
//! none   neither
//! ```
//! The bias moves the choice only: the gate values, and so the gradients, are those of the
//! plain router. `load_e` is the fraction of the step's tokens whose first choice is expert
//! `e`, over every replica and rank (the step's routing statistics), so every copy of the model
//! takes the same update and holds the same biases.
//!
//! The auxiliary loss's scope (`model.balance_scope`): `batch` takes f and P over all the
//! tokens routed together (the paper); `sequence` takes them over each sequence and averages
//! the sequences' losses (DeepSeek-V3's complementary sequence-wise loss), which also asks each
//! sequence on its own to spread its tokens:
//!
//! ```text
//! batch     N * sum_i f_i * P_i                      f, P over the batch
//! sequence  (1/S) sum_s N * sum_i f_si * P_si       f_s, P_s over sequence s's T tokens
//! ```

use serde::{Deserialize, Serialize};

/// How the experts' load is balanced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// The auxiliary load-balancing loss, weighted by `train.lb_coef` (the paper, labml).
    #[default]
    Aux,
    /// A per-expert bias on the router logits for the choice only, updated after each step
    /// (no auxiliary loss).
    Bias,
    /// Neither.
    None,
}

/// Over which tokens the load-balancing loss takes its fractions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceScope {
    /// All the tokens routed together (the paper, labml).
    #[default]
    Batch,
    /// Each sequence alone, the sequences' losses averaged.
    Sequence,
}

/// DeepSeek-V3's bias update speed (its paper's gamma, 0.001).
pub(crate) const DEFAULT_BIAS_RATE: f64 = 0.001;

/// A Switch layer's expert biases and their update speed.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertBias {
    /// `[n_experts]`, added to the router logits for the choice of experts.
    pub values: Vec<f32>,
    /// Each step moves a bias by this much, towards an even load.
    pub rate: f64,
}

impl ExpertBias {
    /// Zero biases for `n_experts`.
    pub(crate) fn new(n_experts: usize, rate: f64) -> Self {
        Self {
            values: vec![0.0; n_experts],
            rate,
        }
    }

    /// One step's update from the fraction of tokens whose first choice was each expert
    /// (`load`, summing to 1): `b_e += rate * sign(1 / n - load_e)`; an expert at exactly the
    /// mean load keeps its bias.
    pub(crate) fn update(&mut self, load: &[f64]) {
        let mean = 1.0 / self.values.len().max(1) as f64;
        for (b, &l) in self.values.iter_mut().zip(load) {
            let sign = if l < mean {
                1.0
            } else if l > mean {
                -1.0
            } else {
                0.0
            };
            *b = (*b as f64 + self.rate * sign) as f32;
        }
    }

    /// The scores the experts are chosen by: `logits` (`[tokens, n_experts]`, row-major) plus
    /// the biases.
    pub(crate) fn scores(&self, mut logits: Vec<f32>) -> Vec<f32> {
        let n = self.values.len();
        for row in logits.chunks_exact_mut(n) {
            for (s, b) in row.iter_mut().zip(&self.values) {
                *s += b;
            }
        }
        logits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn biases_move_towards_an_even_load_and_ties_stay() {
        let mut b = ExpertBias::new(4, 0.1);
        b.update(&[0.5, 0.25, 0.25, 0.0]);
        assert_eq!(b.values, [-0.1, 0.0, 0.0, 0.1]);
        b.update(&[0.4, 0.3, 0.2, 0.1]);
        let want = [-0.2f32, -0.1, 0.1, 0.2];
        for (got, want) in b.values.iter().zip(want) {
            assert!((got - want).abs() < 1e-7, "{:?}", b.values);
        }
    }

    #[test]
    fn scores_add_the_bias_to_every_token() {
        let b = ExpertBias {
            values: vec![1.0, -1.0],
            rate: 0.0,
        };
        assert_eq!(b.scores(vec![0.5, 0.5, 2.0, 0.0]), [1.5, -0.5, 3.0, -1.0]);
    }
}
