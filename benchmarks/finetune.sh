#!/usr/bin/env bash
# Fine-tuning a Hugging Face Switch Transformers model against transformers on the CPU, side by
# side in one run, alternating: a randomly initialised model of google/switch-base-8's exact
# configuration (made once by benchmarks/hf_bench.py), the same weights and thread count for
# both, f32, batch 4 of 64 input and 16 target tokens, dropout 0.1 and router jitter as the
# config has them, the loss with the router losses, global-norm clipping at 1, AdamW under the
# linear schedule. Ours: `switch finetune` (its own seconds per update after the first, and
# peak RSS of the whole process, loading and the final save included); theirs: the same loop
# as Trainer runs it (benchmarks/hf_bench.py finetune: seconds per update after the first, peak
# RSS, loading included, no save). Writes benchmarks/finetune.jsonl and benchmarks/finetune.md,
# and puts finetune.md in BENCHMARKS.md.
#
#   python3 -m venv .venv-hf && .venv-hf/bin/pip install torch transformers==5.24.0
#   bash benchmarks/finetune.sh          # MODEL=/tmp/switch-base-8-random THREADS=2 ROUNDS=2 STEPS=12
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/venv.sh
MODEL=${MODEL:-/tmp/switch-base-8-random}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-12}
cargo build --release -q
[ -f "$MODEL/model.safetensors" ] || "$PY" benchmarks/hf_bench.py make "$MODEL"
# `switch finetune` reads the model folder's tokenizer.json: a folder of links to the weights
# with the test tokenizer (its ids are inside the vocabulary; the texts below fill 64 and 16
# tokens whatever the tokenizer).
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/model"
ln -s "$(realpath "$MODEL/config.json")" "$WORK/model/config.json"
ln -s "$(realpath "$MODEL/model.safetensors")" "$WORK/model/model.safetensors"
cp tests/data/hf/tiny/tokenizer.json "$WORK/model/"
python3 - "$WORK/train.jsonl" <<'PY'
import json, random, sys
r = random.Random(0)
words = "the quick brown fox jumps over lazy dog a walks in park cute green sparse experts route".split()
with open(sys.argv[1], "w") as f:
    for _ in range(64):
        w = [r.choice(words) for _ in range(80)]
        f.write(json.dumps({"input": " ".join(w), "target": " ".join(w[:30])}) + "\n")
PY
OUT=benchmarks/finetune.jsonl
: >"$OUT"
record() { echo "{\"round\": $1, \"result\": $2}" >>"$OUT"; }
ours() {
    local name=r$1
    RAYON_NUM_THREADS=$THREADS /usr/bin/time -v target/release/switch finetune --model "$WORK/model" \
        --train "$WORK/train.jsonl" --runs-dir "$WORK/runs" --name "$name" --set max_steps="$STEPS" \
        --set batch_size=4 --set max_source_len=64 --set max_target_len=16 --set eval_every=0 \
        --set log_every="$STEPS" >"$WORK/$name.out" 2>"$WORK/$name.time"
    python3 - "$WORK/$name.out" "$WORK/$name.time" "$THREADS" <<'PY'
import json, re, sys
out, time = open(sys.argv[1]).read(), open(sys.argv[2]).read()
m = re.search(r"([\d.]+) target tokens/s \(([\d.]+) s per update", out)
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", time).group(1))
print(json.dumps({"impl": "switch-transformer", "threads": int(sys.argv[3]), "batch": 4, "src_len": 64,
                  "tgt_len": 16, "update_s": float(m.group(2)), "target_tokens_per_s": float(m.group(1)),
                  "peak_rss_mb": rss / 1024}))
PY
    rm -rf "$WORK/runs/$name"
}
theirs() {
    "$PY" benchmarks/hf_bench.py finetune "$MODEL" --threads "$THREADS" --batch 4 --src-len 64 \
        --tgt-len 16 --steps "$STEPS" 2>/dev/null
}
for round in $(seq "$ROUNDS"); do
    echo "round $round" >&2
    record "$round" "$(ours "$round")"
    record "$round" "$(theirs)"
done
python3 benchmarks/finetune_report.py "$OUT" "$STEPS" >benchmarks/finetune.md
python3 benchmarks/insert_section.py benchmarks/finetune.md
cat benchmarks/finetune.md
