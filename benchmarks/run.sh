#!/usr/bin/env bash
# Side-by-side benchmark: this implementation against labml's real PyTorch code, same
# configuration, same thread count, alternating in one run. Writes ../BENCHMARKS.md.
#
#   bash benchmarks/run.sh            # 2 threads, 2 rounds
#   THREADS=1 ROUNDS=3 bash benchmarks/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-20}
VENV=benchmarks/.venv

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "torch==2.15.0" "labml-nn==0.5.1" "labml==0.5.3"
fi
cargo build --release -q
OUT=benchmarks/results.jsonl
: >"$OUT"
ours() { target/release/switch bench --json --threads "$THREADS" --steps "$STEPS" "$@"; }
theirs() { "$VENV/bin/python" benchmarks/labml_bench.py --threads "$THREADS" --steps "$STEPS" "$@"; }
for round in $(seq "$ROUNDS"); do
    for e in 4 16 64; do
        echo "round $round, $e experts" >&2
        echo "{\"round\": $round, \"result\": $(ours --experts "$e")}" >>"$OUT"
        echo "{\"round\": $round, \"result\": $(ours --experts "$e" --replicas 2 --global-routing)}" >>"$OUT"
        echo "{\"round\": $round, \"result\": $(ours --experts "$e" --replicas 2)}" >>"$OUT"
        echo "{\"round\": $round, \"result\": $(theirs --experts "$e")}" >>"$OUT"
    done
done
echo "{\"round\": 0, \"generate\": $(ours --generate --tokens 200)}" >>"$OUT"
"$VENV/bin/python" benchmarks/report.py "$OUT" "$THREADS" "$ROUNDS" "$STEPS" >BENCHMARKS.md

cat BENCHMARKS.md
