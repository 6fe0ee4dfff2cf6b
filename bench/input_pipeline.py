"""Images per second of the training input pipeline (decode + augment) on this machine's CPU.

    python bench/input_pipeline.py [--images 300] [--image_size 100] [--batch_size 32] [--px 200,500]

Writes random JPEGs of --px (200-500 px; `--px 3024,4032` for phone photos) into a temporary
folder, then times the first epoch (decoding from disk: for the cached pipeline that is the preload
when the dataset is built) and a second one: cached (in RAM): augmentation only; streamed (too big
for RAM, decode_cache off): decoding again; stored (too big for RAM, decode_store.py): the first
epoch decodes and stores each image, the second reads them back from the file.
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

import decode_store  # noqa: E402
import hw2_input  # noqa: E402


def write_jpegs(root: str, n: int, px: tuple[int, int] = (200, 500)) -> list[tuple[str, int]]:
    """n random-size (px[0]-px[1] a side) photo-like JPEGs in 4 class folders (also used by train_throughput.py)."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        label = i % 4
        os.makedirs(os.path.join(root, f"c{label}"), exist_ok=True)
        h, w = rng.integers(px[0], px[1] + 1, size=2)
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
    parser.add_argument("--px", default="200,500", help="the JPEGs' sides, min,max")
    args = parser.parse_args()

    print(f"CPU: {utils.cpu_line()}, TensorFlow {tf.__version__}")
    with tempfile.TemporaryDirectory() as root:
        os.environ["XDG_CACHE_HOME"] = os.path.join(root, "cache")  # the stored row starts empty
        data = os.path.join(root, "data")
        items = write_jpegs(data, args.images, tuple(int(v) for v in args.px.split(",")))
        batches_per_epoch = args.images // args.batch_size
        n = batches_per_epoch * args.batch_size
        rows = [("cached", {}), ("streamed", {"cache_images_mb": "0", "decode_cache": "false"}),
                ("stored", {"cache_images_mb": "0"})]
        for name, extra in rows:
            cfg = utils.load_config("default", {"image_size": str(args.image_size), **extra})
            start = time.perf_counter()
            it = iter(hw2_input.train_dataset(data, items, cfg, args.batch_size))  # cached: decodes all here
            built = time.perf_counter() - start
            first = built + time_epoch(it, batches_per_epoch)
            second = time_epoch(it, batches_per_epoch)
            print(f"{name:>8}: epoch 1 {n / first:7.0f} images/s, epoch 2 {n / second:7.0f} images/s")
            del it  # stops its prefetch threads before the folder they read from is deleted
        decode_store.close_all()  # its index, before the temporary folder goes


if __name__ == "__main__":
    main()
