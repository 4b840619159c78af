//! Data-parallel training: a step on N replicas equals, computed by hand, the mean of the
//! per-shard gradients, clipped and applied by Adam; with global routing it equals one model's
//! step; replicas stay identical; runs resume exactly; bad placements are clear errors.

use crate::common;

use std::sync::atomic::AtomicBool;

use rand::{Rng, RngCore, SeedableRng};
use switch_transformer::RoutingRng;
use switch_transformer::data::{Batch, TextData};
use switch_transformer::interop::weights::{
    Source, StateDict, model_from_state_dict, model_state_dict,
};
use switch_transformer::model::loss::Losses;
use switch_transformer::optim::LabmlAdam;
use switch_transformer::routing::RoutePlace;
use switch_transformer::store::host_f32;
use switch_transformer::train::Trainer;
use switch_transformer::train::placement::{GradSync, Placement};
use switch_transformer::train::replicas::{Replica, Replicas};
use switch_transformer::train::step::{StepSettings, step};

fn values(sd: &StateDict) -> Vec<(String, Vec<f64>)> {
    sd.iter().map(|(k, t)| (k.clone(), t.to_f64())).collect()
}

/// `windows` windows of `seq_len` random tokens below `vocab` (and random targets).
fn random_batch(windows: usize, seq_len: usize, vocab: u32) -> Batch {
    let mut data_rng = RoutingRng::seed_from_u64(11);
    let mut draw = || {
        (0..windows * seq_len)
            .map(|_| data_rng.random_range(0..vocab))
            .collect()
    };
    Batch {
        inputs: draw(),
        targets: draw(),
        batch: windows,
        seq_len,
    }
}

/// Step settings that exercise every loss term and clipping.
fn settings() -> StepSettings {
    StepSettings {
        lb_coef: 0.01,
        z_coef: 0.001,
        balance_scope: Default::default(),
        grad_clip: 0.5,
        lr: 1e-2,
    }
}

#[test]
fn replica_step_is_the_mean_of_shard_gradients_clipped_then_adam() {
    let device = common::test_device().autodiff();
    let mut config = common::tiny_run_config().model;
    config.n_vocab = 20;
    let model = config.init(3, &device).unwrap();
    let start = model_state_dict(&model, Source::Values);
    let first = Replica {
        model,
        adam: LabmlAdam::default(),
        device: device.clone(),
    };
    let placement = Placement::from(&device);
    let devices = placement.devices_for(2).unwrap();
    let mut replicas = Replicas::new(first, &config, &devices, GradSync::Broadcast, false).unwrap();

    // 4 windows of 16 tokens: 2 windows (32 tokens, capacity floor(1.0*32/4) = 8) per replica.
    let (batch, s) = (random_batch(4, 16, 20), settings());
    let mut rng = RoutingRng::seed_from_u64(5);
    let mut seeds = rng.clone();
    let out = step(&mut replicas, &batch, &mut rng, s).unwrap();

    // By hand: each shard on a fresh copy of the starting weights with the seed the step drew.
    let mut mean: Vec<(String, Vec<f64>)> = vec![];
    let (mut ce, mut lb) = (0.0, 0.0);
    for shard in batch.split(2) {
        let m = model_from_state_dict(&config, &start, &device).unwrap();
        let (x, y) = shard.tensors(&device);
        let mut shard_rng = RoutingRng::seed_from_u64(seeds.next_u64());
        let o = m.forward(x, &mut shard_rng);
        let losses = Losses::new(o.logits, y, &o.stats, s.lb_coef, s.z_coef, s.balance_scope);
        ce += host_f32(losses.ce.clone())[0] as f64 / 2.0;
        lb += host_f32(losses.lb.clone())[0] as f64 / 2.0;
        let grads = losses.total.backward();
        let g = values(&model_state_dict(&m, Source::Grads(&grads)));
        if mean.is_empty() {
            mean = g
                .iter()
                .map(|(k, v)| (k.clone(), vec![0.0; v.len()]))
                .collect();
        }
        for ((_, acc), (_, v)) in mean.iter_mut().zip(&g) {
            acc.iter_mut().zip(v).for_each(|(a, b)| *a += b / 2.0);
        }
    }
    assert!((out.ce - ce).abs() < 1e-6 && (out.lb - lb).abs() < 1e-6);
    let norm = mean
        .iter()
        .flat_map(|(_, v)| v)
        .map(|g| g * g)
        .sum::<f64>()
        .sqrt();
    assert!(
        (out.grad_norm - norm).abs() < 1e-5 * norm,
        "norm {} vs {norm}",
        out.grad_norm
    );
    assert!(norm > s.grad_clip, "the test should exercise clipping");
    let coef = s.grad_clip / (norm + 1e-6);
    // Adam's first step: m = (1-b1) g, v = (1-b2) g^2, step = lr sqrt(1-b2) / (1-b1).
    let (b1, b2, eps) = (0.9, 0.999, 1e-8);
    let step = s.lr * (1.0f64 - b2).sqrt() / (1.0 - b1);
    let start = values(&start);
    for r in replicas.replicas.iter() {
        let after = values(&model_state_dict(&r.model, Source::Values));
        for (((name, before), (_, g)), (_, got)) in start.iter().zip(&mean).zip(&after) {
            let want: Vec<f64> = before
                .iter()
                .zip(g)
                .map(|(p, g)| {
                    let g = g * coef;
                    p - step * ((1.0 - b1) * g) / (((1.0 - b2) * g * g).sqrt() + eps)
                })
                .collect();
            let err = common::max_rel_err(got, &want);
            assert!(err < 1e-5, "{name}: relative error {err}");
        }
    }
    // The replicas are bit-identical.
    let a = model_state_dict(&replicas.replicas[0].model, Source::Values);
    let b = model_state_dict(&replicas.replicas[1].model, Source::Values);
    assert_eq!(values(&a), values(&b));
}

#[test]
fn replicas_routing_together_take_the_step_of_one_model() {
    let device = common::test_device().autodiff();
    let mut config = common::tiny_run_config().model;
    config.n_vocab = 20;
    config.capacity_factor = 0.8; // drops in every layer
    // A routing group decides on the host; one model compared with it must too (on GPU
    // devices it would otherwise route on the device, which draws other random drops).
    config.route_on = RoutePlace::Host;
    let start = model_state_dict(&config.init(3, &device).unwrap(), Source::Values);
    let replicas = |n: usize| {
        let first = Replica {
            model: model_from_state_dict(&config, &start, &device).unwrap(),
            adam: LabmlAdam::default(),
            device: device.clone(),
        };
        let devices = Placement::from(&device).devices_for(n).unwrap();
        Replicas::new(first, &config, &devices, GradSync::Broadcast, true).unwrap()
    };
    let (batch, s) = (random_batch(8, 16, 20), settings());
    let mut one_rng = RoutingRng::seed_from_u64(5);
    let mut one = replicas(1);
    let want = step(&mut one, &batch, &mut one_rng, s).unwrap();
    let want_weights = values(&model_state_dict(&one.first().model, Source::Values));
    assert!(want.layers.iter().all(|l| l.dropped_frac > 0.0));
    for n in [2, 4] {
        let mut rng = RoutingRng::seed_from_u64(5);
        let mut group = replicas(n);
        let got = step(&mut group, &batch, &mut rng, s).unwrap();
        // The same routing decisions, from the same draws of the run's generator.
        for (g, w) in got.layers.iter().zip(&want.layers) {
            assert_eq!(
                g.expert_frac, w.expert_frac,
                "{n} shards routed differently"
            );
            assert_eq!(
                g.dropped_frac, w.dropped_frac,
                "{n} shards dropped differently"
            );
            assert!((g.mean_top_prob - w.mean_top_prob).abs() < 1e-6);
        }
        assert_eq!(
            rng, one_rng,
            "{n} shards drew differently from the generator"
        );
        for (a, b) in [(got.ce, want.ce), (got.lb, want.lb), (got.z, want.z)] {
            assert!(
                (a - b).abs() < 1e-6 * b.abs(),
                "{n} shards: loss {a} vs {b}"
            );
        }
        let rel = (got.grad_norm - want.grad_norm).abs() / want.grad_norm;
        assert!(rel < 1e-5, "{n} shards: gradient norm {rel}");
        // Adam's first step is +-step * g / (|g| + eps'), sensitive to summation order only in
        // gradients near eps: updates agree to 1% of the step (a wrong gradient scale shows in
        // the norm above, a wrong routing everywhere).
        let step = s.lr * (1.0f64 - 0.999).sqrt() / (1.0 - 0.9);
        for r in &group.replicas {
            let w = values(&model_state_dict(&r.model, Source::Values));
            for ((name, a), (_, b)) in w.iter().zip(&want_weights) {
                let err = a
                    .iter()
                    .zip(b)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                assert!(err < 1e-2 * step, "{n} shards: {name} differs by {err}");
            }
        }
    }
}

#[test]
fn data_parallel_run_resumes_exactly_with_identical_replicas() {
    for global in [false, true] {
        resumes_exactly(global);
    }
}

fn resumes_exactly(global_routing: bool) {
    let tmp = common::temp_dir("parallel");
    let text = common::training_text(&tmp);
    let device = common::test_device();
    let load = || TextData::load(&text, 17).unwrap();
    let config = || {
        let mut c = common::tiny_run_config();
        c.set("train.replicas=2").unwrap();
        c.train.global_routing = global_routing;
        c.model.route_on = RoutePlace::Host; // as the routing group (matters on GPU devices)
        c
    };
    let losses = |run: &std::path::Path| -> Vec<(String, Vec<f64>)> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("train_loss") || l.contains("valid_loss"))
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let loss = v["train_loss"].as_f64().or(v["valid_loss"].as_f64());
                (format!("step {}", v["step"]), vec![loss.unwrap()])
            })
            .collect()
    };

    let straight = tmp.join("straight");
    let mut t = Trainer::create(config(), load(), &straight, &device).unwrap();
    assert_eq!(t.replicas().len(), 2);
    t.run(&AtomicBool::new(false), &mut |_| {}).unwrap();
    let dicts: Vec<_> = t
        .replicas()
        .iter()
        .map(|r| values(&model_state_dict(&r.model, Source::Values)))
        .collect();
    common::assert_same_run(&dicts[0], &dicts[1], "replicas drifted apart");

    let split = tmp.join("split");
    common::run_until_step(
        &mut Trainer::create(config(), load(), &split, &device).unwrap(),
        3,
    );
    let mut resumed = Trainer::resume(&split, load(), &device).unwrap();
    assert_eq!((resumed.step, resumed.replicas().len()), (3, 2));
    resumed.run(&AtomicBool::new(false), &mut |_| {}).unwrap();
    assert_eq!(losses(&straight).len(), 10);
    common::assert_same_run(&losses(&straight), &losses(&split), "resumed run differs");

    // Routing per replica is a different computation from one model (routing over the whole
    // batch); routing together is the same one, up to summation order.
    let single = tmp.join("single");
    let mut one_model = common::tiny_run_config();
    one_model.model.route_on = RoutePlace::Host;
    Trainer::create(one_model, load(), &single, &device)
        .unwrap()
        .run(&AtomicBool::new(false), &mut |_| {})
        .unwrap();
    let (single, straight) = (losses(&single), losses(&straight));
    let worst = single
        .iter()
        .zip(&straight)
        .map(|((_, a), (_, b))| ((a[0] - b[0]) / a[0]).abs())
        .fold(0.0, f64::max);
    eprintln!("global routing {global_routing}: worst loss difference to one model {worst:e}");
    if global_routing {
        assert!(
            worst < 1e-4,
            "routing together differs from one model by {worst}"
        );
    } else {
        assert!(
            worst > 1e-3,
            "routing per replica should differ from one model"
        );
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn bad_placements_are_clear_errors() {
    let device = common::test_device();
    let mut c = common::tiny_run_config();
    c.set("train.replicas=3").unwrap();
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("multiple of train.replicas"), "{e}");

    let three = Placement {
        devices: vec![device.clone(); 3],
        grad_sync: GradSync::Broadcast,
        world: None,
    };
    let e = three.devices_for(2).unwrap_err().to_string();
    assert!(e.contains("3 devices") && e.contains("replicas = 2"), "{e}");
    assert_eq!(three.devices_for(3).unwrap().len(), 3);

    // --devices and --grad-sync: src/cli/mod.rs's tests.
}
