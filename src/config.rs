//! Model configuration. Defaults are labml's Tiny Shakespeare experiment
//! (`labml_nn.transformers.switch.experiment`).

use anyhow::{Result, bail};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::model::SwitchTransformer;

/// Shape and routing of a Switch Transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Vocabulary size (the character set of the data for the reference experiment).
    pub n_vocab: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Attention heads; d_model must be divisible by it (d_k = d_model / heads).
    pub heads: usize,
    /// Hidden width of each expert FFN.
    pub d_ff: usize,
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
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            n_vocab: 65,
            d_model: 128,
            heads: 4,
            d_ff: 256,
            n_layers: 6,
            n_experts: 4,
            capacity_factor: 1.2,
            drop_tokens: true,
            is_scale_prob: true,
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
        Ok(())
    }

    pub fn d_k(&self) -> usize {
        self.d_model / self.heads
    }

    /// Parameter count, as PyTorch's `sum(p.numel())` would report it.
    pub fn num_params(&self) -> usize {
        let (d, f, e, v) = (self.d_model, self.d_ff, self.n_experts, self.n_vocab);
        let attn = 4 * (d * d + d);
        let norms = 4 * d;
        let router = d * e + e;
        let experts = e * (d * f + f + f * d + d);
        v * d + (d * v + v) + 2 * d + self.n_layers * (attn + norms + router + experts)
    }

    /// Builds a model with labml's initialisation, seeded.
    pub fn init(&self, seed: u64, device: &Device) -> Result<SwitchTransformer> {
        self.validate()?;
        Ok(crate::init::labml_init(self, seed, device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_parameter_count() {
        // labml's experiment reports 2,001,497 parameters.
        assert_eq!(ModelConfig::default().num_params(), 2_001_497);
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
