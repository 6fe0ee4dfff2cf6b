"""model.tflite with float32, 8-bit (dynamic) and 16-bit weights, side by side on one run and one
labelled folder: file size, the interpreter's images per second, top-1, and how far each lies from
the float model.

    python bench/tflite_weights.py RUN TEST_DIR [--tta none] [--batch_size 64]

RUN is a hw2_train.py --train_dir (its best checkpoint is exported, as hw2_export.py does);
TEST_DIR a class-folder set with the run's classes (../shared/data/hymenoptera/val for a
hymenoptera run). Images are read and prepared once, with hw2's eval preprocessing; the timing is
the interpreter alone, the best of three passes.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import utils  # noqa: E402  (before TensorFlow: quiets its start-up logging)

import evaluation  # noqa: E402
import run_dir  # noqa: E402
import serving  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("test_dir")
    p.add_argument("--tta", default="none", help="none (one pass, the default here), flip or auto")
    p.add_argument("--batch_size", type=int, default=64)
    args = p.parse_args()
    print(f"machine: CPU: {utils.cpu_line()}")
    run = run_dir.find(args.run)
    _, names = run_dir.read_config(run)
    data_dir, items, _ = evaluation.eval_items(run, names, args.test_dir)
    files = [os.path.join(data_dir, rel) for rel, _ in items]
    labels = np.array([label for _, label in items])
    checkpoint = run_dir.pick_checkpoint(args.run, prefer_best=True)
    print(f"{checkpoint}, tta {args.tta}, {len(files)} images of {args.test_dir}")
    images, reference = None, None
    with tempfile.TemporaryDirectory() as tmp:
        for quantize in serving.TFLITE_QUANTIZE:
            out = os.path.join(tmp, quantize)
            serving.export(run, checkpoint, out, tta=args.tta, tflite=quantize)
            model = serving.TFLiteModel(os.path.join(out, serving.TFLITE))
            if images is None:
                images = np.stack([model.preprocess(f) for f in files])
            seconds = []
            for _ in range(3):
                start = time.perf_counter()
                probabilities = np.concatenate([model.probabilities(images[i:i + args.batch_size])
                                                for i in range(0, len(images), args.batch_size)])
                seconds.append(time.perf_counter() - start)
            if reference is None:
                reference = probabilities
            size = os.path.getsize(os.path.join(out, serving.TFLITE)) / 2**20
            print(f"{quantize:8s} {size:6.2f} MiB {len(images) / min(seconds):7.1f} img/s "
                  f"top-1 {(probabilities.argmax(1) == labels).mean():.4f} "
                  f"max |p - float's| {np.abs(probabilities - reference).max():.4f} "
                  f"argmax as float's {(probabilities.argmax(1) == reference.argmax(1)).mean():.3f}", flush=True)


if __name__ == "__main__":
    main()
