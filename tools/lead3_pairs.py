#!/usr/bin/env python3
"""Generated summarization-like pairs for trying `switch finetune` on a small model: each input
is "summarize: " and 6 to 12 random words (from the test tokenizer's text), its target the
first three (a lead-3 summary). `python3 tools/lead3_pairs.py DIR` writes DIR/train.jsonl
(256 pairs) and DIR/valid.jsonl (32)."""

import json
import random
import sys
from pathlib import Path

WORDS = ("the quick brown fox jumps over lazy dog a walks in park cute green sparse experts route "
         "every token to one expert each takes at most its capacity of tokens and drops rest").split()


def make(n, seed, path):
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            w = [r.choice(WORDS) for _ in range(r.randint(6, 12))]
            f.write(json.dumps({"input": "summarize: " + " ".join(w), "target": " ".join(w[:3])}) + "\n")


out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
make(256, 1, out / "train.jsonl")
make(32, 2, out / "valid.jsonl")
