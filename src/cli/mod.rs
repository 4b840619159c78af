//! The subcommands of `switch`, one file each, and what they share.

pub mod bandwidth;
pub mod bench;
pub mod compare;
pub mod eval;
pub mod finetune;
pub mod hf_bench;
pub mod logging;
pub mod matmuls;
pub mod parity;
pub mod report;
pub mod route;
pub mod sample;
pub mod seq2seq;
pub mod train;
pub mod upcycle;

use std::path::Path;

use anyhow::{Result, bail};
use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressStyle};
use switch_transformer::data::download::{TINY_SHAKESPEARE_SHA256, TINY_SHAKESPEARE_URL, download};
use switch_transformer::data::{TextData, read_data_file};
use switch_transformer::device::parse_device;
use switch_transformer::train::DataRecord;
use switch_transformer::train::placement::{GradSync, Placement};

/// Training across processes: one process per rank, started by an MPI launcher.
#[derive(clap::Args)]
pub struct DistributedArgs {
    /// This process is one rank of an MPI job (`mpirun -np N switch train --distributed ...`,
    /// likewise `finetune`, or srun): the ranks split every batch (finetune: every update's
    /// micro-batches); rank 0 writes the run. Needs the `mpi` feature.
    #[arg(long)]
    pub distributed: bool,
    /// With --distributed: seconds a rank waits for the others in one exchange before it ends
    /// the job with an error naming the step (a rank that died or hangs).
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub exchange_timeout: u64,
    /// With --distributed: each rank holds n_experts / ranks experts of every Switch layer and
    /// tokens travel to their expert's rank and back (sets train.expert_parallel).
    #[arg(long)]
    pub expert_parallel: bool,
}

impl DistributedArgs {
    /// The job's ranks, when --distributed is given.
    pub fn join(
        &self,
    ) -> Result<Option<std::sync::Arc<dyn switch_transformer::distributed::Collective>>> {
        if !self.distributed {
            if self.expert_parallel {
                anyhow::bail!(
                    "--expert-parallel shards the experts over the ranks of an MPI job: add \
                     --distributed and run under mpirun or srun"
                );
            }
            return Ok(None);
        }
        if self.exchange_timeout == 0 {
            anyhow::bail!("--exchange-timeout must be at least 1 second");
        }
        #[cfg(feature = "mpi")]
        {
            let timeout = std::time::Duration::from_secs(self.exchange_timeout);
            let world = switch_transformer::distributed::MpiWorld::init(timeout)?;
            Ok(Some(std::sync::Arc::new(world)))
        }
        #[cfg(not(feature = "mpi"))]
        anyhow::bail!(
            "--distributed needs the `mpi` feature, which this binary was built without: \
             install OpenMPI (Debian: libopenmpi-dev openmpi-bin clang) and build with `cargo \
             build --release --features mpi`"
        )
    }
}

/// Colours only on a terminal, and never with `NO_COLOR` set (<https://no-color.org>).
pub fn colour_allowed(stream: &impl std::io::IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

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

impl ParallelArgs {
    /// The replicas' placement: one per `--devices` entry (none: every replica on `default`),
    /// combining gradients as `--grad-sync` says (`collective` needs CUDA devices).
    pub fn placement(&self, default: &Device) -> Result<Placement> {
        let devices = if self.devices.is_empty() {
            vec![default.clone()]
        } else {
            self.devices
                .iter()
                .map(|s| parse_device(s))
                .collect::<Result<_>>()?
        };
        Ok(Placement {
            devices,
            grad_sync: grad_sync(&self.grad_sync, &self.devices)?,
            world: None,
        })
    }
}

/// `--grad-sync`: `broadcast`, or `collective` when every device in `device_specs` is CUDA.
fn grad_sync(name: &str, device_specs: &[String]) -> Result<GradSync> {
    match name {
        "broadcast" => Ok(GradSync::Broadcast),
        "collective" => {
            if let Some(d) = device_specs.iter().find(|d| !d.starts_with("cuda")) {
                bail!(
                    "--grad-sync collective needs CUDA devices (Burn 0.22 implements \
                     collectives only with NCCL), but `{d}` is not one: use --grad-sync \
                     broadcast"
                );
            }
            Ok(GradSync::Collective)
        }
        _ => bail!("unknown --grad-sync `{name}`: use broadcast or collective"),
    }
}

/// Reads the training text once (a stream could not be read twice), downloading Tiny
/// Shakespeare when the default path is missing: the text and the file's record (SHA-256).
pub fn load_data(path: &Path, seq_len: usize) -> Result<(TextData, DataRecord)> {
    if !path.exists() && path == Path::new(DEFAULT_DATA) {
        tracing::info!("{DEFAULT_DATA} not found: downloading Tiny Shakespeare");
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
    let bytes = read_data_file(path)?;
    let record = DataRecord::of_bytes(path, &bytes);
    Ok((TextData::from_file_bytes(path, bytes, seq_len + 1)?, record))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(devices: &[&str], grad_sync: &str) -> ParallelArgs {
        ParallelArgs {
            devices: devices.iter().map(|d| d.to_string()).collect(),
            grad_sync: grad_sync.into(),
            global_routing: false,
        }
    }

    #[test]
    fn bad_devices_and_grad_syncs_are_clear_errors() {
        let device = Device::default();
        let e = args(&["cpu", "cpu"], "collective")
            .placement(&device)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("CUDA") && e.contains("`cpu`"), "{e}");
        let e = args(&[], "ring")
            .placement(&device)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unknown --grad-sync `ring`"), "{e}");
        let e = args(&["cpu", "tpu"], "broadcast")
            .placement(&device)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unknown device `tpu`"), "{e}");
        let p = args(&[], "broadcast").placement(&device).unwrap();
        assert_eq!((p.devices.len(), p.grad_sync), (1, GradSync::Broadcast));
        assert_eq!(
            args(&["cpu", "cpu"], "broadcast")
                .placement(&device)
                .unwrap()
                .devices
                .len(),
            2
        );
    }
}
