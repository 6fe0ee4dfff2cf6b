"""tf.data pipelines that read `DATA_DIR/<class>/<image>` files for training and evaluation."""

import logging
import os
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from augmentation import base_short_side, eval_preprocess, train_preprocess
from hw2_dataset import read_image
from utils import UserError

log = logging.getLogger(__name__)

# Paths already reported as unreadable: a streamed (uncached) dataset re-reads them every epoch,
# and one warning per file is enough.
_reported_bad: set[str] = set()


def _read_or_skip(path: bytes, short_side: int) -> tuple[np.ndarray, bool]:
    """Runs in tf.data worker threads; a file that fails to decode becomes (empty image, False)
    so one deleted or corrupt file cannot stop a run that has been training for hours."""
    name = os.fsdecode(path)
    try:
        return read_image(name, short_side=int(short_side)), np.bool_(True)
    except (ValueError, OSError) as e:
        if name not in _reported_bad:
            _reported_bad.add(name)
            # read_image's messages start with the path already.
            log.warning("skipping unreadable image %s: %s", name, str(e).removeprefix(f"{name}: "))
        return np.zeros((0, 0, 3), np.uint8), np.bool_(False)


def _decode(files: tf.data.Dataset, cfg: Mapping[str, Any]) -> tf.data.Dataset:
    """(path, label) -> (uint8 image [H,W,3], int32 label), unreadable files dropped."""
    short_side = base_short_side(cfg)

    def read(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        # PIL releases the GIL while decoding, so parallel calls really do run on several cores.
        image, ok = tf.numpy_function(
            _read_or_skip, [path, short_side], [tf.uint8, tf.bool], stateful=False
        )
        image.set_shape([None, None, 3])
        ok.set_shape([])
        return image, label, ok

    return (
        files.map(read, num_parallel_calls=tf.data.AUTOTUNE)
        .filter(lambda image, label, ok: ok)
        .map(lambda image, label, ok: (image, label))
    )


def _file_list(data_dir: str, items: list[tuple[str, int]]) -> tf.data.Dataset:
    if not items:
        raise UserError(f"no images to read in {data_dir}")
    paths = [os.path.join(data_dir, path) for path, _ in items]
    labels = np.array([label for _, label in items], np.int32)
    return tf.data.Dataset.from_tensor_slices((paths, labels))


def _fits_in_cache(num_images: int, cfg: Mapping[str, Any]) -> bool:
    """Whether the decoded images fit under cache_images_mb; 1.5 allows for non-square images."""
    side = base_short_side(cfg)
    estimate = num_images * side * side * 1.5 * 3
    return estimate < float(cfg.get("cache_images_mb", 1024)) * 2**20


def decode_dataset(data_dir: str, items: list[tuple[str, int]], cfg: Mapping[str, Any]) -> tf.data.Dataset:
    """(uint8 image [H,W,3] with short side base_short_side(cfg), int32 label), in `items` order;
    unreadable files are skipped with a logged warning."""
    return _decode(_file_list(data_dir, items), cfg)


def train_dataset(
    data_dir: str,
    items: list[tuple[str, int]],
    cfg: Mapping[str, Any],
    batch_size: int,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """Endless shuffled, augmented batches of (float32 [B,S,S,C], int32 [B]) with a static batch size.

    With `input_context` (from `strategy.distribute_datasets_from_function`) this pipeline reads
    only its shard of the files and `batch_size` is the global batch, split across replicas."""
    seed = int(cfg.get("seed", 0))
    files = _file_list(data_dir, items)
    pipeline_id, num_pipelines = 0, 1
    if input_context is not None:
        pipeline_id, num_pipelines = input_context.input_pipeline_id, input_context.num_input_pipelines
        batch_size = input_context.get_per_replica_batch_size(batch_size)
        # Shard file names, not images, so that each pipeline decodes only its own files.
        files = files.shard(num_pipelines, pipeline_id)
    num_files = len(range(pipeline_id, len(items), num_pipelines))

    if _fits_in_cache(num_files, cfg):
        # `items` usually come grouped by class; a shuffle buffer smaller than the dataset would
        # then serve one class at a time. Shuffling the names once before caching fixes that,
        # and the buffer shuffle below varies the order from epoch to epoch.
        files = files.shuffle(num_files, seed=seed, reshuffle_each_iteration=False)
        ds = _decode(files, cfg).cache()
        ds = ds.shuffle(min(int(cfg.get("shuffle_buffer", 2048)), num_files), seed=seed)
    else:
        # Streaming: shuffling the names instead of the decoded images gives a full shuffle of
        # the whole dataset for the memory of a list of strings.
        ds = _decode(files.shuffle(num_files, seed=seed), cfg)
    ds = ds.repeat()

    def augment(index: tf.Tensor, example: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        image, label = example
        # A distinct stateless seed per example (and per pipeline): augmentations are a function
        # of (cfg seed, position in the stream), so a run can be replayed.
        example_seed = tf.stack([tf.constant(seed, tf.int64), index * num_pipelines + pipeline_id])
        return train_preprocess(image, cfg, example_seed), label

    ds = ds.enumerate().map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    options = tf.data.Options()
    # Letting parallel maps emit whichever element is ready first avoids stalls behind one slow
    # image; the cost is that batch contents vary between runs with the same seed.
    options.deterministic = bool(cfg.get("deterministic", False))
    return ds.with_options(options)


def eval_dataset(
    data_dir: str,
    items: list[tuple[str, int]],
    cfg: Mapping[str, Any],
    batch_size: int,
    num_examples: int | None = None,
) -> tf.data.Dataset:
    """Every example of `items` (or of its first `num_examples`) exactly once, in order, as
    (float32 [b,S,S,C], int32 [b]) batches; the last batch may be smaller."""
    if num_examples is not None:
        items = items[:num_examples]
    ds = decode_dataset(data_dir, items, cfg)
    if _fits_in_cache(len(items), cfg):
        ds = ds.cache()
    ds = ds.map(lambda image, label: (eval_preprocess(image, cfg), label),
                num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    # Results are reported per example and in order, whatever the train setting says.
    options.deterministic = True
    return ds.batch(batch_size, drop_remainder=False).prefetch(tf.data.AUTOTUNE).with_options(options)
