"""Max pooling whose training gradient can take a faster form than TensorFlow's CPU kernel.

    pool = pool_forms.MaxPool2D(3, 2, padding="same", name="pool1")   # a keras MaxPooling2D
    pool.form = "taps"                                                 # conv_autotune sets it

- native: tf.nn.max_pool2d and its registered gradient, MaxPoolGrad. On CPU that kernel finds
  each window's maximum again, one window at a time: in bench/profile_step.py on an AMD EPYC
  Zen 3 (batch 64) it took 389 ms of a 2848 ms training step, where the forward pool took 25.
- taps: the same forward op; the gradient as whole-tensor work compiled by XLA into a few loops:
  for each of the k*k taps in row-major order, the outputs whose first maximum it holds (equal to
  the output, and no earlier tap was), their incoming gradient moved back to that tap's input
  pixels, summed per stride phase and the phases interleaved. The first maximum in row-major order
  is the pixel MaxPoolGrad picks, so the gradients are the same, up to the order in which a pixel
  that tops several windows sums their gradients (tests/test_pool_forms.py). On the Zen 3, fwd +
  bwd at batch 128: [50,50,128] 3x3/2 346 -> 107 ms, [25,25,320] 3x3/1 634 -> 175; the seed
  network's five pool gradients 389 -> 92 ms of its batch-64 step. In bfloat16 there, native won.

The forward pass and inference are native in both forms; conv_autotune times the two per pool
shape on the machine it runs on, for pools of a MiB or more at the batch (each XLA compile takes
~0.5-1.5 s, paid by every run; for the same reason the fixed default, for tests and
--deterministic, is native).
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

import conv_forms

FORMS = ("native", "taps")


class MaxPool2D(keras.layers.MaxPooling2D):
    """keras.layers.MaxPooling2D (NHWC) whose training gradient takes `form` (None: native)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.form: str | None = None
        self.input_shape_seen: tuple[int, int, int] | None = None  # (h, w, c); conv_autotune reads it
        self._taps_grad = None

    def _see(self, shape) -> None:
        if self.input_shape_seen is None and len(shape) == 4 and all(d is not None for d in shape[1:]):
            self.input_shape_seen = tuple(int(d) for d in shape[1:])

    # Keras builds pooling layers at construction and meets symbolic inputs through their output
    # shape, so the input shape is seen in these two, not in build.
    def compute_output_shape(self, input_shape):
        self._see(tuple(input_shape))
        return super().compute_output_shape(input_shape)

    def call(self, inputs, training=False):
        self._see(tuple(inputs.shape))
        if not (training and self.form == "taps" and self.data_format == "channels_last"):
            return super().call(inputs)
        if self._taps_grad is None:  # one compiled function per layer, not per trace
            self._taps_grad = taps_gradient(self.pool_size, self.strides, self.padding.upper())
        return max_pool(inputs, self.pool_size, self.strides, self.padding.upper(), self._taps_grad)


def max_pool(x: tf.Tensor, pool_size, strides, padding: str, gradient=None) -> tf.Tensor:
    """tf.nn.max_pool2d(x [N,H,W,C]) with its gradient from `gradient` (taps_gradient's; None: native)."""
    if gradient is None:
        return tf.nn.max_pool2d(x, pool_size, strides, padding)

    @tf.custom_gradient
    def pool(x):
        y = tf.nn.max_pool2d(x, pool_size, strides, padding)
        return y, lambda dy: gradient(x, y, dy)

    return pool(x)


def taps_gradient(pool_size, strides, padding: str):
    """An XLA-compiled (x, y, dy) -> dL/dx of the max pool, the taps form (module docstring)."""
    (kh, kw), (sh, sw) = pool_size, strides

    @tf.function(jit_compile=True)
    def gradient(x, y, dy):
        return _taps_gradient(x, y, dy, kh, kw, sh, sw, padding == "SAME")

    return gradient


def _axis(size: int, k: int, s: int, same: bool) -> tuple[int, int, int]:
    """(outputs, pad before, phase length) along one axis; the phase length q covers every tap
    (output o's tap i is pixel o*s + i of the padded input, in phase i % s at o + i // s)."""
    out = -(-size // s) if same else (size - k) // s + 1
    before = max((out - 1) * s + k - size, 0) // 2 if same else 0
    return out, before, out + (k - 1) // s


def _taps_gradient(x, y, dy, kh, kw, sh, sw, same):
    _, h, w, _ = x.shape
    ho, pt, hq = _axis(h, kh, sh, same)
    wo, pl, wq = _axis(w, kw, sw, same)
    # The input on the phase grid (hq*sh x wq*sw): -inf padding never equals a window's maximum.
    # The grid can also end before a VALID input does: those pixels are in no window.
    xp = tf.pad(x, [[0, 0], [pt, max(hq * sh - h - pt, 0)], [pl, max(wq * sw - w - pl, 0)], [0, 0]],
                constant_values=-np.inf)[:, :hq * sh, :wq * sw]
    taken = None

    def moved(i, j):  # overlap_add asks for the taps in row-major order
        nonlocal taken
        hit = tf.equal(xp[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw], y)
        if taken is None:
            taken = hit
        else:  # MaxPoolGrad's pixel: the first maximum in row-major order
            hit = tf.logical_and(hit, tf.logical_not(taken))
            taken = tf.logical_or(taken, hit)
        return tf.where(hit, dy, tf.zeros_like(dy))

    return conv_forms.overlap_add(moved, kh, kw, sh, sw, ho, wo, h, w, pt, pl)
