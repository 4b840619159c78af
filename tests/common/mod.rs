//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use switch_transformer::RoutingRng;
use switch_transformer::store::HostTensor;
use switch_transformer::weights::StateDict;

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fixture directories: the project's copy (always) and `../shared/fixtures` when present.
pub fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![manifest_dir().join("tests/data/fixtures")];
    let shared = manifest_dir().join("../shared/fixtures");
    if shared.is_dir() {
        dirs.push(shared);
    } else {
        eprintln!("note: ../shared/fixtures not found; using the project's copy only");
    }
    dirs
}

pub fn fixture(name: &str) -> PathBuf {
    manifest_dir().join("tests/data/fixtures").join(name)
}

/// Uniform random tensor in [-a, a).
pub fn uniform(rng: &mut RoutingRng, shape: Vec<usize>, a: f32) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::f32(shape, (0..n).map(|_| rng.random_range(-a..a)).collect())
}

/// Independent random weights for a labml `SwitchFeedForward` (PyTorch names and layout).
pub fn random_switch_weights(seed: u64, d: usize, f: usize, e: usize) -> StateDict {
    let mut rng = RoutingRng::seed_from_u64(seed);
    let mut sd = StateDict::new();
    let (ad, af) = (1.0 / (d as f32).sqrt(), 1.0 / (f as f32).sqrt());
    sd.insert("switch.weight".into(), uniform(&mut rng, vec![e, d], 4.0 * ad));
    sd.insert("switch.bias".into(), uniform(&mut rng, vec![e], 4.0 * ad));
    for i in 0..e {
        sd.insert(format!("experts.{i}.layer1.weight"), uniform(&mut rng, vec![f, d], ad));
        sd.insert(format!("experts.{i}.layer1.bias"), uniform(&mut rng, vec![f], ad));
        sd.insert(format!("experts.{i}.layer2.weight"), uniform(&mut rng, vec![d, f], af));
        sd.insert(format!("experts.{i}.layer2.bias"), uniform(&mut rng, vec![d], af));
    }
    sd
}

/// Largest |a - b| relative to the largest |b|.
pub fn max_rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}
