"""tf.data pipelines that read `DATA_DIR/<class>/<image>` files for training and evaluation.

Every cfg key used here must be present (a config from utils.load_config has them all): a missing
key raises KeyError instead of silently falling back to a default that may differ from config.cfg.
"""

import logging
import os
import random
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

import decode_cache
import decode_store
import utils
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


def _streamed_reader(data_dir: str, cfg: Mapping[str, Any]):
    """What reads an image of a set too big for RAM: the on-disk store of decoded images
    (decode_store.py: each image decoded once, then read back), or a decode every time."""
    if cfg["decode_cache"]:
        return decode_store.open_store(data_dir, base_short_side(cfg), _read_or_skip).get
    return _read_or_skip


def _decode(files: tf.data.Dataset, cfg: Mapping[str, Any], reader=_read_or_skip) -> tf.data.Dataset:
    """(path, label) -> (uint8 image [H,W,3], int32 label), unreadable files dropped."""
    return _decode_all(files, cfg, reader).filter(_is_ok).map(_drop_ok)


def _decode_all(files: tf.data.Dataset, cfg: Mapping[str, Any], reader=_read_or_skip) -> tf.data.Dataset:
    """(path, label) -> (uint8 image [H,W,3], int32 label, ok), in order; unreadable: ok False."""
    short_side = base_short_side(cfg)

    def read(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        # PIL releases the GIL while decoding, so parallel calls really do run on several cores.
        image, ok = tf.numpy_function(reader, [path, short_side], [tf.uint8, tf.bool], stateful=False)
        image.set_shape([None, None, 3])
        ok.set_shape([])
        return image, label, ok

    return files.map(_plain(read), num_parallel_calls=tf.data.AUTOTUNE)


def _paths(data_dir: str, items: list[tuple[str, int]]) -> list[bytes]:
    # As bytes: a file name that is not valid UTF-8 comes from os.scandir as a str with surrogate
    # escapes, which tf.constant cannot encode; os.fsencode restores the bytes on disk.
    return [os.fsencode(os.path.join(data_dir, path)) for path, _ in items]


def _file_list(data_dir: str, items: list[tuple[str, int]]) -> tf.data.Dataset:
    if not items:
        raise UserError(f"no images to read in {data_dir}")
    paths = _paths(data_dir, items)
    labels = np.array([label for _, label in items], np.int32)
    return tf.data.Dataset.from_tensor_slices((paths, labels))


def _fits_in_cache(num_images: int, cfg: Mapping[str, Any]) -> bool:
    """Whether the decoded images fit under cache_images_mb; 1.5 allows for non-square images."""
    side = base_short_side(cfg)
    estimate = num_images * side * side * 1.5 * 3
    return estimate < float(cfg["cache_images_mb"]) * 2**20


def decode_dataset(data_dir: str, items: list[tuple[str, int]], cfg: Mapping[str, Any],
                   reader=_read_or_skip) -> tf.data.Dataset:
    """(uint8 image [H,W,3] with short side base_short_side(cfg), int32 label), in `items` order;
    unreadable files are skipped with a logged warning."""
    return _decode(_file_list(data_dir, items), cfg, reader)


def _preload(data_dir: str, items: list[tuple[str, int]], cfg: Mapping[str, Any], what: str = "training"):
    """Decode every image once (in parallel) into one flat uint8 buffer with offsets and shapes,
    so the train pipeline can fetch any image by index in pure TensorFlow, without the GIL.
    Images decoded by an earlier run come from the decoded-image cache (decode_cache.py).
    Unreadable files are left out; none readable stops a training run, and is an empty set else."""
    import time
    t = time.time()
    short_side = base_short_side(cfg)
    cached = decode_cache.load(data_dir, short_side) if cfg["decode_cache"] else {}
    stamps = [decode_cache.file_stamp(os.path.join(data_dir, path)) for path, _ in items]
    images = {i: cached[path][1] for i, (path, _) in enumerate(items)
              if stamps[i] is not None and path in cached and cached[path][0] == stamps[i]}
    missing = [i for i in range(len(items)) if i not in images]
    if missing:
        decoded = _decode_all(_file_list(data_dir, [items[i] for i in missing]), cfg).as_numpy_iterator()
        for i, (image, _, ok) in zip(missing, utils.progress(decoded, len(missing), "images",
                                                            f"decoding the {what} images into RAM")):
            if ok:
                images[i] = image
                if stamps[i] is not None:
                    cached[items[i][0]] = (stamps[i], image)
        if cfg["decode_cache"] and len(images) > len(items) - len(missing):
            decode_cache.save(data_dir, short_side, decode_cache.still_current(data_dir, cached))
    if not images and what == "training":
        raise UserError(f"none of the {len(items)} training images in {data_dir} could be read")
    order = sorted(images)
    sizes = [images[i].size for i in order]
    if len(items) > 256:
        log.info("%s images in RAM: %d (%.0f MiB) in %.1fs; %d from the decoded-image cache %s", what,
                 len(order), sum(sizes) / 2**20, time.time() - t, len(items) - len(missing),
                 decode_cache.folder() if len(missing) < len(items) else "(none)")
    return (tf.constant(np.concatenate([images[i].ravel() for i in order] + [np.zeros(0, np.uint8)])),
            tf.constant(np.cumsum([0] + sizes), tf.int64),
            tf.constant(np.array([images[i].shape for i in order], np.int32).reshape(-1, 3)),
            np.array([items[i][1] for i in order], np.int32))


def _ram_image(flat: tf.Tensor, offsets: tf.Tensor, shapes: tf.Tensor, k) -> tf.Tensor:
    """Image k of a _preload buffer."""
    return tf.reshape(flat[offsets[k]:offsets[k + 1]], shapes[k])


def _shuffled_order(n: int, seed: int):
    """Example i -> file index: every epoch of n examples is a fresh permutation (index_shuffle)."""
    def pick(i: tf.Tensor) -> tf.Tensor:
        epoch, pos = i // n, i % n
        return tf.random.experimental.index_shuffle(pos, tf.stack([tf.constant(seed, tf.int64), epoch]), n - 1)
    return pick


def _class_balanced_order(labels: np.ndarray, seed: int):
    """Example i -> file index, every class drawn equally often (class_balance = sampler).

    Examples come in rounds of C (the number of classes with files): round r = i // C holds every
    class once, in the order of a permutation seeded by (seed, r). Class c's r-th draw is its file
    at position r mod n_c of a permutation seeded by (seed, c, r // n_c), so a small class cycles
    through all its files before repeating one. A pure function of (seed, i), like _shuffled_order.
    """
    counts = np.unique(labels, return_counts=True)[1]  # of the classes that have files
    by_class = tf.constant(np.argsort(labels, kind="stable"), tf.int64)  # file indices grouped by class
    starts = tf.constant(np.concatenate([[0], np.cumsum(counts)[:-1]]), tf.int64)
    sizes = tf.constant(counts, tf.int64)
    num_classes = len(counts)
    fold_in = tf.random.experimental.stateless_fold_in

    def pick(i: tf.Tensor) -> tf.Tensor:
        seed_t = tf.constant(seed, tf.int64)
        rnd, pos = i // num_classes, i % num_classes
        c = tf.random.experimental.index_shuffle(
            pos, fold_in(tf.stack([seed_t, rnd]), tf.constant(1, tf.int64)), num_classes - 1)
        n_c = sizes[c]
        cycle_seed = fold_in(fold_in(tf.stack([seed_t, rnd // n_c]), tf.constant(2, tf.int64)), c)
        j = tf.random.experimental.index_shuffle(rnd % n_c, cycle_seed, n_c - 1)
        return by_class[starts[c] + j]
    return pick


def train_dataset(
    data_dir: str,
    items: list[tuple[str, int]],
    cfg: Mapping[str, Any],
    batch_size: int,
    input_context: tf.distribute.InputContext | None = None,
    start_example: int = 0,
) -> tf.data.Dataset:
    """Endless shuffled, augmented batches of (float32 [B,S,S,C], int32 [B]) with a static batch size.

    Example i of the stream is file index_shuffle(i mod n, seed=(seed, epoch)) augmented with
    seed (seed, i): every epoch is a full permutation, and the stream is a pure function of the
    seed, so a resumed run continues exactly where it stopped (`start_example` = step x global
    batch) at no cost. With cfg["class_balance"] == "sampler", example i is drawn by
    _class_balanced_order instead: every class equally often, still a pure function of (seed, i).
    With `input_context` (from `strategy.distribute_datasets_from_function`) this pipeline takes
    every num_pipelines-th example and `batch_size` is the global batch.
    """
    seed = int(cfg["seed"])
    if not items:
        raise UserError(f"no images to read in {data_dir}")
    pipeline_id, num_pipelines = 0, 1
    if input_context is not None:
        pipeline_id, num_pipelines = input_context.input_pipeline_id, input_context.num_input_pipelines
        batch_size = input_context.get_per_replica_batch_size(batch_size)

    if _fits_in_cache(len(items), cfg):
        flat, offsets, shapes, label_array = _preload(data_dir, items, cfg)
        labels = tf.constant(label_array)

        def fetch(k):
            image = _ram_image(flat, offsets, shapes, k)
            return image, labels[k], tf.constant(True)
    else:
        paths = tf.constant(_paths(data_dir, items))
        label_array = np.array([label for _, label in items], np.int32)
        all_labels = tf.constant(label_array)
        short_side = base_short_side(cfg)
        reader = _streamed_reader(data_dir, cfg)

        def fetch(k):
            # PIL releases the GIL while decoding, so parallel calls really do run on several cores.
            image, ok = tf.numpy_function(reader, [paths[k], short_side], [tf.uint8, tf.bool], stateful=False)
            image.set_shape([None, None, 3])
            ok.set_shape([])
            return image, all_labels[k], ok

    if cfg["class_balance"] == "sampler":
        pick = _class_balanced_order(label_array, seed)
    else:
        pick = _shuffled_order(len(label_array), seed)

    def example(i):
        image, label, ok = fetch(pick(i))
        image = tf.cond(ok, lambda: train_preprocess(image, cfg, tf.stack([tf.constant(seed, tf.int64), i])),
                        lambda: tf.zeros(_output_shape(cfg)))
        return image, label, ok

    ds = tf.data.Dataset.range(start_example + pipeline_id, 2**62, num_pipelines)
    ds = ds.map(_plain(example), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.filter(_is_ok).map(_drop_ok)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    # Order must be reproducible for an exact resume; prefetch hides the rare slow image.
    options.deterministic = True
    return ds.with_options(options)


def _plain(fn):
    """Map functions run as written: they branch with tf.cond, never on tensors in Python, and
    AutoGraph's conversion of the augmentation code cost ~1 s per pipeline built."""
    return tf.autograph.experimental.do_not_convert(fn)


def _is_ok(image, label, ok):
    return ok


def _drop_ok(image, label, ok):
    return image, label


def _output_shape(cfg: Mapping[str, Any]) -> list[int]:
    size = int(cfg["image_size"])
    return [size, size, int(cfg["channels"])]


def sample_items(items: list[tuple[str, int]], num_examples: int | None, seed: int) -> list[tuple[str, int]]:
    """num_examples of `items` drawn at random across the whole set (seeded: the same seed and
    number give the same sample), in their original order; all of them when num_examples is None
    or not below len(items)."""
    if num_examples is None or num_examples >= len(items):
        return list(items)
    keep = sorted(random.Random(f"{seed}/eval").sample(range(len(items)), max(0, num_examples)))
    return [items[i] for i in keep]


def eval_dataset(
    data_dir: str,
    items: list[tuple[str, int]],
    cfg: Mapping[str, Any],
    batch_size: int,
    num_examples: int | None = None,
    with_index: bool = False,
) -> tf.data.Dataset:
    """Every example of `items` (or of sample_items(items, num_examples, cfg["seed"]): a seeded random
    sample across all classes) exactly once, in order, as (float32 [b,S,S,C], int32 [b]) batches;
    the last batch may be smaller. With `with_index` the batches are (images, labels, int32 [b]
    positions in `items`): each result names its file, although unreadable files are skipped."""
    # sample_items draws by length alone: (position, item) pairs give the same sample, positions kept.
    chosen = sample_items(list(enumerate(items)), num_examples, int(cfg["seed"]))
    # With `with_index` the position goes through the decoder in the label's place; the label is
    # looked up after.
    wanted = [(path, i) for i, (path, _) in chosen] if with_index else [item for _, item in chosen]
    if not wanted:
        raise UserError(f"no images to read in {data_dir}")
    if _fits_in_cache(len(chosen), cfg) and cfg["decode_cache"]:
        flat, offsets, shapes, label_array = _preload(data_dir, wanted, cfg, "evaluation")
        kept = tf.constant(label_array)
        ds = tf.data.Dataset.range(len(label_array)).map(
            _plain(lambda k: (_ram_image(flat, offsets, shapes, k), kept[k])))
    elif _fits_in_cache(len(chosen), cfg):
        ds = decode_dataset(data_dir, wanted, cfg).cache()
    else:
        ds = decode_dataset(data_dir, wanted, cfg, _streamed_reader(data_dir, cfg))
    if with_index:
        labels = tf.constant(np.array([label for _, label in items], np.int32))
        ds = ds.map(_plain(lambda image, i: (image, tf.gather(labels, i), i)))
    ds = ds.map(_plain(lambda image, *rest: (eval_preprocess(image, cfg), *rest)),
                num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    # Results are reported per example and in order, whatever the train setting says.
    options.deterministic = True
    return ds.batch(batch_size, drop_remainder=False).prefetch(tf.data.AUTOTUNE).with_options(options)
