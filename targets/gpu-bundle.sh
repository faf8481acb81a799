#!/usr/bin/env bash
# Prepares targets/gpu-check.sh for a GPU machine that cannot build: the
# workplace's device machines have CUDA but no Rust and no network, and take at
# most 64 MiB of working tree. Builds here (x86-64 Linux; the binaries need
# glibc 2.35 or later) and writes gpu-bundle/ (git-ignored; carry it: run(...,
# carry: ["gpu-bundle"], timeout_s=480)):
#   device-tests.xz   tests/device.rs with --features cuda (GPU tests included)
#   hydra-edge.xz     the CLI with --features cuda
#   train_step.xz     examples/train_step with --features cuda
#   minilm/           models/real/out/minilm.onnx with its word-embedding table cut
#                     to its first VOCAB rows (train_step then draws ids below it:
#                     TRAIN_STEP_VOCAB), so it fits; every other weight as it is
#                     (minilm.weights.xz)
# Usage: bash targets/gpu-bundle.sh   (then, there: bash targets/gpu-check.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
VOCAB=${VOCAB:-2048}
out=gpu-bundle
rm -rf "$out" && mkdir -p "$out/minilm"
bin_of() { # target name, cargo args… → the executable cargo built for that target
    local name=$1
    shift
    cargo "$@" --message-format=json 2>/dev/null | python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$name" | tail -1
}
cargo build --release --features cuda --bin hydra-edge --example train_step
cargo test --release --features cuda --test device --no-run
pack() { strip -o "$out/$2" "$1" && xz -T0 -6 "$out/$2"; }
pack "$(bin_of device test --release --features cuda --test device --no-run)" device-tests
pack "$(bin_of hydra-edge build --release --features cuda --bin hydra-edge)" hydra-edge
pack "$(bin_of train_step build --release --features cuda --example train_step)" train_step
[ -f models/real/out/minilm.weights ] || python3 models/real/build_minilm.py
python3 - "$VOCAB" "$out/minilm" <<'PY'
import sys, onnx, onnx.numpy_helper as nh
vocab, dst = int(sys.argv[1]), sys.argv[2]
m = onnx.load("models/real/out/minilm.onnx")  # loads the external weights too
for i, t in enumerate(m.graph.initializer):
    if t.name == "embeddings.word_embeddings.weight":
        a = nh.to_array(t)[:vocab].copy()
        m.graph.initializer[i].CopyFrom(nh.from_array(a, t.name))
        break
else:
    sys.exit("no word-embedding table in minilm.onnx")
onnx.save(m, f"{dst}/minilm.onnx", save_as_external_data=True, location="minilm.weights",
          size_threshold=1024)
PY
echo "$VOCAB" > "$out/minilm/VOCAB"
# What gpu-check.sh compares, so it never runs binaries of other sources.
find src tests examples Cargo.toml Cargo.lock -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16 \
    > "$out/SRCSUM"
xz -T0 -6 "$out/minilm/minilm.weights" # 46.5 → 41.9 MB: what makes it fit
du -ab "$out" | sort -n | tail -8
# Everything that travels: the bundle, tracked files and untracked ones git does not ignore.
total=$(( $(du -sb "$out" | cut -f1) + $(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb | tail -1 | cut -f1) ))
echo "gpu-bundle: $((total / 1048576)) MiB with the tracked tree (the device takes 64 MiB)"
[ "$total" -lt $((64 * 1048576)) ]
