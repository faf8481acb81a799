#!/usr/bin/env bash
# The GPU checks of the `cuda` feature, on a machine with an NVIDIA GPU and its
# driver + cuBLAS (no CUDA toolkit is needed: cudarc loads them at run time).
# Fails — never passes quietly — where no GPU starts.
#   1. tests/device.rs's GPU tests (ignored elsewhere): every product of a small
#      model on the GPU vs the CPU — products in every operand layout, forward,
#      gradients, one AdamW step, a short training run, resident weights, bf16 on
#      tensor cores, the CLI — with explicit tolerances;
#   2. the engine issue's MiniLM training step (examples/train_step) on the CPU
#      and with HYDRA_DEVICE=cuda (f32, then bf16 on tensor cores).
# Two ways to run it:
#   - with cargo (a Jetson, a workstation): builds and runs; step 2 needs
#     models/real/out/minilm.onnx (bash scripts/test.sh builds it);
#   - from gpu-bundle/ (bash targets/gpu-bundle.sh here first), where the GPU
#     machine has no Rust or network, e.g. this workplace's device machines:
#     run(command="bash targets/gpu-check.sh", carry=["gpu-bundle"]).
#     GPU_CHECK_BUNDLE=1 forces this where cargo exists.
# Usage: targets/gpu-check.sh [cuda:N]
set -euo pipefail
cd "$(dirname "$0")/.."
dev=${1:-cuda:0}
out=${OUT:-/tmp}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true

# cuBLAS where the loader may not look (a CUDA image's toolkit, PyTorch's
# nvidia-cublas wheel), under the unversioned name cudarc asks for first.
libs=/tmp/hydra-cuda-libs
mkdir -p "$libs"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/targets/sbsa-linux/lib \
    $(python3 -c 'import nvidia.cublas as c, os; print(*[os.path.join(p, "lib") for p in c.__path__])' 2>/dev/null); do
    for f in "$d"/libcublas.so.[0-9]*; do
        [ -e "$f" ] || continue
        [ -e "$libs/libcublas.so" ] || ln -s "$f" "$libs/libcublas.so"
        LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        break
    done
done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [ -n "${GPU_CHECK_BUNDLE:-}" ] || ! command -v cargo >/dev/null; then
    [ -d gpu-bundle ] || { echo "no cargo and no gpu-bundle/ (bash targets/gpu-bundle.sh makes it)"; exit 1; }
    b=/tmp/hydra-gpu-bundle
    mkdir -p "$b"
    unxz() { # file.xz → stdout
        if command -v xz >/dev/null; then xz -dc "$1"
        else python3 -c 'import lzma, sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' "$1"; fi
    }
    mkdir -p "$b/minilm"
    for f in device-tests hydra-edge train_step; do
        unxz "gpu-bundle/$f.xz" > "$b/$f"
        chmod +x "$b/$f"
    done
    cp gpu-bundle/minilm/minilm.onnx "$b/minilm/"
    unxz gpu-bundle/minilm/minilm.weights.xz > "$b/minilm/minilm.weights"
    export HYDRA_REPO_ROOT=$PWD HYDRA_EDGE_BIN=$b/hydra-edge
    run_tests() { "$b/device-tests" --include-ignored --nocapture; }
    run_step() { HYDRA_MODELS_DIR=$b/minilm TRAIN_STEP_VOCAB=$(cat gpu-bundle/minilm/VOCAB) "$b/train_step" "$@"; }
    have_minilm=$b/minilm/minilm.onnx
else
    run_tests() { cargo test --release --features cuda --test device -- --include-ignored --nocapture; }
    run_step() { cargo run --release --features cuda --example train_step -- "$@"; }
    have_minilm=models/real/out/minilm.onnx
fi

echo "=== GPU tests (tests/device.rs, ignored ones included)"
run_tests 2>&1 | tee "$out/gpu-check-tests.log"
grep -q "^test result: ok\. [0-9]* passed; 0 failed; 0 ignored" "$out/gpu-check-tests.log"

if [ -f "$have_minilm" ]; then
    echo "=== MiniLM training step, CPU vs $dev"
    HYDRA_DEVICE=$dev TRAIN_STEP_ONLY=1 run_step "$(nproc)" "${STEPS:-10}" 2>&1 | tee "$out/gpu-check-step.log"
else
    echo "=== MiniLM step skipped: $have_minilm is missing"
fi
