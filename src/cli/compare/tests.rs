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
