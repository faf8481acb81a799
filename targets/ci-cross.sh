#!/usr/bin/env bash
# CI's ARM and firmware stages (called by .ci/run after the x86 stages):
#   1. the rpi4 profile's build: the whole runtime (default features: tract,
#      trainer, CLI) for aarch64, and the test targets that need no Python;
#      under qemu-user as a Raspberry Pi 4 (QEMU_CPU=cortex-a72: dispatch must
#      pick `neon`) and as a Raspberry Pi 5 (cortex-a76: `fp16`) — the tests
#      (kernels, Hydra math, adapter files, the tail's ops, training, merge
#      and hot-swap, the CLI end to end, devices) and the CLI demo (adapt, merge, check), which must
#      report the expected tier and, on both, f16 kernel calls on the cached
#      f16 features; once more with HYDRA_KERNELS=neon forced on the cortex-a76;
#   2. the Jetson build with the `cuda` feature (cross-built; no GPU here);
#   3. clippy for aarch64 (the x86 clippy never sees the aarch64 tiers);
#   4. the no_std core for thumbv7em-none-eabihf and aarch64-unknown-none,
#      and the firmware size probe's sections for thumbv7em-none-eabihf.
# Needs targets/setup-cross.sh to have run (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=targets/cross-env.sh
. targets/cross-env.sh

arm=aarch64-unknown-linux-gnu
# The test targets that need no Python (tests/corpus, merge, split and
# real_models check against onnxruntime or need the Python-built models).
tests=(--lib --test kernels --test hydra --test adapter_file --test tier_env --test tail_ops
    --test train --test cli --test device)
# tests/merge.rs without the cases that run onnxruntime.
merge=(--test merge -- --skip merged_equals_unmerged --skip weights_from_constant
    --skip stale_declared)
summary=()
stage() { echo; echo "=== $*"; }
secs() { echo $(($(date +%s) - $1)); }

stage "aarch64: build the runtime and its tests ($arm, default features)"
t0=$(date +%s)
cargo +debian build --release --target "$arm" --bin hydra-edge
cargo +debian test --release --target "$arm" "${tests[@]}" --test merge --no-run
summary+=("aarch64 build (default features, release): $(secs "$t0") s")
exe=target/$arm/release/hydra-edge

run_qemu() { # QEMU_CPU EXPECTED_TIER [HYDRA_KERNELS] -- cargo test args
    local cpu=$1 want=$2 force=$3 log t0
    shift 4
    log=$(mktemp)
    stage "aarch64 under qemu: QEMU_CPU=$cpu${force:+ HYDRA_KERNELS=$force}, expecting tier $want"
    t0=$(date +%s)
    if ! env QEMU_CPU="$cpu" HYDRA_EXPECT_TIER="$want" ${force:+HYDRA_KERNELS="$force"} \
        cargo +debian test --release --target "$arm" "$@" 2>&1 | tee "$log"; then
        echo "aarch64 tests failed under QEMU_CPU=$cpu" >&2
        exit 1
    fi
    local tier passed
    tier=$(grep -o 'dispatched kernel tier: [a-z0-9]*' "$log" | head -n1 | awk '{print $4}' || true)
    passed=$(grep -o '^test result: ok\. [0-9]* passed' "$log" | awk '{s += $4} END {print s + 0}' || true)
    summary+=("QEMU_CPU=$cpu${force:+ HYDRA_KERNELS=$force} ($*): ${tier:+dispatched tier $tier, }$passed tests passed in $(secs "$t0") s")
    rm -f "$log"
}

run_demo() { # QEMU_CPU EXPECTED_TIER: the CLI demo end to end, checked
    local cpu=$1 want=$2 out t0
    stage "aarch64 under qemu: QEMU_CPU=$cpu hydra-edge demo"
    t0=$(date +%s)
    QEMU_CPU=$cpu qemu-aarch64 -L /usr/aarch64-linux-gnu "$exe" demo
    out=$(QEMU_CPU=$cpu qemu-aarch64 -L /usr/aarch64-linux-gnu "$exe" --json demo)
    summary+=("$(python3 - "$want" "$out" <<'PY'
import json, sys
want, j = sys.argv[1], json.loads(sys.argv[2])
problems = []
if j["tier"] != want: problems.append(f"tier {j['tier']}, expected {want}")
if not j["f16_kernel_calls"] > 0: problems.append("the f16 kernels never ran")
if not j["accuracy_after"] > max(0.85, j["accuracy_before"]): problems.append(f"accuracy {j['accuracy_after']}")
if not j["merge_max_abs_error"] < 1e-3: problems.append(f"merged vs unmerged {j['merge_max_abs_error']}")
if problems: sys.exit("demo: " + "; ".join(problems))
print(f"demo: tier {j['tier']}, {j['f16_kernel_calls']} f16 kernel calls, accuracy "
      f"{100*j['accuracy_before']:.1f}% -> {100*j['accuracy_after']:.1f}%, merged vs unmerged "
      f"{j['merge_max_abs_error']:.1e}, training {j['train_seconds']:.1f} s", end="")
PY
) (QEMU_CPU=$cpu, both runs $(secs "$t0") s)")
}

run_qemu cortex-a72 neon "" -- "${tests[@]}"
run_qemu cortex-a72 neon "" -- "${merge[@]}"
run_demo cortex-a72 neon
run_qemu cortex-a76 fp16 "" -- "${tests[@]}"
run_qemu cortex-a76 fp16 "" -- "${merge[@]}"
run_demo cortex-a76 fp16
run_qemu cortex-a76 neon neon -- --test tier_env

stage "aarch64: the Jetson build with the cuda feature"
t0=$(date +%s)
cargo +debian build --release --target "$arm" --features cuda --bin hydra-edge
summary+=("aarch64 cuda build: $(secs "$t0") s")

stage "aarch64: clippy (the core: std, no onnx)"
cargo +debian clippy --target "$arm" --no-default-features --features std --all-targets -- -D warnings

for fw in thumbv7em-none-eabihf aarch64-unknown-none; do
    stage "firmware: no_std core for $fw"
    RUSTC_BOOTSTRAP=1 cargo +debian build --release -Zbuild-std=core,alloc --target "$fw" \
        --no-default-features
done
stage "firmware: size of the core linked into a thumbv7em-none-eabihf image"
targets/firmware-size.sh thumbv7em-none-eabihf

stage "ARM summary"
printf '%s\n' "${summary[@]}"
