//! Hugging Face Switch Transformers checkpoints: parity with transformers 5.24.0 on the
//! fixtures in tests/data/hf (made by tools/hf_fixtures.py), loading errors, saving, the
//! tokenizer, generation with and without the cache, routing, and the commands.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use rand::SeedableRng;
use switch_transformer::RoutingRng;
use switch_transformer::device::Paths;
use switch_transformer::hf::checkpoint::SaveDtype;
use switch_transformer::hf::generate::{generate, greedy};
use switch_transformer::hf::routes::route_text;
use switch_transformer::hf::sparse::Grouping;
use switch_transformer::hf::tokenize::HfTokenizer;
use switch_transformer::hf::{HfSwitchTransformer, parity};
use switch_transformer::infer::generate::SampleOptions;
use switch_transformer::store::{HostTensor, TensorFile, host_f32};

use crate::common;

fn hf_dir(name: &str) -> PathBuf {
    common::manifest_dir().join("tests/data/hf").join(name)
}

fn fixtures() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(common::manifest_dir().join("tests/data/hf"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| parity::is_fixture(p))
        .collect();
    dirs.sort();
    dirs
}

/// A copy of fixture `name` in a fresh temporary directory named after `tag`.
fn copy_fixture(name: &str, tag: &str) -> PathBuf {
    let dst = common::temp_dir(&format!("hf-{tag}"));
    for e in std::fs::read_dir(hf_dir(name)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    dst
}

fn switch(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switch"))
        .args(args)
        .output()
        .unwrap()
}

/// `switch args`, which must succeed; its standard output.
fn switch_ok(args: &[&str]) -> String {
    let out = switch(args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "switch {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn every_hugging_face_fixture_passes() {
    let dirs = fixtures();
    assert!(
        dirs.len() >= 3,
        "expected the 3 committed fixtures, found {dirs:?}"
    );
    let device = common::test_device();
    for dir in dirs {
        let before = switch_transformer::cpu::runs();
        let report =
            parity::run(&dir, &device).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
        // On the CPU the few-row products (every decoding step) took the streaming kernel, on
        // the instruction set chosen for this machine.
        if Paths::of(&device).host_kernels {
            let after = switch_transformer::cpu::runs();
            assert!(
                after.thin_matmul > before.thin_matmul,
                "thin_matmul never ran"
            );
            assert_eq!(
                after.thin_matmul_isa,
                Some(switch_transformer::cpu::Isa::selected())
            );
        }
        println!("== {}\n{report}", dir.display());
        assert!(report.passed(), "{} failed:\n{report}", dir.display());
        let names: Vec<&str> = report.rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "encoder_last_hidden_state",
                "logits",
                "generated_ids (cache)",
                "generated_ids (no cache)"
            ]
        );
    }
}

/// The fixtures exercise what they claim: tokens dropped, padded rows, several sparse layers.
#[test]
fn the_fixtures_drop_tokens_and_pad_rows() {
    for dir in fixtures() {
        let f = TensorFile::read(&dir.join("expected.safetensors")).unwrap();
        let meta = f.meta_json().unwrap();
        assert_eq!(meta["transformers"], "5.24.0");
        let drops: Vec<u64> = meta["dropped_per_sparse_layer"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert!(
            drops.len() >= 3 && drops.iter().sum::<u64>() > 0,
            "{drops:?}"
        );
        let mask = f.get("attention_mask").unwrap().to_i64();
        assert!(mask.contains(&0), "{}: no padded row", dir.display());
        // And our routing drops tokens on the same input.
        let model = HfSwitchTransformer::load(&dir, &common::test_device()).unwrap();
        let [b, s] = [
            f.get("input_ids").unwrap().shape[0],
            f.get("input_ids").unwrap().shape[1],
        ];
        let enc = model
            .encode(&f.get("input_ids").unwrap().to_i64(), &mask, b, s)
            .unwrap();
        let dropped: usize = enc.routes.iter().map(|r| r.plan.n_dropped()).sum();
        assert!(dropped > 0);
        for r in &enc.routes {
            // Capacity holds per sequence.
            for row in 0..b {
                let mut kept = vec![0; r.plan.n_experts];
                for t in row * s..(row + 1) * s {
                    if !r.plan.dropped[t] {
                        kept[r.plan.routes[t]] += 1;
                    }
                }
                assert!(kept.iter().all(|&k| k <= model.config.expert_capacity));
            }
        }
    }
}

/// Tampered recordings fail, naming the row: the checks can fail.
#[test]
fn a_wrong_recording_fails() {
    let dir = copy_fixture("tiny", "wrong-recording");
    let path = dir.join("expected.safetensors");
    let mut f = TensorFile::read(&path).unwrap();
    let t = f.tensors.get_mut("logits").unwrap();
    let mut v = t.to_f32();
    v[5] += 1e-2;
    *t = HostTensor::f32(t.shape.clone(), v);
    let t = f.tensors.get_mut("generated_ids").unwrap();
    let mut ids = t.to_i64();
    ids[4] = (ids[4] + 1) % 50;
    *t = HostTensor::i64(t.shape.clone(), ids);
    f.write(&path).unwrap();
    let report = parity::run(&dir, &burn::tensor::Device::default()).unwrap();
    let bad: Vec<&str> = report
        .rows
        .iter()
        .filter(|r| !r.pass)
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(
        bad,
        [
            "logits",
            "generated_ids (cache)",
            "generated_ids (no cache)"
        ]
    );
}

fn load_err(dir: &Path) -> String {
    format!(
        "{:#}",
        HfSwitchTransformer::load(dir, &burn::tensor::Device::default()).unwrap_err()
    )
}

#[test]
fn a_checkpoint_that_does_not_match_its_config_is_named() {
    // A config with another d_ff: the first feed-forward weight is named with both shapes.
    let dir = copy_fixture("tiny", "other-d-ff");
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"d_ff\": 24", "\"d_ff\": 32"),
    )
    .unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("encoder.block.0.layer.1.mlp.wi.weight")
            && err.contains("[24, 16]")
            && err.contains("[32, 16]"),
        "{err}"
    );

    // A missing tensor.
    let dir = copy_fixture("tiny", "missing-tensor");
    let path = dir.join("model.safetensors");
    let mut f = TensorFile::read(&path).unwrap();
    f.tensors
        .remove("decoder.block.2.layer.2.mlp.experts.expert_3.wo.weight");
    f.write(&path).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("no tensor `decoder.block.2.layer.2.mlp.experts.expert_3.wo.weight`"),
        "{err}"
    );

    // A tensor the config does not account for (one more expert).
    let dir = copy_fixture("tiny", "extra-tensor");
    let mut f = TensorFile::read(&path_of(&dir)).unwrap();
    let w = f.tensors["encoder.block.1.layer.1.mlp.experts.expert_0.wi.weight"].clone();
    f.tensors.insert(
        "encoder.block.1.layer.1.mlp.experts.expert_4.wi.weight".into(),
        w,
    );
    f.write(&path_of(&dir)).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("does not account for") && err.contains("expert_4"),
        "{err}"
    );

    // No weights, no config.
    let empty = common::temp_dir("hf-empty");
    assert!(load_err(&empty).contains("config.json"));
    std::fs::copy(
        hf_dir("tiny").join("config.json"),
        empty.join("config.json"),
    )
    .unwrap();
    assert!(load_err(&empty).contains("neither model.safetensors"));
}

/// NaN or infinite weights (a damaged download) are refused where they are read, by name, and a
/// `layer_norm_epsilon` that is not a positive number by its key: not turned into `<pad>`s.
#[test]
fn weights_that_are_not_finite_are_refused_by_name() {
    use switch_transformer::store::HostData;
    for (tag, name, value) in [
        ("nan-embedding", "shared.weight", f32::NAN),
        (
            "inf-router",
            "encoder.block.1.layer.1.mlp.router.classifier.weight",
            f32::INFINITY,
        ),
    ] {
        let dir = copy_fixture("tiny", tag);
        let mut f = TensorFile::read(&path_of(&dir)).unwrap();
        match &mut f.tensors.get_mut(name).expect("in the fixture").data {
            HostData::F32(v) => v[3] = value,
            _ => panic!("{name} is f32 in the fixture"),
        }
        f.write(&path_of(&dir)).unwrap();
        let err = load_err(&dir);
        assert!(err.contains("non-finite") && err.contains(name), "{err}");
        let out = switch(&["seq2seq", "--model", dir.to_str().unwrap(), "--input", "A."]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(name));
    }
    let dir = copy_fixture("tiny", "negative-epsilon");
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["layer_norm_epsilon"] = serde_json::json!(-1.0);
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    assert!(load_err(&dir).contains("layer_norm_epsilon"));
}

/// An input that cannot fit is refused before anything is allocated, with what it needs, instead
/// of a process the kernel kills; so is a `--max-tokens` no memory holds the caches of.
#[test]
fn seq2seq_refuses_what_cannot_fit() {
    let tiny = hf_dir("tiny");
    let tiny = tiny.to_str().unwrap();
    // 800,000 characters on one line (a file: one argument holds at most 128 kB on Linux).
    let file = common::temp_dir("hf-long").join("long.txt");
    std::fs::write(&file, "a b ".repeat(200_000)).unwrap();
    let t0 = std::time::Instant::now();
    let out = switch(&[
        "seq2seq",
        "--model",
        tiny,
        "--input-file",
        file.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("GiB") && stderr.contains("split the input"),
        "{stderr}"
    );
    assert!(t0.elapsed().as_secs() < 30, "refused before the work");
    let out = switch(&[
        "seq2seq",
        "--model",
        tiny,
        "--input",
        "A.",
        "--max-tokens",
        "18446744073709551615",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("GiB"));
    // --bench with an empty batch: a clear error, not a shape message.
    let out = switch(&["seq2seq", "--model", tiny, "--bench", "--batch", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--batch"));
}

/// `convert` writes the new directory whole or not at all: a failure part-way (here the
/// tokenizer cannot be copied, after the weights were written) leaves nothing behind, and the
/// retry succeeds.
#[test]
fn convert_leaves_nothing_half_written() {
    let src = copy_fixture("tiny", "convert-broken-tokenizer");
    let tok = src.join("tokenizer.json");
    let good = std::fs::read(&tok).unwrap();
    std::fs::remove_file(&tok).unwrap();
    std::fs::create_dir(&tok).unwrap(); // a directory where a file is expected: copy fails
    let parent = common::temp_dir("hf-convert-atomic");
    let dst = parent.join("out");
    let args = [
        "convert",
        "--model",
        src.to_str().unwrap(),
        "--out",
        dst.to_str().unwrap(),
    ];
    let out = switch(&args);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing was written"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dst.exists(), "no half-written model");
    let left: Vec<_> = std::fs::read_dir(&parent).unwrap().collect();
    assert!(left.is_empty(), "no partial directory left: {left:?}");
    std::fs::remove_dir(&tok).unwrap();
    std::fs::write(&tok, good).unwrap();
    switch_ok(&args);
    assert!(dst.join("tokenizer.json").is_file() && dst.join("model.safetensors").is_file());
    // And never over a model already there.
    let out = switch(&args);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
}

/// `seq2seq` checks its sampling flags as `sample` does (one definition: `SampleOptions::check`).
#[test]
fn seq2seq_refuses_sampling_flags_that_sample_refuses() {
    let tiny = hf_dir("tiny");
    let tiny = tiny.to_str().unwrap();
    for (flag, value, needle) in [
        ("--temperature", "NaN", "--temperature"),
        ("--temperature=-1", "", "--temperature"),
        ("--temperature", "inf", "--temperature"),
        ("--top-k", "0", "--top-k"),
    ] {
        let mut args = vec!["seq2seq", "--model", tiny, "--input", "A.", flag];
        if !value.is_empty() {
            args.push(value);
        }
        let out = switch(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value}: {stderr}");
        assert!(stderr.contains(needle), "{flag} {value}: {stderr}");
    }
}

fn path_of(dir: &Path) -> PathBuf {
    dir.join("model.safetensors")
}

fn logits_of(model: &HfSwitchTransformer, dir: &Path) -> Vec<f32> {
    let f = TensorFile::read(&dir.join("expected.safetensors")).unwrap();
    let shape = |n: &str| f.get(n).unwrap().shape.clone();
    let (s, t) = (shape("input_ids"), shape("decoder_input_ids"));
    let enc = model
        .encode(
            &f.get("input_ids").unwrap().to_i64(),
            &f.get("attention_mask").unwrap().to_i64(),
            s[0],
            s[1],
        )
        .unwrap();
    let dec = f.get("decoder_input_ids").unwrap().to_i64();
    let (logits, _) = model
        .decode(&dec, t[0], t[1], &enc, None, Grouping::PerSequence)
        .unwrap();
    host_f32(logits)
}

/// Saved and loaded again (f32 from the sharded bf16 checkpoint, then bf16 back): the same
/// model; a saved model is never overwritten.
#[test]
fn saving_round_trips_and_never_overwrites() {
    let device = burn::tensor::Device::default();
    let src = hf_dir("tiny-bf16-sharded");
    let model = HfSwitchTransformer::load(&src, &device).unwrap();
    let want = logits_of(&model, &src);
    let tmp = common::temp_dir("hf-save");
    for (name, dtype) in [("f32", SaveDtype::F32), ("bf16", SaveDtype::Bf16)] {
        let out = tmp.join(name);
        model.save(&out, dtype).unwrap();
        let again = HfSwitchTransformer::load(&out, &device).unwrap();
        // The weights are bf16 values: both precisions hold them exactly.
        assert_eq!(logits_of(&again, &src), want, "{name}");
        let names: BTreeMap<String, HostTensor> = again.tensors().unwrap();
        assert_eq!(
            names.keys().collect::<Vec<_>>(),
            model.tensors().unwrap().keys().collect::<Vec<_>>()
        );
        let err = model.save(&out, dtype).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
    }
    // The untied model saves every embedding transformers saves.
    let keys = model.tensors().unwrap();
    for k in [
        "shared.weight",
        "encoder.embed_tokens.weight",
        "lm_head.weight",
    ] {
        assert!(keys.contains_key(k), "{k}");
    }
}

#[test]
fn the_tokenizer_reads_sentinels_and_pads_batches() {
    let tok = HfTokenizer::load(&hf_dir("tiny"), 0).unwrap();
    let b = tok
        .encode(&["The <extra_id_0> walks.".into(), "A".into()])
        .unwrap();
    assert_eq!(b.batch, 2);
    let row0 = &b.ids[..b.len];
    // <extra_id_0> is the last id (T5's layout), </s> = 1 ends every sequence.
    assert!(row0.contains(&104), "{row0:?}");
    assert_eq!(*row0.last().unwrap(), 1);
    let row1 = &b.ids[b.len..];
    let n1 = b.mask[b.len..].iter().sum::<i64>() as usize;
    assert!(n1 < b.len && row1[n1..].iter().all(|&t| t == 0));
    assert_eq!(row1[n1 - 1], 1);
    assert_eq!(tok.token(104), "<extra_id_0>");
    let text = tok.decode(row0, true).unwrap();
    assert!(text.contains("<extra_id_0>"), "{text}");
    let err = HfTokenizer::load(&common::manifest_dir(), 0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

/// Sampled decoding too: the same seed gives the same tokens with and without the cache.
#[test]
fn sampling_with_the_cache_equals_sampling_without() {
    let dir = hf_dir("tiny-bf16-sharded");
    let model = HfSwitchTransformer::load(&dir, &common::test_device()).unwrap();
    let tok = HfTokenizer::load(&dir, 0).unwrap();
    let b = tok
        .encode(&["A quick brown fox.".into(), "The <extra_id_0> park.".into()])
        .unwrap();
    let enc = model.encode(&b.ids, &b.mask, b.batch, b.len).unwrap();
    let opts = SampleOptions {
        max_tokens: 12,
        temperature: 1.5,
        top_k: Some(20),
        context: usize::MAX,
    };
    let run = |cached| {
        let mut rng = RoutingRng::seed_from_u64(7);
        generate(&model, &enc, &opts, cached, None, &mut rng).unwrap()
    };
    let (a, b2) = (run(true), run(false));
    assert_eq!(a, b2);
    assert_ne!(
        a,
        greedy(&model, &enc, 12, true).unwrap(),
        "sampling drew nothing"
    );
    // Stopping at end of sequence pads what follows it.
    let mut rng = RoutingRng::seed_from_u64(7);
    let stopped = generate(&model, &enc, &opts, true, Some((a[0][3], 0)), &mut rng).unwrap();
    assert_eq!(&stopped[0][..4], &a[0][..4]);
    assert!(stopped[0][4..].iter().all(|&t| t == 0), "{stopped:?}");
}

#[test]
fn routes_count_every_token_and_respect_capacity() {
    let dir = hf_dir("tiny");
    let model = HfSwitchTransformer::load(&dir, &burn::tensor::Device::default()).unwrap();
    let tok = HfTokenizer::load(&dir, 0).unwrap();
    let text = "Each expert takes at most its capacity of tokens.";
    let (layers, _) = route_text(&model, &tok, text, 5).unwrap();
    let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "encoder.block.1",
            "encoder.block.3",
            "decoder.block.0",
            "decoder.block.1",
            "decoder.block.2"
        ]
    );
    for l in &layers {
        assert_eq!(l.load.iter().sum::<usize>(), l.tokens.len());
        for (e, (&n, &d)) in l.load.iter().zip(&l.dropped).enumerate() {
            if l.name.starts_with("encoder") {
                assert_eq!(
                    n - d,
                    n.min(model.config.expert_capacity),
                    "{} e{e}",
                    l.name
                );
            } else {
                assert_eq!(d, 0, "a generated token is never dropped");
            }
        }
    }
    assert!(layers[0].dropped.iter().sum::<usize>() > 0);
}

#[test]
fn the_commands_run_hugging_face_checkpoints() {
    let tiny = hf_dir("tiny");
    let tiny = tiny.to_str().unwrap();
    let labml = common::fixture("model_tiny.safetensors");
    let stdout = switch_ok(&["parity", tiny, labml.to_str().unwrap()]);
    assert!(stdout.contains("parity: PASS (2 fixtures)"), "{stdout}");

    let not_fixture = common::temp_dir("hf-not-fixture");
    let out = switch(&["parity", not_fixture.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected.safetensors"));

    let decode = |extra: &[&str]| {
        let mut args = vec![
            "seq2seq",
            "--model",
            tiny,
            "--input",
            "The <extra_id_0> walks in <extra_id_1> park.",
            "--input",
            "A dog.",
            "--ids",
        ];
        args.extend(extra);
        switch_ok(&args)
    };
    let cached = decode(&["--max-tokens", "6"]);
    assert_eq!(cached.matches("output: ").count(), 2, "{cached}");
    assert_eq!(cached, decode(&["--max-tokens", "6", "--no-cache"]));
    // transformers' 10 greedy tokens for the fixture's first input (the longest: unpadded
    // in both batches, so the same encoder output).
    let f = TensorFile::read(&hf_dir("tiny").join("expected.safetensors")).unwrap();
    let want = f.get("generated_ids").unwrap().to_i64()[..11].to_vec();
    let out = decode(&["--max-tokens", "10", "--ignore-eos"]);
    let first_ids = out.lines().find(|l| l.starts_with("ids:")).unwrap();
    assert_eq!(first_ids, format!("ids:    {want:?}"));

    let stdout = switch_ok(&[
        "route",
        "--model",
        tiny,
        "--text",
        "A quick dog.",
        "--max-tokens",
        "3",
    ]);
    assert!(stdout.contains("encoder.block.1 (capacity 2") && stdout.contains("decoder.block.2"));
    assert!(stdout.contains("load/dropped"), "{stdout}");

    let rep = common::temp_dir("hf-report");
    switch_ok(&[
        "report",
        "--model",
        tiny,
        "--route-text",
        "Each expert takes at most its capacity.",
        "--out",
        rep.to_str().unwrap(),
    ]);
    let html = std::fs::read_to_string(rep.join("routes.html")).unwrap();
    assert_eq!(
        html.matches("<h2>").count(),
        5,
        "one table per sparse layer"
    );
    assert!(html.contains("class=\"drop\"") && html.contains("<td>dropped</td>"));

    let dst = common::temp_dir("hf-convert").join("m16");
    switch_ok(&[
        "convert",
        "--model",
        tiny,
        "--out",
        dst.to_str().unwrap(),
        "--dtype",
        "bf16",
    ]);
    assert!(dst.join("tokenizer.json").exists());
    switch_ok(&[
        "seq2seq",
        "--model",
        dst.to_str().unwrap(),
        "--input",
        "A dog.",
    ]);

    let out = switch(&["seq2seq", "--model", tiny]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no input"));
}

/// An expert is read the first time a token is routed to it, and a checkpoint changed since
/// loading is refused then, not read.
#[test]
fn experts_are_read_on_first_use() {
    use switch_transformer::hf::model::FeedForward;
    let experts_loaded = |m: &HfSwitchTransformer| -> Vec<usize> {
        m.encoder
            .blocks
            .iter()
            .chain(&m.decoder.blocks)
            .filter_map(|b| match &b.ff {
                FeedForward::Sparse(s) => Some(s.experts.iter().filter(|e| e.is_loaded()).count()),
                FeedForward::Dense { .. } => None,
            })
            .collect()
    };
    let dir = copy_fixture("tiny", "lazy-experts");
    let model = HfSwitchTransformer::load(&dir, &burn::tensor::Device::default()).unwrap();
    assert_eq!(experts_loaded(&model), [0, 0, 0, 0, 0]);
    // One token: one expert per encoder sparse layer.
    model.encode(&[5], &[1], 1, 1).unwrap();
    assert_eq!(experts_loaded(&model), [1, 1, 0, 0, 0]);

    let again = HfSwitchTransformer::load(&dir, &burn::tensor::Device::default()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes).unwrap(); // rewritten: new mtime
    let err = format!("{:#}", again.encode(&[5], &[1], 1, 1).unwrap_err());
    assert!(err.contains("changed since the model was loaded"), "{err}");
}

/// Long generation shows its progress on a terminal (here a pseudo-terminal made by `script`,
/// as a user's shell has) and nothing of it where standard error is a pipe or a file.
#[cfg(unix)]
#[test]
fn seq2seq_shows_progress_on_a_terminal_only() {
    let tiny = hf_dir("tiny");
    let args = [
        "seq2seq",
        "--model",
        tiny.to_str().unwrap(),
        "--input",
        "A.",
        "--ignore-eos",
        "--max-tokens",
        "300",
    ];
    let piped = switch(&args);
    let err = String::from_utf8_lossy(&piped.stderr);
    assert!(piped.status.success(), "{err}");
    assert!(!err.contains("generating"), "{err}");
    let Ok(found) = Command::new("script").arg("--version").output() else {
        eprintln!("`script` (util-linux) not found: the terminal half is not checked");
        return;
    };
    assert!(found.status.success());
    let line = std::iter::once(env!("CARGO_BIN_EXE_switch"))
        .chain(args)
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let tty = Command::new("script")
        .args(["-qefc", &line, "/dev/null"])
        .output()
        .unwrap();
    let seen = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{seen}");
    assert!(
        seen.contains("generating") && seen.contains("/300 tokens"),
        "{seen}"
    );
    assert!(seen.contains("output: "), "{seen}");
}

/// `SWITCH_SIMD` forces a lower instruction set for the CPU kernels (every level this machine
/// has gives the same greedy tokens) and a level it cannot honour is refused before any work.
#[test]
fn the_simd_level_can_be_forced_and_a_bad_one_is_refused() {
    let dir = hf_dir("tiny");
    let dir = dir.to_str().unwrap();
    let run = |level: &str| {
        Command::new(env!("CARGO_BIN_EXE_switch"))
            .env("SWITCH_SIMD", level)
            .args(["seq2seq", "--model", dir, "--input", "The park is green."])
            .output()
            .unwrap()
    };
    let mut outputs = Vec::new();
    for isa in switch_transformer::cpu::Isa::available() {
        let out = run(isa.name());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(String::from_utf8_lossy(&out.stdout).to_string());
    }
    assert!(outputs.windows(2).all(|w| w[0] == w[1]), "{outputs:?}");
    let bad = run("avx9");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("SWITCH_SIMD=\"avx9\" is not one of"), "{err}");
    assert!(bad.stdout.is_empty());
}

/// A checkpoint stored in bf16 stays bf16 on the CPU (its products widen the weights in
/// registers and match transformers: `every_hugging_face_fixture_passes` covers
/// `tiny-bf16-sharded`); an f32 one stays f32; other backends get f32.
#[test]
fn bf16_weights_stay_bf16_on_the_cpu() {
    use burn::tensor::DType;
    let device = common::test_device();
    let bf16 = HfSwitchTransformer::load(&hf_dir("tiny-bf16-sharded"), &device).unwrap();
    let f32 = HfSwitchTransformer::load(&hf_dir("tiny"), &device).unwrap();
    assert_eq!(f32.weights_dtype(), DType::F32);
    if Paths::of(&device).bf16_weights {
        assert_eq!(bf16.weights_dtype(), DType::BF16);
        let before = switch_transformer::cpu::runs().thin_matmul;
        let dir = hf_dir("tiny-bf16-sharded");
        let _ = logits_of(&bf16, &dir);
        assert!(switch_transformer::cpu::runs().thin_matmul > before);
    } else {
        assert_eq!(bf16.weights_dtype(), DType::F32);
    }
}
