"""Training-mode batch norm with a Keras BatchNormalization's own variables, in one of two forms.

    y = batch_norm(bn, x, training, form="fused")      # form: "fused" or "split"

- fused: one FusedBatchNormV3 kernel forward and one FusedBatchNormGradV3 backward (oneDNN's on
  CPU). Keras 3's BatchNormalization upcasts, computes moments and normalizes with separate ops,
  forward and backward: 24-37% of a training step in bench/profile_step.py; the fused kernels take
  bf16 input with fp32 statistics directly.
- split: the forward from plain ops (moments, one multiply-add), the backward still the fused
  gradient kernel. Under ONEDNN_MAX_CPU_ISA=AVX2 on an Intel Xeon, oneDNN's fused *forward* with
  statistics was 2-2.5x slower than plain ops while its backward stayed fast, so split took
  50.5 ms against fused 77.7 (forward + backward + ReLU, [128, 32, 32, 64]); without the cap fused
  took 36.8 ms, split 50.5. Which is faster depends on the machine: conv_autotune times both.

Both give the same outputs, gradients and moving statistics as Keras BN (tests/test_layers.py).
Synchronized BN keeps the Keras path (its moments are all-reduced across replicas), and so does
fp16, whose fused backward pass overflows under loss scaling where Keras' fp32 upcast does not.
"""
from __future__ import annotations

import keras
import tensorflow as tf

FORMS = ("fused", "split")


def batch_norm(bn: keras.layers.BatchNormalization, x: tf.Tensor, training, form: str | None = None) -> tf.Tensor:
    """`bn(x, training)`, in `form` (None: fused) when training, with the fused kernel in inference."""
    if form not in (None, *FORMS):
        raise ValueError(f"batch norm form must be one of {FORMS}, got {form!r}")
    if bn.synchronized or len(x.shape) != 4 or x.dtype == tf.float16:
        return bn(x, training=training)
    with tf.name_scope("bn"):  # bench/profile_step.py files the ops under batch norm by this scope
        return _batch_norm(bn, x, training, form)


def _batch_norm(bn, x, training, form):
    gamma, beta = bn.gamma.value, bn.beta.value
    if training and bn.trainable:
        if form == "split":
            y, mean, variance = _split_batch_norm(x, gamma, beta, bn.epsilon)
        else:
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, epsilon=bn.epsilon,
                                                                 is_training=True)
            # The kernel's variance is Bessel-corrected; Keras tracks the biased one.
            n = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
            variance = variance * (n - 1.0) / n
        m = bn.momentum
        bn.moving_mean.assign(bn.moving_mean.value * m + mean * (1.0 - m))
        bn.moving_variance.assign(bn.moving_variance.value * m + variance * (1.0 - m))
        return y
    y, _, _ = tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, mean=bn.moving_mean.value,
                                               variance=bn.moving_variance.value, epsilon=bn.epsilon,
                                               is_training=False)
    return y


def _split_batch_norm(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, epsilon: float):
    """(y, batch mean, biased batch variance); the statistics carry no gradient of their own, as in
    the fused form (the moving averages are not differentiated)."""

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        mean, variance = _moments(tf.cast(x, tf.float32))
        scale = gamma * tf.math.rsqrt(variance + epsilon)
        y = x * tf.cast(scale, x.dtype) + tf.cast(beta - mean * scale, x.dtype)

        def grad(dy, *_):  # the statistics' gradients are zero (stop_gradient)
            # The CPU kernels (oneDNN's and Eigen's) read the saved batch mean and variance from
            # the reserve spaces; cuDNN reads an inverse variance there, so conv_autotune offers
            # this form only where no GPU is visible.
            dx, dgamma, dbeta, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy, x=x, scale=gamma, reserve_space_1=mean, reserve_space_2=variance,
                reserve_space_3=tf.zeros([0]), epsilon=epsilon, data_format="NHWC", is_training=True)
            return dx, dgamma, dbeta

        return (y, tf.stop_gradient(mean), tf.stop_gradient(variance)), grad

    return normalize(x, gamma, beta)


def _moments(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-channel mean and biased variance of x [N, H, W, C] (two passes, as tf.nn.moments).

    Each sum runs over x seen as [N, H*W*C] (a wide, vectorized reduction over the batch), then
    over the H*W rows of C that leaves: TensorFlow's reduction over axes [0, 1, 2] of the same
    tensor took 17 ms against 7 for [64, 100, 100, 64], and the split form's moments 64 against 39
    (AVX-512 Xeon without AMX, with and without ONEDNN_MAX_CPU_ISA=AVX2). The shorter sums are also
    closer to float64's: the variance's relative error 1e-6 against 4e-5 there, 4e-7 against 4e-6 at
    [128, 32, 32, 64]."""
    _, h, w, c = x.shape
    if None in (h, w, c):
        return tf.nn.moments(x, [0, 1, 2])
    count = tf.cast(tf.shape(x)[0] * (h * w), tf.float32)

    def mean_of(t):
        per_position = tf.reduce_sum(tf.reshape(t, [-1, h * w * c]), 0)
        return tf.reduce_sum(tf.reshape(per_position, [h * w, c]), 0) / count

    mean = mean_of(x)
    return mean, mean_of(tf.math.squared_difference(x, tf.stop_gradient(mean)))
