//! Training end to end on a tiny configuration: the run directory, metrics, checkpoints, and
//! exact resumption.

use crate::common;

use std::sync::atomic::AtomicBool;

use burn::tensor::Device;
use serde_json::Value;
use switch_transformer::data::TextData;
use switch_transformer::train::{Event, Finish, Trainer};

fn metrics(dir: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn train_losses(lines: &[Value]) -> Vec<(u64, f64)> {
    lines
        .iter()
        .filter(|l| l.get("train_loss").is_some())
        .map(|l| {
            (
                l["step"].as_u64().unwrap(),
                l["train_loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn smoke_run_writes_metrics_and_checkpoints() {
    let tmp = common::temp_dir("smoke");
    let text = common::training_text(&tmp);
    let c = common::tiny_run_config();
    let data = TextData::load(&text, c.train.seq_len + 1).unwrap();
    let run = tmp.join("run");
    let mut t = Trainer::create(c, data, &run, &common::test_device()).unwrap();
    let mut validations = 0;
    let finish = t
        .run(&AtomicBool::new(false), &mut |e| {
            if let Event::Validation { .. } = e {
                validations += 1
            }
        })
        .unwrap();
    assert_eq!(finish, Finish::Completed);
    assert_eq!(validations, 2);
    let lines = metrics(&run);
    let train: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("train_loss").is_some())
        .collect();
    let valid: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("valid_loss").is_some())
        .collect();
    assert_eq!(train.len(), 8);
    assert_eq!(valid.len(), 2);
    for l in &train {
        for k in ["step", "train_loss", "lr", "tokens_per_s"] {
            assert!(l[k].is_number(), "training line lacks {k}: {l}");
        }
    }
    for l in &valid {
        for k in [
            "step",
            "valid_loss",
            "valid_accuracy",
            "lb_loss",
            "dropped_frac",
        ] {
            assert!(l[k].is_number(), "validation line lacks {k}: {l}");
        }
        assert_eq!(l["layers"].as_array().unwrap().len(), 2);
        assert!(l["sample"].as_str().unwrap().starts_with("It is"));
    }
    // Loss is finite and starts near ln(vocab).
    let first = train[0]["train_loss"].as_f64().unwrap();
    assert!(first.is_finite() && first > 1.0 && first < 6.0, "{first}");
    // Checkpoints: step 4 and 8 (keep 2), and best.
    let steps: Vec<u64> = switch_transformer::train::checkpoint::list(&run.join("checkpoints"))
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, [4, 8]);
    for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        assert!(run.join("best").join(f).is_file(), "best/{f}");
    }
    assert!(run.join("config.toml").is_file() && run.join("vocab.json").is_file());
    // A second run cannot overwrite this one.
    let data = TextData::load(&text, 17).unwrap();
    let err = Trainer::create(common::tiny_run_config(), data, &run, &Device::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("already holds a run"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn interrupted_and_resumed_run_equals_uninterrupted_run() {
    let tmp = common::temp_dir("resume");
    let text = common::training_text(&tmp);
    let device = common::test_device();
    let load = || TextData::load(&text, 17).unwrap();

    let straight = tmp.join("straight");
    Trainer::create(common::tiny_run_config(), load(), &straight, &device)
        .unwrap()
        .run(&AtomicBool::new(false), &mut |_| {})
        .unwrap();

    // Stop after step 3 (as Ctrl-C does): a checkpoint at step 3, then resume.
    let split = tmp.join("split");
    let finish = common::run_until_step(
        &mut Trainer::create(common::tiny_run_config(), load(), &split, &device).unwrap(),
        3,
    );
    assert_eq!(finish, Finish::Interrupted);
    let mut resumed = Trainer::resume(&split, load(), &device).unwrap();
    assert_eq!(resumed.step, 3);
    resumed.run(&AtomicBool::new(false), &mut |_| {}).unwrap();

    let named = |v: Vec<(u64, f64)>| -> Vec<(String, Vec<f64>)> {
        v.into_iter()
            .map(|(s, l)| (format!("step {s}"), vec![l]))
            .collect()
    };
    let a = train_losses(&metrics(&straight));
    let b = train_losses(&metrics(&split));
    assert_eq!(a.len(), 8);
    common::assert_same_run(
        &named(a),
        &named(b),
        "losses after resuming differ from the uninterrupted run",
    );
    let valid = |lines: Vec<Value>| -> Vec<(u64, f64)> {
        lines
            .iter()
            .filter_map(|l| Some((l["step"].as_u64()?, l["valid_loss"].as_f64()?)))
            .collect()
    };
    common::assert_same_run(
        &named(valid(metrics(&straight))),
        &named(valid(metrics(&split))),
        "validation after resuming differs",
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `switch bench --json` of a 2-layer model on `device`, run in `dir`.
fn bench_in(dir: &std::path::Path, device: &str) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switch"))
        .current_dir(dir)
        .args(["bench", "--json", "--device", device, "--steps", "3"])
        .args(["--layers", "2", "--experts", "4"])
        .args(common::TINY_BENCH_ARGS)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// One model's training step on a GPU backend reads the device once (losses, routing
/// statistics and the gradient norm together) and syncs nowhere else, and its kernel launches
/// are counted; on the CPU backend nothing waits. Measured by `switch bench` in a process of
/// its own (the counters are the process's). On a GPU, the project's fusion planner setting
/// (`device::FUSION_SETTINGS`) is in effect: a run in a directory whose `burn.toml` asks for
/// Burn's default planner (which the project then leaves alone) launches more kernels.
#[test]
fn one_model_step_syncs_with_the_host_once() {
    let device = std::env::var("SWITCH_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let r = bench_in(std::path::Path::new(env!("CARGO_MANIFEST_DIR")), &device);
    let (syncs, launches) = (&r["syncs_per_step"], &r["launches_per_step"]);
    if device == "cpu" {
        // Host memory: nothing to wait for, no cubecl kernels.
        assert_eq!(syncs["total"], 0.0, "{syncs}");
        assert_eq!(launches["total"], 0.0, "{launches}");
    } else {
        assert_eq!(syncs["total"], 1.0, "{syncs}");
        assert_eq!(syncs["optimizer"], 1.0, "the read before the clip: {syncs}");
        let ours = launches["total"].as_f64().unwrap();
        assert!(ours > 0.0, "{launches}");
        let dir = common::temp_dir("burn-toml");
        std::fs::write(
            dir.join("burn.toml"),
            "[fusion.beam_search]\nmax_blocks = 5\n",
        )
        .unwrap();
        let theirs = bench_in(&dir, &device)["launches_per_step"]["total"]
            .as_f64()
            .unwrap();
        assert!(
            ours < theirs,
            "launches per step: {ours} with the project's fusion settings, {theirs} with Burn's"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Sparse upcycling: a dense run's checkpoint becomes a Switch run whose experts are copies of
/// the dense FFNs (weights and Adam moments) and whose router is fresh. With dropping off its
/// logits are the dense model's; `Trainer::resume` continues it from the dense run's step, and
/// its metrics begin with the dense run's. Bad requests are refused before anything is written.
#[test]
fn an_upcycled_dense_run_computes_the_dense_model_and_trains_on() {
    use burn::tensor::{Int, Tensor, TensorData};
    use rand::SeedableRng;
    use switch_transformer::optim::LabmlAdam;
    use switch_transformer::routing::RoutingRng;
    use switch_transformer::store::{TensorFile, host_f32};
    use switch_transformer::train::checkpoint;
    use switch_transformer::train::upcycle::{switch_config, upcycle};
    use switch_transformer::train::{RunConfig, RunDir};

    let tmp = common::temp_dir("upcycle");
    let text = common::training_text(&tmp);
    let device = common::test_device();
    let load = || TextData::load(&text, 17).unwrap();
    let mut dense = common::tiny_run_config();
    dense.set("model.switch_every=0").unwrap();
    dense.set("train.steps=4").unwrap();
    let dense_dir = tmp.join("dense");
    Trainer::create(dense.clone(), load(), &dense_dir, &device)
        .unwrap()
        .run(&AtomicBool::new(false), &mut |_| {})
        .unwrap();
    let dense = RunDir::new(&dense_dir).read_config().unwrap();

    let config = switch_config(&dense, 4, 1, &["model.drop_tokens=false".into()]).unwrap();
    let up = tmp.join("up");
    let made = upcycle(&dense_dir, &up, &config, 7, &device).unwrap();
    assert_eq!(made.step, 4);
    assert_eq!(
        made.fresh.len(),
        4,
        "two routers' weight and bias: {:?}",
        made.fresh
    );
    assert!(made.params.1 > made.params.0);

    let loaded = |dir: &std::path::Path| {
        let c = RunDir::new(dir).read_config().unwrap();
        let ckpt = RunDir::new(dir).latest_checkpoint().unwrap();
        let l = checkpoint::load(
            &ckpt,
            &c.model,
            LabmlAdam::default(),
            &device.clone().autodiff(),
        )
        .unwrap();
        (l, ckpt)
    };
    let ((d, d_ckpt), (u, u_ckpt)) = (loaded(&dense_dir), loaded(&up));
    assert_eq!(u.state.step, d.state.step);
    let ids = Tensor::<2, Int>::from_data(
        TensorData::new((0..32).map(|i| (i * 7 % 40) as i64).collect(), [2, 16]),
        &device,
    );
    let logits = |m: &switch_transformer::SwitchTransformer| {
        host_f32(
            m.forward(ids.clone(), &mut RoutingRng::seed_from_u64(0))
                .logits
                .reshape([-1]),
        )
    };
    let (a, b) = (logits(&d.model), logits(&u.model));
    let err = common::max_rel_err_f32(&b, &a);
    assert!(err < 1e-5, "upcycled logits differ by {err}");
    // Each expert starts with its block's dense FFN's Adam moments; the router with none.
    let (dopt, uopt) = (
        TensorFile::read(&d_ckpt.join("optimizer.safetensors")).unwrap(),
        TensorFile::read(&u_ckpt.join("optimizer.safetensors")).unwrap(),
    );
    let dense_m = dopt
        .get("m.layers.1.feed_forward.Dense.layer1.weight")
        .unwrap()
        .to_f32();
    let expert_m = uopt
        .get("m.layers.1.feed_forward.Switch.experts.w1")
        .unwrap()
        .to_f32();
    assert_eq!(expert_m, dense_m.repeat(4));
    let router = uopt
        .get("v.layers.0.feed_forward.Switch.router.switch.weight")
        .unwrap();
    assert!(router.to_f32().iter().all(|&v| v == 0.0));

    // It trains on from step 4, after the dense run's metrics.
    let mut t = Trainer::resume(&up, load(), &device).unwrap();
    assert_eq!(t.step, 4);
    t.config.train.steps = 8;
    assert_eq!(
        t.run(&AtomicBool::new(false), &mut |_| {}).unwrap(),
        Finish::Completed
    );
    let lines = train_losses(&metrics(&up));
    assert_eq!(lines.len(), 8);
    assert_eq!(lines[..4], train_losses(&metrics(&dense_dir))[..]);
    assert!(lines.iter().all(|(_, l)| l.is_finite()));

    // Refused: a Switch run, an existing folder, experts of another width.
    let switch_run = RunConfig::from_toml_file(&up.join("config.toml")).unwrap();
    let e = switch_config(&switch_run, 4, 1, &[]).unwrap_err();
    assert!(e.to_string().contains("not dense"), "{e}");
    let e = upcycle(&dense_dir, &up, &config, 7, &device).unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");
    let e = switch_config(&dense, 4, 1, &["model.expert_d_ff=16".into()]).unwrap_err();
    assert!(e.to_string().contains("copy of the dense FFN"), "{e}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// The step's work runs on a worker of the thread pool on the CPU only; on other backends on
/// the calling thread, whose fusion stream then holds every op of the run (work that hopped
/// between threads raced between streams on lavapipe: see `cpu::on_worker`).
#[test]
fn step_work_hops_to_the_pool_on_the_cpu_only() {
    let device = common::test_device();
    let caller = std::thread::current().id();
    let (thread, worker) = switch_transformer::cpu::on_worker(&device, || {
        (std::thread::current().id(), rayon::current_thread_index())
    });
    if switch_transformer::device::Paths::of(&device).host_kernels {
        assert!(worker.is_some(), "the CPU's work did not reach the pool");
    } else {
        assert_eq!(
            thread, caller,
            "a GPU backend's work left the calling thread"
        );
        assert!(worker.is_none());
    }
}
