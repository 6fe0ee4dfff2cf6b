"""Forward+backward time of our im2col convolution vs tf.nn.conv2d on the real network's shapes.

Usage: python bench/conv_speed.py [--reps 5] [--dtype float32|bfloat16]
Prints ms per training call for each implementation and the ratio native/im2col (1.0 = as fast).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import utils  # noqa: E402

import tensorflow as tf  # noqa: E402

from layers import conv2d_func  # noqa: E402

# (name, input shape, Cout, kernel, stride, needs dx); the first conv sees the images, so a
# training step never asks for its input gradient.
SHAPES = [
    ("stem 3x3 s1", (32, 100, 100, 3), 64, 3, 1, False),
    ("3x3 s2", (32, 100, 100, 64), 128, 3, 2, True),
    ("3x3 s1", (32, 25, 25, 64), 96, 3, 1, True),
    ("1x1 s1", (32, 25, 25, 128), 64, 1, 1, True),
]


def make_step(impl: str, shape, cout: int, k: int, s: int, needs_dx: bool, dtype):
    x = tf.cast(tf.random.normal(shape), dtype)
    w = tf.Variable(tf.random.normal((k, k, shape[-1], cout), stddev=0.05))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = conv2d_func(x, w, s, "SAME", impl=impl)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
        grads = tape.gradient(loss, [x, w] if needs_dx else [w])
        return [tf.reduce_sum(tf.cast(g, tf.float32)) for g in grads]

    def run() -> float:
        start = time.perf_counter()
        [g.numpy() for g in step(x)]
        return time.perf_counter() - start

    run()  # trace + warm up
    return run


def time_pair(shape, cout: int, k: int, s: int, needs_dx: bool, dtype, reps: int) -> dict[str, float]:
    """Best ms per call of each impl; runs alternate so a busy machine slows both alike."""
    runs = {impl: make_step(impl, shape, cout, k, s, needs_dx, dtype) for impl in ("native", "im2col")}
    best = {impl: float("inf") for impl in runs}
    for _ in range(reps):
        for impl, run in runs.items():
            best[impl] = min(best[impl], run() * 1000)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = tf.as_dtype(args.dtype)
    print(f"CPU: {utils.cpu_line()}")
    print(f"TensorFlow {tf.__version__}, dtype {args.dtype}, best of {args.reps}")
    print(f"{'layer':<12} {'input':<20} {'Cout':>4} {'native ms':>10} {'im2col ms':>10} {'native/im2col':>14}")
    total = {"native": 0.0, "im2col": 0.0}
    for name, shape, cout, k, s, needs_dx in SHAPES:
        ms = time_pair(shape, cout, k, s, needs_dx, dtype, args.reps)
        for impl in total:
            total[impl] += ms[impl]
        print(
            f"{name:<12} {str(list(shape)):<20} {cout:>4} {ms['native']:>10.1f} {ms['im2col']:>10.1f}"
            f" {ms['native'] / ms['im2col']:>14.2f}"
        )
    print(f"{'all':<12} {'':<20} {'':>4} {total['native']:>10.1f} {total['im2col']:>10.1f}"
          f" {total['native'] / total['im2col']:>14.2f}")


if __name__ == "__main__":
    main()
