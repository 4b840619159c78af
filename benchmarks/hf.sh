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
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv-hf}/bin/python
if [ ! -x "$PY" ]; then
    echo "no $PY: python3 -m venv .venv-hf && .venv-hf/bin/pip install torch transformers==5.24.0" >&2
    exit 1
fi
MODEL=${MODEL:-/tmp/switch-base-8-random}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-2}
SRC=64
NEW=32
cargo build --release -q
[ -f "$MODEL/model.safetensors" ] || "$PY" benchmarks/hf_bench.py make "$MODEL"
OUT=benchmarks/hf.jsonl
: >"$OUT"
record() { echo "{\"round\": $1, \"result\": $2}" >>"$OUT"; }
for round in $(seq "$ROUNDS"); do
    for batch in 1 4; do
        echo "round $round, batch $batch" >&2
        record "$round" "$(RAYON_NUM_THREADS=$THREADS target/release/switch seq2seq --model "$MODEL" \
            --bench --batch "$batch" --src-len $SRC --max-tokens $NEW --repeat 2)"
        record "$round" "$("$PY" benchmarks/hf_bench.py time "$MODEL" --threads "$THREADS" \
            --batch "$batch" --src-len $SRC --new-tokens $NEW --repeat 2 2>/dev/null)"
    done
done
python3 benchmarks/hf_report.py "$OUT" >benchmarks/hf.md
python3 - <<'PY'
import re
text = open("BENCHMARKS.md").read()
section = open("benchmarks/hf.md").read().rstrip("\n") + "\n"
head = "## Hugging Face Switch Transformers against transformers"
if head in text:
    text = re.sub(re.escape(head) + r".*?(?=\n## |\Z)", section.replace("\\", "\\\\"), text, flags=re.S)
elif "\n## Across processes (MPI)" in text:
    text = text.replace("\n## Across processes (MPI)", "\n" + section + "\n## Across processes (MPI)", 1)
else:
    text = text.rstrip("\n") + "\n\n" + section
open("BENCHMARKS.md", "w").write(text)
PY
cat benchmarks/hf.md
