"""Class balance: none / weights / sampler on an imbalanced copy of a class-folder dataset.

    python bench/class_balance.py DATA_DIR MINUTES [--whole 0] [--keep 0.1] [--test_per_class 200]
                                  [--modes none,weights,sampler] [--hw2_args "..."] [--out DIR]

From every class, --test_per_class images (seeded) go to a balanced test set; of the rest, class
--whole keeps all its images and every other class keeps the fraction --keep (cifar10-test: 800
airplanes, 80 of each other class, a 10x imbalance). hw2 trains on that imbalanced pool once per
--class_balance mode with --time_budget MINUTES, and hw2_eval scores RUN/best on the balanced test
set: top-1, macro-F1 and the recall of every class. The first line is the machine; the last lines
one row per mode.
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils  # noqa: E402
from linked_folder import link_image  # noqa: E402


def imbalanced_copy(data_dir: str, out: str, whole: int, keep: float, test_per_class: int, seed: int):
    """OUT/pool (imbalanced) and OUT/test (balanced) as class folders of symlinks."""
    import hw2_dataset
    scan = hw2_dataset.scan_dataset(data_dir, check_images=False)
    rng = random.Random(seed)
    for label, name in enumerate(scan.class_names):
        items = [rel for rel, y in scan.items if y == label]
        rng.shuffle(items)
        test, rest = items[:test_per_class], items[test_per_class:]
        pool = rest if label == whole else rest[:max(1, round(keep * len(rest)))]
        for part, rels in (("test", test), ("pool", pool)):
            for rel in rels:
                link_image(scan.data_dir, rel, os.path.join(out, part), name)
    return os.path.join(out, "pool"), os.path.join(out, "test")


def run_mode(mode: str, pool: str, test: str, minutes: float, extra: list[str], out: str) -> dict:
    run = os.path.join(out, mode)
    cmd = [sys.executable, os.path.join(ROOT, "hw2_train.py"), "--data_dir", pool, "--train_dir", run,
           "--time_budget", str(minutes), "--class_balance", mode, "--fresh", *extra]
    print("hw2:", shlex.join(cmd[1:]), flush=True)
    train = subprocess.run(cmd, capture_output=True, text=True)
    if train.returncode:
        raise SystemExit(f"{mode}: training failed:\n{train.stderr[-3000:]}")
    eval_dir = os.path.join(out, mode + "_eval")
    score = subprocess.run([sys.executable, os.path.join(ROOT, "hw2_eval.py"), "--checkpoint_dir",
                            os.path.join(run, "best"), "--test_data_path", test, "--eval_dir", eval_dir],
                           capture_output=True, text=True)
    m = re.search(r"top-1 ([0-9.]+)", score.stdout)
    if score.returncode or not m:
        raise SystemExit(f"{mode}: eval failed:\n{score.stderr[-3000:]}")
    rows = {r["class"]: r for r in csv.DictReader(open(os.path.join(eval_dir, "per_class.csv")))}
    recall = {k: float(r["recall"]) for k, r in rows.items() if not k.endswith(" avg")}
    return {"top1": float(m.group(1)), "macro_f1": float(rows["macro avg"]["f1"]), "recall": recall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir")
    p.add_argument("minutes", type=float)
    p.add_argument("--whole", type=int, default=0, help="index of the class kept whole")
    p.add_argument("--keep", type=float, default=0.1, help="fraction kept of every other class")
    p.add_argument("--test_per_class", type=int, default=200)
    p.add_argument("--modes", default="none,weights,sampler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hw2_args", default="")
    p.add_argument("--out", help="work folder (kept); default: a temporary one")
    args = p.parse_args()
    print(f"CPU: {utils.cpu_line()}", flush=True)
    out = args.out or tempfile.mkdtemp(prefix="hw2-balance-")
    pool, test = imbalanced_copy(args.data_dir, out, args.whole, args.keep, args.test_per_class, args.seed)
    counts = {c: len(os.listdir(os.path.join(pool, c))) for c in sorted(os.listdir(pool))}
    print("pool:", ", ".join(f"{c} {n}" for c, n in counts.items()), "| test:",
          len(os.listdir(os.path.join(test, next(iter(counts))))), "per class", flush=True)
    results = {m: run_mode(m, pool, test, args.minutes, shlex.split(args.hw2_args), out)
               for m in args.modes.split(",")}
    classes = list(counts)
    print("| class_balance | test top-1 | macro-F1 | " + " | ".join(f"recall {c}" for c in classes) + " |")
    print("|---" * (3 + len(classes)) + "|")
    for mode, r in results.items():
        print(f"| {mode} | {r['top1']:.3f} | {r['macro_f1']:.3f} | "
              + " | ".join(f"{r['recall'][c]:.2f}" for c in classes) + " |")


if __name__ == "__main__":
    main()
