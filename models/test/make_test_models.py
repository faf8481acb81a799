#!/usr/bin/env python3
"""Builds the small ONNX test models (onnx.helper + numpy only) and writes
them next to this script. Seeded: re-running gives identical files.

    python3 models/test/make_test_models.py

- mlp.onnx: Gemm(transB=1) + Relu ×2 + Gemm head; input x [N, 16] → logits [N, 10].
- transformer.onnx (opset 13): 2 encoder blocks with an attention mask,
  decomposed LayerNorm (ReduceMean/Sub/Pow/Sqrt/Div) and Erf-GELU; inputs
  x [N, 8, 32], mask [N, 8]; outputs hidden [N, 8, 32] and logits [N, 4]
  (classifier on token 0, picked by Gather).
- transformer_ln17.onnx (opset 17): the same with LayerNormalization.
- cnn.onnx: Conv3×3+Relu ×2, then 1×1 Conv + Clip + GlobalAveragePool +
  Flatten + Gemm; input image [N, 3, 16, 16] → logits [N, 10].
- mlp_external.onnx + mlp_external.weights: the MLP with its initializers
  stored as external data.
- shape_target.onnx: Gemm + Relu, then a Reshape whose target is built from
  Shape(x) → Gather → Concat (as torch.onnx writes `view(x.size(0), ...)`),
  ReduceMean, Gemm head; input x [N, 8] → logits [N, 3]. The target's shape
  is the same at every batch size but its value is not: the feature cache
  must not freeze it at the value it had when probed.
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(1234)


def w(*shape, scale=None):
    fan_in = shape[-1] if len(shape) > 1 else shape[0]
    s = scale if scale is not None else 1.0 / np.sqrt(fan_in)
    return (rng.uniform(-1, 1, size=shape) * s).astype(np.float32)


class G:
    """A tiny graph builder: initializers, nodes with unique names."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op, inputs, name, outputs=None, **attrs):
        out = outputs or [name + "_out"]
        self.nodes.append(helper.make_node(op, inputs, out, name=name, **attrs))
        return out[0] if len(out) == 1 else out

    def model(self, name, inputs, outputs, opset):
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="hydra-edge tests")
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


def mlp():
    g = G()
    x = "x"
    h = g.op("Gemm", [x, g.const("fc1.weight", w(32, 16)), g.const("fc1.bias", w(32))], "fc1", transB=1)
    h = g.op("Relu", [h], "relu1")
    h = g.op("Gemm", [h, g.const("fc2.weight", w(32, 32)), g.const("fc2.bias", w(32))], "fc2", transB=1)
    h = g.op("Relu", [h], "relu2")
    g.op("Gemm", [h, g.const("head.weight", w(10, 32)), g.const("head.bias", w(10))], "head", ["logits"], transB=1)
    inp = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])]
    out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])]
    return g.model("mlp", inp, out, 13)


D, S, H, FF = 32, 8, 4, 64


def linear(g, x, din, dout, name):
    y = g.op("MatMul", [x, g.const(name + ".weight", w(din, dout, scale=1 / np.sqrt(din)))], name + "/MatMul")
    return g.op("Add", [y, g.const(name + ".bias", w(dout))], name + "/Add")


def layer_norm(g, x, name, fused):
    gamma = g.const(name + ".gamma", (1 + 0.1 * w(D, scale=1)).astype(np.float32))
    beta = g.const(name + ".beta", w(D, scale=0.1))
    if fused:
        return g.op("LayerNormalization", [x, gamma, beta], name + "/LN", axis=-1, epsilon=1e-5)
    mean = g.op("ReduceMean", [x], name + "/mean", axes=[-1], keepdims=1)
    d = g.op("Sub", [x, mean], name + "/sub")
    var = g.op("ReduceMean", [g.op("Pow", [d, g.const(name + ".two", np.float32(2.0))], name + "/pow")], name + "/var", axes=[-1], keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var, g.const(name + ".eps", np.float32(1e-5))], name + "/addeps")], name + "/sqrt")
    n = g.op("Div", [d, std], name + "/div")
    return g.op("Add", [g.op("Mul", [n, gamma], name + "/mul"), beta], name + "/add")


def block(g, x, mask_term, i, fused):
    p = f"block{i}"
    q, k, v = (linear(g, x, D, D, f"{p}/attn/{t}") for t in "qkv")
    heads = g.const(f"{p}.heads_shape", np.array([0, 0, H, D // H], dtype=np.int64))
    q, k, v = (g.op("Reshape", [t, heads], f"{p}/attn/{n}_heads") for t, n in ((q, "q"), (k, "k"), (v, "v")))
    q = g.op("Transpose", [q], f"{p}/attn/q_t", perm=[0, 2, 1, 3])
    k = g.op("Transpose", [k], f"{p}/attn/k_t", perm=[0, 2, 3, 1])
    v = g.op("Transpose", [v], f"{p}/attn/v_t", perm=[0, 2, 1, 3])
    s = g.op("MatMul", [q, k], f"{p}/attn/scores")
    s = g.op("Mul", [s, g.const(f"{p}.scale", np.float32(1 / np.sqrt(D // H)))], f"{p}/attn/scaled")
    s = g.op("Add", [s, mask_term], f"{p}/attn/masked")
    a = g.op("Softmax", [s], f"{p}/attn/softmax", axis=-1)
    c = g.op("MatMul", [a, v], f"{p}/attn/context")
    c = g.op("Transpose", [c], f"{p}/attn/ctx_t", perm=[0, 2, 1, 3])
    c = g.op("Reshape", [c, g.const(f"{p}.merge_shape", np.array([0, 0, D], dtype=np.int64))], f"{p}/attn/merge")
    o = linear(g, c, D, D, f"{p}/attn/out")
    x = layer_norm(g, g.op("Add", [x, o], f"{p}/res1"), f"{p}/ln1", fused)
    h = linear(g, x, D, FF, f"{p}/ffn/fc1")
    # GELU (erf form): 0.5·h·(1 + erf(h/√2))
    e = g.op("Erf", [g.op("Div", [h, g.const(f"{p}.sqrt2", np.float32(np.sqrt(2.0)))], f"{p}/ffn/div")], f"{p}/ffn/erf")
    e = g.op("Add", [e, g.const(f"{p}.one", np.float32(1.0))], f"{p}/ffn/erf1")
    h = g.op("Mul", [g.op("Mul", [h, e], f"{p}/ffn/gelu_mul"), g.const(f"{p}.half", np.float32(0.5))], f"{p}/ffn/gelu")
    o = linear(g, h, FF, D, f"{p}/ffn/fc2")
    return layer_norm(g, g.op("Add", [x, o], f"{p}/res2"), f"{p}/ln2", fused)


def transformer(fused):
    g = G()
    # mask [N, S] (1 keep, 0 pad) → (1 − mask)·−10000 as [N, 1, 1, S]
    m = g.op("Sub", [g.const("one", np.float32(1.0)), "mask"], "mask/invert")
    m = g.op("Mul", [m, g.const("neg", np.float32(-10000.0))], "mask/scale")
    m = g.op("Unsqueeze", [m, g.const("mask_axes", np.array([1, 2], dtype=np.int64))], "mask/unsqueeze")
    x = "x"
    for i in range(2):
        x = block(g, x, m, i, fused)
    g.op("Identity", [x], "hidden/identity", ["hidden"])
    cls = g.op("Gather", ["hidden", g.const("cls_index", np.array(0, dtype=np.int64))], "pool/gather", ["pooled"], axis=1)
    g.op("Gemm", [cls, g.const("classifier.weight", w(4, D)), g.const("classifier.bias", w(4))], "classifier", ["logits"], transB=1)
    inp = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", S, D]),
           helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", S])]
    out = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", S, D]),
           helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])]
    return g.model("transformer", inp, out, 17 if fused else 13)


def cnn():
    g = G()
    h = g.op("Conv", ["image", g.const("conv1.weight", w(8, 3, 3, 3, scale=0.3)), g.const("conv1.bias", w(8))], "conv1", pads=[1, 1, 1, 1])
    h = g.op("Relu", [h], "relu1")
    h = g.op("Conv", [h, g.const("conv2.weight", w(16, 8, 3, 3, scale=0.15)), g.const("conv2.bias", w(16))], "conv2", pads=[1, 1, 1, 1], strides=[2, 2])
    h = g.op("Relu", [h], "relu2")
    h = g.op("Conv", [h, g.const("conv_head.weight", w(32, 16, 1, 1, scale=0.25)), g.const("conv_head.bias", w(32))], "conv_head")
    h = g.op("Clip", [h, g.const("clip_min", np.float32(0.0)), g.const("clip_max", np.float32(6.0))], "clip")
    h = g.op("GlobalAveragePool", [h], "pool")
    h = g.op("Flatten", [h], "flatten", ["features"], axis=1)
    g.op("Gemm", [h, g.const("classifier.weight", w(10, 32)), g.const("classifier.bias", w(10))], "classifier", ["logits"], transB=1)
    inp = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])]
    out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])]
    return g.model("cnn", inp, out, 13)


def shape_target():
    g = G()
    h = g.op("Gemm", ["x", g.const("fc1.weight", w(8, 8)), g.const("fc1.bias", w(8))], "fc1", transB=1)
    h = g.op("Relu", [h], "relu1")
    n = g.op("Gather", [g.op("Shape", ["x"], "shape_x"), g.const("zero", np.array(0, np.int64))], "batch_dim", axis=0)
    n = g.op("Unsqueeze", [n, g.const("axes0", np.array([0], np.int64))], "batch_dim_1d")
    target = g.op("Concat", [n, g.const("rest", np.array([2, 4], np.int64))], "target", axis=0)
    h = g.op("Reshape", [h, target], "reshape")
    h = g.op("ReduceMean", [h], "mean", axes=[1], keepdims=0)
    y = g.op("Gemm", [h, g.const("fc2.weight", w(3, 4)), g.const("fc2.bias", w(3))], "fc2", ["logits"], transB=1)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])]
    outputs = [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 3])]
    return g.model("shape_target", inputs, outputs, 13)


def main():
    models = {"mlp": mlp(), "transformer": transformer(False), "transformer_ln17": transformer(True), "cnn": cnn()}
    for name, m in models.items():
        onnx.save(m, os.path.join(HERE, name + ".onnx"))
    ext = mlp()
    onnx.save(ext, os.path.join(HERE, "mlp_external.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="mlp_external.weights", size_threshold=0)
    onnx.save(shape_target(), os.path.join(HERE, "shape_target.onnx"))
    for f in sorted(os.listdir(HERE)):
        if not f.endswith(".py"):
            print(f, os.path.getsize(os.path.join(HERE, f)))


if __name__ == "__main__":
    main()
