//! The `switch` binary under the conditions a run meets outside a terminal session: signals
//! from a scheduler, extending and resuming runs, unsafe names, pipes that close, odd input.

use crate::common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn switch(args: &[&str], cwd: &Path) -> Output {
    switch_with_log(args, cwd, None)
}

/// `switch` with `RUST_LOG` set to `log`, or unset.
fn switch_with_log(args: &[&str], cwd: &Path, log: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switch"));
    command.args(args).current_dir(cwd).env_remove("RUST_LOG");
    if let Some(log) = log {
        command.env("RUST_LOG", log);
    }
    command.output().expect("run the switch binary")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A tiny model; `steps` training steps.
fn tiny(steps: u64) -> Vec<String> {
    [
        "model.d_model=16",
        "model.heads=2",
        "model.d_ff=32",
        "model.n_layers=1",
        "train.batch_size=2",
        "train.seq_len=8",
        "train.eval_interval=1000000",
        "train.eval_batches=1",
        "train.log_interval=1",
        "train.checkpoint_interval=1000000",
        "train.sample_tokens=4",
        "train.sample_prompt=t",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("train.steps={steps}")])
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

fn train_args(data: &str, name: &str, steps: u64) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--data",
        data,
        "--name",
        name,
        "--runs-dir",
        "runs",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(tiny(steps));
    a
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[cfg(unix)]
#[test]
fn sigterm_and_sighup_checkpoint_and_the_printed_hint_resumes() {
    let tmp = common::temp_dir("cli-signal");
    let data = common::training_text(&tmp);
    let data = data.to_str().unwrap();
    for (signal, name) in [("TERM", "term"), ("HUP", "hup")] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switch"))
            .args(strs(&train_args(data, name, 1_000_000)))
            .current_dir(&tmp)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for training to be under way (a metrics line), then signal.
        let metrics = tmp.join("runs").join(name).join("metrics.jsonl");
        common::wait_for("training to start", Duration::from_secs(60), || {
            std::fs::read_to_string(&metrics).is_ok_and(|t| t.lines().count() >= 3)
        });
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let stop = format!("SIG{signal} to stop it");
        let code = common::exits_within(&mut child, Duration::from_secs(60), &stop).code();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert_eq!(code, Some(130), "SIG{signal}: {err}");
        // The hint, run as printed (plus a new length for the run), continues it.
        let hint = err
            .split('`')
            .nth(1)
            .unwrap_or_else(|| panic!("no resume hint: {err}"));
        let words: Vec<&str> = hint.split_whitespace().collect();
        assert_eq!(&words[..3], ["switch", "train", "--resume"], "{hint}");
        assert!(
            hint.contains("--data"),
            "the hint must name the data: {hint}"
        );
        let mut args: Vec<&str> = words[1..].to_vec();
        args.extend(["--set", "train.steps=1"]);
        let out = switch(&args, &tmp);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("is finished"),
            "a finished run says so: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // That no-op length was not recorded: the run keeps its own.
        let config =
            std::fs::read_to_string(tmp.join("runs").join(name).join("config.toml")).unwrap();
        assert!(!config.lines().any(|l| l.trim() == "steps = 1"), "{config}");
        let ckpts = std::fs::read_dir(tmp.join("runs").join(name).join("checkpoints"))
            .unwrap()
            .count();
        assert_eq!(ckpts, 1, "SIG{signal} wrote one checkpoint");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn a_run_is_extended_with_set_and_unsafe_keys_are_refused_by_name() {
    let tmp = common::temp_dir("cli-extend");
    let data = common::training_text(&tmp);
    let data = data.to_str().unwrap();
    let out = switch(&strs(&train_args(data, "r", 3)), &tmp);
    assert!(out.status.success(), "{}", stderr(&out));
    // Finished: said so, exit 0, nothing trained.
    let resume = ["train", "--resume", "runs/r", "--data", data];
    let out = switch(&resume, &tmp);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("is finished: step 3"));
    // An unknown key is named as unknown, not as one that cannot change.
    let mut unknown = resume.to_vec();
    unknown.extend(["--set", "train.bogus=1"]);
    let out = switch(&unknown, &tmp);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("train.bogus") && !stderr(&out).contains("cannot change"),
        "{}",
        stderr(&out)
    );
    // A key that would change the model: refused, by name.
    let mut bad = resume.to_vec();
    bad.extend(["--set", "model.d_model=32"]);
    let out = switch(&bad, &tmp);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("model.d_model cannot change"),
        "{}",
        stderr(&out)
    );
    // Extended to 5 steps: trains steps 4 and 5 and records the new length.
    let mut extend = resume.to_vec();
    extend.extend(["--set", "train.steps=5"]);
    let out = switch(&extend, &tmp);
    assert!(out.status.success(), "{}", stderr(&out));
    let config = std::fs::read_to_string(tmp.join("runs/r/config.toml")).unwrap();
    assert!(config.contains("steps = 5"), "{config}");
    let metrics = std::fs::read_to_string(tmp.join("runs/r/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"step\":5"), "{metrics}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn run_names_must_be_plain() {
    let tmp = common::temp_dir("cli-names");
    let data = common::training_text(&tmp);
    let data = data.to_str().unwrap();
    for name in ["", ".", "..", "../x", "a/b", "/abs"] {
        let out = switch(&strs(&train_args(data, name, 2)), &tmp);
        assert!(!out.status.success(), "--name {name:?} was accepted");
        assert!(
            stderr(&out).contains("not a plain run name"),
            "{}",
            stderr(&out)
        );
    }
    assert!(!tmp.join("x").exists() && !tmp.join("runs/a").exists());
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn bad_sampling_flags_prompts_and_positions_are_refused_up_front() {
    let tmp = common::temp_dir("cli-upfront");
    let data = common::training_text(&tmp);
    let data = data.to_str().unwrap();
    for (flag, value, needle) in [
        ("--temperature", "nan", "--temperature"),
        ("--temperature=-1", "", "--temperature"),
        ("--top-k", "0", "--top-k"),
    ] {
        let mut args = vec!["sample", "--run", "runs/none", flag];
        if !value.is_empty() {
            args.push(value);
        }
        let out = switch(&args, &tmp);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains(needle),
            "{flag} {value}: {}",
            stderr(&out)
        );
    }
    // A sample prompt the data cannot encode: refused before any training.
    let mut args = train_args(data, "prompt", 2);
    args.extend(["--set".into(), "train.sample_prompt=Ω".into()]);
    let out = switch(&strs(&args), &tmp);
    assert!(
        stderr(&out).contains("train.sample_prompt"),
        "{}",
        stderr(&out)
    );
    assert!(!tmp.join("runs/prompt/checkpoints").exists());
    // Learned positions shorter than the sequences.
    let mut args = train_args(data, "pos", 2);
    for s in ["model.pos_embedding=true", "model.max_seq_len=4"] {
        args.extend(["--set".into(), s.into()]);
    }
    let out = switch(&strs(&args), &tmp);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("model.max_seq_len"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[cfg(unix)]
#[test]
fn a_closed_pipe_ends_quietly_and_a_bom_is_not_a_character() {
    let tmp = common::temp_dir("cli-pipe");
    let text = std::fs::read_to_string(common::training_text(&tmp)).unwrap();
    let data = tmp.join("bom.txt");
    std::fs::write(&data, format!("\u{feff}{text}")).unwrap();
    let data = data.to_str().unwrap();
    let out = switch(&strs(&train_args(data, "r", 2)), &tmp);
    assert!(out.status.success(), "{}", stderr(&out));
    let vocab = std::fs::read_to_string(tmp.join("runs/r/vocab.json")).unwrap();
    assert!(!vocab.contains('\u{feff}'), "{vocab}");
    // Read one byte of a long sample, then close the pipe.
    let mut child = Command::new(env!("CARGO_BIN_EXE_switch"))
        .args([
            "sample",
            "--run",
            "runs/r",
            "--prompt",
            "t",
            "--max-tokens",
            "200000",
        ])
        .current_dir(&tmp)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut byte = [0u8; 1];
    child.stdout.take().unwrap().read_exact(&mut byte).unwrap(); // dropped: pipe closed
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn resume_skips_a_damaged_newest_checkpoint_and_tidies_interrupted_writes() {
    let tmp = common::temp_dir("cli-fallback");
    let data = common::training_text(&tmp);
    let data = data.to_str().unwrap();
    let mut args = train_args(data, "r", 4);
    args.extend(["--set".into(), "train.checkpoint_interval=2".into()]);
    let out = switch(&strs(&args), &tmp);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = tmp.join("runs/r");
    // The newest checkpoint damaged; what a kill mid-save and mid-removal leaves behind.
    std::fs::write(
        run.join("checkpoints/step-0000004/model.safetensors"),
        b"damaged",
    )
    .unwrap();
    std::fs::create_dir_all(run.join("checkpoints/.step-0000006.partial")).unwrap();
    std::fs::create_dir_all(run.join("checkpoints/.step-0000001.deleting")).unwrap();
    std::fs::rename(run.join("best"), run.join(".best.old")).unwrap();
    let out = switch(
        &[
            "train",
            "--resume",
            "runs/r",
            "--data",
            data,
            "--set",
            "train.steps=6",
        ],
        &tmp,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("skipping checkpoint runs/r/checkpoints/step-0000004"),
        "{err}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("at step 2"),
        "resumed from the older checkpoint"
    );
    assert!(run.join("best").is_dir(), "best/ restored");
    assert!(!run.join(".best.old").exists());
    assert!(!run.join("checkpoints/.step-0000006.partial").exists());
    assert!(!run.join("checkpoints/.step-0000001.deleting").exists());
    let steps: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(steps.contains(&"step-0000006".to_string()), "{steps:?}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[cfg(unix)]
#[test]
fn one_writer_per_run_and_a_dead_writers_lock_is_taken_over() {
    let tmp = common::temp_dir("cli-lock");
    let data = common::training_text(&tmp);
    let data = data.to_str().unwrap();
    let mut args = train_args(data, "r", 1_000_000);
    args.extend(["--set".into(), "train.checkpoint_interval=2".into()]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_switch"))
        .args(strs(&args))
        .current_dir(&tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let run = tmp.join("runs/r");
    // (Checkpoints come and go: every second step, three kept.)
    common::wait_for("a checkpoint", Duration::from_secs(60), || {
        std::fs::read_dir(run.join("checkpoints")).is_ok_and(|mut d| d.next().is_some())
    });
    let lock = std::fs::read_to_string(run.join("lock")).unwrap();
    assert!(lock.starts_with(&child.id().to_string()), "{lock}");
    // A second writer: refused, with the holder named.
    let resume = ["train", "--resume", "runs/r", "--data", data];
    let out = switch(&resume, &tmp);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("is being trained by process") && err.contains(&child.id().to_string()),
        "{err}"
    );
    // The writer killed without a chance to clean up: its lock is stale and taken over.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(run.join("lock").exists());
    let mut extend = resume.to_vec();
    extend.extend(["--set", "train.steps=3"]);
    let out = switch(&extend, &tmp);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no longer runs: taking it over"),
        "{}",
        stderr(&out)
    );
    assert!(!run.join("lock").exists(), "released at the end");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn a_model_that_cannot_fit_is_refused_before_allocating() {
    let tmp = common::temp_dir("cli-memory");
    let data = common::training_text(&tmp);
    let data = data.to_str().unwrap();
    for (key, name) in [
        ("model.d_model=1000000", "wide"),
        ("model.n_experts=10000000", "many"),
    ] {
        let mut args = train_args(data, name, 2);
        args.extend(["--set".into(), key.into()]);
        let out = switch(&strs(&args), &tmp);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("needs about"),
            "{key}: {}",
            stderr(&out)
        );
        assert!(
            !tmp.join("runs").join(name).exists(),
            "{key}: nothing written"
        );
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn a_cut_or_edited_config_is_refused_on_resume() {
    let tmp = common::temp_dir("cli-config-cut");
    let data = common::training_text(&tmp);
    let data = data.to_str().unwrap();
    let mut args = train_args(data, "r", 2);
    args.extend(["--set".into(), "train.checkpoint_interval=2".into()]);
    let out = switch(&strs(&args), &tmp);
    assert!(out.status.success(), "{}", stderr(&out));
    let path = tmp.join("runs/r/config.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    let resume = [
        "train",
        "--resume",
        "runs/r",
        "--data",
        data,
        "--set",
        "train.steps=3",
    ];
    // Cut after the [model] section: every [train] key would take its default.
    let cut = &good[..good.find("[train]").unwrap()];
    std::fs::write(&path, cut).unwrap();
    let out = switch(&resume, &tmp);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("lacks") && stderr(&out).contains("train.batch_size"),
        "{}",
        stderr(&out)
    );
    // A model key edited (the weights' shapes still fit): the checkpoint's copy disagrees.
    std::fs::write(
        &path,
        good.replace("capacity_factor = 1.2", "capacity_factor = 2.0"),
    )
    .unwrap();
    let out = switch(&resume, &tmp);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("model.capacity_factor"),
        "{}",
        stderr(&out)
    );
    std::fs::write(&path, &good).unwrap();
    let out = switch(&resume, &tmp);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn a_run_records_its_text_and_refuses_a_changed_one() {
    let tmp = common::temp_dir("cli-data-record");
    let text = std::fs::read_to_string(common::training_text(&tmp)).unwrap();
    let data = tmp.join("text.txt");
    std::fs::write(&data, &text).unwrap();
    let data_s = data.to_str().unwrap();
    let mut args = train_args(data_s, "r", 2);
    args.extend(["--set".into(), "train.checkpoint_interval=2".into()]);
    let out = switch(&strs(&args), &tmp);
    assert!(out.status.success(), "{}", stderr(&out));
    let record = std::fs::read_to_string(tmp.join("runs/r/data.json")).unwrap();
    assert!(
        record.contains("sha256") && record.contains("text.txt"),
        "{record}"
    );
    // eval and --resume find the text without --data.
    let out = switch(&["eval", "--run", "runs/r"], &tmp);
    assert!(out.status.success(), "{}", stderr(&out));
    let resume = ["train", "--resume", "runs/r", "--set", "train.steps=3"];
    let out = switch(&resume, &tmp);
    assert!(out.status.success(), "{}", stderr(&out));
    // The same characters in another order: another text, refused by name...
    let mut lines: Vec<&str> = text.lines().collect();
    lines.reverse();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    for args in [
        &["eval", "--run", "runs/r"][..],
        &["train", "--resume", "runs/r", "--set", "train.steps=4"],
    ] {
        let out = switch(args, &tmp);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr(&out).contains("has changed since"),
            "{}",
            stderr(&out)
        );
    }
    // ...unless --data names it explicitly.
    let out = switch(&["eval", "--run", "runs/r", "--data", data_s], &tmp);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("is not the text"), "{}", stderr(&out));
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// A FIFO (or another file that is not a regular one) as --data is refused at once, before a
/// run folder exists: before, the text was read twice (to load, then to hash), so the second
/// open waited for a writer that was gone, and the run folder was left half made.
#[cfg(unix)]
#[test]
fn a_fifo_or_directory_as_data_is_refused_before_a_run_folder_is_made() {
    let tmp = common::temp_dir("cli-fifo");
    let fifo = tmp.join("data.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    // A writer that writes a whole text once, as `cat text > data.fifo` does; opening the FIFO
    // blocks until a reader comes, so it runs on a thread of its own.
    let text = std::fs::read(common::training_text(&tmp)).unwrap();
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().write(true).open(&fifo)?;
            f.write_all(&text)
        })
    };
    for data in [fifo.to_str().unwrap(), tmp.to_str().unwrap()] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switch"))
            .args(strs(&train_args(data, "f", 2)))
            .current_dir(&tmp)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            panic!("--data {data}: still running after 30 s");
        }
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "--data {data} was accepted");
        let err = stderr(&out);
        assert!(err.contains("give a regular text file"), "{err}");
        assert!(
            !tmp.join("runs/f").exists(),
            "--data {data} left a run folder"
        );
    }
    // The writer is still waiting for a reader: open the FIFO to let it finish.
    drop(std::fs::File::open(&fifo).unwrap());
    let _ = writer.join().unwrap();
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn diagnostics_go_through_tracing_and_follow_rust_log() {
    let tmp = common::temp_dir("cli-logging");
    let run = tmp.join("torn");
    std::fs::create_dir_all(&run).unwrap();
    // A metrics file whose last line was cut mid-write (a warning from the library) and no model
    // to route with (a note from the CLI).
    let good = r#"{"step":1,"epoch":0,"train_loss":4.0,"ce_loss":3.9,"lb_loss":2.0,"z_loss":0.0,"lr":0.001,"grad_norm":1.0,"tokens_per_s":1000.0,"dropped_frac":0.0,"layers":[]}"#;
    std::fs::write(
        run.join("metrics.jsonl"),
        format!("{good}\n{{\"step\":2,\"train_lo"),
    )
    .unwrap();
    let report = ["report", "torn", "--out", "out"];
    // Default: short lines, no time or module.
    let out = switch_with_log(&report, &tmp, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.lines()
            .any(|l| l.starts_with("warning: ") && l.contains("line 2 is incomplete")),
        "{err}"
    );
    assert!(
        err.lines().any(|l| l.starts_with("note: no routing table")),
        "{err}"
    );
    // RUST_LOG picks levels and modules, in tracing's full format.
    let out = switch_with_log(&report, &tmp, Some("switch_transformer=warn"));
    let err = stderr(&out);
    assert!(
        err.contains("WARN") && err.contains("switch_transformer::train::run_dir"),
        "{err}"
    );
    assert!(
        !err.contains("no routing table"),
        "info is below warn: {err}"
    );
    let out = switch_with_log(&report, &tmp, Some("off"));
    assert!(out.status.success());
    assert_eq!(stderr(&out), "");
    // A filter that does not parse: the default, with a warning naming it.
    let out = switch_with_log(&report, &tmp, Some("[="));
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("RUST_LOG=\"[=\" is not a valid filter")
            && err.contains("line 2 is incomplete"),
        "{err}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// A model without a Switch layer (`model.switch_every` beyond the layers) is described as
/// dense, not as "N layers x E experts".
#[test]
fn a_dense_model_is_described_as_dense() {
    let tmp = common::temp_dir("cli-dense");
    let data = common::training_text(&tmp);
    let mut args = train_args(data.to_str().unwrap(), "d", 1);
    args.extend(["--set".to_string(), "model.switch_every=100".to_string()]);
    let out = switch(&strs(&args), &tmp);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("dense layers (no Switch layer)") && !stdout.contains("experts,"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// After a divergence the advice is a command that works as printed: the learning rate and its
/// warm-up may change on resume, and the printed resume continues from the last checkpoint.
#[test]
fn the_advice_after_a_divergence_works_as_printed() {
    let tmp = common::temp_dir("cli-diverge-advice");
    let data = common::training_text(&tmp);
    let data = data.to_str().unwrap();
    let out = switch(&strs(&train_args(data, "div", 2)), &tmp);
    assert!(out.status.success(), "{}", stderr(&out));
    let resume = |extra: &[&str]| {
        let mut a = vec!["train", "--resume", "runs/div", "--data", data];
        a.extend(extra);
        switch(&a, &tmp)
    };
    let out = resume(&[
        "--set",
        "train.steps=6",
        "--set",
        "train.lr=1e30",
        "--set",
        "train.warmup=1",
    ]);
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("not finite"), "{err}");
    let hint = err
        .split('`')
        .nth(1)
        .unwrap_or_else(|| panic!("no command in the advice: {err}"));
    let words: Vec<&str> = hint.split_whitespace().collect();
    assert_eq!(&words[..3], ["switch", "train", "--resume"], "{hint}");
    assert!(hint.contains("--set train.lr=5e29"), "{hint}");
    // As printed: accepted, resumed from the checkpoint (and, at 5e29, diverging again).
    let out = switch(&words[1..], &tmp);
    let err = stderr(&out);
    assert!(!err.contains("cannot change"), "{err}");
    assert!(err.contains("not finite"), "{err}");
    // With a sane rate, the same command finishes the run.
    let sane: Vec<&str> = words[1..]
        .iter()
        .map(|w| {
            if w.starts_with("train.lr=") {
                "train.lr=0.01"
            } else {
                w
            }
        })
        .collect();
    let out = switch(&sane, &tmp);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// A run that diverges before its first checkpoint is no dead end: `--resume` and the advice
/// both print `switch train --restart RUN`, which starts it again in place from step 0 with its
/// configuration and text (and the printed lower rate); a run with a checkpoint, or one that
/// another process trains, is never restarted.
#[test]
fn a_run_without_a_checkpoint_restarts_in_place_as_printed() {
    let tmp = common::temp_dir("cli-restart");
    let data = common::training_text(&tmp);
    let mut args = train_args(data.to_str().unwrap(), "r", 4);
    args.extend(["train.lr=1e30", "train.warmup=1"].map(|s| format!("--set={s}")));
    let out = switch(&strs(&args), &tmp);
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("not finite"), "{err}");
    let command = |err: &str| -> Vec<String> {
        let hint = err.split('`').nth(1).unwrap_or_else(|| panic!("{err}"));
        hint.split_whitespace().skip(1).map(String::from).collect()
    };
    let advice = command(&err);
    assert_eq!(advice[..3], ["train", "--restart", "runs/r"], "{err}");
    // --resume has nothing to resume and says how to restart.
    let out = switch(&["train", "--resume", "runs/r"], &tmp);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert_eq!(command(&err), ["train", "--restart", "runs/r"], "{err}");
    // The advice as printed (at 5e29 it diverges again, from step 0 of a fresh run)...
    let out = switch(&strs(&advice), &tmp);
    assert!(stderr(&out).contains("not finite"), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("restarting runs/r from step 0"), "{stdout}");
    // ...and with a sane rate, to the end: the run's settings and text, the new rate.
    let out = switch(
        &["train", "--restart", "runs/r", "--set", "train.lr=0.01"],
        &tmp,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let config = std::fs::read_to_string(tmp.join("runs/r/config.toml")).unwrap();
    assert!(
        config.contains("lr = 0.01") && config.contains("steps = 4"),
        "{config}"
    );
    let metrics = std::fs::read_to_string(tmp.join("runs/r/metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .collect();
    assert_eq!(
        steps.first(),
        Some(&1),
        "the old metrics were kept: {metrics}"
    );
    assert!(tmp.join("runs/r/data.json").is_file());
    // Now it has a checkpoint: never restarted.
    let out = switch(&["train", "--restart", "runs/r"], &tmp);
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains("never removes"),
        "{err}"
    );
    assert!(tmp.join("runs/r/best/state.json").is_file());
    // A run without a checkpoint that a live process holds (its lock names this test's
    // process on this host) is not touched either.
    args[4] = "q".into();
    let out = switch(&strs(&args), &tmp);
    assert!(!out.status.success(), "{}", stderr(&out));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let lock = format!("{} {}\n", std::process::id(), host.trim());
    std::fs::write(tmp.join("runs/q/lock"), lock).unwrap();
    let out = switch(&["train", "--restart", "runs/q"], &tmp);
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains("is being trained by"),
        "{err}"
    );
    assert!(tmp.join("runs/q/config.toml").is_file() && tmp.join("runs/q/lock").is_file());
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `--resume` falls back to a complete `best/` when no checkpoint is left in `checkpoints/`.
#[test]
fn resume_falls_back_to_the_best_checkpoint() {
    let tmp = common::temp_dir("cli-resume-best");
    let data = common::training_text(&tmp);
    let data = data.to_str().unwrap();
    let out = switch(&strs(&train_args(data, "b", 2)), &tmp);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = tmp.join("runs/b");
    assert!(run.join("best/state.json").is_file());
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    let out = switch(
        &[
            "train",
            "--resume",
            "runs/b",
            "--data",
            data,
            "--set",
            "train.steps=3",
        ],
        &tmp,
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resuming from best/"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("at step 2"));
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// A second signal ends the run at once (during a long training step, where the first one
/// waits for the step to end) but releases the run's lock and says so, with the command that
/// resumes it.
#[test]
fn a_second_signal_leaves_at_once_and_releases_the_lock() {
    let tmp = common::temp_dir("cli-second-signal");
    let data = common::training_text(&tmp);
    let mut args = train_args(data.to_str().unwrap(), "s", 1_000_000);
    // Steps of 16k tokens through a 128-wide model: about a second each here, so that both
    // signals (30 ms apart, sent just after step 1's checkpoint) come during step 2.
    for set in [
        "model.d_model=128",
        "model.heads=4",
        "model.d_ff=512",
        "train.batch_size=256",
        "train.seq_len=64",
        "train.checkpoint_interval=1",
    ] {
        args.extend(["--set".to_string(), set.to_string()]);
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_switch"))
        .args(strs(&args))
        .current_dir(&tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = tmp.join("runs/s");
    common::wait_for("a checkpoint", Duration::from_secs(60), || {
        !switch_transformer::train::checkpoint::list(&run.join("checkpoints")).is_empty()
    });
    assert!(run.join("lock").exists());
    for _ in 0..2 {
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        std::thread::sleep(Duration::from_millis(30));
    }
    let code = common::exits_within(&mut child, Duration::from_secs(5), "two SIGTERMs").code();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(code, Some(130), "{err}");
    assert!(
        err.contains("second signal") && err.contains("lock"),
        "{err}"
    );
    assert!(!run.join("lock").exists(), "the lock is released");
    // The printed command resumes the run.
    let hint = err.split('`').nth(1).unwrap_or_else(|| panic!("{err}"));
    let mut resume: Vec<&str> = hint.split_whitespace().skip(1).collect();
    resume.extend(["--set", "train.steps=1"]);
    let out = switch(&resume, &tmp);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// One stop signal during validation is answered within the time of one validation batch or
/// one sampled token, not after the whole sample (here 10,000 tokens of a 6-layer model with
/// a 64-token window: about 25 s on a CPU): the run ends with the usual checkpoint of its
/// step, and no validation line for the validation it cut short.
#[cfg(unix)]
#[test]
fn a_stop_signal_during_validation_is_answered_at_once() {
    let tmp = common::temp_dir("cli-signal-validation");
    let data = common::training_text(&tmp);
    let mut args = train_args(data.to_str().unwrap(), "v", 1_000_000);
    for set in [
        "model.d_model=128",
        "model.heads=4",
        "model.d_ff=512",
        "model.n_layers=6",
        "train.seq_len=64",
        "train.eval_interval=1",
        "train.sample_tokens=10000",
    ] {
        args.extend(["--set".to_string(), set.to_string()]);
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_switch"))
        .args(strs(&args))
        .current_dir(&tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = tmp.join("runs/v");
    // Step 1's training line is written just before its validation starts.
    common::wait_for("step 1's metrics", Duration::from_secs(60), || {
        std::fs::read_to_string(run.join("metrics.jsonl")).is_ok_and(|m| m.contains("train_loss"))
    });
    let sent = std::time::Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = common::exits_within(
        &mut child,
        Duration::from_secs(60),
        "a SIGTERM in validation",
    );
    let took = sent.elapsed();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(code.code(), Some(130), "{err}");
    assert!(
        took < Duration::from_secs(5),
        "the signal waited {took:?} for validation to end: {err}"
    );
    let steps: Vec<u64> = switch_transformer::train::checkpoint::list(&run.join("checkpoints"))
        .into_iter()
        .map(|(step, _)| step)
        .collect();
    assert_eq!(steps, [1], "{err}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(!metrics.contains("valid_loss"), "{metrics}");
    assert!(!run.join("lock").exists(), "the lock is released");
    std::fs::remove_dir_all(&tmp).unwrap();
}
