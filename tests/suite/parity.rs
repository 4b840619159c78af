//! `switch parity` on every recorded fixture: the implementation proves itself against the
//! tensors recorded from labml's PyTorch code.

use crate::common;

use burn::tensor::Device;
use switch_transformer::interop::parity::{self, FixtureKind};
use switch_transformer::store::TensorFile;

#[test]
fn every_fixture_passes() {
    let mut n = 0;
    for dir in common::fixture_dirs() {
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        for path in files {
            let report = parity::run(&TensorFile::read(&path).unwrap(), &common::test_device())
                .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            println!("== {}\n{report}", path.display());
            assert!(report.passed(), "{} failed:\n{report}", path.display());
            n += 1;
        }
    }
    assert!(n >= 4, "expected at least the 4 fixtures, found {n}");
}

#[test]
fn fixture_kinds_are_recognised() {
    let kind =
        |f: &str| FixtureKind::detect(&TensorFile::read(&common::fixture(f)).unwrap()).unwrap();
    assert_eq!(kind("model_tiny.safetensors"), FixtureKind::Model);
    assert_eq!(kind("noam.safetensors"), FixtureKind::Optimizer);
    assert_eq!(
        kind("switch_ff_scale.safetensors"),
        FixtureKind::SwitchFeedForward
    );
    assert_eq!(
        kind("switch_ff_drop.safetensors"),
        FixtureKind::SwitchFeedForwardDrop
    );
}

/// A tampered fixture must fail: the check can fail.
#[test]
fn a_wrong_recording_fails() {
    let mut f = TensorFile::read(&common::fixture("model_tiny.safetensors")).unwrap();
    let logits = f.tensors.get_mut("logits").unwrap();
    let mut v = logits.to_f32();
    v[17] += 1e-2;
    *logits = switch_transformer::store::HostTensor::f32(logits.shape.clone(), v);
    let report = parity::run(&f, &Device::default()).unwrap();
    assert!(!report.passed());
    let bad: Vec<_> = report
        .rows
        .iter()
        .filter(|r| !r.pass)
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(bad, ["logits"]);
}

#[test]
fn not_a_fixture_is_a_clear_error() {
    let f = TensorFile::default();
    let err = parity::run(&f, &Device::default()).unwrap_err().to_string();
    assert!(err.contains("not a recognised fixture"), "{err}");
}
