#!/usr/bin/env bash
# The GPU tests of tests/device.rs (ignored without a GPU) against a host-memory
# stand-in for the CUDA driver and cuBLAS (mock_cuda.c, mock_cublas.c), on any
# machine: it checks the `cuda` feature's plumbing — which calls, transposes,
# leading dimensions and extents, what goes up and comes back, which context is
# current when memory is freed — and that every product the tests send reaches
# the "GPU" and matches the CPU. It cannot check a GPU's arithmetic or speed:
# targets/gpu-check.sh on a real GPU does.
#   bash targets/cuda-mock/run.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=target/cuda-mock
mkdir -p "$out"
# The mock NVRTC compiles the kernels' CUDA source with the system's C++ compiler.
command -v c++ >/dev/null || { echo "run.sh: no c++ (the mock NVRTC needs it: apt-get install g++)" >&2; exit 1; }
cc -O2 -fPIC -shared -Wall -Wextra -Werror -Wl,-soname,libcuda.so \
    -o "$out/libcuda.so" targets/cuda-mock/mock_cuda.c -lpthread -ldl
cc -O2 -fPIC -shared -Wall -Wextra -Werror -Wl,-soname,libnvrtc.so \
    -o "$out/libnvrtc.so" targets/cuda-mock/mock_nvrtc.c
cc -O2 -fPIC -shared -Wall -Wextra -Werror -Wl,-soname,libcublas.so \
    -o "$out/libcublas.so" targets/cuda-mock/mock_cublas.c -L"$out" -lcuda -Wl,-rpath,'$ORIGIN'
# Three GPUs: with memory pools (cudarc allocates and frees asynchronously, as
# on current GPUs), without (synchronous allocation), and one of compute
# capability 7 that shares the host's memory, as a Jetson Xavier's does (no
# bf16 tensor cores: bf16 asked for stays f32 there).
for mode in "1 9 0" "0 9 0" "1 7 1"; do
    read -r pools cc integrated <<<"$mode"
    echo "=== mock GPU, memory pools: $pools, compute capability $cc.0, integrated: $integrated"
    log="$out/device-tests-pools$pools-cc$cc.log"
    rm -f "$out/fault-$pools-$cc"
    MOCK_CUDA_POOLS=$pools MOCK_CUDA_CC_MAJOR=$cc MOCK_CUDA_INTEGRATED=$integrated MOCK_CUDA_REPORT=1 \
        MOCK_CUDA_FAULTS="$PWD/$out/fault-$pools-$cc" MOCK_NVRTC_DIR="$PWD/$out" \
        LD_LIBRARY_PATH="$PWD/$out${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        cargo test --release --features cuda --test device "$@" -- --include-ignored --nocapture \
        2>&1 | tee "$log"
    # Passed, with every GPU test run (none ignored) and reaching the mock.
    grep -q "^test result: ok\. [0-9]* passed; 0 failed; 0 ignored" "$log"
    grep -q "GPU: mock GPU 0" "$log"
    # The fault-injection test ran (it needs the mock, so it skips elsewhere).
    grep -q "^injected faults: " "$log"
    grep -q "^injected optimizer faults: " "$log"
    grep -q "^injected resident faults: " "$log"
    grep -q "^injected cache faults: " "$log"
    # Every allocation freed by the end (a refused free leaves one live).
    grep -q "^mock cuda: 0 allocation(s) live at exit" "$log"
    if grep -q "^mock cuda: [1-9][0-9]* allocation(s) live at exit" "$log"; then
        echo "run.sh: GPU memory left allocated at exit (a free was refused)" >&2
        exit 1
    fi
done
