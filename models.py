"""The model zoo: classic small networks on our convolution, picked by config key `model`.

Every convolution is a `layers.ConvBNReLU` (wrapped in `ConvNorm` for the norm choice), so
`conv_impl` and `layers.set_conv_impl` apply to every model here as they do to the seed network.
The resnets' and vggs' conv widths scale with `width` (simple_cnn and cifar10_tutorial keep their
published widths); `norm` (batch|instance|none) applies to every convolution.

    cifar10_tutorial  conv 5x5*64, pool 3/2, LRN, conv 5x5*64, LRN, pool 3/2, fc 384, fc 192
    resnet14|18|34    basic blocks in four stages: 1-2-2-1 | 2-2-2-2 | 3-4-6-3 (He et al. 2016)
    vgg10|12|15|18    layer lists A | B | D | E (Simonyan & Zisserman 2015), then global average
                      pooling and two hidden fc layers of `fc_units`
    simple_cnn        conv 3x3*8, pool, conv 3x3*16, pool, fc `fc_units` (4096), logits
"""
from __future__ import annotations

from typing import Mapping

import keras
import tensorflow as tf

import pool_forms
from layers import ConvBNReLU

NORMS = ("batch", "instance", "none")

# 14 keeps ResNet-18's four stages with one block fewer in the first and last: 1 + 2*6 + 1 layers.
RESNET_BLOCKS = {"resnet14": (1, 2, 2, 1), "resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}

# Integers are 3x3 conv widths, "M" a 2x2/2 max-pool. The names are the seed reports' layer counts.
VGG_LAYERS = {
    "vgg10": [64, "M", 128, 256, 256, "M"] + [512] * 4,                           # A
    "vgg12": [64, 64, "M", 128, 128, 256, 256, "M"] + [512] * 4,                  # B
    "vgg15": [64, 64, "M", 128, 128] + [256] * 3 + ["M"] + [512] * 5,             # D
    "vgg18": [64, 64, "M", 128, 128, "M"] + [256] * 4 + [512] * 7,                # E
}

ZOO = ("cifar10_tutorial", "simple_cnn", *RESNET_BLOCKS, *VGG_LAYERS)

# The config keys that shape only some networks, and which network reads which.
SEED_KEYS = ("conv_stack", "conv2", "inception_version", "inception2", "inception2_bottleneck", "inception3",
             "inception3_bottleneck", "dense_units", "keep_prob_1", "keep_prob_2", "keep_prob_dense")
ZOO_KEYS = ("norm", "residual", "stem", "stem_pool", "width", "fc_units", "dropout")
READS = {"hw2_inception": SEED_KEYS, "cifar10_tutorial": ("norm",), "simple_cnn": ("norm", "fc_units", "dropout"),
         **{name: ("norm", "residual", "stem", "stem_pool", "width", "dropout") for name in RESNET_BLOCKS},
         **{name: ("norm", "width", "fc_units", "dropout") for name in VGG_LAYERS}}


def ignored_settings(cfg: Mapping) -> list[str]:
    """`key=value` of each network key set away from its default that cfg["model"] does not read."""
    import config_keys
    unread = [k for k in SEED_KEYS + ZOO_KEYS if k not in READS[cfg["model"]]]
    return [f"{k}={cfg[k]}" for k in unread if cfg[k] != config_keys.KEYS[k].default]


def scaled(filters: int, width: float) -> int:
    """A layer width times the `width` multiplier, at least 1."""
    return max(1, int(round(filters * width)))


def _l2(weight_decay: float):
    return keras.regularizers.L2(weight_decay) if weight_decay > 0 else None


def _dense(units: int, weight_decay: float, name: str, logits: bool = False) -> keras.layers.Dense:
    return keras.layers.Dense(units, name=name, kernel_initializer="glorot_uniform" if logits else "he_normal",
                              kernel_regularizer=_l2(weight_decay), dtype="float32" if logits else None)


class ConvNorm(keras.layers.Layer):
    """Our convolution, then batch | instance | no normalization, then an optional ReLU.

    With norm=none (and instance) the convolution keeps its bias; under instance norm that bias
    is cancelled by the per-channel mean, a few wasted parameters kept for simplicity.
    """

    def __init__(self, filters: int, kernel_size: int = 3, stride: int = 1, norm: str = "batch",
                 conv_impl: str = "im2col", weight_decay: float = 0.0, activation: bool = True,
                 name: str | None = None, **kwargs):
        super().__init__(name=name, **kwargs)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.activation = activation
        self.conv = ConvBNReLU(filters, kernel_size, stride, conv_impl=conv_impl, weight_decay=weight_decay,
                               batch_norm=norm == "batch", activation=False, name="conv")
        # GroupNormalization with one group per channel is instance normalization.
        self.instance_norm = (keras.layers.GroupNormalization(groups=filters, epsilon=1e-3, name="instance_norm")
                              if norm == "instance" else None)

    def build(self, input_shape):
        self.conv.build(input_shape)
        if self.instance_norm is not None:
            self.instance_norm.build(self.conv.compute_output_shape(input_shape))

    def call(self, x, training=False):
        y = self.conv(x, training=training)
        if self.instance_norm is not None:
            y = self.instance_norm(y)
        return tf.nn.relu(y) if self.activation else y

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)


def _conv_args(cfg: Mapping) -> dict:
    # l2_on = dense: L2 on the fully connected layers only, as the seed and the CIFAR-10 tutorial.
    wd = cfg["weight_decay"] if cfg["l2_on"] == "all" else 0.0
    return {"norm": cfg["norm"], "conv_impl": cfg["conv_impl"], "weight_decay": wd}


class BasicBlock(keras.layers.Layer):
    """Two 3x3 convs; with `residual`, plus the input (1x1 projection when the shape changes)."""

    def __init__(self, filters: int, stride: int, residual: bool, project: bool, name: str | None = None,
                 **conv):
        super().__init__(name=name)
        self.residual = residual
        self.conv1 = ConvNorm(filters, 3, stride, name="conv1", **conv)
        self.conv2 = ConvNorm(filters, 3, 1, activation=False, name="conv2", **conv)
        self.shortcut = (ConvNorm(filters, 1, stride, activation=False, name="shortcut", **conv)
                         if residual and project else None)

    def build(self, input_shape):
        self.conv1.build(input_shape)
        self.conv2.build(self.conv1.compute_output_shape(input_shape))
        if self.shortcut is not None:
            self.shortcut.build(input_shape)

    def call(self, x, training=False):
        y = self.conv2(self.conv1(x, training=training), training=training)
        if self.residual:
            y = y + (x if self.shortcut is None else self.shortcut(x, training=training))
        return tf.nn.relu(y)

    def compute_output_shape(self, input_shape):
        return self.conv1.compute_output_shape(input_shape)


class ResNet(keras.Model):
    """Stem (7x7/2 or 3x3/1, optional 3x3/2 max-pool), four stages of basic blocks, global
    average pooling, dropout, logits. Stage widths 64, 128, 256, 512 times `width`."""

    def __init__(self, cfg: Mapping, num_classes: int, blocks: tuple[int, ...], **kwargs):
        super().__init__(**kwargs)
        conv = _conv_args(cfg)
        widths = [scaled(64 * 2 ** i, cfg["width"]) for i in range(4)]
        k, s = (7, 2) if cfg["stem"] == "7x7" else (3, 1)
        self.stem = ConvNorm(widths[0], k, s, name="stem", **conv)
        self.stem_pool = pool_forms.MaxPool2D(3, 2, padding="same") if cfg["stem_pool"] else None
        self.blocks, cin = [], widths[0]
        for stage, (n, w) in enumerate(zip(blocks, widths)):
            for b in range(n):
                stride = 2 if stage > 0 and b == 0 else 1
                self.blocks.append(BasicBlock(w, stride, cfg["residual"], stride != 1 or cin != w,
                                              name=f"stage{stage + 1}_block{b + 1}", **conv))
                cin = w
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.dropout = keras.layers.Dropout(cfg["dropout"])
        self.logits = _dense(num_classes, cfg["weight_decay"], "logits", logits=True)

    def call(self, images, training=False):
        x = self.stem(images, training=training)
        self.taps = {"stem": x}  # each stage's output, for the activation histograms
        if self.stem_pool is not None:
            x = self.stem_pool(x)
        for block in self.blocks:
            x = block(x, training=training)
            self.taps[block.name.split("_")[0]] = x
        return self.logits(self.dropout(self.pool(x), training=training))


class VGG(keras.Model):
    """3x3 convs and max-pools from a layer list, global average pooling, two hidden fc layers
    of `fc_units` with dropout, logits."""

    def __init__(self, cfg: Mapping, num_classes: int, layer_list: list, **kwargs):
        super().__init__(**kwargs)
        conv, wd = _conv_args(cfg), cfg["weight_decay"]
        self.features = []
        for i, item in enumerate(layer_list):
            if item == "M":
                self.features.append(pool_forms.MaxPool2D(2, 2, padding="same", name=f"pool{i}"))
            else:
                self.features.append(ConvNorm(scaled(item, cfg["width"]), 3, name=f"conv{i}", **conv))
        # Global average pooling (adaptive pooling to 1x1) lets any input size reach the classifier.
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.fc1 = _dense(cfg["fc_units"], wd, "fc1")
        self.fc2 = _dense(cfg["fc_units"], wd, "fc2")
        self.drop1 = keras.layers.Dropout(cfg["dropout"])
        self.drop2 = keras.layers.Dropout(cfg["dropout"])
        self.logits = _dense(num_classes, wd, "logits", logits=True)

    def call(self, images, training=False):
        x = images
        for layer in self.features:
            x = layer(x, training=training) if isinstance(layer, ConvNorm) else layer(x)
        fc1 = tf.nn.relu(self.fc1(self.pool(x)))
        fc2 = tf.nn.relu(self.fc2(self.drop1(fc1, training=training)))
        self.taps = {"features": x, "fc1": fc1, "fc2": fc2}  # for the activation histograms
        return self.logits(self.drop2(fc2, training=training))


class SimpleCNN(keras.Model):
    """conv 3x3*8, max-pool 2/2, conv 3x3*16, max-pool 2/2, fc `fc_units`, dropout, logits."""

    def __init__(self, cfg: Mapping, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        conv, wd = _conv_args(cfg), cfg["weight_decay"]
        self.conv1 = ConvNorm(8, 3, name="conv1", **conv)
        self.conv2 = ConvNorm(16, 3, name="conv2", **conv)
        self.pool1 = pool_forms.MaxPool2D(2, 2, padding="same")
        self.pool2 = pool_forms.MaxPool2D(2, 2, padding="same")
        self.flatten = keras.layers.Flatten()
        self.fc = _dense(cfg["fc_units"], wd, "fc")
        self.dropout = keras.layers.Dropout(cfg["dropout"])
        self.logits = _dense(num_classes, wd, "logits", logits=True)

    def call(self, images, training=False):
        conv1 = self.conv1(images, training=training)
        conv2 = self.conv2(self.pool1(conv1), training=training)
        fc = tf.nn.relu(self.fc(self.flatten(self.pool2(conv2))))
        self.taps = {"conv1": conv1, "conv2": conv2, "fc": fc}  # for the activation histograms
        return self.logits(self.dropout(fc, training=training))


class Cifar10Tutorial(keras.Model):
    """The TensorFlow CIFAR-10 tutorial network; weight decay on the fc layers only, as there."""

    def __init__(self, cfg: Mapping, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        conv = {**_conv_args(cfg), "weight_decay": 0.0}
        wd = cfg["weight_decay"]
        self.conv1 = ConvNorm(64, 5, name="conv1", **conv)
        self.conv2 = ConvNorm(64, 5, name="conv2", **conv)
        self.pool1 = pool_forms.MaxPool2D(3, 2, padding="same")
        self.pool2 = pool_forms.MaxPool2D(3, 2, padding="same")
        self.flatten = keras.layers.Flatten()
        self.fc1 = _dense(384, wd, "local3")
        self.fc2 = _dense(192, wd, "local4")
        self.logits = _dense(num_classes, 0.0, "softmax_linear", logits=True)

    @staticmethod
    def _lrn(x):
        # The tutorial's constants (cifar10.py, norm1/norm2).
        return tf.nn.local_response_normalization(x, depth_radius=4, bias=1.0, alpha=0.001 / 9.0, beta=0.75)

    def call(self, images, training=False):
        conv1 = self.conv1(images, training=training)
        conv2 = self.conv2(self._lrn(self.pool1(conv1)), training=training)
        local3 = tf.nn.relu(self.fc1(self.flatten(self.pool2(self._lrn(conv2)))))
        local4 = tf.nn.relu(self.fc2(local3))
        # The tutorial's activation summaries, for the histograms.
        self.taps = {"conv1": conv1, "conv2": conv2, "local3": local3, "local4": local4}
        return self.logits(local4)


def create(cfg: Mapping, num_classes: int) -> keras.Model:
    """The zoo model named by cfg["model"] (unbuilt: hw2.build_model calls it once)."""
    name = cfg["model"]
    if name in RESNET_BLOCKS:
        return ResNet(cfg, num_classes, RESNET_BLOCKS[name], name=name)
    if name in VGG_LAYERS:
        return VGG(cfg, num_classes, VGG_LAYERS[name], name=name)
    if name == "simple_cnn":
        return SimpleCNN(cfg, num_classes, name=name)
    if name == "cifar10_tutorial":
        return Cifar10Tutorial(cfg, num_classes, name=name)
    raise ValueError(f"unknown model {name!r}; the zoo has {', '.join(ZOO)}")
