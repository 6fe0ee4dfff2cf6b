"""pool_forms: the taps form of the max pool's gradient against TensorFlow's MaxPoolGrad."""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pool_forms  # noqa: E402
from helpers import bf16_kernels_missing  # noqa: E402


def pooled_with_gradients(x, size, strides, padding, gradient, dy_seed=1):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = pool_forms.max_pool(x, size, strides, padding, gradient)
    # Small integers: sums of them are exact in any order, so the gradients can be compared bit for bit.
    dy = tf.cast(np.random.default_rng(dy_seed).integers(-8, 9, size=y.shape), x.dtype)
    return y, tape.gradient(y, x, output_gradients=dy)


@pytest.mark.parametrize("shape, size, strides, padding", [
    ((2, 7, 9, 3), (3, 3), (2, 2), "SAME"),     # the seed network's pools, odd sizes
    ((2, 7, 9, 3), (3, 3), (2, 2), "VALID"),    # the last row and column in no window
    ((3, 6, 7, 5), (3, 3), (1, 1), "SAME"),     # the inception module's pool tower
    ((2, 8, 8, 4), (2, 2), (2, 2), "SAME"),     # the zoo's VGG pools
    ((2, 5, 5, 2), (2, 2), (2, 2), "VALID"),
    ((1, 10, 11, 2), (3, 2), (2, 3), "SAME"),   # non-square windows and strides
    ((1, 10, 11, 2), (3, 2), (2, 3), "VALID"),
    ((2, 9, 9, 3), (3, 3), (3, 3), "SAME"),     # windows that do not overlap
    ((2, 4, 4, 3), (1, 1), (1, 1), "VALID"),
])
def test_taps_gradient_is_max_pool_gradient_ties_included(shape, size, strides, padding):
    # Rounded to 0.25, then ReLU: windows with equal maxima, and all-zero windows. MaxPoolGrad gives
    # each window's gradient to its first maximum in row-major order; so must the taps form.
    values = np.random.default_rng(0).normal(size=shape)
    x = tf.nn.relu(tf.constant(np.round(values * 4) / 4, tf.float32))
    want_y, want_dx = pooled_with_gradients(x, size, strides, padding, None)
    got_y, got_dx = pooled_with_gradients(x, size, strides, padding, pool_forms.taps_gradient(size, strides, padding))
    assert np.array_equal(got_y, want_y)
    assert np.array_equal(got_dx, want_dx)
    assert np.count_nonzero(want_dx) > 0


@pytest.mark.skipif(bf16_kernels_missing(), reason="bf16 crashes under this ONEDNN_MAX_CPU_ISA cap")
def test_taps_gradient_in_bfloat16():
    x = tf.cast(tf.nn.relu(tf.random.stateless_normal([2, 9, 9, 4], [0, 1])), tf.bfloat16)
    want = pooled_with_gradients(x, (3, 3), (2, 2), "SAME", None)[1]
    got = pooled_with_gradients(x, (3, 3), (2, 2), "SAME", pool_forms.taps_gradient((3, 3), (2, 2), "SAME"))[1]
    assert got.dtype == tf.bfloat16 and np.array_equal(got, want)


def test_the_layer_takes_its_form_in_training_only(monkeypatch):
    """A MaxPool2D inside a model takes the training flag from the model's call (Keras propagates
    it), so the taps form runs in training and the plain op in inference."""
    inputs = keras.Input((8, 8, 3))
    pool = pool_forms.MaxPool2D(3, 2, padding="same")
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(pool(inputs))))
    assert pool.input_shape_seen == (8, 8, 3)
    seen = []
    real = pool_forms.max_pool
    monkeypatch.setattr(pool_forms, "max_pool", lambda *a: seen.append(a[-1]) or real(*a))
    x = tf.random.stateless_normal([2, 8, 8, 3], [0, 2])
    grads = {}
    for form in ("native", "taps"):
        pool.form = form
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True) ** 2)
        grads[form] = tape.gradient(loss, model.trainable_weights)
        model(x, training=False)
    assert len(seen) == 1 and seen[0] is not None  # one call: the taps form's, in training
    for a, b in zip(grads["taps"], grads["native"]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model", ["hw2_inception", "cifar10_tutorial", "simple_cnn", "vgg10", "resnet14"])
def test_every_network_pools_with_these_layers(model):
    """The autotune finds the pools it may speed up by their class: a network built with Keras'
    own MaxPooling2D would keep the slow gradient unnoticed."""
    import hw2
    import utils
    cfg = utils.load_config("tiny", {"model": model, "stem_pool": "true"} if model.startswith("resnet") else
                            {"model": model})
    net = hw2.create_model(cfg, 3)
    pools = [p for p in net._flatten_layers() if isinstance(p, keras.layers.MaxPooling2D)]
    assert pools and all(isinstance(p, pool_forms.MaxPool2D) for p in pools)
    assert all(p.input_shape_seen is not None for p in pools)
