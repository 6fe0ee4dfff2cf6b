"""One training step of the [tiny] network on N logical CPU devices; writes loss and weights.

Run as a subprocess by test_multi_device.py: logical devices can only be set before TensorFlow
starts, once per process.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import utils  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--devices", type=int, required=True)
p.add_argument("--sync_bn", type=int, default=0)
p.add_argument("--init", required=True, help="initial weights: written if missing, else loaded")
p.add_argument("--out", required=True)
args = p.parse_args()

import tensorflow as tf  # noqa: E402

import hw2  # noqa: E402
import training  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
if args.devices > 1:
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.devices)
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(args.devices)])
else:
    strategy = tf.distribute.get_strategy()
# No dropout (its masks differ per replica) and SGD (Adam's first step is ~lr*sign(g), which
# would blow float round-off up to full steps).
cfg = utils.load_config("tiny", {"keep_prob_1": "1", "keep_prob_2": "1", "keep_prob_dense": "1",
                                 "optimizer": "sgd", "learning_rate": "0.1", "momentum": "0",
                                 "sync_bn": str(bool(args.sync_bn)), "precision": "fp32"})
global_batch = 8
state = training.create_train_state(cfg, 3, strategy)
model, optimizer, ema = state.model, state.optimizer, state.ema
if os.path.exists(args.init):
    init = np.load(args.init)
    for i, v in enumerate(model.trainable_variables):
        v.assign(init[f"v{i}"])
else:
    np.savez(args.init, **{f"v{i}": v.numpy() for i, v in enumerate(model.trainable_variables)})
rng = np.random.default_rng(0)
images = rng.normal(size=(global_batch, 16, 16, 3)).astype(np.float32)
labels = rng.integers(0, 3, size=global_batch).astype(np.int32)
ds = tf.data.Dataset.from_tensors((images, labels)).repeat()
step = hw2.make_train_step(model, optimizer, ema, strategy, global_batch)
total, ce, correct = step(iter(strategy.experimental_distribute_dataset(ds)))
np.savez(args.out, loss=float(total), **{f"v{i}": v.numpy() for i, v in enumerate(model.trainable_variables)})
print("replicas", strategy.num_replicas_in_sync, "loss", float(total))
