#!/usr/bin/env bash
# A Hugging Face Switch Transformers model against transformers on the CPU, side by side in
# one run, alternating: a randomly initialised model of google/switch-base-8's exact
# configuration (619M parameters, made once by benchmarks/hf_bench.py with transformers),
# the same weights and thread count for both; the encoder alone, then greedy generation with
# the cache; peak RSS of each process (loading included). Writes benchmarks/hf.jsonl and
# benchmarks/hf.md, and puts hf.md in BENCHMARKS.md.
#
#   python3 -m venv .venv-hf && .venv-hf/bin/pip install torch transformers==5.24.0
#   bash benchmarks/hf.sh                 # MODEL=/tmp/switch-base-8-random THREADS=2 ROUNDS=2
#
# Also the same model in bf16 (MODEL_BF16, made by `switch convert --dtype bf16`): ours keeps
# bf16 weights on the CPU, transformers runs it in f32 and in bf16. And the machine's memory
# read bandwidth (`switch bench --bandwidth`), which bounds decoding at batch 1.
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/venv.sh
MODEL=${MODEL:-/tmp/switch-base-8-random}
MODEL_BF16=${MODEL_BF16:-$MODEL-bf16}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-2}
SRC=64
NEW=32
cargo build --release -q
[ -f "$MODEL/model.safetensors" ] || "$PY" benchmarks/hf_bench.py make "$MODEL"
# The same weights rounded to bf16 (Google's checkpoints are stored so): we keep them bf16 on
# the CPU; transformers computes in f32 on them (the same values: the same results as ours) or
# in bf16.
[ -f "$MODEL_BF16/model.safetensors" ] ||
    target/release/switch convert --model "$MODEL" --out "$MODEL_BF16" --dtype bf16 >&2
OUT=benchmarks/hf.jsonl
: >"$OUT"
echo "{\"bandwidth\": $(target/release/switch bench --bandwidth --threads "$THREADS" --json)}" >>"$OUT"
record() { echo "{\"round\": $1, \"checkpoint\": \"$2\", \"result\": $3}" >>"$OUT"; }
ours() {
    RAYON_NUM_THREADS=$THREADS target/release/switch seq2seq --model "$1" --bench --batch "$2" \
        --src-len $SRC --max-tokens $NEW --repeat 2
}
theirs() {
    "$PY" benchmarks/hf_bench.py time "$1" --threads "$THREADS" --batch "$2" --src-len $SRC \
        --new-tokens $NEW --repeat 2 --dtype "$3" 2>/dev/null
}
for round in $(seq "$ROUNDS"); do
    for batch in 1 4; do
        echo "round $round, batch $batch" >&2
        record "$round" f32 "$(ours "$MODEL" "$batch")"
        record "$round" f32 "$(theirs "$MODEL" "$batch" float32)"
        record "$round" bf16 "$(ours "$MODEL_BF16" "$batch")"
        record "$round" bf16 "$(theirs "$MODEL_BF16" "$batch" float32)"
        record "$round" bf16 "$(theirs "$MODEL_BF16" "$batch" bfloat16)"
    done
done
python3 benchmarks/hf_report.py "$OUT" >benchmarks/hf.md
python3 benchmarks/insert_section.py benchmarks/hf.md
cat benchmarks/hf.md
