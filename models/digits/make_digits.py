#!/usr/bin/env python3
"""The digits task: a small MLP pre-trained on scikit-learn's digits, and a
shifted "user" distribution to adapt it to. numpy + onnx only.

Data: `sklearn/datasets/data/digits.csv.gz` read straight out of the
scikit-learn wheel (BSD-3-Clause; UCI optdigits: 1,797 8×8 images, 0–16), which
this script downloads with `pip download scikit-learn==1.9.1 --no-deps` unless
`--wheel PATH` is given. Nothing is installed.

- base: 60 % of the images (seeded split); the model is trained on 80 % of it.
- user: the other 40 %, as a different writer would produce them — slanted
  (shear 0.45), thicker strokes (3×3 max-filter blend) and fainter (×0.75).
  200 user images are for adaptation, the rest for testing.

Model (`digits_mlp.onnx`, opset 13): x [N, 64] (pixels / 16) → Gemm `fc1`
64→64 → Relu → Gemm `fc2` 64→64 → Relu (`features`) → Gemm `head` 64→10
(`logits`). Trained with Adam for 60 epochs.

Outputs (uncompressed .npz, keys `x` float32 [N, 64] and `label` int64 [N]):
digits_base_test.npz, digits_user_train.npz, digits_user_test.npz.

    python3 models/digits/make_digits.py [--wheel PATH]
"""
import argparse
import gzip
import io
import os
import subprocess
import tempfile
import zipfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
SKLEARN = "scikit-learn==1.9.1"


def load_digits(wheel):
    if wheel is None:
        tmp = tempfile.mkdtemp()
        subprocess.run(["python3", "-m", "pip", "download", "-q", SKLEARN, "--no-deps", "-d", tmp], check=True)
        wheel = os.path.join(tmp, [f for f in os.listdir(tmp) if f.endswith(".whl")][0])
    with zipfile.ZipFile(wheel) as z:
        raw = gzip.decompress(z.read("sklearn/datasets/data/digits.csv.gz")).decode()
    arr = np.loadtxt(io.StringIO(raw), delimiter=",")
    return arr[:, :64].astype(np.float32) / 16.0, arr[:, 64].astype(np.int64)


def user_style(x):
    """Slant, thicken and fade 8×8 digits (bilinear shear, max-filter blend)."""
    imgs = x.reshape(-1, 8, 8)
    out = np.zeros_like(imgs)
    ys, xs = np.mgrid[0:8, 0:8].astype(np.float32)
    src_x = xs + 0.45 * (ys - 3.5)
    x0 = np.floor(src_x).astype(int)
    fx = src_x - x0
    for k, im in enumerate(imgs):
        pad = np.pad(im, ((0, 0), (1, 2)))
        a = pad[ys.astype(int), np.clip(x0 + 1, 0, 10)]
        b = pad[ys.astype(int), np.clip(x0 + 2, 0, 10)]
        out[k] = (1 - fx) * a + fx * b
    padded = np.pad(out, ((0, 0), (1, 1), (1, 1)))
    mx = np.max([padded[:, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)], axis=0)
    return (0.75 * (0.5 * out + 0.5 * mx)).reshape(-1, 64).astype(np.float32)


def train_mlp(x, y, rng, epochs=60):
    sizes = [(64, 64), (64, 64), (64, 10)]
    params = []
    for i, o in sizes:
        params += [rng.uniform(-1, 1, (o, i)).astype(np.float32) / np.sqrt(i), np.zeros(o, np.float32)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    t = 0
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for s in range(0, len(x), 32):
            idx = order[s:s + 32]
            h0 = x[idx]
            z1 = h0 @ params[0].T + params[1]
            h1 = np.maximum(z1, 0)
            z2 = h1 @ params[2].T + params[3]
            h2 = np.maximum(z2, 0)
            z3 = h2 @ params[4].T + params[5]
            p = np.exp(z3 - z3.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(idx)), y[idx]] -= 1
            d3 = p / len(idx)
            d2 = (d3 @ params[4]) * (z2 > 0)
            d1 = (d2 @ params[2]) * (z1 > 0)
            grads = [d1.T @ h0, d1.sum(0), d2.T @ h1, d2.sum(0), d3.T @ h2, d3.sum(0)]
            t += 1
            for j, g in enumerate(grads):
                m[j] = 0.9 * m[j] + 0.1 * g
                v[j] = 0.999 * v[j] + 0.001 * g * g
                params[j] -= 3e-3 * (m[j] / (1 - 0.9 ** t)) / (np.sqrt(v[j] / (1 - 0.999 ** t)) + 1e-8)
    return params


def predict(params, x):
    h = np.maximum(x @ params[0].T + params[1], 0)
    h = np.maximum(h @ params[2].T + params[3], 0)
    return (h @ params[4].T + params[5]).argmax(1)


def to_onnx(params):
    names = ["fc1", "fc2", "head"]
    inits, nodes, cur = [], [], "x"
    for k, name in enumerate(names):
        w, b = params[2 * k].astype(np.float32), params[2 * k + 1].astype(np.float32)
        inits += [numpy_helper.from_array(w, f"{name}.weight"), numpy_helper.from_array(b, f"{name}.bias")]
        out = "logits" if name == "head" else f"{name}_out"
        nodes.append(helper.make_node("Gemm", [cur, f"{name}.weight", f"{name}.bias"], [out], name=name, transB=1))
        cur = out
        if name != "head":
            relu = "features" if name == "fc2" else f"relu{k + 1}_out"
            nodes.append(helper.make_node("Relu", [cur], [relu], name=f"relu{k + 1}"))
            cur = relu
    g = helper.make_graph(nodes, "digits_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="hydra-edge make_digits.py")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel")
    args = ap.parse_args()
    x, y = load_digits(args.wheel)
    rng = np.random.default_rng(2023)
    order = rng.permutation(len(x))
    n_base = int(0.6 * len(x))
    base, user = order[:n_base], order[n_base:]
    n_fit = int(0.8 * len(base))
    params = train_mlp(x[base[:n_fit]], y[base[:n_fit]], rng)
    xu = user_style(x[user])
    acc = lambda xx, yy: float((predict(params, xx) == yy).mean())
    print("base test accuracy %.3f | user (shifted) accuracy %.3f | user, unshifted %.3f" % (
        acc(x[base[n_fit:]], y[base[n_fit:]]), acc(xu, y[user]), acc(x[user], y[user])))
    onnx.save(to_onnx(params), os.path.join(HERE, "digits_mlp.onnx"))
    save = lambda name, xx, yy: np.savez(os.path.join(HERE, name), x=xx.astype(np.float32), label=yy.astype(np.int64))
    save("digits_base_test.npz", x[base[n_fit:]], y[base[n_fit:]])
    save("digits_user_train.npz", xu[:200], y[user[:200]])
    save("digits_user_test.npz", xu[200:], y[user[200:]])
    for f in sorted(os.listdir(HERE)):
        print(f, os.path.getsize(os.path.join(HERE, f)))


if __name__ == "__main__":
    main()
