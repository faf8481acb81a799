#!/usr/bin/env bash
# The GPU checks of the `cuda` feature, on a machine with an NVIDIA GPU and its
# driver + cuBLAS (no CUDA toolkit is needed to build: cudarc loads them at run
# time). Fails — never passes quietly — where no GPU starts.
#   1. tests/device.rs's GPU tests (ignored elsewhere): every product of a small
#      model on the GPU vs the CPU — products in every operand layout, forward,
#      gradients, one AdamW step, a short training run — with explicit tolerances;
#   2. the engine issue's MiniLM training step (examples/train_step) on the CPU
#      and with HYDRA_DEVICE=cuda, when models/real/out/minilm.onnx is there
#      (scripts/test.sh builds it; copy models/real/out over otherwise).
# Usage: targets/gpu-check.sh [cuda:N]
set -euo pipefail
cd "$(dirname "$0")/.."
dev=${1:-cuda:0}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true

echo "=== GPU tests (cargo test --release --features cuda --test device -- --ignored)"
cargo test --release --features cuda --test device -- --include-ignored --nocapture 2>&1 | tee /tmp/gpu-check-tests.log
grep -q "^test result: ok" /tmp/gpu-check-tests.log

if [ -f models/real/out/minilm.onnx ]; then
    echo "=== MiniLM training step, CPU vs $dev"
    HYDRA_DEVICE=$dev TRAIN_STEP_ONLY=1 cargo run --release --features cuda --example train_step -- \
        "$(nproc)" 20
else
    echo "=== MiniLM step skipped: models/real/out/minilm.onnx is missing (bash scripts/test.sh builds it)"
fi
