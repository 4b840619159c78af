//! `switch compare --study routing`: option sets side by side, each trained from several seeds
//! at the same steps and tokens per step, so that a difference can be told from a seed's
//! noise. The default grid is the routing that came after the Switch paper, each at the
//! Switch layer's compute per token (base model with `E` experts of width `f`, top-1):
//!
//! ```text
//! switch        the base: the auxiliary loss (labml's routing)
//! bias          auxiliary-loss-free balancing (DeepSeek-V3), bias rate 0.01
//! shared        1 shared expert of width f/2 + E routed experts of width f/2, top-1
//! fine-grained  4E experts of width f/4, top-4
//! combined      1 shared of width f/4 + 4E routed of width f/4, top-3, bias balancing
//! ```
//! Each row: validation loss at the chosen steps (mean ± standard deviation over the seeds),
//! median training tokens/s, and over the second half of training the fraction of assignments
//! dropped (k per token with top-k) and the load imbalance (the largest expert's share of
//! first choices over the mean share, averaged over layers).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;

use switch_transformer::data::TextData;
use switch_transformer::tools::bench::median;
use switch_transformer::train::config::RunConfig;
use switch_transformer::train::{Event, RunDir};
use switch_transformer::util::write_atomic;

use super::study::train_unless_complete;
use crate::cli::report::charts::RunMetrics;

/// One option set: a label and the `key=value` settings it adds to the base.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// Row label (and run folder).
    pub label: String,
    /// Settings on top of the base configuration.
    pub sets: Vec<String>,
}

impl Variant {
    /// `LABEL` or `LABEL:key=value,key=value`.
    pub fn parse(s: &str) -> Result<Self> {
        let (label, sets) = s.split_once(':').unwrap_or((s, ""));
        let label = label.trim();
        if label.is_empty() || label.contains(['/', '\\']) || label.starts_with('.') {
            bail!(
                "--variant {s:?}: give it a label usable as a folder name, as \
                 LABEL:key=value,key=value"
            );
        }
        let sets = sets
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(String::from)
            .collect();
        Ok(Self {
            label: label.to_string(),
            sets,
        })
    }

    /// The base configuration with this variant's settings.
    pub fn config(&self, base: &RunConfig) -> Result<RunConfig> {
        let mut c = base.clone();
        for s in &self.sets {
            c.set(s)
                .with_context(|| format!("variant {}: {s}", self.label))?;
        }
        c.validate()
            .with_context(|| format!("variant {}", self.label))?;
        Ok(c)
    }
}

/// The routing grid for `base` (see the module comment): each option set at the base's
/// compute per token.
pub fn routing_variants(base: &RunConfig) -> Vec<Variant> {
    let (f, e) = (base.model.expert_width(), base.model.n_experts);
    let v = |label: &str, sets: Vec<String>| Variant {
        label: label.into(),
        sets,
    };
    let bias = || {
        vec![
            "model.balance=bias".to_string(),
            "model.bias_rate=0.01".to_string(),
        ]
    };
    vec![
        v("switch", vec![]),
        v("bias", bias()),
        v(
            "shared",
            vec![
                "model.shared_experts=1".into(),
                format!("model.shared_d_ff={}", f / 2),
                format!("model.expert_d_ff={}", f / 2),
            ],
        ),
        v(
            "fine-grained",
            vec![
                format!("model.n_experts={}", 4 * e),
                format!("model.expert_d_ff={}", f / 4),
                "model.top_k=4".into(),
            ],
        ),
        v(
            "combined",
            [
                vec![
                    format!("model.n_experts={}", 4 * e),
                    format!("model.expert_d_ff={}", f / 4),
                    "model.top_k=3".into(),
                    "model.shared_experts=1".into(),
                    format!("model.shared_d_ff={}", f / 4),
                ],
                bias(),
            ]
            .concat(),
        ),
    ]
}

/// One seed's run of one option set.
#[derive(Debug, Clone)]
pub struct SeedRun {
    /// Validation loss at each of the grid's steps.
    pub loss_at: Vec<f64>,
    /// Median training throughput.
    pub tokens_per_s: f64,
    /// Mean fraction of assignments (k per token) dropped over the second half of training.
    pub dropped_frac: f64,
    /// Mean over the second half of training and over layers of max load / mean load (loads
    /// of first choices).
    pub imbalance: f64,
}

/// One option set over its seeds.
#[derive(Debug, Clone)]
pub struct Row {
    /// The option set.
    pub variant: Variant,
    /// Parameters of its model.
    pub params: usize,
    /// Forward FLOPs per token of its matrix products.
    pub flops_per_token: f64,
    /// One entry per seed, in the order given.
    pub runs: Vec<SeedRun>,
}

/// The grid's shape: which steps' validation loss to report, from which seeds.
pub struct Grid<'a> {
    /// The configuration every variant starts from.
    pub base: &'a RunConfig,
    /// The option sets.
    pub variants: &'a [Variant],
    /// Seeds, each a run of every variant.
    pub seeds: &'a [u64],
    /// Steps whose validation loss the table shows (each must be a validation step).
    pub at: &'a [u64],
}

impl Grid<'_> {
    /// Trains every variant from every seed into `dir/<label>/seed-<s>/` (runs already
    /// complete there are reused), then writes `dir/grid.md`.
    pub fn run(
        &self,
        data: &TextData,
        dir: &Path,
        device: &Device,
        on_event: &mut dyn FnMut(&str, u64, Event),
    ) -> Result<Vec<Row>> {
        if self.seeds.is_empty() {
            bail!("--seeds: give at least one seed");
        }
        let configs = self
            .variants
            .iter()
            .map(|v| v.config(self.base))
            .collect::<Result<Vec<_>>>()?;
        for (v, c) in self.variants.iter().zip(&configs) {
            for &step in self.at {
                if step > c.train.steps || !step.is_multiple_of(c.train.eval_interval.max(1)) {
                    bail!(
                        "variant {}: step {step} is not one of its validations (train.steps = \
                         {}, train.eval_interval = {}); choose --at among them",
                        v.label,
                        c.train.steps,
                        c.train.eval_interval
                    );
                }
            }
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut rows = Vec::new();
        for (variant, config) in self.variants.iter().zip(configs) {
            let mut runs = Vec::new();
            // The model as it trained (its vocabulary from the data), the same for every seed.
            let mut trained = None;
            for &seed in self.seeds {
                let mut c = config.clone();
                c.train.seed = seed;
                let run_dir = dir.join(&variant.label).join(format!("seed-{seed}"));
                train_unless_complete(&c, data, &run_dir, device, &mut |e| {
                    on_event(&variant.label, seed, e)
                })?;
                let read = RunDir::new(&run_dir).read_config()?;
                runs.push(self.seed_run(&run_dir, &read)?);
                trained = Some(read);
            }
            let trained = trained.expect("at least one seed");
            rows.push(Row {
                variant: variant.clone(),
                params: trained.model.num_params(),
                flops_per_token: trained.model.flops_per_token(trained.train.seq_len),
                runs,
            });
        }
        write_atomic(&dir.join("grid.md"), self.table(&rows).as_bytes())?;
        Ok(rows)
    }

    /// One seed's results from the run in `run_dir`, trained with `config`.
    fn seed_run(&self, run_dir: &Path, config: &RunConfig) -> Result<SeedRun> {
        let m = RunMetrics::read(run_dir)?;
        // The log counts dropped assignments per token: k of them per token with top-k.
        let k = config.model.top_k.max(1) as f64;
        let loss_at = self
            .at
            .iter()
            .map(|&step| {
                m.valid
                    .iter()
                    .find(|v| v.step == step)
                    .map(|v| v.valid_loss)
                    .with_context(|| {
                        format!("{} has no validation at step {step}", run_dir.display())
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let speeds: Vec<f64> = m.train.iter().map(|t| t.tokens_per_s).collect();
        let last = m.train.last().map_or(0, |t| t.step);
        let late: Vec<_> = m.train.iter().filter(|t| 2 * t.step > last).collect();
        let mean = |f: &dyn Fn(&switch_transformer::train::TrainLine) -> f64| {
            late.iter().map(|t| f(t)).sum::<f64>() / late.len().max(1) as f64
        };
        Ok(SeedRun {
            loss_at,
            tokens_per_s: median(&speeds),
            dropped_frac: mean(&|t| t.dropped_frac) / k,
            imbalance: mean(&|t| {
                let n = t.layers.len().max(1) as f64;
                t.layers
                    .iter()
                    .map(|l| l.max_frac * l.expert_frac.len() as f64)
                    .sum::<f64>()
                    / n
            }),
        })
    }

    /// The grid's table (Markdown).
    pub fn table(&self, rows: &[Row]) -> String {
        let (m, t) = (&self.base.model, &self.base.train);
        let mut s = String::new();
        let seeds: Vec<String> = self.seeds.iter().map(u64::to_string).collect();
        let _ = writeln!(
            s,
            "Base: d_model {}, {} layers, {} experts of width {}, top-{}, capacity factor {} \
             ({}), {} steps of {}x{} tokens, lr {} warm-up {}; seeds {} (mean ± standard deviation over \
             the seeds; over the second half of training: dropped = fraction of assignments \
             dropped, max/mean load = the busiest expert's share of first choices over the \
             mean share).\n",
            m.d_model,
            m.n_layers,
            m.n_experts,
            m.expert_width(),
            m.top_k,
            m.capacity_factor,
            if m.drop_tokens {
                "dropping on"
            } else {
                "dropless"
            },
            t.steps,
            t.batch_size,
            t.seq_len,
            t.lr,
            t.warmup,
            seeds.join(", ")
        );
        s.push_str("| option set | settings | parameters | MFLOPs/token |");
        for step in self.at {
            let _ = write!(s, " valid loss @{step} |");
        }
        s.push_str(" tokens/s | dropped | max/mean load |\n|---|---|---|---|");
        s.push_str(&"---|".repeat(self.at.len() + 3));
        s.push('\n');
        for r in rows {
            let sets = if r.variant.sets.is_empty() {
                "(base)".to_string()
            } else {
                r.variant.sets.join(" ")
            };
            let _ = write!(
                s,
                "| {} | `{}` | {} | {:.3} |",
                r.variant.label,
                sets,
                r.params,
                r.flops_per_token / 1e6
            );
            for i in 0..self.at.len() {
                let v: Vec<f64> = r.runs.iter().map(|x| x.loss_at[i]).collect();
                let (mean, sd) = mean_sd(&v);
                let _ = write!(s, " {mean:.4} ± {sd:.4} |");
            }
            let col = |f: fn(&SeedRun) -> f64| mean_sd(&r.runs.iter().map(f).collect::<Vec<_>>()).0;
            let _ = writeln!(
                s,
                " {:.0} | {:.4} | {:.3} |",
                col(|x| x.tokens_per_s),
                col(|x| x.dropped_frac),
                col(|x| x.imbalance)
            );
        }
        s
    }
}

/// Mean and sample standard deviation (0 for one value).
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n.max(1.0);
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}
