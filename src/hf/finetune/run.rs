//! `switch finetune`: a run folder, its TOML config (every key, written at the start), the
//! update loop, validation (loss, greedy generation with the key/value cache, ROUGE), and the
//! fine-tuned model in Hugging Face's layout.
//!
//! ```text
//! runs/NAME/config.toml          every setting, the model's dropout and jitter resolved
//! runs/NAME/metrics.jsonl        one line per logged update, one per validation
//! runs/NAME/generations.jsonl    the last validation's generations with their targets
//! runs/NAME/model-step-N/        a checkpoint (save_every), the previous one removed once
//!                                this one is whole
//! runs/NAME/model/               the fine-tuned model: config.json, model.safetensors,
//!                                tokenizer files; `switch seq2seq` and transformers read it
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::data::{Batch, Dataset};
use super::{Finetuner, Optimisation, UpdateStats, batch_loss, rouge};
use crate::hf::checkpoint::{SaveDtype, copy_model_files, write_dir_whole};
use crate::hf::generate::generate;
use crate::hf::model::HfSwitchTransformer;
use crate::hf::tokenize::HfTokenizer;
use crate::infer::generate::SampleOptions;
use crate::optim::{AdamWConfig, LinearSchedule};
use crate::routing::RoutingRng;

/// Every setting of a fine-tuning run (`--set key=value`); defaults are `Trainer`'s where it
/// has one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    /// Peak learning rate (`Trainer`: 5e-5).
    pub learning_rate: f64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per update.
    pub grad_accum: usize,
    /// Passes over the training file (when `max_steps` is 0).
    pub epochs: usize,
    /// Updates in all; 0: `epochs` passes.
    pub max_steps: u64,
    /// Updates of linear warm-up.
    pub warmup_steps: u64,
    /// AdamW's decoupled weight decay (not on norms and biases).
    pub weight_decay: f64,
    /// Global gradient-norm limit; 0 turns clipping off.
    pub max_grad_norm: f64,
    /// AdamW's first-moment decay.
    pub adam_beta1: f64,
    /// AdamW's second-moment decay.
    pub adam_beta2: f64,
    /// AdamW's epsilon.
    pub adam_epsilon: f64,
    /// Input tokens kept (longer inputs are cut, and counted).
    pub max_source_len: usize,
    /// Target tokens kept (longer targets are cut, and counted); also the validation's
    /// generation length.
    pub max_target_len: usize,
    /// Dropout in training; the model's `dropout_rate` when absent.
    pub dropout_rate: Option<f64>,
    /// Router jitter in training; the model's `router_jitter_noise` when absent.
    pub router_jitter_noise: Option<f64>,
    /// Seed of the shuffling, dropout and jitter.
    pub seed: u64,
    /// Updates between metrics lines.
    pub log_every: u64,
    /// Updates between validations (0: at the end only).
    pub eval_every: u64,
    /// Validation examples whose generations are scored with ROUGE (0: none).
    pub eval_generate: usize,
    /// Updates between checkpoints (0: the final model only).
    pub save_every: u64,
    /// `f32` or `bf16`: what the saved model is written in.
    pub save_dtype: String,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            learning_rate: 5e-5,
            batch_size: 8,
            grad_accum: 1,
            epochs: 3,
            max_steps: 0,
            warmup_steps: 0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_source_len: 512,
            max_target_len: 128,
            dropout_rate: None,
            router_jitter_noise: None,
            seed: 42,
            log_every: 10,
            eval_every: 100,
            eval_generate: 32,
            save_every: 0,
            save_dtype: "f32".into(),
        }
    }
}

impl FinetuneConfig {
    /// Applies `key=value` (a TOML value, or bare text for a string).
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (key, value) = assignment
            .split_once('=')
            .with_context(|| format!("--set takes key=value, got `{assignment}`"))?;
        let (key, value) = (key.trim(), value.trim());
        let mut table = toml::Table::try_from(&*self).expect("config is a table");
        let known = toml::Table::try_from(FinetuneConfig {
            dropout_rate: Some(0.0),
            router_jitter_noise: Some(0.0),
            ..Default::default()
        })
        .expect("config is a table");
        let Some(current) = known.get(key) else {
            let keys: Vec<&String> = known.keys().collect();
            bail!(
                "unknown finetune key `{key}`; the keys are: {}",
                keys.iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        let parsed = match (current, parsed) {
            (toml::Value::Float(_), toml::Value::Integer(i)) => toml::Value::Float(i as f64),
            (_, p) => p,
        };
        table.insert(key.to_string(), parsed);
        let new: Self = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| {
                anyhow::anyhow!("invalid value `{value}` for {key}: {}", e.message().trim())
            })?;
        new.check()?;
        *self = new;
        Ok(())
    }

    /// Refuses settings that cannot run.
    pub fn check(&self) -> Result<()> {
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            bail!("learning_rate must be > 0, got {}", self.learning_rate);
        }
        for (k, v) in [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("max_source_len", self.max_source_len),
            ("max_target_len", self.max_target_len),
            ("log_every", self.log_every as usize),
        ] {
            if v == 0 {
                bail!("{k} must be at least 1");
            }
        }
        if self.max_steps == 0 && self.epochs == 0 {
            bail!("set max_steps or epochs (both are 0)");
        }
        for (k, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                bail!("{k} must be in [0, 1), got {v}");
            }
        }
        for (k, v) in [
            ("dropout_rate", self.dropout_rate),
            ("router_jitter_noise", self.router_jitter_noise),
        ] {
            if let Some(v) = v
                && !(0.0..1.0).contains(&v)
            {
                bail!("{k} must be in [0, 1), got {v}");
            }
        }
        if !(self.weight_decay >= 0.0 && self.max_grad_norm >= 0.0 && self.adam_epsilon > 0.0) {
            bail!("weight_decay and max_grad_norm must be >= 0, adam_epsilon > 0");
        }
        self.dtype()?;
        Ok(())
    }

    fn dtype(&self) -> Result<SaveDtype> {
        match self.save_dtype.as_str() {
            "f32" => Ok(SaveDtype::F32),
            "bf16" => Ok(SaveDtype::Bf16),
            other => bail!("save_dtype must be f32 or bf16, got `{other}`"),
        }
    }
}

/// Where the run reads and writes.
#[derive(Debug, Clone)]
pub struct FinetuneArgs {
    /// The Hugging Face model folder.
    pub model: PathBuf,
    /// Training JSON lines.
    pub train: PathBuf,
    /// Validation JSON lines.
    pub valid: Option<PathBuf>,
    /// The run folder (must not hold a run yet).
    pub run_dir: PathBuf,
    /// Settings.
    pub config: FinetuneConfig,
}

/// What a finished run measured.
#[derive(Debug, Clone, Default)]
pub struct FinetuneSummary {
    /// Updates done.
    pub updates: u64,
    /// The last update's training loss.
    pub last_loss: f64,
    /// Validation before training and after (loss, ROUGE-1/2/L), when there was a validation
    /// file.
    pub valid: Option<(Validation, Validation)>,
    /// Target tokens per second over the updates after the first (over the one update when
    /// there is one).
    pub tokens_per_s: f64,
    /// Seconds per update, likewise.
    pub update_s: f64,
    /// Where the model was written.
    pub model_dir: PathBuf,
}

/// One validation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Validation {
    /// Cross-entropy over the validation targets (eval mode: no dropout, no router losses).
    pub loss: f64,
    /// ROUGE-1, ROUGE-2, ROUGE-L F-measures of the generations (0 when none were scored).
    pub rouge: [f64; 3],
}

fn save_model(ft: &Finetuner, from: &Path, dir: &Path, dtype: SaveDtype) -> Result<()> {
    write_dir_whole(dir, |tmp| {
        ft.model.save(tmp, dtype)?;
        copy_model_files(from, tmp)
    })
}

/// Validation loss and, on the first `generate` examples, ROUGE of greedy generations.
pub fn validate(
    model: &HfSwitchTransformer,
    tokenizer: &HfTokenizer,
    data: &Dataset,
    batch_size: usize,
    generate_n: usize,
    max_new: usize,
) -> Result<(Validation, Vec<(String, String)>)> {
    let c = &model.config;
    let (pad, start) = (c.pad(), c.decoder_start());
    let (mut sum, mut count) = (0.0, 0usize);
    for chunk in data.examples.chunks(batch_size) {
        let refs: Vec<_> = chunk.iter().collect();
        let batch = Batch::new(&refs, pad, start);
        let n = batch
            .labels
            .iter()
            .filter(|&&l| l != super::loss::IGNORE)
            .count();
        let (loss, _) = batch_loss(model, &batch, None)?;
        sum += f64::from(loss.cross_entropy.into_scalar::<f32>()) * n as f64;
        count += n;
    }
    let mut pairs = Vec::new();
    let eos = c.eos_token_id.unwrap_or(1);
    let opts = SampleOptions {
        max_tokens: max_new,
        temperature: 0.0,
        top_k: None,
        context: usize::MAX,
    };
    let mut rng = RoutingRng::seed_from_u64(0);
    let take = generate_n.min(data.examples.len());
    for chunk in data.examples[..take].chunks(batch_size) {
        let refs: Vec<_> = chunk.iter().collect();
        let batch = Batch::new(&refs, pad, start);
        let enc = model.encode(&batch.input_ids, &batch.mask, batch.b, batch.src)?;
        let out = generate(model, &enc, &opts, true, Some((eos, pad)), &mut rng)?;
        for (ids, e) in out.iter().zip(chunk) {
            pairs.push((tokenizer.decode(&ids[1..], false)?, e.target_text.clone()));
        }
    }
    let rouge = if pairs.is_empty() {
        [0.0; 3]
    } else {
        rouge::corpus(&pairs)
    };
    Ok((
        Validation {
            loss: sum / count.max(1) as f64,
            rouge,
        },
        pairs,
    ))
}

fn append_line(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{v}").with_context(|| format!("cannot write {}", path.display()))
}

/// Runs `args` on `device`, printing progress lines through `log`.
pub fn finetune(
    args: FinetuneArgs,
    device: &Device,
    log: &mut dyn FnMut(&str),
) -> Result<FinetuneSummary> {
    let mut config = args.config;
    config.check()?;
    let dir = &args.run_dir;
    if dir.join("config.toml").exists() {
        bail!(
            "{} already holds a run: choose another --name (a run is never overwritten)",
            dir.display()
        );
    }
    let model = HfSwitchTransformer::load(&args.model, device)?;
    let c = model.config.clone();
    let tokenizer = HfTokenizer::load(&args.model, c.pad())?;
    let read = |p: &Path| {
        Dataset::read(
            p,
            &tokenizer,
            config.max_source_len,
            config.max_target_len,
            c.vocab_size,
        )
    };
    let train = read(&args.train)?;
    let valid = args.valid.as_deref().map(read).transpose()?;
    for (what, d) in [("train", Some(&train)), ("valid", valid.as_ref())] {
        if let Some(note) = d.and_then(|d| d.cut_note(config.max_source_len, config.max_target_len))
        {
            log(&format!("note: {what}: {note}"));
        }
    }
    config.dropout_rate.get_or_insert(c.dropout_rate);
    config
        .router_jitter_noise
        .get_or_insert(c.router_jitter_noise);
    let per_epoch = train
        .examples
        .len()
        .div_ceil(config.batch_size)
        .div_ceil(config.grad_accum) as u64;
    let total = if config.max_steps > 0 {
        config.max_steps
    } else {
        per_epoch * config.epochs as u64
    };

    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let _lock = crate::train::lock::RunLock::acquire(dir)?;
    let mut text = toml::to_string(&config).expect("config serialises");
    text = format!(
        "# switch finetune: model {}, train {}, valid {}\n{text}",
        args.model.display(),
        args.train.display(),
        args.valid
            .as_ref()
            .map_or("none".into(), |p| p.display().to_string())
    );
    crate::util::write_atomic(&dir.join("config.toml"), text.as_bytes())?;
    let metrics = dir.join("metrics.jsonl");

    let opt = Optimisation {
        learning_rate: config.learning_rate,
        adamw: AdamWConfig {
            beta1: config.adam_beta1,
            beta2: config.adam_beta2,
            eps: config.adam_epsilon,
            weight_decay: config.weight_decay,
        },
        schedule: LinearSchedule {
            warmup: config.warmup_steps,
            total,
        },
        max_grad_norm: config.max_grad_norm,
        dropout: config.dropout_rate.unwrap_or(0.0),
        jitter: config.router_jitter_noise.unwrap_or(0.0),
    };
    let mut ft = Finetuner::new(model, device, opt, config.seed)?;
    log(&format!(
        "fine-tuning {}: {} training pairs, {} updates of {} x {} sequences, lr {}, dropout {}, \
         jitter {}",
        args.model.display(),
        train.examples.len(),
        total,
        config.grad_accum,
        config.batch_size,
        config.learning_rate,
        opt.dropout,
        opt.jitter
    ));

    let run_validation =
        |ft: &Finetuner, step: u64, log: &mut dyn FnMut(&str)| -> Result<Option<Validation>> {
            let Some(valid) = &valid else { return Ok(None) };
            let m = ft.inference_model()?;
            let (v, pairs) = validate(
                &m,
                &tokenizer,
                valid,
                config.batch_size,
                config.eval_generate,
                config.max_target_len,
            )?;
            append_line(
                &metrics,
                &serde_json::json!({"step": step, "valid_loss": v.loss, "rouge1": v.rouge[0],
                "rouge2": v.rouge[1], "rougeL": v.rouge[2]}),
            )?;
            let lines: String = pairs
                .iter()
                .map(|(g, t)| {
                    serde_json::json!({"step": step, "generated": g, "target": t}).to_string()
                        + "\n"
                })
                .collect();
            crate::util::write_atomic(&dir.join("generations.jsonl"), lines.as_bytes())?;
            log(&format!(
                "step {step}: valid loss {:.4}, ROUGE-1 {:.4}, ROUGE-2 {:.4}, ROUGE-L {:.4}",
                v.loss, v.rouge[0], v.rouge[1], v.rouge[2]
            ));
            Ok(Some(v))
        };

    let first = run_validation(&ft, 0, log)?;
    let mut order: Vec<usize> = (0..train.examples.len()).collect();
    let mut shuffle = RoutingRng::seed_from_u64(config.seed);
    order.shuffle(&mut shuffle);
    let mut cursor = 0;
    let (pad, start) = (c.pad(), c.decoder_start());
    let mut next_batch = || {
        if cursor >= order.len() {
            order.shuffle(&mut shuffle);
            cursor = 0;
        }
        let end = (cursor + config.batch_size).min(order.len());
        let refs: Vec<_> = order[cursor..end]
            .iter()
            .map(|&i| &train.examples[i])
            .collect();
        cursor = end;
        Batch::new(&refs, pad, start)
    };
    let mut began = Instant::now();
    let (mut tokens, mut last) = (0usize, UpdateStats::default());
    let mut last_ckpt: Option<PathBuf> = None;
    let dtype = config.dtype()?;
    for update in 1..=total {
        let batches: Vec<Batch> = (0..config.grad_accum).map(|_| next_batch()).collect();
        last = ft.update(&batches)?;
        tokens += last.tokens;
        if update % config.log_every == 0 || update == total {
            let secs = began.elapsed().as_secs_f64().max(1e-9);
            append_line(
                &metrics,
                &serde_json::json!({"step": update, "loss": last.loss, "ce": last.cross_entropy,
                    "z_enc": last.z[0], "z_dec": last.z[1], "aux_enc": last.aux[0],
                    "aux_dec": last.aux[1], "grad_norm": last.grad_norm, "lr": last.lr,
                    "dropped": last.dropped, "tokens_per_s": tokens as f64 / secs}),
            )?;
            log(&format!(
                "step {update}/{total}: loss {:.4} (ce {:.4}), grad norm {:.3}, lr {:.3e}, \
                 dropped {:.1}%, {:.0} target tokens/s",
                last.loss,
                last.cross_entropy,
                last.grad_norm,
                last.lr,
                100.0 * last.dropped,
                tokens as f64 / secs
            ));
        }
        if config.eval_every > 0 && update % config.eval_every == 0 && update != total {
            run_validation(&ft, update, log)?;
        }
        if config.save_every > 0 && update % config.save_every == 0 && update != total {
            let ck = dir.join(format!("model-step-{update}"));
            save_model(&ft, &args.model, &ck, dtype)?;
            if let Some(old) = last_ckpt.replace(ck) {
                std::fs::remove_dir_all(&old)
                    .with_context(|| format!("cannot remove {}", old.display()))?;
            }
        }
        if update == 1 && total > 1 {
            // Throughput over the updates after the first, which allocates the optimizer's
            // state, and its validation and checkpoint (as benchmarks/hf_bench.py times transformers).
            (began, tokens) = (Instant::now(), 0);
        }
    }
    let secs = began.elapsed().as_secs_f64().max(1e-9);
    let (tokens_per_s, update_s) = (tokens as f64 / secs, secs / (total - 1).max(1) as f64);
    let end = run_validation(&ft, total, log)?;
    let model_dir = dir.join("model");
    save_model(&ft, &args.model, &model_dir, dtype)?;
    if let Some(old) = last_ckpt {
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("cannot remove {}", old.display()))?;
    }
    log(&format!("wrote {}", model_dir.display()));
    Ok(FinetuneSummary {
        updates: total,
        last_loss: last.loss,
        valid: first.zip(end),
        tokens_per_s,
        update_s,
        model_dir,
    })
}
