#!/usr/bin/env bash
# Installs what the aarch64 tests under qemu and the no_std firmware builds
# need, on a Debian bookworm x86-64 machine where rustup cannot download
# targets. Idempotent, non-interactive, run as root; CI (.ci/run) calls it.
#
# What it sets up, and why this way:
# - Debian's rustc-web / cargo-web (1.96) and, for arm64, the libstd-rust-web-dev
#   of exactly the same version. The arm64 package is fetched with a private
#   apt state (its own lists, status and cache) instead of
#   `dpkg --add-architecture arm64`, which breaks `apt-get update` here; its
#   lib/rustlib/aarch64-unknown-linux-gnu is copied into Debian rustc's
#   sysroot (/usr/lib/rustlib).
# - A rustup toolchain `debian` linked to Debian's rustc/cargo, so that
#   `cargo +debian ...` picks them while plain `cargo` stays rustup's.
# - Linker gcc-aarch64-linux-gnu + libc6-dev-arm64-cross; runner qemu-user.
# - rust-web-src (for -Zbuild-std=core,alloc), rust-web-llvm and the lld
#   package its rust-lld links to (thumbv7em-none-eabihf and
#   aarch64-unknown-none link with rust-lld), rust-web-clippy (lints the
#   aarch64 tiers).
#
# Afterwards, see targets/cross-env.sh for the environment the builds use.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "setup-cross.sh: run as root (it installs Debian packages)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive

STATE=${HYDRA_CROSS_STATE:-/var/cache/hydra-edge-cross}
TOOLCHAIN_DIR=${HYDRA_CROSS_TOOLCHAIN_DIR:-/opt/hydra-edge/rust-debian}
SYSROOT_LIB=/usr/lib/rustlib
ARM_TRIPLE=aarch64-unknown-linux-gnu
PKGS=(rustc-web cargo-web rust-web-src rust-web-llvm rust-web-clippy
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)

log() { echo "setup-cross: $*"; }

# Prints the packages among "$@" that are not installed.
missing() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' ||
            echo "$p"
    done
}

apt_updated=0
install_pkgs() {
    local todo
    mapfile -t todo < <(missing "$@")
    [ "${#todo[@]}" -eq 0 ] && return 0
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    log "installing ${todo[*]}"
    apt-get install -y -qq --no-install-recommends "${todo[@]}" >/dev/null
}

# 1. Debian's Rust, the cross linker and the runner.
install_pkgs "${PKGS[@]}"

# 2. The lld that Debian's rust-lld points at (e.g. /usr/bin/rust-lld -> lld-22).
lld_target=$(readlink /usr/bin/rust-lld || true)
if [ -z "$lld_target" ]; then
    echo "setup-cross.sh: /usr/bin/rust-lld is not a link; rust-web-llvm changed layout" >&2
    exit 1
fi
install_pkgs "$(basename "$lld_target")"
/usr/bin/rust-lld -flavor gnu --version >/dev/null

# 3. The arm64 standard library of exactly the installed rustc's version.
version=$(dpkg-query -W -f='${Version}' rustc-web)
marker="$SYSROOT_LIB/$ARM_TRIPLE/.hydra-edge-debian-version"
if [ "$(cat "$marker" 2>/dev/null)" != "$version" ]; then
    log "fetching libstd-rust-web-dev:arm64 $version with a private apt state in $STATE"
    mkdir -p "$STATE/lists/partial" "$STATE/cache/archives/partial" "$STATE/deb"
    touch "$STATE/status"
    apt_arm64=(-qq -oAPT::Architecture=arm64 -oAPT::Architectures=arm64
        "-oDir::State::Lists=$STATE/lists" "-oDir::State::Status=$STATE/status"
        "-oDir::Cache=$STATE/cache" -oAPT::Sandbox::User=root)
    apt-get "${apt_arm64[@]}" update
    rm -rf "$STATE/deb" "$STATE/x"
    mkdir -p "$STATE/deb" "$STATE/x"
    (cd "$STATE/deb" && apt-get "${apt_arm64[@]}" download "libstd-rust-web-dev=$version")
    dpkg -x "$STATE"/deb/libstd-rust-web-dev_*_arm64.deb "$STATE/x"
    src=$(find "$STATE/x" -type d -path "*/lib/rustlib/$ARM_TRIPLE" | head -n1)
    if [ -z "$src" ]; then
        echo "setup-cross.sh: no lib/rustlib/$ARM_TRIPLE in libstd-rust-web-dev:arm64" >&2
        exit 1
    fi
    rm -rf "${SYSROOT_LIB:?}/$ARM_TRIPLE"
    cp -a "$src" "$SYSROOT_LIB/$ARM_TRIPLE"
    echo "$version" >"$marker"
    rm -rf "$STATE/x" "$STATE/deb"
fi

# 4. `cargo +debian`: a rustup toolchain whose binaries are Debian's.
mkdir -p "$TOOLCHAIN_DIR/bin" "$TOOLCHAIN_DIR/lib"
for tool in rustc rustdoc cargo cargo-clippy clippy-driver; do
    if [ -x "/usr/bin/$tool" ]; then
        ln -sfn "/usr/bin/$tool" "$TOOLCHAIN_DIR/bin/$tool"
    fi
done
rustup=$(command -v rustup || echo "${CARGO_HOME:-$HOME/.cargo}/bin/rustup")
if [ ! -x "$rustup" ]; then
    echo "setup-cross.sh: rustup not found; use $TOOLCHAIN_DIR/bin/cargo directly" >&2
    exit 1
fi
if ! "$rustup" toolchain list | grep -q '^debian'; then
    "$rustup" toolchain link debian "$TOOLCHAIN_DIR"
fi

# 5. A smoke check of each piece, so a broken install fails here, not mid-CI.
"$rustup" run debian rustc --print sysroot >/dev/null
"$rustup" run debian rustc --target "$ARM_TRIPLE" --print target-libdir >/dev/null
ls "$SYSROOT_LIB/$ARM_TRIPLE/lib"/libstd-*.rlib >/dev/null
test -f "$SYSROOT_LIB/src/rust/library/Cargo.lock"
command -v aarch64-linux-gnu-gcc qemu-aarch64 >/dev/null
log "ready: $("$rustup" run debian rustc --version), arm64 std $version, $(qemu-aarch64 --version | head -n1)"
