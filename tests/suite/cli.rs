//! The `switch` binary as a user runs it: bad input gives one clear error line and a non-zero
//! exit, and never costs an existing checkpoint.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn switch(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switch"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run the switch binary")
}

/// Asserts failure with exactly one `error:` line containing every needle.
fn assert_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line, got: {stderr}");
    for n in needles {
        assert!(
            errors[0].contains(n),
            "error line lacks {n:?}: {}",
            errors[0]
        );
    }
}

const TINY: &[&str] = &[
    "--set",
    "model.d_model=16",
    "--set",
    "model.heads=2",
    "--set",
    "model.d_ff=32",
    "--set",
    "model.n_layers=1",
    "--set",
    "train.batch_size=2",
    "--set",
    "train.seq_len=8",
    "--set",
    "train.steps=4",
    "--set",
    "train.eval_interval=2",
    "--set",
    "train.eval_batches=1",
    "--set",
    "train.checkpoint_interval=2",
    "--set",
    "train.sample_tokens=4",
];

fn train_args<'a>(data: &'a str, name: &'a str) -> Vec<&'a str> {
    let mut a = vec![
        "train",
        "--data",
        data,
        "--name",
        name,
        "--runs-dir",
        "runs",
    ];
    a.extend_from_slice(TINY);
    a
}

/// Snapshot of every file under `dir` (path, bytes).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn bad_data_files() {
    let tmp = common::temp_dir("cli-data");
    std::fs::write(tmp.join("empty.txt"), "").unwrap();
    std::fs::write(tmp.join("short.txt"), "To be, or not to be").unwrap();
    std::fs::write(tmp.join("binary.txt"), [0x48, 0x69, 0xff, 0xfe, 0x00]).unwrap();
    let cases: [(&str, &[&str]); 4] = [
        ("missing.txt", &["cannot read the data file", "missing.txt"]),
        ("empty.txt", &["empty.txt", "empty"]),
        ("short.txt", &["short.txt", "seq_len + 1"]),
        ("binary.txt", &["binary.txt", "not valid UTF-8"]),
    ];
    for (file, needles) in cases {
        let out = switch(&train_args(file, "x"), &tmp);
        assert_error(&out, needles);
    }
    assert!(
        !tmp.join("runs/x").exists(),
        "no run directory for bad data"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn bad_configuration() {
    let tmp = common::temp_dir("cli-config");
    let data = common::training_text(&tmp);
    let data = data.to_str().unwrap();
    let mut args = train_args(data, "x");
    args.extend(["--set", "train.stepz=4"]);
    assert_error(&switch(&args, &tmp), &["unknown config key `train.stepz`"]);
    let mut args = train_args(data, "x");
    args.extend(["--set", "model.heads=3"]);
    assert_error(
        &switch(&args, &tmp),
        &["model.d_model", "divisible", "model.heads"],
    );
    let mut args = train_args(data, "x");
    args.extend(["--set", "train.lr=fast"]);
    assert_error(&switch(&args, &tmp), &["train.lr", "fast"]);
    let mut args = train_args(data, "x");
    args.extend(["--preset", "fastest"]);
    assert_error(&switch(&args, &tmp), &["unknown preset `fastest`", "tuned"]);
    std::fs::write(tmp.join("bad.toml"), "[model]\nexperts = 8\n").unwrap();
    let out = switch(&["train", "--data", data, "--config", "bad.toml"], &tmp);
    assert_error(&out, &["bad.toml", "experts"]);
    assert!(!tmp.join("runs").exists());
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `--preset` applies its settings before `--set`, which wins where both name a key.
#[test]
fn a_preset_sets_its_keys_and_set_overrides_them() {
    let tmp = common::temp_dir("cli-preset");
    let data = common::training_text(&tmp);
    let mut args = train_args(data.to_str().unwrap(), "p");
    args.extend(["--preset", "tuned", "--set", "train.warmup=7"]);
    let out = switch(&args, &tmp);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = switch_transformer::train::RunConfig::from_toml_file(&tmp.join("runs/p/config.toml"))
        .unwrap();
    assert!(c.model.pos_embedding);
    assert_eq!(
        c.model.init,
        switch_transformer::model::InitScheme::Independent
    );
    assert_eq!(c.train.warmup, 7);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn run_directory_problems_never_lose_checkpoints() {
    let tmp = common::temp_dir("cli-run");
    let data = common::training_text(&tmp);
    let data = data.to_str().unwrap();

    // Unwritable: the runs directory is a file.
    std::fs::write(tmp.join("afile"), "x").unwrap();
    let args: Vec<&str> = train_args(data, "x")
        .into_iter()
        .map(|a| if a == "runs" { "afile" } else { a })
        .collect();
    assert_error(&switch(&args, &tmp), &["cannot create the run directory"]);

    // A good run.
    let out = switch(&train_args(data, "good"), &tmp);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = tmp.join("runs/good");
    let before = snapshot(&run);

    // The same name again: refused, nothing touched.
    assert_error(
        &switch(&train_args(data, "good"), &tmp),
        &["already holds a run", "--resume"],
    );
    assert_eq!(snapshot(&run), before);

    // Sample and eval work on it.
    let out = switch(
        &[
            "sample",
            "--run",
            "runs/good",
            "--max-tokens",
            "12",
            "--prompt",
            "The",
        ],
        &tmp,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let text = text.strip_suffix('\n').unwrap();
    assert!(
        text.starts_with("The") && text.chars().count() == 15,
        "{text:?}"
    );
    // Greedy within the context (seq_len 8): the cache and labml's recomputation agree.
    let greedy = |extra: &[&str]| {
        let mut args = vec![
            "sample",
            "--run",
            "runs/good",
            "--max-tokens",
            "5",
            "--prompt",
            "The",
            "--temperature",
            "0",
        ];
        args.extend_from_slice(extra);
        let out = switch(&args, &tmp);
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(greedy(&[]), greedy(&["--recompute"]));
    let out = switch(&["eval", "--run", "runs/good", "--data", data], &tmp);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("perplexity"));
    let out = switch(&["report", "runs/good"], &tmp);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(run.join("report/report.html")).unwrap();
    assert!(html.contains("Routing of a text"));
    let out = switch(&["route", "--run", "runs/good", "--text", "To be"], &tmp);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("layer 0"));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains('\x1b'),
        "no colour codes into a pipe"
    );
    assert_error(
        &switch(&["report", "runs/none"], &tmp),
        &["runs/none", "not a directory"],
    );
    std::fs::remove_dir_all(run.join("report")).unwrap();
    let out = switch(
        &[
            "sample",
            "--run",
            "runs/good",
            "--prompt",
            "\u{00e9}t\u{00e9}",
        ],
        &tmp,
    );
    assert_error(&out, &["--prompt", "not in the model's vocabulary"]);

    // Resume with a configuration that no longer fits the checkpoint.
    let config = run.join("config.toml");
    let good_config = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good_config.replace("d_ff = 32", "d_ff = 48")).unwrap();
    let before = snapshot(&run);
    let out = switch(&["train", "--data", data, "--resume", "runs/good"], &tmp);
    assert_error(&out, &["unusable", "shape"]);
    assert_eq!(snapshot(&run), before);
    std::fs::write(&config, good_config).unwrap();

    let mut checkpoints = switch_transformer::train::checkpoint::list(&run.join("checkpoints"));
    let latest = checkpoints.pop().unwrap().1;
    // Only the latest is kept: with an older intact one, resume would fall back to it
    // (cli_reliability tests that).
    for (_, older) in checkpoints {
        std::fs::remove_dir_all(older).unwrap();
    }

    // Optimizer moments that do not fit the model's parameter: resume fails, nothing changes.
    let optimizer = latest.join("optimizer.safetensors");
    let good_optimizer = std::fs::read(&optimizer).unwrap();
    let mut file = switch_transformer::store::TensorFile::read(&optimizer).unwrap();
    for (name, t) in file.tensors.iter_mut() {
        if name.ends_with("attn.query.weight") {
            *t = switch_transformer::store::HostTensor::f32(vec![3], vec![0.0; 3]);
        }
    }
    file.write(&optimizer).unwrap();
    let before = snapshot(&run);
    let out = switch(&["train", "--data", data, "--resume", "runs/good"], &tmp);
    assert_error(
        &out,
        &[
            "unusable",
            "optimizer state",
            "attn.query.weight",
            "3 values",
        ],
    );
    assert_eq!(snapshot(&run), before);
    std::fs::write(&optimizer, good_optimizer).unwrap();

    // Corrupt the latest checkpoint's weights: resume fails, nothing is overwritten.
    std::fs::write(latest.join("model.safetensors"), b"not safetensors").unwrap();
    let before = snapshot(&run);
    let out = switch(&["train", "--data", data, "--resume", "runs/good"], &tmp);
    assert_error(&out, &["unusable", "model.safetensors"]);
    assert_eq!(snapshot(&run), before);

    // Resume with other data: refused.
    std::fs::write(tmp.join("other.txt"), "xyz ".repeat(1000)).unwrap();
    let out = switch(
        &["train", "--data", "other.txt", "--resume", "runs/good"],
        &tmp,
    );
    assert_error(&out, &["characters differ"]);
    assert_eq!(snapshot(&run), before);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn parity_command_reports_and_exits() {
    let tmp = common::temp_dir("cli-parity");
    let fixture = common::fixture("switch_ff_scale.safetensors");
    let out = switch(&["parity", fixture.to_str().unwrap()], &tmp);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("grad.experts.2.layer1.weight"));
    assert_eq!(stdout.lines().last(), Some("parity: PASS (1 fixtures)"));
    assert_eq!(stdout.matches("parity:").count(), 1, "one overall line");
    std::fs::write(tmp.join("junk.safetensors"), b"junk").unwrap();
    assert_error(
        &switch(&["parity", "junk.safetensors"], &tmp),
        &["junk.safetensors"],
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn data_parallel_training_on_cpu_workers() {
    let tmp = common::temp_dir("cli-devices");
    let data = common::training_text(&tmp);
    let data = data.to_str().unwrap();
    let mut args = train_args(data, "dp");
    args.extend(["--devices", "cpu,cpu"]);
    let out = switch(&args, &tmp);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = std::fs::read_to_string(tmp.join("runs/dp/config.toml")).unwrap();
    assert!(config.contains("replicas = 2"), "{config}");
    assert!(config.contains("global_routing = false"), "{config}");
    let mut args = train_args(data, "together");
    args.extend(["--devices", "cpu,cpu", "--global-routing"]);
    let out = switch(&args, &tmp);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = std::fs::read_to_string(tmp.join("runs/together/config.toml")).unwrap();
    assert!(config.contains("global_routing = true"), "{config}");

    // Three replicas cannot share a batch of two windows; collectives need CUDA; a resume
    // must place every replica.
    let mut args = train_args(data, "x");
    args.extend(["--devices", "cpu,cpu,cpu"]);
    assert_error(
        &switch(&args, &tmp),
        &["train.batch_size (2)", "train.replicas (3)"],
    );
    let mut args = train_args(data, "x");
    args.extend(["--devices", "cpu,cpu", "--grad-sync", "collective"]);
    assert_error(&switch(&args, &tmp), &["collective", "CUDA"]);
    // A resume must place every replica; global routing belongs to the run's configuration.
    let before = snapshot(&tmp.join("runs/dp"));
    let resume = |extra: &[&str]| {
        let mut args = vec!["train", "--data", data, "--resume", "runs/dp"];
        args.extend(extra);
        switch(&args, &tmp)
    };
    let out = resume(&["--devices", "cpu,cpu,cpu"]);
    assert_error(&out, &["3 devices", "train.replicas = 2"]);
    assert_eq!(before, snapshot(&tmp.join("runs/dp")));
    let out = resume(&["--global-routing"]);
    assert_error(&out, &["--global-routing", "resumed run"]);
    assert_eq!(before, snapshot(&tmp.join("runs/dp")));
    let mut args = train_args(data, "x");
    args.extend([
        "--devices",
        "cpu,cpu",
        "--global-routing",
        "--set",
        "model.route_on=device",
    ]);
    assert_error(
        &switch(&args, &tmp),
        &["train.global_routing", "model.route_on"],
    );
    assert!(!tmp.join("runs/x").exists());
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `switch bench` on a tiny model: training (one model and two threads as one model) and
/// generation, as JSON with the fields the benchmark script reads.
#[test]
fn bench_prints_timings_as_json() {
    let tmp = common::temp_dir("cli-bench");
    let tiny = [
        "bench",
        "--json",
        "--layers",
        "1",
        "--d-model",
        "16",
        "--heads",
        "2",
        "--d-ff",
        "32",
        "--batch",
        "4",
        "--seq-len",
        "8",
        "--experts",
        "4",
        "--steps",
        "3",
        "--warmup",
        "1",
    ];
    let json = |extra: &[&str]| {
        let mut args = tiny.to_vec();
        args.extend(extra);
        let out = switch(&args, &tmp);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("one JSON object")
    };
    let positive = |v: &serde_json::Value, key: &str| {
        let x = v[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing in {v}"));
        assert!(x > 0.0 && x.is_finite(), "{key} = {x}");
    };
    for extra in [&[][..], &["--replicas", "2", "--global-routing"][..]] {
        let v = json(extra);
        for key in ["tokens_per_s_median", "ms_per_step_median", "peak_rss_mb"] {
            positive(&v, key);
        }
        assert_eq!(v["config"]["model"]["n_experts"], 4, "{v}");
    }
    let v = json(&["--generate", "--tokens", "5"]);
    for key in ["cached_tokens_per_s", "recompute_tokens_per_s", "speedup"] {
        positive(&v, key);
    }
    // Host issuing and the wait in the read are part of the step.
    let v = json(&[]);
    let (host, read) = (v["host_ms_median"].as_f64(), v["read_ms_median"].as_f64());
    assert!(
        host.is_some_and(|h| h > 0.0) && read.is_some_and(|r| r >= 0.0),
        "{v}"
    );
    // The routing decision alone: one JSON line per token count, Burn's cumsum timed only up
    // to --routing-burn-max.
    let out = switch(
        &[
            "bench",
            "--json",
            "--routing",
            "300,1000",
            "--routing-burn-max",
            "500",
            "--steps",
            "2",
        ],
        &tmp,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["tokens"], 300);
    assert_eq!(rows[1]["tokens"], 1000);
    for r in &rows {
        positive(r, "decision_ms_median");
        positive(r, "decision_ns_per_token");
        positive(r, "scan_ms_median");
    }
    positive(&rows[0], "burn_cumsum_ms_median");
    assert!(rows[1]["burn_cumsum_ms_median"].is_null(), "{}", rows[1]);
    let out = switch(&["bench", "--routing", "0"], &tmp);
    assert!(!out.status.success());
    // A model that cannot fit is refused with an estimate before anything is allocated.
    let out = switch(&["bench", "--experts", "100000000"], &tmp);
    assert_error(&out, &["needs about", "GiB"]);
    std::fs::remove_dir_all(&tmp).unwrap();
}
