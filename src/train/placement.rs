//! Where the replicas of a run go ([`Placement`]: their devices, the job's ranks) and how they
//! combine their gradients ([`GradSync`]). The binary's `--devices` and `--grad-sync` make
//! one; `Placement::from(&device)` is one model on one device.

use std::sync::Arc;

use anyhow::{Result, bail};
use burn::tensor::Device;

use crate::distributed::Collective;

/// How replicas combine their gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradSync {
    /// Sum the gradients on the first replica's device (a move to it, free when shared), take
    /// the Adam step there, hand the weights back: works on every backend (Burn 0.22's
    /// collectives exist only on CUDA), and the replicas share one set of weights on the CPU.
    Broadcast,
    /// Burn's `all_reduce` (NCCL, sum) between CUDA devices; every replica then takes the
    /// same clip and Adam step.
    Collective,
}

/// Where the replicas of a run go.
#[derive(Clone)]
pub struct Placement {
    /// One device per replica, or one device for all of them.
    pub devices: Vec<Device>,
    /// How their gradients are combined.
    pub grad_sync: GradSync,
    /// The ranks of the multi-process job this process is one of (`--distributed`): then this
    /// process holds one replica, on `devices[0]`, and the ranks are the run's replicas.
    pub world: Option<Arc<dyn Collective>>,
}

impl From<&Device> for Placement {
    fn from(device: &Device) -> Self {
        Self {
            devices: vec![device.clone()],
            grad_sync: GradSync::Broadcast,
            world: None,
        }
    }
}

impl Placement {
    /// Whether this process writes the run: the only process, or rank 0 of a job.
    pub fn writes(&self) -> bool {
        self.world.as_ref().is_none_or(|w| w.rank() == 0)
    }

    /// The device of each of `replicas` replicas (in this process).
    pub fn devices_for(&self, replicas: usize) -> Result<Vec<Device>> {
        if let Some(world) = &self.world {
            if replicas != world.size() {
                bail!(
                    "train.replicas = {replicas} but the job has {} ranks: a distributed run has \
                     one replica per rank",
                    world.size()
                );
            }
            return Ok(vec![self.devices[0].clone()]);
        }
        match self.devices.len() {
            1 => Ok(vec![self.devices[0].clone(); replicas]),
            n if n == replicas => Ok(self.devices.clone()),
            n => bail!(
                "{n} devices were given for a run with train.replicas = {replicas}: give one \
                 device per replica (or one for all of them)"
            ),
        }
    }
}
