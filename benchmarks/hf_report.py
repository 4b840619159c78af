#!/usr/bin/env python3
"""benchmarks/hf.jsonl (from benchmarks/hf.sh) as the Markdown section of BENCHMARKS.md."""

import json
import platform
import statistics
import subprocess
import sys
from collections import defaultdict

rows = [json.loads(l)["result"] for l in open(sys.argv[1]) if l.strip()]
by = defaultdict(list)
for r in rows:
    ours = r["impl"].startswith("switch-transformer")
    by[(r["batch"], ours)].append(r)


def med(rs, k):
    return statistics.median(r[k] for r in rs)


try:
    cpu = next(
        l.split(":", 1)[1].strip()
        for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        if l.startswith("Model name")
    )
except Exception:
    cpu = platform.processor() or "unknown CPU"
any_row = rows[0]
theirs_impl = next(r["impl"] for r in rows if not r["impl"].startswith("switch"))
print("## Hugging Face Switch Transformers against transformers\n")
print(
    "A randomly initialised model of `google/switch-base-8`'s exact configuration (619M "
    "parameters: 12 + 12 blocks, every other FFN a Switch layer of 8 experts, d_model 768, "
    "d_ff 3072, capacity 64), f32, the same weights for both, on the CPU "
    f"({cpu}), {any_row['threads']} threads each; input {any_row['src_len']} random tokens per "
    f"sequence, {any_row['new_tokens']} tokens generated greedily with the cache (end of "
    f"sequence not stopping it); best of 2 after a warm-up, median of {len(rows) // 4} "
    f"rounds alternating. Ours: `switch seq2seq --bench`; theirs: {theirs_impl}, "
    "`model.generate` (`benchmarks/hf_bench.py`). Peak RSS: the whole process, loading "
    "included. Command: `bash benchmarks/hf.sh`.\n"
)
print("| batch | | encoder tokens/s | generation tokens/s | peak RSS (MB) |")
print("|---|---|---|---|---|")
for batch in sorted({b for b, _ in by}):
    o, t = by[(batch, True)], by[(batch, False)]
    for name, rs in (("switch-transformer", o), ("transformers", t)):
        print(
            f"| {batch} | {name} | {med(rs, 'encoder_tokens_per_s'):,.0f} | "
            f"{med(rs, 'generate_tokens_per_s'):,.1f} | {med(rs, 'peak_rss_mb'):,.0f} |"
        )
    print(
        f"| {batch} | **ratio** | **{med(o, 'encoder_tokens_per_s') / med(t, 'encoder_tokens_per_s'):.2f}x** | "
        f"**{med(o, 'generate_tokens_per_s') / med(t, 'generate_tokens_per_s'):.2f}x** | "
        f"**{med(o, 'peak_rss_mb') / med(t, 'peak_rss_mb'):.2f}x** |"
    )
print(
    "\nPeak RSS: an expert's weights are read from the checkpoint the first time a token is "
    "routed to it, so experts no token reaches take no memory (transformers memory-maps the "
    "checkpoint, with the same effect: their pages are never read); with a batch that "
    "reaches every expert both hold all the weights."
)
