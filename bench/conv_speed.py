"""Every form of our convolution against tf.nn.conv2d, one layer shape at a time (what the autotune
in conv_autotune.py chooses from).

    python bench/conv_speed.py [--batch 128] [--reps 4] [--dtype float32|bfloat16] [--layers seed|zoo|all] [--gemm]

For each layer shape of the seed network (and with --layers zoo|all, of the zoo's models), prints
ms per call of native and of every applicable im2col form: training (forward, then + filter
gradient, then + input gradient, each cumulative) and inference (forward + bias + ReLU), the best
of --reps calls, the forms interleaved. The first conv of a network never needs its input
gradient; its row shows it anyway.

--gemm adds, per layer, how close to this machine's limit each side runs: the GFLOP/s of native's
forward, and of the gather form's matmul alone ([batch*Ho*Wo, k*k*Cin] x [k*k*Cin, Cout], the
patch matrix given, no gather), against a 2048^3 matmul's (the roof). Under ONEDNN_MAX_CPU_ISA=AVX2
on an AMD Zen 4 the narrow matmul of a 128-channel layer ran at ~70% of the roof while oneDNN's
direct convolution of the same layer ran at it: a floor no gather form can go under.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import utils  # noqa: E402  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)

import tensorflow as tf  # noqa: E402

import conv_forms  # noqa: E402

# (name, (h, w, cin), cout, kernel, stride)
SEED = [
    ("stem 3x3", (100, 100, 3), 64, 3, 1),
    ("conv2 3x3/2", (100, 100, 64), 128, 3, 2),
    ("inc2 1x1", (25, 25, 128), 64, 1, 1),
    ("inc2 3x3 96", (25, 25, 64), 96, 3, 1),
    ("inc2 3x3 64", (25, 25, 64), 64, 3, 1),
    ("inc3 1x1 96", (13, 13, 320), 96, 1, 1),
    ("inc3 3x3 96", (13, 13, 96), 96, 3, 1),
    ("inc3 3x3 64", (13, 13, 96), 64, 3, 1),
]
ZOO = [
    ("cifar10 5x5 24px", (24, 24, 3), 64, 5, 1),
    ("cifar10 5x5 12px", (12, 12, 64), 64, 5, 1),
    ("resnet 7x7/2 stem", (64, 64, 3), 64, 7, 2),
    ("resnet 3x3 16px", (16, 16, 64), 64, 3, 1),
    ("resnet 3x3/2 16px", (16, 16, 64), 128, 3, 2),
    ("resnet 1x1/2 16px", (16, 16, 64), 128, 1, 2),
    ("resnet 3x3 4px 512", (4, 4, 512), 512, 3, 1),
    ("vgg 3x3 32px", (32, 32, 64), 128, 3, 1),
    ("vgg 3x3 8px 512", (8, 8, 512), 512, 3, 1),
]


def best_ms(f, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def calls(form: str, shape, cout: int, k: int, s: int, batch: int, dtype) -> dict:
    """{"fwd", "dw", "dx", "infer"}: each a function running one traced call."""
    x = tf.cast(tf.random.normal((batch,) + shape), dtype)
    w = tf.cast(tf.random.normal((k, k, shape[-1], cout), stddev=0.05), dtype)
    bias = tf.zeros([cout], dtype)

    def conv(x, w):
        if form == "native":
            return tf.nn.conv2d(x, w, s, "SAME")
        return conv_forms.conv2d(x, w, s, s, True, form)

    # Each returns a slice of its outputs, so no part is pruned; the upstream gradient is y itself.
    def train(wrt):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = conv(x, w)
        grads = tape.gradient(y, wrt(x, w), output_gradients=y) if wrt(x, w) else []
        return [tf.reduce_sum(y[:1])] + [tf.reduce_sum(g[:1]) for g in grads]

    def infer():
        if form == "native":
            y = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, w, s, "SAME"), bias))
        else:
            y = conv_forms.conv2d_bias_act(x, w, bias, s, s, True, form, True)
        return tf.reduce_sum(y[:1])

    fns = {"fwd": lambda: train(lambda x, w: []), "dw": lambda: train(lambda x, w: [w]),
           "dx": lambda: train(lambda x, w: [x, w]), "infer": infer}
    out = {}
    for name, fn in fns.items():
        traced = tf.function(fn, autograph=False)
        out[name] = lambda traced=traced: tf.nest.map_structure(lambda t: t.numpy(), traced())
        out[name]()  # trace and warm up
    return out


def gemm_gflops(m: int, k: int, n: int, dtype, reps: int) -> tuple[float, float]:
    """(ms, GFLOP/s) of one [m, k] x [k, n] matmul."""
    a, b = tf.cast(tf.random.normal([m, k]), dtype), tf.cast(tf.random.normal([k, n]), dtype)
    traced = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)[:1]), autograph=False)
    traced()
    ms = best_ms(lambda: traced().numpy(), reps)
    return ms, 2 * m * k * n / ms / 1e6


def gemm_cells(shape, cout: int, k: int, s: int, batch: int, dtype, native_fwd_ms: float, reps: int) -> str:
    """One layer's line: native's forward and the gather form's matmul alone, in GFLOP/s."""
    h, w, cin = shape
    m = batch * conv_forms.axis_plan(h, k, s, True)[0] * conv_forms.axis_plan(w, k, s, True)[0]
    flops = 2 * m * k * k * cin * cout
    ms, rate = gemm_gflops(m, k * k * cin, cout, dtype, reps)
    return f"GFLOP/s: native fwd {flops / native_fwd_ms / 1e6:.0f}, gather's matmul alone {rate:.0f} ({ms:.1f} ms)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--layers", default="seed", choices=["seed", "zoo", "all"])
    p.add_argument("--gemm", action="store_true", help="print each side's GFLOP/s against the matmul roof")
    args = p.parse_args()
    dtype = tf.as_dtype(args.dtype)
    rows = {"seed": SEED, "zoo": ZOO, "all": SEED + ZOO}[args.layers]
    print(f"machine: CPU: {utils.cpu_line()}")
    print(f"TensorFlow {tf.__version__}, {args.dtype}, batch {args.batch}, best of {args.reps}; ms per call: "
          "train = fwd / +dW / +dX (cumulative), infer = fwd + bias + ReLU")
    if args.gemm:
        ms, rate = gemm_gflops(2048, 2048, 2048, dtype, args.reps)
        print(f"roof: a 2048^3 matmul, {ms:.1f} ms, {rate:.0f} GFLOP/s")
    for name, shape, cout, k, s in rows:
        spec = conv_forms.ConvSpec(*shape, cout, k, k, s, s, True, args.dtype)
        forms = ("native",) + conv_forms.applicable_forms(spec)
        runs = {form: calls(form, shape, cout, k, s, args.batch, dtype) for form in forms}
        ms = {form: {part: float("inf") for part in fns} for form, fns in runs.items()}
        for _ in range(args.reps):  # interleaved, so a busy machine slows all alike
            for form, fns in runs.items():
                for part, fn in fns.items():
                    ms[form][part] = min(ms[form][part], best_ms(fn, 1))
        cells = [f"{form} {m['fwd']:.1f}/{m['dw']:.1f}/{m['dx']:.1f} infer {m['infer']:.1f}" for form, m in ms.items()]
        print(f"{name:<20} {str(shape):<16} {cout:>4}  " + " | ".join(cells), flush=True)
        if args.gemm:
            print(f"{'':<20} {gemm_cells(shape, cout, k, s, args.batch, dtype, ms['native']['fwd'], args.reps)}",
                  flush=True)


if __name__ == "__main__":
    main()
