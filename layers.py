"""Our own convolution and the conv blocks hw2's networks are built from.

Every convolution in these layers goes through `conv2d_func`, so `conv_impl="native"` runs the
same weights through `tf.nn.conv2d` as a reference. `conv_impl="im2col"` is ours, in one of the
forms of conv_forms.py (gather, matmul, winograd, winograd_s2, pairs): the fixed default per layer
shape, or what `conv_autotune.choose_conv_forms` measured fastest on this machine.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

import bn_forms
import conv_forms
import pool_forms

CONV_IMPLS = ("im2col", "native")


# ---------------------------------------------------------------------------------------------
# conv2d_func
# ---------------------------------------------------------------------------------------------


def _normalize_strides(strides: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(strides, (int, np.integer)):
        pair = (int(strides), int(strides))
    elif len(strides) == 2:
        pair = (int(strides[0]), int(strides[1]))
    elif len(strides) == 4 and strides[0] == 1 and strides[3] == 1:
        pair = (int(strides[1]), int(strides[2]))
    else:
        raise ValueError(f"strides must be an int, [s, s] or [1, s, s, 1], got {strides!r}")
    if min(pair) < 1:
        raise ValueError(f"strides must be positive, got {strides!r}")
    return pair


def _normalize_padding(padding: str) -> str:
    if not isinstance(padding, str) or padding.upper() not in ("SAME", "VALID"):
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    return padding.upper()


def _conv_args(x, w, strides, padding: str, impl: str):
    """Checked (x, w in x's dtype, stride h, stride w, padding) for conv2d_func and conv2d_bias_act."""
    sh, sw = _normalize_strides(strides)
    padding = _normalize_padding(padding)
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
    x = tf.convert_to_tensor(x)
    return x, tf.cast(tf.convert_to_tensor(w), x.dtype), sh, sw, padding


def _native_conv(x: tf.Tensor, w: tf.Tensor, sh: int, sw: int, padding: str) -> tf.Tensor:
    """tf.nn.conv2d, but a strided 1x1 kernel runs at stride 1 on the pixels it visits (the same
    sum): TensorFlow 2.21's oneDNN filter gradient of a 1x1 stride-2 convolution corrupts the heap
    (glibc aborts "corrupted size vs. prev_size" within ~60 eager steps of a 3x10x10x5 input on an
    Intel Xeon with AVX-512) and is wrong under ONEDNN_MAX_CPU_ISA=AVX2."""
    if w.shape[0] == w.shape[1] == 1 and (sh, sw) != (1, 1):
        x, sh, sw = x[:, ::sh, ::sw], 1, 1  # no padding either way: a 1x1 window never needs it
    return tf.nn.conv2d(x, w, strides=[1, sh, sw, 1], padding=padding)


def conv2d_func(
    x: tf.Tensor,
    w: tf.Tensor,
    strides: int | Sequence[int] = 1,
    padding: str = "SAME",
    impl: str = "im2col",
    form: str | None = None,
) -> tf.Tensor:
    """2-D convolution of x [N,H,W,Cin] with w [kh,kw,Cin,Cout], computed in x's dtype.

    impl="im2col" is ours (matmuls and gathers, hand-written gradient) in `form` (None: the
    default form for this shape, conv_forms.default_form); impl="native" is tf.nn.conv2d. All
    give the same values and gradients.
    """
    x, w, sh, sw, padding = _conv_args(x, w, strides, padding, impl)
    if impl == "native":
        return _native_conv(x, w, sh, sw, padding)
    same = padding == "SAME"
    form = form or conv_forms.default_form(conv_forms.spec_of(x, w, sh, sw, same))
    return conv_forms.conv2d(x, w, sh, sw, same, form)


def conv2d_bias_act(
    x: tf.Tensor,
    w: tf.Tensor,
    bias: tf.Tensor,
    strides: int | Sequence[int] = 1,
    padding: str = "SAME",
    impl: str = "im2col",
    relu: bool = True,
    form: str | None = None,
) -> tf.Tensor:
    """relu(conv2d_func(x, w) + bias) for inference, fused where the form allows.

    native: Conv2D -> BiasAdd -> Relu, which Grappler's remapper fuses into one _FusedConv2D;
    im2col: conv_forms.conv2d_bias_act (the gather and matmul forms fuse the same way into one
    _FusedMatMul). No hand-written gradient: training keeps conv2d_func.
    """
    x, w, sh, sw, padding = _conv_args(x, w, strides, padding, impl)
    bias = tf.cast(bias, x.dtype)
    if impl == "native":
        y = tf.nn.bias_add(_native_conv(x, w, sh, sw, padding), bias)
        return tf.nn.relu(y) if relu else y
    same = padding == "SAME"
    form = form or conv_forms.default_form(conv_forms.spec_of(x, w, sh, sw, same), training=False)
    return conv_forms.conv2d_bias_act(x, w, bias, sh, sw, same, form, relu)


def fold_batch_norm(bn: keras.layers.BatchNormalization, kernel: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(kernel, bias) whose convolution equals conv -> bn in inference mode, in float32."""
    inv = tf.math.rsqrt(bn.moving_variance.value + bn.epsilon)
    scale = bn.gamma.value * inv if bn.scale else inv
    bias = -bn.moving_mean.value * scale
    if bn.center:
        bias += bn.beta.value
    return tf.cast(kernel, tf.float32) * scale, bias


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def _conv_output_size(size: int | None, k: int, s: int, padding: str) -> int | None:
    if size is None:
        return None
    return -(-size // s) if padding == "SAME" else (size - k) // s + 1


class ConvBNReLU(keras.layers.Layer):
    """Convolution (through conv2d_func) -> BatchNorm -> ReLU.

    `conv_impl` is read at call time, so the same weights can run through either
    implementation; change it before the layer is traced (see `set_conv_impl`). So are
    `train_form` and `infer_form`, the im2col forms of the training and the inference pass
    (None: conv_forms.default_form; conv_autotune.choose_conv_forms sets them), and `bn_form`, the
    training batch norm's form (bn_forms.py; None: fused), whatever conv_impl is.
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: str = "SAME",
        conv_impl: str = "im2col",
        weight_decay: float = 0.0,
        batch_norm: bool = True,
        activation: bool = True,
        name: str | None = None,
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.stride = int(stride)
        self.padding = _normalize_padding(padding)
        self.conv_impl = conv_impl
        self.train_form: str | None = None
        self.infer_form: str | None = None
        self.bn_form: str | None = None  # bn_forms.FORMS; None: fused
        self.input_hw: tuple[int, int] | None = None  # set at build; conv_autotune reads it
        self.weight_decay = float(weight_decay)
        self.batch_norm = bool(batch_norm)
        self.activation = bool(activation)
        self.bn = (
            keras.layers.BatchNormalization(momentum=0.99, epsilon=1e-3, name="bn")
            if batch_norm
            else None
        )

    def build(self, input_shape):
        k = self.kernel_size
        if input_shape[1] is not None and input_shape[2] is not None:
            self.input_hw = (int(input_shape[1]), int(input_shape[2]))
        self.kernel = self.add_weight(
            name="kernel",
            shape=(k, k, int(input_shape[-1]), self.filters),
            initializer=keras.initializers.HeNormal(),
            regularizer=keras.regularizers.L2(self.weight_decay) if self.weight_decay > 0 else None,
        )
        if self.bn is None:
            self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")
        else:
            self.bn.build(tuple(input_shape[:-1]) + (self.filters,))

    def call(self, x, training=False):
        if not training:
            # Inference folds batch norm into the kernel: one fused matmul + bias + ReLU.
            if self.bn is None:
                kernel, bias = self.kernel, self.bias
            else:
                kernel, bias = fold_batch_norm(self.bn, self.kernel)
            return conv2d_bias_act(x, kernel, bias, self.stride, self.padding, self.conv_impl,
                                   relu=self.activation, form=self.infer_form)
        y = conv2d_func(x, self.kernel, self.stride, self.padding, impl=self.conv_impl, form=self.train_form)
        if self.bn is None:
            y = y + tf.cast(self.bias, y.dtype)
        else:
            y = bn_forms.batch_norm(self.bn, y, training, self.bn_form)
        return tf.nn.relu(y) if self.activation else y

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        k, s, p = self.kernel_size, self.stride, self.padding
        return (n, _conv_output_size(h, k, s, p), _conv_output_size(w, k, s, p), self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "conv_impl": self.conv_impl,
            "weight_decay": self.weight_decay,
            "batch_norm": self.batch_norm,
            "activation": self.activation,
        }


class ConvStack(keras.layers.Layer):
    """A sequence of ConvBNReLU, one per entry of `filters`."""

    def __init__(
        self,
        filters: list[int],
        kernel_size: int = 3,
        strides: list[int] | None = None,
        conv_impl: str = "im2col",
        weight_decay: float = 0.0,
        name: str | None = None,
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        strides = [1] * len(filters) if strides is None else list(strides)
        if len(strides) != len(filters):
            raise ValueError(f"got {len(filters)} filters but {len(strides)} strides")
        self.filters = list(filters)
        self.kernel_size = kernel_size
        self.strides = strides
        self.weight_decay = weight_decay
        self.convs = [
            ConvBNReLU(f, kernel_size, s, conv_impl=conv_impl, weight_decay=weight_decay,
                       name=f"conv{i}")
            for i, (f, s) in enumerate(zip(filters, strides))
        ]

    def build(self, input_shape):
        shape = tuple(input_shape)
        for conv in self.convs:
            conv.build(shape)
            shape = conv.compute_output_shape(shape)

    def call(self, x, training=False):
        for conv in self.convs:
            x = conv(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        for conv in self.convs:
            input_shape = conv.compute_output_shape(input_shape)
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "conv_impl": _first_conv_impl(self),
            "weight_decay": self.weight_decay,
        }


class InceptionModule(keras.layers.Layer):
    """GoogLeNet Inception module: four towers concatenated on channels (stride 1, SAME).

    towers = (t1x1, t3x3, t5x5, tpool). Version 2 replaces the 5x5 by two 3x3 convs, as in
    BN-Inception (Ioffe & Szegedy 2015): same receptive field, fewer weights and FLOPs.
    """

    def __init__(
        self,
        version: int,
        towers: tuple[int, int, int, int],
        bottleneck: int,
        conv_impl: str = "im2col",
        weight_decay: float = 0.0,
        name: str | None = None,
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if version not in (1, 2):
            raise ValueError(f"inception version must be 1 or 2, got {version!r}")
        if len(towers) != 4:
            raise ValueError(f"towers must be 4 ints (t1x1, t3x3, t5x5, tpool), got {towers!r}")
        self.version = version
        self.towers = tuple(int(t) for t in towers)
        self.bottleneck = int(bottleneck)
        self.weight_decay = weight_decay
        t1, t3, t5, tp = self.towers

        def conv(filters: int, k: int, name: str) -> ConvBNReLU:
            return ConvBNReLU(filters, k, conv_impl=conv_impl, weight_decay=weight_decay, name=name)

        self.tower_1x1 = [conv(t1, 1, "a_1x1")]
        self.tower_3x3 = [conv(self.bottleneck, 1, "b_1x1"), conv(t3, 3, "b_3x3")]
        if version == 1:
            self.tower_5x5 = [conv(self.bottleneck, 1, "c_1x1"), conv(t5, 5, "c_5x5")]
        else:
            self.tower_5x5 = [
                conv(self.bottleneck, 1, "c_1x1"),
                conv(self.bottleneck, 3, "c_3x3a"),
                conv(t5, 3, "c_3x3b"),
            ]
        self.pool = pool_forms.MaxPool2D(3, strides=1, padding="same", name="d_pool")
        self.tower_pool = [conv(tp, 1, "d_1x1")]

    def build(self, input_shape):
        shape = tuple(input_shape)
        for tower in (self.tower_1x1, self.tower_3x3, self.tower_5x5, self.tower_pool):
            tower_shape = shape
            for layer in tower:
                layer.build(tower_shape)
                tower_shape = layer.compute_output_shape(tower_shape)

    def call(self, x, training=False):
        outputs = []
        for tower, tower_in in (
            (self.tower_1x1, x),
            (self.tower_3x3, x),
            (self.tower_5x5, x),
            (self.tower_pool, self.pool(x)),
        ):
            y = tower_in
            for layer in tower:
                y = layer(y, training=training)
            outputs.append(y)
        return tf.concat(outputs, axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (sum(self.towers),)

    def get_config(self):
        return {
            **super().get_config(),
            "version": self.version,
            "towers": self.towers,
            "bottleneck": self.bottleneck,
            "conv_impl": _first_conv_impl(self),
            "weight_decay": self.weight_decay,
        }


def _inception_constructor(version: int):
    def make(towers: tuple[int, int, int, int], bottleneck: int, conv_impl: str = "im2col",
             weight_decay: float = 0.0, name: str | None = None) -> InceptionModule:
        return InceptionModule(version, towers, bottleneck, conv_impl, weight_decay, name=name)
    make.__name__ = make.__qualname__ = f"inception_v{version}_module"
    make.__doc__ = f"An InceptionModule of version {version} (the seed's inception_v{version}_module)."
    return make


inception_v1_module = _inception_constructor(1)
inception_v2_module = _inception_constructor(2)


def spatial_dropout(keep_prob: float) -> keras.layers.SpatialDropout2D:
    """Dropout of whole channels; neighbouring pixels are too correlated for per-pixel dropout."""
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob!r}")
    return keras.layers.SpatialDropout2D(rate=1.0 - keep_prob)


def _conv_layers(layer: keras.layers.Layer) -> list[ConvBNReLU]:
    every = layer._flatten_layers(include_self=True, recursive=True)
    return [sub for sub in every if isinstance(sub, ConvBNReLU)]


def _first_conv_impl(layer: keras.layers.Layer) -> str:
    convs = _conv_layers(layer)
    return convs[0].conv_impl if convs else "im2col"


def set_conv_impl(model_or_layer: keras.layers.Layer, impl: str) -> int:
    """Sets conv_impl on every ConvBNReLU inside; returns how many were changed.

    Takes effect at the next trace: call it before building a tf.function / model.compile.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
    convs = _conv_layers(model_or_layer)
    for conv in convs:
        conv.conv_impl = impl
    return len(convs)
