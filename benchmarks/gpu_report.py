#!/usr/bin/env python3
"""The GPU section of BENCHMARKS.md from the record benchmarks/gpu.sh writes (one JSON object per
line, each a step of benchmarks/gpu.py)."""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
info = next(r for r in rows if r["kind"] == "device")
done = next((r for r in rows if r["kind"] == "done"), None)


def status(r):
    return "ok" if r.get("status") == 0 else str(r.get("status"))


print("## GPU\n")
print("`bash benchmarks/gpu.sh` on %s: ours with `--device %s` (fusion and autotune on), "
      "labml's PyTorch (`labml_gpu_bench.py`, f32) in the same run%s.\n" % (
          info["device"], "` / `--device ".join(info["backends"]),
          ", %.0f s in all" % done["seconds"] if done else " (did not reach its end)"))
def ran(r):
    return not str(r.get("status", "")).startswith("skipped")


for r in rows:
    if r["kind"] == "parity" and ran(r):
        print("- Parity on every fixture, `%s`: %s after %s s (last line: `%s`)." % (
            r["backend"], "passed" if r.get("status") == 0 else "stopped: " + str(r["status"]),
            r.get("seconds"), r.get("result", "")))
print()
print("| precision | batch | experts | labml PyTorch tok/s | ours | tok/s | ms/step "
      "| x PyTorch | launches / step | host us / launch | read wait ms | host syncs / step "
      "| process s | exit |")
print("|---" * 14 + "|")
labml = {}
for r in rows:
    if r["kind"] == "labml" and isinstance(r.get("result"), dict):
        labml[(r["batch"], r["experts"])] = r["result"]
for r in rows:
    if r["kind"] != "bench" or not ran(r):
        continue
    key = (r["batch"], r["experts"])
    ref = labml.get(key, {}).get("tokens_per_s")
    b = r.get("result") if isinstance(r.get("result"), dict) else None
    tok = b["tokens_per_s_median"] if b else None
    launches = b["launches_per_step"]["total"] if b else None
    syncs = b["syncs_per_step"]["total"] if b else None
    print("| %s | %dx64 | %d | %s | `%s` | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
        r["precision"], r["batch"], r["experts"],
        "%.0f" % ref if ref and r["precision"] == "f32" else "",
        r["backend"], "%.0f" % tok if tok else "-",
        "%.1f" % b["ms_per_step_median"] if b else "-",
        "%.2fx" % (tok / ref) if tok and ref else "",
        "%.0f" % launches if launches else "-",
        "%.1f" % b["host_us_per_launch"] if b and "host_us_per_launch" in b else "-",
        "%.1f" % b["read_ms_median"] if b and "read_ms_median" in b else "-",
        "%.0f" % syncs if syncs is not None else "-",
        r.get("seconds", "-"), status(r)))
for r in rows:
    if r["kind"] == "routing" and isinstance(r.get("result"), list):
        print("\nThe device routing decision alone (`switch bench --routing`, 4 experts, `%s`):\n"
              % r["backend"])
        print("| tokens | decision ms | ns / token | prefix sum ms (blocked) "
              "| prefix sum ms (Burn's cumsum) |")
        print("|---" * 5 + "|")
        for x in r["result"]:
            burn = x.get("burn_cumsum_ms_median")
            print("| %d | %.3f | %.1f | %.3f | %s |" % (
                x["tokens"], x["decision_ms_median"], x["decision_ns_per_token"],
                x["scan_ms_median"], "%.3f" % burn if burn is not None else "not run"))
restarts = [r for r in rows if r["kind"] == "restart" and ran(r)]
if restarts:
    print("\nA later process, kernel cache warm (`bench --steps 3 --warmup 1`, whole process): " +
          "; ".join("`%s` %s s, exit %s" % (r["backend"], r.get("seconds"), r.get("status"))
                    for r in restarts) + ".")
trained = [r for r in rows if r["kind"] == "train-result"]
if trained:
    print("\nValidation loss after the training steps (reference configuration, `%s`): " %
          trained[0]["backend"] + ", ".join(
              "%s %s" % (r["precision"], "%.3f" % r["valid_loss"] if r["valid_loss"] else "-")
              for r in trained) + ".")
skipped = [r for r in rows if not ran(r)]
if skipped:
    print("\nNot started (the run's deadline had passed): " + "; ".join(
        "%s%s" % (r["kind"], " `%s` %sx64, %s experts, %s" % (
            r["backend"], r["batch"], r["experts"], r["precision"]) if "batch" in r else
            " `%s`" % r.get("backend", "")) for r in skipped) + ".")
for r in rows:
    if r["kind"] == "note":
        print("\n" + r["text"])
