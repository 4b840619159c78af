//! The lines of a run's `metrics.jsonl`, typed: the trainer writes them, the report and the
//! comparison read them, so a renamed field is a compile error rather than a silently empty
//! chart. A line is one JSON object: a training line (it has `train_loss`) every
//! `train.log_interval` steps, a validation line (it has `valid_loss`) every
//! `train.eval_interval` steps.

use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::eval::LayerStats;

/// Training metrics at one step (averaged over the interval for the throughput).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainLine {
    /// Optimizer steps done.
    pub step: u64,
    /// Epoch of the step's batch.
    pub epoch: u64,
    /// `ce_loss + lb_coef * lb_loss + z_coef * z_loss`.
    pub train_loss: f64,
    /// Cross-entropy.
    pub ce_loss: f64,
    /// Load-balancing loss, summed over layers.
    pub lb_loss: f64,
    /// Router z-loss, summed over layers (absent in the first builds' runs: 0).
    #[serde(default)]
    pub z_loss: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Training tokens per second over the interval since the previous line.
    pub tokens_per_s: f64,
    /// Fraction of token-layer routings dropped, mean over layers.
    pub dropped_frac: f64,
    /// Routing per Switch layer.
    pub layers: Vec<LayerStats>,
    /// With auxiliary-loss-free balancing (`model.balance = bias`): each Switch layer's expert
    /// biases after the step (absent otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expert_bias: Vec<Vec<f32>>,
}

/// Validation metrics at one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidLine {
    /// Optimizer steps done.
    pub step: u64,
    /// Cross-entropy over the validation batches.
    pub valid_loss: f64,
    /// Next-token accuracy.
    pub valid_accuracy: f64,
    /// Load-balancing loss, summed over layers.
    pub lb_loss: f64,
    /// Fraction of token-layer routings dropped.
    pub dropped_frac: f64,
    /// Routing per Switch layer.
    pub layers: Vec<LayerStats>,
    /// A greedy sample from the configured prompt.
    pub sample: String,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq)]
pub enum MetricsLine {
    /// A training line.
    Train(TrainLine),
    /// A validation line.
    Valid(ValidLine),
}

impl MetricsLine {
    /// The step the line describes.
    pub(crate) fn step(&self) -> u64 {
        match self {
            Self::Train(t) => t.step,
            Self::Valid(v) => v.step,
        }
    }

    /// The line as one line of JSON (no newline).
    pub(crate) fn to_json(&self) -> String {
        let json = match self {
            Self::Train(t) => serde_json::to_string(t),
            Self::Valid(v) => serde_json::to_string(v),
        };
        json.expect("metrics serialise")
    }

    /// Parses one line; the error says what is wrong with it (the caller adds where).
    pub(crate) fn parse(line: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(line).map_err(|e| {
            anyhow!("not a complete JSON object ({e}); the file is malformed or truncated")
        })?;
        if v.get("step").and_then(Value::as_u64).is_none() {
            bail!("no integer \"step\"");
        }
        if v.get("valid_loss").is_some() {
            let line = serde_json::from_value(v).map_err(|e| anyhow!("validation line: {e}"))?;
            Ok(Self::Valid(line))
        } else if v.get("train_loss").is_some() {
            let line = serde_json::from_value(v).map_err(|e| anyhow!("training line: {e}"))?;
            Ok(Self::Train(line))
        } else {
            bail!("neither a training line (\"train_loss\") nor a validation line (\"valid_loss\")")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer() -> LayerStats {
        LayerStats {
            expert_frac: vec![0.25, 0.75],
            min_frac: 0.25,
            max_frac: 0.75,
            std_frac: 0.25,
            mean_top_prob: 0.6,
            dropped_frac: 0.1,
        }
    }

    #[test]
    fn lines_round_trip() {
        let train = MetricsLine::Train(TrainLine {
            step: 10,
            epoch: 0,
            train_loss: 4.1,
            ce_loss: 4.0,
            lb_loss: 2.0,
            z_loss: 0.5,
            lr: 1e-4,
            grad_norm: 1.5,
            tokens_per_s: 20_000.0,
            dropped_frac: 0.1,
            layers: vec![layer()],
            expert_bias: vec![],
        });
        // With auxiliary-loss-free balancing the line carries each layer's biases.
        let MetricsLine::Train(mut biased) = train.clone() else {
            unreachable!()
        };
        biased.expert_bias = vec![vec![0.01, -0.02, 0.0, 0.01]];
        assert!(!train.to_json().contains("expert_bias"));
        let valid = MetricsLine::Valid(ValidLine {
            step: 10,
            valid_loss: 3.9,
            valid_accuracy: 0.2,
            lb_loss: 2.0,
            dropped_frac: 0.05,
            layers: vec![layer()],
            sample: "It is".into(),
        });
        for line in [train, MetricsLine::Train(biased), valid] {
            assert_eq!(MetricsLine::parse(&line.to_json()).unwrap(), line);
        }
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        for (line, needle) in [
            ("{\"step\":2,\"train_lo", "truncated"),
            ("{\"train_loss\":1.0}", "step"),
            ("{\"step\":1}", "neither"),
            (
                "{\"step\":1,\"train_loss\":1.0}",
                "training line: missing field",
            ),
            ("{\"step\":1,\"valid_loss\":\"x\"}", "validation line"),
        ] {
            let err = MetricsLine::parse(line).unwrap_err().to_string();
            assert!(err.contains(needle), "{line}: {err}");
        }
    }
}
