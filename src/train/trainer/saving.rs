//! A checkpoint of the run: the step's state, and the whole model and optimizer state at the
//! process that writes it (with expert parallelism, every rank's experts gathered to rank 0),
//! the oldest checkpoints beyond `train.keep_checkpoints` removed.

use std::path::PathBuf;

use anyhow::Result;

use super::Trainer;
use crate::model::{ModelConfig, SwitchTransformer};
use crate::optim::LabmlAdam;
use crate::train::checkpoint::{self, TrainState};
use crate::train::expert_parallel::gather_to_first;
use crate::train::replicas::Replicas;

impl Trainer {
    pub(super) fn state(&self, valid_loss: Option<f64>) -> TrainState {
        TrainState {
            step: self.step,
            loader: self.loader.state,
            routing_rng: self.rng.clone(),
            best_valid_loss: self.best_valid_loss,
            valid_loss,
        }
    }

    /// Writes a checkpoint of the current step and removes the oldest beyond
    /// `keep_checkpoints`. Every rank calls it; the writer writes (`None` elsewhere).
    pub(crate) fn save_checkpoint(&self, valid_loss: Option<f64>) -> Result<Option<PathBuf>> {
        match whole(&self.replicas, &self.config.model, self.is_writer())? {
            Some(whole) => self.write_checkpoint(&whole, valid_loss).map(Some),
            None => Ok(None),
        }
    }

    pub(super) fn write_checkpoint(
        &self,
        whole: &Whole<'_>,
        valid_loss: Option<f64>,
    ) -> Result<PathBuf> {
        let checkpoints = self.run_dir.checkpoints();
        let dir = checkpoint::step_dir(&checkpoints, self.step);
        checkpoint::save(
            &dir,
            &whole.model,
            &self.config.model,
            whole.adam(),
            &self.state(valid_loss),
        )?;
        let all = checkpoint::list(&checkpoints);
        let excess = all.len().saturating_sub(self.config.train.keep_checkpoints);
        for (_, old) in &all[..excess] {
            checkpoint::remove(old)?;
        }
        Ok(dir)
    }
}

/// The whole model and optimizer state, at the process that writes the run (`None` on the
/// other ranks); with expert parallelism every rank's experts are gathered to rank 0, and
/// every rank must call this.
pub(super) fn whole<'a>(
    replicas: &'a Replicas,
    config: &ModelConfig,
    writer: bool,
) -> Result<Option<Whole<'a>>> {
    let first = replicas.first();
    let Some(world) = replicas.world().filter(|_| replicas.expert_parallel()) else {
        return Ok(writer.then(|| Whole {
            model: first.model.clone(),
            adam: AdamOf::Borrowed(&first.adam),
        }));
    };
    let whole = gather_to_first(world, &first.model, &first.adam, config)?;
    Ok(whole.map(|(model, adam)| Whole {
        model,
        adam: AdamOf::Owned(adam),
    }))
}

/// The whole model and optimizer state at the writer: replica 0's, or gathered from the
/// ranks' shards of the experts.
pub(super) struct Whole<'a> {
    pub(super) model: SwitchTransformer,
    adam: AdamOf<'a>,
}

enum AdamOf<'a> {
    Borrowed(&'a LabmlAdam),
    Owned(LabmlAdam),
}

impl Whole<'_> {
    pub(super) fn adam(&self) -> &LabmlAdam {
        match &self.adam {
            AdamOf::Borrowed(a) => a,
            AdamOf::Owned(a) => a,
        }
    }
}
