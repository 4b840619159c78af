//! `switch parity`: replays fixtures recorded from labml's PyTorch code, and Hugging Face
//! fixture directories recorded with transformers.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use burn::tensor::Device;
use switch_transformer::interop::parity;
use switch_transformer::store::TensorFile;

/// Replay fixtures recorded from labml's PyTorch code and compare every tensor.
///
/// Prints one row per tensor (max abs error, max error relative to the tensor's largest
/// magnitude) and ends with `parity: PASS` or `parity: FAIL`; exits 0 only on PASS.
#[derive(clap::Args)]
pub struct ParityArgs {
    /// Fixture files (safetensors with a `meta` JSON metadata key), or Hugging Face fixture
    /// directories (a checkpoint with `expected.safetensors`, made by tools/hf_fixtures.py).
    #[arg(required = true)]
    pub fixtures: Vec<PathBuf>,
}

/// Runs the command.
pub fn run(args: ParityArgs, device: &Device) -> Result<ExitCode> {
    let ParityArgs { fixtures } = args;

    let mut failed = vec![];
    for path in &fixtures {
        println!("== {}", path.display());
        let report = if path.is_dir() {
            if !switch_transformer::hf::parity::is_fixture(path) {
                anyhow::bail!(
                    "{} is a directory without expected.safetensors: not a Hugging Face \
                     fixture (make them with tools/hf_fixtures.py)",
                    path.display()
                );
            }
            switch_transformer::hf::parity::run(path, device)?
        } else {
            parity::run(&TensorFile::read(path)?, device)?
        };
        println!("{report}");
        if !report.passed() {
            failed.push(path.display().to_string());
        }
    }
    let all = failed.is_empty();
    // One overall line, whatever the number of fixtures.
    if all {
        println!("parity: PASS ({} fixtures)", fixtures.len());
    } else {
        println!(
            "parity: FAIL ({} of {} fixtures: {})",
            failed.len(),
            fixtures.len(),
            failed.join(", ")
        );
    }
    Ok(if all {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
