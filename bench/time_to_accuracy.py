"""Time to accuracy: the test top-1 hw2 reaches in MINUTES, against a Keras 3 model.fit given the same.

    python bench/time_to_accuracy.py DATA_DIR MINUTES [--test_data_path T] [--seed 0] [--hw2_args "..."]
                                     [--only hw2|keras] [--out DIR]

DATA_DIR is split stratified 80/20 into a pool and a test set (unless --test_data_path gives one).
- hw2 trains at its defaults on the pool with --time_budget MINUTES (its own 80/20 train/val split,
  the best checkpoint kept), and `hw2_eval.py --checkpoint_dir RUN/best` scores it on the test set
  at hw2_eval's defaults (flip test-time augmentation where the run trained with mirrored images;
  the score without it is printed beside).
- Keras: the same seed network from stock Keras 3 layers (bench/keras_reference.py) at the input
  size hw2 used, image_dataset_from_directory on the pool (its own 80/20 validation split),
  keras.io-style augmentation (random horizontal flip and rotation), Adam 1e-3, batch 128, for the
  same wall-clock minutes (counted from its process's start, imports included, as hw2's budget
  counts from its command's start), keeping its best-val weights; scored on the same test set.
--seed seeds the 80/20 split, hw2 (`--seed`) and Keras alike: a repeat with another seed is a
repeat of the whole comparison. Each side runs in its own process, one after the other.
`--only hw2` / `--only keras` with the same --out runs one side (results are kept in OUT/*.json),
so the two halves can run apart. OUT/hw2_train.log holds hw2's log, each line stamped with the
seconds since its launch.
The first line is the machine; the last: `time-to-accuracy hw2 A keras-fit B diff +C pts (M min)`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils  # noqa: E402
from linked_folder import link_image  # noqa: E402


def link_split(data_dir: str, test_dir: str | None, seed: int, out: str) -> tuple[str, str]:
    """OUT/pool and OUT/test as class folders of symlinks: DATA_DIR split 80/20 (stratified,
    seeded), or all of DATA_DIR and TEST_DIR."""
    import hw2_dataset
    scan = hw2_dataset.scan_dataset(data_dir)
    if test_dir:
        parts = {"pool": (scan, scan.items), "test": None}
        test_scan = hw2_dataset.scan_dataset(test_dir)
        parts["test"] = (test_scan, test_scan.items)
    else:
        pool, test = hw2_dataset.make_split(scan.items, 0.2, seed)
        parts = {"pool": (scan, pool), "test": (scan, test)}
    for name, (source, items) in parts.items():
        for rel, label in items:
            link_image(source.data_dir, rel, os.path.join(out, name), source.class_names[label])
    return os.path.join(out, "pool"), os.path.join(out, "test")


def run_hw2(pool: str, test: str, minutes: float, extra: list[str], out: str) -> dict:
    run = os.path.join(out, "hw2_run")
    t0 = time.time()
    # A first run on the folder, as the Keras fit's is: with --out reused, the decoded-image cache
    # would hand hw2 its images without decoding (CIFAR's 8,000: ~16 s of the budget).
    cmd = [sys.executable, os.path.join(ROOT, "hw2_train.py"), "--data_dir", pool, "--train_dir", run,
           "--time_budget", str(minutes), "--fresh", "--decode_cache", "false", *extra]
    print("hw2:", shlex.join(cmd[1:]), flush=True)
    lines = timed_lines(cmd, os.path.join(out, "hw2_train.log"), t0)
    wall = time.time() - t0
    if lines.returncode:
        raise SystemExit(f"hw2 training failed:\n{lines.text[-3000:]}")
    # As a user evaluates it (hw2_eval's defaults: flip test-time augmentation where the run trained
    # with mirrored images), and again without, so that the gain of each part stays visible.
    (top1, n, tta), (top1_plain, _, _) = (score_hw2(run, test, out, extra) for extra in ([], ["--tta", "none"]))
    cfg = json.load(open(os.path.join(run, "config.json")))["config"]
    rows = open(os.path.join(run, "summary.csv")).read().splitlines()
    last = rows[-1].split(",")
    return {"top1": top1, "n": n, "tta": tta, "top1_no_tta": top1_plain, "wall_s": wall,
            "image_size": cfg["image_size"], "epochs": float(last[1]), "validations": len(rows) - 1,
            "log_tail": lines.text.splitlines()[-4:],
            # where the process's wall time went: before its first log line (imports), after its last (exit)
            "first_line_s": lines.first, "last_line_s": lines.last}


def score_hw2(run: str, test: str, out: str, extra: list[str]) -> tuple[float, int, str]:
    """(test top-1, images, test-time augmentation) of RUN/best by hw2_eval.py."""
    score = subprocess.run([sys.executable, os.path.join(ROOT, "hw2_eval.py"), "--checkpoint_dir",
                            os.path.join(run, "best"), "--test_data_path", test, "--no_report",
                            "--eval_dir", os.path.join(out, "hw2_eval"), *extra], capture_output=True, text=True)
    m = re.search(r"top-1 ([0-9.]+) .*? n=(\d+)", score.stdout)
    if score.returncode or not m:
        raise SystemExit(f"hw2 eval failed:\n{score.stderr[-3000:]}")
    tta = re.search(r"tta (\w+)", score.stdout)
    return float(m.group(1)), int(m.group(2)), tta.group(1) if tta else "none"


class TimedLines(NamedTuple):
    returncode: int
    text: str
    first: float
    last: float


def timed_lines(cmd: list[str], log: str, t0: float) -> TimedLines:
    """Run CMD, its stdout and stderr merged into LOG, each line stamped with its arrival (s since
    t0): hw2's own log clock starts inside its process and cannot show the time around it."""
    stamps, text = [], []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc, \
            open(log, "w", buffering=1) as f:  # line by line: the log can be watched
        for line in proc.stdout:
            stamps.append(time.time() - t0)
            text.append(line)
            f.write(f"+{stamps[-1]:7.1f}s {line}")
    return TimedLines(proc.returncode, "".join(text), stamps[0] if stamps else 0.0, stamps[-1] if stamps else 0.0)


def run_keras(pool: str, test: str, minutes: float, image_size: int, seed: int) -> dict:
    """In this process (started as a child): train until MINUTES have passed, score the best-val weights."""
    import keras
    import tensorflow as tf
    from keras import layers

    from keras_reference import seed_network
    t0 = time.monotonic() - utils.process_age()  # hw2's --time_budget counts its imports too
    keras.utils.set_random_seed(seed)
    size = (image_size, image_size)
    train_ds, val_ds = keras.utils.image_dataset_from_directory(
        pool, validation_split=0.2, subset="both", seed=seed, image_size=size, batch_size=128)
    test_ds = keras.utils.image_dataset_from_directory(test, shuffle=False, image_size=size, batch_size=128)
    num_classes = len(train_ds.class_names)
    augment = keras.Sequential([layers.RandomFlip("horizontal"), layers.RandomRotation(0.1)])
    train_ds = train_ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    train_ds, val_ds = train_ds.prefetch(tf.data.AUTOTUNE), val_ds.cache().prefetch(tf.data.AUTOTUNE)
    cfg = utils.load_config("default", {"image_size": str(image_size)})
    model = seed_network(cfg, num_classes, rescale=1.0 / 255)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])

    class Budget(keras.callbacks.Callback):
        best, weights, epochs = -1.0, None, 0

        def on_train_batch_end(self, batch, logs=None):
            if time.monotonic() - t0 > 60 * minutes:
                self.model.stop_training = True  # the epoch ends here, then validates, as hw2's budget

        def on_epoch_end(self, epoch, logs=None):
            self.epochs = epoch + 1
            if logs["val_accuracy"] > self.best:
                self.best, self.weights = logs["val_accuracy"], self.model.get_weights()

    budget = Budget()
    model.fit(train_ds, validation_data=val_ds, epochs=1_000_000, callbacks=[budget], verbose=0)
    wall = time.monotonic() - t0
    model.set_weights(budget.weights)
    _, top1 = model.evaluate(test_ds, verbose=0)
    n = sum(int(y.shape[0]) for _, y in test_ds)
    return {"top1": float(top1), "n": n, "wall_s": wall, "image_size": image_size, "epochs": budget.epochs,
            "best_val": budget.best}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir")
    p.add_argument("minutes", type=float)
    p.add_argument("--test_data_path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hw2_args", default="", help="extra hw2_train.py flags, e.g. \"--section demo\"")
    p.add_argument("--only", choices=("hw2", "keras"))
    p.add_argument("--out", help="work folder (kept); default: a temporary one")
    p.add_argument("--keras_child", nargs=3, metavar=("POOL", "TEST", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.keras_child:
        pool, test, size = args.keras_child
        print(json.dumps(run_keras(pool, test, args.minutes, int(size), args.seed)), flush=True)
        return
    print(f"CPU: {utils.cpu_line()}", flush=True)
    out = args.out or tempfile.mkdtemp(prefix="hw2-tta-")
    pool, test = link_split(args.data_dir, args.test_data_path, args.seed, out)
    results = {}
    for side in ("hw2", "keras"):
        path = os.path.join(out, f"{side}.json")
        if args.only in (None, side):
            results[side] = side_run(side, pool, test, args, out, results)
            json.dump(results[side], open(path, "w"), indent=1)
        elif os.path.isfile(path):
            results[side] = json.load(open(path))
        if side in results:
            r = results[side]
            around = (f" (first log line at {r['first_line_s']:.0f} s, {r['wall_s'] - r['last_line_s']:.0f} s "
                      "from the last to exit)") if "first_line_s" in r else ""
            tta = (f" (tta {r['tta']}; {r['top1_no_tta']:.4f} without)"
                   if r.get("tta", "none") != "none" else "")
            print(f"{side}: test top-1 {r['top1']:.4f}{tta} (n={r['n']}), {r['epochs']:.1f} epochs at "
                  f"{r['image_size']}px, {r['wall_s'] / 60:.1f} min wall{around}", flush=True)
    if len(results) == 2:
        a, b = results["hw2"]["top1"], results["keras"]["top1"]
        print(f"time-to-accuracy hw2 {a:.4f} keras-fit {b:.4f} diff {100 * (a - b):+.1f} pts ({args.minutes:g} min)")


def side_run(side: str, pool: str, test: str, args, out: str, results: dict) -> dict:
    if side == "hw2":
        # --seed seeds both sides (an explicit --seed in --hw2_args comes later and wins).
        return run_hw2(pool, test, args.minutes, ["--seed", str(args.seed), *shlex.split(args.hw2_args)], out)
    hw2_json = os.path.join(out, "hw2.json")
    size = (results.get("hw2") or (json.load(open(hw2_json)) if os.path.isfile(hw2_json) else {})).get("image_size")
    size = size or utils.load_config("default").image_size
    if not size:  # image_size = auto: hw2 picks it from the images
        raise SystemExit(f"--only keras trains at the input size hw2 chose: run --only hw2 with --out {out} first")
    child = subprocess.run([sys.executable, __file__, args.data_dir, str(args.minutes), "--seed", str(args.seed),
                            "--keras_child", pool, test, str(size)], capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
    if child.returncode:
        raise SystemExit(f"keras failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
