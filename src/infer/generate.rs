//! Autoregressive generation: feed the last `context` tokens, take the next-token logits,
//! pick greedily (temperature 0) or sample with temperature and top-k.

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

/// Generates `opts.max_tokens` tokens after `prompt` (non-empty), recomputing the whole
/// window for each new token. Returns only the new tokens.
pub fn generate(
    model: &SwitchTransformer,
    prompt: &[u32],
    opts: &SampleOptions,
    sample_rng: &mut impl Rng,
    routing_rng: &mut RoutingRng,
) -> Vec<u32> {
    generate_streaming(model, prompt, opts, sample_rng, routing_rng, &mut |_| {})
}

/// [`generate`], handing each new token to `on_token` as soon as it is picked.
pub fn generate_streaming(
    model: &SwitchTransformer,
    prompt: &[u32],
    opts: &SampleOptions,
    sample_rng: &mut impl Rng,
    routing_rng: &mut RoutingRng,
    on_token: &mut dyn FnMut(u32),
) -> Vec<u32> {
    assert!(!prompt.is_empty(), "generation needs a non-empty prompt");
    let device = model.src_embed.weight.device();
    let mut tokens = prompt.to_vec();
    for _ in 0..opts.max_tokens {
        let start = tokens.len().saturating_sub(opts.context);
        let ids = sequence_tensor(&tokens[start..], &device);
        let logits = model.forward(ids, routing_rng).logits;
        let next = pick(&last_logits(logits), opts, sample_rng);
        on_token(next);
        tokens.push(next);
    }
    tokens.split_off(prompt.len())
}

/// Like [`generate`], but each new token costs one position: keys and values of earlier
/// positions are cached. Identical to [`generate`] while the text fits in `opts.context` (up to
/// rounding); beyond it, each position attends to the `context` most recent ones (a sliding
/// window) instead of the window being recomputed. Token dropping is off (one token at a time
/// would have capacity 0). On the CPU backend an f32 model decodes with plain loops
/// ([`HostDecoder`]); elsewhere through Burn ([`generate_cached_generic`]). A model with
/// learned positional embeddings recomputes the window.
pub fn generate_cached(
    model: &SwitchTransformer,
    prompt: &[u32],
    opts: &SampleOptions,
    sample_rng: &mut impl Rng,
    routing_rng: &mut RoutingRng,
) -> Vec<u32> {
    generate_cached_streaming(model, prompt, opts, sample_rng, routing_rng, &mut |_| {})
}

/// [`generate_cached`], handing each new token to `on_token` as soon as it is picked.
pub fn generate_cached_streaming(
    model: &SwitchTransformer,
    prompt: &[u32],
    opts: &SampleOptions,
    sample_rng: &mut impl Rng,
    routing_rng: &mut RoutingRng,
    on_token: &mut dyn FnMut(u32),
) -> Vec<u32> {
    assert!(!prompt.is_empty(), "generation needs a non-empty prompt");
    let Some(decoder) = HostDecoder::for_model(model) else {
        return generic(model, prompt, opts, sample_rng, routing_rng, on_token);
    };
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

/// [`generate_cached`] through Burn's tensor ops: any backend and precision.
pub fn generate_cached_generic(
    model: &SwitchTransformer,
    prompt: &[u32],
    opts: &SampleOptions,
    sample_rng: &mut impl Rng,
    routing_rng: &mut RoutingRng,
) -> Vec<u32> {
    generic(model, prompt, opts, sample_rng, routing_rng, &mut |_| {})
}

fn generic(
    model: &SwitchTransformer,
    prompt: &[u32],
    opts: &SampleOptions,
    sample_rng: &mut impl Rng,
    routing_rng: &mut RoutingRng,
    on_token: &mut dyn FnMut(u32),
) -> Vec<u32> {
    assert!(!prompt.is_empty(), "generation needs a non-empty prompt");
    if model.pos_embed.is_some() {
        // Positions past the embedding's length do not exist: slide the window instead.
        return generate_streaming(model, prompt, opts, sample_rng, routing_rng, on_token);
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
