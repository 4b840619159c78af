//! `switch compare`: dense baseline vs Switch models at equal compute per token.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use burn::tensor::Device;
pub mod grid;
pub mod study;
#[cfg(test)]
mod tests;

use switch_transformer::train::{Event, RunConfig};

use super::{DEFAULT_DATA, load_data};

/// Train a dense baseline and Switch models with more and more experts at equal compute
/// per token (same steps, same seed); write a table and a plot of validation loss. With
/// `--study routing`: option sets (by default the routing methods after the paper, at equal
/// compute per token) over several seeds, in a table of mean ± standard deviation.
#[derive(clap::Args)]
pub struct CompareArgs {
    /// experts: dense vs Switch with more and more experts; routing: a grid of option sets
    /// (`--variant`) over `--seeds`.
    #[arg(long, value_enum, default_value = "experts")]
    pub study: Study,
    /// With --study routing: an option set `LABEL:key=value,key=value` (repeatable; default:
    /// switch, bias, shared, fine-grained, combined at the base's compute per token).
    #[arg(long = "variant", value_name = "LABEL:KEY=VALUE,...")]
    pub variants: Vec<String>,
    /// With --study routing: the seeds each option set trains from.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// With --study routing: the steps whose validation loss the table shows.
    #[arg(long, value_delimiter = ',', default_value = "1000,3000")]
    pub at: Vec<u64>,
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
    /// The comparison is written to runs/NAME/ (finished runs there are reused) [default:
    /// compare, or routing with --study routing].
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
}

/// Which comparison `switch compare` makes.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Study {
    /// Dense vs Switch with more and more experts.
    Experts,
    /// A grid of option sets over several seeds.
    Routing,
}

/// Runs the command.
pub fn run(args: CompareArgs, device: &Device) -> Result<ExitCode> {
    let CompareArgs {
        study,
        variants,
        seeds,
        at,
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
    if study == Study::Routing {
        let dir = runs_dir.join(name.as_deref().unwrap_or("routing"));
        let variants = if variants.is_empty() {
            grid::routing_variants(&base)
        } else {
            variants
                .iter()
                .map(|v| grid::Variant::parse(v))
                .collect::<Result<_>>()?
        };
        let grid = grid::Grid {
            base: &base,
            variants: &variants,
            seeds: &seeds,
            at: &at,
        };
        let rows = grid.run(&text, &dir, device, &mut |label, seed, e| {
            if let Event::Validation { step, metrics, .. } = e {
                println!(
                    "{label:>12} seed {seed} step {step:>5}: valid loss {:.4}",
                    metrics.loss
                );
            }
        })?;
        println!("{}", grid.table(&rows));
        println!("wrote {}", dir.join("grid.md").display());
        return Ok(ExitCode::SUCCESS);
    }
    let dir = runs_dir.join(name.as_deref().unwrap_or("compare"));
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
