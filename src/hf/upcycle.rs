//! Sparse upcycling of a dense Hugging Face T5 (Komatsuzaki et al. 2022): a
//! `T5ForConditionalGeneration` checkpoint becomes a `SwitchTransformersForConditionalGeneration`
//! one that transformers loads and `switch finetune` trains.
//!
//! ```text
//! chosen blocks' FFN     DenseReluDense.{wi,wo}  ->  mlp.experts.expert_e.{wi, N * wo}, e < N
//!                                                    mlp.router.classifier  (fresh, [N, d_model])
//! other blocks' FFN      DenseReluDense.{wi,wo}  ->  mlp.{wi,wo}
//! everything else        the same name, the same values (tied copies of `shared` dropped)
//! ```
//! Which blocks are sparse is transformers' rule (`HfConfig::is_sparse`): with
//! `step = layers / sparse_layers`, block `i` when `i % step == 1` or `step == 1`.
//!
//! transformers' Switch layer scales every expert's output by the router probability `p` of the
//! token's expert. Each expert's `wo` is multiplied by `N` so that the gate `N p` starts near 1:
//! - `Router::Paper`: the paper's initialisation (truncated normal, `std = sqrt(0.1 / d_model)`,
//!   cut at 2 std), so `p` starts near `1/N` and the model near the dense one; training
//!   separates the experts from there.
//! - `Router::Zero`: a zero router, `p = 1/N` exactly for every token: with a capacity that drops
//!   nothing, the model computes the dense model's function (exactly for `N` a power of two).
//!   Every token chooses expert 0 (argmax's first) and the other experts' router rows receive
//!   equal gradients, so this is a check of the conversion, not a start for training.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::Deserialize;
use serde_json::json;

use super::checkpoint::{
    Checkpoint, SaveDtype, copy_model_files, refuse_existing, save, write_dir_whole,
};
use super::config::HfConfig;
use crate::store::HostTensor;

/// How the new routers start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Router {
    /// The paper's initialisation: truncated normal, `std = sqrt(0.1 / d_model)`.
    Paper,
    /// Zeros: exactly the dense model's function (with no token dropped), for checking.
    Zero,
}

/// What to make of the dense model.
#[derive(Debug, Clone)]
pub struct UpcycleOptions {
    /// Experts per Switch layer.
    pub experts: usize,
    /// Encoder blocks that become Switch layers (transformers' `num_sparse_encoder_layers`;
    /// `None`: half of them, as in google/switch-base-8).
    pub encoder_sparse: Option<usize>,
    /// Decoder blocks that become Switch layers (`None`: half of them).
    pub decoder_sparse: Option<usize>,
    /// Tokens each expert takes per sequence (transformers' `expert_capacity`).
    pub expert_capacity: usize,
    /// The routers' start.
    pub router: Router,
    /// Seed of the routers' draw.
    pub seed: u64,
    /// Precision of the written weights.
    pub dtype: SaveDtype,
}

/// What [`upcycle`] made.
#[derive(Debug, Clone)]
pub struct Upcycled {
    /// Sparse blocks, encoder then decoder.
    pub sparse: (Vec<usize>, Vec<usize>),
    /// Parameters before and after.
    pub params: (usize, usize),
}

/// The fields of a T5 `config.json` that upcycling reads.
#[derive(Debug, Deserialize)]
struct T5Config {
    vocab_size: usize,
    d_model: usize,
    d_kv: usize,
    d_ff: usize,
    num_layers: usize,
    #[serde(default)]
    num_decoder_layers: Option<usize>,
    num_heads: usize,
    relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    relative_attention_max_distance: usize,
    #[serde(default = "default_dropout")]
    dropout_rate: f64,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "default_relu")]
    feed_forward_proj: String,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    initializer_factor: Option<f64>,
    #[serde(default)]
    pad_token_id: Option<i64>,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    decoder_start_token_id: Option<i64>,
}

fn default_max_distance() -> usize {
    128
}
fn default_dropout() -> f64 {
    0.1
}
fn default_eps() -> f64 {
    1e-6
}
fn default_relu() -> String {
    "relu".into()
}

/// Reads `dir/config.json` as a dense T5 that can be upcycled, or says why not.
fn read_t5(dir: &Path) -> Result<T5Config> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {}: a Hugging Face model folder has config.json beside its weights",
            path.display()
        )
    })?;
    let raw: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    match raw.get("model_type").and_then(|v| v.as_str()) {
        Some("switch_transformers") => bail!(
            "{} is already a Switch Transformers model: upcycling starts from a dense T5",
            dir.display()
        ),
        Some("t5") | None => {}
        Some(other) => bail!(
            "{}: model_type `{other}` is not a T5: `switch upcycle --model` takes a dense \
             T5ForConditionalGeneration (t5-small, t5-base, ...)",
            path.display()
        ),
    }
    let c: T5Config = serde_json::from_value(raw)
        .with_context(|| format!("{} is not a T5 config", path.display()))?;
    if c.feed_forward_proj != "relu" {
        bail!(
            "{}: feed_forward_proj `{}`: Switch Transformers' experts are relu FFNs with one \
             `wi` (T5 v1.0: t5-small, t5-base, ...); T5 v1.1 and Flan-T5's gated FFNs \
             (wi_0, wi_1) cannot be copied into them",
            path.display(),
            c.feed_forward_proj
        );
    }
    if c.tie_word_embeddings == Some(false) {
        bail!(
            "{}: tie_word_embeddings is false: only T5s whose output layer is the shared \
             embedding (T5 v1.0) are upcycled",
            path.display()
        );
    }
    Ok(c)
}

/// The Switch `config.json` of `t5` with `o`'s experts, checked as the model loader checks it.
fn switch_config(t5: &T5Config, o: &UpcycleOptions) -> Result<(serde_json::Value, HfConfig)> {
    let dec_layers = t5.num_decoder_layers.unwrap_or(t5.num_layers);
    if o.experts < 2 {
        bail!("--experts must be at least 2, got {}", o.experts);
    }
    let half = |n: usize| (n / 2).max(1);
    let encoder_sparse = o.encoder_sparse.unwrap_or(half(t5.num_layers));
    let decoder_sparse = o.decoder_sparse.unwrap_or(half(dec_layers));
    for (what, n, layers) in [
        ("--encoder-sparse", encoder_sparse, t5.num_layers),
        ("--decoder-sparse", decoder_sparse, dec_layers),
    ] {
        if n == 0 || n > layers {
            bail!(
                "{what} {n}: between 1 and the stack's {layers} blocks (transformers makes \
                 block 1 sparse even when told 0)"
            );
        }
    }
    if o.expert_capacity == 0 {
        bail!("--expert-capacity must be at least 1");
    }
    let raw = json!({
        "architectures": ["SwitchTransformersForConditionalGeneration"],
        "model_type": "switch_transformers",
        "vocab_size": t5.vocab_size,
        "d_model": t5.d_model,
        "d_kv": t5.d_kv,
        "d_ff": t5.d_ff,
        "num_layers": t5.num_layers,
        "num_decoder_layers": dec_layers,
        "num_heads": t5.num_heads,
        "num_experts": o.experts,
        "num_sparse_encoder_layers": encoder_sparse,
        "num_sparse_decoder_layers": decoder_sparse,
        "expert_capacity": o.expert_capacity,
        "router_bias": false,
        "router_dtype": "float32",
        "router_jitter_noise": 0.01,
        "router_ignore_padding_tokens": false,
        "router_z_loss_coef": 0.001,
        "router_aux_loss_coef": 0.001,
        "relative_attention_num_buckets": t5.relative_attention_num_buckets,
        "relative_attention_max_distance": t5.relative_attention_max_distance,
        "dropout_rate": t5.dropout_rate,
        "layer_norm_epsilon": t5.layer_norm_epsilon,
        "initializer_factor": t5.initializer_factor.unwrap_or(1.0),
        "dense_act_fn": "relu",
        "is_encoder_decoder": true,
        "add_router_probs": false,
        "use_cache": true,
        "tie_word_embeddings": true,
        "pad_token_id": t5.pad_token_id.unwrap_or(0),
        "eos_token_id": t5.eos_token_id.clone().unwrap_or(json!(1)),
        "decoder_start_token_id": t5.decoder_start_token_id.unwrap_or(0),
        "dtype": "float32",
    });
    let config = HfConfig::from_json(raw.clone()).context("the upcycled config")?;
    Ok((raw, config))
}

/// The paper's router: truncated normal (cut at 2 std) with `std = sqrt(0.1 / d_model)`.
fn paper_router(experts: usize, d_model: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let std = (0.1 / d_model as f64).sqrt();
    (0..experts * d_model)
        .map(|_| {
            loop {
                let z: f64 = rng.sample(StandardNormal);
                if z.abs() <= 2.0 {
                    break (z * std) as f32;
                }
            }
        })
        .collect()
}

/// `t` times `k`, in f32.
fn scaled(t: &HostTensor, k: f32) -> HostTensor {
    HostTensor::f32(t.shape.clone(), t.to_f32().iter().map(|v| v * k).collect())
}

/// Upcycles the dense T5 in `from` into a Switch model written to `out` (whole or not at all,
/// never over an existing model), with the tokenizer files beside it.
pub fn upcycle(from: &Path, out: &Path, o: &UpcycleOptions) -> Result<Upcycled> {
    refuse_existing(out)?;
    let t5 = read_t5(from)?;
    let (raw, config) = switch_config(&t5, o)?;
    let mut ck = Checkpoint::read(from)?;
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed);
    let names: Vec<String> = ck.remaining().into_iter().map(str::to_string).collect();
    let mut tensors = BTreeMap::new();
    let (mut before, mut after) = (0usize, 0usize);
    let emb = [t5.vocab_size, t5.d_model];
    let shared = ck
        .take_first(
            &[
                "shared.weight",
                "encoder.embed_tokens.weight",
                "decoder.embed_tokens.weight",
            ],
            &emb,
        )
        .with_context(|| format!("reading {}", from.display()))?;
    before += shared.numel();
    tensors.insert("shared.weight".to_string(), shared);
    for name in names {
        // Tied copies of `shared` and the cross-attention bias transformers ignores.
        if matches!(
            name.as_str(),
            "shared.weight"
                | "encoder.embed_tokens.weight"
                | "decoder.embed_tokens.weight"
                | "lm_head.weight"
                | "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
        ) {
            ck.discard(&name);
            continue;
        }
        let shape = ck.shape(&name).map(<[usize]>::to_vec).unwrap_or_default();
        let t = ck
            .take(&name, &shape)
            .with_context(|| format!("reading {}", from.display()))?;
        before += t.numel();
        let Some((block, rest)) = name.split_once(".DenseReluDense.") else {
            if name.contains("DenseReluDense") || name.contains(".mlp.") {
                bail!("{}: unexpected tensor `{name}`", from.display());
            }
            after += t.numel();
            tensors.insert(name, t);
            continue;
        };
        if rest != "wi.weight" && rest != "wo.weight" {
            bail!(
                "{}: `{name}` is not a relu FFN's wi or wo (a gated FFN's wi_0/wi_1 cannot be \
                 upcycled into Switch Transformers' experts)",
                from.display()
            );
        }
        let (decoder, i) = block_of(block)
            .with_context(|| format!("{}: unexpected tensor `{name}`", from.display()))?;
        if !config.is_sparse(decoder, i) {
            after += t.numel();
            tensors.insert(format!("{block}.mlp.{rest}"), t);
            continue;
        }
        let t = if rest == "wo.weight" {
            scaled(&t, o.experts as f32)
        } else {
            t
        };
        for e in 0..o.experts {
            after += t.numel();
            tensors.insert(format!("{block}.mlp.experts.expert_{e}.{rest}"), t.clone());
        }
        // One router per block, drawn when its first FFN tensor is met (names in order).
        let router = format!("{block}.mlp.router.classifier.weight");
        if let std::collections::btree_map::Entry::Vacant(slot) = tensors.entry(router) {
            let d = t5.d_model;
            let w = match o.router {
                Router::Paper => paper_router(o.experts, d, &mut rng),
                Router::Zero => vec![0.0; o.experts * d],
            };
            after += w.len();
            slot.insert(HostTensor::f32(vec![o.experts, d], w));
        }
    }
    after += t5.vocab_size * t5.d_model;
    let sparse = |decoder: bool, n: usize| -> Vec<usize> {
        (0..n).filter(|&i| config.is_sparse(decoder, i)).collect()
    };
    let made = Upcycled {
        sparse: (
            sparse(false, config.num_layers),
            sparse(true, config.decoder_layers()),
        ),
        params: (before, after),
    };
    let json = serde_json::to_string_pretty(&raw)? + "\n";
    write_dir_whole(out, |tmp| {
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| (k, super::checkpoint::Deferred::ready(t)))
            .collect();
        save(tmp, &json, tensors, o.dtype)?;
        copy_model_files(from, tmp)
    })?;
    Ok(made)
}

/// `encoder.block.3.layer.1` -> (false, 3): which stack and block an FFN belongs to.
fn block_of(prefix: &str) -> Option<(bool, usize)> {
    let mut parts = prefix.split('.');
    let decoder = match parts.next()? {
        "encoder" => false,
        "decoder" => true,
        _ => return None,
    };
    (parts.next()? == "block").then_some(())?;
    let i = parts.next()?.parse().ok()?;
    (parts.next()? == "layer").then_some(())?;
    let f: usize = parts.next()?.parse().ok()?;
    (f == if decoder { 2 } else { 1 } && parts.next().is_none()).then_some((decoder, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_read_from_ffn_names() {
        assert_eq!(block_of("encoder.block.3.layer.1"), Some((false, 3)));
        assert_eq!(block_of("decoder.block.0.layer.2"), Some((true, 0)));
        assert_eq!(block_of("decoder.block.0.layer.1"), None);
        assert_eq!(block_of("encoder.block.x.layer.1"), None);
        assert_eq!(block_of("encoder.block.1.layer.1.extra"), None);
    }

    #[test]
    fn the_paper_router_is_a_truncated_normal_of_its_scale() {
        let (n, d) = (8, 512);
        let w = paper_router(n, d, &mut ChaCha8Rng::seed_from_u64(3));
        let std = (0.1f64 / d as f64).sqrt();
        assert!(w.iter().all(|v| f64::from(v.abs()) <= 2.0 * std + 1e-9));
        let var = w.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / w.len() as f64;
        // A normal cut at 2 std keeps 0.774 of its variance.
        let ratio = var.sqrt() / std;
        assert!((ratio - 0.774f64.sqrt()).abs() < 0.02, "std ratio {ratio}");
        assert_ne!(w, paper_router(n, d, &mut ChaCha8Rng::seed_from_u64(4)));
    }
}
