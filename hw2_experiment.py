"""Ablation grids and k-fold cross-validation: every combination is an ordinary hw2 run.

    python hw2_experiment.py --data_dir DIR --out EXP --section S \\
        --grid norm=batch,instance,none --grid residual=true,false [--folds K] [--max_epochs E] \\
        [--plan] [--parallel N] [--<config key> V ...]

Each variant (x fold) trains in EXP/<variant>[/fold-i]/ through training.train: the same loop,
checkpoints, logs and resume as hw2_train.py. RUN/result.json marks a finished run, so running
the same command again skips finished runs and resumes an interrupted one from its checkpoint.
A failed run (RUN/error.txt) is reported in the table and does not stop the others.
Writes EXP/results.csv, EXP/results.md (sorted by val top-1) and EXP/curves.png.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import logging
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

import run_dir
import utils
from utils import UserError

RESULT, ERROR, HISTORY = "result.json", "error.txt", "history.json"


@dataclass
class Run:
    variant: str          # "norm=batch,residual=true", or "base" without a grid
    values: dict          # the grid's config overrides for this variant
    fold: int | None      # None without --folds
    train_dir: str


# ----------------------------------------------------------------------------------- planning

def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """['norm=batch,none', 'conv_stack=32,64|64,128'] -> [('norm', ['batch', 'none']),
    ('conv_stack', ['32,64', '64,128'])]: keys whose values are lists separate them with |."""
    grid, seen = [], set()
    for spec in specs:
        key, eq, values = spec.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        options = [v.strip() for v in values.split("|" if "|" in values else ",") if v.strip()]
        if not eq or not key or not options:
            raise UserError(f"--grid {spec!r}: expected KEY=V1,V2,... (e.g. --grid norm=batch,none)")
        if key in seen:
            raise UserError(f"--grid names '{key}' twice: list all its values in one --grid")
        seen.add(key)
        grid.append((key, options))
    return grid


def variant_values(grid: list[tuple[str, list[str]]]) -> list[dict]:
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in grid))]


def variant_name(values: Mapping) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items()) or "base"


def variant_dir(values: Mapping) -> str:
    """A folder name that needs no quoting in a shell: norm-batch_residual-true."""
    name = "_".join(f"{k}-{v}" for k, v in values.items()) or "base"
    return re.sub(r"[^A-Za-z0-9.+_-]", "-", name)


def plan_runs(out: str, grid: list[tuple[str, list[str]]], folds: int) -> list[Run]:
    runs, dirs = [], {}
    for values in variant_values(grid):
        base = os.path.join(out, variant_dir(values))
        if base in dirs:  # "a b" and "a-b" would train into one folder and count as one variant
            raise UserError(f"--grid variants {dirs[base]} and {variant_name(values)} would share the "
                            f"folder {base}: give them values that differ in letters or digits")
        dirs[base] = variant_name(values)
        for fold in (range(folds) if folds else [None]):
            train_dir = base if fold is None else os.path.join(base, f"fold-{fold}")
            runs.append(Run(variant_name(values), values, fold, train_dir))
    return runs


def run_status(run: Run) -> str:
    """'done', 'failed', 'step N' (interrupted: resumes there) or 'new'."""
    if os.path.isfile(os.path.join(run.train_dir, RESULT)):
        return "done"
    steps = [int(m.group(1)) for f in _listdir(run.train_dir) if (m := re.fullmatch(r"ckpt-(\d+)\.index", f))]
    if os.path.isfile(os.path.join(run.train_dir, ERROR)):
        return "failed"
    return f"step {max(steps)}" if steps else "new"


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


# ------------------------------------------------------------------------------------ one run

class History:
    """Training hook: every validation row, kept in RUN/history.json across resumes."""

    def __init__(self, train_dir: str):
        self.path = os.path.join(train_dir, HISTORY)
        self.rows: list[dict] = []
        self.info: dict = {}

    def on_start(self, info: Mapping) -> None:
        start = info["start_step"]
        self.info = {"params": info["params"], "steps_per_epoch": info["steps_per_epoch"],
                     "global_batch": info["global_batch"]}
        old = run_dir.load_json(self.path, "history") if os.path.isfile(self.path) else []
        # Rows after the checkpoint we resume from belong to steps that will run again.
        self.rows = [r for r in old if r["step"] <= start]
        self._first = True
        self._last_step = start

    def on_validation(self, row: Mapping) -> None:
        keep = ("step", "epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_topk",
                "is_best", "seconds")
        r = {k: row[k] for k in keep}
        # The first window after a (re)start includes tracing: left out of img/s.
        r["images"] = (row["step"] - self._last_step) * self.info["global_batch"]
        self.info["top_k"] = row["top_k"]
        r["warmup"] = self._first
        self._first, self._last_step = False, row["step"]
        self.rows.append(r)
        run_dir.save_json(self.path, self.rows)


def run_one(run: Run, args, overrides: dict, scan_fn) -> dict:
    """Train (or resume) one run with the training loop and run directory of hw2_train.py; writes
    RUN/result.json. A new run's skipped files go to RUN/bad_images.txt, as hw2_train.py's do."""
    import run_dir
    import run_record
    import training
    cfg = run_dir.resolve_config(run.train_dir, args.section, {**overrides, **run.values}, args.config)
    with run_dir.prepare(run.train_dir, fresh=False):
        folds, fold = (args.folds, run.fold) if run.fold is not None else (0, 0)
        new = not os.path.isfile(os.path.join(run.train_dir, run_dir.SPLIT))
        split = run_dir.prepare_split(run.train_dir, cfg, folds=folds, fold=fold, scan=scan_fn() if new else None)
        cfg = run_dir.resolve_auto(cfg, split, run.train_dir)
        run_dir.save_config(run.train_dir, args.section, cfg, split["class_names"])
        history = History(run.train_dir)
        hooks = [history, run_record.RunRecord(run.train_dir, plot_every_seconds=math.inf)]
        best = training.train(cfg, split, run.train_dir, hooks=hooks)
        result = summarize_run(run, history.rows, history.info, best)
        run_dir.save_json(os.path.join(run.train_dir, RESULT), result)
    return result


def summarize_run(run: Run, rows: list[dict], info: Mapping, best: Mapping) -> dict:
    timed = [r for r in rows if not r["warmup"]] or rows
    seconds = sum(r["seconds"] for r in timed)
    best_rows = [r for r in rows if r["step"] == best.get("step")]
    return {"variant": run.variant, "values": run.values, "fold": run.fold,
            "top1": best["top1"], "topk": best["topk"], "best_step": best.get("step"),
            "best_epoch": best_rows[-1]["epoch"] if best_rows else float("nan"),
            "train_seconds": sum(r["seconds"] for r in rows),
            "img_per_sec": sum(r["images"] for r in timed) / seconds if seconds > 0 else float("nan"),
            "params": info.get("params"), "top_k": info.get("top_k", 5), "rows": rows}


# ------------------------------------------------------------------------------------ the table

COLUMNS = ["variant", "runs", "failed", "val_top1_mean", "val_top1_std", "val_topk_mean", "val_topk_std",
           "best_epoch", "train_seconds", "img_per_sec", "params", "status"]


def collect(runs: list[Run]) -> list[dict]:
    """One row per variant from its runs' result.json / error.txt, sorted by mean val top-1."""
    by_variant: dict[str, list[Run]] = {}
    for run in runs:
        by_variant.setdefault(run.variant, []).append(run)
    table = []
    for variant, group in by_variant.items():
        results, errors = [], []
        for run in group:
            path = os.path.join(run.train_dir, RESULT)
            if os.path.isfile(path):
                results.append(run_dir.load_json(path, "run result"))
            elif os.path.isfile(os.path.join(run.train_dir, ERROR)):
                with open(os.path.join(run.train_dir, ERROR), encoding="utf-8") as f:
                    errors.append((f.read().strip().splitlines() or ["failed"])[0])
        row = {"variant": variant, "values": group[0].values, "runs": len(results), "failed": len(errors),
               "results": results}
        for key in ("top1", "topk"):
            v = np.array([r[key] for r in results], float)
            row[f"val_{key}_mean"] = float(v.mean()) if v.size else float("nan")
            row[f"val_{key}_std"] = float(v.std(ddof=1)) if v.size > 1 else float("nan")
        for key, col in (("best_epoch", "best_epoch"), ("train_seconds", "train_seconds"),
                         ("img_per_sec", "img_per_sec")):
            v = np.array([r[key] for r in results], float)
            row[col] = float(v.mean()) if v.size else float("nan")
        row["params"] = results[0]["params"] if results else ""
        missing = len(group) - len(results) - len(errors)
        row["status"] = ("ok" if not errors and not missing else
                         f"{len(errors)} failed: {errors[0]}" if errors else f"{missing} not finished")
        table.append(row)
    return sorted(table, key=lambda r: (r["runs"] == 0, -_or(r["val_top1_mean"], -1.0)))


def _or(x: float, default: float) -> float:
    return default if x is None or (isinstance(x, float) and math.isnan(x)) else x


def write_csv(path: str, table: list[dict], grid_keys: list[str]) -> None:
    header = COLUMNS[:1] + grid_keys + COLUMNS[1:]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in table:
            cells = [row["variant"], *(row["values"].get(k, "") for k in grid_keys)]
            for col in COLUMNS[1:]:
                v = row[col]
                cells.append("" if isinstance(v, float) and math.isnan(v) else
                             f"{v:.6g}" if isinstance(v, float) else v)
            w.writerow(cells)


def markdown(table: list[dict], folds: int, top_k: int = 5) -> str:
    def pm(mean: float, std: float) -> str:
        if math.isnan(mean):
            return "-"
        return f"{mean:.4f}" + ("" if math.isnan(std) else f" ± {std:.4f}")

    over = f" (mean ± std over {folds} folds)" if folds else ""
    def num(x: float, fmt: str) -> str:
        return "-" if x == "" or math.isnan(x) else format(x, fmt)

    lines = [f"| variant | val top-1{over} | val top-{top_k} | best epoch | train time (s) | img/s | params | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['variant']} | {pm(r['val_top1_mean'], r['val_top1_std'])} | "
                     f"{pm(r['val_topk_mean'], r['val_topk_std'])} | {num(r['best_epoch'], '.1f')} | "
                     f"{num(r['train_seconds'], '.0f')} | {num(r['img_per_sec'], '.0f')} | "
                     f"{num(r['params'], ',')} | {r['status']} |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: str, title: str) -> None:
    """Val top-1 (solid) and train top-1 (dashed) over epochs, one colour per variant, fold means."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [r for r in table if r["results"]]
    colors = plt.get_cmap("tab10" if len(drawn) <= 10 else "tab20").colors
    fig, ax = plt.subplots(figsize=(11, 6))
    for i, r in enumerate(drawn):
        n = min(len(res["rows"]) for res in r["results"])
        if n == 0:
            continue

        def mean(key: str) -> np.ndarray:
            return np.mean([[row[key] for row in res["rows"][:n]] for res in r["results"]], axis=0)

        color = colors[i % len(colors)]
        epoch = mean("epoch")
        ax.plot(epoch, mean("val_top1"), "-", color=color, marker="o", markersize=3, linewidth=1.8,
                label=f"{r['variant']} ({r['val_top1_mean']:.3f})")
        ax.plot(epoch, mean("train_top1"), "--", color=color, linewidth=1.0, alpha=0.8)
    ax.plot([], [], "k-", label="val top-1 (EMA weights)")
    ax.plot([], [], "k--", label="train top-1")
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(out: str, runs: list[Run], grid_keys: list[str], folds: int, title: str) -> list[dict]:
    table = collect(runs)
    write_csv(os.path.join(out, "results.csv"), table, grid_keys)
    top_k = next((res["top_k"] for r in table for res in r["results"]), 5)
    text = markdown(table, folds, top_k)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"# {title}\n\n{text}")
    try:
        plot(table, os.path.join(out, "curves.png"), title)
    except Exception as e:  # the table matters more than the picture
        logging.warning("could not draw curves.png: %s", e)
    print(text, end="", flush=True)
    return table


# ------------------------------------------------------------------------------------ command line

def build_parser() -> argparse.ArgumentParser:
    import config_keys
    p = argparse.ArgumentParser(prog="hw2_experiment.py", description=__doc__, epilog=config_keys.help_text(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", help="class-folder dataset (not needed to re-run finished or split runs)")
    p.add_argument("--out", required=True, help="experiment folder: one run folder per variant (x fold)")
    p.add_argument("--section", default="default", help="config.cfg section every run starts from")
    p.add_argument("--config", default=utils.DEFAULT_CONFIG)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values; several --grid flags make every combination; "
                   "list-valued keys separate their values with | (--grid 'conv_stack=32,64|64,128')")
    p.add_argument("--folds", type=int, default=0, help="K >= 2: stratified K-fold cross-validation")
    p.add_argument("--max_epochs", type=int, default=0, help="epochs per run (default: the config's)")
    p.add_argument("--plan", action="store_true", help="list the runs and their state, train nothing")
    p.add_argument("--parallel", type=int, default=1, help="N runs at once, one device each (GPUs only)")
    p.add_argument("--only", help=argparse.SUPPRESS)  # one run folder: what a --parallel worker trains
    return p


def run(argv: list[str]) -> int:
    args, rest = build_parser().parse_known_args(argv)
    utils.setup_logging()
    overrides = utils.parse_overrides(rest)
    if args.max_epochs:
        overrides["max_epochs"] = str(args.max_epochs)
    if args.folds == 1 or args.folds < 0:
        raise UserError(f"--folds must be 0 (one split) or at least 2, got {args.folds}")
    run_dir.check_run_path(args.out, "--out")
    run_dir.check_apart(args.out, args.data_dir, "--out")
    grid = parse_grid(args.grid)
    for key, _ in grid:
        if key in ("data_dir", "train_dir", "section"):
            raise UserError(f"--grid {key}: only config keys can be varied")
    runs = plan_runs(args.out, grid, args.folds)
    for values in variant_values(grid):  # a typo in the grid stops before any training
        utils.load_config(args.section, {**overrides, **values}, args.config)

    if args.plan:
        print(f"{utils.count(len(runs), 'run')} in {args.out} ({utils.count(len(variant_values(grid)), 'variant')}"
              f"{f' x {args.folds} folds' if args.folds else ''}):")
        for r in runs:
            print(f"  {run_status(r):>10}  {r.train_dir}  {r.variant}{'' if r.fold is None else f' fold {r.fold}'}")
        return 0
    os.makedirs(args.out, exist_ok=True)
    if args.only:
        runs = [r for r in runs if os.path.normpath(r.train_dir) == os.path.normpath(args.only)]

    scan_cache = []

    def scan():
        if not scan_cache:
            import hw2_dataset
            if not args.data_dir:
                raise UserError("--data_dir is required for runs that have not started yet")
            scan_cache.append(hw2_dataset.scan_dataset(args.data_dir))
        return scan_cache[0]

    pending = [r for r in runs if run_status(r) != "done"]
    for r in runs:
        if r not in pending:
            logging.info("skipping %s (finished)", r.train_dir)
    workers = _parallel_devices(args.parallel) if pending and not args.only else 0
    if workers > 1:
        _run_parallel(pending, argv, workers)
    else:
        for i, r in enumerate(pending):
            logging.info("=== run %d of %d: %s%s -> %s", i + 1, len(pending), r.variant,
                         "" if r.fold is None else f" fold {r.fold}", r.train_dir)
            _run_guarded(r, args, overrides, scan)
    if args.only:  # a --parallel worker: its exit code tells the parent
        return 1 if any(run_status(r) == "failed" for r in runs) else 0
    title = f"{os.path.basename(os.path.abspath(args.out))}: section {args.section}"
    table = write_reports(args.out, runs, [k for k, _ in grid], args.folds, title)
    logging.info("wrote %s, %s and %s", *(os.path.join(args.out, f) for f in ("results.csv", "results.md",
                                                                                 "curves.png")))
    return 1 if any(r["failed"] for r in table) else 0


def _run_guarded(r: Run, args, overrides: dict, scan) -> None:
    """One run; an error is written to RUN/error.txt and logged, and the next run goes on."""
    error_path = os.path.join(r.train_dir, ERROR)
    t0 = time.time()
    try:
        result = run_one(r, args, overrides, scan)
        if os.path.isfile(error_path):
            os.remove(error_path)
        logging.info("finished %s: val top-1 %.4f in %.0f s", r.train_dir, result["top1"], time.time() - t0)
    except run_dir.RunInUse as e:  # another experiment process on the same --out is training it
        logging.info("skipping %s: another process is training it (%s)", r.train_dir, e.holder)
    except Exception as e:  # noqa: BLE001 - one broken variant must not cost the others
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, UserError):
            message = f"{type(e).__name__}: {message}"
            logging.debug("run %s failed", r.train_dir, exc_info=True)
        _write_error(r, message)
    finally:
        import keras
        keras.backend.clear_session()  # each run builds a fresh model; drop the last one's graph


def _parallel_devices(n: int) -> int:
    if n <= 1:
        return 1
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) < 2:
        logging.info("--parallel %d: %d GPU(s) here, so the runs go one after another", n, len(gpus))
        return 1
    return min(n, len(gpus))


def _run_parallel(pending: list[Run], argv: list[str], workers: int) -> None:
    """Each run in its own process, pinned to one GPU via CUDA_VISIBLE_DEVICES. A process that
    dies before writing its result or error (killed, out of memory) gets an error.txt, so the
    table marks it failed."""
    argv = [a for i, a in enumerate(argv) if a != "--parallel" and (i == 0 or argv[i - 1] != "--parallel")]
    argv = [a for a in argv if not a.startswith("--parallel=")]
    queue, running = list(pending), {}
    while queue or running:
        while queue and len(running) < workers:
            device = next(d for d in range(workers) if d not in running)
            r = queue.pop(0)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(device)}
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--only", r.train_dir]
            logging.info("GPU %d: %s", device, r.train_dir)
            running[device] = (r, subprocess.Popen(cmd, env=env))
        time.sleep(2)
        for device, (r, proc) in list(running.items()):
            if proc.poll() is not None:
                del running[device]
                if proc.returncode != 0 and run_status(r) != "failed":
                    _write_error(r, f"the run's process exited with code {proc.returncode}")


def _write_error(r: Run, message: str) -> None:
    os.makedirs(r.train_dir, exist_ok=True)
    with open(os.path.join(r.train_dir, ERROR), "w", encoding="utf-8") as f:
        f.write(message + "\n")
    logging.error("run %s failed: %s", r.train_dir, message)


def main(argv: list[str] | None = None) -> int:
    return utils.run_cli(run, argv)


console = utils.console(main)  # the installed command: exits without TensorFlow's teardown

if __name__ == "__main__":
    console()
