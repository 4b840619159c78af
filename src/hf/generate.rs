//! Decoding the encoder-decoder, greedily or sampled, with a cache or without.
//!
//! ```text
//! enc = encoder(input)                                    once
//! cached:   per step, the decoder on the last token; self-attention keys/values appended,
//!           cross-attention keys/values computed once from enc
//! uncached: per step, the decoder on the whole prefix (each sparse layer routing every
//!           position alone, as the cached decoder routes its one new token)
//! next = argmax (first on ties), or a sample of softmax(logits / T) over the top k
//! ```
//! Both give transformers' tokens: its `generate` decodes with the cache, where a sparse
//! layer routes one token per sequence per step, so capacity never drops a generated token.

use anyhow::Result;
use burn::tensor::Tensor;
use rand::Rng;

use super::model::{Encoded, HfSwitchTransformer};
use super::sparse::Grouping;
use crate::infer::generate::{SampleOptions, pick};
use crate::store::host_f32;

/// Decodes `opts.max_tokens` tokens after the decoder start token for each of the `b`
/// encoded sequences; returns `[b][1 + n]` ids. With `stop` (the end-of-sequence id), a
/// sequence that produced it gets padding (`pad`) after it, and decoding ends early when every
/// sequence has.
pub fn generate(
    model: &HfSwitchTransformer,
    enc: &Encoded,
    opts: &SampleOptions,
    cached: bool,
    stop: Option<(i64, i64)>,
    rng: &mut impl Rng,
) -> Result<Vec<Vec<i64>>> {
    generate_with(model, enc, opts, cached, stop, rng, &mut |_| {})
}

/// [`generate`], calling `on_step(n)` after the `n`-th token of every sequence (a progress
/// bar's hook).
pub fn generate_with(
    model: &HfSwitchTransformer,
    enc: &Encoded,
    opts: &SampleOptions,
    cached: bool,
    stop: Option<(i64, i64)>,
    rng: &mut impl Rng,
    on_step: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<i64>>> {
    let b = enc.hidden.dims()[0];
    let start = model.config.decoder_start();
    let mut out: Vec<Vec<i64>> = vec![vec![start]; b];
    let mut done = vec![false; b];
    let mut cache = cached.then(|| model.decoder_cache(enc));
    for step in 1..=opts.max_tokens {
        let (ids, t): (Vec<i64>, usize) = match cache {
            Some(_) => (out.iter().map(|r| *r.last().unwrap()).collect(), 1),
            None => (out.concat(), out[0].len()),
        };
        let (logits, _) = model.decode(&ids, b, t, enc, cache.as_mut(), Grouping::PerToken)?;
        for (r, row) in last_logits(logits).iter().enumerate() {
            let tok = match stop {
                Some((_, pad)) if done[r] => pad,
                _ => pick(row, opts, rng) as i64,
            };
            if stop.is_some_and(|(eos, _)| tok == eos) {
                done[r] = true;
            }
            out[r].push(tok);
        }
        on_step(step);
        if stop.is_some() && done.iter().all(|&d| d) {
            break;
        }
    }
    Ok(out)
}

/// Greedy decoding of `steps` tokens, end of sequence not stopping it (as the fixtures
/// record transformers' tokens).
pub fn greedy(
    model: &HfSwitchTransformer,
    enc: &Encoded,
    steps: usize,
    cached: bool,
) -> Result<Vec<Vec<i64>>> {
    let opts = SampleOptions {
        max_tokens: steps,
        temperature: 0.0,
        top_k: None,
        context: usize::MAX,
    };
    // Greedy picks draw nothing.
    let mut rng = <crate::routing::RoutingRng as rand::SeedableRng>::seed_from_u64(0);
    generate(model, enc, &opts, cached, None, &mut rng)
}

/// The logits of every sequence's last position of `logits` `[b, t, vocab]`.
pub(crate) fn last_logits(logits: Tensor<3>) -> Vec<Vec<f32>> {
    let [b, t, v] = logits.dims();
    let last = logits.slice([0..b, t - 1..t, 0..v]);
    host_f32(last)
        .chunks_exact(v)
        .map(<[f32]>::to_vec)
        .collect()
}
