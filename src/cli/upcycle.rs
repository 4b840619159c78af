//! `switch upcycle`: sparse upcycling, of a dense run into a Switch run that `switch train
//! --resume` continues ([`switch_transformer::train::upcycle`]), or of a dense Hugging Face T5
//! into a Switch Transformers model ([`switch_transformer::hf::upcycle`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use burn::tensor::Device;

use switch_transformer::hf::checkpoint::SaveDtype;
use switch_transformer::hf::upcycle::{Router, UpcycleOptions, upcycle as upcycle_t5};
use switch_transformer::train::RunDir;
use switch_transformer::train::upcycle::{switch_config, upcycle};

/// Turn a dense model into a Switch model whose experts are copies of its FFNs: a dense run
/// (its latest checkpoint; continue it with `switch train --resume runs/NAME`), or with
/// `--model` a Hugging Face T5 (`T5ForConditionalGeneration`, relu FFNs: T5 v1.0) into a
/// `SwitchTransformersForConditionalGeneration` folder (`--out`) that transformers loads and
/// `switch finetune` trains.
#[derive(clap::Args)]
pub struct UpcycleArgs {
    /// The dense run (model.switch_every = 0), e.g. runs/compare/dense.
    #[arg(long, conflicts_with = "model", required_unless_present = "model")]
    pub run: Option<PathBuf>,
    /// Or: a dense Hugging Face T5 folder (config.json, safetensors, tokenizer files).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Experts per Switch layer.
    #[arg(long, default_value_t = 8)]
    pub experts: usize,
    /// A Switch layer every k-th block (1: every block); a run only.
    #[arg(long, default_value_t = 1, conflicts_with = "model")]
    pub every: usize,
    /// Model settings of the new run, e.g. --set model.top_k=2 (model.* keys only); a run only.
    #[arg(long = "set", value_name = "KEY=VALUE", conflicts_with = "model")]
    pub overrides: Vec<String>,
    /// Seed of the fresh tensors (routers).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The new run is written to runs/NAME/ (with --run).
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    pub name: Option<String>,
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// The new Hugging Face model folder (with --model; must not exist).
    #[arg(long, requires = "model")]
    pub out: Option<PathBuf>,
    /// Encoder blocks made sparse (transformers' rule: every (layers / n)-th from block 1;
    /// default: half of them, as in google/switch-base-8).
    #[arg(long, requires = "model")]
    pub encoder_sparse: Option<usize>,
    /// Decoder blocks made sparse (default: half of them).
    #[arg(long, requires = "model")]
    pub decoder_sparse: Option<usize>,
    /// With --model: tokens each expert takes per sequence, the rest dropped (transformers'
    /// `expert_capacity`).
    #[arg(long, default_value_t = 64)]
    pub expert_capacity: usize,
    /// With --model: how the routers start, `paper` (truncated normal, scale 0.1) or `zero`
    /// (exactly the dense function when nothing is dropped; a check, not a start for training).
    #[arg(long, value_enum, default_value_t = Router::Paper)]
    pub router: Router,
    /// Precision of the written weights (with --model).
    #[arg(long, value_enum, default_value_t = SaveDtype::F32)]
    pub dtype: SaveDtype,
}

/// Runs the command.
pub fn run(args: UpcycleArgs, device: &Device) -> Result<ExitCode> {
    if let Some(model) = &args.model {
        return run_t5(model, &args);
    }
    let (Some(run), Some(name)) = (&args.run, &args.name) else {
        bail!("give --run DIR --name NAME (a dense run), or --model DIR --out DIR (a T5)");
    };
    let dense = RunDir::new(run).read_config()?;
    let config = switch_config(&dense, args.experts, args.every, &args.overrides)?;
    let out = args.runs_dir.join(name);
    let made = upcycle(run, &out, &config, args.seed, device)?;
    println!(
        "upcycled {} at step {} into {}: {} -> {} parameters, {} Switch layers of {} experts \
         (copies of the dense FFN); drawn fresh: {}",
        run.display(),
        made.step,
        out.display(),
        made.params.0,
        made.params.1,
        config.model.n_switch_layers(),
        config.model.n_experts,
        made.fresh.join(", ")
    );
    println!(
        "continue it with: switch train --resume {} [--set train.steps=N]",
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn run_t5(model: &std::path::Path, args: &UpcycleArgs) -> Result<ExitCode> {
    let Some(out) = &args.out else {
        bail!("--model needs --out DIR: the folder the Switch model is written to");
    };
    let options = UpcycleOptions {
        experts: args.experts,
        encoder_sparse: args.encoder_sparse,
        decoder_sparse: args.decoder_sparse,
        expert_capacity: args.expert_capacity,
        router: args.router,
        seed: args.seed,
        dtype: args.dtype,
    };
    let made = upcycle_t5(model, out, &options)?;
    println!(
        "upcycled {} into {}: {} -> {} parameters; {} experts (copies of the dense FFN, wo x {}) \
         in encoder blocks {:?} and decoder blocks {:?}; routers {:?}; expert capacity {} \
         tokens per sequence",
        model.display(),
        out.display(),
        made.params.0,
        made.params.1,
        args.experts,
        args.experts,
        made.sparse.0,
        made.sparse.1,
        args.router,
        args.expert_capacity
    );
    println!(
        "fine-tune it with: switch finetune --model {} --train FILE.jsonl",
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}
