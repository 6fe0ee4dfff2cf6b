"""Training batch norm + ReLU (forward and backward) in each form, and as Keras' own layer.

    python bench/batch_norm.py [--shapes 128x32x32x64,128x16x16x128] [--dtype float32]

Times, best of conv_autotune.TIMED_CALLS after a warm-up, what the start-up autotune times
(conv_autotune.time_bn_forms: the fused and split forms of bn_forms.py), plus Keras 3's
BatchNormalization called directly (plain ops, upcast), on this machine. Run it again under
ONEDNN_MAX_CPU_ISA=AVX2 to see the forms trade places.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402  (quiets TensorFlow's start-up logging)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="128x32x32x64,128x16x16x128,16x64x64x64")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args()
    import keras
    import tensorflow as tf

    import conv_autotune
    print(f"machine: CPU: {utils.cpu_line()}; TensorFlow {tf.__version__}", flush=True)
    for text in args.shapes.split(","):
        shape = tuple(int(n) for n in text.split("x"))
        forms = conv_autotune.time_bn_forms(shape, args.dtype)["ms"]
        x = tf.cast(tf.random.stateless_normal(shape, [0, 3]), args.dtype)
        bn = keras.layers.BatchNormalization(epsilon=1e-3, dtype="float32" if args.dtype == "float32"
                                             else "mixed_bfloat16")
        bn.build(shape)

        @tf.function
        def keras_step():
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = tf.nn.relu(bn(x, training=True))
            grads = tape.gradient(y, [x, bn.gamma, bn.beta], output_gradients=y)
            return [tf.reduce_sum(y[:1])] + [tf.reduce_sum(g[:1]) for g in grads]

        keras_ms = conv_autotune._fastest({"keras": lambda: [t.numpy() for t in keras_step()]}, "keras")["ms"]
        row = {**forms, **keras_ms}
        print(f"{text} {args.dtype}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in row.items())
              + f"; fastest {min(row, key=row.get)}", flush=True)


if __name__ == "__main__":
    main()
