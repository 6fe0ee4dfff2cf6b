"""Evaluate the latest (or every new) checkpoint of a hw2 run.

    python hw2_eval.py --checkpoint_dir RUN [--test_data_path DIR] [--num_examples N] [--top_k K]
                       [--run_once 1] [--eval_dir E] [--raw] [--all_checkpoints] [--no_report]

The network is rebuilt from RUN/config.json, so no training flag has to be repeated.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time

import utils
from utils import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hw2_eval.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_dir", required=True, help="a training run (RUN) or RUN/best")
    p.add_argument("--checkpoint", help="one checkpoint prefix (default: the newest in checkpoint_dir)")
    p.add_argument("--test_data_path", help="class-folder tree to evaluate (default: RUN's validation split)")
    p.add_argument("--num_examples", type=int, help="evaluate only the first N examples")
    p.add_argument("--top_k", type=int, help="k for top-k accuracy (default: the run's top_k)")
    p.add_argument("--run_once", type=int, default=1, choices=(0, 1),
                   help="1: evaluate once; 0: evaluate every new checkpoint until none arrives for "
                        "eval_timeout_secs")
    p.add_argument("--eval_timeout_secs", type=int,
                   help="with --run_once 0: stop after this long without a new checkpoint (default: the run's)")
    p.add_argument("--eval_dir", help="where results.csv and summaries go (default: RUN/eval)")
    p.add_argument("--raw", action="store_true", help="evaluate the raw weights instead of their moving average")
    p.add_argument("--batch_size", type=int, help="eval batch size (default: the run's eval_batch_size)")
    p.add_argument("--all_checkpoints", action="store_true",
                   help="evaluate every kept checkpoint and best/, raw and EMA weights: a table and all_checkpoints.csv")
    p.add_argument("--no_report", action="store_true",
                   help="skip the per-class report (confusion.csv, per_class.csv, confusion.png) of a single evaluation")
    return p


def find_run_dir(checkpoint_dir: str) -> str:
    """RUN holds config.json; RUN/best is accepted too."""
    if not os.path.isdir(checkpoint_dir):
        raise UserError(f"checkpoint_dir not found: {checkpoint_dir}")
    for d in (checkpoint_dir, os.path.dirname(os.path.abspath(checkpoint_dir))):
        if os.path.isfile(os.path.join(d, "config.json")):
            return d
    raise UserError(f"{checkpoint_dir} is not a hw2 run directory (no config.json): "
                    "point --checkpoint_dir at a hw2_train.py --train_dir")


def eval_items(args, run_dir: str, class_names: list[str]) -> tuple[str, list, str]:
    """(data_dir, [(path, label)], description) to evaluate, labels in the training class order."""
    import hw2_dataset
    if args.test_data_path:
        scan = hw2_dataset.scan_dataset(args.test_data_path)
        unknown = [c for c in scan.class_names if c not in class_names]
        if unknown:
            raise UserError(f"test classes not seen in training: {', '.join(unknown[:5])} "
                            f"(training classes: {', '.join(class_names[:10])}{', ...' if len(class_names) > 10 else ''})")
        if scan.bad:
            logging.warning("skipping %d unusable test files, e.g. %s (%s)", len(scan.bad), *scan.bad[0])
        remap = [class_names.index(c) for c in scan.class_names]
        items = [(p, remap[label]) for p, label in scan.items]
        return scan.data_dir, items, f"test set {args.test_data_path}"
    split = hw2_dataset.load_split(os.path.join(run_dir, "split.json"))
    return split["data_dir"], split["val"], "validation split"


class Evaluator:
    """Model + restore + metrics for one run; evaluates checkpoint paths."""

    def __init__(self, cfg, class_names: list[str], top_k: int, precision_name: str | None = None):
        import tensorflow as tf

        import hw2
        self.tf, self.hw2 = tf, hw2
        self.strategy = tf.distribute.get_strategy()
        import precision
        # The run's precision on this machine, so a checkpoint scores what training measured.
        chosen = precision_name or precision.for_this_machine(cfg.get("precision", "auto"))[0]
        with precision.policy(chosen):
            self.model = hw2.build_model(cfg, len(class_names))
        self.ema = hw2.EMA(self.model, cfg.ema_decay)
        self.ckpt = tf.train.Checkpoint(model=hw2.variables_by_path(self.model), ema=self.ema.shadow)
        self.eval_step = hw2.make_eval_step(self.model, self.strategy, top_k)

    def restore(self, path: str) -> int:
        try:
            status = self.ckpt.restore(path)
            status.expect_partial().assert_existing_objects_matched()
        except (ValueError, AssertionError, self.tf.errors.OpError) as e:
            first = str(e).strip().splitlines()[0][:200]
            raise UserError(f"checkpoint {path} does not match the network in config.json: {first}") from None
        reader = self.tf.train.load_checkpoint(path)
        key = "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"
        return int(reader.get_tensor(key)) if reader.has_tensor(key) else -1

    def evaluate(self, path: str, dataset, raw: bool) -> dict:
        step = self.restore(path)
        if not raw:
            self.ema.swap()
        result = self.hw2.evaluate(self.eval_step, dataset, self.strategy)
        result["step"] = step
        return result


def report(result: dict, top_k: int, path: str, eval_dir: str, weights: str, what: str) -> None:
    import tensorflow as tf
    print(f"top-1 {result['top1']:.4f} top-{top_k} {result['topk']:.4f} n={result['n']} "
          f"(step {result['step']}, {weights} weights, {what})", flush=True)
    os.makedirs(eval_dir, exist_ok=True)
    csv_path = os.path.join(eval_dir, "results.csv")
    new = not os.path.isfile(csv_path)
    with open(csv_path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["time", "step", "checkpoint", "weights", "data", "n", "loss", "top1", f"top{top_k}"])
        w.writerow([time.strftime("%Y-%m-%d %H:%M:%S"), result["step"], path, weights, what, result["n"],
                    f"{result['loss']:.6f}", f"{result['top1']:.6f}", f"{result['topk']:.6f}"])
    with tf.summary.create_file_writer(eval_dir).as_default(step=max(result["step"], 0)):
        tf.summary.scalar(f"{weights}/top1", result["top1"])
        tf.summary.scalar(f"{weights}/top{top_k}", result["topk"])
        tf.summary.scalar(f"{weights}/loss", result["loss"])


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    utils.setup_logging()
    run_dir = find_run_dir(args.checkpoint_dir)
    saved = utils.load_json(os.path.join(run_dir, "config.json"), "run config")
    cfg, class_names = utils.config_from_json(saved["config"]), saved["class_names"]
    top_k = args.top_k or min(cfg.top_k, len(class_names))
    if not 1 <= top_k <= len(class_names):
        raise UserError(f"--top_k {top_k} must be between 1 and the number of classes ({len(class_names)})")
    if args.num_examples is not None and args.num_examples <= 0:
        raise UserError(f"--num_examples must be > 0, got {args.num_examples}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise UserError(f"--batch_size must be > 0, got {args.batch_size}")
    eval_dir = args.eval_dir or os.path.join(run_dir, "eval")
    data_dir, items, what = eval_items(args, run_dir, class_names)

    import tensorflow as tf

    import hw2_input
    dataset = hw2_input.eval_dataset(data_dir, items, cfg, args.batch_size or cfg.eval_batch_size,
                                     args.num_examples)
    evaluator = Evaluator(cfg, class_names, top_k)
    weights = "raw" if args.raw else "ema"
    import report as class_report  # per-class report and the --all_checkpoints table
    if args.all_checkpoints:
        class_report.all_checkpoints(evaluator, run_dir, dataset, top_k, eval_dir, class_names, not args.no_report)
        return 0
    if args.run_once:
        path = args.checkpoint or tf.train.latest_checkpoint(args.checkpoint_dir)
        if not path:
            raise UserError(f"no checkpoint in {args.checkpoint_dir} (train first, or pass RUN/best)")
        if not tf.io.gfile.glob(path + ".index"):
            raise UserError(f"checkpoint not found: {path}")
        report(evaluator.evaluate(path, dataset, args.raw), top_k, path, eval_dir, weights, what)
        if not args.no_report:
            class_report.class_report_for_checkpoint(evaluator, path, dataset, args.raw, class_names, eval_dir)
        return 0
    timeout = args.eval_timeout_secs or cfg.eval_timeout_secs
    logging.info("waiting for checkpoints in %s (gives up after %ds without a new one)",
                 args.checkpoint_dir, timeout)
    seen = 0
    for path in tf.train.checkpoints_iterator(args.checkpoint_dir, min_interval_secs=1,
                                              timeout=timeout):
        try:
            report(evaluator.evaluate(path, dataset, args.raw), top_k, path, eval_dir, weights, what)
            seen += 1
        except UserError as e:  # a checkpoint deleted by the trainer's keep-N policy mid-read
            logging.warning("skipped %s: %s", path, e)
    logging.info("no new checkpoint for %ds: evaluated %d, done", timeout, seen)
    return 0


def main(argv: list[str] | None = None) -> int:
    return utils.run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
