#!/usr/bin/env python3
"""The GPU section of BENCHMARKS.md from benchmarks/gpu.jsonl (written by benchmarks/gpu.sh)."""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1])]
info = next(r for r in rows if "device" in r)
parity = next(r["parity"] for r in rows if "parity" in r)
benches = [r["bench"] for r in rows if "bench" in r]


def valid_loss(path):
    lines = [json.loads(l) for l in open(path)]
    return [l["valid_loss"] for l in lines if "valid_loss" in l][-1]


trained = {r["train"]: valid_loss(r["metrics"]) for r in rows if "train" in r}
print("## GPU\n")
print("`bash benchmarks/gpu.sh` on %s, backend `%s` (fusion and autotune on), %d s in all. "
      "Parity on every fixture: `%s`.\n" % (info["device"], info["backend"], info["seconds"], parity))
print("| precision | batch | experts | tokens/s | ms/step | launches per step (fwd / bwd / opt) "
      "| host syncs per step |")
print("|---" * 7 + "|")
for b in benches:
    c = b["config"]
    l, s = b["launches_per_step"], b["syncs_per_step"]
    print("| %s | %dx%d | %d | %.0f | %.1f | %.0f (%.0f / %.0f / %.0f) | %.0f |" % (
        c["model"]["precision"], c["batch_size"], c["seq_len"], c["model"]["n_experts"],
        b["tokens_per_s_median"], b["ms_per_step_median"], l["total"], l["forward"],
        l["backward"], l["optimizer"], s["total"]))
if trained:
    print("\nValidation loss after the training steps (reference configuration): " +
          ", ".join("%s %.3f" % kv for kv in sorted(trained.items())) + ".")
