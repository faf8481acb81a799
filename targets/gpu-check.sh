#!/usr/bin/env bash
# The GPU checks of the `cuda` feature, on a machine with an NVIDIA GPU and its
# driver, cuBLAS and NVRTC (no CUDA toolkit is needed: cudarc loads them at run
# time; the optimizer tests fail, saying so, where NVRTC is missing).
# Fails — never passes quietly — where no GPU starts.
#   1. tests/device.rs's GPU tests (ignored elsewhere): every product of a small
#      model on the GPU vs the CPU — products in every operand layout, forward,
#      gradients, adapted layers' passes whole on the GPU, optimizer steps (bit
#      for bit), a short training run, resident weights, bf16 on tensor cores,
#      the CLI — with explicit tolerances;
#   2. the engine issue's MiniLM training step (examples/train_step) on the CPU
#      and with HYDRA_DEVICE=cuda (f32, then bf16 on tensor cores), with one
#      batch's max |GPU − CPU| per gradient tensor (fails past 1e-3).
# Both run (each under `timeout`) even if the first fails; the exit status says
# whether both passed. Logs go to $OUT (or /tmp).
# Two ways to run it:
#   - with cargo (a Jetson, a workstation): builds and runs; step 2 needs
#     models/real/out/minilm.onnx (bash scripts/test.sh builds it);
#   - from gpu-bundle/ (bash targets/gpu-bundle.sh here first), where the GPU
#     machine has no Rust or network, e.g. this workplace's device machines:
#     run(command="bash targets/gpu-check.sh", carry=["gpu-bundle"], timeout_s=480).
#     GPU_CHECK_BUNDLE=1 forces this where cargo exists.
# Usage: targets/gpu-check.sh [cuda:N]
set -euo pipefail
cd "$(dirname "$0")/.."
dev=${1:-cuda:0}
out=${OUT:-/tmp}
mkdir -p "$out"
# The tolerances assume f32 products, not TF32.
export NVIDIA_TF32_OVERRIDE=0
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true

# The driver's folder, where an image mounts it off the loader's path.
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    [ -d "$d" ] && LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
# cuBLAS (and cuBLASLt beside it) from the first folder that has it: a CUDA
# toolkit, or PyTorch's wheels (nvidia/cu13/lib for CUDA 13, nvidia/cublas/lib
# for 12); linked as the unversioned name cudarc asks for first (its list
# stops at .so.12).
libs=/tmp/hydra-cuda-libs
mkdir -p "$libs"
purelib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
# find_lib NAME FOLDER...: links the first FOLDER/NAME.so.N found as
# $libs/NAME.so, puts FOLDER on the library path, and leaves its path in $hit.
find_lib() {
    local name=$1 d f
    shift
    hit=
    for d in "$@"; do
        for f in "$d/$name".so.[0-9]*; do
            [ -e "$f" ] || continue
            ln -sfn "$f" "$libs/$name.so"
            LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            hit=$f
            return 0
        done
    done
}
toolkit=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/targets/sbsa-linux/lib)
wheels=(${purelib:+"$purelib"/nvidia/cu13/lib "$purelib"/nvidia/cu12/lib})
find_lib libcublas "${toolkit[@]}" "${wheels[@]}" ${purelib:+"$purelib"/nvidia/cublas/lib}
found=$hit
# NVRTC (the optimizer's kernels are compiled at run time), the same way.
find_lib libnvrtc "${toolkit[@]}" "${wheels[@]}" ${purelib:+"$purelib"/nvidia/cuda_nvrtc/lib}
nvrtc=$hit
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
    echo "cuBLAS: ${found:-none found in the usual folders}"
    echo "NVRTC: ${nvrtc:-none found in the usual folders}"
    [ -n "$nvrtc" ] || find / -xdev -name 'libnvrtc.so*' 2>/dev/null | head
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|libcublas' || true
    [ -n "$found" ] || find / -xdev -name 'libcublas.so*' 2>/dev/null | head
} 2>&1 | tee "$out/gpu-check-libs.log"

threads=$(nproc)
threads=$((threads < 16 ? threads : 16))
if [ -n "${GPU_CHECK_BUNDLE:-}" ] || ! command -v cargo >/dev/null; then
    [ -d gpu-bundle ] || { echo "no cargo and no gpu-bundle/ (bash targets/gpu-bundle.sh makes it)"; exit 1; }
    # The bundle must be built from this very source.
    sum=$(find src tests examples Cargo.toml Cargo.lock -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
    if [ "$sum" != "$(cat gpu-bundle/SRCSUM)" ]; then
        echo "gpu-bundle/ was built from other sources ($(cat gpu-bundle/SRCSUM), here $sum): bash targets/gpu-bundle.sh"
        exit 1
    fi
    b=/tmp/hydra-gpu-bundle
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
    run_tests() { timeout 300 "$b/device-tests" --include-ignored --nocapture; }
    run_step() {
        HYDRA_MODELS_DIR=$b/minilm TRAIN_STEP_VOCAB=$(cat gpu-bundle/minilm/VOCAB) timeout 300 "$b/train_step" "$@"
    }
    have_minilm=$b/minilm/minilm.onnx
else
    run_tests() { timeout 1200 cargo test --release --features cuda --test device -- --include-ignored --nocapture; }
    run_step() { timeout 1200 cargo run --release --features cuda --example train_step -- "$@"; }
    have_minilm=models/real/out/minilm.onnx
fi

set +e
echo "=== GPU tests (tests/device.rs, ignored ones included)"
run_tests 2>&1 | tee "$out/gpu-check-tests.log"
grep -q "^test result: ok\. [0-9]* passed; 0 failed; 0 ignored" "$out/gpu-check-tests.log"
tests_rc=$?
step_rc=0
if [ -f "$have_minilm" ]; then
    echo "=== MiniLM training step, CPU (up to $threads threads) vs $dev"
    HYDRA_DEVICE=$dev TRAIN_STEP_ONLY=1 run_step "$threads" "${STEPS:-10}" 2>&1 | tee "$out/gpu-check-step.log"
    step_rc=${PIPESTATUS[0]}
else
    echo "=== MiniLM step skipped: $have_minilm is missing"
fi
set -e
echo "=== gpu-check: tests $([ $tests_rc = 0 ] && echo passed || echo FAILED), MiniLM step rc $step_rc"
[ "$tests_rc" = 0 ] && [ "$step_rc" = 0 ]
