"""The per-class report of an evaluation: confusion.csv, per_class.csv (precision, recall, F1,
support from scikit-learn) and confusion.png, written into an eval folder and its TensorBoard log.
"""
from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np

import run_dir
import utils


def confusion_matrix(labels: Sequence[int], predictions: Sequence[int], num_classes: int) -> np.ndarray:
    """cm[true, predicted] = count."""
    from sklearn.metrics import confusion_matrix as sk_confusion
    return sk_confusion(labels, predictions, labels=list(range(num_classes)))


def per_class_metrics(labels: Sequence[int], predictions: Sequence[int], class_names: Sequence[str]) -> list[dict]:
    """Precision, recall, F1 and support per class, then macro and weighted averages (scikit-learn).

    A class never predicted has precision 0 (and never present, recall 0), scikit-learn's
    zero_division=0: the averages then penalize it instead of skipping it.
    """
    from sklearn.metrics import precision_recall_fscore_support
    every = list(range(len(class_names)))
    p, r, f, support = precision_recall_fscore_support(labels, predictions, labels=every, zero_division=0)
    rows = [{"class": name, "precision": float(a), "recall": float(b), "f1": float(c), "support": int(s)}
            for name, a, b, c, s in zip(class_names, p, r, f, support)]
    for average in ("macro", "weighted"):
        a, b, c, _ = precision_recall_fscore_support(labels, predictions, labels=every, average=average,
                                                     zero_division=0)
        rows.append({"class": f"{average} avg", "precision": float(a), "recall": float(b), "f1": float(c),
                     "support": int(support.sum())})
    return rows


def write_confusion_csv(path: str, cm: np.ndarray, class_names: Sequence[str]) -> None:
    """Rows: true class; columns: predicted class."""
    run_dir.write_csv(path, ["true \\ predicted"] + list(class_names),
              [[name] + [int(v) for v in row] for name, row in zip(class_names, cm)])


def write_per_class_csv(path: str, rows: list[dict]) -> None:
    run_dir.write_csv(path, ["class", "precision", "recall", "f1", "support"],
              [[r["class"], f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]]
               for r in rows])


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], title: str = "") -> bytes:
    """PNG bytes of the confusion matrix: colour = share of the true class (row), counts in the
    cells up to 30 classes; the figure and fonts scale so ~100 class names stay readable."""
    plt = utils.pyplot()
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
    rows = per_class_metrics(labels, predictions, class_names)
    write_confusion_csv(os.path.join(eval_dir, "confusion.csv"), cm, class_names)
    write_per_class_csv(os.path.join(eval_dir, "per_class.csv"), rows)
    png = plot_confusion(cm, class_names, title)
    with open(os.path.join(eval_dir, "confusion.png"), "wb") as f:
        f.write(png)
    with tf.summary.create_file_writer(eval_dir).as_default(step=max(step, 0)):
        tf.summary.image("confusion_matrix", tf.io.decode_png(png, channels=3)[tf.newaxis])
    return {"confusion": cm, "per_class": rows}
