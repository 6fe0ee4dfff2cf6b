"""conv2 of the seed network (3x3/2, 64->128), forward and both gradients, with its input gradient
as the stride phases or as col2im (conv_forms.col2im_input_grad), against tf.nn.conv2d.

    python bench/col2im_layer.py [--rounds 8] [--dtype float32|bfloat16]
    ONEDNN_MAX_CPU_ISA=AVX2 python bench/col2im_layer.py

Every variant is traced once, then all are called in interleaved rounds; the best call counts (ms).
The two paths are picked by conv_forms.COL2IM_MIN_BYTES at trace time, in one process.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)
import tensorflow as tf  # noqa: E402

import conv_forms  # noqa: E402

SHAPES = [(64, 100), (128, 100), (16, 64), (128, 32)]  # (batch, input side): seed, photos, CIFAR


def step(x, w, upstream, form: str, col2im: bool):
    """A tf.function: dL/dx and dL/dw of sum(conv(x, w) * upstream) in `form`."""
    conv_forms.COL2IM_MIN_BYTES = 0 if col2im else 2**60

    @tf.function
    def run():
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            if form == "native":
                y = tf.nn.conv2d(x, w, 2, "SAME")
            else:
                y = conv_forms.conv2d(x, w, 2, 2, True, form)
            loss = tf.reduce_sum(tf.cast(y * upstream, tf.float32))
        return tape.gradient(loss, [x, w])

    run.get_concrete_function()
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args()
    print(f"machine: {utils.cpu_line()}; TensorFlow {tf.__version__}; {args.dtype}")
    forms = ("gather", "winograd_s2") if args.dtype == "float32" else ("gather",)
    rng = np.random.default_rng(0)
    for n, side in SHAPES:
        ho = -(-side // 2)
        x = tf.constant(rng.standard_normal((n, side, side, 64)), args.dtype)
        w = tf.constant(rng.standard_normal((3, 3, 64, 128)) * 0.05, args.dtype)
        upstream = tf.constant(rng.standard_normal((n, ho, ho, 128)), args.dtype)
        runs = {"native": step(x, w, upstream, "native", False)}
        for form in forms:
            runs[f"{form} phases"] = step(x, w, upstream, form, False)
            runs[f"{form} col2im"] = step(x, w, upstream, form, True)
        reference = runs["native"]()
        for name, run in runs.items():
            for got, ref in zip(run(), reference):
                got, ref = np.asarray(tf.cast(got, tf.float32)), np.asarray(tf.cast(ref, tf.float32))
                err = np.abs(got - ref).max() / np.abs(ref).max()
                assert err < (3e-2 if args.dtype == "bfloat16" else 1e-4), (name, err)
        best = {name: float("inf") for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
        print(f"batch {n}, {side} px: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in best.items()) + " ms")


if __name__ == "__main__":
    main()
