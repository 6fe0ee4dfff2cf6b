"""Train hw2 on several devices of one machine: the same loop as hw2_train.py under MirroredStrategy.

    python hw2_multi_gpu_train.py --data_dir DIR --train_dir RUN --num_gpus N [same flags as hw2_train.py]

batch_size is per replica; the global batch is batch_size x N. With fewer GPUs than asked (or
none), N logical CPU devices are used so the multi-device path still runs, and the log says so.
Several machines (MultiWorkerMirroredStrategy, --worker_hosts/--task_index), LR scaling and
synchronized batch norm are not built yet: they arrive with the multi-device issue.
"""
from __future__ import annotations

import argparse
import logging
import sys

import hw2_train
import utils
from utils import UserError


def mirrored_strategy(num_gpus: int):
    """MirroredStrategy over num_gpus GPUs, or over as many logical CPU devices when GPUs are missing."""
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= num_gpus:
        devices = [f"/gpu:{i}" for i in range(num_gpus)]
    else:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * num_gpus)
        devices = [f"/cpu:{i}" for i in range(num_gpus)]
        logging.info("%d GPU(s) found, %d asked: running %d logical CPU devices instead (for testing the "
                     "multi-device path; no faster than one device)", len(gpus), num_gpus, num_gpus)
    strategy = tf.distribute.MirroredStrategy(devices)
    logging.info("MirroredStrategy over %s", ", ".join(devices))
    return strategy


def run(argv: list[str]) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--num_gpus", type=int, default=1)
    args, rest = pre.parse_known_args(argv)
    if args.num_gpus < 1:
        raise UserError(f"--num_gpus must be >= 1, got {args.num_gpus}")
    if any(a.startswith(("--worker_hosts", "--task_index")) for a in rest):
        raise UserError("training across machines (--worker_hosts/--task_index) is not built yet; "
                        "use --num_gpus on one machine")
    return hw2_train.run(rest, strategy_fn=lambda: mirrored_strategy(args.num_gpus),
                         prog="hw2_multi_gpu_train.py")


def main(argv: list[str] | None = None) -> int:
    return utils.run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
