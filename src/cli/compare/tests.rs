//! `switch compare`: dense baseline vs Switch models at equal compute per token.

use crate::common;

use super::study;
use burn::tensor::Device;
use switch_transformer::data::TextData;

#[test]
fn compare_trains_every_variant_and_writes_table_and_plot() {
    let tmp = common::temp_dir("compare");
    let text = common::training_text(&tmp);
    let mut base = common::tiny_run_config();
    base.set("train.steps=4").unwrap();
    base.set("train.eval_interval=2").unwrap();
    let data = TextData::load(&text, base.train.seq_len + 1).unwrap();
    let dir = tmp.join("cmp");
    let entries = study::run(
        &base,
        &[2, 4],
        &data,
        &dir,
        &Device::default(),
        &mut |_, _| {},
    )
    .unwrap();
    let labels: Vec<&str> = entries.iter().map(|e| e.label.as_str()).collect();
    assert_eq!(labels, ["dense", "switch-2", "switch-4"]);
    assert!(entries[0].params < entries[1].params && entries[1].params < entries[2].params);
    for e in &entries {
        assert_eq!(e.curve.len(), 2, "{}", e.label);
        assert!(e.final_valid_loss.is_finite());
    }
    // Same FLOPs per token: the Switch models' non-expert shapes equal the dense model's.
    let variants = study::variants(&base, &[2]);
    assert_eq!(variants[0].1.model.d_ff, variants[1].1.model.d_ff);
    assert_eq!(variants[1].1.model.top_k, 1);
    let md = std::fs::read_to_string(dir.join("compare.md")).unwrap();
    assert_eq!(
        md.lines()
            .filter(|l| l.starts_with("| switch-") || l.starts_with("| dense"))
            .count(),
        3
    );
    let svg = std::fs::read_to_string(dir.join("compare.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 3);
    // Finished runs are reused, not retrained.
    let metrics = dir.join("dense/metrics.jsonl");
    let before = std::fs::metadata(&metrics).unwrap().modified().unwrap();
    study::run(
        &base,
        &[2, 4],
        &data,
        &dir,
        &Device::default(),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(
        std::fs::metadata(&metrics).unwrap().modified().unwrap(),
        before
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn the_routing_grid_trains_every_option_set_from_every_seed() {
    use super::grid::{Grid, Variant, mean_sd, routing_variants};
    let tmp = common::temp_dir("grid");
    let text = common::training_text(&tmp);
    let mut base = common::tiny_run_config();
    base.set("train.steps=4").unwrap();
    base.set("train.eval_interval=2").unwrap();
    let data = TextData::load(&text, base.train.seq_len + 1).unwrap();
    // The default grid keeps the base's FLOPs per token but for the router (top-3 of 4E
    // experts of width f/4 plus a shared one of width f/4 equals one expert of width f).
    let defaults = routing_variants(&base);
    let labels: Vec<&str> = defaults.iter().map(|v| v.label.as_str()).collect();
    assert_eq!(
        labels,
        ["switch", "bias", "shared", "fine-grained", "combined"]
    );
    let router = |c: &switch_transformer::train::RunConfig| {
        let m = &c.model;
        (m.n_switch_layers() * 2 * m.d_model * m.n_experts) as f64
    };
    let base_flops = base.model.flops_per_token(64) - router(&base);
    for v in &defaults {
        let c = v.config(&base).unwrap();
        assert_eq!(
            c.model.flops_per_token(64) - router(&c),
            base_flops,
            "{}",
            v.label
        );
    }
    let variants = vec![
        defaults[0].clone(),
        Variant::parse("shared-seq:model.shared_experts=1,model.balance_scope=sequence").unwrap(),
        // Capacity for a quarter of the 2 x tokens assignments: at least 3/4 of them drop.
        Variant::parse("top2:model.top_k=2,model.capacity_factor=0.25").unwrap(),
    ];
    let grid = Grid {
        base: &base,
        variants: &variants,
        seeds: &[0, 1],
        at: &[2, 4],
    };
    let dir = tmp.join("grid");
    let rows = grid
        .run(&data, &dir, &Device::default(), &mut |_, _, _| {})
        .unwrap();
    assert_eq!(rows.len(), 3);
    for run in &rows[2].runs {
        let d = run.dropped_frac;
        assert!(
            (0.75..=1.0).contains(&d),
            "a fraction of the assignments: {d}"
        );
    }
    for r in &rows {
        assert_eq!(r.runs.len(), 2);
        for run in &r.runs {
            assert!(run.loss_at.iter().all(|l| l.is_finite()));
            assert!(run.imbalance >= 1.0 && run.tokens_per_s > 0.0);
        }
        // Seeds differ, so their losses do.
        assert_ne!(r.runs[0].loss_at, r.runs[1].loss_at, "{}", r.variant.label);
    }
    assert!(
        rows[1].params > rows[0].params,
        "the shared expert adds parameters"
    );
    let md = std::fs::read_to_string(dir.join("grid.md")).unwrap();
    assert!(md.contains("| shared-seq | `model.shared_experts=1 model.balance_scope=sequence`"));
    assert!(md.contains("valid loss @4"), "{md}");
    assert!(dir.join("shared-seq/seed-1/metrics.jsonl").exists());
    // A step that is not a validation is refused before any training.
    let bad = Grid { at: &[3], ..grid };
    let err = bad
        .run(
            &data,
            &tmp.join("bad"),
            &Device::default(),
            &mut |_, _, _| {},
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("not one of its validations"),
        "{err}"
    );
    assert!(Variant::parse(":model.top_k=2").is_err());
    assert_eq!(mean_sd(&[1.0, 3.0]), (2.0, 2f64.sqrt()));
    std::fs::remove_dir_all(&tmp).unwrap();
}
