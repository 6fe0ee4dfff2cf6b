"""The seed network from stock Keras 3 layers: what hw2 is compared with in the benches.

Conv2D + BatchNormalization + ReLU where hw2 has its own im2col convolution and fused batch norm;
the same widths, pools, dropouts and L2 as hw2.HW2Net for a given config.
"""
from __future__ import annotations

from typing import Mapping


def seed_network(cfg: Mapping, num_classes: int, rescale: float | None = None):
    """A functional keras.Model of the seed network on image_size x image_size x 3 inputs, first
    multiplied by `rescale` if given (1/255 for image_dataset_from_directory's 0-255 pixels)."""
    import keras
    from keras import layers
    wd = cfg["weight_decay"]
    reg = keras.regularizers.L2(wd) if wd else None

    def conv(x, filters, k, stride=1):
        x = layers.Conv2D(filters, k, stride, padding="same", use_bias=False, kernel_initializer="he_normal",
                          kernel_regularizer=reg if cfg["l2_on"] == "all" else None)(x)
        x = layers.BatchNormalization(momentum=0.99, epsilon=1e-3)(x)
        return layers.ReLU()(x)

    def inception(x, towers, bottleneck):
        t1, t3, t5, tp = towers
        a = conv(x, t1, 1)
        b = conv(conv(x, bottleneck, 1), t3, 3)
        c = conv(conv(conv(x, bottleneck, 1), bottleneck, 3), t5, 3)
        d = conv(layers.MaxPooling2D(3, 1, padding="same")(x), tp, 1)
        return layers.Concatenate()([a, b, c, d])

    s = cfg["image_size"]
    inputs = keras.Input((s, s, 3))
    x = layers.Rescaling(rescale)(inputs) if rescale else inputs
    for f in cfg["conv_stack"]:
        x = conv(x, f, 3)
    x = layers.MaxPooling2D(3, 2, padding="same")(conv(x, cfg["conv2"], 3, 2))
    x = inception(x, cfg["inception2"], cfg["inception2_bottleneck"])
    x = layers.SpatialDropout2D(1 - cfg["keep_prob_1"])(layers.MaxPooling2D(3, 2, padding="same")(x))
    x = inception(x, cfg["inception3"], cfg["inception3_bottleneck"])
    x = layers.SpatialDropout2D(1 - cfg["keep_prob_2"])(layers.MaxPooling2D(3, 2, padding="same")(x))
    x = layers.Dense(cfg["dense_units"], use_bias=False, kernel_initializer="he_normal",
                     kernel_regularizer=reg)(layers.Flatten()(x))
    x = layers.Dropout(1 - cfg["keep_prob_dense"])(layers.ReLU()(layers.BatchNormalization()(x)))
    return keras.Model(inputs, layers.Dense(num_classes, dtype="float32")(x))
