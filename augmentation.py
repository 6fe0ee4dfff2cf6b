"""Per-example image preprocessing: random (stateless, seeded) for training, fixed for evaluation.

Every function takes one image of dynamic shape and works inside a `tf.data` map (graph mode).
Randomness comes only from the `seed` tensor passed in, so a given seed always gives the same
output: a training run can be replayed exactly, and a test can pin an augmentation.
The cfg keys (image_size, channels, scale_min, ..., noise_std) are config.cfg's: every one must be
there, so a config built by hand that forgets one fails with a KeyError instead of a silent default.
"""

import math
from typing import Any, Mapping

import tensorflow as tf

# One sub-seed per random op, so switching one op on or off leaves the draws of the others alone.
# New ops go at the end: stateless_split's first outputs do not depend on `num`.
_SCALE, _CROP, _FLIP, _BRIGHTNESS, _CONTRAST, _ANGLE, _SHIFT, _NOISE, _FLIP_UD = range(9)
_NUM_OPS = 9


def base_short_side(cfg: Mapping[str, Any]) -> int:
    """Short side that images are decoded to: big enough for the largest train scale and for eval."""
    size = int(cfg["image_size"])
    scale = max(float(cfg["scale_max"]), float(cfg["eval_scale"]), 1.0)
    # round() first: 100 * 1.1 is 110.00000000000001 in floating point, and ceil would make it 111.
    return math.ceil(round(size * scale, 6))


CROP_MODES = ("center", "squash")


def _resize_to(image: tf.Tensor, new_h: tf.Tensor, new_w: tf.Tensor) -> tf.Tensor:
    """Resizes a float [H,W,C] image to new_h x new_w; a no-op when it already has that size."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    new_size = tf.stack([new_h, new_w])

    def resize() -> tf.Tensor:
        # Images arrive already decoded to base_short_side, so what is left is a downscale of at
        # most scale_max / scale_min (1.25 by default). Plain bilinear is ~10x faster than
        # antialiased there and aliases little below 2x; big images passed in directly still
        # get antialiasing.
        return tf.cond(
            # Per axis: a squash can shrink the long side 3x while the short side stays.
            tf.logical_or(h > 2 * new_h, w > 2 * new_w),
            lambda: tf.image.resize(image, new_size, antialias=True),
            lambda: tf.image.resize(image, new_size),
        )

    # Skipping the no-op resize keeps an already-sized image bit-exact (and saves the work).
    return tf.cond(tf.logical_and(tf.equal(new_h, h), tf.equal(new_w, w)), lambda: image, resize)


def _resize_short_side(image: tf.Tensor, short: tf.Tensor) -> tf.Tensor:
    """Resizes a float [H,W,C] image so that its short side is `short`, aspect kept."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short = tf.cast(short, tf.int32)
    hf, wf, sf = tf.cast(h, tf.float32), tf.cast(w, tf.float32), tf.cast(short, tf.float32)
    long_h = tf.cast(tf.round(hf * sf / wf), tf.int32)
    long_w = tf.cast(tf.round(wf * sf / hf), tf.int32)
    return _resize_to(image, tf.where(h <= w, short, long_h), tf.where(h <= w, long_w, short))


def _resize(image: tf.Tensor, short: tf.Tensor, crop_mode: str) -> tf.Tensor:
    """center: short side to `short`, aspect kept (the crop that follows cuts the long side);
    squash: the whole image to short x short, aspect changed (nothing is cut but the scale margin)."""
    if crop_mode == "squash":
        short = tf.cast(short, tf.int32)
        return _resize_to(image, short, short)
    return _resize_short_side(image, short)


def _to_unit_float(image: tf.Tensor, channels: int) -> tf.Tensor:
    image = tf.image.convert_image_dtype(image, tf.float32)  # uint8 0..255 -> float 0..1
    if channels == 1:
        image = tf.image.rgb_to_grayscale(image)
    return image


def affine_transform(image: tf.Tensor, angle: tf.Tensor, dx: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    """Rotates a float [H,W,C] image by `angle` radians (counter-clockwise, about its centre),
    then shifts it by (dx, dy) pixels; uncovered pixels are filled by reflection."""
    shape = tf.shape(image)
    hf, wf = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    angle, dx, dy = (tf.cast(t, tf.float32) for t in (angle, dx, dy))
    cx, cy = (wf - 1.0) / 2.0, (hf - 1.0) / 2.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    # The transform maps each output pixel (x, y) back to the input point it samples:
    # in = R(angle) @ (out - centre - shift) + centre.
    transform = tf.stack([
        cos, -sin, cx - cos * (cx + dx) + sin * (cy + dy),
        sin, cos, cy - sin * (cx + dx) - cos * (cy + dy),
        0.0, 0.0,
    ])[tf.newaxis]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[tf.newaxis],
        transforms=transform,
        output_shape=shape[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
    return out[0]


def train_preprocess(
    image: tf.Tensor, cfg: Mapping[str, Any], seed: tf.Tensor, standardize: bool = True
) -> tf.Tensor:
    """Random scale + crop, flip, colour jitter and optional rotate/shift/noise of a uint8 [H,W,3]
    image; returns float32 [S,S,C], per-image standardized (or in 0..1 if `standardize` is False)."""
    size = int(cfg["image_size"])
    channels = int(cfg["channels"])
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=_NUM_OPS)

    image = _to_unit_float(image, channels)
    u = tf.random.stateless_uniform(
        [], seeds[_SCALE], minval=float(cfg["scale_min"]), maxval=float(cfg["scale_max"])
    )
    # A short side below S would leave nothing to crop from.
    short = tf.maximum(size, tf.cast(tf.round(size * u), tf.int32))
    image = _resize(image, short, cfg["crop_mode"])
    image = tf.image.stateless_random_crop(image, [size, size, channels], seeds[_CROP])
    if cfg["flip_lr"]:
        image = tf.image.stateless_random_flip_left_right(image, seeds[_FLIP])
    flip_ud = float(cfg["flip_ud"])
    if flip_ud > 0:
        flip = tf.random.stateless_uniform([], seeds[_FLIP_UD]) < flip_ud
        image = tf.cond(flip, lambda: tf.image.flip_up_down(image), lambda: image)

    rotate_deg, shift_frac = float(cfg["rotate_deg"]), float(cfg["shift_frac"])
    if rotate_deg > 0 or shift_frac > 0:
        max_angle = math.radians(rotate_deg)
        angle = tf.random.stateless_uniform([], seeds[_ANGLE], -max_angle, max_angle)
        max_shift = shift_frac * size
        shift = tf.random.stateless_uniform([2], seeds[_SHIFT], -max_shift, max_shift)
        image = affine_transform(image, angle, shift[0], shift[1])

    # Colour jitter must come before standardization: per_image_standardization removes any
    # uniform brightness shift and contrast scale, so jitter applied after it would do nothing
    # (the mistake users reported in the CIFAR-10 tutorial). Clipping to 0..1 is what makes a
    # brightness change survive standardization: bright pixels saturate.
    brightness, contrast = float(cfg["brightness"]), float(cfg["contrast"])
    if brightness > 0:
        image = tf.image.stateless_random_brightness(image, brightness, seeds[_BRIGHTNESS])
    if contrast > 0:
        image = tf.image.stateless_random_contrast(
            image, max(0.0, 1.0 - contrast), 1.0 + contrast, seeds[_CONTRAST]
        )
    noise_std = float(cfg["noise_std"])
    if noise_std > 0:
        image += noise_std * tf.random.stateless_normal(tf.shape(image), seeds[_NOISE])
    image = tf.clip_by_value(image, 0.0, 1.0)

    image = tf.ensure_shape(image, [size, size, channels])
    return tf.image.per_image_standardization(image) if standardize else image


def eval_preprocess(image: tf.Tensor, cfg: Mapping[str, Any], standardize: bool = True) -> tf.Tensor:
    """Resize (crop_mode) to a short side of round(S * eval_scale), central S x S crop, per-image
    standardization."""
    size = int(cfg["image_size"])
    channels = int(cfg["channels"])
    image = _to_unit_float(image, channels)
    short = max(size, round(size * float(cfg["eval_scale"])))
    image = _resize(image, short, cfg["crop_mode"])
    shape = tf.shape(image)
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    image = image[top:top + size, left:left + size]
    image = tf.ensure_shape(image, [size, size, channels])
    return tf.image.per_image_standardization(image) if standardize else image
