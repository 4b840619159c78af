//! `switch sample`: text from a trained run (cached, or recomputed as labml's sampler).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use rand::SeedableRng;
use switch_transformer::RoutingRng;
use switch_transformer::infer::generate::{Decoding, SampleOptions, generate_with};
use switch_transformer::train::load_run_model;

/// Generate text from a trained run.
#[derive(clap::Args)]
pub struct SampleArgs {
    /// Run directory (uses best/ if present, else the latest checkpoint).
    #[arg(long)]
    pub run: PathBuf,
    #[arg(long, default_value = "It is")]
    pub prompt: String,
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Drop over-capacity tokens while generating (labml's sampler does; implies
    /// --recompute).
    #[arg(long)]
    pub drop_tokens: bool,
    /// Recompute the whole window for every token, as labml's sampler does, instead of
    /// caching keys and values (the same text within the context; beyond it, the cache
    /// attends to a sliding window).
    #[arg(long)]
    pub recompute: bool,
}

/// Runs the command.
pub fn run(args: SampleArgs, device: &Device) -> Result<ExitCode> {
    let SampleArgs {
        run,
        prompt,
        max_tokens,
        temperature,
        top_k,
        seed,
        drop_tokens,
        recompute,
    } = args;

    SampleOptions {
        max_tokens,
        temperature,
        top_k,
        context: 1,
    }
    .check()?;
    if prompt.is_empty() {
        bail!("--prompt must not be empty");
    }
    let (config, vocab, mut model) = load_run_model(&run, device)?;
    model.set_drop_tokens(drop_tokens);
    let ids = vocab.encode(&prompt).context("--prompt")?;
    let opts = SampleOptions {
        max_tokens,
        temperature,
        top_k,
        context: config.train.seq_len,
    };
    let mut rng = RoutingRng::seed_from_u64(seed);
    // The text appears as it is generated (flushed at each line and every 64 tokens).
    let mut out = std::io::stdout().lock();
    write!(out, "{prompt}")?;
    let mut written = 0usize;
    let mut on_token = |t: u32| {
        let text = vocab.decode(&[t]);
        // A write error (a closed pipe ends the process before: SIGPIPE) stops nothing here.
        let _ = out.write_all(text.as_bytes());
        written += 1;
        if text.contains('\n') || written.is_multiple_of(64) {
            let _ = out.flush();
        }
    };
    let decoding = if recompute || drop_tokens {
        Decoding::Recompute
    } else {
        Decoding::Cached
    };
    let sample_rng = &mut rng.clone();
    generate_with(
        &model,
        &ids,
        &opts,
        decoding,
        sample_rng,
        &mut rng,
        &mut on_token,
    );
    writeln!(out)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
