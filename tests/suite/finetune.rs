//! Fine-tuning Hugging Face Switch checkpoints (issue 27): parity with transformers 5.24.0's
//! training on the fixtures in tests/data/hf-finetune (made by tools/hf_finetune_fixtures.py),
//! the data pipeline against the fixtures' own batches, and `switch finetune` end to end with
//! its errors.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::Device;
use switch_transformer::hf::HfSwitchTransformer;
use switch_transformer::hf::finetune::config::FinetuneConfig;
use switch_transformer::hf::finetune::data::{Batch, Dataset, Example};
use switch_transformer::hf::finetune::parity::{micro_batches, replay};
use switch_transformer::hf::finetune::run::{FinetuneArgs as RunArgs, finetune, resume_args};
use switch_transformer::hf::tokenize::HfTokenizer;
use switch_transformer::store::{HostData, TensorFile};

use crate::common;
use crate::common::switch;

fn fixture(name: &str) -> PathBuf {
    common::manifest_dir()
        .join("tests/data/hf-finetune")
        .join(name)
}

fn expected(dir: &Path) -> TensorFile {
    TensorFile::read(&dir.join("expected.safetensors")).unwrap()
}

/// A new run of the `start` fixture in `dir` on `train` and `valid` with `config`.
pub(crate) fn new_run(
    train: &Path,
    valid: &Path,
    dir: PathBuf,
    config: &FinetuneConfig,
) -> RunArgs {
    RunArgs {
        model: fixture("start"),
        train: train.to_path_buf(),
        valid: Some(valid.to_path_buf()),
        run_dir: dir,
        config: config.clone(),
        resume: false,
        stop: None,
        world: None,
    }
}

/// The settings of the data-parallel runs (here and in `distributed::mpi_jobs`): two
/// micro-batches per update, dropout and jitter on, validations and a checkpoint on the way.
pub(crate) const PARALLEL_SETTINGS: &[&str] = &[
    "max_steps=6",
    "batch_size=4",
    "grad_accum=2",
    "learning_rate=3e-3",
    "log_every=1",
    "eval_every=3",
    "eval_generate=6",
    "save_every=4",
    "dropout_rate=0.1",
    "router_jitter_noise=0.05",
];

#[test]
fn training_matches_transformers_on_every_fixture() {
    for name in ["step2", "accum"] {
        let dir = fixture(name);
        let before = switch_transformer::cpu::runs();
        let rows = replay(&dir, &expected(&dir), &Device::default())
            .unwrap()
            .rows;
        let after = switch_transformer::cpu::runs();
        // Every AdamW update ran in the parameter's own storage (the tied embedding too).
        let (all, in_place) = (
            after.adam - before.adam,
            after.adam_in_place - before.adam_in_place,
        );
        assert!(
            all > 0 && in_place == all,
            "{in_place} of {all} updates in place"
        );
        // The linear layers' few-row products ran through the training kernel; `accum`'s
        // micro-batches (16 and 22 target tokens) take the tied output layer through it too,
        // the embedding read in place (`step2`'s 66 are past the kernel's 64 rows).
        assert!(after.thin_linear > before.thin_linear);
        let tied_in_place = after.thin_linear_transposed - before.thin_linear_transposed;
        assert_eq!(
            tied_in_place > 0,
            name == "accum",
            "{name}: tied output layer"
        );
        let bad: Vec<_> = rows.iter().filter(|r| !r.pass).collect();
        assert!(bad.is_empty(), "{name}: {bad:#?}");
        // Loss parts, some gradients, the 3 losses and every weight were compared.
        assert!(rows.iter().any(|r| r.name == "encoder_aux_loss"));
        assert!(
            rows.iter()
                .any(|r| r.name.starts_with("grad.encoder.block.1"))
        );
        assert!(rows.iter().filter(|r| r.name.starts_with("after.")).count() > 50);
        let worst = rows.iter().map(|r| r.max_rel).fold(0.0, f64::max);
        println!(
            "{name}: {} comparisons, worst relative error {worst:.2e}",
            rows.len()
        );
    }
}

#[test]
fn a_tampered_fixture_fails() {
    let dir = fixture("step2");
    for key in [
        "after.encoder.block.1.layer.1.mlp.router.classifier.weight",
        "grad.decoder.block.3.layer.2.mlp.router.classifier.weight",
        "encoder_aux_loss",
    ] {
        let mut file = expected(&dir);
        let t = file.tensors.get_mut(key).unwrap();
        let HostData::F32(v) = &mut t.data else {
            panic!("f32")
        };
        v[0] += 1e-3 * v.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
        let rows = replay(&dir, &file, &Device::default()).unwrap().rows;
        let bad: Vec<_> = rows.iter().filter(|r| !r.pass).map(|r| &r.name).collect();
        assert_eq!(bad, [key], "tampering with {key}");
    }
}

/// The fixtures' batches are transformers' (right padding, labels -100, `_shift_right`):
/// ours from the same token ids are identical.
#[test]
fn batches_match_transformers_collation() {
    for name in ["step2", "accum"] {
        let file = expected(&fixture(name));
        let meta = file.meta_json().unwrap();
        let recorded = micro_batches(&file).unwrap();
        for (k, mb) in meta["micro_batches"].as_array().unwrap().iter().enumerate() {
            let ids = |v: &serde_json::Value| -> Vec<Vec<i64>> {
                serde_json::from_value(v.clone()).unwrap()
            };
            let examples: Vec<Example> = ids(&mb["inputs"])
                .into_iter()
                .zip(ids(&mb["targets"]))
                .map(|(input, target)| Example {
                    input,
                    target,
                    target_text: String::new(),
                })
                .collect();
            let refs: Vec<&Example> = examples.iter().collect();
            assert_eq!(
                Batch::new(&refs, 0, 0),
                recorded[k],
                "{name} micro-batch {k}"
            );
        }
    }
}

const WORDS: &[&str] = &[
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "a", "walks", "in", "park",
    "cute", "green", "sparse", "experts", "route", "every", "token", "to", "one", "expert", "each",
    "takes", "at", "most", "its", "capacity", "of", "tokens", "and", "drops", "rest",
];

/// `n` summarization-like pairs: 6 to 12 words in, their first 3 out (a lead-3 summary).
pub(crate) fn pairs(path: &Path, n: usize, seed: u64) {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = |m: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % m as u64) as usize
    };
    let mut text = String::new();
    for _ in 0..n {
        let len = 6 + next(7);
        let w: Vec<&str> = (0..len).map(|_| WORDS[next(WORDS.len())]).collect();
        let line = serde_json::json!({
            "input": format!("summarize: {}", w.join(" ")),
            "target": w[..3].join(" "),
        });
        text.push_str(&format!("{line}\n"));
    }
    std::fs::write(path, text).unwrap();
}

/// A small public-style run: transformers' initialisation fine-tuned on generated pairs for
/// 300 updates on the CPU; validation loss falls, ROUGE-L rises, the model is written in
/// Hugging Face's layout and loads, and the run refuses to be overwritten.
#[test]
fn finetune_runs_end_to_end() {
    let tmp = common::temp_dir("finetune-e2e");
    let (train, valid) = (tmp.join("train.jsonl"), tmp.join("valid.jsonl"));
    pairs(&train, 256, 1);
    pairs(&valid, 32, 2);
    let start = fixture("start");
    let runs = tmp.join("runs");
    let args = [
        "finetune",
        "--model",
        start.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--valid",
        valid.to_str().unwrap(),
        "--runs-dir",
        runs.to_str().unwrap(),
        "--name",
        "e2e",
        "--set",
        "max_steps=300",
        "--set",
        "learning_rate=3e-3",
        "--set",
        "batch_size=16",
        "--set",
        "eval_every=150",
        "--set",
        "log_every=50",
    ];
    let (ok, out) = switch(&args);
    assert!(ok, "{out}");
    let run = runs.join("e2e");
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let valid_at = |step: u64, key: &str| {
        metrics
            .iter()
            .find(|m| m["step"] == step && m.get(key).is_some())
            .unwrap_or_else(|| panic!("no {key} at step {step}: {metrics:?}"))[key]
            .as_f64()
            .unwrap()
    };
    let (l0, l1) = (valid_at(0, "valid_loss"), valid_at(300, "valid_loss"));
    let (r0, r1) = (valid_at(0, "rougeL"), valid_at(300, "rougeL"));
    println!("valid loss {l0:.3} -> {l1:.3}, ROUGE-L {r0:.3} -> {r1:.3}");
    assert!(l1 < 0.6 * l0, "validation loss {l0} -> {l1}");
    assert!(r1 > r0, "ROUGE-L {r0} -> {r1}");
    assert!(metrics.iter().filter(|m| m.get("loss").is_some()).count() == 6);

    // Every key in config.toml, the model's dropout and jitter resolved.
    let text = std::fs::read_to_string(run.join("config.toml")).unwrap();
    let config: FinetuneConfig = toml::from_str(&text).unwrap();
    assert_eq!(config.max_steps, 300);
    assert_eq!(config.dropout_rate, Some(0.1));
    assert_eq!(config.router_jitter_noise, Some(0.01));
    let table: toml::Table = toml::from_str(&text).unwrap();
    let all = toml::Table::try_from(&config).unwrap();
    assert_eq!(table.len(), all.len());

    // The model in Hugging Face's layout, changed by training, with its tokenizer.
    let model_dir = run.join("model");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(model_dir.join(f).exists(), "{f}");
    }
    let device = Device::default();
    let before = HfSwitchTransformer::load(&start, &device)
        .unwrap()
        .tensors()
        .unwrap();
    let after = HfSwitchTransformer::load(&model_dir, &device)
        .unwrap()
        .tensors()
        .unwrap();
    assert_eq!(before.len(), after.len());
    assert_ne!(
        before["shared.weight"].to_f32(),
        after["shared.weight"].to_f32()
    );

    // The report shows it: the losses, ROUGE rising, each sparse layer's drops and load.
    let (ok, out) = switch(&["report", run.to_str().unwrap()]);
    assert!(ok, "{out}");
    let html = std::fs::read_to_string(run.join("report/report.html")).unwrap();
    for want in [
        "Cross-entropy loss",
        "ROUGE-L",
        "Router losses",
        "Dropped-token fraction per sparse layer",
        "Expert load, encoder.block.1",
        "Expert load, decoder.block.1",
    ] {
        assert!(html.contains(want), "the report lacks `{want}`");
    }
    let rouge = std::fs::read_to_string(run.join("report/rouge.svg")).unwrap();
    assert_eq!(rouge.matches("<polyline").count(), 3, "ROUGE-1, -2, -L");
    let plain = tmp.join("not-a-finetune-run");
    std::fs::create_dir_all(&plain).unwrap();
    let (ok, out) = switch(&["report", run.to_str().unwrap(), plain.to_str().unwrap()]);
    assert!(!ok && out.contains("report them separately"), "{out}");

    // A second run of the same name is refused, and the first is untouched.
    let (ok, out) = switch(&args);
    assert!(!ok && out.contains("already holds a run"), "{out}");
    assert!(model_dir.join("model.safetensors").exists());
}

#[test]
fn bad_input_is_answered_clearly() {
    let tmp = common::temp_dir("finetune-bad");
    let start = fixture("start");
    let run = |train: &Path, model: &Path| {
        switch(&[
            "finetune",
            "--model",
            model.to_str().unwrap(),
            "--train",
            train.to_str().unwrap(),
            "--runs-dir",
            tmp.join("runs").to_str().unwrap(),
            "--set",
            "max_steps=1",
        ])
    };
    let write = |name: &str, text: &str| {
        let p = tmp.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let cases = [
        (
            write("no-target.jsonl", "{\"input\": \"a dog\"}\n"),
            "line 1: no `target`",
        ),
        (write("empty.jsonl", "\n"), "holds no examples"),
        (
            write(
                "not-json.jsonl",
                "{\"input\": \"a\", \"target\": \"b\"}\nnope\n",
            ),
            "line 2: not JSON",
        ),
        (
            write("number.jsonl", "{\"input\": \"a\", \"target\": 3}\n"),
            "`target` is not a string",
        ),
    ];
    for (path, want) in &cases {
        let (ok, out) = run(path, &start);
        assert!(!ok && out.contains(want), "{}: {out}", path.display());
    }
    // A model folder without its tokenizer.
    let bare = tmp.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(start.join(f), bare.join(f)).unwrap();
    }
    let good = write(
        "good.jsonl",
        "{\"input\": \"the dog\", \"target\": \"dog\"}\n",
    );
    let (ok, out) = run(&good, &bare);
    assert!(!ok && out.contains("tokenizer.json not found"), "{out}");
    let (ok, out) = run(&good, &tmp.join("nowhere"));
    assert!(!ok && out.contains("config.json"), "{out}");
    // Unknown keys and values out of range.
    let (ok, out) = switch(&[
        "finetune",
        "--model",
        "x",
        "--train",
        "y",
        "--set",
        "learnin_rate=1",
    ]);
    assert!(
        !ok && out.contains("unknown finetune key `learnin_rate`"),
        "{out}"
    );
    // Finetune's ranks split the data; expert parallelism is `switch train`'s.
    let (ok, out) = switch(&[
        "finetune",
        "--model",
        "x",
        "--train",
        "y",
        "--distributed",
        "--expert-parallel",
    ]);
    assert!(!ok && out.contains("--expert-parallel is"), "{out}");
    let mut c = FinetuneConfig::default();
    assert!(
        c.set("replicas=0")
            .unwrap_err()
            .to_string()
            .contains("replicas")
    );
    assert!(
        c.set("batch_size=0")
            .unwrap_err()
            .to_string()
            .contains("batch_size")
    );
    assert!(
        c.set("dropout_rate=1.5")
            .unwrap_err()
            .to_string()
            .contains("dropout_rate")
    );
    assert!(
        c.set("precision=f16")
            .unwrap_err()
            .to_string()
            .contains("precision must be f32 or bf16")
    );
}

/// Long targets are cut to max_target_len (the end-of-sequence token kept) and counted;
/// ids outside the model's vocabulary are refused naming the line.
#[test]
fn cuts_are_counted_and_foreign_ids_refused() {
    let tmp = common::temp_dir("finetune-data");
    let start = fixture("start");
    let tok = HfTokenizer::load(&start, 0).unwrap();
    let path = tmp.join("d.jsonl");
    let long = "the quick brown fox jumps over the lazy dog ".repeat(4);
    std::fs::write(
        &path,
        format!(
            "{}\n{}\n",
            serde_json::json!({"input": "a dog", "target": long}),
            serde_json::json!({"input": long, "target": "a dog"})
        ),
    )
    .unwrap();
    let d = Dataset::read(&path, &tok, 8, 5, 1000).unwrap();
    assert_eq!((d.cut_inputs, d.cut_targets), (1, 1));
    assert_eq!(d.examples[0].target.len(), 5);
    assert_eq!(*d.examples[0].target.last().unwrap(), 1, "EOS kept");
    assert_eq!(d.examples[1].input.len(), 8);
    assert!(d.cut_note(8, 5).unwrap().contains("1 of 2 inputs cut"));
    let e = Dataset::read(&path, &tok, 512, 512, 20)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("line 1") && e.contains("outside the model's vocabulary"),
        "{e}"
    );
}

/// The metric lines of a run without the throughput (which differs between runs).
pub(crate) fn metric_lines(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tokens_per_s");
            v
        })
        .collect()
}

/// A run stopped after update 7 (its flag, as a signal sets it) and resumed from the
/// checkpoint it wrote ends with the same weights, bit for bit, and the same metric lines as
/// the run never stopped: AdamW's moments and step counts, the dropout generator and the data
/// order all continue. Checkpoints are f32 even when the model is saved in bf16.
#[test]
fn a_stopped_run_resumes_exactly() {
    let tmp = common::temp_dir("finetune-resume");
    let (train, valid) = (tmp.join("train.jsonl"), tmp.join("valid.jsonl"));
    pairs(&train, 40, 3);
    pairs(&valid, 6, 4);
    let mut config = FinetuneConfig::default();
    for s in [
        "max_steps=12",
        "batch_size=8",
        "grad_accum=2",
        "learning_rate=3e-3",
        "warmup_steps=3",
        "weight_decay=0.01",
        "log_every=1",
        "eval_every=5",
        "eval_generate=3",
        "save_every=5",
        "save_dtype=bf16",
        // Computing in bf16 too: the resumed half reads it back from config.toml.
        "precision=bf16",
    ] {
        config.set(s).unwrap();
    }
    let args = |name: &str| new_run(&train, &valid, tmp.join(name), &config);
    let device = Device::default();
    let mut said = Vec::new();
    let whole = finetune(args("whole"), &device, &mut |l| said.push(l.to_string())).unwrap();
    assert!(!whole.stopped);
    assert!(
        said.iter().any(|l| l.contains("computing in bf16")),
        "{said:?}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut stopped = args("stopped");
    stopped.stop = Some(stop.clone());
    let flag = stop.clone();
    let first = finetune(stopped, &device, &mut |line| {
        if line.starts_with("step 7/12:") {
            flag.store(true, Ordering::SeqCst);
        }
    })
    .unwrap();
    let run = tmp.join("stopped");
    assert!(first.stopped && first.updates == 7);
    assert_eq!(first.model_dir, run.join("model-step-7"));
    // The step-5 checkpoint gave way to the step-7 one; the model is not written yet.
    assert!(!run.join("model-step-5").exists() && !run.join("model").exists());
    let ck = TensorFile::read(&run.join("model-step-7/model.safetensors")).unwrap();
    assert!(matches!(
        ck.get("shared.weight").unwrap().data,
        HostData::F32(_)
    ));

    // The lines the stopped run wrote past its checkpoint are written again, once.
    let mut extra = serde_json::json!({"step": 8, "loss": 0.0});
    extra["note"] = "written after the checkpoint".into();
    let metrics = run.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&metrics).unwrap();
    text.push_str(&format!("{extra}\n"));
    std::fs::write(&metrics, text).unwrap();

    // What a killed save (write_dir_whole's `.NAME.partial-PID`) or removal left is tidied.
    let leftovers = [
        run.join(".model-step-8.partial-4242"),
        run.join(".model-step-5.deleting"),
    ];
    for d in &leftovers {
        std::fs::create_dir_all(d.join("x")).unwrap();
    }

    let resumed = finetune(resume_args(&run).unwrap(), &device, &mut |_| {}).unwrap();
    assert!(
        leftovers.iter().all(|d| !d.exists()),
        "leftovers not tidied"
    );
    assert_eq!(resumed.resumed_from, Some(7));
    assert!(!resumed.stopped && resumed.updates == 12);
    assert!(!run.join("model-step-7").exists());
    for f in ["model.safetensors", "config.json", "tokenizer.json"] {
        let same = std::fs::read(tmp.join("whole/model").join(f)).unwrap()
            == std::fs::read(run.join("model").join(f)).unwrap();
        assert!(same, "{f} differs from the run never stopped");
    }
    assert_eq!(metric_lines(&tmp.join("whole")), metric_lines(&run));

    // A finished run has nothing to resume.
    let e = finetune(resume_args(&run).unwrap(), &device, &mut |_| {}).unwrap_err();
    assert!(format!("{e:#}").contains("is finished"), "{e:#}");
}

/// SIGTERM to a real `switch finetune` process: it writes a checkpoint of its current update
/// and exits with 130; `--resume` finishes the run; a changed training file is refused.
#[test]
fn sigterm_checkpoints_and_resume_finishes() {
    let tmp = common::temp_dir("finetune-sigterm");
    let train = tmp.join("train.jsonl");
    pairs(&train, 64, 5);
    let runs = tmp.join("runs");
    let run = runs.join("t");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switch"))
        .args([
            "finetune",
            "--model",
            fixture("start").to_str().unwrap(),
            "--train",
            train.to_str().unwrap(),
            "--runs-dir",
            runs.to_str().unwrap(),
            "--name",
            "t",
            "--set",
            "max_steps=100000",
            "--set",
            "log_every=1",
            "--set",
            "batch_size=4",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for(
        "3 updates logged",
        std::time::Duration::from_secs(120),
        || {
            std::fs::read_to_string(run.join("metrics.jsonl"))
                .is_ok_and(|t| t.lines().filter(|l| l.contains("\"loss\"")).count() >= 3)
        },
    );
    // SAFETY: kill(2) on our own child's id.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let ck: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("model-step-"))
        .collect();
    assert_eq!(ck.len(), 1, "{ck:?}");
    assert!(run.join(&ck[0]).join("state.json").is_file());
    assert!(!run.join("lock").exists(), "the lock is released");

    // Resuming reads the same file: a changed one is refused.
    let original = std::fs::read(&train).unwrap();
    pairs(&train, 64, 6);
    let (ok, out) = switch(&["finetune", "--resume", run.to_str().unwrap()]);
    assert!(
        !ok && out.contains("changed since the run started"),
        "{out}"
    );
    std::fs::write(&train, original).unwrap();
    // Resumed with its total lowered to 2 updates past the checkpoint (config.toml is what
    // --resume reads), it finishes: the model written, the checkpoint gone.
    let text = std::fs::read_to_string(run.join("config.toml")).unwrap();
    let step: u64 = ck[0].trim_start_matches("model-step-").parse().unwrap();
    std::fs::write(
        run.join("config.toml"),
        text.replace("max_steps = 100000", &format!("max_steps = {}", step + 2)),
    )
    .unwrap();
    let (ok, out) = switch(&["finetune", "--resume", run.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("resuming"), "{out}");
    assert!(run.join("model/model.safetensors").is_file());
    assert!(!run.join(&ck[0]).exists());
}

/// A disk that fills up while a checkpoint is written: the run stops with the disk's error,
/// the half-written checkpoint is gone, the last good one stays whole, and `--resume` from it
/// (with space again) ends with the same weights as a run that never ran out of space. The
/// disk is a 1.4 MB tmpfs in a private mount namespace (`unshare -rm`): room for one
/// checkpoint of this model (0.9 MB) but not for the next beside it.
#[test]
fn a_full_disk_keeps_the_last_good_checkpoint() {
    let tmp = common::temp_dir("finetune-full-disk");
    let train = tmp.join("train.jsonl");
    pairs(&train, 48, 7);
    let (disk, kept) = (tmp.join("disk"), tmp.join("kept"));
    std::fs::create_dir_all(&disk).unwrap();
    let probe = std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=8k tmpfs {}",
            disk.display()
        ))
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: this machine cannot mount a tmpfs in a private namespace ({probe:?})");
        return;
    }
    let settings = [
        "max_steps=12",
        "save_every=4",
        "batch_size=8",
        "log_every=1",
        "eval_every=0",
    ];
    let mut args: Vec<String> = vec![
        "finetune".into(),
        "--model".into(),
        fixture("start").display().to_string(),
        "--train".into(),
        train.display().to_string(),
        "--name".into(),
        "full".into(),
    ];
    for s in settings {
        args.extend(["--set".into(), s.into()]);
    }
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "mount -t tmpfs -o size=1400k tmpfs {disk} && {bin} {args} --runs-dir {disk} \
         > {tmp}/log 2>&1; echo $? > {tmp}/rc; cp -r {disk}/full {kept}",
        disk = disk.display(),
        bin = env!("CARGO_BIN_EXE_switch"),
        args = quoted.join(" "),
        tmp = tmp.display(),
        kept = kept.display(),
    );
    let status = std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .status()
        .unwrap();
    assert!(status.success());
    let log = std::fs::read_to_string(tmp.join("log")).unwrap();
    let rc = std::fs::read_to_string(tmp.join("rc")).unwrap();
    assert_ne!(
        rc.trim(),
        "0",
        "the run should fail on the full disk:\n{log}"
    );
    assert!(
        log.contains("No space left on device") && log.contains("model-step-4 is kept"),
        "{log}"
    );
    // The good checkpoint whole, nothing half-written beside it, no model, no lock.
    let names: Vec<String> = std::fs::read_dir(&kept)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&"model-step-4".to_string()), "{names:?}");
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with('.') || n == "model" || n == "lock" || n == "model-step-8"),
        "{names:?}"
    );
    for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        assert!(kept.join("model-step-4").join(f).is_file(), "{f}");
    }

    // With space again, --resume finishes it as if nothing had happened.
    let (ok, out) = switch(&["finetune", "--resume", kept.to_str().unwrap()]);
    assert!(ok && out.contains("update 4 of 12"), "{out}");
    let mut whole: Vec<&str> = args.iter().map(String::as_str).collect();
    whole[6] = "whole";
    let runs = tmp.join("runs");
    whole.extend(["--runs-dir", runs.to_str().unwrap()]);
    let (ok, out) = switch(&whole);
    assert!(ok, "{out}");
    let same = std::fs::read(runs.join("whole/model/model.safetensors")).unwrap()
        == std::fs::read(kept.join("model/model.safetensors")).unwrap();
    assert!(
        same,
        "the resumed run's weights differ from the uninterrupted run's"
    );
}

/// A learning rate that blows the weights up makes the next gradient non-finite: the run
/// stops naming the update, without writing a model; with `skip_nonfinite` it leaves the model
/// unchanged on such updates, marks them in metrics.jsonl and finishes with finite weights.
#[test]
fn non_finite_gradients_stop_the_run_or_are_skipped() {
    let tmp = common::temp_dir("finetune-nonfinite");
    let train = tmp.join("train.jsonl");
    pairs(&train, 16, 9);
    let (start, runs) = (fixture("start"), tmp.join("runs"));
    let run = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "finetune",
            "--model",
            start.to_str().unwrap(),
            "--train",
            train.to_str().unwrap(),
            "--runs-dir",
            runs.to_str().unwrap(),
            "--name",
            name,
        ];
        for s in [
            "max_steps=4",
            "learning_rate=1e30",
            "batch_size=8",
            "log_every=1",
            "eval_every=0",
        ] {
            args.extend(["--set", s]);
        }
        args.extend_from_slice(extra);
        switch(&args)
    };
    let (ok, out) = run("stops", &[]);
    assert!(
        !ok && out.contains("update 2: the gradient norm is") && out.contains("skip_nonfinite"),
        "{out}"
    );
    assert!(!runs.join("stops/model").exists());

    let (ok, out) = run("skips", &["--set", "skip_nonfinite=3"]);
    assert!(ok, "{out}");
    let skipped: Vec<bool> = std::fs::read_to_string(runs.join("skips/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("skipped")?.as_bool())
        .collect();
    assert_eq!(skipped, [false, true, true, true]);
    let model = HfSwitchTransformer::load(&runs.join("skips/model"), &Device::default());
    assert!(
        model.is_ok(),
        "the saved weights are finite: {:?}",
        model.err()
    );
    // One more non-finite update than allowed stops the run.
    let (ok, out) = run("too-many", &["--set", "skip_nonfinite=2"]);
    assert!(
        !ok && out.contains("update 4: the gradient norm is"),
        "{out}"
    );
}

/// `finetune` on two ranks of one job, each a thread (`distributed::Threads`), with the
/// arguments `make(rank)`; with `flag`, rank 0's "step 3/6" line sets it. The summaries in
/// rank order.
fn on_two_ranks(
    make: &(dyn Fn(usize) -> RunArgs + Sync),
    flag: Option<Arc<AtomicBool>>,
) -> Vec<switch_transformer::hf::finetune::run::FinetuneSummary> {
    use switch_transformer::distributed::{Collective, Threads};
    let device = Device::default();
    std::thread::scope(|scope| {
        let running: Vec<_> = Threads::group(2, std::time::Duration::from_secs(120))
            .into_iter()
            .enumerate()
            .map(|(rank, w)| {
                let mut a = make(rank);
                a.world = Some(Arc::new(w) as Arc<dyn Collective>);
                let (flag, device) = (flag.clone(), device.clone());
                scope.spawn(move || {
                    finetune(a, &device, &mut |line| {
                        if let Some(f) = &flag
                            && line.starts_with("step 3/6:")
                        {
                            f.store(true, Ordering::SeqCst);
                        }
                    })
                })
            })
            .collect();
        running
            .into_iter()
            .map(|r| r.join().unwrap().unwrap())
            .collect()
    })
}

/// Data parallelism splits each update's micro-batches: two replicas (threads of this process
/// sharing the weights) and two ranks (threads standing in for an MPI job's processes,
/// `distributed::Threads`) each take one of grad_accum = 2, dropout and jitter on, with a
/// checkpoint and validations on the way, and end with the model, metrics and generations of
/// one worker, bit for bit. The replicas ran on two threads at once; an accumulation that
/// cannot be split is refused.
#[test]
fn replicas_and_ranks_split_an_update_and_change_nothing() {
    use switch_transformer::hf::finetune::parallel::Workers;

    let tmp = common::temp_dir("finetune-parallel");
    let (train, valid) = (tmp.join("train.jsonl"), tmp.join("valid.jsonl"));
    pairs(&train, 24, 5);
    pairs(&valid, 10, 6);
    let mut config = FinetuneConfig::default();
    for s in PARALLEL_SETTINGS {
        config.set(s).unwrap();
    }
    let args =
        |name: &str, config: &FinetuneConfig| new_run(&train, &valid, tmp.join(name), config);
    let device = Device::default();
    finetune(args("one", &config), &device, &mut |_| {}).unwrap();

    let mut two = config.clone();
    two.set("replicas=2").unwrap();
    let mut lines = Vec::new();
    finetune(args("replicas", &two), &device, &mut |l| {
        lines.push(l.to_string())
    })
    .unwrap();
    assert!(
        lines.iter().any(|l| l.contains("split over 2 workers")),
        "{lines:?}"
    );

    let summaries = on_two_ranks(&|_| args("ranks", &config), None);
    assert_eq!(summaries[0].last_loss, summaries[1].last_loss);

    let one = tmp.join("one");
    for run in ["replicas", "ranks"] {
        let run = tmp.join(run);
        for f in ["model/model.safetensors", "generations.jsonl"] {
            let same = std::fs::read(one.join(f)).unwrap() == std::fs::read(run.join(f)).unwrap();
            assert!(same, "{}: {f} differs from one worker's", run.display());
        }
        assert_eq!(metric_lines(&one), metric_lines(&run), "{}", run.display());
    }
    // The validations scored generations of both ranks' batches (6 of them, in order).
    let generations = std::fs::read_to_string(one.join("generations.jsonl")).unwrap();
    assert_eq!(generations.lines().count(), 6);

    // Two replicas compute on two threads at once, the second over the same weights.
    let mut model = HfSwitchTransformer::load(&fixture("start"), &device).unwrap();
    let workers = Workers::new(2, None, &device).unwrap();
    let barrier = std::sync::Barrier::new(2);
    let threads = workers
        .on_replicas(&mut model, |_, _| {
            barrier.wait();
            Ok(std::thread::current().id())
        })
        .unwrap();
    assert_ne!(threads[0], threads[1]);

    let mut odd = config.clone();
    odd.set("replicas=2").unwrap();
    odd.set("grad_accum=3").unwrap();
    let e = finetune(args("odd", &odd), &device, &mut |_| {}).unwrap_err();
    assert!(
        format!("{e:#}").contains("cannot be split over 2 workers"),
        "{e:#}"
    );
}

/// A stop signal to one rank of a job stops every rank after the same update, with one
/// checkpoint (rank 0's); the job resumed from it, on two ranks again, ends with the model of
/// a single process that never stopped, bit for bit.
#[test]
fn ranks_stop_together_and_resume_exactly() {
    let tmp = common::temp_dir("finetune-ranks-resume");
    let (train, valid) = (tmp.join("train.jsonl"), tmp.join("valid.jsonl"));
    pairs(&train, 24, 7);
    pairs(&valid, 6, 8);
    let mut config = FinetuneConfig::default();
    for s in PARALLEL_SETTINGS {
        config.set(s).unwrap();
    }
    let args = |name: &str| new_run(&train, &valid, tmp.join(name), &config);
    let device = Device::default();
    finetune(args("whole"), &device, &mut |_| {}).unwrap();

    // Rank 0 reports step 3 and sets rank 1's flag: rank 1 stops both, after update 3 or 4.
    let rank1_flag = Arc::new(AtomicBool::new(false));
    let first = on_two_ranks(
        &|rank| {
            let mut a = args("stopped");
            if rank == 1 {
                a.stop = Some(rank1_flag.clone());
            }
            a
        },
        Some(rank1_flag.clone()),
    );
    let run = tmp.join("stopped");
    assert!(first.iter().all(|s| s.stopped), "every rank stopped");
    assert_eq!(first[0].updates, first[1].updates);
    assert!((3..=4).contains(&first[0].updates), "{}", first[0].updates);
    assert!(
        run.join(format!("model-step-{}", first[0].updates))
            .join("model.safetensors")
            .exists()
    );
    assert!(!run.join("model").exists());

    let resumed = on_two_ranks(&|_| resume_args(&run).unwrap(), None);
    assert!(resumed.iter().all(|s| !s.stopped && s.updates == 6));
    assert_eq!(resumed[0].resumed_from, Some(first[0].updates));
    let same = std::fs::read(tmp.join("whole/model/model.safetensors")).unwrap()
        == std::fs::read(run.join("model/model.safetensors")).unwrap();
    assert!(
        same,
        "the resumed two-rank job differs from one process never stopped"
    );
    assert_eq!(metric_lines(&tmp.join("whole")), metric_lines(&run));
}

/// `precision = "bf16"`: the passes compute in bf16 (the encoder's output is bf16; the router
/// logits, and so the router losses, stay f32), the loss and gradients stay within bf16's
/// reach of f32's, the weights stay f32, and an update far below bf16's resolution still
/// moves them (the f32 master copies keep it). Then a few updates lower the loss.
#[test]
fn bf16_compute_tracks_f32_and_keeps_f32_master_weights() {
    use burn::tensor::DType;
    use rand::SeedableRng;
    use switch_transformer::hf::finetune::{Finetuner, Optimisation, batch_loss};
    use switch_transformer::hf::training::Training;
    use switch_transformer::model::precision::Precision;
    use switch_transformer::optim::{AdamWConfig, LinearSchedule};
    use switch_transformer::routing::RoutingRng;

    let dir = fixture("step2");
    let batches = micro_batches(&expected(&dir)).unwrap();
    let device = Device::default();
    let tuner = |precision, learning_rate| {
        let opt = Optimisation {
            learning_rate,
            adamw: AdamWConfig::default(),
            schedule: LinearSchedule {
                warmup: 0,
                total: 1000,
            },
            max_grad_norm: 1.0,
            dropout: 0.0,
            jitter: 0.0,
            precision,
        };
        let model = HfSwitchTransformer::load(&dir, &device).unwrap();
        Finetuner::new(model, &device, opt, 0).unwrap()
    };
    let weights = |ft: &Finetuner| {
        let mut m = ft.model.clone();
        let mut out = Vec::new();
        m.visit_params(&mut |name, p| {
            let t = p.data();
            let values = t
                .as_slice::<f32>()
                .unwrap_or_else(|_| panic!("{name} is not f32"));
            out.push((name.to_string(), values.to_vec()));
            Ok(())
        })
        .unwrap();
        out
    };

    let (mut f32s, mut bf16s) = (tuner(Precision::F32, 1e-6), tuner(Precision::Bf16, 1e-6));
    let f16 = Optimisation {
        precision: Precision::F16,
        ..f32s.opt
    };
    let model = HfSwitchTransformer::load(&dir, &device).unwrap();
    let refused = Finetuner::new(model, &device, f16, 0).err().unwrap();
    assert!(refused.to_string().contains("loss scaling"), "{refused}");
    assert_eq!(bf16s.model.compute(), DType::BF16);
    // What runs in which type.
    let b = &batches[0];
    let mut train = Training::new(0.0, 0.0, RoutingRng::seed_from_u64(0));
    let enc = bf16s
        .model
        .encode_pass(&b.input_ids, &b.mask, b.b, b.src, Some(&mut train))
        .unwrap();
    assert_eq!(enc.hidden.dtype(), DType::BF16);
    assert!(!train.router_logits.is_empty());
    assert!(train.router_logits.iter().all(|l| l.dtype() == DType::F32));
    let (loss, ..) = batch_loss(&bf16s.model, b, None).unwrap();
    assert_eq!(loss.total.dtype(), DType::F32);

    // Loss and gradients within bf16's reach of f32's.
    let (g32, g16) = (
        f32s.gradients(&batches[..1]).unwrap(),
        bf16s.gradients(&batches[..1]).unwrap(),
    );
    let rel = (g16.stats.loss - g32.stats.loss).abs() / g32.stats.loss;
    let (mut diff, mut norm, mut dot, mut norm16) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let mut worst = 0.0f64;
    for (a, b) in g32.grads.iter().zip(&g16.grads) {
        assert_eq!(a.name, b.name);
        let name = a.name.clone();
        let (Some(a), Some(b)) = (a.pytorch_layout(), b.pytorch_layout()) else {
            continue;
        };
        // Each parameter's gradient too (a cut or wrong one is off by about 1).
        let d: f64 = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| f64::from(x - y).powi(2))
            .sum();
        let n: f64 = a.iter().map(|&x| f64::from(x).powi(2)).sum();
        worst = worst.max((d / n).sqrt());
        assert!((d / n).sqrt() < 0.3, "{name}: {}", (d / n).sqrt());
        for (&x, &y) in a.iter().zip(&b) {
            let (x, y) = (f64::from(x), f64::from(y));
            diff += (x - y).powi(2);
            norm += x * x;
            norm16 += y * y;
            dot += x * y;
        }
    }
    let (grad_rel, cosine) = ((diff / norm).sqrt(), dot / (norm * norm16).sqrt());
    println!(
        "bf16 against f32: loss {rel:.2e}, gradients {grad_rel:.2e} (worst parameter \
         {worst:.2e}), cosine {cosine:.5}"
    );
    // bf16 keeps 8 significant bits (rounding errors up to 2^-8 = 3.9e-3); over the tiny model's
    // 8 blocks the gradients drift by a few percent (measured: 3.9e-2, worst 0.14).
    assert!(
        rel < 1e-2,
        "loss {} against {}",
        g16.stats.loss,
        g32.stats.loss
    );
    assert!(grad_rel < 8e-2 && cosine > 0.998, "{grad_rel} {cosine}");

    // One update at lr 1e-6: Adam moves each weight by about 1e-6, far below bf16's spacing
    // at these magnitudes, yet the f32 weights keep it.
    let before = weights(&bf16s);
    let stats = bf16s.update(&batches[..1]).unwrap();
    assert!(!stats.skipped);
    let after = weights(&bf16s);
    let (mut moved, mut lost_in_bf16) = (0usize, 0usize);
    for ((name, x), (_, y)) in before.iter().zip(&after) {
        for (&p, &q) in x.iter().zip(y) {
            if p != q {
                moved += 1;
                assert!((p - q).abs() < 1e-5, "{name}: {p} -> {q}");
                if half::bf16::from_f32(p) == half::bf16::from_f32(q) {
                    lost_in_bf16 += 1;
                }
            }
        }
    }
    assert!(moved > 1000, "{moved} weights moved");
    assert!(
        lost_in_bf16 * 10 > moved * 9,
        "{lost_in_bf16} of {moved} moves are below bf16's resolution"
    );
    drop(f32s.update(&batches[..1]).unwrap());

    // Training in bf16 lowers the loss.
    let mut ft = tuner(Precision::Bf16, 3e-3);
    let first = ft.update(&batches).unwrap().loss;
    let mut last = first;
    for _ in 0..9 {
        last = ft.update(&batches).unwrap().loss;
    }
    println!("bf16 training loss {first:.4} -> {last:.4}");
    assert!(last < 0.8 * first, "{first} -> {last}");
}
