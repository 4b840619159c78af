//! Autoregressive generation: feed the last `context` tokens, take the next-token logits,
//! pick greedily (temperature 0) or sample with temperature and top-k.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::Tensor;
use rand::Rng;

use crate::data::sequence_tensor;
use crate::infer::decode::HostDecoder;
use crate::model::SwitchTransformer;
use crate::model::attention::KvCache;
use crate::routing::RoutingRng;
use crate::store::host_f32;

/// How to pick each generated token.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Tokens to generate.
    pub max_tokens: usize,
    /// 0 = greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Sample only among the k most likely tokens.
    pub top_k: Option<usize>,
    /// Longest window the model sees (the training seq_len).
    pub context: usize,
}

impl SampleOptions {
    /// Checks the sampling settings as the command line gives them (`switch sample` and
    /// `switch seq2seq` alike): a temperature that is a finite number >= 0, a top-k of at
    /// least 1.
    pub fn check(&self) -> anyhow::Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            anyhow::bail!(
                "--temperature must be a number >= 0 (0 = greedy), got {}",
                self.temperature
            );
        }
        if self.top_k == Some(0) {
            anyhow::bail!("--top-k must be at least 1 (leave it out to sample from every token)");
        }
        Ok(())
    }
}

/// Picks the next token from `logits` `[n_vocab]`.
pub fn pick(logits: &[f32], opts: &SampleOptions, rng: &mut impl Rng) -> u32 {
    if opts.temperature <= 0.0 {
        return crate::routing::argmax(logits) as u32;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order.truncate(opts.top_k.unwrap_or(logits.len()).clamp(1, logits.len()));
    let max = logits[order[0]] as f64;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / opts.temperature).exp())
        .collect();
    let mut r = rng.random::<f64>() * weights.iter().sum::<f64>();
    for (&i, w) in order.iter().zip(&weights) {
        r -= w;
        if r <= 0.0 {
            return i as u32;
        }
    }
    order[order.len() - 1] as u32
}

/// The next-token logits of a `[1, n, n_vocab]` output: its last position.
fn last_logits(logits: Tensor<3>) -> Vec<f32> {
    let [_, n, v] = logits.dims();
    host_f32(logits.slice([0..1, n - 1..n, 0..v]))
}

/// How each new token's logits are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoding {
    /// The whole window (the last `opts.context` tokens) recomputed for every token: labml's
    /// sampler, and the only way with token dropping on.
    Recompute,
    /// One position per token, keys and values of earlier positions cached. Identical to
    /// `Recompute` while the text fits in `opts.context` (up to rounding); beyond it, each
    /// position attends to the `context` most recent ones (a sliding window). Token dropping is
    /// off (one token at a time would have capacity 0). On the CPU backend an f32 model decodes
    /// with plain loops ([`HostDecoder`]), elsewhere through Burn; a model with learned
    /// positional embeddings recomputes the window.
    Cached,
    /// `Cached` always through Burn's tensor ops (any backend and precision): what the CPU
    /// decoder is tested against.
    CachedGeneric,
}

/// Generates `opts.max_tokens` tokens after `prompt` (non-empty) the `decoding` way, handing
/// each to `on_token` as soon as it is picked. Returns only the new tokens.
pub fn generate_with(
    model: &SwitchTransformer,
    prompt: &[u32],
    opts: &SampleOptions,
    decoding: Decoding,
    sample_rng: &mut impl Rng,
    routing_rng: &mut RoutingRng,
    on_token: &mut dyn FnMut(u32),
) -> Vec<u32> {
    assert!(!prompt.is_empty(), "generation needs a non-empty prompt");
    match decoding {
        Decoding::Recompute => recompute(model, prompt, opts, sample_rng, routing_rng, on_token),
        Decoding::Cached => match HostDecoder::for_model(model) {
            Some(decoder) => host(&decoder, prompt, opts, sample_rng, on_token),
            None => generic(model, prompt, opts, sample_rng, routing_rng, on_token),
        },
        Decoding::CachedGeneric => generic(model, prompt, opts, sample_rng, routing_rng, on_token),
    }
}

/// [`generate_with`] [`Decoding::Recompute`], without a token callback.
pub fn generate(
    model: &SwitchTransformer,
    prompt: &[u32],
    opts: &SampleOptions,
    sample_rng: &mut impl Rng,
    routing_rng: &mut RoutingRng,
) -> Vec<u32> {
    let decoding = Decoding::Recompute;
    generate_with(
        model,
        prompt,
        opts,
        decoding,
        sample_rng,
        routing_rng,
        &mut |_| {},
    )
}

/// [`generate_with`] [`Decoding::Cached`], without a token callback.
///
/// ```
/// use burn::tensor::Device;
/// use rand::SeedableRng;
/// use switch_transformer::infer::generate::{SampleOptions, generate, generate_cached};
/// use switch_transformer::{ModelConfig, RoutingRng};
///
/// let config = ModelConfig { n_vocab: 20, n_layers: 2, ..ModelConfig::default() };
/// let model = config.init(1, &Device::default())?;
/// let opts = SampleOptions { max_tokens: 6, temperature: 0.0, top_k: None, context: 64 };
/// let rng = || RoutingRng::seed_from_u64(0);
/// let cached = generate_cached(&model, &[3, 1, 4], &opts, &mut rng(), &mut rng());
/// assert_eq!(cached.len(), 6);
/// // Greedy: the same tokens as recomputing the whole window for every token.
/// assert_eq!(cached, generate(&model, &[3, 1, 4], &opts, &mut rng(), &mut rng()));
/// # anyhow::Ok(())
/// ```
pub fn generate_cached(
    model: &SwitchTransformer,
    prompt: &[u32],
    opts: &SampleOptions,
    sample_rng: &mut impl Rng,
    routing_rng: &mut RoutingRng,
) -> Vec<u32> {
    let decoding = Decoding::Cached;
    generate_with(
        model,
        prompt,
        opts,
        decoding,
        sample_rng,
        routing_rng,
        &mut |_| {},
    )
}

/// [`generate`] that gives up as soon as `stop` is set (checked before each token): `None`
/// then. The training loop's validation sample, so that a stop signal is answered within one
/// token's time rather than after `train.sample_tokens` of them.
pub(crate) fn generate_until(
    model: &SwitchTransformer,
    prompt: &[u32],
    opts: &SampleOptions,
    sample_rng: &mut impl Rng,
    routing_rng: &mut RoutingRng,
    stop: &AtomicBool,
) -> Option<Vec<u32>> {
    assert!(!prompt.is_empty(), "generation needs a non-empty prompt");
    let new = recompute_until(
        model,
        prompt,
        opts,
        sample_rng,
        routing_rng,
        &mut |_| {},
        stop,
    );
    (!stop.load(Ordering::SeqCst)).then_some(new)
}

fn recompute(
    model: &SwitchTransformer,
    prompt: &[u32],
    opts: &SampleOptions,
    sample_rng: &mut impl Rng,
    routing_rng: &mut RoutingRng,
    on_token: &mut dyn FnMut(u32),
) -> Vec<u32> {
    let never = AtomicBool::new(false);
    recompute_until(
        model,
        prompt,
        opts,
        sample_rng,
        routing_rng,
        on_token,
        &never,
    )
}

/// The tokens generated before `stop` was set (all of `opts.max_tokens` if it never is).
fn recompute_until(
    model: &SwitchTransformer,
    prompt: &[u32],
    opts: &SampleOptions,
    sample_rng: &mut impl Rng,
    routing_rng: &mut RoutingRng,
    on_token: &mut dyn FnMut(u32),
    stop: &AtomicBool,
) -> Vec<u32> {
    let device = model.src_embed.weight.device();
    let mut tokens = prompt.to_vec();
    for _ in 0..opts.max_tokens {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let start = tokens.len().saturating_sub(opts.context);
        let ids = sequence_tensor(&tokens[start..], &device);
        let logits = model.forward(ids, routing_rng).logits;
        let next = pick(&last_logits(logits), opts, sample_rng);
        on_token(next);
        tokens.push(next);
    }
    tokens.split_off(prompt.len())
}

fn host(
    decoder: &HostDecoder,
    prompt: &[u32],
    opts: &SampleOptions,
    sample_rng: &mut impl Rng,
    on_token: &mut dyn FnMut(u32),
) -> Vec<u32> {
    let mut cache = decoder.new_cache();
    let start = prompt.len().saturating_sub(opts.context);
    let mut logits = vec![];
    for &t in &prompt[start..] {
        logits = decoder.step(t, &mut cache, opts.context);
    }
    let mut new = Vec::with_capacity(opts.max_tokens);
    for i in 0..opts.max_tokens {
        let next = pick(&logits, opts, sample_rng);
        on_token(next);
        new.push(next);
        if i + 1 < opts.max_tokens {
            logits = decoder.step(next, &mut cache, opts.context);
        }
    }
    new
}

fn generic(
    model: &SwitchTransformer,
    prompt: &[u32],
    opts: &SampleOptions,
    sample_rng: &mut impl Rng,
    routing_rng: &mut RoutingRng,
    on_token: &mut dyn FnMut(u32),
) -> Vec<u32> {
    if model.pos_embed.is_some() {
        // Positions past the embedding's length do not exist: slide the window instead.
        return recompute(model, prompt, opts, sample_rng, routing_rng, on_token);
    }
    let mut model = model.clone();
    model.set_drop_tokens(false);
    let device = model.src_embed.weight.device();
    let mut cache = vec![KvCache::default(); model.n_layers()];
    let start = prompt.len().saturating_sub(opts.context);
    let mut feed: Vec<u32> = prompt[start..].to_vec();
    let mut new = Vec::with_capacity(opts.max_tokens);
    for _ in 0..opts.max_tokens {
        let ids = sequence_tensor(&feed, &device);
        let logits = model.forward_cached(ids, &mut cache, opts.context, routing_rng);
        let next = pick(&last_logits(logits), opts, sample_rng);
        on_token(next);
        new.push(next);
        feed = vec![next];
    }
    new
}
