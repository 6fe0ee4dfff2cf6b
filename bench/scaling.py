"""Step time at one global batch on 1, 2 and 4 devices and on 2 local workers, as ratios to 1 device.

    python bench/scaling.py [--section demo] [--global_batch 128] [--steps 20] [--quick]

On a CPU-only machine the devices are logical CPU devices sharing the same cores, so the ratio
measures the overhead of the multi-device path (target <= 1.15x), not a speed-up. With GPUs,
--gpus runs 1 vs all GPUs and prints img/s for both.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def child(args) -> None:
    """Time `steps` train steps on `devices` devices (or as one worker of TF_CONFIG)."""
    import numpy as np
    import tensorflow as tf

    import hw2
    import training
    import utils
    if args.devices > 1 and not args.gpu:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.devices)
    if "TF_CONFIG" in os.environ:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif args.devices > 1:
        kind = "gpu" if args.gpu else "cpu"
        strategy = tf.distribute.MirroredStrategy([f"/{kind}:{i}" for i in range(args.devices)])
    else:
        strategy = tf.distribute.get_strategy()
    cfg = utils.load_config(args.section)
    replicas = strategy.num_replicas_in_sync
    gb = args.global_batch
    state = training.create_train_state(cfg, 10, strategy)
    rng = np.random.default_rng(0)
    s = cfg.image_size
    # Each element is a global batch: tf.distribute rebatches it into per-worker, per-replica shares.
    x = rng.normal(size=(gb, s, s, 3)).astype(np.float32)
    y = rng.integers(0, 10, gb).astype(np.int32)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    it = iter(strategy.experimental_distribute_dataset(ds.with_options(opts)))
    step = hw2.make_train_step(state.model, state.optimizer, state.ema, strategy, gb)
    for _ in range(3):
        float(step(it)[0])
    t = time.perf_counter()
    for _ in range(args.steps):
        float(step(it)[0])
    dt = (time.perf_counter() - t) / args.steps
    print(json.dumps({"replicas": replicas, "sec_per_step": dt, "img_per_sec": gb / dt}))


def run_child(extra, env=None) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child"] + extra, capture_output=True, text=True,
                       env=env, timeout=600)
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def two_workers(extra) -> dict:
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    hosts = [f"127.0.0.1:{p}" for p in ports]
    procs = []
    for i in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                   TF_CONFIG=json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}))
        procs.append(subprocess.Popen([sys.executable, __file__, "--child"] + extra, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        if p.returncode:
            raise SystemExit(err[-2000:])
    return json.loads(outs[0][0].strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--section", default="demo")
    p.add_argument("--global_batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--gpu", action="store_true", help="(child) use GPUs")
    p.add_argument("--gpus", action="store_true", help="compare 1 GPU with all GPUs")
    p.add_argument("--quick", action="store_true", help="fewer steps, no 4-device row")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    import utils
    print(f"machine: {utils.cpu_line()}")
    steps = 5 if args.quick else args.steps
    base = ["--section", args.section, "--global_batch", str(args.global_batch), "--steps", str(steps)]
    if args.gpus:
        import tensorflow as tf
        n = len(tf.config.list_physical_devices("GPU"))
        one = run_child(base + ["--gpu"])
        allg = run_child(base + ["--gpu", "--devices", str(n)])
        print(f"1 GPU {one['img_per_sec']:.0f} img/s; {n} GPUs {allg['img_per_sec']:.0f} img/s; "
              f"speed-up {allg['img_per_sec'] / one['img_per_sec']:.2f}x")
        return
    one = run_child(base)
    print(f"section {args.section}, global batch {args.global_batch}, {steps} steps")
    print(f"1 device: {one['sec_per_step'] * 1000:.0f} ms/step, {one['img_per_sec']:.0f} img/s")
    rows = [("2 logical devices", base + ["--devices", "2"])]
    if not args.quick:
        rows.append(("4 logical devices", base + ["--devices", "4"]))
    for name, extra in rows:
        r = run_child(extra)
        print(f"{name}/1 device step time {r['sec_per_step'] / one['sec_per_step']:.2f}")
    r = two_workers(base)
    print(f"2 local workers/1 device step time {r['sec_per_step'] / one['sec_per_step']:.2f}")


if __name__ == "__main__":
    main()
