#!/usr/bin/env python3
"""benchmarks/hf.jsonl (from benchmarks/hf.sh) as a Markdown section of BENCHMARKS.md, headed
with the CPU's name (one section per kind of machine)."""

import json
import statistics
import sys
from collections import defaultdict

from machine import cpu_name, machine_label, simd_flags

lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
bandwidth = next((l["bandwidth"] for l in lines if "bandwidth" in l), None)
rows = [dict(l["result"], checkpoint=l.get("checkpoint", "f32")) for l in lines if "result" in l]


def who(r):
    if r["impl"].startswith("switch-transformer"):
        return "switch-transformer" + (", bf16 weights" if r.get("weights") == "BF16" else "")
    return "transformers, " + ("bf16" if r.get("compute") == "bfloat16" else "f32") + " compute"


by = defaultdict(list)
for r in rows:
    by[(r["batch"], r["checkpoint"], who(r))].append(r)


def med(rs, k):
    return statistics.median(r[k] for r in rs)


any_row = rows[0]
theirs_impl = next(r["impl"] for r in rows if not r["impl"].startswith("switch"))
simd = next((r["simd"] for r in rows if "simd" in r), "?")
rounds = max(len(v) for v in by.values())
print(f"## Hugging Face Switch Transformers against transformers ({machine_label()})\n")
print(
    "A randomly initialised model of `google/switch-base-8`'s exact configuration (619M "
    "parameters: 12 + 12 blocks, every other FFN a Switch layer of 8 experts, d_model 768, "
    "d_ff 3072, capacity 64), the same weights for both: the f32 checkpoint, and the same "
    "rounded to bf16 (`switch convert --dtype bf16`; we keep bf16 weights on the CPU and "
    f"compute in f32, which is transformers' f32 computation on the same values). CPU: {cpu_name()}, "
    f"flags {simd_flags()}; our kernels on `{simd}`; {any_row['threads']} threads each; input "
    f"{any_row['src_len']} random tokens per sequence, {any_row['new_tokens']} tokens generated "
    "greedily with the cache (end of sequence not stopping it; generation time includes the "
    f"encoder, as `generate`'s does); best of 2 after a warm-up, median of {rounds} rounds "
    f"alternating. Ours: `switch seq2seq --bench`; theirs: {theirs_impl}, `model.generate` "
    "(`benchmarks/hf_bench.py`). Peak RSS: the whole process, loading included. Command: "
    "`bash benchmarks/hf.sh`.\n"
)
print("| batch | checkpoint | | encoder tokens/s | generation tokens/s | peak RSS (MB) |")
print("|---|---|---|---|---|---|")
for batch in sorted({b for b, _, _ in by}):
    for ck in ("f32", "bf16"):
        names = sorted({w for b, c, w in by if b == batch and c == ck}, key=lambda w: (not w.startswith("switch"), w))
        for name in names:
            rs = by[(batch, ck, name)]
            print(
                f"| {batch} | {ck} | {name} | {med(rs, 'encoder_tokens_per_s'):,.0f} | "
                f"{med(rs, 'generate_tokens_per_s'):,.1f} | {med(rs, 'peak_rss_mb'):,.0f} |"
            )
        ours = next((by[(batch, ck, n)] for n in names if n.startswith("switch")), None)
        same = by.get((batch, ck, "transformers, f32 compute"))
        if ours and same:
            r = lambda k: med(ours, k) / med(same, k)
            print(
                f"| {batch} | {ck} | **ours / transformers f32** | **{r('encoder_tokens_per_s'):.2f}x** | "
                f"**{r('generate_tokens_per_s'):.2f}x** | **{r('peak_rss_mb'):.2f}x** |"
            )
    best_theirs = max(
        (rs for (b, c, w), rs in by.items() if b == batch and not w.startswith("switch")),
        key=lambda rs: med(rs, "generate_tokens_per_s"),
    )
    ours_bf16 = next((rs for (b, c, w), rs in by.items() if b == batch and w.endswith("bf16 weights")), None)
    if ours_bf16:
        print(
            f"| {batch} | | **ours bf16 / transformers' fastest generation** "
            f"({who(best_theirs[0])}, {best_theirs[0]['checkpoint']}) | "
            f"**{med(ours_bf16, 'encoder_tokens_per_s') / med(best_theirs, 'encoder_tokens_per_s'):.2f}x** | "
            f"**{med(ours_bf16, 'generate_tokens_per_s') / med(best_theirs, 'generate_tokens_per_s'):.2f}x** | |"
        )
if bandwidth:
    bw = bandwidth["read_gb_per_s"]
    print(
        f"\nBatch-1 decoding against the memory bandwidth: `switch bench --bandwidth` reads "
        f"{bw:.1f} GB/s with {bandwidth['threads']} threads. A decoding step reads the weights it "
        "uses once (attention, cross-attention's query and output, one expert or the dense FFN, "
        "the output layer); decoding rate = new tokens over (generation time - encoder time).\n"
    )
    print("| checkpoint | weight bytes per token (MB) | decoding tokens/s | GB/s reached | of the bandwidth |")
    print("|---|---|---|---|---|")
    for ck in ("f32", "bf16"):
        rs = [r for (b, c, w), v in by.items() if b == 1 and c == ck and w.startswith("switch") for r in v]
        if not rs or "decode_weight_bytes" not in rs[0]:
            continue
        rate = statistics.median(r["new_tokens"] / (r["generate_s"] - r["encoder_s"]) for r in rs)
        gb = rate * rs[0]["decode_weight_bytes"] / 1e9
        print(f"| {ck} | {rs[0]['decode_weight_bytes'] / 1e6:.0f} | {rate:.1f} | {gb:.1f} | {gb / bw:.0%} |")
print(
    "\nPeak RSS: an expert's weights are read from the checkpoint the first time a token is "
    "routed to it, so experts no token reaches take no memory (transformers memory-maps the "
    "checkpoint, with the same effect: their pages are never read); with a batch that "
    "reaches every expert both hold all the weights."
)
