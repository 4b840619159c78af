//! Timing a Hugging Face Switch Transformers model as `benchmarks/hf.sh` compares it with
//! transformers: random token ids (seeded), the encoder alone, then greedy generation of a
//! fixed number of tokens with the cache (end of sequence not stopping it); best of `repeat`
//! after one warm-up each; the peak RSS of the whole process, loading included.

use std::time::Instant;

use anyhow::Result;
use rand::{Rng, SeedableRng};

use switch_transformer::hf::HfSwitchTransformer;
use switch_transformer::hf::generate::greedy;
use switch_transformer::routing::RoutingRng;

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
    /// The dtype the linear layers are held in (`F32`, or `BF16` from a bf16 checkpoint on the
    /// CPU).
    pub weights: String,
    /// The instruction set of the CPU kernels (`SWITCH_SIMD` caps it).
    pub simd: String,
    /// Bytes of weights one decoding step reads at batch 1 (attention, cross-attention's
    /// query and output, one expert or the dense FFN, the routers, the output layer).
    pub decode_weight_bytes: f64,
}

/// Bytes of weights a decoding step of one sequence reads: the bound on its speed is the
/// memory bandwidth over this.
pub(crate) fn decode_weight_bytes(model: &HfSwitchTransformer) -> f64 {
    let c = &model.config;
    let per = if model.weights_dtype() == burn::tensor::DType::BF16 {
        2.0
    } else {
        4.0
    };
    let (d, inner, ff) = (c.d_model as f64, c.inner_dim() as f64, c.d_ff as f64);
    let mut elements = d * c.vocab_size as f64;
    let mut router = 0.0;
    for i in 0..c.decoder_layers() {
        elements += 6.0 * d * inner + 2.0 * d * ff;
        if c.is_sparse(true, i) {
            router += d * c.num_experts as f64;
        }
    }
    elements * per + router * 4.0
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
        switch_transformer::store::host_f32(enc.hidden.sum());
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
        peak_rss_mb: switch_transformer::tools::bench::peak_rss_mb(),
        weights: format!("{:?}", model.weights_dtype()),
        simd: switch_transformer::cpu::Isa::selected().name().to_string(),
        decode_weight_bytes: decode_weight_bytes(model),
    })
}
