//! The subcommands of `switch`, one file each, and what they share.

pub mod bench;
pub mod compare;
pub mod eval;
pub mod parity;
pub mod report;
pub mod route;
pub mod sample;
pub mod train;

use std::path::Path;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use switch_transformer::data::TextData;
use switch_transformer::data::download::{TINY_SHAKESPEARE_SHA256, TINY_SHAKESPEARE_URL, download};

/// The training text's default path (downloaded when missing).
pub const DEFAULT_DATA: &str = "data/tinyshakespeare.txt";

/// Data parallelism: where the replicas run and how they average gradients.
#[derive(clap::Args)]
pub struct ParallelArgs {
    /// Data-parallel training on these devices, one replica each (e.g. cpu,cpu or
    /// cuda:0,cuda:1); sets train.replicas. Without it every replica runs on --device.
    #[arg(long, value_delimiter = ',', value_name = "DEVICE,...")]
    pub devices: Vec<String>,
    /// How replicas combine gradients: broadcast (summed on the first replica, which steps
    /// and hands its weights to the others; any backend) or collective (Burn's NCCL
    /// all-reduce; CUDA devices only).
    #[arg(long, default_value = "broadcast")]
    pub grad_sync: String,
    /// The replicas route each batch together, as one model does (capacity, drops and load
    /// balance over the whole batch); sets train.global_routing. Without it each replica
    /// routes its own windows.
    #[arg(long)]
    pub global_routing: bool,
}

/// Reads the training text, downloading Tiny Shakespeare when the default path is missing.
pub fn load_data(path: &Path, seq_len: usize) -> Result<TextData> {
    if !path.exists() && path == Path::new(DEFAULT_DATA) {
        eprintln!("{DEFAULT_DATA} not found: downloading Tiny Shakespeare");
        let bar = ProgressBar::new(0).with_style(
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
                .expect("valid template"),
        );
        download(
            TINY_SHAKESPEARE_URL,
            TINY_SHAKESPEARE_SHA256,
            path,
            &mut |done, total| {
                if let Some(t) = total {
                    bar.set_length(t);
                }
                bar.set_position(done);
            },
        )?;
        bar.finish();
    }
    TextData::load(path, seq_len + 1)
}
