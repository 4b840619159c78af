#!/usr/bin/env bash
# Training across processes, side by side in one run, alternating: one process; two threads as
# one model (--devices cpu,cpu --global-routing); two MPI ranks as one model, data-parallel;
# two MPI ranks as one model, expert-parallel (each holding half of the experts). At 4 experts
# (the reference configuration) and 64. Writes benchmarks/mpi.jsonl and benchmarks/mpi.md, and
# puts mpi.md at the end of BENCHMARKS.md.
#
#   bash benchmarks/mpi.sh              # 2 rounds; needs OpenMPI (libopenmpi-dev openmpi-bin)
#   ROUNDS=3 bash benchmarks/mpi.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}
cargo build --release -q --features mpi
OUT=benchmarks/mpi.jsonl
: >"$OUT"
one() { target/release/switch bench --json "$@"; }
ranks() {
    mpirun --allow-run-as-root --oversubscribe -np 2 target/release/switch bench --json \
        --threads 1 --distributed --global-routing "$@"
}
record() { echo "{\"round\": $1, \"variant\": \"$2\", \"result\": $3}" >>"$OUT"; }
for round in $(seq "$ROUNDS"); do
    for e in 4 64; do
        steps=$([ "$e" = 4 ] && echo 15 || echo 10)
        echo "round $round, $e experts" >&2
        record "$round" one "$(one --experts "$e" --steps "$steps")"
        record "$round" threads "$(one --experts "$e" --steps "$steps" --devices cpu,cpu --global-routing)"
        record "$round" mpi-data "$(ranks --experts "$e" --steps "$steps")"
        record "$round" mpi-experts "$(ranks --experts "$e" --steps "$steps" --expert-parallel)"
    done
done
python3 benchmarks/mpi_report.py "$OUT" >benchmarks/mpi.md
python3 - <<'PY'
import re
text = open("BENCHMARKS.md").read()
text = re.split(r"\n## Across processes \(MPI\)", text)[0].rstrip("\n")
open("BENCHMARKS.md", "w").write(text + "\n\n" + open("benchmarks/mpi.md").read())
PY
cat benchmarks/mpi.md
