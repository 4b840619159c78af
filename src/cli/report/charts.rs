//! Training reports: charts of a run's `metrics.jsonl` as SVG files and one self-contained
//! HTML page (no network needed to open it).
//!
//! Charts: training and validation loss, load-balancing loss (and router z-loss when logged),
//! dropped-token fraction per layer, router confidence per layer, each layer's expert biases
//! (auxiliary-loss-free balancing), and a per-layer heatmap of expert load over training.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub use super::svg::{Heatmap, LineChart, Series, heatmap_svg, line_svg};
use super::svg::{PALETTE, esc};
use anyhow::{Context, Result, bail};
use switch_transformer::train::eval::LayerStats;
use switch_transformer::train::{MetricsLine, RunDir, TrainLine, ValidLine};

/// One run's metrics.
#[derive(Debug, Clone)]
pub struct RunMetrics {
    /// The run's folder name.
    pub name: String,
    /// Training lines, in step order.
    pub train: Vec<TrainLine>,
    /// Validation lines, in step order.
    pub valid: Vec<ValidLine>,
    /// Whether the router z-loss was part of the loss (`train.z_loss_coef > 0`; assumed so
    /// when the run's configuration cannot be read). Off, it is logged but not charted.
    pub z_loss_on: bool,
}

impl RunMetrics {
    /// Reads `run_dir/metrics.jsonl`; a line that does not parse is an error naming it.
    pub fn read(run_dir: &Path) -> Result<Self> {
        let run = RunDir::new(run_dir);
        let (mut train, mut valid) = (Vec::new(), Vec::new());
        for line in run.read_metrics()? {
            match line {
                MetricsLine::Train(t) => train.push(t),
                MetricsLine::Valid(v) => valid.push(v),
            }
        }
        if train.is_empty() && valid.is_empty() {
            bail!("{} holds no metrics yet (metrics.jsonl)", run.display());
        }
        let name = run_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| run_dir.display().to_string());
        let z_loss_on = run
            .read_config()
            .map_or(true, |c| c.train.z_loss_coef > 0.0);
        Ok(Self {
            name,
            train,
            valid,
            z_loss_on,
        })
    }

    fn layers(&self) -> usize {
        let train = self.train.iter().map(|t| t.layers.len());
        let valid = self.valid.iter().map(|v| v.layers.len());
        train.chain(valid).max().unwrap_or(0)
    }
}

/// The points `(step, y(line))` of `lines`, if any.
fn series<L>(
    label: String,
    lines: &[L],
    step: impl Fn(&L) -> u64,
    y: impl Fn(&L) -> Option<f64>,
) -> Option<Series> {
    let points: Vec<(f64, f64)> = lines
        .iter()
        .filter_map(|v| Some((step(v) as f64, y(v)?)))
        .collect();
    (!points.is_empty()).then_some(Series { label, points })
}

fn train_step(t: &TrainLine) -> u64 {
    t.step
}

/// A curve's label: `what`, prefixed by its run's name when several runs are overlaid.
pub fn series_label(multi: bool, run: &str, what: &str) -> String {
    if multi {
        format!("{run} {what}")
    } else {
        what.to_string()
    }
}

/// A chart title's ending: ` (RUN)` when several runs are in the report.
pub fn title_suffix(multi: bool, run: &str) -> String {
    if multi {
        format!(" ({run})")
    } else {
        String::new()
    }
}

/// Every chart of the report for `runs`.
pub fn charts(runs: &[RunMetrics]) -> (Vec<LineChart>, Vec<Heatmap>) {
    let multi = runs.len() > 1;
    let label = |run: &RunMetrics, what: &str| series_label(multi, &run.name, what);
    let mut loss = Vec::new();
    let mut lb = Vec::new();
    for r in runs {
        loss.extend(series(label(r, "train"), &r.train, train_step, |t| {
            Some(t.ce_loss)
        }));
        loss.extend(series(
            label(r, "valid"),
            &r.valid,
            |v| v.step,
            |v| Some(v.valid_loss),
        ));
        lb.extend(series(
            label(r, "load balancing"),
            &r.train,
            train_step,
            |t| Some(t.lb_loss),
        ));
        if r.z_loss_on {
            lb.extend(series(label(r, "z-loss"), &r.train, train_step, |t| {
                Some(t.z_loss)
            }));
        }
    }
    let mut lines = vec![
        LineChart {
            id: "loss".into(),
            title: "Cross-entropy loss".into(),
            y_label: "cross-entropy (nats)".into(),
            series: loss,
            y_from_zero: false,
        },
        LineChart {
            id: "aux".into(),
            title: "Auxiliary losses (training)".into(),
            y_label: "loss".into(),
            series: lb,
            y_from_zero: false,
        },
    ];
    let mut heatmaps = Vec::new();
    for (ri, r) in runs.iter().enumerate() {
        let suffix = title_suffix(multi, &r.name);
        let per_layer = |value: fn(&LayerStats) -> f64| -> Vec<Series> {
            (0..r.layers())
                .filter_map(|l| {
                    series(format!("layer {l}"), &r.train, train_step, |t| {
                        t.layers.get(l).map(value)
                    })
                })
                .collect()
        };
        lines.push(LineChart {
            id: format!("dropped-{ri}"),
            title: format!("Dropped-token fraction per layer (training){suffix}"),
            y_label: "fraction of tokens dropped".into(),
            series: per_layer(|l| l.dropped_frac),
            y_from_zero: true,
        });
        lines.push(LineChart {
            id: format!("confidence-{ri}"),
            title: format!("Router confidence per layer (training){suffix}"),
            y_label: "mean top routing probability".into(),
            series: per_layer(|l| l.mean_top_prob),
            y_from_zero: true,
        });
        // Auxiliary-loss-free balancing: each layer's expert biases, an expert a line.
        for l in 0..r.layers() {
            let n_experts = r
                .train
                .iter()
                .filter_map(|t| t.expert_bias.get(l))
                .map(Vec::len);
            let series: Vec<Series> = (0..n_experts.max().unwrap_or(0))
                .filter_map(|e| {
                    series(format!("expert {e}"), &r.train, train_step, |t| {
                        Some(*t.expert_bias.get(l)?.get(e)? as f64)
                    })
                })
                .collect();
            if !series.is_empty() {
                lines.push(LineChart {
                    id: format!("bias-{ri}-{l}"),
                    title: format!("Expert bias, layer {l} (model.balance = bias){suffix}"),
                    y_label: "bias added to the router logits for the choice".into(),
                    series,
                    y_from_zero: false,
                });
            }
        }
        for l in 0..r.layers() {
            let rows: Vec<(u64, Vec<f64>)> = r
                .train
                .iter()
                .filter_map(|t| Some((t.step, t.layers.get(l)?.expert_frac.clone())))
                .collect();
            heatmaps.extend(load_heatmap(
                format!("load-{ri}-{l}"),
                format!("Expert load, layer {l}{suffix}"),
                &rows,
            ));
        }
    }
    (lines, heatmaps)
}

/// A heatmap of one layer's expert load: `rows` are `(step, each expert's fraction)`, an
/// expert per row of the map, a step per column (`None` when there is no expert).
pub fn load_heatmap(id: String, title: String, rows: &[(u64, Vec<f64>)]) -> Option<Heatmap> {
    let n_experts = rows.iter().map(|(_, f)| f.len()).max().unwrap_or(0);
    (n_experts > 0).then(|| Heatmap {
        id,
        title,
        steps: rows.iter().map(|(s, _)| *s).collect(),
        cells: (0..n_experts)
            .map(|e| {
                rows.iter()
                    .map(|(_, f)| f.get(e).copied().unwrap_or(0.0))
                    .collect()
            })
            .collect(),
    })
}

/// A routing table for the report: each character with its expert and probability per layer.
#[derive(Debug, Clone)]
pub struct RouteTable {
    /// The text's characters.
    pub text: Vec<char>,
    /// `[layer][char]` (expert, probability)
    pub layers: Vec<Vec<(usize, f32)>>,
}

fn route_html(t: &RouteTable) -> String {
    let mut s = String::from(
        "<h2>Routing of a text (expert per character and layer)</h2>\
         <table class=\"route\"><tr><th>layer</th>",
    );
    for c in &t.text {
        let shown = match c {
            '\n' => "⏎".to_string(),
            ' ' => "␣".to_string(),
            c => esc(&c.to_string()),
        };
        let _ = write!(s, "<th>{shown}</th>");
    }
    s.push_str("</tr>");
    for (l, row) in t.layers.iter().enumerate() {
        let _ = write!(s, "<tr><td>{l}</td>");
        for &(e, p) in row {
            let _ = write!(
                s,
                r#"<td style="background:{}" title="p = {p:.3}">{e}</td>"#,
                PALETTE[e % PALETTE.len()].to_string() + "55"
            );
        }
        s.push_str("</tr>");
    }
    s.push_str("</table>");
    s
}

/// Writes `report.html` and one SVG per chart into `out`; returns the HTML path.
pub fn write_report(
    runs: &[RunMetrics],
    route: Option<&RouteTable>,
    out: &Path,
) -> Result<PathBuf> {
    let (lines, heatmaps) = charts(runs);
    let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    write_page(&names, &lines, &heatmaps, route.map(route_html), out)
}

/// The report page: the runs' names, every line chart, the heatmaps, then `extra` (HTML);
/// `report.html` and one SVG per chart in `out`. Returns the HTML path.
pub fn write_page(
    names: &[&str],
    lines: &[LineChart],
    heatmaps: &[Heatmap],
    extra: Option<String>,
    out: &Path,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut html = String::from(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Switch Transformer report</title>\
         <style>body{font-family:sans-serif;margin:24px;max-width:1500px}svg{margin:8px;border:1px solid #eee}\
         table.route{border-collapse:collapse;font-family:monospace}table.route td,table.route th{border:1px solid #ccc;padding:2px 4px;text-align:center}</style>\
         </head><body><h1>Switch Transformer training report</h1>",
    );
    let names: Vec<String> = names.iter().map(|n| esc(n)).collect();
    let _ = write!(html, "<p>Runs: {}</p>", names.join(", "));
    let write_svg = |html: &mut String, id: &str, svg: String| -> Result<()> {
        let path = out.join(format!("{id}.svg"));
        std::fs::write(&path, &svg).with_context(|| format!("cannot write {}", path.display()))?;
        html.push_str(&svg);
        Ok(())
    };
    for c in lines {
        write_svg(&mut html, &c.id, line_svg(c))?;
    }
    html.push_str("<h2>Expert load over training</h2>");
    for hm in heatmaps {
        write_svg(&mut html, &hm.id, heatmap_svg(hm))?;
    }
    if let Some(extra) = extra {
        html.push_str(&extra);
    }
    html.push_str("</body></html>");
    let path = out.join("report.html");
    std::fs::write(&path, html).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// A self-contained HTML page of a Hugging Face model's routing of one text
/// ([`switch_transformer::hf::routes::route_text`]): per sparse layer, each token's expert (its colour;
/// the router probability on hover; a dropped token struck through), then each expert's load
/// and drops. Written to `out/routes.html`; returns its path.
pub fn write_hf_routes(
    model: &str,
    input: &str,
    output: &str,
    layers: &[switch_transformer::hf::routes::LayerRoutes],
    out: &Path,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut html = String::from(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Switch Transformers routing</title>\
         <style>body{font-family:sans-serif;margin:24px;max-width:1500px}\
         table{border-collapse:collapse;font-family:monospace;margin-bottom:12px}td,th{border:1px solid #ccc;padding:2px 4px;text-align:center}\
         td.drop{text-decoration:line-through;opacity:0.6}</style>\
         </head><body><h1>Routing of a text</h1>",
    );
    let _ = write!(
        html,
        "<p>Model: {}</p><p>Input: {}</p><p>Output (greedy, routed through the decoder): {}</p>\
         <p>Each cell: the token's expert, coloured by expert; hover for the router probability; \
         struck through: dropped (over the expert's capacity, the token continues on the \
         residual).</p>",
        esc(model),
        esc(input),
        esc(output)
    );
    for l in layers {
        let _ = write!(html, "<h2>{}</h2><table><tr><th>token</th>", esc(&l.name));
        for (w, ..) in &l.tokens {
            let _ = write!(html, "<th>{}</th>", esc(w));
        }
        html.push_str("</tr><tr><td>expert</td>");
        for (_, e, p, dropped) in &l.tokens {
            let class = if *dropped { " class=\"drop\"" } else { "" };
            let _ = write!(
                html,
                r#"<td{class} style="background:{}55" title="p = {p:.3}">{e}</td>"#,
                PALETTE[e % PALETTE.len()]
            );
        }
        html.push_str("</tr></table><table><tr><th>expert</th>");
        for e in 0..l.load.len() {
            let _ = write!(html, "<th>{e}</th>");
        }
        html.push_str("</tr><tr><td>tokens</td>");
        for n in &l.load {
            let _ = write!(html, "<td>{n}</td>");
        }
        html.push_str("</tr><tr><td>dropped</td>");
        for n in &l.dropped {
            let _ = write!(html, "<td>{n}</td>");
        }
        html.push_str("</tr></table>");
    }
    html.push_str("</body></html>");
    let path = out.join("routes.html");
    std::fs::write(&path, html).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}
