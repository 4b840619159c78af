//! The training loop, a plain one (nanoGPT style): the next batch, one [`step`] (forward ->
//! `ce + lb_coef * lb + z_coef * z` -> backward -> clip global norm -> Adam at the Noam rate),
//! with periodic metrics, validation, samples and checkpoints in the run's directory
//! ([`RunDir`]).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use rand::SeedableRng;

use crate::data::{Batch, TextData, TrainLoader};
use crate::distributed::{Collective, check_same};
use crate::infer::generate::{SampleOptions, generate_until};
use crate::model::SwitchTransformer;
use crate::optim::Noam;
use crate::routing::RoutingRng;
use crate::train::checkpoint;
use crate::train::config::RunConfig;
use crate::train::eval::{EvalMetrics, LayerStats, evaluate_until};
use crate::train::lock::RunLock;
use crate::train::metrics::{MetricsLine, TrainLine, ValidLine};
use crate::train::replicas::{Replica, Replicas};
use crate::train::run_dir::RunDir;
use crate::train::step::{StepSettings, step};

/// Seeds derived from the run seed for streams that must not disturb training's.
const EVAL_STREAM: u64 = 0xe7a1;
const SAMPLE_STREAM: u64 = 0x5a3e;

/// Steps between the comparisons of the ranks' parameters in a distributed run (also at its
/// first and last step).
pub(crate) const CHECKSUM_INTERVAL: u64 = 50;

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
///
/// ```
/// use std::sync::atomic::AtomicBool;
/// use burn::tensor::Device;
/// use switch_transformer::data::TextData;
/// use switch_transformer::train::{Event, Finish, RunConfig, RunDir, Trainer};
///
/// let mut config = RunConfig::default(); // labml's experiment, made small here
/// for s in ["model.d_model=32", "model.heads=2", "model.d_ff=64", "model.n_layers=2",
///           "train.batch_size=4", "train.seq_len=16", "train.steps=6",
///           "train.eval_interval=3", "train.checkpoint_interval=3"] {
///     config.set(s)?;
/// }
/// let data = TextData::from_text(&"It is the east, and Juliet is the sun. ".repeat(40), 17)?;
/// let run = std::env::temp_dir().join(format!("switch-doc-trainer-{}", std::process::id()));
/// let mut trainer = Trainer::create(config, data, &run, &Device::default())?;
/// let mut losses = vec![];
/// let finish = trainer.run(&AtomicBool::new(false), &mut |e| {
///     if let Event::Step(s) = e {
///         losses.push(s.loss);
///     }
/// })?;
/// assert_eq!(finish, Finish::Completed);
/// assert_eq!(losses.len(), 6);
/// assert!(RunDir::new(&run).latest_checkpoint().is_some()); // a run `--resume` continues
/// # std::fs::remove_dir_all(&run)?;
/// # anyhow::Ok(())
/// ```
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

mod saving;
mod start;

use saving::whole;

impl Trainer {
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

    /// The model being trained (replica 0).
    pub fn model(&self) -> &SwitchTransformer {
        &self.replicas.first().model
    }

    /// Each Switch layer's expert biases (empty unless `model.balance = bias`).
    fn expert_biases(&self) -> Vec<Vec<f32>> {
        let layers = self.model().layers.iter().filter_map(|b| b.switch());
        layers
            .filter_map(|s| Some(s.expert_bias.as_ref()?.values.clone()))
            .collect()
    }

    /// Data-parallel replicas (1 = one model).
    pub fn replicas(&self) -> &[Replica] {
        &self.replicas.replicas
    }

    /// Whether this process writes the run (not ranks > 0 of a distributed job).
    pub fn is_writer(&self) -> bool {
        self.world.as_ref().is_none_or(|w| w.rank() == 0)
    }

    /// One optimizer step on the next training batch (fails only when an exchange between
    /// the ranks of a distributed job fails).
    pub(crate) fn train_step(&mut self) -> Result<StepMetrics> {
        let start = Instant::now();
        let batch = self.loader.next_batch(&self.data.train);
        let t = &self.config.train;
        let lb_coef = self.config.model.aux_loss_weight(t.lb_coef);
        let settings = StepSettings {
            lb_coef,
            z_coef: t.z_loss_coef,
            balance_scope: self.config.model.balance_scope,
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
            loss: out.ce + lb_coef * out.lb + t.z_loss_coef * out.z,
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
                    expert_bias: self.expert_biases(),
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
