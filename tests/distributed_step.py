"""One training step of a small network with batch norm (simple_cnn) under a tf.distribute
strategy, from saved initial weights.

test_multi_device.py runs `one_step` itself for one device, and this file as a subprocess for two
logical CPU devices (they can only be set before TensorFlow starts, once per process), with and
without synchronized batch norm:

    python tests/distributed_step.py --init INIT.npz --out OUT.npz
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

GLOBAL_BATCH = 8


def one_step(strategy, sync_bn: bool, init: str) -> dict:
    """Loss and weights after one step; the initial weights are written to `init` if missing, else read."""
    import tensorflow as tf

    import hw2
    import training
    import utils
    # No dropout (its masks differ per replica) and SGD (Adam's first step is ~lr*sign(g), which
    # would blow float round-off up to full steps).
    cfg = utils.load_config("tiny", {"model": "simple_cnn", "fc_units": "8", "dropout": "0",
                                     "optimizer": "sgd", "learning_rate": "0.1", "momentum": "0",
                                     "sync_bn": str(sync_bn), "precision": "fp32"})
    state = training.create_train_state(cfg, 3, strategy)
    model = state.model
    if os.path.exists(init):
        saved = np.load(init)
        for i, v in enumerate(model.trainable_variables):
            v.assign(saved[f"v{i}"])
    else:
        np.savez(init, **{f"v{i}": v.numpy() for i, v in enumerate(model.trainable_variables)})
    rng = np.random.default_rng(0)
    images = rng.normal(size=(GLOBAL_BATCH, 16, 16, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=GLOBAL_BATCH).astype(np.int32)
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat()
    step = hw2.make_train_step(model, state.optimizer, state.ema, strategy, GLOBAL_BATCH)
    total, _, _ = step(iter(strategy.experimental_distribute_dataset(ds)))
    return {"loss": float(total), **{f"v{i}": v.numpy() for i, v in enumerate(model.trainable_variables)}}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--init", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {}
    for sync_bn in (True, False):
        out.update({f"{int(sync_bn)}_{k}": v for k, v in one_step(strategy, sync_bn, args.init).items()})
    np.savez(args.out, **out)
    print("replicas", strategy.num_replicas_in_sync)
