//! `switch`: the command-line interface. A thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use burn::tensor::Device;
use clap::{Parser, Subcommand};
use switch_transformer::parity;
use switch_transformer::store::TensorFile;

#[derive(Parser)]
#[command(
    name = "switch",
    version,
    about = "Switch Transformer on Burn: train, sample, check parity with labml's PyTorch code"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay fixtures recorded from labml's PyTorch code and compare every tensor.
    ///
    /// Prints one row per tensor (max abs error, max error relative to the tensor's largest
    /// magnitude) and ends with `parity: PASS` or `parity: FAIL`; exits 0 only on PASS.
    Parity {
        /// Fixture files (safetensors with a `meta` JSON metadata key).
        #[arg(required = true)]
        fixtures: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Parity { fixtures } => {
            let device = Device::default();
            let mut all = true;
            for path in &fixtures {
                println!("== {}", path.display());
                let report = parity::run(&TensorFile::read(path)?, &device)?;
                println!("{report}");
                all &= report.passed();
            }
            if fixtures.len() > 1 {
                println!("parity: {}", if all { "PASS" } else { "FAIL" });
            }
            Ok(if all {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
