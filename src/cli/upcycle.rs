//! `switch upcycle`: a dense run into a Switch run that `switch train --resume` continues
//! (sparse upcycling; [`switch_transformer::train::upcycle`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use burn::tensor::Device;

use switch_transformer::train::RunDir;
use switch_transformer::train::upcycle::{switch_config, upcycle};

/// Turn a dense run (its latest checkpoint) into a Switch run: every expert a copy of its
/// block's FFN, the router fresh; continue it with `switch train --resume runs/NAME`.
#[derive(clap::Args)]
pub struct UpcycleArgs {
    /// The dense run (model.switch_every = 0), e.g. runs/compare/dense.
    #[arg(long)]
    pub run: PathBuf,
    /// Experts per Switch layer.
    #[arg(long, default_value_t = 8)]
    pub experts: usize,
    /// A Switch layer every k-th block (1: every block).
    #[arg(long, default_value_t = 1)]
    pub every: usize,
    /// Model settings of the new run, e.g. --set model.top_k=2 (model.* keys only).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Seed of the fresh tensors (routers).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The new run is written to runs/NAME/.
    #[arg(long)]
    pub name: String,
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
}

/// Runs the command.
pub fn run(args: UpcycleArgs, device: &Device) -> Result<ExitCode> {
    let dense = RunDir::new(&args.run).read_config()?;
    let config = switch_config(&dense, args.experts, args.every, &args.overrides)?;
    let out = args.runs_dir.join(&args.name);
    let made = upcycle(&args.run, &out, &config, args.seed, device)?;
    println!(
        "upcycled {} at step {} into {}: {} -> {} parameters, {} Switch layers of {} experts \
         (copies of the dense FFN); drawn fresh: {}",
        args.run.display(),
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
