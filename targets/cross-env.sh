# Source this (`. targets/cross-env.sh`) after targets/setup-cross.sh: the
# environment that cross builds and qemu runs use. Kept out of
# .cargo/config.toml so that native aarch64 builds (on a Pi, a Jetson) are
# not sent through qemu or a cross linker.

# Link aarch64 Linux binaries with Debian's cross gcc (glibc from
# libc6-dev-arm64-cross); run them under qemu-user with that glibc as root.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# tests/tier_env.rs starts its own binary again; it finds this runner by the
# variable's name (qemu-user alone cannot exec a foreign binary unless
# binfmt_misc is registered, which containers often lack). HYDRA_TEST_RUNNER
# overrides it where the runner is configured some other way.
