#!/usr/bin/env python3
"""The MPI section of BENCHMARKS.md from benchmarks/mpi.jsonl (written by benchmarks/mpi.sh):
for each variant and expert count, the round with the best median step."""
import json
import os
import platform
import sys

rows = [json.loads(l) for l in open(sys.argv[1])]
VARIANTS = [
    ("one", "1 process"),
    ("threads", "2 threads as 1 model (`--devices cpu,cpu --global-routing`)"),
    ("mpi-data", "2 MPI ranks as 1 model, data-parallel"),
    ("mpi-experts", "2 MPI ranks as 1 model, expert-parallel"),
]
ALL_TO_ALL = ("tokens to their experts", "expert outputs back to their tokens")


def best(variant, experts):
    runs = [r["result"] for r in rows
            if r["variant"] == variant and r["result"]["config"]["model"]["n_experts"] == experts]
    return max(runs, key=lambda r: r["tokens_per_s_median"])


def ms(r, names):
    return sum(e["ms_median"] for n, e in r["exchanges"].items() if n in names)


def mb(r, names):
    return sum(e["bytes_median"] for n, e in r["exchanges"].items() if n in names) / 1e6


cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
           platform.processor())
print("## Across processes (MPI)\n")
print("`bash benchmarks/mpi.sh` on %s (%d cores), %d rounds alternating, best round's median "
      "step; batch 32x64, d_model 128, 6 layers. A process in one process or thread runs with 2 "
      "threads, each MPI rank with 1 (`--threads 1`); OpenMPI over shared memory on one machine. "
      "Exchanges: rank 0's time in MPI calls per step, waiting for the other rank included; "
      "all-reduce is the gradient sum, all-to-all the expert exchanges (forward and backward), "
      "routing the probabilities gathered and the plan broadcast.\n"
      % (cpu, os.cpu_count(), max(r["round"] for r in rows)))
print("| experts | variant | tokens/s | ms/step | MPI ms/step (share) | all-reduce ms / MB | "
      "all-to-all ms / MB | routing ms | peak RSS per process (MB) |")
print("|---" * 9 + "|")
for e in (4, 64):
    base = best("one", e)["peak_rss_mb"]
    for v, label in VARIANTS:
        r = best(v, e)
        total = r["exchange_ms_median"]
        share = "%.1f (%.0f%%)" % (total, 100 * total / r["ms_per_step_median"]) if r["ranks"] > 1 else "-"
        rss = r["peak_rss_mb_ranks"]
        rss_txt = " + ".join("%.0f" % m for m in rss)
        if r["ranks"] > 1:
            rss_txt += " (%.2fx each)" % (max(rss) / base)
        route = ms(r, ("routing probabilities", "routing plan"))
        print("| %d | %s | %.0f | %.1f | %s | %s | %s | %s | %s |" % (
            e, label, r["tokens_per_s_median"], r["ms_per_step_median"], share,
            "%.1f / %.1f" % (ms(r, ("gradients",)), mb(r, ("gradients",))) if r["ranks"] > 1 else "-",
            "%.1f / %.1f" % (ms(r, ALL_TO_ALL), mb(r, ALL_TO_ALL)) if r["ranks"] > 1 and ms(r, ALL_TO_ALL) else "-",
            "%.1f" % route if r["ranks"] > 1 else "-",
            rss_txt))
print("\nCommands: `target/release/switch bench --experts 64 --steps 10` (one process, add "
      "`--devices cpu,cpu --global-routing` for two threads); `mpirun -np 2 target/release/switch "
      "bench --threads 1 --distributed --global-routing --experts 64 --steps 10 "
      "[--expert-parallel]` (built with `--features mpi`).")
