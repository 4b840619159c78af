#!/usr/bin/env bash
# The whole GPU measurement in one go (at most about 8 minutes on a data-centre GPU), ours and
# labml's PyTorch side by side on the same GPU: parity on every fixture (labml's and the Hugging
# Face ones) on each backend; training throughput at batch 32x64 and 512x64, 4 and 64 experts,
# f32 and f16, with kernel launches and host syncs per step, each next to labml's PyTorch
# (`labml_gpu_bench.py`, f32) at the same configuration; the device routing decision alone at
# 2k, 32k and 128k tokens; a second process's start with the kernel cache warm; 400 training
# steps in f32 and in f16 compared by validation loss. benchmarks/gpu.py runs the steps, each
# under its own time limit (a step that fails or times out is recorded, and the rest go on).
#
#   bash benchmarks/gpu.sh                  # builds --features cuda,vulkan if BIN is missing
#   bash benchmarks/gpu.sh --report FILE    # BENCHMARKS.md's GPU section from a recorded run
#
# On a bare NVIDIA machine without Rust (../shared/device/README.md: pack.sh, env.sh), with the
# packed binary, writing the record where the machine hands files back:
#   source .device-pack/env.sh && P=.device-pack BIN=$P/switch LABML=$P/labml_gpu_bench.py \
#     DATA=$P/tinyshakespeare.txt FIXTURES=$P/testdata JSONL=$OUT/gpu.jsonl bash benchmarks/gpu.sh
# and then, in the repository: bash benchmarks/gpu.sh --report gpu.jsonl
#
# Settings (environment): BACKENDS ("cuda vulkan"; the first one also runs the routing, restart
# and training steps), CONFIGS (batch:experts:precision[:backend+backend], default
# "32:4:f32 512:4:f32 32:64:f32 512:64:f32 512:4:f16"), STEPS (20 timed steps per bench),
# TRAIN_STEPS (400), DEADLINE (420 s: no step starts later), JSONL (benchmarks/gpu.jsonl),
# WARM (seconds each backend may first spend compiling and tuning kernels, untimed; default 0),
# CACHE_OUT (a .tgz to write the kernel cache to at the end).
#
# A cold start compiles and tunes every kernel (minutes on an H200: BENCHMARKS.md, "GPU"), and a
# lent machine starts bare. Keep the kernel cache between calls: CACHE_OUT=$OUT/kernels.tgz in one
# call, then unpack it into SWITCH_CACHE_DIR (the cache directory `switch` uses) in the next.
set -euo pipefail
cd "$(dirname "$0")/.."
report() {
    python3 benchmarks/gpu_report.py "$1" >benchmarks/gpu.md
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
}
if [ "${1:-}" = --report ]; then
    report "${2:?usage: gpu.sh --report FILE}"
    exit 0
fi
export BIN=${BIN:-target-gpu/release/switch}
if [ ! -x "$BIN" ]; then
    # cubecl-cuda is patched (vendor/cubecl-cuda) to compile kernels with NVRTC only: the build
    # needs neither internet nor CUDA; the machine that runs it needs the NVIDIA driver and NVRTC.
    cargo build --release --features cuda,vulkan --target-dir target-gpu
fi
JSONL=${JSONL:-benchmarks/gpu.jsonl}
: >"$JSONL"
# NVRTC (libnvrtc) from the CUDA toolkit or from PyTorch's pip packages, wherever it is.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(python3 -c 'import nvidia, os; b = list(nvidia.__path__)[0]; print(" ".join(os.path.join(b, d, "lib") for d in os.listdir(b)))' 2>/dev/null); do
    [ -d "$d" ] && LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
python3 benchmarks/gpu.py "$JSONL"
if [ -n "${CACHE_OUT:-}" ]; then
    cache=${SWITCH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/switch-transformer}
    tar -C "$cache" -czf "$CACHE_OUT" . && echo "kernel cache ($(du -sh "$cache" | cut -f1)) -> $CACHE_OUT"
fi
if [ -w BENCHMARKS.md ] && [ "$JSONL" = benchmarks/gpu.jsonl ]; then
    report "$JSONL"
fi
