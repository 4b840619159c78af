//! Timing a Hugging Face Switch Transformers model as `benchmarks/hf.sh` compares it with
//! transformers: random token ids (seeded), the encoder alone, then greedy generation of a
//! fixed number of tokens with the cache (end of sequence not stopping it); best of `repeat`
//! after one warm-up each; the peak RSS of the whole process, loading included.

use std::time::Instant;

use anyhow::Result;
use rand::{Rng, SeedableRng};

use crate::hf::HfSwitchTransformer;
use crate::hf::generate::greedy;
use crate::routing::RoutingRng;

/// What one benchmark measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HfBench {
    /// This implementation.
    pub r#impl: String,
    /// Rayon threads.
    pub threads: usize,
    /// Sequences.
    pub batch: usize,
    /// Encoder tokens per sequence.
    pub src_len: usize,
    /// Generated tokens per sequence.
    pub new_tokens: usize,
    /// `batch * src_len` over the encoder's time.
    pub encoder_tokens_per_s: f64,
    /// `batch * new_tokens` over the generation's time (encoder included, as
    /// transformers' `generate` includes it).
    pub generate_tokens_per_s: f64,
    /// Seconds of the fastest encoder pass.
    pub encoder_s: f64,
    /// Seconds of the fastest generation.
    pub generate_s: f64,
    /// Peak resident memory of the process, MB.
    pub peak_rss_mb: f64,
}

fn best(repeat: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let mut best = f64::INFINITY;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Times `model` on `batch` random sequences of `src_len` tokens.
pub fn run(
    model: &HfSwitchTransformer,
    batch: usize,
    src_len: usize,
    new_tokens: usize,
    repeat: usize,
) -> Result<HfBench> {
    let mut rng = RoutingRng::seed_from_u64(1);
    let vocab = model.config.vocab_size as i64;
    let ids: Vec<i64> = (0..batch * src_len)
        .map(|_| rng.random_range(2..vocab))
        .collect();
    let mask = vec![1i64; ids.len()];
    let encoder_s = best(repeat, || {
        let enc = model.encode(&ids, &mask, batch, src_len)?;
        crate::store::host_f32(enc.hidden.sum());
        Ok(())
    })?;
    let generate_s = best(repeat, || {
        let enc = model.encode(&ids, &mask, batch, src_len)?;
        let out = greedy(model, &enc, new_tokens, true)?;
        anyhow::ensure!(out[0].len() == new_tokens + 1);
        Ok(())
    })?;
    Ok(HfBench {
        r#impl: format!("switch-transformer {}", env!("CARGO_PKG_VERSION")),
        threads: rayon::current_num_threads(),
        batch,
        src_len,
        new_tokens,
        encoder_tokens_per_s: (batch * src_len) as f64 / encoder_s,
        generate_tokens_per_s: (batch * new_tokens) as f64 / generate_s,
        encoder_s,
        generate_s,
        peak_rss_mb: super::bench::peak_rss_mb(),
    })
}
