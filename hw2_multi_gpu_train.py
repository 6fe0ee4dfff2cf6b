"""Train hw2 on several devices or machines: the same loop as hw2_train.py under tf.distribute.

One machine, N GPUs (MirroredStrategy):
    python hw2_multi_gpu_train.py --data_dir DIR --train_dir RUN --num_gpus N [flags of hw2_train.py]
Several machines (MultiWorkerMirroredStrategy), one command per machine:
    python hw2_multi_gpu_train.py --data_dir DIR --train_dir RUN --worker_hosts h1:port,h2:port --task_index I
(or with TF_CONFIG already set). Worker 0 is the chief: only it writes RUN.

batch_size is per replica: the global batch is batch_size x replicas, and `lr_scaling` says how the
learning rate follows it. Asking for more GPUs than the machine has is an error; on a machine
without GPUs (or with --cpu_devices N) logical CPU devices run the same multi-device path, and the
log says so. Several machines need one RUN they all see (a shared folder): see README.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import hw2_train
import utils
from utils import UserError


def local_devices(num_gpus: int, cpu_devices: int = 0) -> list[str]:
    """The devices one machine trains on: num_gpus GPUs; N logical CPU devices only when asked for
    with cpu_devices, or when the machine has no GPU at all (logged). Fewer GPUs than asked for is
    an error: silently running on CPUs would leave the GPUs idle."""
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if not cpu_devices and gpus:
        if len(gpus) < num_gpus:
            raise UserError(f"--num_gpus {num_gpus}, but this machine has {len(gpus)} GPU(s): "
                            f"use --num_gpus {len(gpus)}")
        return [f"/gpu:{i}" for i in range(num_gpus)]
    n = cpu_devices or num_gpus
    if n > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    why = "as asked (--cpu_devices)" if cpu_devices else "no GPU here"
    logging.info("%s: running %d logical CPU device(s) (this exercises the multi-device path; it is not "
                 "faster than one device)", why, n)
    return [f"/cpu:{i}" for i in range(n)]


def make_strategy(num_gpus: int, multi_worker: bool, cpu_devices: int = 0):
    import tensorflow as tf
    if multi_worker:
        spec = json.loads(os.environ["TF_CONFIG"])
        if cpu_devices or (num_gpus > 1 and not tf.config.list_physical_devices("GPU")):
            local_devices(num_gpus, cpu_devices)
        # RING all-reduce works everywhere; NCCL is picked automatically for GPUs.
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        task = spec.get("task", {})
        logging.info("MultiWorkerMirroredStrategy: %s %s of %s, %d replica(s) in all",
                     task.get("type"), task.get("index"), spec.get("cluster"), strategy.num_replicas_in_sync)
        return strategy
    devices = local_devices(num_gpus, cpu_devices)
    strategy = tf.distribute.MirroredStrategy(devices) if len(devices) > 1 else tf.distribute.OneDeviceStrategy(devices[0])
    logging.info("%s over %s", type(strategy).__name__, ", ".join(devices))
    return strategy


def run(argv: list[str]) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--num_gpus", type=int, default=1)
    pre.add_argument("--cpu_devices", type=int, default=0,
                     help="N logical CPU devices instead of GPUs (tests the multi-device path, not faster)")
    pre.add_argument("--worker_hosts", help="host:port,host:port,... of every worker (same order on each)")
    pre.add_argument("--task_index", type=int, help="this machine's index in --worker_hosts (0 = chief)")
    args, rest = pre.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(__doc__)
    if args.num_gpus < 1:
        raise UserError(f"--num_gpus must be >= 1, got {args.num_gpus}")
    if args.cpu_devices < 0:
        raise UserError(f"--cpu_devices must be >= 0, got {args.cpu_devices}")
    if args.worker_hosts:
        hosts = [h.strip() for h in args.worker_hosts.split(",") if h.strip()]
        if any(":" not in h for h in hosts):
            raise UserError(f"--worker_hosts must list host:port entries, got '{args.worker_hosts}'")
        if args.task_index is None or not 0 <= args.task_index < len(hosts):
            raise UserError(f"--task_index must be between 0 and {len(hosts) - 1} with {len(hosts)} worker hosts")
        os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": hosts},
                                              "task": {"type": "worker", "index": args.task_index}})
    elif args.task_index is not None:
        raise UserError("--task_index needs --worker_hosts")
    multi_worker = "TF_CONFIG" in os.environ
    if multi_worker:
        try:
            json.loads(os.environ["TF_CONFIG"])["cluster"]
        except (ValueError, KeyError, TypeError):
            raise UserError("TF_CONFIG is set but is not JSON with a 'cluster' entry") from None
    return hw2_train.run(rest, strategy_fn=lambda: make_strategy(args.num_gpus, multi_worker, args.cpu_devices),
                         prog="hw2_multi_gpu_train.py")


def main(argv: list[str] | None = None) -> int:
    return utils.run_cli(run, argv)


console = utils.console(main)  # one machine exits without TensorFlow's teardown; several workers do not

if __name__ == "__main__":
    console()
