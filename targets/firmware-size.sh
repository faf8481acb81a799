#!/usr/bin/env bash
# Builds the firmware size probe (targets/firmware/size-probe: a bare-metal
# image that calls every kernel and one HydraLinear train-and-merge step) for
# a no_std target and prints its section sizes, then the .text split by the
# crate each function comes from. Needs targets/setup-cross.sh.
#
#   targets/firmware-size.sh [TARGET]      (default thumbv7em-none-eabihf)
#
# The build profile is the probe's: opt-level "s", fat LTO, panic=abort.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-thumbv7em-none-eabihf}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}/size-probe
# The probe resolves its dependencies from the main crate's lock file, so it
# measures the versions the crate ships with.
cp Cargo.lock targets/firmware/size-probe/Cargo.lock
RUSTC_BOOTSTRAP=1 cargo +debian build --release -Zbuild-std=core,alloc \
    --target "$target" --manifest-path targets/firmware/size-probe/Cargo.toml
elf="$CARGO_TARGET_DIR/$target/release/hydra-edge-size-probe"
# The LLVM tools of the version Debian's rust-lld belongs to (lld-22 -> llvm-size-22).
llvm_ver=$(readlink /usr/bin/rust-lld | sed 's/^lld-//')
tool() { command -v "$1-$llvm_ver" || command -v "$1"; }
size=$(tool llvm-size)
nm=$(tool llvm-nm)
echo "== $target: sections of the linked probe (bytes)"
"$size" -A "$elf" | grep -E '^\.(text|rodata|data|bss|ARM\.exidx) '
echo "== $target: .text by origin (bytes; the entry holds what LTO inlined into it)"
"$nm" --print-size --size-sort -C --radix=d "$elf" | awk '
    $3 ~ /^[tT]$/ {
        name = $0; sub(/^[0-9]+ [0-9]+ [tT] /, "", name)
        if (name ~ /hydra_edge/) k = "hydra_edge (kernels, Hydra math)"
        else if (name ~ /matrixmultiply/) k = "matrixmultiply (dense W0 products)"
        else if (name ~ /compiler_builtins/) k = "compiler_builtins (soft f64, division)"
        else if (name ~ /core::fmt/) k = "core::fmt (error and panic messages)"
        else if (name ~ /^_start$/) k = "entry (_start, with inlined callers)"
        else k = "other core/alloc/half/probe"
        sum[k] += $2; total += $2
    }
    END { for (k in sum) printf "%8d  %s\n", sum[k], k; printf "%8d  total of sized symbols\n", total }' |
    sort -rn
