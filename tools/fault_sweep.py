#!/usr/bin/env python3
"""A fault sweep of the release binary (issue 29): hostile invocations of every kind a user or
a scheduler produces, each judged by what must never happen.

    python3 tools/fault_sweep.py [--switch target/release/switch] [--mpi-switch BIN] [--seed N]

Kinds of case (counts are printed at the end, by kind and outcome):
  values   `switch train --set key=value` with a hostile value for every configuration key
  data     odd training files: empty, one character, binary, invalid UTF-8, a FIFO, a folder
  hf       damaged Hugging Face folders (truncated or corrupted weights, broken or hostile
           config.json, missing files) through `seq2seq`, `route` and `convert`
  signals  SIGINT, SIGTERM, SIGHUP or SIGKILL at a random moment of a training run, then the
           resume (or the restart) it calls for, which must succeed
  ranks    `mpirun -np 1 A : -np 1 B` jobs whose ranks disagree or whose rank 0 cannot start
           (only with --mpi-switch: a binary built with `--features mpi`)

Never allowed (a case with one of them is a FAILURE): a panic, a process still running after
its time limit (a hang), a peak resident memory above 2 GiB, an error exit with nothing on
standard error, a successful exit where a refusal was required, a resume that does not succeed
after a signal (lost work). Everything else is counted as `ok` (it ran) or `refused` (a clear
error).
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT_RSS_KIB = 2 * 1024 * 1024
TINY = [
    "model.d_model=16", "model.heads=2", "model.d_ff=32", "model.n_layers=2",
    "train.batch_size=4", "train.seq_len=16", "train.steps=4", "train.eval_interval=2",
    "train.eval_batches=2", "train.checkpoint_interval=2", "train.log_interval=1",
    "train.sample_tokens=8", "train.sample_prompt=t",
]
HOSTILE = ["", "-1", "0", "1", "nan", "inf", "-inf", "1e309", "18446744073709551616",
           "4294967297", "abc", "0.5", "true", "9999999", "1e-45", "\u00e9\u00e9", "x" * 5000]


def run(cmd, timeout, cwd=None, stdin=None):
    """(exit code or None on a hang, stdout, stderr, peak RSS in KiB)."""
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=stdin or subprocess.DEVNULL)
    try:
        out, err = p.communicate(timeout=timeout)
        code = p.returncode
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        code = None
    try:
        _, _, ru = os.wait4(p.pid, os.WNOHANG)
        rss = ru.ru_maxrss
    except ChildProcessError:
        rss = 0
    return code, out.decode(errors="replace"), err.decode(errors="replace"), rss


def judge(code, err, rss, must_refuse=False):
    """The outcome of one process: ok, refused, or a FAILURE with its reason."""
    if code is None:
        return "FAILURE: hang"
    if "panicked" in err or code == 101:
        return "FAILURE: panic: " + err.strip().splitlines()[-1][:200] if err.strip() else "FAILURE: panic"
    if code < 0 and code != -signal.SIGKILL:
        return f"FAILURE: killed by signal {-code}"
    if rss > LIMIT_RSS_KIB:
        return f"FAILURE: peak RSS {rss / 1024:.0f} MiB"
    if code == 0:
        return "FAILURE: accepted what must be refused" if must_refuse else "ok"
    if not err.strip():
        return "FAILURE: error exit with no message"
    return "refused: " + err.strip().splitlines()[-1][:160]


def keys():
    text = (ROOT / "src/train/config.rs").read_text()
    return sorted(set(re.findall(r'"((?:model|train)\.[a-z_0-9]+)"', text)))


def values_cases(exe, data, tmp, rng):
    for key in keys():
        for value in rng.sample(HOSTILE, 5):
            runs = tmp / "values"
            sets = [a for s in TINY + [f"{key}={value}"] for a in ("--set", s)]
            code, _, err, rss = run([exe, "train", "--data", data, "--runs-dir", str(runs),
                                     "--name", f"v{rng.randrange(1 << 30)}"] + sets, 120)
            yield f"train --set {key}={value[:20]!r}", judge(code, err, rss)
            shutil.rmtree(runs, ignore_errors=True)


def data_cases(exe, tmp):
    d = tmp / "data"
    d.mkdir()
    files = {
        "empty": b"",
        "one character": b"a",
        "shorter than a window": b"abcdefgh",
        "binary": bytes(range(256)) * 64,
        "invalid UTF-8": b"hello \xff\xfe world " * 200,
        "NUL bytes": b"\x00" * 4096,
        "one long line": b"x" * 200_000,
    }
    for name, content in files.items():
        f = d / name.replace(" ", "_")
        f.write_bytes(content)
        yield f, name
    (d / "folder").mkdir()
    yield d / "folder", "a folder"
    yield d / "missing", "a missing file"
    fifo = d / "fifo"
    os.mkfifo(fifo)
    yield fifo, "a FIFO"


def data_run(exe, tmp):
    for path, name in data_cases(exe, tmp):
        sets = [a for s in TINY for a in ("--set", s)]
        runs = tmp / "data-runs"
        code, _, err, rss = run([exe, "train", "--data", str(path), "--runs-dir", str(runs),
                                 "--name", "d"] + sets, 120)
        refuse = name in ("empty", "a folder", "a missing file", "a FIFO", "one character")
        yield f"train --data <{name}>", judge(code, err, rss, must_refuse=refuse)
        shutil.rmtree(runs, ignore_errors=True)


def damaged_hf(src, dst, rng):
    """A copy of the fixture `src` at `dst` with one damage; its description."""
    shutil.copytree(src, dst)
    w = dst / "model.safetensors"
    blob = w.read_bytes()
    header = int.from_bytes(blob[:8], "little")
    cfg = json.loads((dst / "config.json").read_text())
    kind = rng.choice(["truncate", "header byte", "data bytes", "header length", "no file",
                       "config json", "config value", "tokenizer"])
    if kind == "truncate":
        cut = rng.randrange(0, len(blob))
        w.write_bytes(blob[:cut])
        return f"model.safetensors cut at {cut}/{len(blob)}"
    if kind == "header byte":
        b = bytearray(blob)
        i = rng.randrange(8, 8 + header)
        b[i] = rng.randrange(256)
        w.write_bytes(bytes(b))
        return f"header byte {i} changed"
    if kind == "data bytes":
        b = bytearray(blob)
        for _ in range(rng.randrange(1, 64)):
            i = rng.randrange(8 + header, len(b))
            b[i] = rng.choice([0xFF, 0x7F, 0x80, rng.randrange(256)])
        w.write_bytes(bytes(b))
        return "weight bytes changed"
    if kind == "header length":
        n = rng.choice([0, 1, header - 1, header + 1, 1 << 40, (1 << 64) - 1])
        w.write_bytes(n.to_bytes(8, "little") + blob[8:])
        return f"header length {n}"
    if kind == "no file":
        f = rng.choice(["config.json", "model.safetensors", "tokenizer.json"])
        (dst / f).unlink()
        return f"{f} missing"
    if kind == "config json":
        text = (dst / "config.json").read_text()
        (dst / "config.json").write_text(text[: rng.randrange(len(text))])
        return "config.json cut short"
    if kind == "config value":
        key = rng.choice(["d_model", "num_experts", "num_heads", "d_kv", "d_ff", "num_layers",
                          "vocab_size", "expert_capacity", "layer_norm_epsilon",
                          "relative_attention_num_buckets", "num_sparse_encoder_layers",
                          "decoder_start_token_id", "eos_token_id", "pad_token_id"])
        value = rng.choice([0, -1, 1 << 40, 1.5, None, "x", 1e308])
        cfg[key] = value
        (dst / "config.json").write_text(json.dumps(cfg))
        return f"config.json {key} = {value!r}"
    text = (dst / "tokenizer.json").read_text()
    (dst / "tokenizer.json").write_text(text[: rng.randrange(len(text))])
    return "tokenizer.json cut short"


def hf_cases(exe, tmp, rng, n):
    src = ROOT / "tests/data/hf/tiny"
    for i in range(n):
        dst = tmp / f"hf{i}"
        what = damaged_hf(src, dst, rng)
        command = rng.choice(["seq2seq", "route", "convert"])
        args = {"seq2seq": ["--input", "A dog.", "--max-tokens", "4"],
                "route": ["--text", "A dog."],
                "convert": ["--out", str(tmp / f"hf{i}-out")]}[command]
        code, _, err, rss = run([exe, command, "--model", str(dst)] + args, 120)
        yield f"{command} ({what})", judge(code, err, rss)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.rmtree(tmp / f"hf{i}-out", ignore_errors=True)


def signal_cases(exe, data, tmp, rng, n):
    sets = [a for s in TINY for a in ("--set", s)]
    # Long enough to be caught in every phase: steps, validations, samples, checkpoints.
    sets += ["--set", "train.steps=1000000", "--set", "model.d_model=64", "--set",
             "model.d_ff=256", "--set", "train.seq_len=64", "--set", "train.sample_tokens=300"]
    for i in range(n):
        runs = tmp / f"sig{i}"
        sig = rng.choice([signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
        delay = rng.uniform(0.05, 4.0)
        p = subprocess.Popen([exe, "train", "--data", data, "--runs-dir", str(runs), "--name",
                              "r"] + sets, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(delay)
        sent = time.monotonic()
        p.send_signal(sig)
        try:
            _, err = p.communicate(timeout=30)
            took = time.monotonic() - sent
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            yield f"{sig.name} after {delay:.2f} s", "FAILURE: hang after the signal"
            continue
        err = err.decode(errors="replace")
        what = f"{sig.name} after {delay:.2f} s"
        if "panicked" in err:
            yield what, "FAILURE: panic"
            continue
        if sig != signal.SIGKILL and p.returncode not in (130, 0) and "run" in err:
            # Before the run folder exists a signal ends the process as any signal does.
            if (runs / "r").exists():
                yield what, f"FAILURE: exit {p.returncode}: {err.strip()[-200:]}"
                continue
        if sig != signal.SIGKILL and took > 2.0:
            yield what, f"FAILURE: answered after {took:.1f} s"
            continue
        if not (runs / "r").exists():
            yield what, "ok (before the run folder)"
            continue
        # Go on as the user would: resume; with no checkpoint, the restart the error names.
        code, out, rerr, rss = run([exe, "train", "--resume", str(runs / "r"), "--set",
                                    "train.steps=1"], 120)
        if code != 0 and "--restart" in rerr:
            code, out, rerr, rss = run([exe, "train", "--restart", str(runs / "r"), "--set",
                                        "train.steps=2"], 120)
            what += " (restarted)"
        if code != 0 and "cannot resume past" in rerr:
            code = 0
        verdict = judge(code, rerr, rss)
        if verdict.startswith("refused"):
            verdict = f"FAILURE: the run could not go on: {rerr.strip()[-300:]}"
        yield what, verdict
        shutil.rmtree(runs, ignore_errors=True)


def rank_cases(mpi_exe, data, tmp, rng, n):
    base = [a for s in TINY for a in ("--set", s)]
    other = tmp / "other.txt"
    text = Path(data).read_text()
    other.write_text(text[::-1])
    for i in range(n):
        runs = tmp / f"mpi{i}"
        kind = rng.choice(["lr", "seed", "data", "steps", "taken name", "model"])
        a = [mpi_exe, "train", "--data", data, "--runs-dir", str(runs), "--name", "r"] + base
        b = list(a)
        if kind == "lr":
            b += ["--set", "train.lr=0.5"]
        elif kind == "seed":
            b += ["--seed", "9"]
        elif kind == "data":
            b[3] = str(other)
        elif kind == "steps":
            b += ["--set", "train.steps=3"]
        elif kind == "model":
            b += ["--set", "model.n_experts=2"]
        else:
            (runs / "r").mkdir(parents=True)
            (runs / "r" / "config.toml").write_text("")
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "1"] + a + \
              ["--distributed", ":", "-np", "1"] + b + ["--distributed"]
        t0 = time.monotonic()
        code, _, err, rss = run(cmd, 60)
        took = time.monotonic() - t0
        verdict = judge(code, err, rss, must_refuse=True)
        ours = [line for line in err.splitlines() if line.startswith("error:")]
        if verdict.startswith("refused"):
            # mpirun's own banner comes last: the ranks' message is the line that matters.
            verdict = f"refused: {ours[0][:160]}" if ours else "FAILURE: no message from the ranks"
        if verdict.startswith("refused") and took > 10:
            verdict = f"FAILURE: refused after {took:.0f} s (10 s allowed)"
        yield f"mpirun A : B ({kind})", verdict
        shutil.rmtree(runs, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--switch", default=str(ROOT / "target/release/switch"))
    ap.add_argument("--mpi-switch", help="a switch binary built with --features mpi")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/tinyshakespeare.txt"))
    ap.add_argument("--seed", type=int, default=29)
    ap.add_argument("--hf", type=int, default=80, help="damaged Hugging Face cases")
    ap.add_argument("--signals", type=int, default=60, help="signal cases")
    ap.add_argument("--ranks", type=int, default=20, help="MPI cases (with --mpi-switch)")
    ap.add_argument("--verbose", action="store_true", help="print every case")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="fault-sweep-"))
    data = args.data
    if not Path(data).exists():
        data = str(tmp / "text.txt")
        Path(data).write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 400)
    counts, failures = Counter(), []
    sources = [("values", values_cases(args.switch, data, tmp, rng)),
               ("data", data_run(args.switch, tmp)),
               ("hf", hf_cases(args.switch, tmp, rng, args.hf)),
               ("signals", signal_cases(args.switch, data, tmp, rng, args.signals))]
    if args.mpi_switch:
        sources.append(("ranks", rank_cases(args.mpi_switch, data, tmp, rng, args.ranks)))
    t0 = time.monotonic()
    for kind, cases in sources:
        for what, verdict in cases:
            short = next(o for o in ("FAILURE", "ok", "refused") if verdict.startswith(o))
            counts[(kind, short)] += 1
            if args.verbose:
                print(f"{kind}: {what}: {verdict}", flush=True)
            if short == "FAILURE":
                failures.append(f"{kind}: {what}: {verdict}")
                print(f"FAILURE {kind}: {what}: {verdict}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    total = sum(counts.values())
    print(f"\n{total} cases in {time.monotonic() - t0:.0f} s (seed {args.seed}):")
    for kind in ("values", "data", "hf", "signals", "ranks"):
        row = {o: c for (k, o), c in counts.items() if k == kind}
        if row:
            print(f"  {kind:8} {sum(row.values()):4}: " +
                  ", ".join(f"{o} {c}" for o, c in sorted(row.items())))
    print(f"failures: {len(failures)}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
