//! Fuzzing the inputs a user controls, with a seeded generator (the same cases every run):
//! 200 random configuration assignments (valid and invalid values of every key) must give a
//! clear error or a configuration that validates, never a panic; 200 random byte flips and
//! truncations of a checkpoint must be refused or load with finite weights, never panic.

use crate::common;

use std::sync::atomic::AtomicBool;

use rand::{Rng, SeedableRng};
use switch_transformer::RoutingRng;
use switch_transformer::data::TextData;
use switch_transformer::optim::LabmlAdam;
use switch_transformer::train::config::KEYS;
use switch_transformer::train::{RunDir, Trainer, checkpoint, memory};

const VALUES: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "7",
    "64",
    "1e30",
    "-1e30",
    "nan",
    "inf",
    "-inf",
    "0.5",
    "1.2",
    "100000",
    "18446744073709551615",
    "99999999999999999999",
    "true",
    "false",
    "\"\"",
    "\"random\"",
    "\"position\"",
    "\"zero\"",
    "\"bf16\"",
    "\"f16\"",
    "\"device\"",
    "\"x\"",
    "[1, 2]",
    "{a = 1}",
    "\"It is\"",
    "=",
    "",
    "0x10",
];

#[test]
fn random_configuration_values_never_panic() {
    let mut rng = RoutingRng::seed_from_u64(2026);
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..200 {
        let mut c = common::tiny_run_config();
        // One to three assignments per case.
        for _ in 0..rng.random_range(1..=3) {
            let (key, _) = KEYS[rng.random_range(0..KEYS.len())];
            let value = VALUES[rng.random_range(0..VALUES.len())];
            let _ = c.set(&format!("{key}={value}"));
        }
        let outcome = std::panic::catch_unwind(|| {
            let mut c = c.clone();
            c.model.n_vocab = 65;
            c.validate()
                .and_then(|()| memory::check_fits(&c, Some(2 << 30)))
                .map(|()| c)
        });
        match outcome {
            Err(_) => panic!("case {case}: validation panicked on {c:?}"),
            Ok(Err(e)) => {
                assert!(!e.to_string().is_empty());
                refused += 1;
            }
            Ok(Ok(c)) => {
                // A configuration that validates and fits builds its model.
                let built = std::panic::catch_unwind(|| {
                    c.model.init(c.train.seed, &burn::tensor::Device::default())
                });
                assert!(built.is_ok(), "case {case}: init panicked on {c:?}");
                accepted += 1;
            }
        }
    }
    assert!(
        accepted > 10 && refused > 10,
        "{accepted} accepted, {refused} refused"
    );
}

#[test]
fn damaged_checkpoints_are_refused_or_finite_never_a_panic() {
    let tmp = common::temp_dir("fuzz-ckpt");
    let text = common::training_text(&tmp);
    let mut c = common::tiny_run_config();
    c.set("train.steps=2").unwrap();
    c.set("train.checkpoint_interval=2").unwrap();
    let data = TextData::load(&text, c.train.seq_len + 1).unwrap();
    let mut t = Trainer::create(c, data, &tmp.join("run"), &common::test_device()).unwrap();
    t.run(&AtomicBool::new(false), &mut |_| {}).unwrap();
    let config = t.config.model.clone();
    drop(t);
    let good = RunDir::new(tmp.join("run")).latest_checkpoint().unwrap();
    let files = ["model.safetensors", "optimizer.safetensors", "state.json"];
    let originals: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(good.join(f)).unwrap())
        .collect();
    let mut rng = RoutingRng::seed_from_u64(7);
    let (mut loaded, mut refused) = (0, 0);
    for case in 0..200 {
        let which = rng.random_range(0..files.len());
        let mut bytes = originals[which].clone();
        if rng.random_bool(0.3) {
            bytes.truncate(rng.random_range(0..bytes.len()));
        } else {
            for _ in 0..rng.random_range(1..=4) {
                let at = rng.random_range(0..bytes.len());
                bytes[at] ^= 1 << rng.random_range(0..8);
            }
        }
        std::fs::write(good.join(files[which]), &bytes).unwrap();
        let device = burn::tensor::Device::default().autodiff();
        let outcome = std::panic::catch_unwind(|| {
            checkpoint::load(&good, &config, LabmlAdam::default(), &device)
        });
        match outcome {
            Err(_) => panic!("case {case}: loading a damaged {} panicked", files[which]),
            Ok(Err(_)) => refused += 1,
            Ok(Ok(l)) => {
                // Whatever loads is finite: a flipped exponent bit that made a NaN or an
                // infinity was refused.
                let sd = switch_transformer::interop::weights::model_state_dict(
                    &l.model,
                    switch_transformer::interop::weights::Source::Values,
                );
                for (name, t) in sd {
                    assert!(t.first_non_finite().is_none(), "case {case}: {name}");
                }
                loaded += 1;
            }
        }
        std::fs::write(good.join(files[which]), &originals[which]).unwrap();
    }
    assert!(
        refused > 0 && loaded > 0,
        "{loaded} loaded, {refused} refused"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}
