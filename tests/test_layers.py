"""layers.py: our im2col convolution against tf.nn.conv2d, and the conv blocks built on it."""

import itertools
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import conv_forms  # noqa: E402
from helpers import bf16_kernels_missing  # noqa: E402
from layers import (  # noqa: E402
    CONV_IMPLS,
    ConvBNReLU,
    ConvStack,
    InceptionModule,
    conv2d_func,
    inception_v1_module,
    inception_v2_module,
    set_conv_impl,
    spatial_dropout,
)


def conv_and_grads(x, w, strides, padding, impl, upstream=None, seed=0, form=None):
    """Output, dL/dx and dL/dw for L = sum(y * upstream); a random upstream if none is given."""
    with tf.GradientTape() as tape:
        tape.watch([x, w])
        y = conv2d_func(x, w, strides, padding, impl=impl, form=form)
    if upstream is None:
        upstream = tf.cast(tf.random.stateless_normal(tf.shape(y), [seed, 1]), y.dtype)
    dx, dw = tape.gradient(y, [x, w], output_gradients=upstream)
    return y, dx, dw, upstream


def assert_close(actual, expected, rtol):
    """Elementwise, relative to the largest magnitude: sums of many terms cancel to near zero."""
    actual = np.asarray(tf.cast(actual, tf.float32))
    expected = np.asarray(tf.cast(expected, tf.float32))
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def random_inputs(n, h, w, cin, k, cout, seed=0, dtype=tf.float32):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.standard_normal((n, h, w, cin)), dtype)
    kernel = tf.constant(rng.standard_normal((k, k, cin, cout)), tf.float32)
    return x, kernel


def forms_for(k, stride, padding, hw, cin, dtype="float32"):
    """Every im2col form that can compute this shape (the autotune picks among these)."""
    spec = conv_forms.ConvSpec(*hw, cin, 4, k, k, stride, stride, padding == "SAME", dtype)
    return conv_forms.applicable_forms(spec)


def with_forms(cases, cin=3):
    """(case..., form) for every form applicable to each case, and readable test ids."""
    params = [(*case, form) for case in cases for form in forms_for(*case, cin)]
    ids = [f"k{k}-s{s}-{p}-{h}x{w}-{form}" for k, s, p, (h, w), form in params]
    return params, ids


GRID, GRID_IDS = with_forms(itertools.product([1, 3, 5, 7], [1, 2], ["SAME", "VALID"], [(7, 9), (8, 8)]))


def test_the_grid_covers_every_form():
    assert {case[-1] for case in GRID} == set(conv_forms.FORMS)


@pytest.mark.parametrize("k,stride,padding,hw,form", GRID, ids=GRID_IDS)
def test_im2col_matches_native_values_and_gradients(k, stride, padding, hw, form):
    x, w = random_inputs(2, *hw, 3, k, 4, seed=k * 10 + stride)
    y_ref, dx_ref, dw_ref, upstream = conv_and_grads(x, w, stride, padding, "native")
    y, dx, dw, _ = conv_and_grads(x, w, stride, padding, "im2col", upstream, form=form)
    assert_close(y, y_ref, 1e-4)
    assert_close(dx, dx_ref, 1e-4)
    assert_close(dw, dw_ref, 1e-4)


# Winograd's 6x6 (3x3 kernels) and 8x8 (5x5) input tiles step by 4: sizes below, at and between
# multiples of the step, where the last tile overhangs the image and the overlapping taps of 2
# tiles sum in the input gradient. Stride 2 (winograd_s2) steps by 5 pixels of the half-size phase
# image, 10 of the input; odd sizes leave a phase one pixel short, VALID leaves the last row unread.
WINOGRAD_EDGES, WINOGRAD_EDGE_IDS = with_forms(
    [(k, 1, "SAME", hw) for k in (3, 5) for hw in [(1, 1), (2, 3), (4, 4), (5, 6), (12, 13)]]
    + [(3, 1, "VALID", hw) for hw in [(3, 3), (6, 6), (7, 10)]] + [(5, 1, "VALID", hw) for hw in [(5, 5), (6, 9)]]
    + [(3, 2, "SAME", hw) for hw in [(1, 1), (2, 3), (10, 10), (11, 21)]]
    + [(3, 2, "VALID", hw) for hw in [(3, 3), (4, 5), (12, 23)]])


@pytest.mark.parametrize("m,r,dtype", [(4, 3, "float32"), (4, 5, "float32"), (5, 2, "float32"), (2, 3, "bfloat16")])
def test_winograd_transforms_compute_a_correlation_exactly(m, r, dtype):
    """The Toom-Cook matrices of F(m, r) (winograd: F(4,3), F(4,5), in 16-bit floats F(2,3); winograd_s2:
    F(5,2)), in float64 and in one dimension: A^T [(G g) * (B^T d)] is the m outputs of g slid over the tile d."""
    bt, g, at = conv_forms._winograd_matrices(m, r)
    a = m + r - 1
    assert bt.shape == (a, a) and g.shape == (a, r) and at.shape == (m, a) and a == conv_forms.tile_side(r, dtype)
    rng = np.random.default_rng(m * 10 + r)
    for _ in range(5):
        d, k = rng.standard_normal(a), rng.standard_normal(r)
        want = [d[i:i + r] @ k for i in range(m)]
        np.testing.assert_allclose(at @ ((g @ k) * (bt @ d)), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k,stride,padding,hw,form", WINOGRAD_EDGES, ids=WINOGRAD_EDGE_IDS)
def test_im2col_matches_native_at_winograd_tile_edges(k, stride, padding, hw, form):
    x, w = random_inputs(3, *hw, 3, k, 4, seed=hw[0] * 7 + hw[1])
    y_ref, dx_ref, dw_ref, upstream = conv_and_grads(x, w, stride, padding, "native")
    y, dx, dw, _ = conv_and_grads(x, w, stride, padding, "im2col", upstream, form=form)
    assert_close(y, y_ref, 1e-4)
    assert_close(dx, dx_ref, 1e-4)
    assert_close(dw, dw_ref, 1e-4)


@pytest.mark.parametrize("stride,form", [(1, "winograd"), (2, "winograd_s2")])
def test_winograd_backward_makes_its_tiles_again_once_its_backward_has_begun(stride, form):
    """The filter gradient reads tiles made again in the backward pass, not the forward's (kept,
    they held 2.25x each layer's input through the whole backward pass), and the remaking waits
    on the layer's own backward (run early, it sat at the memory peak: bench/README.md)."""
    x, w = random_inputs(2, 12, 12, 8, 3, 4, seed=3)

    @tf.function
    def grads(x, w):
        return conv_and_grads(x, w, stride, "SAME", "im2col", form=form)[1:3]

    graph = grads.get_concrete_function(x, w).graph
    # The tiles: B^T [36, 36] (a constant) times the gathered input.
    makers = [op for op in graph.get_operations() if op.type == "MatMul" and op.inputs[0].op.type == "Const"
              and op.inputs[0].shape.as_list() == [36, 36]]
    assert len(makers) == 2  # the forward's and the backward's
    forward, backward = sorted(makers, key=lambda op: "gradient" in op.name)
    assert "gradient" in backward.name and "gradient" not in forward.name
    # The forward's tiles feed only the forward product (through their reshape).
    (reshape,) = forward.outputs[0].consumers()
    assert [op.type for op in reshape.outputs[0].consumers()] == ["BatchMatMulV2"]
    # The ops that build the backward's tiles (the first in the control-dependency block carry it).
    feeding, todo = set(), [backward.inputs[1].op]
    while todo:
        op = todo.pop()
        if op not in feeding and op.type != "Placeholder":
            feeding.add(op)
            todo += [t.op for t in op.inputs]
    assert any(c.type == "Reshape" and "gradient" in c.name for op in feeding for c in op.control_inputs)


@pytest.mark.parametrize("k,stride,form", [(3, 1, "winograd"), (5, 1, "winograd"), (3, 2, "winograd_s2")])
def test_winograd_in_bands_of_images_matches_native(k, stride, form, monkeypatch):
    # Both passes take a band of images at a time (BAND_BYTES); force one image a band.
    monkeypatch.setattr(conv_forms, "BAND_BYTES", 1)
    x, w = random_inputs(3, 13, 11, 4, k, 5, seed=23)

    @tf.function
    def grads(x, w):
        return conv_and_grads(x, w, stride, "SAME", "im2col", form=form, seed=4)

    y, dx, dw, upstream = grads(x, w)
    y_ref, dx_ref, dw_ref, _ = conv_and_grads(x, w, stride, "SAME", "native", upstream)
    assert_close(y, y_ref, 1e-4)
    assert_close(dx, dx_ref, 1e-4)
    assert_close(dw, dw_ref, 1e-4)
    graph = grads.get_concrete_function(x, w).graph
    makers = [op for op in graph.get_operations() if op.type == "MatMul" and op.inputs[0].op.type == "Const"
              and op.inputs[0].shape.as_list() == [conv_forms.tile_side(k) ** 2] * 2]
    assert len(makers) == 6  # each image's tiles, in the forward pass and again in the backward


def test_gather_input_gradient_interleaves_its_stride_phases_with_the_parallel_stitch_on_cpu():
    """On CPU the stride phases of dL/dx go into image order by ParallelDynamicStitch (sharded over
    threads; DynamicStitch copies on one), and the result is still native's."""
    x, w = random_inputs(2, 11, 10, 5, 3, 4, seed=5)

    @tf.function
    def grads(x, w):
        return conv_and_grads(x, w, 2, "SAME", "im2col", form="gather")

    types = {op.type for op in grads.get_concrete_function(x, w).graph.get_operations()}
    assert "ParallelDynamicStitch" in types and "DynamicStitch" not in types
    _, dx, _, upstream = grads(x, w)
    assert_close(dx, conv_and_grads(x, w, 2, "SAME", "native", upstream)[1], 1e-4)


# Odd and even sides, kernels smaller than, equal to and larger than the stride, both paddings.
COL2IM, COL2IM_IDS = with_forms(
    [(k, s, p, (7, 9)) for k in (2, 3, 5) for s in (2, 3) for p in ("SAME", "VALID")]
    + [(3, 2, p, (10, 10)) for p in ("SAME", "VALID")], cin=5)


@pytest.mark.parametrize("k,stride,padding,hw,form", COL2IM, ids=COL2IM_IDS)
def test_col2im_input_gradient_matches_native(k, stride, padding, hw, form, monkeypatch):
    # A strided layer's dL/dx on a CPU: one matmul for every tap's product, then the XLA overlap-add
    # (taps of different outputs meet on one pixel; VALID leaves pixels no tap reads). Small maps
    # keep the stride phases unless the threshold is lowered, as here.
    monkeypatch.setattr(conv_forms, "COL2IM_MIN_BYTES", 0)
    x, w = random_inputs(3, *hw, 5, k, 4, seed=k + 10 * stride)
    y_ref, dx_ref, dw_ref, upstream = conv_and_grads(x, w, stride, padding, "native")
    y, dx, dw, _ = conv_and_grads(x, w, stride, padding, "im2col", upstream, form=form)
    assert_close(y, y_ref, 1e-4)
    assert_close(dx, dx_ref, 1e-4)
    assert_close(dw, dw_ref, 1e-4)


@pytest.mark.parametrize("form", ["gather", "winograd_s2"])
def test_col2im_takes_a_strided_layers_input_gradient_above_its_threshold(form, monkeypatch):
    x, w = random_inputs(2, 11, 10, 5, 3, 4, seed=5)

    def ops(threshold):
        monkeypatch.setattr(conv_forms, "COL2IM_MIN_BYTES", threshold)
        grads = tf.function(lambda x, w: conv_and_grads(x, w, 2, "SAME", "im2col", form=form))
        ops = grads.get_concrete_function(x, w).graph.get_operations()
        xla = [op for op in ops if "_XlaMustCompile" in op.node_def.attr and op.get_attr("_XlaMustCompile")]
        return {op.type for op in ops}, len(xla)

    types, xla_calls = ops(0)
    assert "ParallelDynamicStitch" not in types and xla_calls == 1
    types, xla_calls = ops(2**40)
    assert "ParallelDynamicStitch" in types and xla_calls == 0


@pytest.mark.parametrize("k,stride,padding,form", [(3, 2, "SAME", "gather"), (3, 2, "VALID", "winograd_s2"),
                                                  (2, 3, "SAME", "gather")])
def test_col2im_in_bands_of_images_matches_native(k, stride, padding, form, monkeypatch):
    # One band of tap matrix alive at a time (BAND_BYTES): here one image per band, one XLA call each.
    monkeypatch.setattr(conv_forms, "COL2IM_MIN_BYTES", 0)
    monkeypatch.setattr(conv_forms, "BAND_BYTES", 1)
    x, w = random_inputs(3, 11, 10, 5, k, 4, seed=31)
    grads = tf.function(lambda x, w: conv_and_grads(x, w, stride, padding, "im2col", form=form))
    ops = grads.get_concrete_function(x, w).graph.get_operations()
    assert sum("_XlaMustCompile" in op.node_def.attr and op.get_attr("_XlaMustCompile") for op in ops) == 3
    y, dx, dw, upstream = grads(x, w)
    _, dx_ref, dw_ref, _ = conv_and_grads(x, w, stride, padding, "native", upstream)
    assert_close(dx, dx_ref, 1e-4)
    assert_close(dw, dw_ref, 1e-4)


@pytest.mark.skipif(bf16_kernels_missing(), reason="bf16 crashes under this ONEDNN_MAX_CPU_ISA cap")
def test_col2im_in_bfloat16_matches_float32_native_loosely(monkeypatch):
    monkeypatch.setattr(conv_forms, "COL2IM_MIN_BYTES", 0)
    x, w = random_inputs(2, 9, 10, 5, 3, 4, seed=29, dtype=tf.bfloat16)
    _, dx, _, upstream = conv_and_grads(x, w, 2, "SAME", "im2col", form="gather")
    assert dx.dtype == tf.bfloat16
    dx_ref = conv_and_grads(tf.cast(x, tf.float32), w, 2, "SAME", "native", tf.cast(upstream, tf.float32))[1]
    assert_close(dx, dx_ref, 3e-2)


def test_col2im_with_a_batch_unknown_when_traced_matches_native(monkeypatch):
    monkeypatch.setattr(conv_forms, "COL2IM_MIN_BYTES", 0)
    x, w = random_inputs(3, 9, 8, 5, 3, 4, seed=23)
    upstream = tf.random.stateless_normal([3, 5, 4, 4], [1, 3])

    @tf.function(input_signature=[tf.TensorSpec([None, 9, 8, 5])])
    def grads(x):
        return conv_and_grads(x, w, 2, "SAME", "im2col", upstream[:tf.shape(x)[0]], form="gather")[1:3]

    for n in (3, 1):
        _, dx_ref, dw_ref, _ = conv_and_grads(x[:n], w, 2, "SAME", "native", upstream[:n])
        for got, ref in zip(grads(x[:n]), (dx_ref, dw_ref)):
            assert_close(got, ref, 1e-4)


def test_native_strided_1x1_gradient_is_the_sum_it_stands_for():
    # TensorFlow 2.21's oneDNN filter gradient of a 1x1 stride-2 convolution corrupted the heap
    # (glibc aborted the process within ~60 of these calls on an Intel Xeon with AVX-512) and was
    # wrong under ONEDNN_MAX_CPU_ISA=AVX2; the native impl now runs such a kernel at stride 1 on the
    # pixels it visits.
    for seed in range(80):
        x, w = random_inputs(3, 10, 10 - seed % 2, 5, 1, 4, seed=seed)
        _, dx, dw, upstream = conv_and_grads(x, w, 2, "SAME" if seed % 4 < 2 else "VALID", "native")
        xs = np.asarray(x)[:, ::2, ::2]
        assert_close(dw, np.einsum("bhwc,bhwo->co", xs, np.asarray(upstream))[None, None], 1e-5)
    dx_ref = np.zeros(x.shape, np.float32)
    dx_ref[:, ::2, ::2] = np.einsum("bhwo,co->bhwc", np.asarray(upstream), np.asarray(w)[0, 0])
    assert_close(dx, dx_ref, 1e-5)


@pytest.mark.parametrize(
    "k,stride,padding", [(2, 2, "SAME"), (4, 1, "SAME"), (3, 3, "VALID"), (2, 3, "SAME")]
)
def test_im2col_matches_native_even_kernels_and_stride_3(k, stride, padding):
    # Even kernels put the extra SAME pad on one side only; stride 3 leaves VALID rows unread.
    x, w = random_inputs(2, 10, 11, 5, k, 3, seed=7)
    y_ref, dx_ref, dw_ref, upstream = conv_and_grads(x, w, stride, padding, "native")
    y, dx, dw, _ = conv_and_grads(x, w, stride, padding, "im2col", upstream)
    assert_close(y, y_ref, 1e-4)
    assert_close(dx, dx_ref, 1e-4)
    assert_close(dw, dw_ref, 1e-4)


@pytest.mark.parametrize("k,stride,padding,hw,form", [
    (3, 1, "SAME", (9, 8), "gather"), (3, 2, "SAME", (9, 8), "gather"), (5, 2, "VALID", (11, 12), "gather"),
    (3, 2, "SAME", (8, 10), "gather"),  # even sides: the odd phase reads dy pixel for pixel, ungathered
    (1, 1, "SAME", (7, 7), "gather"), (1, 2, "SAME", (7, 7), "gather"),
    (3, 1, "SAME", (9, 8), "pairs"), (5, 1, "VALID", (11, 12), "pairs"), (4, 1, "SAME", (9, 10), "pairs")])
def test_gather_in_bands_matches_native(k, stride, padding, hw, form, monkeypatch):
    # The gather forms' backward pass runs in bands (of images for dL/dw, of pixels for dL/dx) to
    # bound its memory, and the gather form's forward in bands of images; force as many as there
    # can be.
    monkeypatch.setattr(conv_forms, "BAND_BYTES_PER_IMAGE", 1)
    monkeypatch.setattr(conv_forms, "BAND_BYTES", 1)
    x, w = random_inputs(2, *hw, 3, k, 4, seed=11)
    y_ref, dx_ref, dw_ref, upstream = conv_and_grads(x, w, stride, padding, "native")
    y, dx, dw, _ = conv_and_grads(x, w, stride, padding, "im2col", upstream, form=form)
    assert_close(y, y_ref, 1e-4)
    assert_close(dx, dx_ref, 1e-4)
    assert_close(dw, dw_ref, 1e-4)


@pytest.mark.parametrize("k,stride,hw", [(3, 1, (16, 18)), (3, 2, (20, 20)), (3, 2, (41, 39)), (5, 1, (36, 34)),
                                         (2, 2, (17, 17))])
def test_gather_without_a_padded_copy_matches_native(k, stride, hw, monkeypatch):
    # On maps this large the gather form reads x itself, padding taps read pixel 0, and the border
    # outputs are made again from a small padded gather: y, and dL/dw less the stand-ins' share.
    plan = conv_forms._gather_plan(*hw, k, k, stride, stride, True)
    assert plan.pad is None and plan.border.size > 0
    monkeypatch.setattr(conv_forms, "BAND_BYTES_PER_IMAGE", 1)
    monkeypatch.setattr(conv_forms, "BAND_BYTES", 1)  # each image's border made again in its band
    x, w = random_inputs(3, *hw, 5, k, 4, seed=17)
    x += 3.0  # pixel 0 standing in for the padding must not leak into y or dL/dw
    y_ref, dx_ref, dw_ref, upstream = conv_and_grads(x, w, stride, "SAME", "native")
    y, dx, dw, _ = conv_and_grads(x, w, stride, "SAME", "im2col", upstream, form="gather")
    assert_close(y, y_ref, 1e-4)
    assert_close(dx, dx_ref, 1e-4)
    assert_close(dw, dw_ref, 1e-4)


@pytest.mark.parametrize("band_images", [1, 2, 5])
def test_gather_forward_in_bands_of_images_matches_native(band_images, monkeypatch):
    # The forward pass (training, and inference with bias and ReLU) gathers and multiplies a band of
    # images at a time; 5 images in bands of about 2 are 3 bands of 1-2, and every band has border
    # outputs to make again.
    hw, k, stride = (20, 20), 3, 2
    per_image = conv_forms._gather_plan(*hw, k, k, stride, stride, True).ho ** 2 * k * k * 5 * 4
    monkeypatch.setattr(conv_forms, "BAND_BYTES", per_image * band_images)
    x, w = random_inputs(5, *hw, 5, k, 4, seed=19)
    x += 3.0
    bias = tf.constant([0.5, -1.0, 0.0, 2.0])
    y, _, dw, _ = conv_and_grads(x, w, stride, "SAME", "im2col", form="gather", seed=3)
    y_ref, _, dw_ref, _ = conv_and_grads(x, w, stride, "SAME", "native", seed=3)
    assert_close(y, y_ref, 1e-4)
    assert_close(dw, dw_ref, 1e-4)
    infer = tf.function(lambda x: conv_forms.conv2d_bias_act(x, w, bias, stride, stride, True, "gather", True))
    assert_close(infer(x), tf.nn.relu(y_ref + bias), 1e-4)
    graph = infer.get_concrete_function(x).graph
    bands = sum(op.type == "MatMul" for op in graph.get_operations()) // 2  # the band's and its border's
    assert bands == -(-5 // band_images)


def test_gather_pads_small_maps_once():
    # Mostly border (a 4x4 map under a 3x3 kernel): one padded copy, no border pass.
    plan = conv_forms._gather_plan(4, 4, 3, 3, 1, 1, True)
    assert plan.pad == ((1, 1), (1, 1)) and plan.border.size == 0


@pytest.mark.parametrize("form", ["gather", "pairs"])
def test_gather_in_bands_of_a_batch_unknown_when_traced_matches_native(form, monkeypatch):
    # Traced with the batch unknown, the filter gradient cuts it into 64 image bands at run time,
    # most of them empty for a batch of 3.
    monkeypatch.setattr(conv_forms, "BAND_BYTES_PER_IMAGE", 1)
    x, w = random_inputs(3, 8, 10, 3, 3, 4, seed=13)
    upstream = tf.random.stateless_normal([3, 8, 10, 4], [1, 2])

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 10, 3])])
    def grads(x):
        return conv_and_grads(x, w, 1, "SAME", "im2col", upstream, form=form)[:3]

    bands = sum(op.type == "MatMul" for op in grads.get_concrete_function().graph.get_operations())
    assert bands > 64
    y_ref, dx_ref, dw_ref, _ = conv_and_grads(x, w, 1, "SAME", "native", upstream)
    for got, ref in zip(grads(x), (y_ref, dx_ref, dw_ref)):
        assert_close(got, ref, 1e-4)


MORE_CHANNELS, MORE_CHANNELS_IDS = with_forms([(k, s, "SAME", (9, 8)) for k in (1, 3) for s in (1, 2)], cin=16)


@pytest.mark.parametrize("k,stride,padding,hw,form", MORE_CHANNELS, ids=MORE_CHANNELS_IDS)
def test_im2col_with_more_channels_matches_native(k, stride, padding, hw, form):
    x, w = random_inputs(2, *hw, 16, k, 12, seed=stride)
    y_ref, dx_ref, dw_ref, upstream = conv_and_grads(x, w, stride, padding, "native")
    y, dx, dw, _ = conv_and_grads(x, w, stride, padding, "im2col", upstream, form=form)
    assert_close(y, y_ref, 1e-4)
    assert_close(dx, dx_ref, 1e-4)
    assert_close(dw, dw_ref, 1e-4)


@pytest.mark.parametrize("strides", [2, [2, 2], (1, 2, 2, 1)])
def test_stride_forms_and_lowercase_padding_are_accepted(strides):
    x, w = random_inputs(1, 8, 8, 3, 3, 2)
    expected = tf.nn.conv2d(x, w, strides=2, padding="SAME")
    assert_close(conv2d_func(x, w, strides, "same"), expected, 1e-4)


UNKNOWN_BATCH, UNKNOWN_BATCH_IDS = with_forms([(3, 2, "SAME", (9, 8)), (3, 1, "SAME", (9, 8)),
                                               (1, 2, "SAME", (9, 8))])


@pytest.mark.parametrize("k,stride,padding,hw,form", UNKNOWN_BATCH, ids=UNKNOWN_BATCH_IDS)
def test_im2col_in_tf_function_with_unknown_batch(k, stride, padding, hw, form):
    # Winograd's row indices depend on the batch size, which is only known when the step runs.
    x, w = random_inputs(3, *hw, 3, k, 4, seed=3)
    w = tf.Variable(w)

    @tf.function(input_signature=[tf.TensorSpec([None, *hw, 3], tf.float32)])
    def step(x):
        out = {}
        for impl in ("native", "im2col"):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = conv2d_func(x, w, stride, padding, impl=impl, form=form if impl == "im2col" else None)
                loss = tf.reduce_sum(y * tf.cos(y))
            out[impl] = (y, *tape.gradient(loss, [x, w]))
        return out

    for n in (3, 1):
        out = step(x[:n])
        assert out["im2col"][0].shape == (n, -(-hw[0] // stride), -(-hw[1] // stride), 4)
        for got, ref in zip(out["im2col"], out["native"]):
            assert_close(got, ref, 1e-4)


@pytest.mark.skipif(bf16_kernels_missing(), reason="bf16 crashes under this ONEDNN_MAX_CPU_ISA cap")
@pytest.mark.parametrize("form", forms_for(3, 1, "SAME", (8, 8), 3, "bfloat16") + ("matmul",))
def test_bfloat16_im2col_matches_float32_native_loosely(form):
    k = 1 if form == "matmul" else 3
    x, w = random_inputs(2, 8, 8, 3, k, 4, seed=5, dtype=tf.bfloat16)
    y, dx, dw, upstream = conv_and_grads(x, w, 1, "SAME", "im2col", form=form)
    assert y.dtype == tf.bfloat16 and dx.dtype == tf.bfloat16
    assert dw.dtype == tf.float32  # the cast hands the gradient back in the variable's dtype
    y_ref, dx_ref, dw_ref, _ = conv_and_grads(
        tf.cast(x, tf.float32), w, 1, "SAME", "native", tf.cast(upstream, tf.float32)
    )
    assert_close(y, y_ref, 3e-2)
    assert_close(dx, dx_ref, 3e-2)
    assert_close(dw, dw_ref, 3e-2)


# F(2x2, 3x3)'s 4x4 tiles step by 2: odd and even sizes, one pixel, VALID.
WINOGRAD_16_BIT_EDGES = [("SAME", hw) for hw in [(1, 1), (2, 3), (4, 4), (5, 6), (7, 10)]] + [
    ("VALID", hw) for hw in [(3, 3), (6, 6), (7, 10)]]


@pytest.mark.parametrize("dtype", [
    pytest.param("bfloat16", marks=pytest.mark.skipif(bf16_kernels_missing(), reason="bf16 crashes under this cap")),
    "float16"])
@pytest.mark.parametrize("padding,hw", WINOGRAD_16_BIT_EDGES, ids=[f"{p}-{h}x{w}" for p, (h, w) in WINOGRAD_16_BIT_EDGES])
def test_16_bit_winograd_matches_float32_native_at_its_tile_edges(padding, hw, dtype):
    x, w = random_inputs(3, *hw, 5, 3, 4, seed=hw[0] * 7 + hw[1], dtype=dtype)
    y, dx, dw, upstream = conv_and_grads(x, w, 1, padding, "im2col", form="winograd")
    refs = conv_and_grads(tf.cast(x, tf.float32), w, 1, padding, "native", tf.cast(upstream, tf.float32))
    for got, ref in zip((y, dx, dw), refs):
        assert_close(got, ref, 3e-2)


@pytest.mark.skipif(bf16_kernels_missing(), reason="bf16 crashes under this ONEDNN_MAX_CPU_ISA cap")
def test_bfloat16_winograd_errs_under_one_percent():
    """In bfloat16 the Winograd form runs F(2x2, 3x3): RMS error against float32 tf.nn.conv2d ~0.55%
    here for the output and both gradients (the gather form's 0.17-0.23%), where F(4x4, 3x3)'s 6x6
    tiles gave ~3%."""
    x, w = random_inputs(4, 12, 12, 32, 3, 32, seed=41, dtype=tf.bfloat16)
    w = w * 0.05
    upstream = tf.cast(tf.random.stateless_normal([4, 12, 12, 32], [4, 1]), tf.bfloat16)
    # Against the float32 kernel, as mixed precision keeps it: both forms round it to bfloat16.
    refs = conv_and_grads(tf.cast(x, tf.float32), w, 1, "SAME", "native", tf.cast(upstream, tf.float32))[:3]

    def rms_errors(form):
        got = conv_and_grads(x, w, 1, "SAME", "im2col", upstream, form=form)[:3]
        return [float(np.sqrt(np.mean((np.asarray(tf.cast(g, tf.float32)) - r.numpy()) ** 2) / np.mean(r.numpy() ** 2)))
                for g, r in zip(got, refs)]

    gather, winograd = rms_errors("gather"), rms_errors("winograd")
    assert all(0 < e < 0.005 for e in gather), gather
    assert all(0 < e < 0.01 for e in winograd), winograd


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"padding": "FULL"}, "FULL"),
        ({"padding": "SAME "}, "SAME "),
        ({"impl": "fft"}, "fft"),
        ({"strides": [1, 2, 2, 2]}, "strides"),
        ({"form": "winograd", "strides": 2}, "winograd"),
        ({"form": "matmul"}, "matmul"),
        ({"form": "fft"}, "fft"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    x, w = random_inputs(1, 5, 5, 2, 3, 2)
    with pytest.raises(ValueError, match=match):
        conv2d_func(x, w, **kwargs)


def test_conv_bn_relu_shapes_and_parameter_count():
    layer = ConvBNReLU(8, 3, name="c")
    y = layer(tf.random.normal([2, 9, 9, 4]))
    assert y.shape == (2, 9, 9, 8)
    assert float(tf.reduce_min(y)) >= 0.0
    # 3*3*4*8 kernel, no bias; BN: gamma+beta trainable, moving mean+variance not.
    assert layer.count_params() == 3 * 3 * 4 * 8 + 4 * 8
    assert sum(int(np.prod(v.shape)) for v in layer.trainable_weights) == 3 * 3 * 4 * 8 + 2 * 8

    plain = ConvBNReLU(8, 3, stride=2, batch_norm=False, activation=False)
    y = plain(tf.random.normal([2, 9, 9, 4]))
    assert y.shape == (2, 5, 5, 8)
    assert plain.count_params() == 3 * 3 * 4 * 8 + 8
    assert float(tf.reduce_min(y)) < 0.0


def test_conv_stack_shapes():
    stack = ConvStack([8, 16, 16], kernel_size=3, strides=[1, 2, 2])
    assert stack(tf.random.normal([2, 17, 17, 3])).shape == (2, 5, 5, 16)
    with pytest.raises(ValueError):
        ConvStack([8, 16], strides=[1])


@pytest.mark.parametrize(
    "version,shape,towers,bottleneck,expected,n_convs",
    [
        (2, [2, 25, 25, 128], (64, 96, 96, 64), 64, (2, 25, 25, 320), 7),
        (2, [2, 13, 13, 320], (32, 64, 64, 32), 96, (2, 13, 13, 192), 7),
        (1, [2, 13, 13, 320], (32, 64, 64, 32), 96, (2, 13, 13, 192), 6),
    ],
)
def test_inception_module_shapes(version, shape, towers, bottleneck, expected, n_convs):
    module = InceptionModule(version, towers, bottleneck)
    assert module(tf.random.normal(shape)).shape == expected
    assert module.compute_output_shape(tuple(shape)) == expected
    assert set_conv_impl(module, "im2col") == n_convs


def test_inception_constructors_fix_the_version():
    v1 = inception_v1_module((4, 4, 4, 4), 2)
    v2 = inception_v2_module((4, 4, 4, 4), 2)
    assert (v1.version, v2.version) == (1, 2)
    x = tf.random.normal([1, 6, 6, 3])
    assert v1(x).shape == v2(x).shape == (1, 6, 6, 16)
    # v2's two 3x3 (2*9 taps) replace v1's 5x5 (25 taps).
    assert len(v2.trainable_weights) == len(v1.trainable_weights) + 3


def small_model(conv_impl="im2col", weight_decay=0.0):
    inputs = keras.Input((12, 12, 3))
    x = ConvStack([8, 16], strides=[1, 2], conv_impl=conv_impl, weight_decay=weight_decay)(inputs)
    x = InceptionModule(2, (4, 8, 8, 4), 6, conv_impl=conv_impl, weight_decay=weight_decay)(x)
    x = spatial_dropout(0.8)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2)(x))


def test_set_conv_impl_on_a_model_keeps_the_outputs():
    model = small_model()
    x = tf.random.normal([3, 12, 12, 3], seed=1)
    # 2 ConvStack convs + 7 inception convs, all reached through the functional model.
    assert set_conv_impl(model, "im2col") == 9
    y_ours = model(x, training=False)
    assert set_conv_impl(model, "native") == 9
    convs = [layer for layer in model._flatten_layers() if isinstance(layer, ConvBNReLU)]
    assert len(convs) == 9 and all(conv.conv_impl == "native" for conv in convs)
    y_ref = model(x, training=False)
    assert y_ours.shape == (3, 2)
    assert_close(y_ours, y_ref, 1e-4)
    with pytest.raises(ValueError):
        set_conv_impl(model, "winograd")


def test_set_conv_impl_gives_same_gradients_without_dropout():
    layer = InceptionModule(1, (4, 6, 6, 4), 5)
    x = tf.random.normal([2, 7, 7, 3], seed=2)
    results = []
    for impl in ("im2col", "native"):
        set_conv_impl(layer, impl)
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * tf.sin(y))
        results.append((y, tape.gradient(loss, layer.trainable_weights)))
    (y_ours, g_ours), (y_ref, g_ref) = results
    assert_close(y_ours, y_ref, 1e-4)
    for a, b in zip(g_ours, g_ref):
        assert_close(a, b, 1e-3)


def test_small_model_trains_a_step_in_keras_fit():
    model = small_model(weight_decay=1e-4)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer="sgd", loss=loss)
    x = np.random.default_rng(0).standard_normal((8, 12, 12, 3)).astype("float32")
    y = np.arange(8) % 2
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_l2_weight_decay_shows_up_in_losses():
    wd = 1e-3
    layer = ConvBNReLU(4, 3, weight_decay=wd)
    layer(tf.zeros([1, 5, 5, 2]))
    assert len(layer.losses) == 1
    expected = wd * float(tf.reduce_sum(tf.square(layer.kernel)))
    assert float(layer.losses[0]) == pytest.approx(expected, rel=1e-5)
    assert expected > 0

    no_decay = ConvBNReLU(4, 3)
    no_decay(tf.zeros([1, 5, 5, 2]))
    assert no_decay.losses == []
    # Every conv of a model contributes one term.
    assert len(small_model(weight_decay=wd).losses) == 9


def test_spatial_dropout_drops_whole_channels():
    layer = spatial_dropout(0.5)
    assert layer.rate == pytest.approx(0.5)
    y = np.asarray(layer(tf.ones([4, 6, 6, 32]), training=True))
    per_channel = y.reshape(4, 36, 32)
    assert np.all(per_channel.min(axis=1) == per_channel.max(axis=1))  # all-or-nothing per channel
    assert set(np.unique(y)) <= {0.0, 2.0} and 0.0 in y and 2.0 in y
    with pytest.raises(ValueError):
        spatial_dropout(0.0)


@pytest.fixture
def mixed_bfloat16():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.skipif(bf16_kernels_missing(), reason="bf16 crashes under this ONEDNN_MAX_CPU_ISA cap")
def test_layers_run_under_mixed_bfloat16(mixed_bfloat16):
    module = InceptionModule(2, (4, 6, 6, 4), 5)
    x = tf.random.normal([2, 7, 7, 3])
    with tf.GradientTape() as tape:
        y = module(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32))
    grads = tape.gradient(loss, module.trainable_weights)
    assert y.dtype == tf.bfloat16 and y.shape == (2, 7, 7, 20)
    assert all(v.dtype == "float32" for v in module.weights)
    assert all(g is not None and g.dtype == tf.float32 for g in grads)
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_layer_under_distribution_strategy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        layer = ConvBNReLU(4, 3, stride=2)
        layer.build((None, 6, 6, 3))

    @tf.function
    def step(x):
        def replica_fn(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(x, training=True))
            return tape.gradient(loss, layer.trainable_weights)

        return strategy.run(replica_fn, args=(x,))

    grads = step(tf.random.normal([2, 6, 6, 3]))
    assert grads[0].shape == (3, 3, 3, 4)


def test_config_round_trip():
    layer = ConvBNReLU(6, 5, stride=2, conv_impl="native", weight_decay=1e-4, name="c1")
    clone = ConvBNReLU.from_config(layer.get_config())
    assert (clone.filters, clone.kernel_size, clone.stride) == (6, 5, 2)
    assert (clone.conv_impl, clone.weight_decay, clone.name) == ("native", 1e-4, "c1")
    module = InceptionModule(2, (4, 6, 6, 4), 5, conv_impl="native")
    assert InceptionModule.from_config(module.get_config()).towers == (4, 6, 6, 4)


@pytest.mark.parametrize("form, graph", [("fused", False), ("split", False), ("fused", True), ("split", True)])
def test_batch_norm_forms_equal_keras_batch_norm(form, graph):
    """ConvBNReLU's batch norm + ReLU in each form, eager and traced (where grappler fuses BN and
    ReLU): same outputs, gradients and moving statistics as Keras BN."""
    import keras

    from bn_forms import batch_norm
    rng = np.random.default_rng(0)
    bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3)
    x = tf.constant(rng.normal(1.0, 3.0, (4, 7, 5, 6)), tf.float32)
    bn.build(x.shape)
    bn.gamma.assign(rng.uniform(0.5, 1.5, 6))
    bn.beta.assign(rng.uniform(0, 1, 6))
    init = [v.numpy().copy() for v in bn.variables]
    upstream = tf.constant(rng.normal(size=(4, 7, 5, 6)), tf.float32)

    def step(fn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.nn.relu(fn())
            total = tf.reduce_sum(y * upstream)
        return [y] + tape.gradient(total, [x, bn.gamma, bn.beta])

    results = []
    for fn in (lambda: bn(x, training=True), lambda: batch_norm(bn, x, True, form)):
        for v, value in zip(bn.variables, init):
            v.assign(value)
        run = tf.function(step) if graph else step
        results.append(run(fn) + [v.numpy() for v in bn.variables] + [batch_norm(bn, x, False, form)])
    assert not np.allclose(results[0][-1], results[0][0])  # inference uses the moving statistics
    assert not np.allclose(results[0][-1], init[-1])  # the moving statistics moved
    for keras_value, value in zip(*results):
        np.testing.assert_allclose(value, keras_value, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("signature", [(None, 7, 5, 6), (None, None, None, 6)])
def test_split_batch_norm_statistics_with_dimensions_unknown_when_traced(signature):
    """The split form's statistics sum over [N, H*W*C] then [H*W, C] with the batch unknown when
    traced (hw2's last, smaller batch), and fall back to tf.nn.moments where H or W is unknown:
    the batch's mean and biased variance either way, as Keras tracks them."""
    import keras

    from bn_forms import batch_norm
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(2.0, 3.0, (3, 7, 5, 6)), tf.float32)
    bn = keras.layers.BatchNormalization(momentum=0.0, epsilon=1e-3)  # moving statistics = the batch's
    bn.build(x.shape)
    traced = tf.function(lambda t: batch_norm(bn, t, True, "split"), input_signature=[tf.TensorSpec(signature)])
    y = traced(x)
    mean, variance = x.numpy().mean((0, 1, 2)), x.numpy().var((0, 1, 2))
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), variance, rtol=1e-5)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(variance + 1e-3), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(bf16_kernels_missing(), reason="bf16 crashes under this ONEDNN_MAX_CPU_ISA cap")
def test_split_batch_norm_in_bfloat16_matches_fused():
    """bf16 activations with fp32 statistics: the split form's outputs and gradients match the fused
    kernel's (both upcast internally; bf16 rounding is the tolerance)."""
    import keras

    from bn_forms import batch_norm
    rng = np.random.default_rng(2)
    x = tf.cast(tf.constant(rng.normal(0.5, 2.0, (8, 6, 6, 16)), tf.float32), tf.bfloat16)
    upstream = tf.cast(tf.constant(rng.normal(size=(8, 6, 6, 16)), tf.float32), tf.bfloat16)
    results = []
    for form in ("fused", "split"):
        bn = keras.layers.BatchNormalization(epsilon=1e-3)
        bn.build(x.shape)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = batch_norm(bn, x, True, form)
            total = tf.reduce_sum(tf.cast(y * upstream, tf.float32))
        grads = tape.gradient(total, [x, bn.gamma, bn.beta])
        assert y.dtype == tf.bfloat16 and grads[0].dtype == tf.bfloat16
        results.append([tf.cast(t, tf.float32) for t in [y] + grads] + [v.numpy() for v in bn.variables])
    for fused_value, split_value in zip(*results):
        np.testing.assert_allclose(split_value, fused_value, rtol=2e-2, atol=5e-2)


FOLD_CASES = [(impl, k, stride, activation, form, 11)
              for k, stride, activation in [(3, 1, True), (3, 2, False), (1, 1, True), (1, 2, True), (5, 1, True)]
              for impl in CONV_IMPLS
              for form in (forms_for(k, stride, "SAME", (9, 11), 5) if impl == "im2col" else (None,))]
# The pairs form needs an even output width.
FOLD_CASES += [("im2col", k, 1, activation, "pairs", 10) for k, activation in [(3, True), (5, False), (2, True)]]


@pytest.mark.parametrize("impl, k, stride, activation, form, width", FOLD_CASES)
def test_inference_folds_batch_norm_into_the_kernel(impl, k, stride, activation, form, width):
    """ConvBNReLU at training=False (BN folded, one fused matmul + bias + ReLU) equals conv -> Keras BN
    with moving statistics -> ReLU, with and without gradients asked for, in every form."""
    rng = np.random.default_rng(1)
    layer = ConvBNReLU(8, k, stride, conv_impl=impl, activation=activation)
    layer.train_form = layer.infer_form = form
    x = tf.constant(rng.normal(size=(3, 9, width, 5)), tf.float32)
    layer(x, training=True)
    for v in layer.bn.variables:  # statistics far from the 0/1 defaults, so folding shows
        v.assign(rng.uniform(0.3, 2.0, v.shape))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        want = layer.bn(tf.nn.conv2d(x, layer.kernel, stride, "SAME"), training=False)
        want = tf.nn.relu(want) if activation else want
        got = layer(x, training=False)
    assert float(tf.reduce_min(want)) < 0 or activation  # the bias term really matters
    # Winograd's transforms round more: an element in a thousand off by 2e-5 (values) or 2e-4
    # (gradients) in some runs, as thread scheduling reorders the sums.
    winograd = form in ("winograd", "winograd_s2")
    np.testing.assert_allclose(got, want, rtol=1e-4 if winograd else 1e-5, atol=1e-4 if winograd else 1e-5)
    tol = 5e-4 if winograd else 1e-4
    for a, b in zip(tape.gradient(got, [x, layer.kernel]), tape.gradient(want, [x, layer.kernel])):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
