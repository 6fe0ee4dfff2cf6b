"""Trial, not built: conv2's input gradient as one wide matmul and an overlap-add (col2im).

    python bench/trials/col2im_input_grad.py [--batch 128] [--stem]

The gather form's input gradient (conv_forms.gather_input_grad) runs one matmul per stride phase
on gathered dy. For the seed network's conv2 (3x3/2, 64->128 on 100x100) those matmuls have
N = 64 output columns, a narrow shape oneDNN runs below its roof (far below under
ONEDNN_MAX_CPU_ISA=AVX2), and the gathers and the stitch add more. A col2im form instead does
one [M, 128] x [128, 9*64] matmul (N = 576, at the roof with or without the cap), then adds each
tap's product into its input pixel. This times that form with the overlap-add three ways against
the gather form and oneDNN's own Conv2DBackpropInput, each checked against the latter. The
overlap-add is what lost: TensorFlow has no cheap op for it (see bench/README.md). Compiled by XLA
it is cheap, and that is what conv_forms.col2im_input_grad does now (bench/col2im_layer.py times it).

--stem times instead the stem's filter gradient (3x3, 3->64 on 100x100): oneDNN's, the gather
form's, and the matmul over the stem's patch matrix alone in three shapes (K = 27 is a long, thin
reduction that runs far below the roof).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import utils  # noqa: E402  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)

import tensorflow as tf  # noqa: E402

import conv_forms  # noqa: E402

H, HO, CIN, COUT = 100, 50, 64, 128
_, PAD_TOP, PAD_BOTTOM = conv_forms.axis_plan(H, 3, 2, True)
LH = H + PAD_TOP + PAD_BOTTOM  # the padded side (101): taps on its last row and column hit padding


def _tap_rows(w: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    """[batch * HO * HO * 9, CIN]: every tap's product, one wide matmul."""
    wt = tf.reshape(tf.transpose(w, [3, 0, 1, 2]), [COUT, 9 * CIN])
    return tf.reshape(tf.matmul(tf.reshape(dy, [-1, COUT]), wt), [-1, CIN])


def forms(n: int) -> tuple[dict, tuple]:
    """conv2's input-gradient forms at batch n, oneDNN's first (the reference the others are
    checked against), and their arguments (dy, w)."""
    rng = np.random.default_rng(0)
    w = tf.constant(rng.standard_normal((3, 3, CIN, COUT)).astype(np.float32) * 0.05)
    dy = tf.constant(rng.standard_normal((n, HO, HO, COUT)).astype(np.float32))
    # Each tap's padded-input pixel, rows in _tap_rows' (oh, ow, i, j) order: the forward's index.
    oh, ow, i, j = np.meshgrid(*map(np.arange, (HO, HO, 3, 3)), indexing="ij")
    pixel = ((oh * 2 + i) * LH + ow * 2 + j).reshape(-1)
    seg = tf.constant((pixel[None] + np.arange(n)[:, None] * (LH * LH)).reshape(-1), tf.int32)

    def crop(flat):
        return tf.reshape(flat, [n, LH, LH, CIN])[:, PAD_TOP:PAD_TOP + H, PAD_TOP:PAD_TOP + H]

    def segment_sum(dy, w):
        return crop(tf.math.unsorted_segment_sum(_tap_rows(w, dy), seg, n * LH * LH))

    def scatter(dy, w):
        return crop(tf.scatter_nd(seg[:, None], _tap_rows(w, dy), [n * LH * LH, CIN]))

    def shifted_phases(dy, w):
        # The four stride phases from matmuls grouped by the shift their taps need, then one
        # depth_to_space: no scatter, but each shift, slice and add is a pass over memory.
        dy2 = tf.reshape(dy, [-1, COUT])

        def mm(taps):
            wt = tf.concat([tf.transpose(w[a, b]) for a, b in taps], 1)
            return tf.reshape(tf.matmul(dy2, wt), [-1, HO, HO, len(taps) * CIN])

        def shift(t, dh, dw):
            return tf.pad(t[:, :HO - dh, :HO - dw], [[0, 0], [dh, 0], [dw, 0], [0, 0]])

        core = mm([(0, 0), (0, 1), (1, 0), (1, 1)])
        xw, xh, xhw = shift(mm([(0, 2), (1, 2)]), 0, 1), shift(mm([(2, 0), (2, 1)]), 1, 0), shift(mm([(2, 2)]), 1, 1)
        s00 = xw[..., :CIN] + xh[..., :CIN] + xhw
        corr = tf.concat([s00, xh[..., CIN:], xw[..., CIN:], tf.zeros_like(s00)], -1)
        return tf.nn.depth_to_space(core + corr, 2)

    def native(dy, w):
        return tf.raw_ops.Conv2DBackpropInput(input_sizes=[n, H, H, CIN], filter=w, out_backprop=dy,
                                              strides=[1, 2, 2, 1], padding="SAME")

    def gather(dy, w):
        return conv_forms.gather_input_grad(dy, w, H, H, 2, 2, PAD_TOP, PAD_TOP)

    fs = {name: tf.function(f) for name, f in [("native", native), ("gather (today)", gather),
          ("col2im, unsorted_segment_sum", segment_sum), ("col2im, scatter_nd", scatter),
          ("col2im, shifted phases", shifted_phases)]}
    return fs, (dy, w)


def stem_forms(n: int) -> tuple[dict, tuple]:
    """The stem's filter gradient: (forms, their arguments (x, dy, patch matrix))."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((n, H, H, 3)).astype(np.float32))
    w = tf.constant(rng.standard_normal((3, 3, 3, 64)).astype(np.float32))
    dy = tf.constant(rng.standard_normal((n, H, H, 64)).astype(np.float32))
    cols = tf.reshape(tf.image.extract_patches(x, [1, 3, 3, 1], [1, 1, 1, 1], [1, 1, 1, 1], "SAME"), [-1, 27])

    def native(x, dy, cols):
        return tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=[3, 3, 3, 64], out_backprop=dy,
                                               strides=[1, 1, 1, 1], padding="SAME")

    def gather(x, dy, cols):
        with tf.GradientTape() as tape:
            tape.watch(w)
            y = conv_forms.conv2d(x, w, 1, 1, True, "gather")
        return tf.reshape(tape.gradient(y, w, output_gradients=dy), [3, 3, 3, 64])

    def cols_t_dy(x, dy, cols):
        return tf.reshape(tf.matmul(cols, tf.reshape(dy, [-1, 64]), transpose_a=True), [3, 3, 3, 64])

    def per_image(x, dy, cols):
        prod = tf.matmul(tf.reshape(cols, [n, -1, 27]), tf.reshape(dy, [n, -1, 64]), transpose_a=True)
        return tf.reshape(tf.reduce_sum(prod, 0), [3, 3, 3, 64])

    def dy_t_cols(x, dy, cols):
        return tf.reshape(tf.transpose(tf.matmul(tf.reshape(dy, [-1, 64]), cols, transpose_a=True)), [3, 3, 3, 64])

    fs = {name: tf.function(f) for name, f in [("native", native), ("gather (today)", gather),
          ("cols^T dy alone", cols_t_dy), ("per image, summed, alone", per_image), ("dy^T cols alone", dy_t_cols)]}
    return fs, (x, dy, cols)


def _time(label: str, fs: dict, inputs: tuple, rounds: int, tolerance: float) -> None:
    """Checks every form against the first, then times them interleaved, best and median ms."""
    ref = next(iter(fs.values()))(*inputs)
    scale = float(tf.reduce_max(tf.abs(ref)))
    for name, f in fs.items():
        err = float(tf.reduce_max(tf.abs(f(*inputs) - ref)))
        assert err <= tolerance * scale, f"{name}: max error {err} of {scale}"
    times = {name: [] for name in fs}
    for _ in range(rounds):  # interleaved, so a busy machine slows all alike
        for name, f in fs.items():
            start = time.perf_counter()
            f(*inputs).shape
            times[name].append((time.perf_counter() - start) * 1e3)
    for name, t in times.items():
        print(f"{label}: {name:30s} ms min {min(t):4.0f} median {sorted(t)[len(t) // 2]:4.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stem", action="store_true", help="the stem's filter gradient instead")
    args = parser.parse_args()
    print(f"machine: CPU: {utils.cpu_line()}")
    fs, inputs = (stem_forms if args.stem else forms)(args.batch)
    label = "stem filter gradient" if args.stem else "conv2 input gradient"
    _time(f"{label}, batch {args.batch}", fs, inputs, args.rounds, 1e-4)


if __name__ == "__main__":
    main()
