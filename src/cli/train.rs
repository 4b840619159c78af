//! `switch train`: a new run, or `--resume` of one, with a progress bar; Ctrl-C checkpoints.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressStyle};
use switch_transformer::distributed::{Collective, agree, check_same_start};
use switch_transformer::train::{DataRecord, Event, Finish, RunConfig, RunDir, Trainer};

use super::{DEFAULT_DATA, DistributedArgs, ParallelArgs, load_data};

/// Train a model (by default labml's Tiny Shakespeare experiment) in runs/NAME/.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// UTF-8 text file to train on [default: data/tinyshakespeare.txt, downloaded when
    /// missing; with --resume, the text the run recorded].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// TOML configuration file with [model] and [train] sections.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A named recipe applied before any --set (see the presets below).
    #[arg(long, conflicts_with_all = ["resume", "restart"])]
    pub preset: Option<String>,
    /// Override one key, e.g. --set train.steps=1000 (repeatable; see the keys below).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Shortcut for --set train.seed=N.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Run name: the run is written to runs/NAME/ (default: a timestamp).
    #[arg(long)]
    pub name: Option<String>,
    /// Directory holding the runs.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// Continue the run in this directory from its latest checkpoint.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "seed", "name"])]
    pub resume: Option<PathBuf>,
    /// Start the run in this directory again from step 0, with its configuration (and any
    /// --set) and its text: for a run with no checkpoint yet (stopped or diverged before its
    /// first one). Refused when it has a checkpoint (continue it with --resume).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "name", "resume", "runs_dir"])]
    pub restart: Option<PathBuf>,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    #[command(flatten)]
    pub distributed: DistributedArgs,
}

/// Runs the command.
pub fn run(args: TrainArgs, device: &Device) -> Result<ExitCode> {
    let TrainArgs {
        data,
        config,
        preset,
        overrides,
        seed,
        name,
        runs_dir,
        resume,
        restart,
        parallel,
        distributed,
    } = args;

    let mut placement = parallel.placement(device)?;
    if distributed.distributed && !parallel.devices.is_empty() {
        bail!("--distributed runs one replica per rank: leave out --devices (use --device)");
    }
    placement.world = distributed.join()?;
    let world = placement.world.clone();
    let mut overrides = overrides;
    if distributed.expert_parallel {
        overrides.push("train.expert_parallel=true".into());
    }
    let (mut trainer, data) = if let Some(run_dir) = resume {
        if parallel.global_routing {
            bail!(
                "--global-routing applies to new runs; a resumed run keeps its \
                 train.global_routing"
            );
        }
        let read = (|| {
            let dir = RunDir::new(&run_dir);
            let seq_len = dir.read_config()?.train.seq_len;
            let data = dir
                .resolve_data(data.as_deref())?
                .unwrap_or_else(|| DEFAULT_DATA.into());
            let (text, record) = load_data(&data, seq_len)?;
            Ok((data, text, record))
        })();
        let (data, text, record) = agree(world.as_deref(), "reading the run and its data", read)?;
        if let Some(w) = &world {
            let overrides = overrides.iter().map(|o| ("--set".to_string(), o.clone()));
            check_same_job(w.as_ref(), &record, overrides)?;
        }
        let t = Trainer::resume_with(&run_dir, text, placement, &overrides)?;
        if t.step >= t.config.train.steps {
            if !t.is_writer() {
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{} is finished: step {} of train.steps = {}; extend it with --resume {0} \
                 --set train.steps=N",
                run_dir.display(),
                t.step,
                t.config.train.steps
            );
            return Ok(ExitCode::SUCCESS);
        }
        if t.is_writer() {
            println!("resuming {} at step {}", run_dir.display(), t.step);
        }
        (t, data)
    } else {
        // --restart: the run's folder, configuration and text, under its own name.
        let restart = match &restart {
            Some(dir) => Some(restart_of(&RunDir::new(dir), data.as_deref())?),
            None => None,
        };
        let (runs_dir, name, data) = match &restart {
            Some(r) => (
                r.runs_dir.clone(),
                Some(r.name.clone()),
                Some(r.data.clone()),
            ),
            None => (runs_dir, name, data),
        };
        let writer = world.as_ref().is_none_or(|w| w.rank() == 0);
        let prepared = (|| {
            let mut c = match (config, &restart) {
                (_, Some(r)) => r.config.clone(),
                (Some(path), None) => RunConfig::from_toml_file(&path)?,
                (None, None) => RunConfig::default(),
            };
            if let Some(p) = &preset {
                c.apply_preset(p)?;
            }
            for o in &overrides {
                c.set(o)?;
            }
            if let Some(s) = seed {
                c.train.seed = s;
            }
            if parallel.devices.len() > 1 && c.train.replicas == 1 {
                c.train.replicas = parallel.devices.len();
            }
            if let Some(w) = &world {
                switch_transformer::distributed::check_batch(c.train.batch_size, w.size())?;
                c.train.replicas = w.size();
            }
            if parallel.global_routing {
                c.train.global_routing = true;
            }
            c.validate()?;
            placement.devices_for(c.train.replicas)?;
            let data = data.unwrap_or_else(|| DEFAULT_DATA.into());
            let (text, record) = load_data(&data, c.train.seq_len)?;
            if let (Some(r), true) = (&restart, writer) {
                r.dir.clear_for_restart()?;
                println!("restarting {} from step 0", r.dir.display());
            }
            Ok((c, data, text, record))
        })();
        let what = "reading the configuration and the data";
        let (c, data, text, record) = agree(world.as_deref(), what, prepared)?;
        if let Some(w) = &world {
            check_same_job(w.as_ref(), &record, c.fields())?;
        }
        let mut name = name.unwrap_or_else(default_run_name);
        if let Some(w) = &world {
            // Rank 0's name (the default one is a timestamp, which differs between ranks).
            let mut bytes = name.into_bytes();
            w.broadcast("the run name", 0, &mut bytes)?;
            name = String::from_utf8(bytes).context("the run name from rank 0")?;
        }
        check_run_name(&name)?;
        let trainer = Trainer::create(c, text, &runs_dir.join(name), placement)?;
        if trainer.is_writer() {
            trainer.run_dir.write_data_record(&record)?;
        }
        (trainer, data)
    };
    train(&mut trainer, &data)
}

/// What `--restart` starts again: the run's folder, its configuration and its text.
struct Restart {
    dir: RunDir,
    runs_dir: PathBuf,
    name: String,
    config: RunConfig,
    data: PathBuf,
}

/// The run in `dir`, read for `--restart` (`data` overrides its recorded text).
fn restart_of(dir: &RunDir, data: Option<&std::path::Path>) -> Result<Restart> {
    let config = dir.read_config()?;
    let data = dir
        .resolve_data(data)?
        .unwrap_or_else(|| DEFAULT_DATA.into());
    // As given (runs/NAME), or absolute where that has no name (`.`).
    let mut path = dir.path().to_path_buf();
    if path.file_name().is_none() {
        path = std::path::absolute(&path).unwrap_or(path);
    }
    let (Some(name), Some(runs_dir)) = (path.file_name(), path.parent()) else {
        bail!("--restart {dir}: give the run's folder, e.g. runs/NAME");
    };
    Ok(Restart {
        dir: dir.clone(),
        runs_dir: runs_dir.to_path_buf(),
        name: name.to_string_lossy().into_owned(),
        config,
        data,
    })
}

/// Every rank of a distributed job starts from rank 0's text (its SHA-256) and `fields`
/// (`distributed::check_same_start`).
fn check_same_job(
    world: &dyn Collective,
    data: &DataRecord,
    fields: impl IntoIterator<Item = (String, String)>,
) -> Result<()> {
    let mut all = vec![("data".to_string(), data.sha256.clone())];
    all.extend(fields);
    check_same_start(world, &all)
}

/// A run name is one plain path component: not empty, not `.` or `..`, no separators.
fn check_run_name(name: &str) -> Result<()> {
    let mut parts = std::path::Path::new(name).components();
    let plain = matches!(parts.next(), Some(std::path::Component::Normal(_)))
        && parts.next().is_none()
        && !name.contains(['/', '\\']);
    if !plain {
        bail!("--name `{name}` is not a plain run name: use letters, digits, - or _ (no path)");
    }
    Ok(())
}

fn default_run_name() -> String {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    format!(
        "run-{}",
        now.trim_end_matches('Z').replace(':', "").replace('T', "-")
    )
}

fn train(trainer: &mut Trainer, data: &std::path::Path) -> Result<ExitCode> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // The writer's lock, released by a second signal, which leaves at once.
        let lock = trainer
            .is_writer()
            .then(|| trainer.run_dir.path().join("lock"));
        let run = trainer.run_dir.to_string();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                if let Some(lock) = &lock {
                    let _ = std::fs::remove_file(lock);
                    eprintln!(
                        "second signal: stopped at once, without a checkpoint of this step; \
                         the lock of {run} is released: resume from its last checkpoint with \
                         `switch train --resume {run}`"
                    );
                }
                std::process::exit(130);
            }
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let t = trainer.config.train.clone();
    let m = &trainer.config.model;
    // Ranks > 0 of a distributed job train silently: rank 0 reports.
    let writer = trainer.is_writer();
    if writer {
        let layers = match m.n_switch_layers() {
            0 => format!("{} dense layers (no Switch layer)", m.n_layers),
            k if k == m.n_layers => format!("{} layers x {} experts", m.n_layers, m.n_experts),
            k => format!(
                "{} layers ({k} Switch layers x {} experts)",
                m.n_layers, m.n_experts
            ),
        };
        println!(
            "run {}: {} parameters, {layers}, d_model {}, {} steps of {}x{} tokens",
            trainer.run_dir.display(),
            m.num_params(),
            m.d_model,
            t.steps,
            t.batch_size,
            t.seq_len
        );
    }
    let bar = if writer {
        ProgressBar::new(t.steps)
    } else {
        ProgressBar::hidden()
    };
    let bar = bar.with_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(trainer.step);
    let mut tok_s = 0.0f64;
    let finish = trainer.run(&stop, &mut |event| match event {
        Event::Step(s) => {
            let rate = s.tokens as f64 / s.seconds.max(1e-9);
            tok_s = if tok_s == 0.0 {
                rate
            } else {
                0.9 * tok_s + 0.1 * rate
            };
            bar.set_position(s.step);
            bar.set_message(format!(
                "epoch {} loss {:.3} lr {:.2e} {:.0} tok/s",
                s.epoch, s.loss, s.lr, tok_s
            ));
        }
        Event::Validation {
            step,
            metrics,
            sample,
        } => {
            bar.suspend(|| {
                println!(
                    "step {step}: valid loss {:.4} acc {:.3} lb {:.3} dropped {:.3} | {sample:?}",
                    metrics.loss, metrics.accuracy, metrics.lb_loss, metrics.dropped_frac
                )
            });
        }
        Event::Checkpoint(dir) => bar.suspend(|| println!("checkpoint {}", dir.display())),
        Event::Skipped(s) => bar.suspend(|| {
            tracing::warn!(
                "step {}: non-finite loss ({}) or gradient norm ({}): step skipped, \
                 weights unchanged (train.skip_nonfinite)",
                s.step,
                s.loss,
                s.grad_norm
            )
        }),
    })?;
    bar.finish();
    Ok(match finish {
        Finish::Completed => ExitCode::SUCCESS,
        Finish::Interrupted if !writer => ExitCode::from(130),
        Finish::Interrupted => {
            // The data goes into the hint unless it is the default, so that it works as printed.
            let data = if data == std::path::Path::new(DEFAULT_DATA) {
                String::new()
            } else {
                format!(" --data {}", data.display())
            };
            eprintln!(
                "interrupted: checkpoint written; continue with `switch train --resume {}{data}`",
                trainer.run_dir.display()
            );
            ExitCode::from(130)
        }
    })
}
