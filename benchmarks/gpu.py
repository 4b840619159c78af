#!/usr/bin/env python3
"""The GPU measurement, run by benchmarks/gpu.sh: ours on each backend and labml's PyTorch side by
side on the same GPU, in one go. Each step runs under its own time limit and is recorded whatever
happens (exit status, seconds, output); a step that would start after the deadline is recorded as
skipped. Writes one JSON object per line to the file given (benchmarks/gpu.report.py reads it).

Settings come from the environment (gpu.sh documents them): BIN, BACKENDS, LABML, DATA,
FIXTURES, CONFIGS, STEPS, TRAIN_STEPS, DEADLINE, WARM.
"""
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

out_path = sys.argv[1]
BIN = os.environ.get("BIN", "target/release/switch")
BACKENDS = os.environ.get("BACKENDS", "cuda vulkan").split()
LABML = os.environ.get("LABML", "../shared/device/labml_gpu_bench.py")
DATA = os.environ.get("DATA", "../shared/data/tinyshakespeare.txt")
FIXTURES = os.environ.get("FIXTURES", "tests/data")
# batch:experts:precision[:backends], the first backend of BACKENDS where none are named
CONFIGS = os.environ.get(
    "CONFIGS", "32:4:f32 512:4:f32 32:64:f32 512:64:f32 512:4:f16").split()
STEPS = int(os.environ.get("STEPS", "20"))
TRAIN_STEPS = int(os.environ.get("TRAIN_STEPS", "400"))
DEADLINE = float(os.environ.get("DEADLINE", "420"))
# Seconds each backend may spend compiling and tuning its kernels before anything is timed (0:
# none; the first measured process then pays for a cold kernel cache).
WARM = int(os.environ.get("WARM", "0"))
start = time.time()
out = open(out_path, "a", buffering=1)
log = open(out_path + ".log", "a", buffering=1)


def record(row):
    row["at_s"] = round(time.time() - start, 1)
    out.write(json.dumps(row) + "\n")
    print(json.dumps(row)[:400], flush=True)


def run(kind, cmd, limit, **tags):
    """Runs cmd (a list) with a time limit; records status, seconds and the last JSON line of its
    standard output (or its last line)."""
    if time.time() - start > DEADLINE:
        record(dict(kind=kind, status="skipped (deadline)", cmd=shlex.join(cmd), **tags))
        return None
    t0 = time.time()
    log.write("\n$ %s\n" % shlex.join(cmd))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit,
                           stdin=subprocess.DEVNULL)
        status, stdout, stderr = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        status = "timeout %ds" % limit
        stdout = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    secs = round(time.time() - t0, 1)
    log.write(stdout + stderr)
    lines = [l for l in stdout.splitlines() if l.strip()]
    results = []
    for l in lines:
        try:
            results.append(json.loads(l))
        except ValueError:
            pass
    row = dict(kind=kind, status=status, seconds=secs, **tags)
    if results:
        row["result"] = results if len(results) > 1 else results[0]
    elif lines:
        row["result"] = lines[-1]
    if status != 0:
        row["stderr_tail"] = stderr[-600:]
    record(row)
    return row


def smi():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


def parse(config):
    parts = config.split(":")
    batch, experts, precision = int(parts[0]), int(parts[1]), parts[2]
    backends = parts[3].split("+") if len(parts) > 3 else BACKENDS
    return batch, experts, precision, [b for b in backends if b in BACKENDS]


record(dict(kind="device", device=smi(), backends=BACKENDS, bin=BIN))
fixtures = sorted(os.path.join(FIXTURES, "fixtures", f)
                  for f in os.listdir(os.path.join(FIXTURES, "fixtures"))
                  if f.endswith(".safetensors"))
hf = sorted(os.path.join(FIXTURES, "hf", d) + "/" for d in os.listdir(os.path.join(FIXTURES, "hf")))
first = BACKENDS[0]
if WARM > 0:
    for b in BACKENDS:
        run("warm", [BIN, "--device", b, "bench", "--json", "--steps", "1", "--warmup", "1"], WARM,
            backend=b)
# The first process on a backend compiles and tunes its kernels (cold cache): parity does that.
run("parity", [BIN, "--device", first, "parity"] + fixtures + hf, 150, backend=first)
for config in CONFIGS:
    batch, experts, precision, backends = parse(config)
    tags = dict(batch=batch, experts=experts, precision=precision)
    if precision == "f32":
        run("labml", ["python3", LABML, "--batch", str(batch), "--experts", str(experts),
                      "--steps", "30", "--warmup", "5"], 90, backend="pytorch-cuda", **tags)
    for b in backends:
        run("bench", [BIN, "--device", b, "bench", "--json", "--batch", str(batch), "--experts",
                      str(experts), "--precision", precision, "--steps", str(STEPS),
                      "--warmup", "5"], 120, backend=b, **tags)
# The routing decision alone: time per token as the tokens grow.
run("routing", [BIN, "--device", first, "bench", "--json", "--routing", "2048,32768,131072",
                "--experts", "4", "--steps", "10"], 90, backend=first)
# A second process with the cache warm: the whole process, a few steps included.
for b in BACKENDS:
    run("restart", [BIN, "--device", b, "bench", "--json", "--steps", "3", "--warmup", "1"], 60,
        backend=b)
# f32 against f16: validation loss after TRAIN_STEPS steps of the reference configuration.
runs = tempfile.mkdtemp()
for precision in ["f32", "f16"]:
    name = "gpu-" + precision
    row = run("train", [BIN, "--device", first, "train", "--data", DATA, "--runs-dir", runs,
                        "--name", name, "--set", "train.steps=%d" % TRAIN_STEPS,
                        "--set", "train.eval_interval=%d" % TRAIN_STEPS,
                        "--set", "train.checkpoint_interval=%d" % TRAIN_STEPS,
                        "--set", "model.precision=" + precision], 120,
              backend=first, precision=precision)
    metrics = os.path.join(runs, name, "metrics.jsonl")
    if row and os.path.exists(metrics):
        lines = [json.loads(l) for l in open(metrics)]
        valid = [l["valid_loss"] for l in lines if "valid_loss" in l]
        speed = [l["tokens_per_s"] for l in lines if "tokens_per_s" in l]
        record(dict(kind="train-result", backend=first, precision=precision,
                    valid_loss=valid[-1] if valid else None,
                    tokens_per_s_last=speed[-1] if speed else None))
for b in BACKENDS[1:]:
    run("parity", [BIN, "--device", b, "parity"] + fixtures + hf, 150, backend=b)
record(dict(kind="done", seconds=round(time.time() - start, 1)))
