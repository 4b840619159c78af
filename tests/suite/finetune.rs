//! Fine-tuning Hugging Face Switch checkpoints (issue 27): parity with transformers 5.24.0's
//! training on the fixtures in tests/data/hf-finetune (made by tools/hf_finetune_fixtures.py),
//! the data pipeline against the fixtures' own batches, and `switch finetune` end to end with
//! its errors.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use switch_transformer::hf::HfSwitchTransformer;
use switch_transformer::hf::finetune::data::{Batch, Dataset, Example};
use switch_transformer::hf::finetune::parity::{micro_batches, replay};
use switch_transformer::hf::finetune::run::FinetuneConfig;
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
fn pairs(path: &Path, n: usize, seed: u64) {
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
    let mut c = FinetuneConfig::default();
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
