//! The training loop, a plain one (nanoGPT style):
//! batch -> forward -> `ce + lb_coef * lb` -> backward -> clip global norm -> Noam/Adam step,
//! with periodic metrics, validation, samples and checkpoints in a run directory:
//!
//! ```text
//! runs/NAME/config.toml      the configuration used
//! runs/NAME/vocab.json       the character vocabulary
//! runs/NAME/metrics.jsonl    one JSON object per line (training and validation)
//! runs/NAME/checkpoints/step-NNNNNNN/   the last few checkpoints
//! runs/NAME/best/            the best-validation checkpoint
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::Device;
use rand::SeedableRng;
use serde_json::json;

use crate::checkpoint::{self, TrainState};
use crate::config::RunConfig;
use crate::data::{Batch, TextData, TrainLoader, Vocab, valid_batches};
use crate::eval::{EvalMetrics, LayerStats, evaluate};
use crate::generate::{SampleOptions, generate};
use crate::loss::Losses;
use crate::model::SwitchTransformer;
use crate::optim::{LabmlAdam, Noam, ParamGrads};
use crate::router::RoutingRng;
use crate::store::host_f32;
use crate::util::write_atomic;

/// Seeds derived from the run seed for streams that must not disturb training's.
const EVAL_STREAM: u64 = 0xe7a1;
const SAMPLE_STREAM: u64 = 0x5a3e;

/// What one optimizer step measured.
#[derive(Debug, Clone)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub ce: f64,
    pub lb: f64,
    /// Router z-loss, summed over layers.
    pub z: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub seconds: f64,
    pub layers: Vec<LayerStats>,
}

/// Progress reported to the caller of [`Trainer::run`].
pub enum Event<'a> {
    Step(&'a StepMetrics),
    Validation {
        step: u64,
        metrics: &'a EvalMetrics,
        sample: &'a str,
    },
    Checkpoint(&'a Path),
}

/// How [`Trainer::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Completed,
    /// Stopped by the caller's flag (Ctrl-C), after writing a checkpoint.
    Interrupted,
}

pub struct Trainer {
    pub config: RunConfig,
    pub run_dir: PathBuf,
    pub data: TextData,
    pub model: SwitchTransformer,
    pub step: u64,
    adam: LabmlAdam,
    noam: Noam,
    loader: TrainLoader,
    rng: RoutingRng,
    best_valid_loss: Option<f64>,
    valid: Vec<Batch>,
    device: Device,
}

impl Trainer {
    /// Starts a new run in `run_dir`, which must not hold a run already.
    pub fn create(
        mut config: RunConfig,
        data: TextData,
        run_dir: &Path,
        device: &Device,
    ) -> Result<Self> {
        config.model.n_vocab = data.vocab.len();
        config.validate()?;
        if run_dir.join("config.toml").exists() || run_dir.join("checkpoints").exists() {
            bail!(
                "{} already holds a run: continue it with --resume {0}, or choose another --name",
                run_dir.display()
            );
        }
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("cannot create the run directory {}", run_dir.display()))?;
        write_atomic(&run_dir.join("config.toml"), config.to_toml().as_bytes())?;
        write_atomic(&run_dir.join("vocab.json"), data.vocab.to_json().as_bytes())?;
        let device = device.clone().autodiff();
        let model = config.model.init(config.train.seed, &device)?;
        let t = &config.train;
        let adam = LabmlAdam::new(t.beta1, t.beta2, t.eps);
        let loader = TrainLoader::new(data.train.len(), t.seq_len, t.batch_size, t.seed);
        let rng = RoutingRng::seed_from_u64(t.seed);
        let trainer = Self::assemble(config, run_dir, data, model, adam, loader, rng, &device);
        trainer.truncate_metrics(0)?;
        Ok(trainer)
    }

    /// Continues the run in `run_dir` from its latest checkpoint. `data` must have the run's
    /// vocabulary.
    pub fn resume(run_dir: &Path, data: TextData, device: &Device) -> Result<Self> {
        let config = RunConfig::from_toml_file(&run_dir.join("config.toml"))
            .with_context(|| format!("{} is not a run directory", run_dir.display()))?;
        let vocab_text = std::fs::read_to_string(run_dir.join("vocab.json"))
            .with_context(|| format!("{} has no vocab.json", run_dir.display()))?;
        if Vocab::from_json(&vocab_text)? != data.vocab {
            bail!(
                "the data's characters differ from those of the run in {}: resume with the \
                 same --data",
                run_dir.display()
            );
        }
        let Some((_, dir)) = checkpoint::list(&run_dir.join("checkpoints")).pop() else {
            bail!("{} has no checkpoint to resume from", run_dir.display());
        };
        let device = device.clone().autodiff();
        let t = &config.train;
        let adam = LabmlAdam::new(t.beta1, t.beta2, t.eps);
        let loaded = checkpoint::load(&dir, &config.model, adam, &device)?;
        let mut loader = TrainLoader::new(data.train.len(), t.seq_len, t.batch_size, t.seed);
        loader.restore(loaded.state.loader);
        let mut trainer = Self::assemble(
            config,
            run_dir,
            data,
            loaded.model,
            loaded.adam,
            loader,
            loaded.state.routing_rng,
            &device,
        );
        trainer.step = loaded.state.step;
        trainer.best_valid_loss = loaded.state.best_valid_loss;
        trainer.truncate_metrics(trainer.step)?;
        Ok(trainer)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: RunConfig,
        run_dir: &Path,
        data: TextData,
        model: SwitchTransformer,
        adam: LabmlAdam,
        loader: TrainLoader,
        rng: RoutingRng,
        device: &Device,
    ) -> Self {
        let t = &config.train;
        let valid = valid_batches(&data.valid, t.seq_len, t.batch_size, Some(t.eval_batches));
        let noam = Noam {
            lr: t.lr,
            warmup: t.warmup,
            d_model: config.model.d_model,
        };
        Self {
            run_dir: run_dir.to_path_buf(),
            data,
            model,
            step: 0,
            adam,
            noam,
            loader,
            rng,
            best_valid_loss: None,
            valid,
            device: device.clone(),
            config,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.loader.state.epoch
    }

    /// One optimizer step on the next training batch.
    pub fn train_step(&mut self) -> StepMetrics {
        let start = Instant::now();
        let batch = self.loader.next_batch(&self.data.train);
        let (x, y) = batch.tensors(&self.device);
        let out = self.model.forward(x, &mut self.rng);
        let t = &self.config.train;
        let losses = Losses::new(out.logits, y, &out.stats, t.lb_coef, t.z_loss_coef);
        let (ce, lb, z) = (
            host_f32(losses.ce.clone())[0] as f64,
            host_f32(losses.lb.clone())[0] as f64,
            host_f32(losses.z.clone())[0] as f64,
        );
        let mut grads = ParamGrads::from_gradients(&self.model, losses.total.backward());
        let grad_norm = grads.clip_global_norm(self.config.train.grad_clip);
        let lr = self.noam.lr(self.step + 1);
        self.model = self.adam.step(self.model.clone(), &grads, lr);
        self.step += 1;
        let t = &self.config.train;
        StepMetrics {
            step: self.step,
            epoch: self.loader.state.epoch,
            loss: ce + t.lb_coef * lb + t.z_loss_coef * z,
            ce,
            lb,
            z,
            lr,
            grad_norm,
            tokens: batch.tokens(),
            seconds: start.elapsed().as_secs_f64(),
            layers: out
                .stats
                .iter()
                .map(|s| LayerStats::from_stats([s]))
                .collect(),
        }
    }

    /// Validation on the fixed batches with the training routing (labml's protocol), and a
    /// greedy sample from the configured prompt.
    pub fn validate(&self) -> Result<(EvalMetrics, String)> {
        let mut model = self.model.valid();
        model.set_training(false);
        let seed = self.config.train.seed;
        let metrics = evaluate(
            &model,
            &self.valid,
            &mut RoutingRng::seed_from_u64(seed ^ EVAL_STREAM),
        );
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
            let new = generate(&model, &prompt, &opts, &mut rng.clone(), &mut rng);
            format!("{}{}", t.sample_prompt, self.data.vocab.decode(&new))
        };
        Ok((metrics, sample))
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
    /// `keep_checkpoints`.
    pub fn save_checkpoint(&self, valid_loss: Option<f64>) -> Result<PathBuf> {
        let checkpoints = self.run_dir.join("checkpoints");
        let dir = checkpoint::step_dir(&checkpoints, self.step);
        checkpoint::save(
            &dir,
            &self.model,
            &self.config.model,
            &self.adam,
            &self.state(valid_loss),
        )?;
        let all = checkpoint::list(&checkpoints);
        let excess = all.len().saturating_sub(self.config.train.keep_checkpoints);
        for (_, old) in &all[..excess] {
            std::fs::remove_dir_all(old)
                .with_context(|| format!("cannot remove old checkpoint {}", old.display()))?;
        }
        Ok(dir)
    }

    /// Appends one JSON object to metrics.jsonl.
    pub fn log(&self, value: &serde_json::Value) -> Result<()> {
        let path = self.run_dir.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        writeln!(f, "{value}").with_context(|| format!("cannot write {}", path.display()))
    }

    /// Keeps only the metric lines up to `step` (a resumed run rewrites what follows).
    fn truncate_metrics(&self, step: u64) -> Result<()> {
        let path = self.run_dir.join("metrics.jsonl");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomic(&path, kept.as_bytes())
    }

    /// Trains until `train.steps`, or until `stop` is set (then checkpoints and returns).
    pub fn run(&mut self, stop: &AtomicBool, on_event: &mut dyn FnMut(Event)) -> Result<Finish> {
        let t = self.config.train.clone();
        let (mut interval_tokens, mut interval_seconds) = (0usize, 0.0f64);
        while self.step < t.steps {
            if stop.load(Ordering::SeqCst) {
                let dir = self.save_checkpoint(None)?;
                on_event(Event::Checkpoint(&dir));
                return Ok(Finish::Interrupted);
            }
            let m = self.train_step();
            interval_tokens += m.tokens;
            interval_seconds += m.seconds;
            on_event(Event::Step(&m));
            let last = self.step == t.steps;
            if self.step.is_multiple_of(t.log_interval) || last {
                let dropped = m.layers.iter().map(|l| l.dropped_frac).sum::<f64>()
                    / m.layers.len().max(1) as f64;
                self.log(&json!({
                    "step": m.step,
                    "epoch": m.epoch,
                    "train_loss": m.loss,
                    "ce_loss": m.ce,
                    "lb_loss": m.lb,
                    "z_loss": m.z,
                    "lr": m.lr,
                    "grad_norm": m.grad_norm,
                    "tokens_per_s": interval_tokens as f64 / interval_seconds.max(1e-9),
                    "dropped_frac": dropped,
                    "layers": m.layers,
                }))?;
                (interval_tokens, interval_seconds) = (0, 0.0);
            }
            let mut valid_loss = None;
            if self.step.is_multiple_of(t.eval_interval) || last {
                let (metrics, sample) = self.validate()?;
                self.log(&json!({
                    "step": self.step,
                    "valid_loss": metrics.loss,
                    "valid_accuracy": metrics.accuracy,
                    "lb_loss": metrics.lb_loss,
                    "dropped_frac": metrics.dropped_frac,
                    "layers": metrics.layers,
                    "sample": sample,
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
                        &self.run_dir.join("best"),
                        &self.model,
                        &self.config.model,
                        &self.adam,
                        &self.state(valid_loss),
                    )?;
                }
            }
            if self.step.is_multiple_of(t.checkpoint_interval) || last {
                let dir = self.save_checkpoint(valid_loss)?;
                on_event(Event::Checkpoint(&dir));
            }
        }
        Ok(Finish::Completed)
    }
}

/// Loads the model of a run for inference: `best/` if present, else the latest checkpoint.
pub fn load_run_model(
    run_dir: &Path,
    device: &Device,
) -> Result<(RunConfig, Vocab, SwitchTransformer)> {
    let config = RunConfig::from_toml_file(&run_dir.join("config.toml"))
        .with_context(|| format!("{} is not a run directory", run_dir.display()))?;
    let vocab = Vocab::from_json(
        &std::fs::read_to_string(run_dir.join("vocab.json"))
            .with_context(|| format!("{} has no vocab.json", run_dir.display()))?,
    )?;
    let dir = if run_dir.join("best").is_dir() {
        run_dir.join("best")
    } else {
        checkpoint::list(&run_dir.join("checkpoints"))
            .pop()
            .map(|(_, d)| d)
            .with_context(|| format!("{} has no checkpoint", run_dir.display()))?
    };
    let mut model =
        crate::weights::load_model(&dir.join("model.safetensors"), &config.model, device)
            .with_context(|| format!("checkpoint {} is unusable", dir.display()))?;
    model.set_training(false);
    Ok((config, vocab, model))
}
