//! `config.json` of a Hugging Face `SwitchTransformersForConditionalGeneration` checkpoint.
//!
//! Which blocks are sparse follows transformers: with `step = num_layers / num_sparse_layers`,
//! block `i` has a Switch FFN when `i % step == 1` or `step == 1` (so `switch-base-8`, 12
//! blocks and 6 sparse, has them at 1, 3, 5, ...).

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The fields of `config.json` this implementation reads (others are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    /// Vocabulary size (rows of the shared embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Width of one attention head.
    pub d_kv: usize,
    /// Hidden width of every (expert) feed-forward network.
    pub d_ff: usize,
    /// Encoder blocks.
    pub num_layers: usize,
    /// Decoder blocks (the encoder's count when absent).
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    /// Encoder blocks with a Switch FFN.
    pub num_sparse_encoder_layers: usize,
    /// Decoder blocks with a Switch FFN.
    pub num_sparse_decoder_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Experts per Switch FFN.
    pub num_experts: usize,
    /// Tokens each expert takes per sequence; the rest are dropped.
    pub expert_capacity: usize,
    /// Whether the router has a bias.
    #[serde(default)]
    pub router_bias: bool,
    /// Relative-position buckets.
    pub relative_attention_num_buckets: usize,
    /// Distances at or beyond this share the last bucket.
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    /// RMS norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Feed-forward activation (`relu`; the gated variants are refused).
    #[serde(default = "default_act")]
    pub dense_act_fn: String,
    /// Whether the output layer is the shared embedding (then scaled by `d_model^-0.5`).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Padding token.
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    /// End of sequence.
    #[serde(default)]
    pub eos_token_id: Option<i64>,
    /// First decoder input (T5: the pad token).
    #[serde(default)]
    pub decoder_start_token_id: Option<i64>,
    /// The router's dtype (only `float32` is supported).
    #[serde(default = "default_router_dtype")]
    pub router_dtype: String,
    /// Weight of the router z-loss in the training loss.
    #[serde(default = "default_router_coef")]
    pub router_z_loss_coef: f64,
    /// Weight of the load-balancing loss in the training loss.
    #[serde(default = "default_router_coef")]
    pub router_aux_loss_coef: f64,
    /// Dropout probability in training.
    #[serde(default = "default_dropout")]
    pub dropout_rate: f64,
    /// The router's multiplicative input noise in training.
    #[serde(default = "default_jitter")]
    pub router_jitter_noise: f64,
    /// The whole `config.json` as read (written back unchanged when the model is saved).
    #[serde(skip)]
    pub raw: serde_json::Value,
}

fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "relu".into()
}
fn default_true() -> bool {
    true
}
fn default_router_coef() -> f64 {
    0.001
}
fn default_dropout() -> f64 {
    0.1
}
fn default_jitter() -> f64 {
    0.01
}
fn default_router_dtype() -> String {
    "float32".into()
}

impl HfConfig {
    /// Reads and checks `dir/config.json`.
    pub(crate) fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}: a Hugging Face model directory has config.json beside its \
                 safetensors weights (download it with the weights)",
                path.display()
            )
        })?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        Self::from_json(raw).with_context(|| format!("in {}", path.display()))
    }

    /// Reads and checks a config from its JSON.
    pub(crate) fn from_json(raw: serde_json::Value) -> Result<Self> {
        let mut c: Self =
            serde_json::from_value(raw.clone()).context("not a Switch Transformers config")?;
        c.raw = raw;
        c.check()?;
        Ok(c)
    }

    /// Refuses what this implementation does not compute.
    pub(crate) fn check(&self) -> Result<()> {
        if self.dense_act_fn != "relu" {
            bail!(
                "dense_act_fn `{}` is not supported (only `relu`, the original Switch \
                 Transformers checkpoints)",
                self.dense_act_fn
            );
        }
        if self.router_dtype != "float32" {
            bail!(
                "router_dtype `{}` is not supported (only float32)",
                self.router_dtype
            );
        }
        for (what, v) in [
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_heads", self.num_heads),
            ("num_layers", self.num_layers),
            ("vocab_size", self.vocab_size),
            (
                "relative_attention_num_buckets",
                self.relative_attention_num_buckets,
            ),
        ] {
            if v == 0 {
                bail!("{what} is 0");
            }
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            bail!(
                "layer_norm_epsilon must be a number > 0 (transformers' default is 1e-6), got {}",
                self.layer_norm_epsilon
            );
        }
        for (what, v) in [
            ("dropout_rate", self.dropout_rate),
            ("router_jitter_noise", self.router_jitter_noise),
        ] {
            if !(0.0..1.0).contains(&v) {
                bail!("{what} must be in [0, 1), got {v}");
            }
        }
        for (what, v) in [
            ("router_z_loss_coef", self.router_z_loss_coef),
            ("router_aux_loss_coef", self.router_aux_loss_coef),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{what} must be a number >= 0, got {v}");
            }
        }
        if self.num_sparse_encoder_layers + self.num_sparse_decoder_layers > 0
            && self.num_experts == 0
        {
            bail!("sparse layers need num_experts > 0");
        }
        Ok(())
    }

    /// Bytes that running `batch` inputs of `len` tokens through the encoder and decoding
    /// `new_tokens` tokens needs besides the weights, f32: per attention layer the scores,
    /// position bias and softmax (`3 B H L^2`), the hidden states and projections
    /// (`12 B L d_model` per block), and the decoder's key/value caches (self and cross,
    /// `4 B (L + N) H d_kv` per block). An estimate, to refuse inputs that cannot fit before
    /// anything is allocated.
    pub fn run_bytes(&self, batch: usize, len: usize, new_tokens: usize) -> u128 {
        let (b, l, n) = (batch as u128, len as u128, new_tokens as u128);
        let (h, d, dkv) = (
            self.num_heads as u128,
            self.d_model as u128,
            self.d_kv as u128,
        );
        let attention = 3 * b * h * l * l;
        let states = 12 * b * l * d * self.num_layers as u128;
        let caches = 4 * b * (l + n) * h * dkv * self.decoder_layers() as u128;
        4 * (attention + states + caches)
    }

    /// Decoder blocks.
    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    /// Whether block `i` of the encoder (or decoder) has a Switch FFN.
    pub fn is_sparse(&self, decoder: bool, i: usize) -> bool {
        let (layers, sparse) = if decoder {
            (self.decoder_layers(), self.num_sparse_decoder_layers)
        } else {
            (self.num_layers, self.num_sparse_encoder_layers)
        };
        let step = layers.checked_div(sparse).unwrap_or(layers);
        step > 0 && (i % step == 1 || step == 1)
    }

    /// The padding token (T5's 0 when the config names none).
    pub fn pad(&self) -> i64 {
        self.pad_token_id.unwrap_or(0)
    }

    /// The decoder's first input token.
    pub(crate) fn decoder_start(&self) -> i64 {
        self.decoder_start_token_id.unwrap_or(self.pad())
    }

    /// Width of all heads together.
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(layers: usize, sparse: usize) -> HfConfig {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 10, "d_model": 4, "d_kv": 2, "d_ff": 8, "num_layers": layers,
            "num_sparse_encoder_layers": sparse, "num_sparse_decoder_layers": 0,
            "num_heads": 2, "num_experts": 2, "expert_capacity": 1,
            "relative_attention_num_buckets": 4
        }))
        .unwrap()
    }

    #[test]
    fn sparse_blocks_follow_transformers() {
        let sparse = |c: &HfConfig, dec| {
            (0..if dec {
                c.decoder_layers()
            } else {
                c.num_layers
            })
                .filter(|&i| c.is_sparse(dec, i))
                .collect::<Vec<_>>()
        };
        // switch-base-8: 12 blocks, 6 sparse.
        assert_eq!(sparse(&config(12, 6), false), vec![1, 3, 5, 7, 9, 11]);
        assert_eq!(sparse(&config(4, 4), false), vec![0, 1, 2, 3]);
        assert_eq!(sparse(&config(3, 1), false), vec![1]);
        // No sparse decoder layers: transformers sets step = layers, which still makes block 1
        // sparse (its "HACK"); a checkpoint saved by it has those weights, so we follow it.
        assert_eq!(sparse(&config(3, 1), true), vec![1]);
    }

    #[test]
    fn unsupported_configs_are_refused_by_name() {
        let mut c = config(2, 1);
        c.dense_act_fn = "gated-gelu".into();
        assert!(c.check().unwrap_err().to_string().contains("gated-gelu"));
        for eps in [-1.0, 0.0, f64::NAN, f64::INFINITY] {
            let mut c = config(2, 1);
            c.layer_norm_epsilon = eps;
            let e = c.check().unwrap_err().to_string();
            assert!(e.contains("layer_norm_epsilon"), "{e}");
        }
    }
}
