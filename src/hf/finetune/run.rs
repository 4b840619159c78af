//! `switch finetune`: a run folder, its TOML config (every key, written at the start), the
//! update loop, validation (loss, greedy generation with the key/value cache, ROUGE), and the
//! fine-tuned model in Hugging Face's layout.
//!
//! ```text
//! runs/NAME/config.toml          every setting, the model's dropout and jitter resolved
//! runs/NAME/run.json             the model and data files (what --resume reads)
//! runs/NAME/metrics.jsonl        one line per logged update, one per validation
//! runs/NAME/generations.jsonl    the last validation's generations with their targets
//! runs/NAME/model-step-N/        a checkpoint (save_every, and on a stop signal), the
//!                                previous one removed once this one is whole; `--resume`
//!                                continues from it exactly ([`super::resume`])
//! runs/NAME/model/               the fine-tuned model: config.json, model.safetensors,
//!                                tokenizer files; `switch seq2seq` and transformers read it
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use rand::SeedableRng;

use super::config::FinetuneConfig;
use super::data::{Batch, Dataset};
use super::parallel::Workers;
use super::resume::{self, ResumeState, RunInputs, Sampler, optimizer_file, restore_optimizer};
use super::validate::{Validation, validate};
use super::{Finetuner, Optimisation, UpdateStats};
use crate::distributed::{Collective, agree, check_same, check_same_start};
use crate::hf::checkpoint::{SaveDtype, copy_model_files, write_dir_whole};
use crate::hf::model::HfSwitchTransformer;
use crate::hf::tokenize::HfTokenizer;
use crate::optim::{AdamWConfig, LinearSchedule};
use crate::routing::RoutingRng;
use crate::store::TensorFile;

/// Where the run reads and writes.
#[derive(Clone)]
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
    /// Continue the run in `run_dir` from its latest checkpoint (its own config and inputs:
    /// see [`resume_args`]).
    pub resume: bool,
    /// Set by the caller (a signal handler) to stop after the current update, with a
    /// checkpoint that `--resume` continues from.
    pub stop: Option<Arc<AtomicBool>>,
    /// The ranks of the job this process is one of (`--distributed`): they split every
    /// update's micro-batches and the validation; rank 0 writes the run.
    pub world: Option<Arc<dyn Collective>>,
}

/// The arguments that continue the run in `run_dir`: its `config.toml` and `run.json`.
pub fn resume_args(run_dir: &Path) -> Result<FinetuneArgs> {
    let inputs = RunInputs::read(run_dir)?;
    let path = run_dir.join("config.toml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let config: FinetuneConfig =
        toml::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
    Ok(FinetuneArgs {
        model: inputs.model,
        train: inputs.train,
        valid: inputs.valid,
        run_dir: run_dir.to_path_buf(),
        config,
        resume: true,
        stop: None,
        world: None,
    })
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
    /// Where the model was written (the last checkpoint when stopped).
    pub model_dir: PathBuf,
    /// The update a resumed run continued from.
    pub resumed_from: Option<u64>,
    /// Whether the run stopped early (the caller's flag), after writing a checkpoint.
    pub stopped: bool,
}

fn save_model(ft: &Finetuner, from: &Path, dir: &Path, dtype: SaveDtype) -> Result<()> {
    write_dir_whole(dir, |tmp| {
        ft.model.save(tmp, dtype)?;
        copy_model_files(from, tmp)
    })
}

/// A checkpoint that `--resume` continues from exactly ([`super::resume`]): the model in f32,
/// AdamW's state, the generators and the data position; whole or not at all.
fn save_checkpoint(ft: &Finetuner, sampler: &Sampler, from: &Path, dir: &Path) -> Result<()> {
    let (names, _) = ft.param_names_and_sizes()?;
    write_dir_whole(dir, |tmp| {
        ft.model.save(tmp, SaveDtype::F32)?;
        copy_model_files(from, tmp)?;
        optimizer_file(&ft.adamw, &names)?.write(&tmp.join("optimizer.safetensors"))?;
        let state = ResumeState {
            updates: ft.updates,
            rng: ft.rng.clone(),
            sampler: sampler.clone(),
        };
        crate::util::write_atomic(
            &tmp.join("state.json"),
            serde_json::to_string(&state)?.as_bytes(),
        )
    })
}

/// What rank 0 spent in exchanges with the other ranks, in all and by kind (waiting for them
/// included): where a job's time between its computations goes.
fn exchange_line(w: &dyn Collective) -> String {
    let mut tally: Vec<_> = w.exchange_tally().into_iter().collect();
    tally.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
    let mut parts: Vec<String> = tally
        .iter()
        .take(3)
        .map(|(what, t)| format!("{what} {:.2} s ({:.1} MB)", t.seconds, t.bytes as f64 / 1e6))
        .collect();
    if tally.len() > 3 {
        let rest: f64 = tally[3..].iter().map(|(_, t)| t.seconds).sum();
        parts.push(format!("the rest {rest:.2} s"));
    }
    format!(
        "exchanges between the {} ranks (rank 0, waiting included): {:.2} s: {}",
        w.size(),
        w.exchange_seconds(),
        parts.join(", ")
    )
}

fn append_line(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{v}").with_context(|| format!("cannot write {}", path.display()))
}

/// What every rank prepares before the run starts: the model, its tokenizer, the data.
struct Prepared {
    model: HfSwitchTransformer,
    /// Where the tokenizer came from: the model folder, or the checkpoint resumed from.
    source: PathBuf,
    /// The checkpoint resumed from and its state.
    checkpoint: Option<(PathBuf, ResumeState)>,
    tokenizer: HfTokenizer,
    train: Dataset,
    valid: Option<Dataset>,
}

fn prepare(args: &FinetuneArgs, config: &FinetuneConfig, device: &Device) -> Result<Prepared> {
    let dir = &args.run_dir;
    let (model, source, checkpoint) = if args.resume {
        RunInputs::read(dir)?.check_unchanged()?;
        let Some((n, ck)) = resume::latest_checkpoint(dir)? else {
            bail!(
                "{} has no checkpoint to resume from (save_every = {}): start a new run",
                dir.display(),
                config.save_every
            );
        };
        let state = ResumeState::read(&ck, n)?;
        let model = HfSwitchTransformer::load(&ck, device)?;
        (model, ck.clone(), Some((ck, state)))
    } else {
        let model = HfSwitchTransformer::load(&args.model, device)?;
        (model, args.model.clone(), None)
    };
    let c = &model.config;
    let tokenizer = HfTokenizer::load(&source, c.pad())?;
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
    Ok(Prepared {
        model,
        source,
        checkpoint,
        tokenizer,
        train,
        valid,
    })
}

/// Refuses a folder that holds a finished run (resuming) or any run (starting), and takes
/// the run's lock (a resumed run tidies what a killed one left).
fn claim_run_dir(args: &FinetuneArgs) -> Result<Option<crate::train::lock::RunLock>> {
    let dir = &args.run_dir;
    if args.resume {
        let model_dir = dir.join("model");
        if model_dir.join("config.json").exists() {
            bail!(
                "{} is finished ({} is written): nothing to resume",
                dir.display(),
                model_dir.display()
            );
        }
        let lock = crate::train::lock::RunLock::acquire(dir)?;
        crate::train::checkpoint::tidy(dir)?;
        return Ok(Some(lock));
    }
    if dir.join("config.toml").exists() {
        bail!(
            "{} already holds a run: choose another --name, or continue it with --resume (a \
             run is never overwritten)",
            dir.display()
        );
    }
    Ok(None)
}

/// Runs `args` on `device`, printing progress lines through `log`: a new run, or with
/// `args.resume` the rest of the run in `args.run_dir` from its latest checkpoint. In a job
/// of several ranks (`args.world`) every rank calls it; rank 0 writes the run and logs.
pub fn finetune(
    args: FinetuneArgs,
    device: &Device,
    log: &mut dyn FnMut(&str),
) -> Result<FinetuneSummary> {
    let world = args.world.clone();
    let w = world.as_deref();
    let writer = w.is_none_or(|w| w.rank() == 0);
    let mut quiet = |_: &str| {};
    let log: &mut dyn FnMut(&str) = if writer { log } else { &mut quiet };
    let mut config = args.config.clone();
    config.check()?;
    if let Some(w) = w {
        check_same_start(
            w,
            &[
                ("settings".into(), toml::to_string(&config)?),
                ("model".into(), args.model.display().to_string()),
                ("train".into(), args.train.display().to_string()),
                ("run".into(), args.run_dir.display().to_string()),
                ("resume".into(), args.resume.to_string()),
            ],
        )?;
    }
    let dir = &args.run_dir;
    let model_dir = dir.join("model");
    // Rank 0 checks the folder and holds the lock; a new run loads its model before its
    // folder exists, a resumed one its checkpoint once the lock is held.
    let claimed = if writer {
        claim_run_dir(&args)
    } else {
        Ok(None)
    };
    let lock = agree(w, "claiming the run's folder", claimed)?;
    let Prepared {
        model,
        source,
        checkpoint,
        tokenizer,
        train,
        valid,
    } = agree(
        w,
        "loading the model and the data",
        prepare(&args, &config, device),
    )?;
    let c = model.config.clone();
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

    let started = if writer && lock.is_none() {
        (|| {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let lock = crate::train::lock::RunLock::acquire(dir)?;
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
            let inputs = RunInputs::new(&args.model, &args.train, args.valid.as_deref())?;
            crate::util::write_atomic(
                &dir.join("run.json"),
                serde_json::to_string_pretty(&inputs)?.as_bytes(),
            )?;
            Ok(Some(lock))
        })()
    } else {
        Ok(lock)
    };
    let _lock = agree(w, "writing the run's folder", started)?;
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
        precision: config.precision,
    };
    let mut ft = Finetuner::new(model, device, opt, config.seed)?;
    ft.workers = Workers::new(config.replicas, world.clone(), device)?;
    ft.workers.share(config.grad_accum)?;
    let mut sampler = Sampler::new(train.examples.len(), RoutingRng::seed_from_u64(config.seed));
    let mut last_ckpt: Option<PathBuf> = None;
    let start = match checkpoint {
        Some((ck, state)) => {
            let (names, sizes) = ft.param_names_and_sizes()?;
            let opt_file = TensorFile::read(&ck.join("optimizer.safetensors"))?;
            restore_optimizer(&mut ft.adamw, &opt_file, &names, &sizes)
                .with_context(|| format!("resuming from {}", ck.display()))?;
            if state.sampler.order.len() != train.examples.len() {
                bail!(
                    "{} has {} pairs, the run's data order {}: is it the run's file?",
                    args.train.display(),
                    train.examples.len(),
                    state.sampler.order.len()
                );
            }
            (ft.updates, ft.rng, sampler) = (state.updates, state.rng, state.sampler);
            if writer {
                resume::truncate_metrics(&metrics, state.updates)?;
            }
            log(&format!(
                "resuming {} from {} (update {} of {total})",
                dir.display(),
                ck.display(),
                state.updates
            ));
            last_ckpt = Some(ck);
            state.updates
        }
        None => 0,
    };
    if start >= total {
        bail!("{} has done its {total} updates already", dir.display());
    }
    let workers = match ft.workers.count() {
        1 => String::new(),
        n => format!(
            ", split over {n} workers ({} replicas x {} ranks)",
            config.replicas,
            n / config.replicas
        ),
    };
    log(&format!(
        "fine-tuning {}: {} training pairs, {} updates of {} x {} sequences{workers}, lr {}, \
         dropout {}, jitter {}, computing in {}",
        args.model.display(),
        train.examples.len(),
        total,
        config.grad_accum,
        config.batch_size,
        config.learning_rate,
        opt.dropout,
        opt.jitter,
        match ft.model.compute() {
            burn::tensor::DType::BF16 => "bf16",
            _ => "f32",
        }
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
                w,
            )?;
            if writer {
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
            }
            log(&format!(
                "step {step}: valid loss {:.4}, ROUGE-1 {:.4}, ROUGE-2 {:.4}, ROUGE-L {:.4}",
                v.loss, v.rouge[0], v.rouge[1], v.rouge[2]
            ));
            Ok(Some(v))
        };

    let first = if start == 0 {
        run_validation(&ft, 0, log)?
    } else {
        None
    };
    let (pad, dec_start) = (c.pad(), c.decoder_start());
    let mut began = Instant::now();
    let (mut tokens, mut last) = (0usize, UpdateStats::default());
    let dtype = config.dtype()?;
    let stop = args.stop.clone().unwrap_or_default();
    let mut skipped = 0u64;
    // The tokenizer files come from the model folder, then from the latest checkpoint (which
    // a resumed run may outlive its model folder with).
    let files_from = |last: &Option<PathBuf>| last.clone().unwrap_or_else(|| source.clone());
    for update in start + 1..=total {
        if let Some(w) = w {
            w.set_step(update);
        }
        let batches: Vec<Batch> = (0..config.grad_accum)
            .map(|_| sampler.next(&train, config.batch_size, pad, dec_start))
            .collect();
        last = ft.update(&batches)?;
        if last.skipped {
            skipped += 1;
            let kept = last_ckpt.as_ref().map_or(String::new(), |k| {
                format!("; the last checkpoint is {}", k.display())
            });
            if skipped > config.skip_nonfinite {
                bail!(
                    "update {update}: the gradient norm is {} (the loss was {}): lower the \
                     learning rate, or let skip_nonfinite skip such updates; the model was not \
                     changed by it{kept}",
                    last.grad_norm,
                    last.loss
                );
            }
            log(&format!(
                "update {update}: non-finite gradient norm ({}): skipped, the model unchanged \
                 ({skipped} of skip_nonfinite = {})",
                last.grad_norm, config.skip_nonfinite
            ));
        }
        tokens += last.tokens;
        if writer && (update % config.log_every == 0 || update == total) {
            let secs = began.elapsed().as_secs_f64().max(1e-9);
            append_line(
                &metrics,
                &serde_json::json!({"step": update, "loss": last.loss, "ce": last.cross_entropy,
                    "z_enc": last.z[0], "z_dec": last.z[1], "aux_enc": last.aux[0],
                    "aux_dec": last.aux[1], "grad_norm": last.grad_norm, "lr": last.lr,
                    "dropped": last.dropped, "layers": last.layers, "skipped": last.skipped,
                    "tokens_per_s": tokens as f64 / secs}),
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
        // A signal to any rank stops every rank after this update.
        let mut stopping = [f64::from(u8::from(
            stop.load(Ordering::SeqCst) && update != total,
        ))];
        if let Some(w) = w {
            w.all_reduce_sum_f64("stop signal", &mut stopping)?;
        }
        let stopping = stopping[0] > 0.0;
        if (config.save_every > 0 && update % config.save_every == 0 && update != total) || stopping
        {
            if let Some(w) = w {
                check_same(w, update, ft.checksum()?)?;
            }
            let ck = dir.join(format!("model-step-{update}"));
            let saved = if writer {
                save_checkpoint(&ft, &sampler, &files_from(&last_ckpt), &ck)
            } else {
                Ok(())
            };
            agree(w, "writing a checkpoint", saved).map_err(|e| {
                let kept = last_ckpt.as_ref().map_or(String::new(), |k| {
                    format!(
                        "; {} is kept: make room and continue with `switch finetune --resume {}`",
                        k.display(),
                        dir.display()
                    )
                });
                e.context(format!("the checkpoint of update {update} failed{kept}"))
            })?;
            if let Some(old) = last_ckpt.replace(ck)
                && writer
            {
                crate::train::checkpoint::remove(&old)?;
            }
        }
        if stopping {
            let ck = last_ckpt.expect("just written");
            log(&format!(
                "stopped after update {update} of {total}: checkpoint {}; continue with \
                 `switch finetune --resume {}`",
                ck.display(),
                dir.display()
            ));
            return Ok(FinetuneSummary {
                updates: update,
                last_loss: last.loss,
                valid: None,
                tokens_per_s: 0.0,
                update_s: 0.0,
                model_dir: ck,
                resumed_from: (start > 0).then_some(start),
                stopped: true,
            });
        }
        if update == start + 1 && total > start + 1 {
            // Throughput over the updates after the first, which allocates the optimizer's
            // state, and its validation and checkpoint (as benchmarks/hf_bench.py times transformers).
            (began, tokens) = (Instant::now(), 0);
        }
    }
    let secs = began.elapsed().as_secs_f64().max(1e-9);
    let timed = (total - start).saturating_sub(1).max(1);
    let (tokens_per_s, update_s) = (tokens as f64 / secs, secs / timed as f64);
    // AdamW's moments (twice the model's f32 size) are not needed past the last update: freed
    // before the validation and the save, which then add to the model alone.
    ft.adamw.state = Vec::new();
    if let Some(w) = w {
        check_same(w, total, ft.checksum()?)?;
    }
    let end = run_validation(&ft, total, log)?;
    let saved = if writer {
        save_model(&ft, &files_from(&last_ckpt), &model_dir, dtype)
    } else {
        Ok(())
    };
    agree(w, "writing the model", saved)?;
    if let Some(old) = last_ckpt
        && writer
    {
        crate::train::checkpoint::remove(&old)?;
    }
    log(&format!("wrote {}", model_dir.display()));
    if let Some(w) = w {
        log(&exchange_line(w));
    }
    Ok(FinetuneSummary {
        updates: total,
        last_loss: last.loss,
        valid: first.zip(end),
        tokens_per_s,
        update_s,
        model_dir,
        resumed_from: (start > 0).then_some(start),
        stopped: false,
    })
}
