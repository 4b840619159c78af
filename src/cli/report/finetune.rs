//! Reports of `switch finetune` runs (a run folder with `run.json`): charts of its
//! `metrics.jsonl`, the cross-entropy (training and validation), ROUGE of the validation
//! generations, the router losses, the gradient norm, each sparse layer's dropped fraction,
//! and a heatmap of each sparse layer's expert load over the updates.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::charts::{Heatmap, LineChart, Series, load_heatmap, series_label, title_suffix};

/// Whether `dir` holds a `switch finetune` run.
pub fn is_finetune_run(dir: &Path) -> bool {
    dir.join("run.json").is_file()
}

/// One fine-tuning run's metric lines.
#[derive(Debug, Clone)]
pub struct FinetuneMetrics {
    /// The run's folder name.
    pub name: String,
    /// The update lines (with `loss`), in order.
    pub updates: Vec<Value>,
    /// The validation lines (with `valid_loss`), in order.
    pub valid: Vec<Value>,
}

impl FinetuneMetrics {
    /// Reads `dir/metrics.jsonl`; a line that is not a JSON object with a `step` is an error
    /// naming it.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let (mut updates, mut valid) = (Vec::new(), Vec::new());
        for (i, line) in text.lines().enumerate() {
            let v: Value = serde_json::from_str(line)
                .ok()
                .filter(|v: &Value| v.get("step").is_some_and(Value::is_u64))
                .with_context(|| {
                    format!("{} line {}: not a metrics line", path.display(), i + 1)
                })?;
            if v.get("valid_loss").is_some() {
                valid.push(v);
            } else {
                updates.push(v);
            }
        }
        if updates.is_empty() && valid.is_empty() {
            bail!("{} holds no metrics yet", path.display());
        }
        let name = dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
        Ok(Self {
            name,
            updates,
            valid,
        })
    }
}

fn step(v: &Value) -> f64 {
    v["step"].as_u64().unwrap_or(0) as f64
}

/// The points `(step, line[key])` of `lines` that have it.
fn series(label: String, lines: &[Value], y: impl Fn(&Value) -> Option<f64>) -> Option<Series> {
    let points: Vec<(f64, f64)> = lines
        .iter()
        .filter_map(|v| Some((step(v), y(v)?)))
        .collect();
    (!points.is_empty()).then_some(Series { label, points })
}

fn key(k: &'static str) -> impl Fn(&Value) -> Option<f64> {
    move |v| v.get(k)?.as_f64()
}

/// Every chart of the report for `runs`.
pub fn charts(runs: &[FinetuneMetrics]) -> (Vec<LineChart>, Vec<Heatmap>) {
    let multi = runs.len() > 1;
    let label = |r: &FinetuneMetrics, what: &str| series_label(multi, &r.name, what);
    let chart = |id: &str, title: &str, y_label: &str, series: Vec<Series>, zero: bool| LineChart {
        id: id.into(),
        title: title.into(),
        y_label: y_label.into(),
        series,
        y_from_zero: zero,
    };
    let (mut loss, mut rouge, mut router, mut norm) = (vec![], vec![], vec![], vec![]);
    for r in runs {
        loss.extend(series(label(r, "train"), &r.updates, key("ce")));
        loss.extend(series(label(r, "valid"), &r.valid, key("valid_loss")));
        for (k, what) in [
            ("rouge1", "ROUGE-1"),
            ("rouge2", "ROUGE-2"),
            ("rougeL", "ROUGE-L"),
        ] {
            rouge.extend(series(label(r, what), &r.valid, key(k)));
        }
        for (k, what) in [
            ("z_enc", "z-loss, encoder"),
            ("z_dec", "z-loss, decoder"),
            ("aux_enc", "load balancing, encoder"),
            ("aux_dec", "load balancing, decoder"),
        ] {
            // A stack without router losses (every block sparse) logs 0: not charted.
            let s = series(label(r, what), &r.updates, key(k));
            router.extend(s.filter(|s| s.points.iter().any(|p| p.1 != 0.0)));
        }
        norm.extend(series(
            label(r, "before clipping"),
            &r.updates,
            key("grad_norm"),
        ));
    }
    let mut lines = vec![
        chart(
            "loss",
            "Cross-entropy loss",
            "cross-entropy (nats)",
            loss,
            false,
        ),
        chart(
            "rouge",
            "ROUGE of the validation generations",
            "F-measure",
            rouge,
            true,
        ),
        chart("router", "Router losses (training)", "loss", router, false),
        chart("grad-norm", "Gradient norm", "global L2 norm", norm, false),
    ];
    let mut heatmaps = Vec::new();
    for (ri, r) in runs.iter().enumerate() {
        let suffix = title_suffix(multi, &r.name);
        let layers: Vec<String> = r
            .updates
            .iter()
            .find_map(|v| v.get("layers")?.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|l| Some(l.get("name")?.as_str()?.to_string()))
            .collect();
        let layer = |v: &Value, l: usize| -> Option<Value> { v.get("layers")?.get(l).cloned() };
        let dropped: Vec<Series> = layers
            .iter()
            .enumerate()
            .filter_map(|(l, name)| {
                series(name.clone(), &r.updates, |v| {
                    layer(v, l)?.get("dropped")?.as_f64()
                })
            })
            .collect();
        lines.push(chart(
            &format!("dropped-{ri}"),
            &format!("Dropped-token fraction per sparse layer (training){suffix}"),
            "fraction of tokens dropped",
            dropped,
            true,
        ));
        for (l, name) in layers.iter().enumerate() {
            let rows: Vec<(u64, Vec<f64>)> = r
                .updates
                .iter()
                .filter_map(|v| {
                    let frac = layer(v, l)?.get("expert_frac")?.as_array()?.clone();
                    let frac = frac.iter().map(|f| f.as_f64().unwrap_or(0.0)).collect();
                    Some((step(v) as u64, frac))
                })
                .collect();
            heatmaps.extend(load_heatmap(
                format!("load-{ri}-{l}"),
                format!("Expert load, {name}{suffix}"),
                &rows,
            ));
        }
    }
    (lines, heatmaps)
}
