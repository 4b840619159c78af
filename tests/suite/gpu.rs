//! A GPU process as a user meets it (`SWITCH_TEST_DEVICE=wgpu` on lavapipe in CI; on the CPU
//! only what must not happen there): the first process on a device says that kernels are tuned
//! and where they are kept, a later one finds them there; results printed before the process
//! ends without the GPU libraries' teardown (`exit_now`) still arrive whole.

use std::path::Path;
use std::process::{Command, Output};

use crate::common;

fn switch(args: &[&str], cwd: &Path, cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switch"))
        .args(args)
        .current_dir(cwd)
        .env("SWITCH_CACHE_DIR", cache)
        .env_remove("RUST_LOG")
        .output()
        .expect("run the switch binary")
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn the_kernel_cache_persists_between_processes() {
    let device = std::env::var("SWITCH_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let tmp = common::temp_dir("gpu-cache");
    let cache = tmp.join("kernels");
    let args = [
        "--device",
        &device,
        "bench",
        "--json",
        "--routing",
        "256,2048",
        "--steps",
        "2",
    ];
    let first = switch(&args, &tmp, &cache);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    assert_eq!(json_lines(&first).len(), 2, "every result line arrives");
    let note = "autotuned on first use";
    if device == "cpu" {
        // The CPU backend compiles nothing: no note, no cache.
        assert!(!stderr.contains(note), "{stderr}");
        assert!(!cache.exists());
        std::fs::remove_dir_all(&tmp).unwrap();
        return;
    }
    assert!(
        stderr.contains(note) && stderr.contains(&*cache.to_string_lossy()),
        "the first process names the cache: {stderr}"
    );
    let entries = std::fs::read_dir(&cache).map_or(0, |d| d.count());
    assert!(entries > 0, "nothing written to {}", cache.display());
    let second = switch(&args, &tmp, &cache);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    assert!(!stderr.contains(note), "the cache was found: {stderr}");
    assert_eq!(json_lines(&second).len(), 2);
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `switch finetune` on the test device (`SWITCH_TEST_DEVICE`) ends where the CPU's ends: the
/// same metric lines within 1e-4 relative and every weight of the written model within 1e-4 of
/// its largest magnitude, after 3 updates of 2 micro-batches with dropout and jitter on (their
/// masks are drawn on the host, the same on every device) and a validation (its loss: the
/// generations on the device are `hf::every_hugging_face_fixture_passes`'s). AdamW's moments
/// stay on the device there.
#[test]
fn fine_tuning_on_the_device_ends_where_the_cpu_ends() {
    use switch_transformer::hf::HfSwitchTransformer;
    use switch_transformer::hf::finetune::config::FinetuneConfig;
    use switch_transformer::hf::finetune::parity::micro_batches;
    use switch_transformer::hf::finetune::run::finetune;
    use switch_transformer::hf::finetune::{Finetuner, Optimisation};
    use switch_transformer::model::precision::Precision;
    use switch_transformer::optim::{AdamWConfig, LinearSchedule};
    use switch_transformer::store::TensorFile;

    let tmp = common::temp_dir("gpu-finetune");
    let (train, valid) = (tmp.join("train.jsonl"), tmp.join("valid.jsonl"));
    crate::finetune::pairs(&train, 16, 11);
    crate::finetune::pairs(&valid, 4, 12);
    let mut config = FinetuneConfig::default();
    for s in crate::finetune::PARALLEL_SETTINGS.iter().chain(&[
        "max_steps=3",
        "eval_every=0",
        "save_every=0",
        "eval_generate=0",
    ]) {
        config.set(s).unwrap();
    }
    let run = |name: &str, device: &burn::tensor::Device| {
        let args = crate::finetune::new_run(&train, &valid, tmp.join(name), &config);
        finetune(args, device, &mut |_| {}).unwrap();
        tmp.join(name)
    };
    let cpu = run("cpu", &burn::tensor::Device::default());
    let dev = run("device", &common::test_device());
    let (a, b) = (
        crate::finetune::metric_lines(&cpu),
        crate::finetune::metric_lines(&dev),
    );
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for key in ["loss", "ce", "grad_norm", "valid_loss"] {
            if let (Some(p), Some(q)) = (x[key].as_f64(), y[key].as_f64()) {
                let err = (p - q).abs() / p.abs().max(1e-12);
                assert!(err < 1e-4, "{key} at {}: {p} vs {q}", x["step"]);
            }
        }
    }
    // AdamW's moments live where the parameters do: host buffers on the CPU (the fused
    // pass), device tensors elsewhere (the tensor-op update, no host round trip).
    let fixture = common::manifest_dir().join("tests/data/hf-finetune/step2");
    let batches =
        micro_batches(&TensorFile::read(&fixture.join("expected.safetensors")).unwrap()).unwrap();
    let device = common::test_device();
    let model = HfSwitchTransformer::load(&fixture, &device).unwrap();
    let opt = Optimisation {
        learning_rate: 1e-3,
        adamw: AdamWConfig::default(),
        schedule: LinearSchedule {
            warmup: 0,
            total: 10,
        },
        max_grad_norm: 1.0,
        dropout: 0.0,
        jitter: 0.0,
        precision: Precision::F32,
    };
    let mut ft = Finetuner::new(model.clone(), &device, opt, 0).unwrap();
    ft.update(&batches[..1]).unwrap();
    // bf16 compute where the device has bf16 (wgpu has none: refused, saying so).
    let bf16 = Optimisation {
        precision: Precision::Bf16,
        ..opt
    };
    let has_bf16 = device.supports_dtype(burn::tensor::FloatDType::BF16);
    match Finetuner::new(model, &device, bf16, 0) {
        Ok(_) => assert!(has_bf16, "bf16 accepted on a device without it"),
        Err(e) => assert!(
            !has_bf16 && e.to_string().contains("does not support"),
            "{e}"
        ),
    }
    let on_cpu = std::env::var("SWITCH_TEST_DEVICE").map_or(true, |d| d == "cpu");
    // (A parameter without a gradient, an expert no token reached, has no state yet.)
    let updated: Vec<_> = ft.adamw.state.iter().filter(|s| s.step == 1).collect();
    assert!(updated.len() > 10);
    for s in updated {
        assert_eq!(s.device.is_some(), !on_cpu);
        assert_eq!(s.m.is_empty(), !on_cpu);
    }

    let read = |dir: &Path| TensorFile::read(&dir.join("model/model.safetensors")).unwrap();
    let (wa, wb) = (read(&cpu), read(&dev));
    assert_eq!(wa.tensors.len(), wb.tensors.len());
    for (name, t) in &wa.tensors {
        let err = common::max_rel_err_f32(&wb.get(name).unwrap().to_f32(), &t.to_f32());
        assert!(err < 1e-4, "{name} differs by {err}");
    }
}
