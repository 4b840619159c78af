//! `switch compare`: dense baseline vs Switch models at equal compute per token.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use burn::tensor::Device;
pub mod study;
#[cfg(test)]
mod tests;

use switch_transformer::train::{Event, RunConfig};

use super::{DEFAULT_DATA, load_data};

/// Train a dense baseline and Switch models with more and more experts at equal compute
/// per token (same steps, same seed); write a table and a plot of validation loss.
#[derive(clap::Args)]
pub struct CompareArgs {
    #[arg(long, default_value = DEFAULT_DATA)]
    pub data: PathBuf,
    /// Base configuration (default: a small model, see the printed table header).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Expert counts of the Switch models.
    #[arg(long, value_delimiter = ',', default_value = "2,4,8,16")]
    pub experts: Vec<usize>,
    /// The comparison is written to runs/NAME/ (finished runs there are reused).
    #[arg(long, default_value = "compare")]
    pub name: String,
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
}

/// Runs the command.
pub fn run(args: CompareArgs, device: &Device) -> Result<ExitCode> {
    let CompareArgs {
        data,
        config,
        overrides,
        experts,
        name,
        runs_dir,
    } = args;

    let mut base = match config {
        Some(path) => RunConfig::from_toml_file(&path)?,
        None => study::default_base(),
    };
    for o in &overrides {
        base.set(o)?;
    }
    base.validate()?;
    if experts.contains(&0) {
        bail!("--experts: each count must be at least 1");
    }
    let (text, _) = load_data(&data, base.train.seq_len)?;
    let dir = runs_dir.join(name);
    let entries = study::run(&base, &experts, &text, &dir, device, &mut |label, e| {
        if let Event::Validation { step, metrics, .. } = e {
            println!("{label:>10} step {step:>5}: valid loss {:.4}", metrics.loss);
        }
    })?;
    println!("{}", study::table(&base, &entries));
    println!(
        "wrote {} and {}",
        dir.join("compare.md").display(),
        dir.join("compare.svg").display()
    );
    Ok(ExitCode::SUCCESS)
}
