#!/usr/bin/env bash
# The CPU, side by side with PyTorch, on the machine at hand, in one command: the CPU's model,
# its SIMD flags and memory read bandwidth (`switch bench --bandwidth`); training at the
# reference configuration (4 and 64 experts) against labml's own PyTorch code, alternating;
# then the Hugging Face model against transformers (benchmarks/hf.sh). Writes BENCHMARKS.md's
# sections for this CPU (headed with its name; other machines' sections stay).
#
#   python3 -m venv .venv-hf && .venv-hf/bin/pip install torch transformers==5.24.0 \
#       labml-nn==0.5.1 labml==0.5.3
#   bash benchmarks/cpu.sh                # THREADS=2 ROUNDS=3 STEPS=20 (hf.sh: ROUNDS=2)
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=${VENV:-.venv-hf}
PY=$VENV/bin/python
if ! "$PY" -c "import labml_nn, transformers" 2>/dev/null; then
    echo "no labml_nn or transformers in $VENV: see this script's header" >&2
    exit 1
fi
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-20}
cargo build --release -q
grep -m1 "model name" /proc/cpuinfo >&2 || true
OUT=benchmarks/cpu.jsonl
BANDWIDTH=$(target/release/switch bench --bandwidth --threads "$THREADS" --json)
echo "memory read: $BANDWIDTH" >&2
echo "{\"bandwidth\": $BANDWIDTH}" >"$OUT"
for round in $(seq "$ROUNDS"); do
    for e in 4 64; do
        echo "round $round, $e experts" >&2
        echo "{\"round\": $round, \"result\": $(target/release/switch bench --json --threads "$THREADS" \
            --steps "$STEPS" --experts "$e")}" >>"$OUT"
        echo "{\"round\": $round, \"result\": $("$PY" benchmarks/labml_bench.py --threads "$THREADS" \
            --steps "$STEPS" --experts "$e")}" >>"$OUT"
    done
done
python3 benchmarks/cpu_report.py "$OUT" "$THREADS" "$ROUNDS" "$STEPS" >benchmarks/cpu.md
python3 benchmarks/insert_section.py benchmarks/cpu.md
cat benchmarks/cpu.md
ROUNDS=${HF_ROUNDS:-2} bash benchmarks/hf.sh
