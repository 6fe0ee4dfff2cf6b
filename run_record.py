"""The run record, a training hook: RUN/run.json (how the run was made), RUN/summary.csv (one
row per validation) and RUN/curves.png (loss, top-1 and LR against the step).

TensorFlow is imported only inside the functions that need it; matplotlib always runs on Agg.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import hashlib
import logging
import math
import os
import platform
import subprocess
import time
from typing import Mapping

import numpy as np

import run_dir
import utils

HW2_VERSION = "0.1.0"
HERE = os.path.dirname(os.path.abspath(__file__))

# summary.csv columns. The loop validates with the EMA weights, hence the _ema suffix; train_loss
# is the optimized loss (cross-entropy + L2) averaged since the previous validation, val_loss is
# cross-entropy only. val_topk_ema is top-`top_k` accuracy.
SUMMARY_COLUMNS = ["step", "epoch", "lr", "train_loss", "train_top1", "val_loss_ema", "val_top1_ema",
                   "val_topk_ema", "top_k", "is_best", "seconds", "time"]


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
    """Training hook: writes run.json at start, a summary.csv row per validation, and curves.png
    at a validation when plot_every_seconds have passed since it was last drawn, and at the end
    (drawing takes ~0.5 s: on a small dataset validating every few seconds, that adds up).

    A resumed run keeps summary.csv's history: rows after the step it resumes from (left by a run
    that died between saving a checkpoint and the next one) are dropped, then new rows append.
    """

    def __init__(self, train_dir: str, plot_every_seconds: float = 60.0):
        self.train_dir = train_dir
        self.plot_every_seconds, self.plotted = plot_every_seconds, -math.inf
        self.unwritten: list[dict] = []  # summary rows that could not be written yet
        self.summary_path = os.path.join(train_dir, run_dir.SUMMARY)
        self.curves_path = os.path.join(train_dir, run_dir.CURVES)

    def on_start(self, info: Mapping) -> None:
        self.plotted = time.monotonic()  # the first drawing waits plot_every_seconds (or the end)
        cfg = info["cfg"]
        split_path = os.path.join(self.train_dir, run_dir.SPLIT)
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
            "precision": info.get("precision"),  # what --precision picked on this machine
            "params": info["params"],
            "config": dict(cfg),
        }
        path = os.path.join(self.train_dir, run_dir.RUN_RECORD)
        if info["start_step"] and os.path.isfile(path):
            try:
                old = run_dir.load_json(path, "run record")
                record["previous_starts"] = old.pop("previous_starts", []) + [
                    {k: old.get(k) for k in ("started", "start_step", "git_commit", "tensorflow", "devices")}]
            except utils.UserError as e:  # a damaged record must not stop training
                logging.warning("%s: starting a new run record", e)
        run_dir.save_json(path, record)
        self._trim_summary(info["start_step"])

    def on_validation(self, row: Mapping) -> None:
        self.unwritten.append({
            "step": row["step"], "epoch": f"{row['epoch']:.3f}", "lr": f"{row['lr']:.6g}",
            "train_loss": f"{row['train_loss']:.6f}", "train_top1": f"{row['train_top1']:.6f}",
            "val_loss_ema": f"{row['val_loss']:.6f}", "val_top1_ema": f"{row['val_top1']:.6f}",
            "val_topk_ema": f"{row['val_topk']:.6f}", "top_k": row["top_k"],
            "is_best": int(bool(row["is_best"])), "seconds": f"{row['seconds']:.1f}",
            "time": datetime.datetime.now().isoformat(timespec="seconds"),
        })
        self._write_rows()
        if time.monotonic() - self.plotted >= self.plot_every_seconds:
            self._plot()

    def on_end(self, best: Mapping) -> None:
        self._write_rows(last=True)
        if math.isfinite(self.plot_every_seconds):  # inf: the caller draws (hw2_experiment's curves.png)
            self._plot()

    def _write_rows(self, last: bool = False) -> None:
        """Append the unwritten rows to summary.csv. Where it cannot be written (on Windows, open in
        Excel, which locks it; a full disk) the training goes on and they wait for the next try."""
        if not self.unwritten:
            return
        size = os.path.getsize(self.summary_path) if os.path.isfile(self.summary_path) else None
        try:
            with open(self.summary_path, "a", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, SUMMARY_COLUMNS)
                if size is None:
                    w.writeheader()
                w.writerows(self.unwritten)
            self.unwritten = []
        except OSError as e:
            with contextlib.suppress(OSError):  # no half row (or header) for the next try to follow
                if size is None:
                    os.remove(self.summary_path)
                else:
                    os.truncate(self.summary_path, size)
            logging.warning("could not write %s (%s): is it open in another program? %s", self.summary_path,
                            e.strerror or e, f"{len(self.unwritten)} row(s) not written (the run's end)" if last else
                            f"Training goes on; {len(self.unwritten)} row(s) wait for the next validation")

    def _plot(self) -> None:
        self.plotted = time.monotonic()
        try:
            plot_curves(read_summary(self.summary_path), self.curves_path,
                        title=run_dir.valid_utf8(os.path.basename(os.path.abspath(self.train_dir))))
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
            run_dir.write_csv(self.summary_path, SUMMARY_COLUMNS, [[r.get(c, "") for c in SUMMARY_COLUMNS] for r in kept])


def read_summary(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def plot_curves(rows: list[dict], path: str, title: str = "") -> None:
    """Loss, top-1 (train and val) and learning rate against the step, from summary.csv rows."""
    if not rows:
        return
    plt = utils.pyplot()
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
    # Fixed margins: tight_layout took 40% of the drawing time (drawn at every validation).
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.12, top=0.86 if title else 0.91, wspace=0.22)
    fig.savefig(path, dpi=90)
    plt.close(fig)
