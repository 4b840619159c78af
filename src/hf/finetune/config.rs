//! Every setting of a fine-tuning run: `--set key=value`, written to the run's `config.toml`
//! whole at the start and read back by `--resume`.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::hf::checkpoint::SaveDtype;
use crate::model::precision::Precision;

/// Every setting of a fine-tuning run (`--set key=value`); defaults are `Trainer`'s where it
/// has one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    /// Peak learning rate (`Trainer`: 5e-5).
    pub learning_rate: f64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per update (over all workers: the replicas and ranks split them).
    pub grad_accum: usize,
    /// Replicas in this process: threads on the CPU sharing the weights, each computing its
    /// share of every update's micro-batches (`grad_accum` must be a multiple of replicas x
    /// ranks); the same update as one replica's.
    pub replicas: usize,
    /// Passes over the training file (when `max_steps` is 0).
    pub epochs: usize,
    /// Updates in all; 0: `epochs` passes.
    pub max_steps: u64,
    /// Updates of linear warm-up.
    pub warmup_steps: u64,
    /// AdamW's decoupled weight decay (not on norms and biases).
    pub weight_decay: f64,
    /// Global gradient-norm limit; 0 turns clipping off.
    pub max_grad_norm: f64,
    /// AdamW's first-moment decay.
    pub adam_beta1: f64,
    /// AdamW's second-moment decay.
    pub adam_beta2: f64,
    /// AdamW's epsilon.
    pub adam_epsilon: f64,
    /// Input tokens kept (longer inputs are cut, and counted).
    pub max_source_len: usize,
    /// Target tokens kept (longer targets are cut, and counted); also the validation's
    /// generation length.
    pub max_target_len: usize,
    /// Dropout in training; the model's `dropout_rate` when absent.
    pub dropout_rate: Option<f64>,
    /// Router jitter in training; the model's `router_jitter_noise` when absent.
    pub router_jitter_noise: Option<f64>,
    /// Seed of the shuffling, dropout and jitter.
    pub seed: u64,
    /// Updates between metrics lines.
    pub log_every: u64,
    /// Updates between validations (0: at the end only).
    pub eval_every: u64,
    /// Validation examples whose generations are scored with ROUGE (0: none).
    pub eval_generate: usize,
    /// Updates between checkpoints (0: the final model only).
    pub save_every: u64,
    /// `f32` or `bf16`: what the saved model is written in.
    pub save_dtype: String,
    /// `f32` or `bf16`: the type the forward and backward compute in. With bf16 the weights
    /// stay f32 (AdamW's master copies) and are cast to bf16 where used; the router, norms'
    /// statistics, softmaxes and losses stay f32.
    pub precision: Precision,
    /// Updates with a non-finite gradient norm to skip (the model left unchanged) before the
    /// run stops with an error; 0: stop at the first.
    pub skip_nonfinite: u64,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            learning_rate: 5e-5,
            batch_size: 8,
            grad_accum: 1,
            replicas: 1,
            epochs: 3,
            max_steps: 0,
            warmup_steps: 0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_source_len: 512,
            max_target_len: 128,
            dropout_rate: None,
            router_jitter_noise: None,
            seed: 42,
            log_every: 10,
            eval_every: 100,
            eval_generate: 32,
            save_every: 0,
            save_dtype: "f32".into(),
            precision: Precision::F32,
            skip_nonfinite: 0,
        }
    }
}

impl FinetuneConfig {
    /// Applies `key=value` (a TOML value, or bare text for a string).
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (key, value) = assignment
            .split_once('=')
            .with_context(|| format!("--set takes key=value, got `{assignment}`"))?;
        let (key, value) = (key.trim(), value.trim());
        let mut table = toml::Table::try_from(&*self).expect("config is a table");
        let known = toml::Table::try_from(FinetuneConfig {
            dropout_rate: Some(0.0),
            router_jitter_noise: Some(0.0),
            ..Default::default()
        })
        .expect("config is a table");
        let Some(current) = known.get(key) else {
            let keys: Vec<&String> = known.keys().collect();
            bail!(
                "unknown finetune key `{key}`; the keys are: {}",
                keys.iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        table.insert(key.to_string(), crate::util::set_value(value, current));
        let new: Self = crate::util::settings_from(table, key, value)?;
        new.check()?;
        *self = new;
        Ok(())
    }

    /// Refuses settings that cannot run.
    pub fn check(&self) -> Result<()> {
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            bail!("learning_rate must be > 0, got {}", self.learning_rate);
        }
        for (k, v) in [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("replicas", self.replicas),
            ("max_source_len", self.max_source_len),
            ("max_target_len", self.max_target_len),
            ("log_every", self.log_every as usize),
        ] {
            if v == 0 {
                bail!("{k} must be at least 1");
            }
        }
        if self.max_steps == 0 && self.epochs == 0 {
            bail!("set max_steps or epochs (both are 0)");
        }
        for (k, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                bail!("{k} must be in [0, 1), got {v}");
            }
        }
        for (k, v) in [
            ("dropout_rate", self.dropout_rate),
            ("router_jitter_noise", self.router_jitter_noise),
        ] {
            if let Some(v) = v
                && !(0.0..1.0).contains(&v)
            {
                bail!("{k} must be in [0, 1), got {v}");
            }
        }
        if !(self.weight_decay >= 0.0 && self.max_grad_norm >= 0.0 && self.adam_epsilon > 0.0) {
            bail!("weight_decay and max_grad_norm must be >= 0, adam_epsilon > 0");
        }
        self.dtype()?;
        super::check_precision(self.precision)?;
        Ok(())
    }

    pub(crate) fn dtype(&self) -> Result<SaveDtype> {
        match self.save_dtype.as_str() {
            "f32" => Ok(SaveDtype::F32),
            "bf16" => Ok(SaveDtype::Bf16),
            other => bail!("save_dtype must be f32 or bf16, got `{other}`"),
        }
    }
}
