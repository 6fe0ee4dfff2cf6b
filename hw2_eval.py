"""Evaluate the latest (or every new) checkpoint of a hw2 run.

    python hw2_eval.py --checkpoint_dir RUN [--test_data_path DIR] [--num_examples N] [--top_k K]
                       [--run_once 1] [--eval_dir E] [--raw] [--all_checkpoints] [--no_report]
                       [--tta auto|none|flip] [--section S]

The network is rebuilt from RUN/config.json, so no training flag has to be repeated. --section
applies a config.cfg section's evaluation keys (eval_batch_size, top_k, eval_timeout_secs), as
the seed's command line does.
"""
from __future__ import annotations

import argparse
import logging
import os

import run_dir
import utils
from utils import UserError

EVAL_KEYS = ("eval_batch_size", "top_k", "eval_timeout_secs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hw2_eval.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_dir", "--train_dir", required=True,
                   help="a training run (RUN) or RUN/best (--train_dir: the same, as hw2_train names it)")
    p.add_argument("--checkpoint", help="one checkpoint prefix (default: the newest in checkpoint_dir)")
    p.add_argument("--test_data_path", help="class-folder tree to evaluate (default: RUN's validation split)")
    p.add_argument("--num_examples", type=int, help="evaluate a random sample of N examples (seeded)")
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
                   help="skip the per-class report (confusion.csv, per_class.csv, confusion.png) and the error "
                        "gallery (errors.csv, errors.png) of a single evaluation")
    p.add_argument("--tta", default="auto", help="test-time augmentation: flip (mean of image and mirror), none, "
                                                 "or auto (flip if the run trained with flip_lr)")
    p.add_argument("--section", help="a config.cfg section whose eval keys apply (eval_batch_size, top_k, "
                                     "eval_timeout_secs)")
    p.add_argument("--config", default=utils.DEFAULT_CONFIG, help="config file of --section")
    return p


def resolve(args, cfg, num_classes: int) -> dict:
    """top_k, batch size and timeout: a flag, else --section's value, else the run's."""
    section = utils.load_config(args.section, path=args.config) if args.section else {}
    given = {k: v for k, v in (("top_k", args.top_k), ("eval_batch_size", args.batch_size),
                               ("eval_timeout_secs", args.eval_timeout_secs)) if v is not None}
    out = {k: given.get(k, section.get(k, cfg[k])) for k in EVAL_KEYS}
    if "top_k" in given or args.section:
        run_dir.check_top_k(out["top_k"], num_classes)
    out["top_k"] = min(out["top_k"], num_classes)
    for k in ("eval_batch_size", "eval_timeout_secs"):
        if out[k] <= 0:
            raise UserError(f"--{'batch_size' if k == 'eval_batch_size' else k} must be > 0, got {out[k]}")
    return out


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    utils.setup_logging()
    run = run_dir.find(args.checkpoint_dir)
    cfg, class_names = run_dir.read_config(run)
    keys = resolve(args, cfg, len(class_names))
    if args.num_examples is not None and args.num_examples <= 0:
        raise UserError(f"--num_examples must be > 0, got {args.num_examples}")
    eval_dir = args.eval_dir or os.path.join(run, run_dir.EVAL)
    import evaluation
    import hw2_input
    data_dir, items, what = evaluation.eval_items(run, class_names, args.test_data_path)
    # Each result carries its position in items: the error gallery names the file of every mistake.
    dataset = hw2_input.eval_dataset(data_dir, items, cfg, keys["eval_batch_size"], args.num_examples,
                                     with_index=True)
    image_paths = [os.path.join(data_dir, path) for path, _ in items]
    evaluator = evaluation.Evaluator(run, keys["top_k"], tta=args.tta)
    weights = "raw" if args.raw else "ema"
    if evaluator.tta != "none":  # what auto resolved to
        what += f", tta {evaluator.tta}"
    if args.all_checkpoints:
        evaluation.all_checkpoints(evaluator, dataset, eval_dir, not args.no_report, image_paths)
        return 0
    if args.run_once:
        path = run_dir.pick_checkpoint(args.checkpoint_dir, args.checkpoint)
        result = evaluator.evaluate(path, dataset, not args.raw)
        evaluation.record(result, keys["top_k"], path, eval_dir, weights, what)
        if not args.no_report:
            evaluation.write_report(result, class_names, eval_dir, weights, image_paths)
        return 0
    return watch(args.checkpoint_dir, evaluator, dataset, keys, eval_dir, weights, what, not args.raw)


def watch(checkpoint_dir: str, evaluator, dataset, keys: dict, eval_dir: str, weights: str, what: str,
          averaged: bool) -> int:
    """Evaluate every new checkpoint until none arrives for eval_timeout_secs."""
    import tensorflow as tf

    import evaluation
    timeout = keys["eval_timeout_secs"]
    logging.info("waiting for checkpoints in %s (gives up after %ds without a new one)", checkpoint_dir, timeout)
    seen = 0
    for path in tf.train.checkpoints_iterator(checkpoint_dir, min_interval_secs=1, timeout=timeout):
        try:
            evaluation.record(evaluator.evaluate(path, dataset, averaged), keys["top_k"], path, eval_dir,
                              weights, what)
            seen += 1
        except UserError as e:  # a checkpoint deleted by the trainer's keep-N policy mid-read
            logging.warning("skipped %s: %s", path, e)
    logging.info("no new checkpoint for %ds: evaluated %d, done", timeout, seen)
    return 0


def main(argv: list[str] | None = None) -> int:
    return utils.run_cli(run, argv)


console = utils.console(main)  # the installed command: exits without TensorFlow's teardown

if __name__ == "__main__":
    console()
