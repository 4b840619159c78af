#!/usr/bin/env bash
# The whole GPU measurement in one go (a few minutes on a data-centre GPU): parity on every
# fixture (labml's and the Hugging Face ones); training throughput at 4, 16 and 64 experts,
# batch 32x64 (the reference) and 512x64, f32 and f16, with kernel launches and host syncs per
# step; 400 training steps in f32 and in f16 compared by validation loss. Writes
# benchmarks/gpu.jsonl and benchmarks/gpu.md and puts gpu.md into BENCHMARKS.md (section "GPU").
# Dry run on lavapipe, sizes cut down (11 minutes on 2 CPU cores):
#   BIN=target-wgpu/ci-gpu/switch STEPS=2 TRAIN_STEPS=4 EXPERTS=4 BATCHES=4 \
#     CUBECL_AUTOTUNE_LEVEL=minimal bash benchmarks/gpu.sh
#
#   bash benchmarks/gpu.sh                            # builds --features wgpu, runs on wgpu
#   FEATURE=vulkan bash benchmarks/gpu.sh
#   FEATURE=cuda bash benchmarks/gpu.sh               # building cubecl-cuda needs internet (LLVM)
#   DATA=path/to/tinyshakespeare.txt STEPS=20 TRAIN_STEPS=400 bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
FEATURE=${FEATURE:-wgpu}
DEVICE=${DEVICE:-$FEATURE}
STEPS=${STEPS:-20}
TRAIN_STEPS=${TRAIN_STEPS:-400}
EXPERTS=${EXPERTS:-4 16 64}
BATCHES=${BATCHES:-32 512}
BIN=${BIN:-target/release/switch}
DATA=${DATA:-../shared/data/tinyshakespeare.txt}
if [ ! -x "$BIN" ]; then
    cargo build --release --features "$FEATURE"
fi
if [ ! -f "$DATA" ]; then
    echo "error: no training text at $DATA: set DATA=path/to/tinyshakespeare.txt" >&2
    exit 1
fi
start=$(date +%s)
OUT=benchmarks/gpu.jsonl
: >"$OUT"
echo "parity on every fixture ($DEVICE)" >&2
parity=$("$BIN" parity --device "$DEVICE" tests/data/fixtures/*.safetensors tests/data/hf/*/ | tail -1)
echo "{\"parity\": \"$parity\"}" >>"$OUT"
for precision in f32 f16; do
    for batch in $BATCHES; do
        for e in $EXPERTS; do
            echo "bench: $precision, batch ${batch}x64, $e experts" >&2
            echo "{\"bench\": $("$BIN" bench --json --device "$DEVICE" --precision "$precision" \
                --batch "$batch" --experts "$e" --steps "$STEPS" --warmup 5)}" >>"$OUT"
        done
    done
done
runs=$(mktemp -d)
for precision in f32 f16; do
    echo "training: $TRAIN_STEPS steps in $precision" >&2
    "$BIN" train --device "$DEVICE" --data "$DATA" --name "gpu-$precision" \
        --set "train.steps=$TRAIN_STEPS" --set "train.eval_interval=$TRAIN_STEPS" \
        --set "train.checkpoint_interval=$TRAIN_STEPS" --set "model.precision=$precision" \
        >/dev/null 2>&1 </dev/null || { echo "training in $precision failed" >&2; exit 1; }
    mv "runs/gpu-$precision" "$runs/"
    echo "{\"train\": \"$precision\", \"metrics\": \"$runs/gpu-$precision/metrics.jsonl\"}" >>"$OUT"
done
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1 || true)
echo "{\"device\": \"${gpu:-unknown (no nvidia-smi)}\", \"backend\": \"$FEATURE\", \"seconds\": $(($(date +%s) - start))}" >>"$OUT"
python3 benchmarks/gpu_report.py "$OUT" >benchmarks/gpu.md
python3 - <<'PY'
import re
text = open("BENCHMARKS.md").read()
gpu = open("benchmarks/gpu.md").read().rstrip("\n")
parts = re.split(r"(?m)^## GPU\n", text)
if len(parts) == 2:
    rest = re.split(r"(?m)^## ", parts[1], maxsplit=1)
    text = parts[0] + gpu + ("\n\n## " + rest[1] if len(rest) == 2 else "\n")
else:
    text = text.rstrip("\n") + "\n\n" + gpu + "\n"
open("BENCHMARKS.md", "w").write(text)
PY
cat benchmarks/gpu.md
