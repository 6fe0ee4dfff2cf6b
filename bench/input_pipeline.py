"""Images per second of the training input pipeline (decode + augment) on this machine's CPU.

    python bench/input_pipeline.py [--images 300] [--image_size 100] [--batch_size 32]

Writes random JPEGs of 200-500 px into a temporary folder, then times the first epoch (decoding
from disk: for the cached pipeline that is the preload when the dataset is built) and a second
one (cached: augmentation only; streamed: decoding again).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import utils  # noqa: E402  (before TensorFlow: quiets its start-up logging)

import tensorflow as tf  # noqa: E402

import hw2_input  # noqa: E402


def write_jpegs(root: str, n: int) -> list[tuple[str, int]]:
    """n random-size (200-500 px) photo-like JPEGs in 4 class folders (also used by train_throughput.py)."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        label = i % 4
        os.makedirs(os.path.join(root, f"c{label}"), exist_ok=True)
        h, w = rng.integers(200, 501, size=2)
        # Smooth noise compresses and decodes like a photo; white noise would be unrealistically slow.
        small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((int(w), int(h)), Image.Resampling.BILINEAR)
        rel = f"c{label}/{i:05d}.jpg"
        image.save(os.path.join(root, rel), quality=90)
        items.append((rel, label))
    return items


def time_epoch(iterator, num_batches: int) -> float:
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--image_size", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()

    print(f"CPU: {utils.cpu_line()}, TensorFlow {tf.__version__}")
    with tempfile.TemporaryDirectory() as root:
        items = write_jpegs(root, args.images)
        batches_per_epoch = args.images // args.batch_size
        n = batches_per_epoch * args.batch_size
        for name, extra in [("cached", {}), ("streamed", {"cache_images_mb": "0"})]:
            cfg = utils.load_config("default", {"image_size": str(args.image_size), **extra})
            start = time.perf_counter()
            it = iter(hw2_input.train_dataset(root, items, cfg, args.batch_size))  # cached: decodes all here
            built = time.perf_counter() - start
            first = built + time_epoch(it, batches_per_epoch)
            second = time_epoch(it, batches_per_epoch)
            print(f"{name:>8}: epoch 1 {n / first:7.0f} images/s, epoch 2 {n / second:7.0f} images/s")
            del it  # stops its prefetch threads before the folder they read from is deleted


if __name__ == "__main__":
    main()
