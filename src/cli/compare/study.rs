//! The paper's central experiment at miniature scale: a dense baseline and Switch models with
//! more and more experts, at equal compute per token (top-1 routing to experts the size of the
//! dense FFN), trained for the same steps from the same seed. More experts means more
//! parameters for the same FLOPs per token; the question is whether validation loss drops.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use burn::tensor::Device;

use switch_transformer::data::TextData;
use switch_transformer::tools::bench::median;
use switch_transformer::train::config::RunConfig;
use switch_transformer::train::{Event, Finish, Trainer};
use switch_transformer::train::{MetricsLine, RunDir};
use switch_transformer::util::write_atomic;

use crate::cli::report::charts::{LineChart, RunMetrics, Series, line_svg};

/// One model of the comparison.
#[derive(Debug, Clone)]
pub struct Entry {
    /// `dense` or `switch-N`.
    pub label: String,
    /// Parameters of the model.
    pub params: usize,
    /// Forward FLOPs per token of its matrix products (`ModelConfig::flops_per_token`).
    pub flops_per_token: f64,
    /// Validation loss at the last step.
    pub final_valid_loss: f64,
    /// Lowest validation loss.
    pub best_valid_loss: f64,
    /// Median training throughput.
    pub tokens_per_s: f64,
    /// (step, validation loss) points.
    pub curve: Vec<(f64, f64)>,
}

/// The configurations compared: `base` as a dense model, then with each expert count.
pub fn variants(base: &RunConfig, experts: &[usize]) -> Vec<(String, RunConfig)> {
    let mut out = Vec::new();
    let mut dense = base.clone();
    dense.model.switch_every = 0;
    dense.model.n_experts = 1;
    out.push(("dense".to_string(), dense));
    for &e in experts {
        let mut c = base.clone();
        c.model.n_experts = e;
        c.model.top_k = 1;
        if c.model.switch_every == 0 {
            c.model.switch_every = 1;
        }
        out.push((format!("switch-{e}"), c));
    }
    out
}

/// Trains every variant into `dir/<label>/` (skipping runs already complete there), then
/// writes `dir/compare.md` and `dir/compare.svg`.
pub fn run(
    base: &RunConfig,
    experts: &[usize],
    data: &TextData,
    dir: &Path,
    device: &Device,
    on_event: &mut dyn FnMut(&str, Event),
) -> Result<Vec<Entry>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut entries = Vec::new();
    for (label, config) in variants(base, experts) {
        let run_dir = dir.join(&label);
        train_unless_complete(&config, data, &run_dir, device, &mut |e| {
            on_event(&label, e)
        })?;
        // The model as it trained (its vocabulary from the data).
        let trained = RunDir::new(&run_dir).read_config()?;
        let params = trained.model.num_params();
        let flops_per_token = trained.model.flops_per_token(trained.train.seq_len);
        let m = RunMetrics::read(&run_dir)?;
        let curve: Vec<(f64, f64)> = m
            .valid
            .iter()
            .map(|v| (v.step as f64, v.valid_loss))
            .collect();
        let speeds: Vec<f64> = m.train.iter().map(|t| t.tokens_per_s).collect();
        entries.push(Entry {
            label,
            params,
            flops_per_token,
            final_valid_loss: curve.last().map_or(f64::NAN, |p| p.1),
            best_valid_loss: curve.iter().map(|p| p.1).fold(f64::INFINITY, f64::min),
            tokens_per_s: median(&speeds),
            curve,
        });
    }
    write_outputs(base, &entries, dir)?;
    Ok(entries)
}

/// Trains `config` into `run_dir`, unless a run there already validated at its last step
/// (an unfinished one is cleared and trained again).
pub(crate) fn train_unless_complete(
    config: &RunConfig,
    data: &TextData,
    run_dir: &Path,
    device: &Device,
    on_event: &mut dyn FnMut(Event),
) -> Result<()> {
    if is_complete(run_dir, config.train.steps) {
        return Ok(());
    }
    if run_dir.exists() {
        std::fs::remove_dir_all(run_dir)
            .with_context(|| format!("cannot clear the unfinished run {}", run_dir.display()))?;
    }
    let mut t = Trainer::create(config.clone(), data.clone(), run_dir, device)?;
    let finish = t.run(&AtomicBool::new(false), on_event)?;
    anyhow::ensure!(
        finish == Finish::Completed,
        "run {} was interrupted",
        run_dir.display()
    );
    Ok(())
}

/// Whether the run in `run_dir` validated at its last step.
fn is_complete(run_dir: &Path, steps: u64) -> bool {
    let Ok(lines) = RunDir::new(run_dir).read_metrics() else {
        return false;
    };
    lines
        .iter()
        .any(|l| matches!(l, MetricsLine::Valid(v) if v.step == steps))
}

/// The comparison table (Markdown).
pub fn table(base: &RunConfig, entries: &[Entry]) -> String {
    let (m, t) = (&base.model, &base.train);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "d_model {}, {} layers, d_ff {} (each expert = the dense FFN: equal compute per token), \
         top-1 routing, capacity factor {}, {} steps of {}x{} tokens, seed {}.\n",
        m.d_model, m.n_layers, m.d_ff, m.capacity_factor, t.steps, t.batch_size, t.seq_len, t.seed
    );
    s.push_str(
        "| model | parameters | MFLOPs/token | final valid loss | best valid loss | tokens/s |\n",
    );
    s.push_str("|---|---|---|---|---|---|\n");
    for e in entries {
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {:.4} | {:.4} | {:.0} |",
            e.label,
            e.params,
            e.flops_per_token / 1e6,
            e.final_valid_loss,
            e.best_valid_loss,
            e.tokens_per_s
        );
    }
    s
}

fn write_outputs(base: &RunConfig, entries: &[Entry], dir: &Path) -> Result<PathBuf> {
    let chart = LineChart {
        y_from_zero: false,
        id: "compare".into(),
        title: "Validation loss: dense vs Switch at equal compute per token".into(),
        y_label: "validation cross-entropy".into(),
        series: entries
            .iter()
            .map(|e| Series {
                label: e.label.clone(),
                points: e.curve.clone(),
            })
            .collect(),
    };
    write_atomic(&dir.join("compare.svg"), line_svg(&chart).as_bytes())?;
    let path = dir.join("compare.md");
    write_atomic(&path, table(base, entries).as_bytes())?;
    Ok(path)
}

/// The default comparison: a model small enough that dense + 4 Switch runs finish in about
/// ten minutes on 2 cores.
pub fn default_base() -> RunConfig {
    let mut c = RunConfig::default();
    for s in [
        "model.d_model=64",
        "model.heads=4",
        "model.d_ff=128",
        "model.n_layers=4",
        "model.init=independent",
        "train.batch_size=16",
        "train.steps=3000",
        "train.lr=0.5",
        "train.warmup=500",
        "train.eval_interval=100",
        "train.checkpoint_interval=3000",
        "train.keep_checkpoints=1",
    ] {
        c.set(s).expect("valid default");
    }
    c
}
