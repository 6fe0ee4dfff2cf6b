"""Where one training step of the seed network spends its time, from the TensorFlow profiler.

    python bench/profile_step.py [--batch 64] [--steps 2] [--rounds 2] [--runs im2col,native] [--image_size N] [--logdir DIR]

Profiles `--steps` steps of each run with tf.profiler.experimental (after tracing and a warm-up
step), `--rounds` times with the runs interleaved, keeps each run's fastest round, reads the
XPlane trace it wrote, and prints for each run: wall ms per step, op time per step by category
(conv forward, conv backward, batch norm, optimizer + EMA, ...), the top op types and ops.
Runs: im2col, native (hw2's step, fp32), bf16 (im2col, mixed bfloat16), keras (the same network
as a stock Keras model, model.fit), infer-im2col and infer-native (the forward pass alone,
training=False, fp32). Synthetic data, config section [seed] (100x100, 65 classes).

Op time is the sum of each op's duration on TensorFlow's executor threads. Two ops can run at
once (inter-op parallelism) and an op's time includes waiting for a core, so on 2 cores the sum
exceeds the wall time and overlapping ops look slower than alone; the shares are what to read, or
run with --serial (one op at a time), where op times add up to about the wall time. The im2col
runs use the conv forms conv_autotune picks (cached; printed). Take img/s ratios from
train_throughput.py.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import utils  # noqa: E402  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)

RUNS = ("im2col", "native", "bf16", "keras", "infer-im2col", "infer-native")

# Ops the im2col forms' custom gradients (conv_forms.py) create: tf.custom_gradient builds them
# outside any layer's name scope, so in the trace they are the unscoped gathers and matmuls (and
# Winograd's batched matmuls, index arithmetic and tap sums).
IM2COL_GRAD_TYPES = {"MatMul", "_MklMatMul", "BatchMatMulV2", "_MklBatchMatMulV2", "GatherV2", "Transpose",
                     "_MklTranspose", "ConcatV2", "Pad", "Reshape", "StridedSlice", "Fill", "ZerosLike", "Sum",
                     "SelectV2", "Range", "DynamicStitch", "ParallelDynamicStitch"}
IM2COL_FWD_TYPES = {"MatMul", "_MklMatMul", "BatchMatMulV2", "_MklBatchMatMulV2", "GatherV2", "Pad", "SelectV2",
                    "_MklNativeFusedMatMul", "BiasAdd", "Relu"}  # in a conv layer's scope
UPDATE_TYPES = {"Mul", "Sub", "AddV2", "RealDiv", "Sqrt", "Maximum", "Minimum", "Cast", "Pow",
                "AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp", "ReadVariableOp"}


def category(path: str, op_type: str) -> str:
    """A coarse bucket for one op, from its name scope and type (ordered rules, first match wins)."""
    backward = path.startswith("gradient_tape/")
    scoped = path.removeprefix("gradient_tape/")
    top_level = "/" not in scoped
    if "Conv2D" in op_type:
        return "conv bwd (native)" if "Backprop" in op_type else "conv fwd (native)"
    if "/im2col_grad/" in path:  # conv_forms puts its hand-written gradients there
        return "conv bwd (im2col gradient)"
    # FusedBatchNorm*: the split form's gradient kernel is built by tf.custom_gradient outside any scope.
    if "/bn" in scoped or "batch_normalization" in scoped or "_bn" in scoped or "FusedBatchNorm" in op_type:
        return "batch norm (fwd+bwd)"
    # The optimizer's scope: adam/, fused_adam/, fused_adam_w/, sgd/; a second model's gets _1.
    optimizer_scope = re.match(r"(fused_)?(adam|adam_w|adamw|sgd)(_\d+)?/", scoped, re.I)
    if optimizer_scope or (top_level and op_type in UPDATE_TYPES and not backward):
        return "optimizer + EMA"
    if op_type == "AddN":
        return "gradient sums (AddN)"
    # XLA's executables show as CpuExecutable::ExecuteAsyncOnStream, with no scope: in hw2's step
    # that is the strided layers' col2im overlap-add (conv_forms.py, in their input gradient) and
    # the max pools' taps gradient (pool_forms.py), which the trace does not tell apart.
    if "ExecuteAsyncOnStream" in op_type:
        return "XLA (col2im add, pool taps)"
    if "MaxPool" in op_type:
        return "max-pool (fwd+bwd)"
    if op_type in ("Relu", "ReluGrad"):
        return "relu (fwd+bwd)"
    if "dropout" in scoped:
        return "dropout (fwd+bwd)"
    if any(k in scoped for k in ("dense", "softmax_linear", "logits")) and "MatMul" in op_type:
        return "dense layers (fwd+bwd)"
    if top_level and op_type in IM2COL_GRAD_TYPES and not backward:
        return "conv bwd (im2col gradient)"
    if op_type in ("Slice", "ConcatV2") and "inception" in scoped:
        return "inception concat (fwd+bwd)"
    if not backward and op_type in IM2COL_FWD_TYPES and not top_level:
        return "conv fwd (im2col)"
    if top_level or "loss" in scoped or "Softmax" in op_type:
        return "loss + L2 (fwd+bwd)"
    return "other"


def profile(run, steps: int, logdir: str) -> float:
    """Profiles run(steps) into logdir; returns the wall seconds per step."""
    import tensorflow as tf
    tf.profiler.experimental.start(logdir)
    try:
        seconds = run(steps)
    finally:
        tf.profiler.experimental.stop()
    return seconds / steps


def read_xspace(logdir: str):
    """The newest XPlane trace (an XSpace proto) that tf.profiler wrote under `logdir`."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    files = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise SystemExit(f"no .xplane.pb trace under {logdir}")
    space = xplane_pb2.XSpace()
    with open(max(files, key=os.path.getmtime), "rb") as f:
        space.ParseFromString(f.read())
    return space


def op_times(logdir: str) -> dict[str, int]:
    """Picoseconds per 'scope/name:Type' op event on the executor threads of the host trace."""
    space = read_xspace(logdir)
    times: dict[str, int] = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):  # the executor's threads; Eigen's are inside these
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" in name and not name.startswith(("ThreadpoolListener", "ExecutorState")):
                    times[name] += event.duration_ps
    return times


def make_run(which: str, cfg, batch: int):
    import train_throughput as tt
    if which == "keras":
        return tt.keras_fit(cfg, batch)
    if which.startswith("infer-"):
        return tt.hw2_infer(cfg, which.split("-")[1], batch)
    if which == "bf16":
        return tt.hw2_train(cfg, "bf16", "im2col", batch)
    return tt.hw2_train(cfg, "fp32", which, batch)


def conv_layer(path: str) -> str:
    """The conv layer an op belongs to, e.g. conv2 or inception2/b_3x3 (Keras' _1 suffixes dropped)."""
    parts = [re.sub(r"_\d+$", "", p) for p in path.removeprefix("gradient_tape/").split("/")[1:-1]]
    parts = [p for p in parts if p != "im2col_grad"]
    keep = [p for p in parts if re.match(r"(conv|inception|stage|stem|a_|b_|c_|d_|shortcut)", p)]
    return "/".join(keep) or "?"


def report(which: str, wall: float, times: dict[str, int], steps: int, top: int) -> dict[str, float]:
    """Prints one run's categories, top ops and conv time per layer; returns ms per step by category."""
    per_step = 1e-9 / steps  # ps over all steps -> ms per step
    total = sum(times.values()) * per_step
    by_cat: dict[str, float] = collections.Counter()
    by_type: dict[str, float] = collections.Counter()
    by_layer: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for name, ps in times.items():
        path, op_type = name.rsplit(":", 1)
        cat = category(path, op_type)
        by_cat[cat] += ps * per_step
        by_type[op_type] += ps * per_step
        if cat.startswith("conv"):
            by_layer[conv_layer(path)][cat.startswith("conv bwd")] += ps * per_step
    report.by_layer = dict(by_layer)
    print(f"\n== {which}: wall {wall * 1000:.0f} ms/step, op time {total:.0f} ms/step")
    print(f"{'category':<30} {'ms/step':>8} {'share':>6}")
    for cat, ms in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"{cat:<30} {ms:>8.1f} {ms / total:>6.1%}")
    print(f"{'op type':<30} {'ms/step':>8} {'share':>6}")
    for op_type, ms in sorted(by_type.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{op_type:<30} {ms:>8.1f} {ms / total:>6.1%}")
    print(f"{'op':<70} {'ms/step':>8} {'share':>6}")
    for name, ps in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{name[:70]:<70} {ps * per_step:>8.1f} {ps * per_step / total:>6.1%}")
    return by_cat


def print_layers(layers: dict[str, dict[str, list[float]]]) -> None:
    """Conv op ms per step by layer, forward / backward, runs side by side."""
    names = sorted({n for by in layers.values() for n in by}, key=lambda n: -max(sum(by.get(n, [0, 0]))
                                                                              for by in layers.values()))
    print("\n== conv op ms/step by layer, forward / backward")
    print(f"{'layer':<30}" + "".join(f" {w:>15}" for w in layers))
    for n in names:
        print(f"{n:<30}" + "".join(f" {by.get(n, [0, 0])[0]:>7.1f}/{by.get(n, [0, 0])[1]:<7.1f}"
                                   for by in layers.values()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=2, help="profiled steps per run")
    p.add_argument("--runs", default="im2col,native", help=f"comma list of {','.join(RUNS)}")
    p.add_argument("--rounds", type=int, default=2, help="profiled rounds per run, interleaved; the fastest counts")
    p.add_argument("--top", type=int, default=12, help="rows of the op-type and op tables")
    p.add_argument("--logdir", default="", help="keep the traces here (TensorBoard's profile tab reads them)")
    p.add_argument("--section", default="seed", help="config section of the network (a zoo model's: "
                   "--section cifar10_tutorial, --section resnet18_64px --model resnet14)")
    p.add_argument("--model", default="", help="the model, if not the section's")
    p.add_argument("--image_size", type=int, default=0, help="the input size, if not the section's "
                   "(32: the size image_size auto picks for CIFAR-10)")
    p.add_argument("--serial", action="store_true",
                   help="one op at a time (inter-op parallelism 1): op times then add up to the wall time")
    args = p.parse_args()
    runs = [r for r in args.runs.split(",") if r]
    if not runs or set(runs) - set(RUNS):
        raise SystemExit(f"--runs: pick from {', '.join(RUNS)}")

    import tensorflow as tf
    if args.serial:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    # A small rate, as train_throughput's zoo rows: one synthetic batch repeated at the tutorial's
    # SGD 0.1 reaches NaN (the time per step does not depend on the rate).
    cfg = utils.load_config(args.section, {**({"model": args.model} if args.model else {}),
                                           **({"image_size": str(args.image_size)} if args.image_size else {}),
                                           "learning_rate": "0.0001"})
    print(f"machine: CPU: {utils.cpu_line()}")
    print(f"TensorFlow {tf.__version__}; {cfg.model} {cfg.image_size}x{cfg.image_size}, 65 classes, batch "
          f"{args.batch}, {args.steps} profiled steps per run after a warm-up step", flush=True)
    tmp = None if args.logdir else tempfile.TemporaryDirectory()
    root = args.logdir or tmp.name
    start = time.perf_counter()
    makers = {which: make_run(which, cfg, args.batch) for which in runs}  # each traces + warms up
    for which, run in makers.items():
        if getattr(run, "forms", None) and "native" not in which:
            print(f"{which}: {run.forms}")
    print(f"(built and traced in {time.perf_counter() - start:.0f} s)", flush=True)
    # Rounds alternate between runs so a busy machine slows all alike; the fastest round counts.
    best: dict[str, tuple[float, str]] = {}
    for r in range(args.rounds):
        for which, run in makers.items():
            logdir = os.path.join(root, f"{which}-{r}")
            wall = profile(run, args.steps, logdir)
            if which not in best or wall < best[which][0]:
                best[which] = (wall, logdir)
    cats, layers = {}, {}
    for which, (wall, logdir) in best.items():
        cats[which] = report(which, wall, op_times(logdir),
                             args.steps + getattr(makers[which], "extra_steps", 0), args.top)
        layers[which] = report.by_layer
    if len(cats) > 1:
        names = sorted({c for by in cats.values() for c in by},
                       key=lambda c: -max(by.get(c, 0.0) for by in cats.values()))
        print("\n== side by side, op ms/step")
        print(f"{'category':<30}" + "".join(f" {w:>9}" for w in cats))
        for c in names:
            print(f"{c:<30}" + "".join(f" {by.get(c, 0.0):>9.1f}" for by in cats.values()))
        print(f"{'total':<30}" + "".join(f" {sum(by.values()):>9.1f}" for by in cats.values()))
        print(f"{'wall ms/step (profiled)':<30}" + "".join(f" {best[w][0] * 1000:>9.1f}" for w in cats))
    print_layers(layers)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
