//! How a run starts: a new one ([`Trainer::create`]: configuration checked, run folder written,
//! model initialised) or one continued from its newest checkpoint that loads
//! ([`Trainer::resume`]); in a distributed job every rank starts, or none does
//! ([`crate::distributed::agree`]).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use rand::SeedableRng;

use super::Trainer;
use crate::data::{TextData, TrainLoader, valid_batches};
use crate::distributed::agree;
use crate::optim::{LabmlAdam, Noam};
use crate::routing::RoutingRng;
use crate::train::checkpoint;
use crate::train::config::RunConfig;
use crate::train::expert_parallel;
use crate::train::lock::RunLock;
use crate::train::placement::Placement;
use crate::train::replicas::{Replica, Replicas};
use crate::train::run_dir::RunDir;

impl Trainer {
    /// Starts a new run in `run_dir`, which must not hold a run already, on one device or on
    /// `train.replicas` data-parallel replicas.
    pub fn create(
        config: RunConfig,
        data: TextData,
        run_dir: &Path,
        placement: impl Into<Placement>,
    ) -> Result<Self> {
        let placement = placement.into();
        let writer = placement.writes();
        let started = (|| {
            let mut config = config;
            config.model.n_vocab = data.vocab.len();
            config.validate()?;
            check_prompt(&config, &data)?;
            crate::train::memory::check_fits(&config, crate::train::memory::available())?;
            let devices = placement.devices_for(config.train.replicas)?;
            if config.train.expert_parallel {
                let ranks = placement.world.as_ref().map(|w| w.size());
                expert_parallel::check(&config.model, ranks, &devices[0])?;
            }
            let run_dir = RunDir::new(run_dir);
            if writer && run_dir.holds_run() {
                bail!(
                    "{run_dir} already holds a run: continue it with --resume {run_dir}, or \
                     choose another --name"
                );
            }
            let lock = if writer {
                run_dir.create(&config, &data.vocab)?;
                Some(RunLock::acquire(run_dir.path())?)
            } else {
                None
            };
            Ok((config, run_dir, lock, devices))
        })();
        // Every rank starts, or none does (rank 0's refusal reaches the others at once).
        let (config, run_dir, lock, devices) =
            agree(placement.world.as_deref(), "starting the run", started)?;
        let device = devices[0].clone().autodiff();
        let model = config.model.init(config.train.seed, &device)?;
        let t = &config.train;
        let adam = LabmlAdam::new(t.beta1, t.beta2, t.eps);
        let loader = TrainLoader::new(data.train.len(), t.seq_len, t.batch_size, t.seed);
        let rng = RoutingRng::seed_from_u64(t.seed);
        let first = Replica {
            model,
            adam,
            device,
        };
        let replicas = run_replicas(first, &config, &devices, &placement)?;
        let trainer = Self::assemble(config, run_dir, lock, data, replicas, loader, rng);
        if writer {
            trainer.run_dir.truncate_metrics(0)?;
        }
        Ok(trainer)
    }

    /// Continues the run in `run_dir` from its latest checkpoint. `data` must have the run's
    /// vocabulary; `placement` must fit the run's `train.replicas`.
    pub fn resume(run_dir: &Path, data: TextData, placement: impl Into<Placement>) -> Result<Self> {
        Self::resume_with(run_dir, data, placement, &[])
    }

    /// [`resume`](Self::resume) with `--set` overrides of the keys a resumed run may change
    /// (`crate::train::config::RESUMABLE_KEYS`, e.g. `train.steps` to extend it); the changed
    /// configuration is written to the run's `config.toml`.
    pub fn resume_with(
        run_dir: &Path,
        data: TextData,
        placement: impl Into<Placement>,
        overrides: &[String],
    ) -> Result<Self> {
        let run_dir = RunDir::new(run_dir);
        let placement = placement.into();
        let writer = placement.writes();
        // Every rank starts, or none does: a rank's refusal (a run another process holds, a
        // different text) reaches the others at once instead of leaving them waiting.
        let ranks = placement.world.as_ref().map(|w| w.size());
        let started = (|| {
            let mut config = run_dir.read_config()?;
            let lock = writer
                .then(|| RunLock::acquire(run_dir.path()))
                .transpose()?;
            if !overrides.is_empty() {
                config.set_on_resume(overrides)?;
            }
            // A run resumes on any number of ranks: the batch is the same, split differently.
            let mut rescaled = ranks.is_some_and(|n| n != config.train.replicas);
            if let Some(n) = ranks {
                crate::distributed::check_batch(config.train.batch_size, n)?;
                config.train.replicas = n;
                config.validate()?;
            }
            if config.train.expert_parallel && ranks.is_none() {
                // The checkpoint holds every expert: one process runs them all.
                if writer {
                    tracing::info!("train.expert_parallel is off: one process holds every expert");
                }
                config.train.expert_parallel = false;
                rescaled = true;
            }
            if run_dir.read_vocab()? != data.vocab {
                bail!(
                    "the data's characters differ from those of the run in {run_dir}: resume \
                     with the same --data"
                );
            }
            check_prompt(&config, &data)?;
            if writer {
                run_dir.tidy()?;
            }
            Ok((config, lock, rescaled))
        })();
        // Also the barrier after which the others read the checkpoints rank 0 has tidied.
        let (config, lock, rescaled) =
            agree(placement.world.as_deref(), "resuming the run", started)?;
        let found = (|| {
            let mut checkpoints = run_dir.checkpoint_list();
            if checkpoints.is_empty() && run_dir.best().join("state.json").is_file() {
                // No regular checkpoint left (an interrupted run, a removed folder), but the best
                // one is whole: resume from it rather than refuse.
                if writer {
                    tracing::warn!(
                        "{run_dir} has no checkpoint in checkpoints/: resuming from best/ (the \
                         best validation loss so far)"
                    );
                }
                checkpoints.push((0, run_dir.best()));
            }
            if checkpoints.is_empty() {
                bail!(
                    "{run_dir} has no checkpoint to resume from: start it again from step 0 \
                     with `switch train --restart {run_dir}`"
                );
            }
            let devices = placement.devices_for(config.train.replicas)?;
            if config.train.expert_parallel {
                expert_parallel::check(&config.model, ranks, &devices[0])?;
            }
            let device = devices[0].clone().autodiff();
            let t = &config.train;
            // The newest checkpoint that loads; a damaged one is skipped with a message.
            let mut loaded = None;
            let mut newest_error = None;
            for (_, dir) in checkpoints.iter().rev() {
                let adam = LabmlAdam::new(t.beta1, t.beta2, t.eps);
                match checkpoint::load(dir, &config.model, adam, &device) {
                    Ok(l) => {
                        loaded = Some(l);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!("skipping checkpoint {}: {e:#}", dir.display());
                        newest_error.get_or_insert(e);
                    }
                }
            }
            let Some(loaded) = loaded else {
                let e = newest_error.expect("a checkpoint failed to load");
                return Err(e.context(format!("no checkpoint of {run_dir} loads")));
            };
            Ok((devices, device, loaded))
        })();
        let (devices, device, loaded) =
            agree(placement.world.as_deref(), "loading the checkpoint", found)?;
        let t = &config.train;
        // A train.steps below the step reached changes nothing (the run is finished either
        // way), so it is not recorded: a later resume still reads the run's own length.
        let below = config.train.steps < loaded.state.step;
        if writer && below {
            tracing::info!(
                "train.steps = {} is below the step reached ({}): nothing to run, and {}'s \
                 config.toml is left as it was",
                config.train.steps,
                loaded.state.step,
                run_dir
            );
        }
        if writer && !below && (!overrides.is_empty() || rescaled) {
            run_dir.write_config(&config)?;
        }
        let mut loader = TrainLoader::new(data.train.len(), t.seq_len, t.batch_size, t.seed);
        loader.restore(loaded.state.loader);
        let first = Replica {
            model: loaded.model,
            adam: loaded.adam,
            device,
        };
        let replicas = run_replicas(first, &config, &devices, &placement)?;
        let mut trainer = Self::assemble(
            config,
            run_dir,
            lock,
            data,
            replicas,
            loader,
            loaded.state.routing_rng,
        );
        trainer.step = loaded.state.step;
        trainer.best_valid_loss = loaded.state.best_valid_loss;
        if writer {
            trainer.run_dir.truncate_metrics(trainer.step)?;
        }
        Ok(trainer)
    }

    fn assemble(
        config: RunConfig,
        run_dir: RunDir,
        lock: Option<RunLock>,
        data: TextData,
        replicas: Replicas,
        loader: TrainLoader,
        rng: RoutingRng,
    ) -> Self {
        let t = &config.train;
        let world = replicas.world_handle();
        if world.as_ref().is_none_or(|w| w.rank() == 0) {
            note_host_routing(&config.model, &replicas.first().device);
        }
        let valid = valid_batches(&data.valid, t.seq_len, t.batch_size, Some(t.eval_batches));
        let noam = Noam {
            lr: t.lr,
            warmup: t.warmup,
            d_model: config.model.d_model,
        };
        Self {
            run_dir,
            data,
            step: 0,
            replicas,
            noam,
            loader,
            rng,
            best_valid_loss: None,
            valid,
            nonfinite_steps: 0,
            world,
            _lock: lock,
            config,
        }
    }
}

/// Says so where the routing decision of a GPU run goes through the host although it was left
/// to the device (`route_on = auto`): see [`host_routing_note`].
fn note_host_routing(model: &crate::model::ModelConfig, device: &Device) {
    let gpu = !crate::device::Paths::of(device).host_routing;
    if let Some(note) = host_routing_note(model, gpu) {
        tracing::warn!("{note}");
    }
}

/// The note for a model on a GPU (`gpu`) whose routing, left to the device, is decided on the
/// host: device routing decides top-1 with dropping at random or by position only, so top-k,
/// dropless and confidence routing read the router's output back once per Switch layer and
/// step.
fn host_routing_note(model: &crate::model::ModelConfig, gpu: bool) -> Option<String> {
    let routing = model.switch_config().routing();
    (gpu && model.n_switch_layers() > 0
        && routing.place == crate::routing::RoutePlace::Auto
        && !routing.device_capable())
    .then(|| {
        format!(
            "routing is decided on the host (one read of the router's output per Switch layer \
             and step): the device decides top-1 routing with dropping at random or by \
             position only (model.top_k = {}, model.drop_tokens = {}, model.drop_policy = {:?})",
            model.top_k, model.drop_tokens, model.drop_policy
        )
    })
}

/// The run's replicas: `first` and its copies on `devices`, routing as `train.global_routing`
/// says; one replica per rank in a distributed job.
fn run_replicas(
    first: Replica,
    config: &RunConfig,
    devices: &[Device],
    placement: &Placement,
) -> Result<Replicas> {
    let global = config.train.global_routing;
    let replicas = Replicas::new(first, &config.model, devices, placement.grad_sync, global)?;
    match &placement.world {
        Some(world) => replicas.across(Arc::clone(world), config.train.expert_parallel),
        None => Ok(replicas),
    }
}

/// The validation sample's prompt must be made of the data's characters: checked before any
/// training, not at the first validation.
fn check_prompt(config: &RunConfig, data: &TextData) -> Result<()> {
    data.vocab
        .encode(&config.train.sample_prompt)
        .map(|_| ())
        .context("train.sample_prompt holds a character the data does not")
}

#[cfg(test)]
mod tests {
    use super::host_routing_note;
    use crate::model::ModelConfig;

    #[test]
    fn a_gpu_run_routed_on_the_host_is_told_so() {
        let fine = ModelConfig {
            n_experts: 16,
            top_k: 4,
            ..ModelConfig::default()
        };
        let note = host_routing_note(&fine, true).unwrap();
        assert!(note.contains("model.top_k = 4"), "{note}");
        assert_eq!(
            host_routing_note(&fine, false),
            None,
            "the CPU routes on the host"
        );
        assert_eq!(host_routing_note(&ModelConfig::default(), true), None);
        let dropless = ModelConfig {
            drop_tokens: false,
            ..ModelConfig::default()
        };
        assert!(host_routing_note(&dropless, true).is_some());
        let dense = ModelConfig {
            switch_every: 0,
            ..fine
        };
        assert_eq!(host_routing_note(&dense, true), None);
    }
}
