//! `switch finetune`: fine-tune a Hugging Face Switch Transformers checkpoint on JSON lines
//! ([`switch_transformer::hf::finetune`]); Ctrl-C or SIGTERM stops it after the current update
//! with a checkpoint, and `--resume` continues it exactly.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;

use switch_transformer::hf::finetune::config::FinetuneConfig;
use switch_transformer::hf::finetune::run::{FinetuneArgs as RunArgs, finetune, resume_args};

/// Fine-tune a Hugging Face Switch Transformers checkpoint as transformers' `Trainer` does
/// (its loss with the router losses, AdamW, linear schedule, global-norm clipping); writes
/// runs/NAME/ with the model in Hugging Face's layout.
#[derive(clap::Args)]
pub struct FinetuneArgs {
    /// The model folder: config.json, safetensors weights, tokenizer.json.
    #[arg(long, required_unless_present = "resume")]
    pub model: Option<PathBuf>,
    /// Training pairs: one JSON object per line, {"input": "...", "target": "..."}.
    #[arg(long, required_unless_present = "resume")]
    pub train: Option<PathBuf>,
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
    /// Continue a stopped run (runs/NAME) from its latest checkpoint, with its own settings
    /// and files: the same weights and metrics as a run never stopped.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["model", "train", "valid", "overrides"])]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub distributed: super::DistributedArgs,
}

/// Runs the command.
pub fn run(args: FinetuneArgs, device: &Device) -> Result<ExitCode> {
    if args.distributed.expert_parallel {
        bail!(
            "finetune splits the data over the ranks (data parallelism); --expert-parallel is \
             `switch train`'s: leave it out"
        );
    }
    let world = args.distributed.join()?;
    let writer = world.as_ref().is_none_or(|w| w.rank() == 0);
    let mut run_args = match &args.resume {
        Some(dir) => resume_args(dir)?,
        None => {
            let mut config = FinetuneConfig::default();
            if args.overrides.iter().any(|s| s == "help") {
                print!("{}", toml::to_string(&config)?);
                return Ok(ExitCode::SUCCESS);
            }
            for s in &args.overrides {
                config.set(s)?;
            }
            let (Some(model), Some(train)) = (args.model, args.train) else {
                bail!("give --model DIR --train FILE (or --resume RUN_DIR)");
            };
            RunArgs {
                model,
                train,
                valid: args.valid,
                run_dir: args.runs_dir.join(&args.name),
                config,
                resume: false,
                stop: None,
                world: None,
            }
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second signal leaves at once, releasing the run's lock (rank 0's).
        let lock = writer.then(|| run_args.run_dir.join("lock"));
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                if let Some(lock) = &lock {
                    let _ = std::fs::remove_file(lock);
                }
                eprintln!("second signal: stopped at once, without a checkpoint of this update");
                std::process::exit(130);
            }
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    run_args.stop = Some(stop);
    run_args.world = world;
    let summary = finetune(run_args, device, &mut |line| println!("{line}"))?;
    if summary.stopped {
        return Ok(ExitCode::from(130));
    }
    if !writer {
        return Ok(ExitCode::SUCCESS);
    }
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
