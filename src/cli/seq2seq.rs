//! `switch seq2seq` and `switch convert`: a Hugging Face Switch Transformers checkpoint
//! (`google/switch-base-8` and up, downloaded by the user) run and re-saved.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use switch_transformer::RoutingRng;
use switch_transformer::hf::HfSwitchTransformer;
use switch_transformer::hf::checkpoint::SaveDtype;
use switch_transformer::hf::generate::generate_with;
use switch_transformer::hf::tokenize::HfTokenizer;
use switch_transformer::infer::generate::SampleOptions;

/// Fill in text with a Hugging Face Switch Transformers checkpoint (span corruption:
/// `<extra_id_N>` marks the spans to fill).
#[derive(clap::Args)]
pub struct Seq2seqArgs {
    /// Model directory: config.json, model.safetensors (or shards), tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Input text (repeat for a batch).
    #[arg(long)]
    pub input: Vec<String>,
    /// A file of inputs, one per line (added to --input).
    #[arg(long)]
    pub input_file: Option<PathBuf>,
    /// Tokens to generate per input.
    #[arg(long, default_value_t = 20)]
    pub max_tokens: usize,
    /// 0 = greedy; otherwise sample from softmax(logits / temperature).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample only among the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Recompute the whole output for every token instead of caching keys and values (the
    /// same tokens, slower).
    #[arg(long)]
    pub no_cache: bool,
    /// Keep generating after the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Also print the token ids.
    #[arg(long)]
    pub ids: bool,
    /// Benchmark instead (benchmarks/hf.sh): random inputs of --batch x --src-len tokens, the
    /// encoder and --max-tokens greedy tokens timed (best of --repeat); prints one JSON line.
    #[arg(long)]
    pub bench: bool,
    /// With --bench: sequences.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// With --bench: input tokens per sequence.
    #[arg(long, default_value_t = 64)]
    pub src_len: usize,
    /// With --bench: timed repetitions.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
}

/// Runs the command, on the CPU on a worker of the thread pool (so that its parallel ops do
/// not each wake the pool while this thread sleeps; see `cpu::on_worker`).
pub fn run(args: Seq2seqArgs, device: &Device) -> Result<ExitCode> {
    switch_transformer::cpu::on_worker(device, || run_here(args, device))
}

fn run_here(args: Seq2seqArgs, device: &Device) -> Result<ExitCode> {
    if args.bench {
        if args.batch == 0 || args.src_len == 0 || args.repeat == 0 || args.max_tokens == 0 {
            bail!("--batch, --src-len, --repeat and --max-tokens must be at least 1 with --bench");
        }
        let model = HfSwitchTransformer::load(&args.model, device)?;
        let r = super::hf_bench::run(
            &model,
            args.batch,
            args.src_len,
            args.max_tokens,
            args.repeat,
        )?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    let opts = SampleOptions {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        context: usize::MAX,
    };
    opts.check()?;
    let mut inputs = args.input.clone();
    if let Some(f) = &args.input_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read --input-file {}", f.display()))?;
        inputs.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    if inputs.is_empty() {
        bail!("no input: give --input TEXT (repeatable) or --input-file FILE");
    }
    let t0 = Instant::now();
    let model = HfSwitchTransformer::load(&args.model, device)?;
    let c = &model.config;
    let tok = HfTokenizer::load(&args.model, c.pad())?;
    let batch = tok.encode(&inputs)?;
    // What the input will take, refused before anything is allocated when it cannot fit
    // (attention is quadratic in the input's length).
    let need = c.run_bytes(batch.batch, batch.len, args.max_tokens);
    if let Some(avail) = switch_transformer::train::memory::available()
        && need > avail as u128
    {
        let gib = |x: u128| x as f64 / (1u64 << 30) as f64;
        bail!(
            "{} input(s) of up to {} tokens with --max-tokens {} need about {:.1} GiB (attention \
             grows with the square of the input's length) but {:.1} GiB is available: split the \
             input into shorter pieces",
            batch.batch,
            batch.len,
            args.max_tokens,
            gib(need),
            gib(avail as u128)
        );
    }
    eprintln!(
        "loaded {} in {:.1} s",
        args.model.display(),
        t0.elapsed().as_secs_f64()
    );

    let t1 = Instant::now();
    let enc = model.encode(&batch.ids, &batch.mask, batch.batch, batch.len)?;
    let stop = match (args.ignore_eos, c.eos_token_id) {
        (false, Some(eos)) => Some((eos, c.pad())),
        _ => None,
    };
    let mut rng = RoutingRng::seed_from_u64(args.seed);
    // On a terminal, a progress bar (standard error) while the tokens are generated: they are
    // printed only when every sequence is done.
    let bar = ProgressBar::new(args.max_tokens as u64).with_style(
        ProgressStyle::with_template("generating {pos}/{len} tokens {per_sec} (up to {eta})")
            .expect("valid template"),
    );
    let mut on_step = |n: usize| bar.set_position(n as u64);
    let out = generate_with(
        &model,
        &enc,
        &opts,
        !args.no_cache,
        stop,
        &mut rng,
        &mut on_step,
    );
    bar.finish_and_clear();
    let out = out?;
    let new: usize = out.iter().map(|r| r.len() - 1).sum();
    for (input, row) in inputs.iter().zip(&out) {
        println!("input:  {input}");
        println!("output: {}", tok.decode(&row[1..], true)?);
        if args.ids {
            println!("ids:    {row:?}");
        }
    }
    let s = t1.elapsed().as_secs_f64();
    eprintln!(
        "{new} tokens for {} inputs in {s:.2} s ({:.1} tokens/s, {})",
        inputs.len(),
        new as f64 / s,
        if args.no_cache { "no cache" } else { "cached" }
    );
    Ok(ExitCode::SUCCESS)
}

/// Load a Hugging Face Switch Transformers checkpoint and save it again (another precision,
/// one file instead of shards); the result loads in transformers and here.
#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Model directory to read.
    #[arg(long)]
    pub model: PathBuf,
    /// New directory to write (config.json, model.safetensors, tokenizer.json if present).
    #[arg(long)]
    pub out: PathBuf,
    /// Precision of the saved weights.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: SaveDtype,
}

/// Runs `switch convert`.
///
/// The new directory appears whole or not at all: everything is written into a sibling
/// directory first (`.NAME.partial-PID`), which is renamed into place at the end and removed if
/// anything fails (a full disk, a file that cannot be read), so a retry starts clean.
pub fn convert(args: ConvertArgs, device: &Device) -> Result<ExitCode> {
    let out = &args.out;
    switch_transformer::hf::checkpoint::refuse_existing(out)?;
    let model = HfSwitchTransformer::load(&args.model, device)?;
    switch_transformer::hf::checkpoint::write_dir_whole(out, |partial| {
        model.save(partial, args.dtype)?;
        switch_transformer::hf::checkpoint::copy_model_files(&args.model, partial)
    })?;
    println!("saved {} ({:?})", out.display(), args.dtype);
    Ok(ExitCode::SUCCESS)
}
