"""Train hw2 on a class-folder dataset, on CPU or one GPU.

    python hw2_train.py --data_dir DIR --train_dir RUN [--section S] [--<config key> V ...]

The loop itself is training.train; hw2_multi_gpu_train.py runs this same script's `run` under
another tf.distribute strategy.
"""
from __future__ import annotations

import argparse
import logging
import time

import run_dir
import utils


def build_parser(prog: str = "hw2_train.py") -> argparse.ArgumentParser:
    import config_keys
    p = argparse.ArgumentParser(prog=prog, description="Train hw2 on DATA_DIR/<class>/<image>. Any config key "
                                "can be given as --key value\n(listed below; config.cfg says more).",
                                epilog=config_keys.help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", help="class-folder dataset (not needed to resume an existing RUN)")
    p.add_argument("--train_dir", required=True, help="run directory: checkpoints, logs, config")
    p.add_argument("--section", default="default", help="config.cfg section (default: default)")
    p.add_argument("--config", default=utils.DEFAULT_CONFIG, help="config file")
    p.add_argument("--split", help="an existing split file (hw2_dataset.py --out) instead of a new split")
    p.add_argument("--fresh", action="store_true",
                   help="start over: an existing RUN is moved aside to RUN-old-<time>, never deleted")
    return p


def run(argv: list[str], strategy_fn=None, prog: str = "hw2_train.py") -> int:
    """Parse flags, prepare RUN, train. `strategy_fn()` lets the multi-device script pick a strategy."""
    # A --time_budget counts from the process's start when run as a command (the imports too),
    # else from here (a call from Python): the image checks and decoding count either way.
    started = time.monotonic() if utils.COMMAND_STARTED is None else utils.COMMAND_STARTED
    args, rest = build_parser(prog).parse_known_args(argv)
    utils.setup_logging()
    run_dir.check_run_path(args.train_dir)
    run_dir.check_apart(args.train_dir, args.data_dir)
    overrides = utils.parse_overrides(rest)
    cfg = run_dir.resolve_config(args.train_dir, args.section, overrides, args.config, args.fresh)
    import training
    strategy = strategy_fn() if strategy_fn else None
    chief = strategy is None or training.is_chief(strategy)
    with run_dir.prepare(args.train_dir, args.fresh, chief):
        split = run_dir.prepare_split(args.train_dir, cfg, args.data_dir, args.split)
        cfg = run_dir.resolve_auto(cfg, split, args.train_dir)
        num_classes = len(split["class_names"])
        if "top_k" in overrides:
            run_dir.check_top_k(cfg.top_k, num_classes)
        elif cfg.top_k > num_classes:
            logging.info("top_k %d > %d classes: reporting top-%d", cfg.top_k, num_classes, num_classes)
        run_dir.save_config(args.train_dir, args.section, cfg, split["class_names"])
        import run_record
        training.train(cfg, split, args.train_dir, strategy, hooks=[run_record.RunRecord(args.train_dir)],
                       resume=chief or not args.fresh, started=started)
    return 0


def main(argv: list[str] | None = None) -> int:
    return utils.run_cli(run, argv)


console = utils.console(main)  # the installed command: exits without TensorFlow's teardown

if __name__ == "__main__":
    console()
