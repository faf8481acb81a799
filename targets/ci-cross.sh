#!/usr/bin/env bash
# CI's ARM and firmware stages (called by .ci/run after the x86 stages):
#   1. the aarch64 build of every test target without the `onnx` feature
#      (tract is not built for aarch64 here), then the tests under qemu-user
#      as a Raspberry Pi 4 (QEMU_CPU=cortex-a72: dispatch must pick `neon`)
#      and as a Raspberry Pi 5 (cortex-a76: `fp16`), and once with
#      HYDRA_KERNELS=neon forced on the cortex-a76;
#   2. clippy for aarch64 (the x86 clippy never sees the aarch64 tiers);
#   3. the no_std core for thumbv7em-none-eabihf and aarch64-unknown-none,
#      and the firmware size probe's sections for thumbv7em-none-eabihf.
# Needs targets/setup-cross.sh to have run (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=targets/cross-env.sh
. targets/cross-env.sh

arm=aarch64-unknown-linux-gnu
features=(--no-default-features --features std)
summary=()
stage() { echo; echo "=== $*"; }

stage "aarch64: build the tests ($arm, ${features[*]})"
cargo +debian test --release --target "$arm" "${features[@]}" --no-run

run_qemu() { # QEMU_CPU EXPECTED_TIER [HYDRA_KERNELS] -- cargo test args
    local cpu=$1 want=$2 force=$3 log
    shift 4
    log=$(mktemp)
    stage "aarch64 under qemu: QEMU_CPU=$cpu${force:+ HYDRA_KERNELS=$force}, expecting tier $want"
    if ! env QEMU_CPU="$cpu" HYDRA_EXPECT_TIER="$want" ${force:+HYDRA_KERNELS="$force"} \
        cargo +debian test --release --target "$arm" "${features[@]}" "$@" 2>&1 | tee "$log"; then
        echo "aarch64 tests failed under QEMU_CPU=$cpu" >&2
        exit 1
    fi
    local tier passed
    tier=$(grep -o 'dispatched kernel tier: [a-z0-9]*' "$log" | head -n1 | awk '{print $4}')
    passed=$(grep -o '^test result: ok\. [0-9]* passed' "$log" | awk '{s += $4} END {print s + 0}')
    summary+=("QEMU_CPU=$cpu${force:+ HYDRA_KERNELS=$force}: dispatched tier ${tier:-?}, $passed tests passed")
    rm -f "$log"
}
run_qemu cortex-a72 neon "" --
run_qemu cortex-a76 fp16 "" --
run_qemu cortex-a76 neon neon -- --test tier_env

stage "aarch64: clippy"
cargo +debian clippy --target "$arm" "${features[@]}" --all-targets -- -D warnings

for fw in thumbv7em-none-eabihf aarch64-unknown-none; do
    stage "firmware: no_std core for $fw"
    RUSTC_BOOTSTRAP=1 cargo +debian build --release -Zbuild-std=core,alloc --target "$fw" \
        --no-default-features
done
stage "firmware: size of the core linked into a thumbv7em-none-eabihf image"
targets/firmware-size.sh thumbv7em-none-eabihf

stage "ARM summary"
printf '%s\n' "${summary[@]}"
