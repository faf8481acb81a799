"""The corpus's TensorFlow export: a small MobileNet-style Keras CNN converted by tf2onnx.

What a TensorFlow user brings: an NHWC input ([N, 32, 32, 3]) that tf2onnx
wraps in a Transpose to NCHW, BatchNormalization folded into the convs
(`*_fused_bn` initializers), ReLU6 as `Clip`, a depthwise conv (`group` = C),
`GlobalAveragePool` then `Squeeze`, Dense layers as `MatMul` + `Add` on
`ReadVariableOp` initializers, and TF-style tensor names (`tfcnn/fc1/MatMul:0`).
Seeded random weights, biases and BN statistics (no pretrained Keras weights
ship on PyPI). Run by setup.sh in its own venv (tensorflow-cpu + tf2onnx).
Usage: build_tf.py OUT_DIR
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    tf.keras.utils.set_random_seed(7)
    L = tf.keras.layers
    inp = tf.keras.Input((32, 32, 3), name="image")
    x = L.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="stem")(inp)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_relu6")(x)
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = L.BatchNormalization(name="dw_bn")(x)
    x = L.ReLU(6.0)(x)
    x = L.Conv2D(32, 1, use_bias=False, name="pw")(x)
    x = L.BatchNormalization(name="pw_bn")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(64, activation="relu", name="fc1")(x)
    x = L.Dense(10, name="logits")(x)
    m = tf.keras.Model(inp, x, name="tfcnn")
    rng = np.random.default_rng(7)
    for layer in m.layers:
        if isinstance(layer, L.BatchNormalization):
            g, b, mu, var = layer.get_weights()
            layer.set_weights([1 + 0.1 * rng.standard_normal(g.shape), 0.1 * rng.standard_normal(b.shape),
                               0.1 * rng.standard_normal(mu.shape), 1 + 0.2 * rng.random(var.shape)])
        if isinstance(layer, L.Dense):
            w, b = layer.get_weights()
            layer.set_weights([w, 0.1 * rng.standard_normal(b.shape)])
    spec = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name="image"),)
    tf2onnx.convert.from_keras(m, input_signature=spec, opset=17,
                               output_path=os.path.join(out, "cnn_tf2onnx.onnx"))
    with open(os.path.join(out, "VERSIONS_TF"), "w") as f:
        f.write(f"tensorflow-cpu {tf.__version__}\ntf2onnx {tf2onnx.__version__}\n")
    print("tf2onnx CNN written to", out)


if __name__ == "__main__":
    main()
