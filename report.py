"""What a user reads after training: the run record and the per-class report.

- `RunRecord`, a hw2_train hook: RUN/run.json (how the run was made), RUN/summary.csv (one row
  per validation) and RUN/curves.png (loss, top-1 and LR over steps).
- `confusion_matrix` / `per_class_metrics` and their writers: confusion.csv, per_class.csv and
  confusion.png, used by `hw2_eval.py`.
- `evaluate_all_checkpoints`: the `hw2_eval.py --all_checkpoints` table.

TensorFlow is imported only inside the functions that need it; matplotlib always runs on Agg.
"""
from __future__ import annotations

import csv
import datetime
import hashlib
import io
import logging
import os
import platform
import re
import subprocess
import sys
from typing import Mapping, Sequence

import numpy as np

import utils

HW2_VERSION = "0.1.0"
HERE = os.path.dirname(os.path.abspath(__file__))

# summary.csv columns. The loop validates with the EMA weights, hence the _ema suffix; train_loss
# is the optimized loss (cross-entropy + L2) averaged since the previous validation, val_loss is
# cross-entropy only. val_topk_ema is top-`top_k` accuracy.
SUMMARY_COLUMNS = ["step", "epoch", "lr", "train_loss", "train_top1", "val_loss_ema", "val_top1_ema",
                   "val_topk_ema", "top_k", "is_best", "seconds", "time"]


# ------------------------------------------------------------------------------- run record

def file_sha1(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha1(f.read()).hexdigest()
    except OSError:
        return None


def git_commit(directory: str = HERE) -> str | None:
    """HEAD of the hw2 source tree, with '+dirty' for uncommitted changes; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=directory,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Versions and devices: what it takes to tell two runs' numbers apart."""
    import tensorflow as tf
    return {
        "hw2_version": HW2_VERSION,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "devices": [f"{d.name} ({d.device_type})" for d in tf.config.list_logical_devices()],
    }


class RunRecord:
    """hw2_train hook: writes run.json at start, a summary.csv row and curves.png per validation.

    A resumed run keeps summary.csv's history: rows after the step it resumes from (left by a run
    that died between saving a checkpoint and the next one) are dropped, then new rows append.
    """

    def __init__(self, train_dir: str, plot_every_validation: bool = True):
        self.train_dir = train_dir
        self.plot_every_validation = plot_every_validation
        self.summary_path = os.path.join(train_dir, "summary.csv")
        self.curves_path = os.path.join(train_dir, "curves.png")

    def on_start(self, info: Mapping) -> None:
        cfg = info["cfg"]
        split_path = os.path.join(self.train_dir, "split.json")
        record = {
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "section": cfg.get("section"),
            "start_step": info["start_step"],
            **environment(),
            "split_file": split_path,
            "split_sha1": file_sha1(split_path),
            "data_dir": info["split"]["data_dir"],
            "class_names": info["split"]["class_names"],
            "num_train": len(info["split"]["train"]),
            "num_val": len(info["split"]["val"]),
            "replicas": info["replicas"],
            "global_batch": info["global_batch"],
            "steps_per_epoch": info["steps_per_epoch"],
            "params": info["params"],
            "config": dict(cfg),
        }
        path = os.path.join(self.train_dir, "run.json")
        if info["start_step"] and os.path.isfile(path):
            try:
                old = utils.load_json(path, "run record")
                record["previous_starts"] = old.pop("previous_starts", []) + [
                    {k: old.get(k) for k in ("started", "start_step", "git_commit", "tensorflow", "devices")}]
            except utils.UserError as e:  # a damaged record must not stop training
                logging.warning("%s: starting a new run record", e)
        utils.save_json(path, record)
        self._trim_summary(info["start_step"])

    def on_validation(self, row: Mapping) -> None:
        new = not os.path.isfile(self.summary_path)
        values = {
            "step": row["step"], "epoch": f"{row['epoch']:.3f}", "lr": f"{row['lr']:.6g}",
            "train_loss": f"{row['train_loss']:.6f}", "train_top1": f"{row['train_top1']:.6f}",
            "val_loss_ema": f"{row['val_loss']:.6f}", "val_top1_ema": f"{row['val_top1']:.6f}",
            "val_topk_ema": f"{row['val_topk']:.6f}", "top_k": row["top_k"],
            "is_best": int(bool(row["is_best"])), "seconds": f"{row['seconds']:.1f}",
            "time": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        with open(self.summary_path, "a", newline="") as f:
            w = csv.DictWriter(f, SUMMARY_COLUMNS)
            if new:
                w.writeheader()
            w.writerow(values)
        if self.plot_every_validation:
            self._plot()

    def on_end(self, best: Mapping) -> None:
        self._plot()

    def _plot(self) -> None:
        try:
            plot_curves(read_summary(self.summary_path), self.curves_path,
                        title=os.path.basename(os.path.abspath(self.train_dir)))
        except Exception as e:  # a plotting problem must never cost a training run
            logging.warning("could not write %s: %s", self.curves_path, e)

    def _trim_summary(self, start_step: int) -> None:
        if not os.path.isfile(self.summary_path):
            return
        rows = read_summary(self.summary_path)
        kept = [r for r in rows if int(r["step"]) <= start_step]
        if len(kept) != len(rows):
            logging.info("summary.csv: dropping %d rows after step %d (resuming from there)",
                         len(rows) - len(kept), start_step)
            write_csv(self.summary_path, SUMMARY_COLUMNS, [[r.get(c, "") for c in SUMMARY_COLUMNS] for r in kept])


def read_summary(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """Write then rename, like utils.save_json."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt
    return plt


def plot_curves(rows: list[dict], path: str, title: str = "") -> None:
    """Loss, top-1 (train and val) and learning rate against the step, from summary.csv rows."""
    if not rows:
        return
    plt = _pyplot()
    step = np.array([float(r["step"]) for r in rows])

    def col(name: str) -> np.ndarray:
        return np.array([float(r[name]) for r in rows])

    k = rows[-1].get("top_k", "k")
    best = [float(r["step"]) for r in rows if r.get("is_best") == "1"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(step, col("train_loss"), "o-", label="train (cross-entropy + L2)")
    ax.plot(step, col("val_loss_ema"), "s-", label="val, EMA weights (cross-entropy)")
    ax.set_title("loss")
    ax = axes[1]
    ax.plot(step, col("train_top1"), "o-", label="train top-1")
    ax.plot(step, col("val_top1_ema"), "s-", label="val top-1, EMA")
    ax.plot(step, col("val_topk_ema"), "s--", alpha=0.6, label=f"val top-{k}, EMA")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("accuracy")
    if best:
        ax.axvline(best[-1], color="gray", linestyle=":", label=f"best (step {best[-1]:.0f})")
    ax = axes[2]
    ax.plot(step, col("lr"), "o-", color="tab:green", label="learning rate")
    ax.set_yscale("log")
    ax.set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------- per-class report

def confusion_matrix(labels: Sequence[int], predictions: Sequence[int], num_classes: int) -> np.ndarray:
    """cm[true, predicted] = count."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return cm


def per_class_metrics(cm: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """Precision, recall, F1 and support per class, then macro and weighted averages.

    A class never predicted has precision 0 (and never present, recall 0), as scikit-learn's
    zero_division=0: the averages then penalize it instead of skipping it.
    """
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    rows = [{"class": name, "precision": p, "recall": r, "f1": f, "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support)]
    total = support.sum()
    weights = support / total if total else np.zeros_like(support)
    rows.append({"class": "macro avg", "precision": precision.mean(), "recall": recall.mean(),
                 "f1": f1.mean(), "support": int(total)})
    rows.append({"class": "weighted avg", "precision": float(weights @ precision),
                 "recall": float(weights @ recall), "f1": float(weights @ f1), "support": int(total)})
    return rows


def write_confusion_csv(path: str, cm: np.ndarray, class_names: Sequence[str]) -> None:
    """Rows: true class; columns: predicted class."""
    write_csv(path, ["true \\ predicted"] + list(class_names),
              [[name] + [int(v) for v in row] for name, row in zip(class_names, cm)])


def write_per_class_csv(path: str, rows: list[dict]) -> None:
    write_csv(path, ["class", "precision", "recall", "f1", "support"],
              [[r["class"], f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]]
               for r in rows])


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], title: str = "") -> bytes:
    """PNG bytes of the confusion matrix: colour = share of the true class (row), counts in the
    cells up to 30 classes; the figure and fonts scale so ~100 class names stay readable."""
    plt = _pyplot()
    n = len(class_names)
    side = min(max(6.0, 0.22 * n + 3.0), 30.0)
    font = 10 if n <= 20 else max(5, int(10 - (n - 20) / 16))
    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels([_short_name(c) for c in class_names], rotation=90, fontsize=font)
    ax.set_yticklabels([_short_name(c) for c in class_names], fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=font - 1,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    accuracy = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"{title}{' - ' if title else ''}n={cm.sum()}, top-1 {accuracy:.4f}", fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90 if n <= 40 else 110)
    plt.close(fig)
    return buffer.getvalue()


def _short_name(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else name[:limit - 1] + "…"


def write_class_report(labels: Sequence[int], probabilities: np.ndarray, class_names: Sequence[str],
                       eval_dir: str, step: int, title: str = "") -> dict:
    """confusion.csv, per_class.csv, confusion.png into eval_dir and the image into its TensorBoard log."""
    import tensorflow as tf
    os.makedirs(eval_dir, exist_ok=True)
    predictions = np.argmax(probabilities, axis=1) if len(labels) else np.zeros(0, np.int64)
    cm = confusion_matrix(labels, predictions, len(class_names))
    rows = per_class_metrics(cm, class_names)
    write_confusion_csv(os.path.join(eval_dir, "confusion.csv"), cm, class_names)
    write_per_class_csv(os.path.join(eval_dir, "per_class.csv"), rows)
    png = plot_confusion(cm, class_names, title)
    with open(os.path.join(eval_dir, "confusion.png"), "wb") as f:
        f.write(png)
    with tf.summary.create_file_writer(eval_dir).as_default(step=max(step, 0)):
        tf.summary.image("confusion_matrix", tf.io.decode_png(png, channels=3)[tf.newaxis])
    return {"confusion": cm, "per_class": rows}


def predict(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N], softmax probabilities [N, classes]) of the model's current weights over a dataset."""
    import tensorflow as tf

    @tf.function
    def probs(images):
        return tf.nn.softmax(tf.cast(model(images, training=False), tf.float32))

    labels, out = [], []
    for images, batch_labels in dataset:
        out.append(probs(images).numpy())
        labels.append(batch_labels.numpy())
    if not out:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(labels), np.concatenate(out)


def class_report_for_checkpoint(evaluator, path: str, dataset, raw: bool, class_names: Sequence[str],
                                eval_dir: str) -> dict:
    """Restore one checkpoint (EMA weights unless raw) and write its per-class report."""
    step = evaluator.restore(path)
    if not raw:
        evaluator.ema.swap()
    labels, probabilities = predict(evaluator.model, dataset)
    weights = "raw" if raw else "EMA"
    result = write_class_report(labels, probabilities, class_names, eval_dir, step,
                                title=f"step {step}, {weights} weights")
    macro = result["per_class"][-2]
    print(f"per-class report ({weights} weights, step {step}): macro precision {macro['precision']:.4f} "
          f"recall {macro['recall']:.4f} F1 {macro['f1']:.4f} -> {eval_dir}/per_class.csv, confusion.csv, "
          "confusion.png", flush=True)
    return result


# ------------------------------------------------------------------------------- all checkpoints

def checkpoint_list(run_dir: str) -> list[str]:
    """The CheckpointManager's kept checkpoints of RUN (oldest first), then RUN/best's."""
    import tensorflow as tf
    paths = []
    for d in (run_dir, os.path.join(run_dir, "best")):
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


def evaluate_all_checkpoints(evaluator, run_dir: str, dataset, top_k: int, eval_dir: str) -> list[dict]:
    """Every kept checkpoint with raw and EMA weights: prints a table, writes all_checkpoints.csv.

    best/best-N is the same checkpoint as ckpt-N while ckpt-N is kept; it is then evaluated once.
    The best row (highest top-1, then lowest loss) is marked.
    """
    paths = checkpoint_list(run_dir)
    if not paths:
        raise utils.UserError(f"no checkpoint in {run_dir} (train first)")
    steps_seen = {_step_of(p) for p in paths if os.path.basename(os.path.dirname(p)) != "best"}
    rows = []
    for path in paths:
        in_best = os.path.basename(os.path.dirname(path)) == "best"
        if in_best and _step_of(path) in steps_seen:
            for r in rows:
                if r["step"] == _step_of(path):
                    r["note"] = "= best/"
            continue
        for raw in (True, False):
            result = evaluator.evaluate(path, dataset, raw)
            rows.append({"step": result["step"], "checkpoint": os.path.relpath(path, run_dir),
                         "weights": "raw" if raw else "ema", "n": result["n"], "loss": result["loss"],
                         "top1": result["top1"], "topk": result["topk"], "note": ""})
    best = max(rows, key=lambda r: (r["top1"], -r["loss"]))
    for r in rows:
        r["best"] = r is best
    os.makedirs(eval_dir, exist_ok=True)
    csv_path = os.path.join(eval_dir, "all_checkpoints.csv")
    write_csv(csv_path, ["step", "checkpoint", "weights", "n", "loss", "top1", f"top{top_k}", "best"],
              [[r["step"], r["checkpoint"], r["weights"], r["n"], f"{r['loss']:.6f}", f"{r['top1']:.6f}",
                f"{r['topk']:.6f}", int(r["best"])] for r in rows])
    width = max(len(r["checkpoint"] + r["note"]) for r in rows) + 1
    print(f"{'step':>8}  {'checkpoint':<{width}} {'weights':<7} {'top-1':>7} {f'top-{top_k}':>7} {'loss':>8}")
    for r in rows:
        name = f"{r['checkpoint']} {r['note']}".strip()
        print(f"{r['step']:>8}  {name:<{width}} {r['weights']:<7} {r['top1']:>7.4f} {r['topk']:>7.4f} "
              f"{r['loss']:>8.4f}{'  <- best' if r['best'] else ''}")
    print(f"n={rows[0]['n']}; table written to {csv_path}", flush=True)
    return rows


def all_checkpoints(evaluator, run_dir: str, dataset, top_k: int, eval_dir: str, class_names: Sequence[str],
                    write_report: bool = True) -> list[dict]:
    """`hw2_eval.py --all_checkpoints`: the table, then the per-class report of its best row."""
    rows = evaluate_all_checkpoints(evaluator, run_dir, dataset, top_k, eval_dir)
    if write_report:
        best = next(r for r in rows if r["best"])
        class_report_for_checkpoint(evaluator, os.path.join(run_dir, best["checkpoint"]), dataset,
                                    best["weights"] == "raw", class_names, eval_dir)
    return rows
