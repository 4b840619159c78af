//! `switch`: the command-line interface, a thin layer over the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use switch_transformer::ModelConfig;
use switch_transformer::bench::{BenchConfig, bench_generate, bench_train};
use switch_transformer::compare;
use switch_transformer::config::{RunConfig, keys_help};
use switch_transformer::data::{TextData, valid_batches};
use switch_transformer::device::parse_device;
use switch_transformer::download::{TINY_SHAKESPEARE_SHA256, TINY_SHAKESPEARE_URL, download};
use switch_transformer::eval::{evaluate, route_tokens};
use switch_transformer::generate::{SampleOptions, generate, generate_cached};
use switch_transformer::parallel::Placement;
use switch_transformer::parity;
use switch_transformer::precision::Precision;
use switch_transformer::report::{RouteTable, RunMetrics, write_report};
use switch_transformer::router::RoutingRng;
use switch_transformer::store::TensorFile;
use switch_transformer::train::{Event, Finish, Trainer, load_run_model};

/// mimalloc reuses freed blocks instead of returning them to the OS: fewer page faults and
/// zero-fills for the many same-sized tensors a training step allocates.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Index of `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (mimalloc.h; libmimalloc-sys
/// names no constant for it). Its documented default is 1000 ms.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc to keep freed memory instead of returning it to the OS a second later: a
/// training step frees and reallocates the same large tensors every ~100 ms, and each return
/// meant fresh (kernel-zeroed) pages on the next step: 52,000 page faults in a 25-step bench,
/// 476 without. An explicit `MIMALLOC_PURGE_DELAY` is respected; nothing is changed when the
/// option's index does not hold its documented default (another mimalloc version).
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: reading and setting a mimalloc option has no preconditions.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == 1000 {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
    }
}

const DEFAULT_DATA: &str = "data/tinyshakespeare.txt";

#[derive(Parser)]
#[command(
    name = "switch",
    version,
    about = "Switch Transformer on Burn: train, sample, evaluate, and check parity with labml's PyTorch code"
)]
struct Cli {
    /// Compute device: cpu | cuda[:N] | rocm[:N] | wgpu | vulkan | metal (GPU backends need
    /// the cargo feature of the same name).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (by default labml's Tiny Shakespeare experiment) in runs/NAME/.
    #[command(after_help = keys_help())]
    Train {
        /// UTF-8 text file to train on. The default is downloaded when missing.
        #[arg(long, default_value = DEFAULT_DATA)]
        data: PathBuf,
        /// TOML configuration file with [model] and [train] sections.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override one key, e.g. --set train.steps=1000 (repeatable; see the keys below).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Shortcut for --set train.seed=N.
        #[arg(long)]
        seed: Option<u64>,
        /// Run name: the run is written to runs/NAME/ (default: a timestamp).
        #[arg(long)]
        name: Option<String>,
        /// Directory holding the runs.
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        /// Continue the run in this directory from its latest checkpoint.
        #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "overrides", "seed", "name"])]
        resume: Option<PathBuf>,
        #[command(flatten)]
        parallel: ParallelArgs,
    },
    /// Generate text from a trained run.
    Sample {
        /// Run directory (uses best/ if present, else the latest checkpoint).
        #[arg(long)]
        run: PathBuf,
        #[arg(long, default_value = "It is")]
        prompt: String,
        #[arg(long, default_value_t = 200)]
        max_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Drop over-capacity tokens while generating (labml's sampler does; implies
        /// --recompute).
        #[arg(long)]
        drop_tokens: bool,
        /// Recompute the whole window for every token, as labml's sampler does, instead of
        /// caching keys and values (the same text within the context; beyond it, the cache
        /// attends to a sliding window).
        #[arg(long)]
        recompute: bool,
    },
    /// Loss and perplexity over the whole validation split of a run's data.
    Eval {
        #[arg(long)]
        run: PathBuf,
        /// The data the run was trained on.
        #[arg(long, default_value = DEFAULT_DATA)]
        data: PathBuf,
        /// Drop over-capacity tokens as in training (labml's validation); off by default.
        #[arg(long)]
        drop_tokens: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Time training steps (default: the reference configuration) or generation.
    Bench {
        #[arg(long, default_value_t = 4)]
        experts: usize,
        #[arg(long, default_value_t = 6)]
        layers: usize,
        #[arg(long, default_value_t = 128)]
        d_model: usize,
        #[arg(long, default_value_t = 4)]
        heads: usize,
        #[arg(long, default_value_t = 256)]
        d_ff: usize,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long, default_value_t = 64)]
        seq_len: usize,
        #[arg(long, default_value_t = 1.2)]
        capacity_factor: f64,
        /// Worker threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Timed steps (after the warm-up).
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Time generation instead: tokens/s with the key/value cache and with the window
        /// recomputed per token, at context --seq-len.
        #[arg(long)]
        generate: bool,
        /// Tokens generated per timing with --generate.
        #[arg(long, default_value_t = 200)]
        tokens: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Compute type: f32, bf16 or f16 (the router stays f32).
        #[arg(long, default_value = "f32")]
        precision: String,
        /// Data-parallel replicas, each on batch/replicas windows (default: one per --devices
        /// entry).
        #[arg(long)]
        replicas: Option<usize>,
        #[command(flatten)]
        parallel: ParallelArgs,
    },
    /// Train a dense baseline and Switch models with more and more experts at equal compute
    /// per token (same steps, same seed); write a table and a plot of validation loss.
    Compare {
        #[arg(long, default_value = DEFAULT_DATA)]
        data: PathBuf,
        /// Base configuration (default: a small model, see the printed table header).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Expert counts of the Switch models.
        #[arg(long, value_delimiter = ',', default_value = "2,4,8,16")]
        experts: Vec<usize>,
        /// The comparison is written to runs/NAME/ (finished runs there are reused).
        #[arg(long, default_value = "compare")]
        name: String,
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
    },
    /// Write an HTML report (plus SVG charts) of one or more training runs.
    Report {
        /// Run directories (several are overlaid).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Output directory (default: RUN_DIR/report of the first run).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Text whose routing the report shows, through the first run's model.
        #[arg(
            long,
            default_value = "ROMEO:\nBut, soft! what light through yonder window breaks?"
        )]
        route_text: String,
    },
    /// Show which expert each character of a text goes to, in every layer.
    Route {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        text: String,
    },
    /// Replay fixtures recorded from labml's PyTorch code and compare every tensor.
    ///
    /// Prints one row per tensor (max abs error, max error relative to the tensor's largest
    /// magnitude) and ends with `parity: PASS` or `parity: FAIL`; exits 0 only on PASS.
    Parity {
        /// Fixture files (safetensors with a `meta` JSON metadata key).
        #[arg(required = true)]
        fixtures: Vec<PathBuf>,
    },
}

/// Data parallelism: where the replicas run and how they average gradients.
#[derive(clap::Args)]
struct ParallelArgs {
    /// Data-parallel training on these devices, one replica each (e.g. cpu,cpu or
    /// cuda:0,cuda:1); sets train.replicas. Without it every replica runs on --device.
    #[arg(long, value_delimiter = ',', value_name = "DEVICE,...")]
    devices: Vec<String>,
    /// How replicas combine gradients: broadcast (summed on the first replica, which steps
    /// and hands its weights to the others; any backend) or collective (Burn's NCCL
    /// all-reduce; CUDA devices only).
    #[arg(long, default_value = "broadcast")]
    grad_sync: String,
    /// The replicas route each batch together, as one model does (capacity, drops and load
    /// balance over the whole batch); sets train.global_routing. Without it each replica
    /// routes its own windows.
    #[arg(long)]
    global_routing: bool,
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let device = parse_device(&cli.device)?;
    let device_name = cli.device.clone();
    match cli.command {
        Command::Bench {
            experts,
            layers,
            d_model,
            heads,
            d_ff,
            batch,
            seq_len,
            capacity_factor,
            threads,
            steps,
            warmup,
            generate,
            tokens,
            json,
            precision,
            replicas,
            parallel,
        } => {
            let placement = Placement::parse(&parallel.devices, &device, &parallel.grad_sync)?;
            let replicas = replicas.unwrap_or(parallel.devices.len().max(1));
            let precision: Precision =
                serde_json::from_value(serde_json::Value::String(precision.clone())).map_err(
                    |_| anyhow::anyhow!("--precision must be f32, bf16 or f16 (got `{precision}`)"),
                )?;
            if threads > 0 {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build_global()
                    .context("cannot size the thread pool")?;
            }
            let c = BenchConfig {
                model: ModelConfig {
                    n_vocab: 65,
                    d_model,
                    heads,
                    d_ff,
                    n_layers: layers,
                    n_experts: experts,
                    capacity_factor,
                    drop_tokens: true,
                    is_scale_prob: true,
                    precision,
                    ..Default::default()
                },
                batch_size: batch,
                seq_len,
                warmup,
                steps,
                threads: rayon::current_num_threads(),
                device: if parallel.devices.is_empty() {
                    device_name
                } else {
                    parallel.devices.join(",")
                },
                replicas,
                global_routing: parallel.global_routing,
            };
            c.model.validate()?;
            if batch == 0 || seq_len == 0 || steps == 0 {
                bail!("--batch, --seq-len and --steps must be at least 1");
            }
            if generate {
                let r = bench_generate(&c, tokens, &device)?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                        "generation, context {}, {} tokens, {} threads, {} experts x {} layers, d_model {}",
                        r.context, r.tokens, c.threads, experts, layers, d_model
                    );
                    println!(
                        "  with key/value cache : {:>10.1} tokens/s",
                        r.cached_tokens_per_s
                    );
                    println!(
                        "  window recomputation: {:>10.1} tokens/s",
                        r.recompute_tokens_per_s
                    );
                    println!("  speed-up            : {:>10.1}x", r.speedup);
                }
            } else {
                let r = bench_train(&c, placement)?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                        "training: {} params, {} experts x {} layers, d_model {}, d_ff {}, batch {}x{}, {} threads, {} replica(s){} on {}, {} steps after {} warm-up",
                        r.params,
                        experts,
                        layers,
                        d_model,
                        d_ff,
                        batch,
                        seq_len,
                        c.threads,
                        c.replicas,
                        if c.global_routing && c.replicas > 1 {
                            " routing together"
                        } else {
                            ""
                        },
                        c.device,
                        steps,
                        warmup
                    );
                    println!(
                        "  {:.1} ms/step median ({:.1} min) = {:.0} tokens/s",
                        r.ms_per_step_median, r.ms_per_step_min, r.tokens_per_s_median
                    );
                    println!(
                        "  forward+loss {:.1} ms, backward {:.1} ms, gradient sync+clip+Adam {:.1} ms",
                        r.forward_ms_median, r.backward_ms_median, r.optimizer_ms_median
                    );
                    println!("  peak RSS {:.0} MB", r.peak_rss_mb);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare {
            data,
            config,
            overrides,
            experts,
            name,
            runs_dir,
        } => {
            let mut base = match config {
                Some(path) => RunConfig::from_toml_file(&path)?,
                None => compare::default_base(),
            };
            for o in &overrides {
                base.set(o)?;
            }
            base.validate()?;
            if experts.contains(&0) {
                bail!("--experts: each count must be at least 1");
            }
            let text = load_data(&data, base.train.seq_len)?;
            let dir = runs_dir.join(name);
            let entries = compare::run(&base, &experts, &text, &dir, &device, &mut |label, e| {
                if let Event::Validation { step, metrics, .. } = e {
                    println!("{label:>10} step {step:>5}: valid loss {:.4}", metrics.loss);
                }
            })?;
            println!("{}", compare::table(&base, &entries));
            println!(
                "wrote {} and {}",
                dir.join("compare.md").display(),
                dir.join("compare.svg").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Report {
            runs,
            out,
            route_text,
        } => {
            let metrics = runs
                .iter()
                .map(|r| RunMetrics::read(r))
                .collect::<Result<Vec<_>>>()?;
            let route = match load_run_model(&runs[0], &device) {
                Ok((config, vocab, model)) => match vocab.encode(&route_text) {
                    Ok(ids) => Some(RouteTable {
                        text: route_text.chars().collect(),
                        layers: route_tokens(&model, &ids, config.train.seq_len),
                    }),
                    Err(e) => {
                        eprintln!("note: no routing table: --route-text: {e}");
                        None
                    }
                },
                Err(e) => {
                    eprintln!("note: no routing table: {e:#}");
                    None
                }
            };
            let out = out.unwrap_or_else(|| runs[0].join("report"));
            let html = write_report(&metrics, route.as_ref(), &out)?;
            println!("wrote {}", html.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Route { run, text } => {
            let (config, vocab, model) = load_run_model(&run, &device)?;
            if text.is_empty() {
                bail!("--text must not be empty");
            }
            let ids = vocab.encode(&text).context("--text")?;
            let layers = route_tokens(&model, &ids, config.train.seq_len);
            print_routes(&text, &layers, config.model.n_experts);
            Ok(ExitCode::SUCCESS)
        }
        Command::Parity { fixtures } => {
            let mut all = true;
            for path in &fixtures {
                println!("== {}", path.display());
                let report = parity::run(&TensorFile::read(path)?, &device)?;
                println!("{report}");
                all &= report.passed();
            }
            if fixtures.len() > 1 {
                println!("parity: {}", if all { "PASS" } else { "FAIL" });
            }
            Ok(if all {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Train {
            data,
            config,
            overrides,
            seed,
            name,
            runs_dir,
            resume,
            parallel,
        } => {
            let placement = Placement::parse(&parallel.devices, &device, &parallel.grad_sync)?;
            let mut trainer = if let Some(run_dir) = resume {
                if parallel.global_routing {
                    bail!(
                        "--global-routing applies to new runs; a resumed run keeps its \
                         train.global_routing"
                    );
                }
                let seq_len = RunConfig::from_toml_file(&run_dir.join("config.toml"))
                    .with_context(|| format!("{} is not a run directory", run_dir.display()))?
                    .train
                    .seq_len;
                let text = load_data(&data, seq_len)?;
                let t = Trainer::resume(&run_dir, text, placement)?;
                println!("resuming {} at step {}", run_dir.display(), t.step);
                t
            } else {
                let mut c = match config {
                    Some(path) => RunConfig::from_toml_file(&path)?,
                    None => RunConfig::default(),
                };
                for o in &overrides {
                    c.set(o)?;
                }
                if let Some(s) = seed {
                    c.train.seed = s;
                }
                if parallel.devices.len() > 1 && c.train.replicas == 1 {
                    c.train.replicas = parallel.devices.len();
                }
                if parallel.global_routing {
                    c.train.global_routing = true;
                }
                c.validate()?;
                placement.devices_for(c.train.replicas)?;
                let text = load_data(&data, c.train.seq_len)?;
                let name = name.unwrap_or_else(default_run_name);
                Trainer::create(c, text, &runs_dir.join(name), placement)?
            };
            train(&mut trainer)
        }
        Command::Sample {
            run,
            prompt,
            max_tokens,
            temperature,
            top_k,
            seed,
            drop_tokens,
            recompute,
        } => {
            let (config, vocab, mut model) = load_run_model(&run, &device)?;
            model.set_drop_tokens(drop_tokens);
            if prompt.is_empty() {
                bail!("--prompt must not be empty");
            }
            let ids = vocab.encode(&prompt).context("--prompt")?;
            let opts = SampleOptions {
                max_tokens,
                temperature,
                top_k,
                context: config.train.seq_len,
            };
            let mut rng = RoutingRng::seed_from_u64(seed);
            let new = if recompute || drop_tokens {
                generate(&model, &ids, &opts, &mut rng.clone(), &mut rng)
            } else {
                generate_cached(&model, &ids, &opts, &mut rng.clone(), &mut rng)
            };
            println!("{prompt}{}", vocab.decode(&new));
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval {
            run,
            data,
            drop_tokens,
            seed,
        } => {
            let (config, vocab, mut model) = load_run_model(&run, &device)?;
            model.set_drop_tokens(drop_tokens);
            let text = TextData::load(&data, config.train.seq_len + 1)?;
            if text.vocab != vocab {
                bail!(
                    "{} has other characters than the run's data: evaluate on the data the run \
                     was trained on",
                    data.display()
                );
            }
            let t = &config.train;
            let batches = valid_batches(&text.valid, t.seq_len, t.batch_size, None);
            let m = evaluate(&model, &batches, &mut RoutingRng::seed_from_u64(seed));
            println!(
                "validation split: {} tokens, token dropping {}",
                m.tokens,
                if drop_tokens { "on" } else { "off" }
            );
            println!(
                "loss {:.4}  perplexity {:.3}  accuracy {:.4}",
                m.loss,
                m.perplexity(),
                m.accuracy
            );
            println!(
                "load-balancing loss {:.3}  dropped {:.4}",
                m.lb_loss, m.dropped_frac
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints each layer's routing of `text`: every character on the background colour of its
/// expert, then a table of expert and probability per character.
fn print_routes(text: &str, layers: &[Vec<(usize, f32)>], n_experts: usize) {
    const BG: [u8; 8] = [41, 42, 43, 44, 45, 46, 47, 100];
    let show = |c: char| match c {
        '\n' => '⏎',
        ' ' => '␣',
        c => c,
    };
    print!("experts:");
    for e in 0..n_experts {
        print!(" \x1b[{};30m {e} \x1b[0m", BG[e % BG.len()]);
    }
    println!();
    for (l, row) in layers.iter().enumerate() {
        print!("layer {l}: ");
        for (c, &(e, _)) in text.chars().zip(row) {
            print!("\x1b[{};30m{}\x1b[0m", BG[e % BG.len()], show(c));
        }
        println!();
    }
    println!();
    print!("char");
    for l in 0..layers.len() {
        print!("  layer {l:<6}");
    }
    println!();
    for (i, c) in text.chars().enumerate() {
        print!("{:<4}", show(c));
        for row in layers {
            let (e, p) = row[i];
            print!("  e{e:<2} p={p:.2} ");
        }
        println!();
    }
}

/// Reads the training text, downloading Tiny Shakespeare when the default path is missing.
fn load_data(path: &Path, seq_len: usize) -> Result<TextData> {
    if !path.exists() && path == Path::new(DEFAULT_DATA) {
        eprintln!("{DEFAULT_DATA} not found: downloading Tiny Shakespeare");
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
    TextData::load(path, seq_len + 1)
}

fn default_run_name() -> String {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    format!(
        "run-{}",
        now.trim_end_matches('Z').replace(':', "").replace('T', "-")
    )
}

fn train(trainer: &mut Trainer) -> Result<ExitCode> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130); // second Ctrl-C: leave now
            }
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let t = trainer.config.train.clone();
    let m = &trainer.config.model;
    println!(
        "run {}: {} parameters, {} layers x {} experts, d_model {}, {} steps of {}x{} tokens",
        trainer.run_dir.display(),
        m.num_params(),
        m.n_layers,
        m.n_experts,
        m.d_model,
        t.steps,
        t.batch_size,
        t.seq_len
    );
    let bar = ProgressBar::new(t.steps).with_style(
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
    })?;
    bar.finish();
    Ok(match finish {
        Finish::Completed => ExitCode::SUCCESS,
        Finish::Interrupted => {
            eprintln!(
                "interrupted: checkpoint written; continue with `switch train --resume {}`",
                trainer.run_dir.display()
            );
            ExitCode::from(130)
        }
    })
}
