//! `switch bench`: training-step or generation throughput, printed or as JSON.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use switch_transformer::ModelConfig;
use switch_transformer::model::precision::Precision;
use switch_transformer::tools::bench::{BenchConfig, bench_generate, bench_routing, bench_train};
use switch_transformer::train::RunConfig;

use super::{DistributedArgs, ParallelArgs};

/// Time training steps (default: the reference configuration) or generation.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Experts per Switch layer. This and the shapes below default to the reference
    /// configuration's (`switch train`'s defaults: 4 experts, 6 layers, d_model 128, 4 heads,
    /// d_ff 256, batch 32 x 64, capacity factor 1.2).
    #[arg(long)]
    pub experts: Option<usize>,
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub d_model: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    #[arg(long)]
    pub d_ff: Option<usize>,
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long)]
    pub seq_len: Option<usize>,
    #[arg(long)]
    pub capacity_factor: Option<f64>,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Timed steps (after the warm-up).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Time generation instead: tokens/s with the key/value cache and with the window
    /// recomputed per token, at context --seq-len.
    #[arg(long)]
    pub generate: bool,
    /// Tokens generated per timing with --generate.
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Time the device routing decision alone at these token counts (comma-separated, e.g.
    /// 2048,32768,131072), with its prefix sum against Burn's `cumsum`, instead of training.
    #[arg(long, value_delimiter = ',')]
    pub routing: Vec<usize>,
    /// With --routing: time Burn's `cumsum` only up to this many tokens (it is quadratic on
    /// GPU backends).
    #[arg(long, default_value_t = 32768)]
    pub routing_burn_max: usize,
    /// Measure the memory read bandwidth instead (a 1 GiB buffer summed by every thread, best
    /// of 5): what bounds decoding at batch 1.
    #[arg(long)]
    pub bandwidth: bool,
    /// Time matrix products instead, forward and both backward products through autodiff:
    /// `finetune` (those of one fine-tuning update of a switch-base-8-shaped model, batch 4 of
    /// 64 + 16 tokens) or comma-separated MxKxN[:COUNT]; --steps timings after --warmup.
    #[arg(long, value_name = "SHAPES")]
    pub matmuls: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Compute type: f32, bf16 or f16 (the router stays f32).
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Data-parallel replicas, each on batch/replicas windows (default: one per --devices
    /// entry).
    #[arg(long)]
    pub replicas: Option<usize>,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    #[command(flatten)]
    pub distributed: DistributedArgs,
}

/// `threads` workers in the global pool (0: rayon's default, one per core).
fn size_thread_pool(threads: usize) -> Result<()> {
    if threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("cannot size the thread pool")?;
    }
    Ok(())
}

/// Runs the command.
pub fn run(args: BenchArgs, device: &Device, device_name: &str) -> Result<ExitCode> {
    let BenchArgs {
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
        routing,
        routing_burn_max,
        bandwidth,
        matmuls,
        json,
        precision,
        replicas,
        parallel,
        distributed,
    } = args;
    // What is not given is the reference configuration's: its defaults are defined once.
    let reference = RunConfig::default();
    let (m, t) = (&reference.model, &reference.train);
    let experts = experts.unwrap_or(m.n_experts);
    let (layers, d_model, heads) = (
        layers.unwrap_or(m.n_layers),
        d_model.unwrap_or(m.d_model),
        heads.unwrap_or(m.heads),
    );
    let d_ff = d_ff.unwrap_or(m.d_ff);
    let (batch, seq_len) = (batch.unwrap_or(t.batch_size), seq_len.unwrap_or(t.seq_len));

    if bandwidth {
        size_thread_pool(threads)?;
        let b = super::bandwidth::measure(1024, 5);
        if json {
            println!("{}", serde_json::to_string(&b)?);
        } else {
            println!(
                "memory read bandwidth: {:.1} GB/s ({} threads, {} MiB, best of 5)",
                b.read_gb_per_s,
                b.threads,
                b.bytes >> 20
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(spec) = matmuls {
        size_thread_pool(threads)?;
        let rows = super::matmuls::time(&super::matmuls::parse(&spec)?, device, steps, warmup);
        let total: f64 = rows.iter().map(|r| r.ms * r.count as f64).sum();
        let burn_total: f64 = rows.iter().map(|r| r.burn_ms * r.count as f64).sum();
        for r in &rows {
            if json {
                println!("{}", serde_json::to_string(r)?);
            } else {
                println!(
                    "{:24} {:>5} x {:>5} x {:>6}: {:6.1} GFLOP/s, {:7.2} ms x {:>2} = {:7.1} ms \
                     (Burn's matmul: {:7.2} ms)",
                    r.name,
                    r.m,
                    r.k,
                    r.n,
                    r.gflop_per_s,
                    r.ms,
                    r.count,
                    r.ms * r.count as f64,
                    r.burn_ms
                );
            }
        }
        if !json {
            println!(
                "all: {total:.0} ms per update, {burn_total:.0} with Burn's matmul alone ({} \
                 threads, {device_name}, forward and backward, medians of {steps} alternating)",
                rayon::current_num_threads()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !routing.is_empty() {
        let rows = bench_routing(
            &routing,
            experts,
            device_name,
            device,
            steps,
            routing_burn_max,
        )?;
        for r in &rows {
            if json {
                println!("{}", serde_json::to_string(r)?);
            } else {
                println!(
                    "routing decision, {} tokens x {} experts on {}: {:.3} ms median = {:.1} ns/token; \
                     prefix sum {:.3} ms blocked, {}",
                    r.tokens,
                    r.experts,
                    r.device,
                    r.decision_ms_median,
                    r.decision_ns_per_token,
                    r.scan_ms_median,
                    r.burn_cumsum_ms_median
                        .map_or("Burn's cumsum skipped".to_string(), |m| {
                            format!("{m:.3} ms with Burn's cumsum")
                        })
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut placement = parallel.placement(device)?;
    if distributed.distributed && (generate || !parallel.devices.is_empty()) {
        bail!(
            "--distributed times training steps with one replica per rank: leave out --generate and --devices"
        );
    }
    placement.world = distributed.join()?;
    let ranks = placement.world.as_ref().map(|w| w.size());
    let replicas = ranks.unwrap_or(replicas.unwrap_or(parallel.devices.len().max(1)));
    let precision: Precision = serde_json::from_value(serde_json::Value::String(precision.clone()))
        .map_err(|_| anyhow::anyhow!("--precision must be f32, bf16 or f16 (got `{precision}`)"))?;
    size_thread_pool(threads)?;
    let c = BenchConfig {
        model: ModelConfig {
            d_model,
            heads,
            d_ff,
            n_layers: layers,
            n_experts: experts,
            capacity_factor: capacity_factor.unwrap_or(m.capacity_factor),
            precision,
            ..m.clone()
        },
        batch_size: batch,
        seq_len,
        warmup,
        steps,
        threads: rayon::current_num_threads(),
        device: if parallel.devices.is_empty() {
            device_name.to_string()
        } else {
            parallel.devices.join(",")
        },
        replicas,
        global_routing: parallel.global_routing,
        expert_parallel: distributed.expert_parallel,
    };
    c.model.validate()?;
    if batch == 0 || seq_len == 0 || steps == 0 {
        bail!("--batch, --seq-len and --steps must be at least 1");
    }
    // The memory check `train` makes, before anything is allocated (`--experts 100000000`
    // would otherwise grow until the kernel kills the process).
    let mut run = switch_transformer::train::config::RunConfig {
        model: c.model.clone(),
        ..Default::default()
    };
    run.train.batch_size = batch;
    run.train.seq_len = seq_len;
    switch_transformer::train::memory::check_fits(
        &run,
        switch_transformer::train::memory::available(),
    )?;
    if generate {
        let r = bench_generate(&c, tokens, device)?;
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
        let writer = placement.writes();
        let r = bench_train(&c, placement)?;
        if !writer {
            // rank 0 prints for the job
        } else if json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "training: {} params, {} experts x {} layers, d_model {}, d_ff {}, batch {}x{}, {} threads, {} replica(s){}{} on {}, {} steps after {} warm-up",
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
                if c.expert_parallel {
                    ", experts sharded over the ranks"
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
            if r.ranks > 1 {
                println!(
                    "  {} ranks: exchanges {:.1} ms/step ({:.0}% of the step); peak RSS per rank {} MB",
                    r.ranks,
                    r.exchange_ms_median,
                    100.0 * r.exchange_ms_median / r.ms_per_step_median,
                    r.peak_rss_mb_ranks
                        .iter()
                        .map(|m| format!("{m:.0}"))
                        .collect::<Vec<_>>()
                        .join(" / ")
                );
                for (name, e) in &r.exchanges {
                    println!(
                        "    {name:<40} {:>8.2} ms/step {:>10.0} bytes sent/step",
                        e.ms_median, e.bytes_median
                    );
                }
            } else {
                println!("  peak RSS {:.0} MB", r.peak_rss_mb);
            }
            let (l, y) = (r.launches_per_step, r.syncs_per_step);
            if l.total > 0.0 {
                println!(
                    "  kernel launches per step {:.0} (forward {:.0}, backward {:.0}, optimizer {:.0})",
                    l.total, l.forward, l.backward, l.optimizer
                );
                println!(
                    "  host issuing {:.1} ms/step ({:.1} us per launch), waiting for the device in the read {:.1} ms",
                    r.host_ms_median, r.host_us_per_launch, r.read_ms_median
                );
            }
            println!(
                "  host syncs per step {:.0} (forward {:.0}, backward {:.0}, optimizer {:.0})",
                y.total, y.forward, y.backward, y.optimizer
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
