"""Evaluate a run's checkpoints: one pass gives every example's probabilities, from which come the
metrics (top-1, top-k, loss), the per-class report and the `--all_checkpoints` table.

Top-1 and top-k follow hw2.count_correct's definition (ties go to the lower class index, as
argmax), so a checkpoint scores here what training's validation measured.
"""
from __future__ import annotations

import csv
import os
import re
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

import class_report
import run_dir
import utils
from utils import UserError

TTA = ("auto", "none", "flip")


@dataclass
class Evaluation:
    step: int
    labels: np.ndarray  # [N]
    probabilities: np.ndarray  # [N, classes]
    metrics: dict  # loss, top1, topk, n
    positions: np.ndarray | None = None  # [N] each example's position in the items evaluated, if known


def metrics(labels: np.ndarray, probabilities: np.ndarray, k: int) -> dict:
    """Cross-entropy, top-1 and top-k of softmax probabilities; a tie ranks the lower class first."""
    n = len(labels)
    if n == 0:
        return {"loss": float("nan"), "top1": float("nan"), "topk": float("nan"), "n": 0}
    ranked = np.argsort(-probabilities, axis=1, kind="stable")
    hits = ranked == np.asarray(labels)[:, None]
    p_true = probabilities[np.arange(n), labels]
    return {"loss": float(-np.log(np.maximum(p_true, 1e-30)).mean()), "top1": float(hits[:, 0].mean()),
            "topk": float(hits[:, :k].any(axis=1).mean()), "n": n}


def check_tta(tta: str) -> None:
    if tta not in TTA:
        raise UserError(f"--tta must be one of {'|'.join(TTA)}, got '{tta}'")


def resolve_tta(tta: str, cfg) -> str:
    """auto: flip where the run trained on mirrored images (flip_lr), which taught it that a mirror
    is the same class; none where it did not (digits, text). Averaging the two passes gained 0.95
    and 1.25 points of test top-1 on 2,000 CIFAR images, paired on the same checkpoints, and +0.4
    (noise) over seven runs on 153 photos (bench/README.md, time to accuracy), for twice the work."""
    check_tta(tta)
    if tta == "auto":
        return "flip" if cfg["flip_lr"] else "none"
    return tta


def tta_probabilities(model, images, tta: str = "none"):
    """Softmax probabilities [N, classes] of preprocessed images [N, S, S, C]; with tta "flip", the
    mean of each image's and its left-right mirror's (TensorFlow ops: the export's graph uses it too)."""
    import tensorflow as tf

    import hw2
    p = tf.nn.softmax(hw2.inference(model, images))
    if tta == "flip":
        p = (p + tf.nn.softmax(hw2.inference(model, tf.image.flip_left_right(images)))) / 2.0
    return p


class Evaluator:
    """A run's network in the run's precision; evaluates any of its checkpoints on a dataset."""

    def __init__(self, run: str, top_k: int, precision_name: str | None = None, tta: str = "auto"):
        import tensorflow as tf

        check_tta(tta)
        self.saved = run_dir.RunModel(run, precision_name)
        tta = resolve_tta(tta, self.saved.cfg)  # auto: as hw2_eval's default
        self.run, self.top_k, self.tta = run, top_k, tta
        model = self.saved.model
        # Any batch size, one trace.
        self._probabilities = tf.function(lambda images: tta_probabilities(model, images, tta),
                                          reduce_retracing=True, autograph=False)

    def predict(self, dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(labels [N], probabilities [N, classes], positions [N] or None) of the weights now in the
        model; positions come from a dataset of (images, labels, positions) batches
        (hw2_input.eval_dataset(..., with_index=True))."""
        labels, out, positions = [], [], []
        for images, batch_labels, *batch_positions in dataset:
            out.append(self._probabilities(images).numpy())
            labels.append(batch_labels.numpy())
            positions += [p.numpy() for p in batch_positions]
        if not out:
            return np.zeros(0, np.int64), np.zeros((0, len(self.saved.class_names)), np.float32), None
        return np.concatenate(labels), np.concatenate(out), np.concatenate(positions) if positions else None

    def evaluate(self, path: str, dataset, averaged: bool = True) -> Evaluation:
        step = self.saved.restore(path, averaged)
        labels, probabilities, positions = self.predict(dataset)
        return Evaluation(step, labels, probabilities, metrics(labels, probabilities, self.top_k), positions)


def record(result: Evaluation, top_k: int, path: str, eval_dir: str, weights: str, what: str) -> None:
    """Print the result, append it to eval_dir/results.csv and to eval_dir's TensorBoard log."""
    import tensorflow as tf
    m = result.metrics
    print(f"top-1 {m['top1']:.4f} top-{top_k} {m['topk']:.4f} n={m['n']} "
          f"(step {result.step}, {weights} weights, {what})", flush=True)
    os.makedirs(eval_dir, exist_ok=True)
    csv_path = os.path.join(eval_dir, "results.csv")
    new = not os.path.isfile(csv_path)
    with open(csv_path, "a", newline="", encoding="utf-8") as f:  # one appended line: a kill loses at most this row
        w = csv.writer(f)
        if new:
            w.writerow(["time", "step", "checkpoint", "weights", "data", "n", "loss", "top1", f"top{top_k}"])
        w.writerow([time.strftime("%Y-%m-%d %H:%M:%S"), result.step, path, weights, what, m["n"],
                    f"{m['loss']:.6f}", f"{m['top1']:.6f}", f"{m['topk']:.6f}"])
    with tf.summary.create_file_writer(eval_dir).as_default(step=max(result.step, 0)):
        tf.summary.scalar(f"{weights}/top1", m["top1"])
        tf.summary.scalar(f"{weights}/top{top_k}", m["topk"])
        tf.summary.scalar(f"{weights}/loss", m["loss"])


def write_report(result: Evaluation, class_names: Sequence[str], eval_dir: str, weights: str,
                 image_paths: Sequence[str] | None = None) -> dict:
    """The per-class report (confusion.csv, per_class.csv, confusion.png) of one evaluation and,
    given the image path of each item evaluated and a result with positions, errors.csv and errors.png."""
    weights = {"ema": "EMA"}.get(weights, weights)
    title = f"step {result.step}, {weights} weights"
    report = class_report.write_class_report(result.labels, result.probabilities, class_names, eval_dir,
                                             result.step, title=title)
    written = "per_class.csv, confusion.csv, confusion.png"
    if image_paths is not None and result.positions is not None:
        report["errors"] = class_report.write_error_gallery(
            result.labels, result.probabilities, [image_paths[i] for i in result.positions], class_names, eval_dir,
            result.step, title=title)
        written += f", errors.csv ({len(report['errors'])} misclassified), errors.png"
    macro = report["per_class"][-2]
    print(f"per-class report ({weights} weights, step {result.step}): macro precision {macro['precision']:.4f} "
          f"recall {macro['recall']:.4f} F1 {macro['f1']:.4f} -> {eval_dir}/{written}", flush=True)
    return report


# ------------------------------------------------------------------------------- all checkpoints

def checkpoint_list(run: str) -> list[str]:
    """The CheckpointManager's kept checkpoints of RUN (oldest first), then RUN/best's."""
    import tensorflow as tf
    paths = []
    for d in (run, os.path.join(run, run_dir.BEST)):
        state = tf.train.get_checkpoint_state(d)
        if state:
            for p in state.all_model_checkpoint_paths:
                p = p if os.path.isabs(p) else os.path.join(d, p)
                if tf.io.gfile.glob(p + ".index") and p not in paths:
                    paths.append(p)
    return paths


def _step_of(path: str) -> int:
    m = re.search(r"-(\d+)$", path)
    return int(m.group(1)) if m else -1


def all_checkpoints(evaluator: Evaluator, dataset, eval_dir: str, write_report_of_best: bool = True,
                    image_paths: Sequence[str] | None = None) -> list[dict]:
    """Every kept checkpoint with raw and averaged weights: prints a table, writes
    all_checkpoints.csv and the per-class report of the best row (highest top-1, then lowest loss;
    with its error gallery given `image_paths`, as write_report).

    best/best-N is the same checkpoint as ckpt-N while ckpt-N is kept; it is then evaluated once.
    """
    run, top_k = evaluator.run, evaluator.top_k
    paths = checkpoint_list(run)
    if not paths:
        raise UserError(f"no checkpoint in {run} (train first)")
    steps_seen = {_step_of(p) for p in paths if os.path.basename(os.path.dirname(p)) != run_dir.BEST}
    rows = []
    for path in paths:
        if os.path.basename(os.path.dirname(path)) == run_dir.BEST and _step_of(path) in steps_seen:
            for r in rows:
                if r["step"] == _step_of(path):
                    r["note"] = "= best/"
            continue
        for averaged in (False, True):
            result = evaluator.evaluate(path, dataset, averaged)
            rows.append({"step": result.step, "checkpoint": os.path.relpath(path, run),
                         "weights": "ema" if averaged else "raw", **result.metrics, "note": "",
                         "result": result})
    best = max(rows, key=lambda r: (r["top1"], -r["loss"]))
    for r in rows:
        r["best"] = r is best
    os.makedirs(eval_dir, exist_ok=True)
    csv_path = os.path.join(eval_dir, "all_checkpoints.csv")
    run_dir.write_csv(csv_path, ["step", "checkpoint", "weights", "n", "loss", "top1", f"top{top_k}", "best"],
                      [[r["step"], r["checkpoint"], r["weights"], r["n"], f"{r['loss']:.6f}", f"{r['top1']:.6f}",
                        f"{r['topk']:.6f}", int(r["best"])] for r in rows])
    _print_table(rows, top_k)
    print(f"n={rows[0]['n']}; table written to {csv_path}", flush=True)
    if write_report_of_best:
        write_report(best["result"], evaluator.saved.class_names, eval_dir, best["weights"], image_paths)
    return rows


def _print_table(rows: list[dict], top_k: int) -> None:
    width = max(len(r["checkpoint"] + r["note"]) for r in rows) + 1
    print(f"{'step':>8}  {'checkpoint':<{width}} {'weights':<7} {'top-1':>7} {f'top-{top_k}':>7} {'loss':>8}")
    for r in rows:
        name = f"{r['checkpoint']} {r['note']}".strip()
        print(f"{r['step']:>8}  {name:<{width}} {r['weights']:<7} {r['top1']:>7.4f} {r['topk']:>7.4f} "
              f"{r['loss']:>8.4f}{'  <- best' if r['best'] else ''}")


def _note_seen_in_training(scan, run: str) -> None:
    """A test folder that holds the run's own train/val images (the training folder itself, or
    copies) scores what the model memorized: say so, with how many."""
    import hw2_dataset
    import logging
    try:
        split = hw2_dataset.load_split(os.path.join(run, run_dir.SPLIT), check_files=False)
    except UserError:
        return  # a run without its split (an old export layout): nothing to compare with
    seen = hw2_dataset.files_also_in(scan.data_dir, scan.items, split["data_dir"], split["train"] + split["val"])
    if seen:
        logging.warning("%d of %d test images are also in this run's train/val split (the same bytes, e.g. %s): "
                        "on them the test top-1 measures memory, not new photos", len(seen), len(scan.items),
                        seen[0])


def eval_items(run: str, class_names: Sequence[str], test_data_path: str | None = None) -> tuple[str, list, str]:
    """(data_dir, [(path, label)], description): a test folder, labels in the training class
    order, or else the run's validation split."""
    import hw2_dataset
    import logging
    if test_data_path:
        scan = hw2_dataset.scan_dataset(test_data_path)
        unknown = [c for c in scan.class_names if c not in class_names]
        if unknown:
            more = ", ..." if len(class_names) > 10 else ""
            key = hw2_dataset.class_key
            trained = {key(c): c for c in class_names}
            alike = [f"{c} to {trained[key(c)]}" for c in unknown if key(c) in trained]
            rename = f"; rename {', '.join(alike[:3])}" if alike else ""
            raise UserError(f"test classes not seen in training: {', '.join(unknown[:5])} "
                            f"(training classes: {', '.join(class_names[:10])}{more}{rename})")
        if scan.bad:
            logging.warning("skipping %d unusable test files, e.g. %s (%s)", len(scan.bad), *scan.bad[0])
        _note_seen_in_training(scan, run)
        remap = [list(class_names).index(c) for c in scan.class_names]
        return scan.data_dir, [(p, remap[label]) for p, label in scan.items], f"test set {test_data_path}"
    split = hw2_dataset.load_split(os.path.join(run, run_dir.SPLIT), check_files=False)
    if not os.path.isdir(split["data_dir"]):
        raise UserError(f"{run}'s data folder {split['data_dir']} is gone: evaluate another folder with "
                        "--test_data_path, or, if it moved, record where once with hw2_train.py --data_dir NEW "
                        f"--train_dir {run}")
    # Images deleted since the run last started (its next start drops them from split.json): a few
    # are left out with a warning, as training's resume does; more stop, naming them.
    val_split = {**split, "train": []}
    gone = set(hw2_dataset.missing_files(val_split))
    val = [item for item in split["val"] if item[0] not in gone]
    if gone and (run_dir.too_many_gone(len(gone), len(split["val"])) or not val):
        hw2_dataset.check_split_files(val_split, os.path.join(run, run_dir.SPLIT))  # names them
    if gone:
        logging.warning("%s of this run's validation split %s gone from %s since it was made (e.g. %s): "
                        "evaluating the other %d", utils.count(len(gone), "image"),
                        "is" if len(gone) == 1 else "are", split["data_dir"], min(gone), len(val))
    return split["data_dir"], val, "validation split"
