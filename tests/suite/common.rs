//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use switch_transformer::RoutingRng;
use switch_transformer::interop::weights::StateDict;
use switch_transformer::store::HostTensor;

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
    sd.insert(
        "switch.weight".into(),
        uniform(&mut rng, vec![e, d], 4.0 * ad),
    );
    sd.insert("switch.bias".into(), uniform(&mut rng, vec![e], 4.0 * ad));
    for i in 0..e {
        sd.insert(
            format!("experts.{i}.layer1.weight"),
            uniform(&mut rng, vec![f, d], ad),
        );
        sd.insert(
            format!("experts.{i}.layer1.bias"),
            uniform(&mut rng, vec![f], ad),
        );
        sd.insert(
            format!("experts.{i}.layer2.weight"),
            uniform(&mut rng, vec![d, f], af),
        );
        sd.insert(
            format!("experts.{i}.layer2.bias"),
            uniform(&mut rng, vec![d], af),
        );
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

/// [`max_rel_err`] of f32 values (compared in f64).
pub fn max_rel_err_f32(a: &[f32], b: &[f32]) -> f64 {
    let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    max_rel_err(&wide(a), &wide(b))
}

/// Tiny Shakespeare if it can be found ($SWITCH_DATA, then ../shared/data/), else a generated
/// text written to `dir` (the test says which it uses).
pub fn training_text(dir: &std::path::Path) -> PathBuf {
    let candidates = [
        std::env::var_os("SWITCH_DATA").map(PathBuf::from),
        Some(manifest_dir().join("../shared/data/tinyshakespeare.txt")),
    ];
    for c in candidates.into_iter().flatten() {
        if c.is_file() {
            eprintln!("using training text {}", c.display());
            return c;
        }
    }
    eprintln!(
        "note: Tiny Shakespeare not found (set SWITCH_DATA or provide ../shared/data); \
         using a generated text"
    );
    let words = [
        "the", "king", "shall", "not", "speak", "of", "love", "and", "death", "my", "lord", "good",
        "night", "sweet", "prince", "what", "is", "in", "a", "name",
    ];
    let mut rng = RoutingRng::seed_from_u64(99);
    let mut text = String::new();
    while text.len() < 200_000 {
        let line_len = rng.random_range(4..12);
        let line: Vec<&str> = (0..line_len)
            .map(|_| words[rng.random_range(0..words.len())])
            .collect();
        let mut line = line.join(" ");
        line[..1].make_ascii_uppercase();
        text.push_str(&line);
        text.push_str(if rng.random_bool(0.3) { ".\n\n" } else { ",\n" });
    }
    let path = dir.join("generated.txt");
    std::fs::write(&path, text).unwrap();
    path
}

/// A fresh empty directory under the system temp dir.
/// Runs the `switch` binary with `args`: whether it succeeded, and its stdout then stderr.
/// (Integration tests only: the binary's own tests include this file too.)
pub fn switch(args: &[&str]) -> (bool, String) {
    let Some(bin) = option_env!("CARGO_BIN_EXE_switch") else {
        panic!("common::switch runs in the integration tests only")
    };
    let out = std::process::Command::new(bin).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("switch-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small, fast run configuration.
pub fn tiny_run_config() -> switch_transformer::train::RunConfig {
    let mut c = switch_transformer::train::RunConfig::default();
    for s in [
        "model.d_model=32",
        "model.heads=2",
        "model.d_ff=64",
        "model.n_layers=2",
        "model.n_experts=4",
        "train.batch_size=4",
        "train.seq_len=16",
        "train.steps=8",
        "train.warmup=4",
        "train.log_interval=1",
        "train.eval_interval=4",
        "train.eval_batches=2",
        "train.checkpoint_interval=4",
        "train.keep_checkpoints=2",
        "train.sample_tokens=8",
    ] {
        c.set(s).unwrap();
    }
    c
}

/// `switch bench` arguments for a model and batch as small as the tests' (layers, steps and
/// experts left to the caller).
pub const TINY_BENCH_ARGS: [&str; 12] = [
    "--d-model",
    "32",
    "--heads",
    "2",
    "--d-ff",
    "64",
    "--batch",
    "4",
    "--seq-len",
    "16",
    "--warmup",
    "1",
];

/// The device tests run on: `$SWITCH_TEST_DEVICE` (`cpu`, `wgpu`, ...; the binary must be
/// built with that backend's feature), else the CPU.
pub fn test_device() -> burn::tensor::Device {
    match std::env::var("SWITCH_TEST_DEVICE") {
        Ok(spec) => {
            eprintln!("testing on device {spec}");
            switch_transformer::device::parse_device(&spec).unwrap()
        }
        Err(_) => burn::tensor::Device::default(),
    }
}

/// Two runs that must agree: bit for bit on the CPU. GPU backends autotune and fuse kernels
/// differently from run to run (different summation orders, FMA contraction), seen as 1e-8
/// relative differences on lavapipe, so there the values must agree to 1e-5 relative.
pub fn assert_same_run(a: &[(String, Vec<f64>)], b: &[(String, Vec<f64>)], what: &str) {
    let cpu = std::env::var("SWITCH_TEST_DEVICE").map_or(true, |d| d == "cpu");
    if cpu {
        assert!(a == b, "{what}: {a:?} vs {b:?}");
        return;
    }
    assert_eq!(a.len(), b.len(), "{what}");
    for ((name, x), (_, y)) in a.iter().zip(b) {
        let err = max_rel_err(x, y);
        assert!(err < 1e-5, "{what}: {name} differs by {err}");
    }
}

/// Runs `trainer` and stops it after step `step`, as Ctrl-C does (a checkpoint is written).
pub fn run_until_step(
    trainer: &mut switch_transformer::train::Trainer,
    step: u64,
) -> switch_transformer::train::Finish {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = AtomicBool::new(false);
    trainer
        .run(&stop, &mut |e| {
            if let switch_transformer::train::Event::Step(s) = e
                && s.step == step
            {
                stop.store(true, Ordering::SeqCst);
            }
        })
        .unwrap()
}

/// Waits until `ready()` (polling every 50 ms); fails the test naming `what` after `limit`.
pub fn wait_for(what: &str, limit: std::time::Duration, mut ready: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !ready() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The exit status of `child`, which must end within `limit` (`what` names the cause).
pub fn exits_within(
    child: &mut std::process::Child,
    limit: std::time::Duration,
    what: &str,
) -> std::process::ExitStatus {
    let mut status = None;
    wait_for(what, limit, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}
