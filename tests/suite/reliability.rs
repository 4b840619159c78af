//! A run you can trust: a diverging run stops (or skips steps, as configured) before anything
//! non-finite is written, and non-finite weights never load.

use crate::common;

use std::sync::atomic::AtomicBool;

use switch_transformer::data::TextData;
use switch_transformer::interop::weights::load_model;
use switch_transformer::store::TensorFile;
use switch_transformer::train::{Event, RunDir, Trainer};

/// A tiny run on `name` with these overrides.
fn trainer(tmp: &std::path::Path, name: &str, overrides: &[&str]) -> Trainer {
    let text = common::training_text(tmp);
    let mut c = common::tiny_run_config();
    for o in overrides {
        c.set(o).unwrap();
    }
    let data = TextData::load(&text, c.train.seq_len + 1).unwrap();
    Trainer::create(c, data, &tmp.join(name), &common::test_device()).unwrap()
}

/// Every checkpoint of the run loads (so none holds a non-finite weight), and every metrics
/// line parses.
fn assert_nothing_non_finite_written(run: &std::path::Path, trainer: &Trainer) {
    let dir = RunDir::new(run);
    for (_, ckpt) in dir.checkpoint_list() {
        load_model(
            &ckpt.join("model.safetensors"),
            &trainer.config.model,
            &common::test_device(),
        )
        .unwrap();
    }
    dir.read_metrics().unwrap();
}

#[test]
fn a_diverging_run_stops_before_writing_anything_non_finite() {
    let tmp = common::temp_dir("diverge");
    let mut t = trainer(&tmp, "run", &["train.lr=1e30", "train.warmup=1"]);
    let mut steps = 0;
    let err = t
        .run(&AtomicBool::new(false), &mut |e| {
            if let Event::Step(_) = e {
                steps += 1
            }
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("not finite") && err.contains("step "), "{err}");
    assert!(err.contains("train.skip_nonfinite"), "{err}");
    assert!(steps < 8, "the run went on to the end ({steps} steps)");
    assert_nothing_non_finite_written(&tmp.join("run"), &t);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn skipped_steps_leave_the_weights_alone_until_validation_shows_divergence() {
    let tmp = common::temp_dir("diverge-skip");
    let overrides = [
        "train.lr=1e30",
        "train.warmup=1",
        "train.skip_nonfinite=100",
        "train.steps=5",
        "train.eval_interval=100",
        "train.checkpoint_interval=100",
    ];
    let mut t = trainer(&tmp, "run", &overrides);
    let mut skipped = vec![];
    let err = t
        .run(&AtomicBool::new(false), &mut |e| {
            if let Event::Skipped(m) = e {
                assert!(!m.updated);
                skipped.push(m.step)
            }
        })
        .unwrap_err()
        .to_string();
    assert!(!skipped.is_empty(), "no step was skipped");
    assert_eq!(*skipped.last().unwrap(), 5, "skipped {skipped:?}");
    // The last step's validation sees the diverged (finite but huge) weights.
    assert!(err.contains("validation loss is not finite"), "{err}");
    assert!(RunDir::new(tmp.join("run")).checkpoint_list().is_empty());
    assert_nothing_non_finite_written(&tmp.join("run"), &t);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn non_finite_weights_do_not_load() {
    let tmp = common::temp_dir("nan-weights");
    let mut t = trainer(&tmp, "run", &["train.steps=4"]);
    t.run(&AtomicBool::new(false), &mut |_| {}).unwrap();
    let ckpt = RunDir::new(tmp.join("run")).latest_checkpoint().unwrap();
    let path = ckpt.join("model.safetensors");
    let mut file = TensorFile::read(&path).unwrap();
    let w = file.tensors.get_mut("generator.bias").unwrap();
    let mut v = w.to_f32();
    v[3] = f32::NAN;
    *w = switch_transformer::store::HostTensor::f32(w.shape.clone(), v);
    file.write(&path).unwrap();
    let err = load_model(&path, &t.config.model, &common::test_device()).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("generator.bias") && err.contains("non-finite"),
        "{err}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}
