//! `switch finetune`: fine-tune a Hugging Face Switch Transformers checkpoint on JSON lines
//! ([`switch_transformer::hf::finetune`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use burn::tensor::Device;

use switch_transformer::hf::finetune::run::{FinetuneArgs as RunArgs, FinetuneConfig, finetune};

/// Fine-tune a Hugging Face Switch Transformers checkpoint as transformers' `Trainer` does
/// (its loss with the router losses, AdamW, linear schedule, global-norm clipping); writes
/// runs/NAME/ with the model in Hugging Face's layout.
#[derive(clap::Args)]
pub struct FinetuneArgs {
    /// The model folder: config.json, safetensors weights, tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Training pairs: one JSON object per line, {"input": "...", "target": "..."}.
    #[arg(long)]
    pub train: PathBuf,
    /// Validation pairs (same format): loss and ROUGE before, during and after.
    #[arg(long)]
    pub valid: Option<PathBuf>,
    /// The run is written to RUNS_DIR/NAME/.
    #[arg(long, default_value = "finetune")]
    pub name: String,
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// Settings, e.g. --set learning_rate=1e-4 --set max_steps=300 (`--set help` lists them).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

/// Runs the command.
pub fn run(args: FinetuneArgs, device: &Device) -> Result<ExitCode> {
    let mut config = FinetuneConfig::default();
    if args.overrides.iter().any(|s| s == "help") {
        print!("{}", toml::to_string(&config)?);
        return Ok(ExitCode::SUCCESS);
    }
    for s in &args.overrides {
        config.set(s)?;
    }
    let summary = finetune(
        RunArgs {
            model: args.model,
            train: args.train,
            valid: args.valid,
            run_dir: args.runs_dir.join(&args.name),
            config,
        },
        device,
        &mut |line| println!("{line}"),
    )?;
    if let Some((before, after)) = summary.valid {
        println!(
            "validation: loss {:.4} -> {:.4}, ROUGE-L {:.4} -> {:.4}",
            before.loss, after.loss, before.rouge[2], after.rouge[2]
        );
    }
    println!(
        "{} updates, last loss {:.4}, {:.1} target tokens/s ({:.3} s per update, after the \
         first); the model: {}",
        summary.updates,
        summary.last_loss,
        summary.tokens_per_s,
        summary.update_s,
        summary.model_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
