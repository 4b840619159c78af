//! The run's configuration: the model's ([`ModelConfig`]) and training's, read from and written
//! to TOML, with every key documented ([`KEYS`]) and settable from the command line.

mod keys;
mod presets;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::model::ModelConfig;
use crate::routing::RoutePlace;

/// Training hyper-parameters. Defaults are labml's experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Seed for initialisation, data order and token dropping.
    pub seed: u64,
    /// Windows per batch.
    pub batch_size: usize,
    /// Characters per window (the model sees seq_len, predicts the next seq_len).
    pub seq_len: usize,
    /// Optimizer steps to train for.
    pub steps: u64,
    /// Load-balancing loss coefficient (alpha).
    pub lb_coef: f64,
    /// Noam base learning rate (labml: 1.0).
    pub lr: f64,
    /// Noam warm-up steps.
    pub warmup: u64,
    /// Adam beta1.
    pub beta1: f64,
    /// Adam beta2.
    pub beta2: f64,
    /// Adam eps, added to sqrt(v) before the bias correction (labml).
    pub eps: f64,
    /// Clip gradients to this global L2 norm.
    pub grad_clip: f64,
    /// Router z-loss coefficient (ST-MoE: 0.001); the z-loss is logged either way.
    pub z_loss_coef: f64,
    /// Data-parallel replicas: each takes `batch_size / replicas` windows of every batch;
    /// gradients are averaged. 1 = one model, labml's experiment.
    pub replicas: usize,
    /// Replicas route the whole batch together (capacity, drops and load balance over all its
    /// tokens: the step of one model, in `replicas` threads) instead of each its own windows
    /// (as each core in the paper).
    pub global_routing: bool,
    /// Expert parallelism (with `--distributed`): each rank holds `n_experts / ranks` experts
    /// of every Switch layer and tokens travel to their expert's rank and back.
    pub expert_parallel: bool,
    /// Steps between training-metric lines in metrics.jsonl.
    pub log_interval: u64,
    /// Steps between validations (and at the last step).
    pub eval_interval: u64,
    /// Fixed validation batches per validation.
    pub eval_batches: usize,
    /// Steps between checkpoints (and at the last step).
    pub checkpoint_interval: u64,
    /// Most recent checkpoints kept (the best-validation one is kept besides).
    pub keep_checkpoints: usize,
    /// Prompt of the greedy sample shown at each validation.
    pub sample_prompt: String,
    /// Characters generated for that sample.
    pub sample_tokens: usize,
    /// Steps with a non-finite loss or gradient norm to skip (no update) before the run stops
    /// with an error; 0 = stop at the first.
    pub skip_nonfinite: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            batch_size: 32,
            seq_len: 64,
            steps: 3700,
            lb_coef: 0.01,
            lr: 1.0,
            warmup: 2000,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_clip: 1.0,
            z_loss_coef: 0.0,
            replicas: 1,
            global_routing: false,
            expert_parallel: false,
            log_interval: 10,
            eval_interval: 250,
            eval_batches: 20,
            checkpoint_interval: 500,
            keep_checkpoints: 3,
            sample_prompt: "It is".into(),
            sample_tokens: 25,
            skip_nonfinite: 0,
        }
    }
}

impl TrainConfig {
    /// Checks every field; the error names the key and what is allowed.
    pub(crate) fn validate(&self) -> Result<()> {
        let at_least_one = [
            ("batch_size", self.batch_size as u64),
            ("replicas", self.replicas as u64),
            ("seq_len", self.seq_len as u64),
            ("steps", self.steps),
            ("warmup", self.warmup),
            ("log_interval", self.log_interval),
            ("eval_interval", self.eval_interval),
            ("eval_batches", self.eval_batches as u64),
            ("checkpoint_interval", self.checkpoint_interval),
            ("keep_checkpoints", self.keep_checkpoints as u64),
        ];
        for (name, v) in at_least_one {
            if v == 0 {
                bail!("train.{name} must be at least 1 (got 0)");
            }
        }
        let positive = [
            ("lr", self.lr),
            ("eps", self.eps),
            ("grad_clip", self.grad_clip),
        ];
        for (name, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                bail!("train.{name} must be a positive number (got {v})");
            }
        }
        if !(self.lb_coef.is_finite() && self.lb_coef >= 0.0) {
            bail!(
                "train.lb_coef must be zero or positive (got {})",
                self.lb_coef
            );
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                bail!("train.{name} must be in [0, 1) (got {v})");
            }
        }
        if self.sample_tokens > MAX_SAMPLE_TOKENS {
            bail!(
                "train.sample_tokens must be at most {MAX_SAMPLE_TOKENS} (got {}): the sample is \
                 written into metrics.jsonl at every validation",
                self.sample_tokens
            );
        }
        if !self.batch_size.is_multiple_of(self.replicas) {
            bail!(
                "train.batch_size ({}) must be a multiple of train.replicas ({}): every replica \
                 takes an equal share of each batch",
                self.batch_size,
                self.replicas
            );
        }
        Ok(())
    }
}

/// The longest validation sample (`train.sample_tokens`): generated at every validation and
/// written into each validation line of metrics.jsonl (a stop signal cuts it short).
pub(crate) const MAX_SAMPLE_TOKENS: usize = 10_000;

/// Everything a training run is configured by: the TOML file of a run (`[model]`, `[train]`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// The model (`[model]`).
    pub model: ModelConfig,
    /// Training (`[train]`).
    pub train: TrainConfig,
}

pub use keys::KEYS;
pub use presets::{PRESETS, Preset};

impl RunConfig {
    /// Checks both sections and their combination.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.train.validate()?;
        let t = &self.train;
        if t.global_routing && t.replicas > 1 && self.model.route_on == RoutePlace::Device {
            bail!(
                "train.global_routing routes through the host (the replicas exchange their \
                 router probabilities there): set model.route_on = auto or host"
            );
        }
        if self.model.pos_embedding && self.model.max_seq_len < t.seq_len {
            bail!(
                "model.max_seq_len ({}) must be at least train.seq_len ({}) with \
                 model.pos_embedding: the learned positions cover max_seq_len positions",
                self.model.max_seq_len,
                t.seq_len
            );
        }
        Ok(())
    }

    /// Reads a TOML file; unknown keys and wrong types are errors naming the key.
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// Parses TOML; an unknown key or a wrong type is an error.
    pub(crate) fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            anyhow::anyhow!("{}", e.message().trim()).context(
                e.span()
                    .map(|s| format!("at {:?}", &text[s]))
                    .unwrap_or_default(),
            )
        })
    }

    /// Every key with its value as TOML writes it (`("train.lr", "1.0")`), in `KEYS` order.
    pub fn fields(&self) -> Vec<(String, String)> {
        let table = toml::Table::try_from(self).expect("config is a table");
        KEYS.iter()
            .map(|(key, _)| {
                let (section, field) = key.split_once('.').expect("keys are section.field");
                (key.to_string(), table[section][field].to_string())
            })
            .collect()
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serialises to TOML")
    }

    /// Applies one `key=value` override (`train.steps=1000`, `model.drop_tokens=false`).
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (key, value) = assignment
            .split_once('=')
            .with_context(|| format!("--set takes key=value, got `{assignment}`"))?;
        let key = key.trim();
        if !KEYS.iter().any(|(k, _)| *k == key) {
            let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
            bail!(
                "unknown config key `{key}`; the keys are: {}",
                known.join(", ")
            );
        }
        let (section, field) = key.split_once('.').expect("keys are section.field");
        let mut table = toml::Table::try_from(&*self).expect("config is a table");
        let section = table
            .get_mut(section)
            .and_then(toml::Value::as_table_mut)
            .expect("section exists");
        let parsed = crate::util::set_value(value, &section[field]);
        section.insert(field.to_string(), parsed);
        *self = crate::util::settings_from(table, key, value)?;
        Ok(())
    }
}

/// Keys added after runs were first written: a run's config.toml may lack them (their
/// defaults are what those runs ran with).
pub(crate) const KEYS_SINCE_V1: &[&str] = &[
    "train.skip_nonfinite",
    "train.expert_parallel",
    "model.balance",
    "model.bias_rate",
    "model.expert_d_ff",
    "model.balance_scope",
    "model.shared_experts",
    "model.shared_d_ff",
];

/// The keys of [`KEYS`] that the TOML `text` lacks (besides those of [`KEYS_SINCE_V1`]).
pub(crate) fn missing_keys(text: &str) -> Result<Vec<String>> {
    let table: toml::Table = toml::from_str(text).context("not TOML")?;
    Ok(KEYS
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| !KEYS_SINCE_V1.contains(k))
        .filter(|k| {
            let (section, field) = k.split_once('.').expect("keys are section.field");
            table
                .get(section)
                .and_then(toml::Value::as_table)
                .is_none_or(|s| !s.contains_key(field))
        })
        .map(str::to_string)
        .collect())
}

/// Keys that a resumed run may change (`--resume R --set key=value`): the length of the run,
/// what it logs, samples and keeps. Every other key would change the model, the data order or
/// the optimizer's arithmetic mid-run.
pub(crate) const RESUMABLE_KEYS: &[&str] = &[
    "train.steps",
    // The Noam schedule is a function of the step: a new rate or warm-up continues from it.
    "train.lr",
    "train.warmup",
    "train.log_interval",
    "train.eval_interval",
    "train.checkpoint_interval",
    "train.keep_checkpoints",
    "train.sample_prompt",
    "train.sample_tokens",
    "train.skip_nonfinite",
    "train.expert_parallel",
];

impl RunConfig {
    /// Applies `--set` overrides to a resumed run's configuration; a key outside
    /// [`RESUMABLE_KEYS`] is an error naming it.
    pub(crate) fn set_on_resume(&mut self, assignments: &[String]) -> Result<()> {
        for a in assignments {
            let key = a.split_once('=').map_or(a.as_str(), |(k, _)| k).trim();
            // An unknown key or a bad value is named as such first (by `set`'s own check).
            self.clone().set(a)?;
            if !RESUMABLE_KEYS.contains(&key) {
                bail!(
                    "{key} cannot change when a run resumes (it would change the model, the data \
                     order or the optimizer mid-run); a resumed run may change: {}",
                    RESUMABLE_KEYS.join(", ")
                );
            }
            self.set(a)?;
        }
        self.validate()
    }
}

/// `--help` text: every key, its default and its meaning.
pub fn keys_help() -> String {
    let defaults = toml::Table::try_from(RunConfig::default()).expect("config is a table");
    let mut out =
        String::from("Configuration keys (TOML sections [model] and [train]; --set key=value):\n");
    for (key, doc) in KEYS {
        let (section, field) = key.split_once('.').expect("keys are section.field");
        let default = defaults[section][field].to_string();
        out.push_str(&format!("  {key:<28} {doc} (default {default})\n"));
    }
    out.push_str("\nPresets (--preset NAME, applied before any --set):\n");
    for p in PRESETS {
        out.push_str(&format!(
            "  {:<28} {}: {}\n",
            p.name,
            p.about,
            p.sets.join(" ")
        ));
    }
    out
}

#[cfg(test)]
mod tests;
