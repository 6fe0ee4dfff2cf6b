"""Batch mixing for training: mixup and cutmix, each example paired with its mirror in the batch.

Why: on a small folder a time budget buys hundreds of epochs, and even with strong augmentation
the network memorizes its photos (train top-1 0.99 while val stays near 0.83, bench/README.md).
A mixed batch is new at every step. The batch arrives shuffled, so pairing example i with
example B-1-i (the batch reversed) is a random pairing at no cost.
Randomness is stateless, a function of (seed, step) only: a resumed run mixes as the original would.
"""
from __future__ import annotations

import tensorflow as tf

MODES = ("none", "mixup", "cutmix")


def mix_weight(alpha: float, seed: tf.Tensor) -> tf.Tensor:
    """lam ~ Beta(alpha, alpha), folded to lam >= 0.5 so that each example stays the larger part
    of its mix (its own label is then the one train top-1 counts)."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    g = [tf.random.stateless_gamma([], seeds[i], alpha) for i in range(2)]
    lam = g[0] / tf.maximum(g[0] + g[1], 1e-12)
    return tf.maximum(lam, 1.0 - lam)


def _box_mask(height: tf.Tensor, width: tf.Tensor, cut: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """bool [H, W]: a box of sides cut*H x cut*W centred at a uniform random pixel, clipped to the image."""
    centre = tf.random.stateless_uniform([2], seed, 0.0, 1.0)
    hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    y0 = tf.clip_by_value(tf.round(centre[0] * hf - cut * hf / 2), 0.0, hf)
    y1 = tf.clip_by_value(tf.round(centre[0] * hf + cut * hf / 2), 0.0, hf)
    x0 = tf.clip_by_value(tf.round(centre[1] * wf - cut * wf / 2), 0.0, wf)
    x1 = tf.clip_by_value(tf.round(centre[1] * wf + cut * wf / 2), 0.0, wf)
    rows = tf.range(hf)[:, tf.newaxis]
    cols = tf.range(wf)[tf.newaxis, :]
    return (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)


def mix_batch(images: tf.Tensor, labels: tf.Tensor, mode: str, alpha: float,
              seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(mixed images, partner labels, lam) for a float [B,H,W,C] batch; the loss target of example
    i is lam * its label + (1 - lam) * partner label i.

    mixup: every pixel is lam * image + (1 - lam) * partner. cutmix: a box of the partner is pasted
    in, and lam is the share of the image left uncovered (after clipping at the border).
    `seed` is an int64 [2] tensor, e.g. (cfg seed, step).
    """
    if mode not in MODES[1:]:
        raise ValueError(f"mix mode {mode!r}: expected one of {MODES[1:]}")
    weight_seed, box_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    lam = mix_weight(alpha, weight_seed)
    partner_images, partner_labels = tf.reverse(images, [0]), tf.reverse(labels, [0])
    if mode == "mixup":
        mixed = lam * images + (1.0 - lam) * partner_images
        return mixed, partner_labels, lam
    shape = tf.shape(images)
    mask = _box_mask(shape[1], shape[2], tf.sqrt(1.0 - lam), box_seed)
    mixed = tf.where(mask[tf.newaxis, :, :, tf.newaxis], partner_images, images)
    covered = tf.reduce_mean(tf.cast(mask, tf.float32))
    return mixed, partner_labels, 1.0 - covered
