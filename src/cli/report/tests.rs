//! `switch report`: the charts of a real (short) run, overlays, and clear errors on bad input.

use crate::common;

use std::sync::atomic::AtomicBool;

use super::charts::{RunMetrics, charts, line_svg, write_report};
use burn::tensor::Device;
use switch_transformer::data::TextData;
use switch_transformer::train::{RunConfig, Trainer};

/// A run of `c` in `tmp/name`, to its end.
fn run_of(c: RunConfig, tmp: &std::path::Path, name: &str) -> std::path::PathBuf {
    let text = common::training_text(tmp);
    let data = TextData::load(&text, c.train.seq_len + 1).unwrap();
    let run = tmp.join(name);
    Trainer::create(c, data, &run, &Device::default())
        .unwrap()
        .run(&AtomicBool::new(false), &mut |_| {})
        .unwrap();
    run
}

/// A run of the tests' tiny configuration: 2 layers, 4 experts, 8 steps, validation every 4.
fn short_run(tmp: &std::path::Path, name: &str) -> std::path::PathBuf {
    run_of(common::tiny_run_config(), tmp, name)
}

#[test]
fn report_of_a_real_run_has_every_chart() {
    let tmp = common::temp_dir("report");
    let run = short_run(&tmp, "a");
    let metrics = RunMetrics::read(&run).unwrap();
    let (lines, heatmaps) = charts(std::slice::from_ref(&metrics));
    let by_id = |id: &str| {
        lines
            .iter()
            .find(|c| c.id == id)
            .unwrap_or_else(|| panic!("{id}"))
    };
    let shape = |id: &str| -> Vec<(String, usize)> {
        by_id(id)
            .series
            .iter()
            .map(|s| (s.label.clone(), s.points.len()))
            .collect()
    };
    assert_eq!(shape("loss"), [("train".into(), 8), ("valid".into(), 2)]);
    // train.z_loss_coef is 0: the z-loss is logged but not charted.
    assert_eq!(shape("aux"), [("load balancing".into(), 8)]);
    for id in ["dropped-0", "confidence-0"] {
        assert_eq!(shape(id), [("layer 0".into(), 8), ("layer 1".into(), 8)]);
        assert!(by_id(id).y_from_zero, "fractions start at 0");
        // The axis starts at 0 and its labels are round.
        let svg = line_svg(by_id(id));
        assert!(svg.contains(">0.0<") || svg.contains(">0<"), "{svg}");
        assert!(!svg.contains(">-"), "a negative label on a fraction axis");
    }
    let mut with_z = metrics.clone();
    with_z.z_loss_on = true;
    let (lines_z, _) = charts(std::slice::from_ref(&with_z));
    assert_eq!(
        lines_z.iter().find(|c| c.id == "aux").unwrap().series.len(),
        2
    );
    assert_eq!(heatmaps.len(), 2);
    for hm in &heatmaps {
        assert_eq!(hm.cells.len(), 4);
        assert!(hm.cells.iter().all(|row| row.len() == 8));
        // Each column is a distribution over experts.
        for j in 0..8 {
            let total: f64 = hm.cells.iter().map(|r| r[j]).sum();
            assert!((total - 1.0).abs() < 1e-6, "{total}");
        }
    }

    let out = tmp.join("out");
    let html_path = write_report(&[metrics], None, &out).unwrap();
    let html = std::fs::read_to_string(html_path).unwrap();
    for id in [
        "loss",
        "aux",
        "dropped-0",
        "confidence-0",
        "load-0-0",
        "load-0-1",
    ] {
        assert!(
            html.contains(&format!("data-chart=\"{id}\"")),
            "{id} missing from the HTML"
        );
        assert!(out.join(format!("{id}.svg")).is_file(), "{id}.svg");
    }
    assert_eq!(html.matches("<polyline").count(), 2 + 1 + 2 + 2);
    assert!(
        !html.contains("<script src"),
        "the page must be self-contained"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn several_runs_are_overlaid_and_labelled() {
    let tmp = common::temp_dir("report-multi");
    let a = RunMetrics::read(&short_run(&tmp, "first")).unwrap();
    let b = RunMetrics::read(&short_run(&tmp, "second")).unwrap();
    let (lines, heatmaps) = charts(&[a, b]);
    let labels: Vec<&str> = lines[0].series.iter().map(|s| s.label.as_str()).collect();
    assert_eq!(
        labels,
        ["first train", "first valid", "second train", "second valid"]
    );
    assert_eq!(heatmaps.len(), 4);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn bad_metrics_are_clear_errors() {
    let tmp = common::temp_dir("report-bad");
    let good = r#"{"step":1,"epoch":0,"train_loss":4.0,"ce_loss":3.9,"lb_loss":2.0,"z_loss":0.0,"lr":0.001,"grad_norm":1.0,"tokens_per_s":1000.0,"dropped_frac":0.0,"layers":[]}"#;
    let cases = [
        ("malformed", format!("{good}\nnot json\n{good}"), "line 2"),
        (
            "nostep",
            format!("{good}\n{{\"train_loss\":1.0}}"),
            "line 2",
        ),
        ("empty", String::new(), "no metrics"),
        (
            "missing-field",
            format!("{good}\n{{\"step\":2,\"train_loss\":1.0}}"),
            "line 2",
        ),
    ];
    for (name, text, needle) in cases {
        let dir = tmp.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
        let err = RunMetrics::read(&dir).unwrap_err().to_string();
        assert!(
            err.contains(needle) && err.contains("metrics.jsonl"),
            "{name}: {err}"
        );
    }
    // Bytes that are not UTF-8 on line 2: named as damage there, not as a missing file.
    let dir = tmp.join("not-utf8");
    std::fs::create_dir_all(&dir).unwrap();
    let mut bytes = format!("{good}\n").into_bytes();
    bytes.extend([0xff, 0xfe, b'\n']);
    std::fs::write(dir.join("metrics.jsonl"), bytes).unwrap();
    let err = format!("{:#}", RunMetrics::read(&dir).unwrap_err());
    assert!(
        err.contains("line 2 is not UTF-8") && !err.contains("has no metrics"),
        "{err}"
    );
    // A last line cut by a kill mid-write is the end of the file (with a warning).
    let torn = tmp.join("torn");
    std::fs::create_dir_all(&torn).unwrap();
    let text = format!("{good}\n{{\"step\":2,\"train_lo");
    std::fs::write(torn.join("metrics.jsonl"), text).unwrap();
    let m = RunMetrics::read(&torn).unwrap();
    assert_eq!(m.train.len(), 1);

    let empty_dir = tmp.join("nothing");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let err = RunMetrics::read(&empty_dir).unwrap_err().to_string();
    assert!(err.contains("no metrics.jsonl"), "{err}");
    let err = RunMetrics::read(&tmp.join("absent"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a directory"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn a_run_balanced_by_bias_charts_each_layer_s_biases() {
    let tmp = common::temp_dir("report-bias");
    let mut c = common::tiny_run_config(); // 2 layers, 4 experts, 8 steps
    c.set("model.balance=bias").unwrap();
    let run = run_of(c, &tmp, "bias");
    let metrics = RunMetrics::read(&run).unwrap();
    let (lines, _) = charts(std::slice::from_ref(&metrics));
    for l in 0..2 {
        let chart = lines
            .iter()
            .find(|c| c.id == format!("bias-0-{l}"))
            .unwrap_or_else(|| panic!("no bias chart for layer {l}"));
        assert_eq!(chart.series.len(), 4, "an expert a line");
        assert!(chart.series.iter().all(|s| s.points.len() == 8));
    }
    // The reference run (model.balance = aux) has none.
    let plain = short_run(&tmp, "plain");
    let (lines, _) = charts(&[RunMetrics::read(&plain).unwrap()]);
    assert!(!lines.iter().any(|c| c.id.starts_with("bias-")));
    std::fs::remove_dir_all(&tmp).unwrap();
}
