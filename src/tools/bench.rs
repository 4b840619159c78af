//! Benchmarks: training-step throughput (with the forward / backward / optimizer split) and
//! generation speed. Timings are medians over steps after warm-up; every result carries the
//! configuration that produced it.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Result, bail};
use burn::tensor::Device;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::data::Batch;
use crate::infer::generate::{SampleOptions, generate, generate_cached};
use crate::model::ModelConfig;
use crate::optim::{LabmlAdam, Noam};
use crate::routing::RoutingRng;
use crate::train::placement::Placement;
use crate::train::replicas::{Replica, Replicas};
use crate::train::step::{StepSettings, step};

/// What to time.
#[derive(Debug, Clone, Serialize)]
pub struct BenchConfig {
    /// The model timed.
    pub model: ModelConfig,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Tokens per sequence (the context, for generation).
    pub seq_len: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// Worker threads.
    pub threads: usize,
    /// The device(s), as given.
    pub device: String,
    /// Data-parallel replicas, each on `batch_size / replicas` windows.
    pub replicas: usize,
    /// The replicas route each batch together, as one model.
    pub global_routing: bool,
    /// Each rank of a distributed job holds its share of the experts.
    pub expert_parallel: bool,
}

/// Training-step timings.
#[derive(Debug, Clone, Serialize)]
pub struct TrainBench {
    /// What was timed.
    pub config: BenchConfig,
    /// Model parameters.
    pub params: usize,
    /// Tokens per training step.
    pub tokens_per_step: usize,
    /// Median step time.
    pub ms_per_step_median: f64,
    /// Fastest step.
    pub ms_per_step_min: f64,
    /// Tokens per second at the median step time.
    pub tokens_per_s_median: f64,
    /// Median forward + loss time (replica 0).
    pub forward_ms_median: f64,
    /// Median backward time (replica 0).
    pub backward_ms_median: f64,
    /// Gradient sync (with replicas), clip and Adam.
    pub optimizer_ms_median: f64,
    /// Median time the host waited in the step's read of the device (in the optimizer phase):
    /// device work its issuing did not hide (~0 on the CPU backend).
    pub read_ms_median: f64,
    /// Median time the host spent issuing work: the step less its wait in the read.
    pub host_ms_median: f64,
    /// `host_ms_median` per kernel launch, in microseconds (GPU backends; 0 where launches are
    /// not counted): what a launch costs the host, fusion planning and allocation included.
    pub host_us_per_launch: f64,
    /// Peak resident memory of the process.
    pub peak_rss_mb: f64,
    /// Processes of the job (1 unless `--distributed`).
    pub ranks: usize,
    /// Median time per step in exchanges between the ranks (all-reduces, routing exchanges;
    /// waiting for the slowest rank included); 0 in one process.
    pub exchange_ms_median: f64,
    /// Each rank's peak resident memory.
    pub peak_rss_mb_ranks: Vec<f64>,
    /// Kernel launches per step (median per phase) on a cubecl device (GPU backends); all 0 on
    /// the CPU backend or where launches are not counted.
    pub launches_per_step: PhaseCounts,
    /// Host-device synchronisations per step (median per phase): reads to the host and device
    /// syncs, counted the same way on every backend.
    pub syncs_per_step: PhaseCounts,
    /// Per kind of exchange (rank 0's): "gradients" (all-reduce), "tokens to their experts"
    /// and "expert outputs back to their tokens" (the all-to-alls, forward and backward),
    /// "routing probabilities", ...: median ms per step and bytes sent per step.
    pub exchanges: BTreeMap<String, ExchangeBench>,
}

/// A count per phase of a training step (medians over the timed steps).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PhaseCounts {
    /// Forward pass and losses.
    pub forward: f64,
    /// Backward pass.
    pub backward: f64,
    /// Gradient sum, clip, Adam (and the step's one read).
    pub optimizer: f64,
    /// The whole step.
    pub total: f64,
}

impl PhaseCounts {
    fn of(steps: &[[u64; 3]]) -> Self {
        let med = |i: usize| median(&steps.iter().map(|s| s[i] as f64).collect::<Vec<_>>());
        let total: Vec<f64> = steps.iter().map(|s| s.iter().sum::<u64>() as f64).collect();
        Self {
            forward: med(0),
            backward: med(1),
            optimizer: med(2),
            total: median(&total),
        }
    }
}

/// One kind of exchange in a step.
#[derive(Debug, Clone, Serialize)]
pub struct ExchangeBench {
    /// Median time per step (waiting for the other ranks included).
    pub ms_median: f64,
    /// Median bytes this rank sent per step (see [`crate::distributed::Tally`]).
    pub bytes_median: f64,
}

/// Median of `v` (the mean of the middle two for an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Peak resident set size of this process in MB (Linux `VmHWM`; NaN elsewhere).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn random_batch(rng: &mut RoutingRng, n_vocab: usize, batch: usize, seq_len: usize) -> Batch {
    let mut draw = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| rng.random_range(0..n_vocab as u32))
            .collect()
    };
    Batch {
        inputs: draw(batch * seq_len),
        targets: draw(batch * seq_len),
        batch,
        seq_len,
    }
}

/// Times full training steps (forward, loss, backward, gradient sync, clip, Adam) on random
/// tokens, on `c.replicas` data-parallel replicas placed by `placement`.
pub fn bench_train(c: &BenchConfig, placement: impl Into<Placement>) -> Result<TrainBench> {
    let placement = placement.into();
    let devices = placement.devices_for(c.replicas)?;
    if c.replicas == 0 || !c.batch_size.is_multiple_of(c.replicas) {
        bail!(
            "the batch size ({}) must be a multiple of the number of replicas ({})",
            c.batch_size,
            c.replicas
        );
    }
    if c.expert_parallel {
        let ranks = placement.world.as_ref().map(|w| w.size());
        crate::train::expert_parallel::check(&c.model, ranks, &devices[0])?;
    }
    let device = devices[0].clone().autodiff();
    let first = Replica {
        model: c.model.init(0, &device)?,
        adam: LabmlAdam::default(),
        device,
    };
    let mut replicas = Replicas::new(
        first,
        &c.model,
        &devices,
        placement.grad_sync,
        c.global_routing,
    )?;
    if let Some(world) = &placement.world {
        replicas = replicas.across(std::sync::Arc::clone(world), c.expert_parallel)?;
    }
    let exchanged = |r: &Replicas| r.world().map_or_else(BTreeMap::new, |w| w.exchange_tally());
    let mut exchange = vec![];
    let mut by_name: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let noam = Noam {
        lr: 1.0,
        warmup: 2000,
        d_model: c.model.d_model,
    };
    let mut rng = RoutingRng::seed_from_u64(0);
    let (mut fwd, mut bwd, mut opt, mut total) = (vec![], vec![], vec![], vec![]);
    let (mut read, mut host) = (vec![], vec![]);
    let (mut launches, mut syncs) = (vec![], vec![]);
    crate::launches::count_launches();
    for i in 0..c.warmup + c.steps {
        let batch = random_batch(&mut rng, c.model.n_vocab, c.batch_size, c.seq_len);
        let settings = StepSettings {
            lb_coef: c
                .model
                .aux_loss_weight(crate::train::TrainConfig::default().lb_coef),
            z_coef: 0.0,
            balance_scope: c.model.balance_scope,
            grad_clip: 1.0,
            lr: noam.lr(i as u64 + 1),
        };
        let t0 = Instant::now();
        let before = exchanged(&replicas);
        let out = step(&mut replicas, &batch, &mut rng, settings)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if i >= c.warmup {
            let after = exchanged(&replicas);
            let mut step_ms = 0.0;
            for (name, t) in after {
                let b = before.get(&name).copied().unwrap_or_default();
                let ms = (t.seconds - b.seconds) * 1e3;
                step_ms += ms;
                let bytes = (t.bytes - b.bytes) as f64;
                by_name.entry(name).or_default().push((ms, bytes));
            }
            exchange.push(step_ms);
            launches.push(out.counts.map(|c| c.launches));
            syncs.push(out.counts.map(|c| c.syncs));
            fwd.push(out.forward_s * 1e3);
            bwd.push(out.backward_s * 1e3);
            opt.push(out.update_s * 1e3);
            read.push(out.read_s * 1e3);
            host.push(ms - out.read_s * 1e3);
            total.push(ms);
        }
    }
    let tokens = c.batch_size * c.seq_len;
    let med = median(&total);
    let rss = peak_rss_mb();
    let peak_rss_mb_ranks = match replicas.world() {
        None => vec![rss],
        Some(w) => w
            .all_gather("peak RSS", &[rss as f32])?
            .into_iter()
            .map(f64::from)
            .collect(),
    };
    Ok(TrainBench {
        config: c.clone(),
        params: c.model.num_params(),
        tokens_per_step: tokens,
        ms_per_step_median: med,
        ms_per_step_min: total.iter().cloned().fold(f64::INFINITY, f64::min),
        tokens_per_s_median: tokens as f64 / (med / 1e3),
        forward_ms_median: median(&fwd),
        backward_ms_median: median(&bwd),
        optimizer_ms_median: median(&opt),
        read_ms_median: median(&read),
        host_ms_median: median(&host),
        host_us_per_launch: {
            let launches = PhaseCounts::of(&launches).total;
            if launches > 0.0 {
                median(&host) * 1e3 / launches
            } else {
                0.0
            }
        },
        peak_rss_mb: rss,
        ranks: replicas.world().map_or(1, |w| w.size()),
        exchange_ms_median: if exchange.iter().all(|&ms| ms == 0.0) {
            0.0
        } else {
            median(&exchange)
        },
        peak_rss_mb_ranks,
        launches_per_step: PhaseCounts::of(&launches),
        syncs_per_step: PhaseCounts::of(&syncs),
        exchanges: by_name
            .into_iter()
            .map(|(name, v)| {
                let (ms, bytes): (Vec<f64>, Vec<f64>) = v.into_iter().unzip();
                let e = ExchangeBench {
                    ms_median: median(&ms),
                    bytes_median: median(&bytes),
                };
                (name, e)
            })
            .collect(),
    })
}

/// Generation timings: per-token cost with the key/value cache and with the whole window
/// recomputed for every token (labml's sampler).
#[derive(Debug, Clone, Serialize)]
pub struct GenerateBench {
    /// What was timed.
    pub config: BenchConfig,
    /// Positions the model sees.
    pub context: usize,
    /// Tokens generated per timing.
    pub tokens: usize,
    /// With the key/value cache.
    pub cached_tokens_per_s: f64,
    /// Recomputing the window per token (labml's sampler).
    pub recompute_tokens_per_s: f64,
    /// `cached / recompute`.
    pub speedup: f64,
    /// Peak resident memory of the process.
    pub peak_rss_mb: f64,
}

/// Timings per generation method; the median is reported (one 200-token cached run lasts
/// ~25 ms, and single timings varied 16x-32x in speed-up on the test machine).
const GENERATE_REPEATS: usize = 5;

/// Generates `tokens` tokens greedily (after a warm-up) both ways, with the window capped at
/// `c.seq_len`, from a model with token dropping off: tokens/s of the median of
/// `GENERATE_REPEATS` timings each.
pub fn bench_generate(c: &BenchConfig, tokens: usize, device: &Device) -> Result<GenerateBench> {
    let mut model = c.model.init(0, device)?;
    model.set_training(false);
    model.set_drop_tokens(false);
    let opts = SampleOptions {
        max_tokens: tokens,
        temperature: 0.0,
        top_k: None,
        context: c.seq_len,
    };
    let prompt = [1u32, 2, 3];
    let mut rng = RoutingRng::seed_from_u64(0);
    let mut time = |cached: bool| -> f64 {
        let warm = SampleOptions {
            max_tokens: 4,
            ..opts.clone()
        };
        let run = |o: &SampleOptions, rng: &mut RoutingRng| {
            if cached {
                generate_cached(&model, &prompt, o, &mut rng.clone(), rng)
            } else {
                generate(&model, &prompt, o, &mut rng.clone(), rng)
            }
        };
        run(&warm, &mut rng);
        let mut secs: Vec<f64> = (0..GENERATE_REPEATS)
            .map(|_| {
                let t = Instant::now();
                run(&opts, &mut rng);
                t.elapsed().as_secs_f64()
            })
            .collect();
        secs.sort_by(f64::total_cmp);
        tokens as f64 / secs[GENERATE_REPEATS / 2]
    };
    let cached = time(true);
    let recompute = time(false);
    Ok(GenerateBench {
        config: c.clone(),
        context: c.seq_len,
        tokens,
        cached_tokens_per_s: cached,
        recompute_tokens_per_s: recompute,
        speedup: cached / recompute,
        peak_rss_mb: peak_rss_mb(),
    })
}

/// One routing-decision timing ([`bench_routing`]).
#[derive(Debug, Clone, Serialize)]
pub struct RoutingBench {
    /// Tokens routed together.
    pub tokens: usize,
    /// Experts.
    pub experts: usize,
    /// The device, as given.
    pub device: String,
    /// Median time of the whole device decision ([`crate::routing::DeviceRoutes`]), read back.
    pub decision_ms_median: f64,
    /// The same per token, in nanoseconds: flat as the tokens grow when the work is linear.
    pub decision_ns_per_token: f64,
    /// Median time of the prefix sum alone, blocked (`crate::routing::scan::cumsum_rows`).
    pub scan_ms_median: f64,
    /// Median time of Burn's own `cumsum` on the same one-hot matrix (quadratic on GPU
    /// backends); `None` where it was skipped as too slow (`--routing-burn-max`).
    pub burn_cumsum_ms_median: Option<f64>,
}

/// Times the device routing decision alone (top-1, capacity factor 1.2, random drop order) on
/// random probabilities `[tokens, experts]`, and its prefix sum against Burn's `cumsum`, each
/// timing ending in one read of a scalar (the device's queue drained). Burn's `cumsum` is timed
/// only up to `burn_max` tokens.
pub fn bench_routing(
    tokens: &[usize],
    experts: usize,
    device_name: &str,
    device: &Device,
    reps: usize,
    burn_max: usize,
) -> Result<Vec<RoutingBench>> {
    use crate::routing::{DeviceRoutes, RoutingOptions, scan::cumsum_rows};
    use crate::store::{host_f32, host_i64};
    use burn::tensor::{Distribution, Tensor};
    if experts == 0 || reps == 0 {
        bail!("--experts and --steps must be at least 1");
    }
    let opts = RoutingOptions::labml(1.2, true);
    let mut rng = RoutingRng::seed_from_u64(0);
    let mut out = Vec::new();
    for &n in tokens {
        if n == 0 {
            bail!("--routing: token counts must be at least 1");
        }
        let probs = Tensor::<2>::random([n, experts], Distribution::Uniform(0.0, 1.0), device);
        let hot = probs.clone().argmax(1).reshape([n]).one_hot::<2>(experts);
        // Each timing ends in one read of a scalar: the device's queue drained.
        let time = |f: &mut dyn FnMut()| -> f64 {
            // Two untimed runs: kernels compiled and autotuned, buffers allocated.
            for _ in 0..2 {
                f();
            }
            let ms: Vec<f64> = (0..reps)
                .map(|_| {
                    let t0 = Instant::now();
                    f();
                    t0.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            median(&ms)
        };
        let decision = time(&mut || {
            host_f32(DeviceRoutes::new(probs.clone(), &opts, &mut rng).n_dropped);
        });
        let scan = time(&mut || {
            host_i64(cumsum_rows(hot.clone()).sum());
        });
        let burn_cumsum = (n <= burn_max).then(|| {
            time(&mut || {
                host_i64(hot.clone().cumsum(0).sum());
            })
        });
        out.push(RoutingBench {
            tokens: n,
            experts,
            device: device_name.to_string(),
            decision_ms_median: decision,
            decision_ns_per_token: decision * 1e6 / n as f64,
            scan_ms_median: scan,
            burn_cumsum_ms_median: burn_cumsum,
        });
    }
    Ok(out)
}
