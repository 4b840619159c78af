//! The training loop, a plain one (nanoGPT style): the next batch, one [`step`] (forward ->
//! `ce + lb_coef * lb + z_coef * z` -> backward -> clip global norm -> Adam at the Noam rate),
//! with periodic metrics, validation, samples and checkpoints in the run's directory
//! ([`RunDir`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::Device;
use rand::SeedableRng;

use crate::data::{Batch, TextData, TrainLoader, valid_batches};
use crate::distributed::{Collective, agree, check_same};
use crate::infer::generate::{SampleOptions, generate_until};
use crate::model::{ModelConfig, SwitchTransformer};
use crate::optim::{LabmlAdam, Noam};
use crate::routing::RoutingRng;
use crate::train::checkpoint::{self, TrainState};
use crate::train::config::RunConfig;
use crate::train::eval::{EvalMetrics, LayerStats, evaluate_until};
use crate::train::expert_parallel::{self, gather_to_first};
use crate::train::lock::RunLock;
use crate::train::metrics::{MetricsLine, TrainLine, ValidLine};
use crate::train::replicas::{Placement, Replica, Replicas};
use crate::train::run_dir::RunDir;
use crate::train::step::{StepSettings, step};

/// Seeds derived from the run seed for streams that must not disturb training's.
const EVAL_STREAM: u64 = 0xe7a1;
const SAMPLE_STREAM: u64 = 0x5a3e;

/// Steps between the comparisons of the ranks' parameters in a distributed run (also at its
/// first and last step).
pub const CHECKSUM_INTERVAL: u64 = 50;

/// What one optimizer step measured.
#[derive(Debug, Clone)]
pub struct StepMetrics {
    /// Optimizer steps done.
    pub step: u64,
    /// Epoch of this step's batch.
    pub epoch: u64,
    /// `ce + lb_coef * lb + z_coef * z`.
    pub loss: f64,
    /// Cross-entropy.
    pub ce: f64,
    /// Load-balancing loss, summed over layers.
    pub lb: f64,
    /// Router z-loss, summed over layers.
    pub z: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens in the batch.
    pub tokens: usize,
    /// Wall time of the step.
    pub seconds: f64,
    /// Routing per Switch layer.
    pub layers: Vec<LayerStats>,
    /// Whether the weights were updated (not when a loss or the gradient norm was not finite).
    pub updated: bool,
}

/// Progress reported to the caller of [`Trainer::run`].
pub enum Event<'a> {
    /// A training step was taken.
    Step(&'a StepMetrics),
    /// A validation ran.
    Validation {
        /// Step validated.
        step: u64,
        /// Its metrics.
        metrics: &'a EvalMetrics,
        /// A greedy sample from the configured prompt.
        sample: &'a str,
    },
    /// A checkpoint was written to this directory.
    Checkpoint(&'a Path),
    /// A step with a non-finite loss or gradient norm was skipped (`train.skip_nonfinite`).
    Skipped(&'a StepMetrics),
}

/// How [`Trainer::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// All `train.steps` were taken.
    Completed,
    /// Stopped by the caller's flag (Ctrl-C), after writing a checkpoint.
    Interrupted,
}

/// A training run: its configuration, data, replicas, schedule and position.
pub struct Trainer {
    /// The run's configuration.
    pub config: RunConfig,
    /// Where the run is written.
    pub run_dir: RunDir,
    /// Training and validation text.
    pub data: TextData,
    /// Optimizer steps done.
    pub step: u64,
    /// The model (replica 0 is validated and checkpointed) with its optimizer state.
    replicas: Replicas,
    noam: Noam,
    loader: TrainLoader,
    rng: RoutingRng,
    best_valid_loss: Option<f64>,
    valid: Vec<Batch>,
    /// Steps skipped in this process for a non-finite loss or gradient norm.
    nonfinite_steps: u64,
    /// The ranks of the distributed job this process is one of; rank 0 alone writes.
    world: Option<Arc<dyn Collective>>,
    /// This process is the run's one writer while the trainer lives (none on ranks > 0).
    _lock: Option<RunLock>,
}

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
    /// ([`crate::train::config::RESUMABLE_KEYS`], e.g. `train.steps` to extend it); the changed
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

    /// What to do after a divergence, as a command that works: resume from the last
    /// checkpoint at half the learning rate (`train.lr` and `train.warmup` may change on
    /// resume), or, with no checkpoint yet, start again.
    fn lower_lr_hint(&self) -> String {
        let half = self.config.train.lr / 2.0;
        // Short either way: 0.5, 0.0001, 5e29.
        let lr = if (1e-4..1e6).contains(&half) {
            format!("{half}")
        } else {
            format!("{half:e}")
        };
        match self.run_dir.latest_checkpoint() {
            Some(c) => format!(
                "Resume from the last checkpoint ({}) at a lower learning rate: `switch train \
                 --resume {} --set train.lr={lr}` (or raise train.warmup), or set \
                 train.skip_nonfinite = N to skip up to N such steps",
                c.display(),
                self.run_dir
            ),
            None => format!(
                "There is no checkpoint yet: start again at a lower learning rate with \
                 `switch train --restart {} --set train.lr={lr}` (or raise train.warmup), or \
                 set train.skip_nonfinite = N to skip up to N such steps",
                self.run_dir
            ),
        }
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

    /// The model being trained (replica 0).
    pub fn model(&self) -> &SwitchTransformer {
        &self.replicas.first().model
    }

    /// Data-parallel replicas (1 = one model).
    pub fn replicas(&self) -> &[Replica] {
        &self.replicas.replicas
    }

    /// Epoch of the next batch.
    pub fn epoch(&self) -> u64 {
        self.loader.state.epoch
    }

    /// Whether this process writes the run (not ranks > 0 of a distributed job).
    pub fn is_writer(&self) -> bool {
        self.world.as_ref().is_none_or(|w| w.rank() == 0)
    }

    /// One optimizer step on the next training batch (fails only when an exchange between
    /// the ranks of a distributed job fails).
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        let start = Instant::now();
        let batch = self.loader.next_batch(&self.data.train);
        let t = &self.config.train;
        let settings = StepSettings {
            lb_coef: t.lb_coef,
            z_coef: t.z_loss_coef,
            grad_clip: t.grad_clip,
            lr: self.noam.lr(self.step + 1),
        };
        if let Some(w) = &self.world {
            w.set_step(self.step + 1);
        }
        let out = step(&mut self.replicas, &batch, &mut self.rng, settings)?;
        self.step += 1;
        Ok(StepMetrics {
            step: self.step,
            epoch: self.loader.state.epoch,
            loss: out.ce + t.lb_coef * out.lb + t.z_loss_coef * out.z,
            ce: out.ce,
            lb: out.lb,
            z: out.z,
            lr: settings.lr,
            grad_norm: out.grad_norm,
            tokens: batch.tokens(),
            seconds: start.elapsed().as_secs_f64(),
            layers: out.layers,
            updated: out.updated,
        })
    }

    /// Whether any rank was asked to stop (every rank gets the same answer, so that all stop
    /// at the same step); in one process, `stop` itself.
    fn agree_to_stop(&self, stop: &AtomicBool) -> Result<bool> {
        let mine = stop.load(Ordering::SeqCst);
        match &self.world {
            None => Ok(mine),
            Some(w) => {
                let mut flag = [mine as u8 as f64];
                w.all_reduce_sum_f64("the stop flag", &mut flag)?;
                Ok(flag[0] > 0.0)
            }
        }
    }

    /// In a distributed run: an error naming the step when the ranks' parameters differ.
    fn check_ranks_agree(&self) -> Result<()> {
        match &self.world {
            None => Ok(()),
            Some(w) => check_same(w.as_ref(), self.step, self.replicas.replicated_checksum()),
        }
    }

    /// Validation on the fixed batches with the training routing (labml's protocol), and a
    /// greedy sample from the configured prompt.
    pub fn validate(&self) -> Result<(EvalMetrics, String)> {
        let never = AtomicBool::new(false);
        Ok(self
            .validate_model(self.model(), &never)?
            .expect("never stopped"))
    }

    /// [`validate`](Self::validate) of `model` (the whole model, gathered with expert
    /// parallelism); `None` when `stop` was set before it was done (a stop signal is answered
    /// within one batch's or one sampled token's time).
    fn validate_model(
        &self,
        model: &SwitchTransformer,
        stop: &AtomicBool,
    ) -> Result<Option<(EvalMetrics, String)>> {
        let mut model = model.valid();
        model.set_training(false);
        let seed = self.config.train.seed;
        let mut rng = RoutingRng::seed_from_u64(seed ^ EVAL_STREAM);
        let Some(metrics) = evaluate_until(&model, &self.valid, &mut rng, stop) else {
            return Ok(None);
        };
        let t = &self.config.train;
        let prompt = self
            .data
            .vocab
            .encode(&t.sample_prompt)
            .context("train.sample_prompt")?;
        let sample = if prompt.is_empty() {
            String::new()
        } else {
            let opts = SampleOptions {
                max_tokens: t.sample_tokens,
                temperature: 0.0,
                top_k: None,
                context: t.seq_len,
            };
            let mut rng = RoutingRng::seed_from_u64(seed ^ SAMPLE_STREAM);
            let Some(new) =
                generate_until(&model, &prompt, &opts, &mut rng.clone(), &mut rng, stop)
            else {
                return Ok(None);
            };
            format!("{}{}", t.sample_prompt, self.data.vocab.decode(&new))
        };
        Ok(Some((metrics, sample)))
    }

    fn state(&self, valid_loss: Option<f64>) -> TrainState {
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
    pub fn save_checkpoint(&self, valid_loss: Option<f64>) -> Result<Option<PathBuf>> {
        match whole(&self.replicas, &self.config.model, self.is_writer())? {
            Some(whole) => self.write_checkpoint(&whole, valid_loss).map(Some),
            None => Ok(None),
        }
    }

    fn write_checkpoint(&self, whole: &Whole<'_>, valid_loss: Option<f64>) -> Result<PathBuf> {
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

    /// Trains until `train.steps`, or until `stop` is set (then checkpoints and returns).
    pub fn run(&mut self, stop: &AtomicBool, on_event: &mut dyn FnMut(Event)) -> Result<Finish> {
        let t = self.config.train.clone();
        let writer = self.is_writer();
        let (mut interval_tokens, mut interval_seconds) = (0usize, 0.0f64);
        self.check_ranks_agree()?;
        while self.step < t.steps {
            if self.agree_to_stop(stop)? {
                if let Some(dir) = self.save_checkpoint(None)? {
                    on_event(Event::Checkpoint(&dir));
                }
                return Ok(Finish::Interrupted);
            }
            let m = self.train_step()?;
            if !m.updated {
                self.nonfinite_steps += 1;
                if self.nonfinite_steps > t.skip_nonfinite {
                    bail!(
                        "step {}: the training loss ({}) or the gradient norm ({}) is not finite: \
                         the run stopped without updating the weights or writing anything \
                         non-finite. {}",
                        m.step,
                        m.loss,
                        m.grad_norm,
                        self.lower_lr_hint()
                    );
                }
                on_event(Event::Skipped(&m));
            }
            interval_tokens += m.tokens;
            interval_seconds += m.seconds;
            on_event(Event::Step(&m));
            let last = self.step == t.steps;
            if last || self.step.is_multiple_of(CHECKSUM_INTERVAL) {
                self.check_ranks_agree()?;
            }
            let validate_now = self.step.is_multiple_of(t.eval_interval) || last;
            let checkpoint_now = self.step.is_multiple_of(t.checkpoint_interval) || last;
            // The whole model where the writer needs it (gathered from every rank with expert
            // parallelism).
            let whole = if validate_now || checkpoint_now {
                whole(&self.replicas, &self.config.model, writer)?
            } else {
                None
            };
            if !writer {
                continue; // rank 0 logs, validates and checkpoints
            }
            if m.updated && (self.step.is_multiple_of(t.log_interval) || last) {
                let dropped = m.layers.iter().map(|l| l.dropped_frac).sum::<f64>()
                    / m.layers.len().max(1) as f64;
                self.run_dir.append_metrics(&MetricsLine::Train(TrainLine {
                    step: m.step,
                    epoch: m.epoch,
                    train_loss: m.loss,
                    ce_loss: m.ce,
                    lb_loss: m.lb,
                    z_loss: m.z,
                    lr: m.lr,
                    grad_norm: m.grad_norm,
                    tokens_per_s: interval_tokens as f64 / interval_seconds.max(1e-9),
                    dropped_frac: dropped,
                    layers: m.layers.clone(),
                }))?;
                (interval_tokens, interval_seconds) = (0, 0.0);
            }
            let mut valid_loss = None;
            let validated = match validate_now {
                true => {
                    let whole = whole.as_ref().expect("gathered for validation");
                    self.validate_model(&whole.model, stop)?
                }
                false => None,
            };
            if validate_now && validated.is_none() {
                // A stop signal during validation: no validation line; the checkpoint of this
                // step is written where every rank stops together (the loop's top), or here
                // after the last step, when no rank comes back to it.
                if last {
                    let whole = whole.as_ref().expect("gathered for the checkpoint");
                    let dir = self.write_checkpoint(whole, None)?;
                    on_event(Event::Checkpoint(&dir));
                    return Ok(Finish::Interrupted);
                }
                continue;
            }
            if let Some((metrics, sample)) = validated {
                let whole = whole.as_ref().expect("gathered for validation");
                if !metrics.loss.is_finite() {
                    bail!(
                        "step {}: the validation loss is not finite ({}): the weights have \
                         diverged; the run stopped before writing them. {}",
                        self.step,
                        metrics.loss,
                        self.lower_lr_hint()
                    );
                }
                self.run_dir.append_metrics(&MetricsLine::Valid(ValidLine {
                    step: self.step,
                    valid_loss: metrics.loss,
                    valid_accuracy: metrics.accuracy,
                    lb_loss: metrics.lb_loss,
                    dropped_frac: metrics.dropped_frac,
                    layers: metrics.layers.clone(),
                    sample: sample.clone(),
                }))?;
                on_event(Event::Validation {
                    step: self.step,
                    metrics: &metrics,
                    sample: &sample,
                });
                valid_loss = Some(metrics.loss);
                if self.best_valid_loss.is_none_or(|b| metrics.loss < b) {
                    self.best_valid_loss = Some(metrics.loss);
                    checkpoint::save(
                        &self.run_dir.best(),
                        &whole.model,
                        &self.config.model,
                        whole.adam(),
                        &self.state(valid_loss),
                    )?;
                }
            }
            if checkpoint_now {
                let whole = whole.as_ref().expect("gathered for the checkpoint");
                let dir = self.write_checkpoint(whole, valid_loss)?;
                on_event(Event::Checkpoint(&dir));
            }
        }
        Ok(Finish::Completed)
    }
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

/// The whole model and optimizer state, at the process that writes the run (`None` on the
/// other ranks); with expert parallelism every rank's experts are gathered to rank 0, and
/// every rank must call this.
fn whole<'a>(
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
struct Whole<'a> {
    model: SwitchTransformer,
    adam: AdamOf<'a>,
}

enum AdamOf<'a> {
    Borrowed(&'a LabmlAdam),
    Owned(LabmlAdam),
}

impl Whole<'_> {
    fn adam(&self) -> &LabmlAdam {
        match &self.adam {
            AdamOf::Borrowed(a) => a,
            AdamOf::Owned(a) => a,
        }
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
