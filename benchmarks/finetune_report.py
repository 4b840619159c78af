#!/usr/bin/env python3
"""benchmarks/finetune.jsonl (from benchmarks/finetune.sh) as a Markdown section of
BENCHMARKS.md, headed with the CPU's name (one section per kind of machine).
`finetune_report.py FILE STEPS`."""

import json
import statistics
import sys

from machine import cpu_name, machine_label, simd_flags

rows = [json.loads(l)["result"] for l in open(sys.argv[1]) if l.strip()]
steps = int(sys.argv[2])
ours = [r for r in rows if r["impl"].startswith("switch-transformer")]
theirs = [r for r in rows if r["impl"].startswith("transformers")]


def med(rs, k):
    return statistics.median(r[k] for r in rs)


cpu = cpu_name()
print(f"## Fine-tuning a Hugging Face Switch model against transformers ({machine_label()})")
print()
print(
    f"A randomly initialised model of `google/switch-base-8`'s exact configuration (619M parameters), "
    f"the same f32 weights for both, {ours[0]['threads']} threads each, batch 4 of 64 input and 16 target "
    f"tokens, in training mode (dropout 0.1, router jitter 0.01), the loss with the router losses, "
    f"clipping at global norm 1, AdamW under the linear schedule: what `Trainer` does. Seconds per "
    f"update over the {steps - 1} updates after the first (which allocates the optimizer's state), "
    f"median of {len(ours)} rounds alternating. Ours: `switch finetune`; theirs: {theirs[0]['impl']}, "
    f"the same loop in PyTorch eager (`benchmarks/hf_bench.py finetune`). Peak RSS: the whole process, "
    f"loading included (ours also writes the model at the end). CPU: {cpu}, flags {simd_flags()}. "
    f"Command: `bash benchmarks/finetune.sh`."
)
print()
print("| | s per update | target tokens/s | peak RSS (MB) |")
print("|---|---|---|---|")
for name, rs in [("switch-transformer", ours), ("transformers", theirs)]:
    print(f"| {name} | {med(rs, 'update_s'):.2f} | {med(rs, 'target_tokens_per_s'):.1f} | {med(rs, 'peak_rss_mb'):,.0f} |")
print(
    f"| **ours / transformers** | | **{med(ours, 'target_tokens_per_s') / med(theirs, 'target_tokens_per_s'):.2f}x** "
    f"| **{med(ours, 'peak_rss_mb') / med(theirs, 'peak_rss_mb'):.2f}x** |"
)
