"""The per-class report of an evaluation: confusion.csv, per_class.csv (precision, recall, F1,
support from scikit-learn) and confusion.png, written into an eval folder and its TensorBoard log;
and its error gallery: errors.csv (every misclassified image) and errors.png (the worst of them).
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
    zero_division=0. The averages count the classes that are present or predicted: one that is
    neither says nothing about the model, and counting its zeros made a test folder of some of
    the classes, all predicted right, read macro F1 0.5.
    """
    from sklearn.metrics import precision_recall_fscore_support
    every = list(range(len(class_names)))
    p, r, f, support = precision_recall_fscore_support(labels, predictions, labels=every, zero_division=0)
    rows = [{"class": name, "precision": float(a), "recall": float(b), "f1": float(c), "support": int(s)}
            for name, a, b, c, s in zip(class_names, p, r, f, support)]
    seen = sorted(set(map(int, labels)) | set(map(int, predictions)))
    for average in ("macro", "weighted"):
        a, b, c, _ = precision_recall_fscore_support(labels, predictions, labels=seen, average=average,
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
    name = run_dir.valid_utf8(name)  # matplotlib cannot draw a Latin-1 folder name's surrogates
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


# ------------------------------------------------------------------------------- error gallery

GALLERY_SIZE = 24  # the most confident mistakes that errors.png shows
ERROR_COLUMNS = ["path", "true_class", "predicted_class", "probability", "true_class_probability"]


def mistakes(labels: Sequence[int], probabilities: np.ndarray) -> np.ndarray:
    """Indices of the misclassified examples (top-1 as argmax: a tie goes to the lower class), the
    most confident mistake first, equal ones in their order."""
    labels = np.asarray(labels, np.int64)
    predictions = np.argmax(probabilities, axis=1) if len(labels) else np.zeros(0, np.int64)
    wrong = np.flatnonzero(predictions != labels)
    return wrong[np.argsort(-probabilities[wrong, predictions[wrong]], kind="stable")]


def write_error_gallery(labels: Sequence[int], probabilities: np.ndarray, paths: Sequence[str],
                        class_names: Sequence[str], eval_dir: str, step: int, title: str = "") -> list[dict]:
    """errors.csv (every misclassified example, most confident first: its path, true and predicted
    class, the predicted class's and the true class's probability) and errors.png (the first
    GALLERY_SIZE) into eval_dir, the image also into its TensorBoard log; returns the CSV's rows."""
    import tensorflow as tf
    os.makedirs(eval_dir, exist_ok=True)
    rows = []
    for i in mistakes(labels, probabilities):
        true, predicted = int(labels[i]), int(np.argmax(probabilities[i]))
        rows.append({"path": paths[i], "true_class": class_names[true], "predicted_class": class_names[predicted],
                     "probability": float(probabilities[i, predicted]),
                     "true_class_probability": float(probabilities[i, true])})
    run_dir.write_csv(os.path.join(eval_dir, "errors.csv"), ERROR_COLUMNS,
                      [[r["path"], r["true_class"], r["predicted_class"], f"{r['probability']:.6f}",
                        f"{r['true_class_probability']:.6f}"] for r in rows])
    png = plot_errors(rows[:GALLERY_SIZE], f"{title}{' - ' if title else ''}{len(rows)} of {len(labels)} "
                                           "misclassified, most confident first")
    with open(os.path.join(eval_dir, "errors.png"), "wb") as f:
        f.write(png)
    with tf.summary.create_file_writer(eval_dir).as_default(step=max(step, 0)):
        tf.summary.image("errors", tf.io.decode_png(png, channels=3)[tf.newaxis])
    return rows


def plot_errors(rows: list[dict], title: str = "", columns: int = 6, thumb: int = 192) -> bytes:
    """PNG bytes of a grid of mistakes (write_error_gallery's rows), each image upright as hw2 reads
    it, under its file name, true class, and predicted class with its probability."""
    import hw2_dataset
    plt = utils.pyplot()
    columns = max(1, min(columns, len(rows)))
    lines = max(1, -(-len(rows) // columns))
    fig, axes = plt.subplots(lines, columns, figsize=(max(6.0, 2.3 * columns + 0.4), 2.75 * lines + 0.6),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, r in zip(axes.ravel(), rows):
        try:
            ax.imshow(hw2_dataset.read_image(r["path"], short_side=thumb))
        except ValueError:  # the file went away or broke since it was evaluated
            ax.text(0.5, 0.5, "unreadable now", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        name = _short_name(os.path.basename(run_dir.valid_utf8(r["path"])), 26)
        ax.set_title(f"{name}\ntrue: {_short_name(r['true_class'])}\n"
                     f"predicted: {_short_name(r['predicted_class'], 16)} {r['probability']:.3f}", fontsize=8)
    if not rows:
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=11)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
