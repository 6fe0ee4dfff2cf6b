"""Training and inference img/s of the seed network, as ratios measured side by side in one run.

    python bench/train_throughput.py [--quick] [--batch 128] [--steps 3] [--repeats 2] [--skip torch,memory,zoo]
                                      [--zoo default|all|MODEL,...] [--zoo_batch 64]

Rows (one ratio per line, both sides timed in this run, interleaved, best of --repeats):
  im2col/native train, im2col/native infer     our convolution (its forms autotuned and cached by
                                               conv_autotune.choose_conv_forms, printed first) vs
                                               tf.nn.conv2d (fp32)
  train FLOP/s / fp32 GEMM roof                training FLOPs per image (as direct convolutions) x
                                               img/s, over a 2048^3 fp32 matmul's FLOP/s timed here
  auto/best(fp32,bf16) train                   what --precision auto picks vs the faster of the two
  bf16/fp32 train (im2col)                     mixed bfloat16 vs float32
  bf16/fp32 GEMM alone                         the same ratio for conv2's two big matmuls alone
  hw2/keras-fit train                          hw2's step vs the same network as a Keras model.fit,
                                               in fp32, in each one's bf16 mixed precision (where
                                               auto picks bf16), and each one's default precision
  hw2/torch-eager train                        the same vs PyTorch eager, channels_last (bf16: autocast)
  input pipeline/train                         decode + augment of real JPEGs alone vs training
  peak RSS                                     of a training run at batch 128 (separate process):
                                               auto precision, and im2col/native in fp32
  zoo MODEL im2col/native train                each zoo model (models.py) at its own input size, fp32
Synthetic images and labels (65 classes), the seed network of config section [seed], 100x100; the zoo rows use
the sections and sizes in ZOO_ROWS. Under ONEDNN_MAX_CPU_ISA=AVX2 (an AVX2-only CPU) the bench
treats the CPU as having no bf16 hardware: no bf16 rows, auto -> fp32.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils  # noqa: E402  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)
from keras_reference import seed_network  # noqa: E402  (bench/, this script's folder)

NUM_CLASSES = 65


def machine_line() -> str:
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
        return f"GPU: {name} x{len(gpus)}; CPU: {utils.cpu_line()}"
    return f"CPU: {utils.cpu_line()}"


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which it has bf16 kernels on this kind of CPU.
BF16_CAPS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
             "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "DEFAULT", "ALL")


def capped_cpu_flags() -> set[str]:
    """This CPU's flags as oneDNN sees them: ONEDNN_MAX_CPU_ISA=AVX2 drops avx512*/amx*.

    Under such a cap TensorFlow still believes the CPU does bf16 and a bf16 MatMul crashes
    (oneDNN has no primitive for it), so the bench treats the capped CPU as the AVX2-only CPU it
    stands for: precision auto -> fp32 and no bf16 rows.
    """
    import precision as prec
    flags = prec.cpu_flags()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and cap not in BF16_CAPS:
        flags = {f for f in flags if not f.startswith(("avx512", "amx"))}
    return flags


def synthetic_batch(batch: int, size: int, seed: int = 0, channels: int = 3):
    import numpy as np
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, size, size, channels)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
    return x, y


# ---------------------------------------------------------------- the timed configurations
# Each maker returns run(steps) -> seconds for `steps` steps, after tracing and one warm-up step.

def create_model(cfg, num_classes: int):
    """hw2's model constructor (hw2.create_model; hw2.build_model before issue 14 renamed it)."""
    import hw2
    return (getattr(hw2, "create_model", None) or hw2.build_model)(cfg, num_classes)


def choose_forms(model, cfg, batch: int, training: bool) -> str:
    """conv_autotune.choose_conv_forms as hw2's scripts call it (autotuned, cached)."""
    import conv_autotune
    shape = (batch, cfg.image_size, cfg.image_size, cfg.channels)
    return conv_autotune.choose_conv_forms(model, shape, model.dtype_policy.compute_dtype, training, autotune=True)


def hw2_train(cfg, precision: str, conv_impl: str, batch: int):
    """hw2's own train step (hw2.make_train_step: loss, Adam, EMA) on the state the training loop
    creates (training.create_train_state), under the default strategy, its convolutions in the
    forms choose_conv_forms picks (run.forms: its log line)."""
    import tensorflow as tf

    import hw2
    import training
    cfg = utils.Config({**cfg, "conv_impl": conv_impl, "precision": precision})
    state = training.create_train_state(cfg, NUM_CLASSES, precision=precision)
    model, optimizer, ema = state.model, state.optimizer, state.ema
    forms = choose_forms(model, cfg, batch, training=True)
    strategy = tf.distribute.get_strategy()
    x, y = synthetic_batch(batch, cfg.image_size, channels=cfg.channels)
    iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    step = hw2.make_train_step(model, optimizer, ema, strategy, batch)

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = float(step(iterator)[0])
        if loss != loss:
            raise SystemExit(f"hw2 {precision} {conv_impl}: loss is NaN")
        return time.perf_counter() - start

    run(1)
    run.forms, run.model = forms, model
    return run


def hw2_infer(cfg, conv_impl: str, batch: int):
    import tensorflow as tf

    model = create_model(utils.Config({**cfg, "conv_impl": conv_impl}), NUM_CLASSES)
    forms = choose_forms(model, cfg, batch, training=False)
    x = tf.constant(synthetic_batch(batch, cfg.image_size)[0])
    forward = tf.function(lambda x: model(x, training=False))

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            forward(x).numpy()
        return time.perf_counter() - start

    run(1)
    run.forms = forms
    return run


def keras_fit(cfg, batch: int, precision: str = "fp32"):
    """The same network as a stock Keras model trained with model.fit (native convs); bf16 is
    Keras' own mixed_bfloat16 policy."""
    import keras
    import tensorflow as tf
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bf16" else "float32")
    try:
        model = seed_network(cfg, NUM_CLASSES)  # stock Keras 3 layers (bench/keras_reference.py)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.compile(keras.optimizers.Adam(cfg.learning_rate),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    x, y = synthetic_batch(batch, cfg.image_size)
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()

    class BatchClock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    clock = BatchClock()

    def run(steps: int) -> float:
        # Steady-state steps only: from the end of a first batch to the end of the last. Some
        # fit() calls spend ~3 s before their first batch, which a long fit would amortize.
        clock.ends = []
        model.fit(dataset, epochs=1, steps_per_epoch=steps + 1, verbose=0, shuffle=False, callbacks=[clock])
        return clock.ends[-1] - clock.ends[0]

    run.extra_steps = 1  # run(steps) runs steps + 1 (bench/profile_step.py counts them)

    run(1)
    return run


def torch_eager(cfg, batch: int, precision: str = "fp32"):
    """The same network in PyTorch eager, channels_last, Adam, fp32 or bf16 autocast (torch's
    mixed precision). None if torch is missing."""
    try:
        import torch
        from torch import nn
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)

    def conv(cin, cout, k, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False),
                             nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01), nn.ReLU(inplace=True))

    class Inception(nn.Module):
        def __init__(self, cin, towers, bottleneck):
            super().__init__()
            t1, t3, t5, tp = towers
            self.a = conv(cin, t1, 1)
            self.b = nn.Sequential(conv(cin, bottleneck, 1), conv(bottleneck, t3, 3))
            self.c = nn.Sequential(conv(cin, bottleneck, 1), conv(bottleneck, bottleneck, 3),
                                   conv(bottleneck, t5, 3))
            self.d = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv(cin, tp, 1))

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x), self.c(x), self.d(x)], 1)

    stack = cfg.conv_stack if isinstance(cfg.conv_stack, tuple) else (cfg.conv_stack,)
    layers, cin = [], 3
    for f in stack:
        layers.append(conv(cin, f, 3))
        cin = f
    # torch's symmetric padding 1 gives the same output sizes as TF's SAME here (100->50->25->13->7).
    c2, c3 = sum(cfg.inception2), sum(cfg.inception3)
    side = -(-cfg.image_size // 16)
    layers += [conv(cin, cfg.conv2, 3, 2), nn.MaxPool2d(3, 2, 1),
               Inception(cfg.conv2, cfg.inception2, cfg.inception2_bottleneck), nn.MaxPool2d(3, 2, 1),
               nn.Dropout2d(1 - cfg.keep_prob_1),
               Inception(c2, cfg.inception3, cfg.inception3_bottleneck), nn.MaxPool2d(3, 2, 1),
               nn.Dropout2d(1 - cfg.keep_prob_2), nn.Flatten(),
               nn.Linear(c3 * side * side, cfg.dense_units, bias=False), nn.BatchNorm1d(cfg.dense_units),
               nn.ReLU(), nn.Dropout(1 - cfg.keep_prob_dense), nn.Linear(cfg.dense_units, NUM_CLASSES)]
    model = nn.Sequential(*layers).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), cfg.learning_rate, weight_decay=0.0)
    x, y = synthetic_batch(batch, cfg.image_size)
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(y).long()
    loss_fn = nn.CrossEntropyLoss()

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = loss_fn(model(x).float(), y)
            loss.backward()
            optimizer.step()
            loss.item()
        return time.perf_counter() - start

    run(1)
    return run


def input_pipeline(cfg, root: str, items, batch: int):
    """hw2_input.train_dataset streaming from disk (decode + augment every image, no cache)."""
    import hw2_input
    dataset = hw2_input.train_dataset(root, items, utils.Config({**cfg, "cache_images_mb": 0, "decode_cache": False}), batch)

    def run(steps: int) -> float:
        # A fresh iterator each time: a live one would fill its prefetch buffer while the other
        # rows run and then hand out batches for free.
        iterator = iter(dataset)
        start = time.perf_counter()
        for _ in range(steps):
            next(iterator)
        seconds = time.perf_counter() - start
        del iterator  # stops its threads before the next row is timed
        return seconds

    run(1)
    return run


def gemm_roof():
    """run(steps) for a 2048^3 float32 matmul: this machine's fp32 GEMM roof, timed with the rest."""
    import tensorflow as tf
    a, b = tf.random.normal((2048, 2048)), tf.random.normal((2048, 2048))
    gemm = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)[:1]))

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            float(gemm())
        return time.perf_counter() - start

    run(1)
    run.flops = 2 * 2048**3
    return run


def train_flops_per_image(model, cfg) -> float:
    """FLOPs (2 x multiply-adds) of one image's training step in the convolutions and dense layers,
    counted as direct convolutions: forward, filter gradient and input gradient (none for the first
    conv, which reads the images). Winograd does fewer, so a fraction of the roof can pass 1."""
    import keras

    import conv_forms
    import layers
    image = (cfg.image_size, cfg.image_size, cfg.channels)
    total = 0
    for conv in layers._conv_layers(model):
        (h, w), (kh, kw, cin, cout), s = conv.input_hw, conv.kernel.shape, conv.stride
        same = conv.padding == "SAME"
        pixels = conv_forms.axis_plan(h, kh, s, same)[0] * conv_forms.axis_plan(w, kw, s, same)[0]
        total += 2 * pixels * kh * kw * cin * cout * (2 if (h, w, cin) == image else 3)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.Dense):
            total += 3 * 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return total


def form_counts(line: str) -> str:
    """'4 winograd, 2 gather' out of choose_conv_forms' log line."""
    return line.split("): ", 1)[1].split(" (", 1)[0]


def matmul_ceiling(batch: int):
    """run(steps) per dtype for the GEMMs of conv2 (3x3/2, 64->128 at 100x100, the network's
    largest layer): forward cols x W and the filter gradient cols^T x dY. Their bf16/fp32 ratio is
    what this CPU's GEMMs allow a bf16 training step."""
    import tensorflow as tf

    import precision as prec
    makers = {}
    for dtype in (tf.float32, tf.bfloat16):
        gemms = prec.conv_gemms(batch * 50 * 50, 576, 128, dtype)  # what --precision auto times, bigger

        def run(steps: int, gemms=gemms) -> float:
            start = time.perf_counter()
            for _ in range(steps):
                gemms()
            return time.perf_counter() - start

        run(1)
        makers[f"GEMM {dtype.name}"] = run
    return makers


# ---------------------------------------------------------------- the model zoo (issue 10)

# (model, config section, overrides): each at the input size its seed report used. Full width
# throughout; the vggs and simple_cnn keep 3 channels (CIFAR-like) so the first conv is not trivial.
ZOO_ROWS = [
    ("cifar10_tutorial", "cifar10_tutorial", {}),          # 24x24 crops of 32x32
    ("simple_cnn", "mnist_cnn", {}),                       # 28x28 grayscale
    ("resnet14", "resnet18_64px", {"model": "resnet14"}),  # 64x64, 7x7/2 stem + max-pool
    ("resnet18", "resnet18_64px", {}),
    ("vgg10", "seed", {"model": "vgg10", "image_size": "32"}),
]
# Opt-in (--zoo all): each costs 1-2 minutes more at batch 64 on 2 cores (vgg15: ~3 s a step at batch 32).
ZOO_EXTRA = [
    ("vgg12", "seed", {"model": "vgg12", "image_size": "32"}),
    ("vgg15", "seed", {"model": "vgg15", "image_size": "32"}),
    ("vgg18", "seed", {"model": "vgg18", "image_size": "32"}),
    ("resnet34", "resnet18_64px", {"model": "resnet34"}),
]


def zoo_rows(which: str) -> list[tuple[str, str, dict]]:
    """ZOO_ROWS, ZOO_ROWS + ZOO_EXTRA for "all", or the named models from either."""
    rows = ZOO_ROWS + ZOO_EXTRA
    if which == "default":
        return ZOO_ROWS
    if which == "all":
        return rows
    names = [n for n in which.split(",") if n]
    unknown = set(names) - {r[0] for r in rows}
    if unknown:
        raise SystemExit(f"--zoo: unknown model(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(r[0] for r in rows)}, or default | all")
    return [r for r in rows if r[0] in names]


def zoo_ratios(rows: list[tuple[str, str, dict]], batch: int, steps: int, repeats: int) -> None:
    """One line per zoo model: im2col/native training img/s, the two timed interleaved."""
    import gc
    for name, section, overrides in rows:
        # One synthetic batch repeated ~100 times: at the tutorial's SGD 0.1 without norm the loss
        # reaches NaN, so every zoo row trains at a small rate (img/s does not depend on it).
        cfg = utils.load_config(section, {"model": name, **overrides, "learning_rate": "0.0001"})
        runs = {impl: hw2_train(cfg, "fp32", impl, batch) for impl in ("im2col", "native")}
        # The small models take ~50 ms a step: time at least ~1 s a round, and 3 rounds, so that
        # noise on a shared machine stays small (quick mode's 2 x 2 steps swung resnet14 0.7-1.3).
        n = max(steps, math.ceil(1.0 / max(run(1) for run in runs.values())))
        ips = {impl: batch / s for impl, s in time_interleaved(runs, n, max(repeats, 3)).items()}
        print(f"zoo {name} {cfg.image_size}px im2col/native train {ips['im2col'] / ips['native']:.2f} "
              f"(im2col {ips['im2col']:.0f} img/s, native {ips['native']:.0f} img/s; "
              f"forms {form_counts(runs['im2col'].forms)})", flush=True)
        del runs
        gc.collect()  # the next model's buffers should not stack on this one's


# ---------------------------------------------------------------- peak memory (a child process)

def memory_child(batch: int, steps: int, requested: str, conv_impl: str) -> None:
    """Train `steps` steps at `batch` with the default config in `requested` precision; print peak RSS."""
    import precision as prec
    cfg = utils.load_config("seed")
    chosen, _ = prec.choose(requested, capped_cpu_flags(), prec.gpu_compute_capability(),
                            bf16_gemm_speedup=prec.bf16_gemm_speedup)
    conv_impl = conv_impl or cfg.conv_impl
    hw2_train(cfg, chosen, conv_impl, batch)(steps)
    print(json.dumps({"peak_rss_gib": peak_rss_gib(), "precision": chosen, "conv_impl": conv_impl}))


def peak_rss_gib() -> float:
    """This process's peak RSS. Not ru_maxrss: a child spawned by a big parent inherits the
    parent's high-water mark across exec (the full bench's parent reached 8 GiB, and the child
    reported exactly that). VmHWM is this process's own address space only."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20


def peak_memory(batch: int, steps: int, requested: str, conv_impl: str = "") -> dict:
    """Peak RSS of a training run in a fresh process (its conv forms come from the autotune cache)."""
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory_child", "--batch", str(batch),
                        "--steps", str(steps), "--memory_precision", requested, "--memory_conv_impl", conv_impl],
                       capture_output=True, text=True, timeout=900)
    if p.returncode:
        raise SystemExit(f"memory child failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main

def time_interleaved(runs: dict, steps: int, repeats: int) -> dict[str, float]:
    """Best seconds per step of each run; rounds alternate so a busy machine slows all alike."""
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            best[name] = min(best[name], run(steps) / steps)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="batch 32 (zoo 32), 2 steps x 2 repeats, 160 JPEGs (~3 min)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best one counts")
    p.add_argument("--images", type=int, default=400, help="JPEGs for the input pipeline row")
    p.add_argument("--skip", default="", help="comma list of rows to skip: keras,torch,input,memory,infer,zoo")
    p.add_argument("--zoo", default="default",
                   help="zoo rows: default (" + ",".join(r[0] for r in ZOO_ROWS) + "), all (+ "
                   + ",".join(r[0] for r in ZOO_EXTRA) + "), or a comma list of models")
    p.add_argument("--zoo_batch", type=int, default=64, help="batch of the zoo rows (--quick: 32)")
    p.add_argument("--memory_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory_precision", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--memory_conv_impl", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args.batch, args.steps, args.memory_precision, args.memory_conv_impl)
    if args.quick:
        args.batch, args.steps, args.repeats, args.images, args.zoo_batch = 32, 2, 2, 160, 32
    skip = set(filter(None, args.skip.split(",")))
    zoo = [] if "zoo" in skip else zoo_rows(args.zoo)  # a bad --zoo fails before minutes of work

    import tensorflow as tf

    import precision as prec
    cfg = utils.load_config("seed")
    flags, gpu_cc = capped_cpu_flags(), prec.gpu_compute_capability()
    auto, reason = prec.choose("auto", flags, gpu_cc, bf16_gemm_speedup=prec.bf16_gemm_speedup)  # as hw2 picks
    default_impl = cfg.conv_impl
    print(f"machine: {machine_line()}")
    print(f"TensorFlow {tf.__version__}; seed network {cfg.image_size}x{cfg.image_size}, {NUM_CLASSES} classes, "
          f"batch {args.batch} (zoo rows {args.zoo_batch}), best of {args.repeats} x {args.steps} steps; "
          f"precision auto -> {auto} ({reason})",
          flush=True)

    bf16 = "bf16"
    train = {"im2col fp32": hw2_train(cfg, "fp32", "im2col", args.batch),
             "native fp32": hw2_train(cfg, "fp32", "native", args.batch)}
    # bf16 without bf16 hardware is still measured (an AVX2 CPU runs it, slowly), but not under a
    # cap that hides the hardware (it would crash, see capped_cpu_flags).
    bf16_runs = capped_cpu_flags() == prec.cpu_flags() or auto == "bf16"
    if bf16_runs:
        train[f"{default_impl} {bf16}"] = hw2_train(cfg, bf16, default_impl, args.batch)
    if flags & {"avx512_bf16", "amx_bf16"}:  # bf16 hardware, whatever auto made of it
        train.update(matmul_ceiling(args.batch))
    train["GEMM roof"] = gemm_roof()
    if "infer" not in skip:
        train["infer im2col"] = hw2_infer(cfg, "im2col", args.batch)
        train["infer native"] = hw2_infer(cfg, "native", args.batch)
    # Each framework in its fp32 and, where auto picks bf16, in its own bf16 mixed precision.
    precisions = ("fp32", "bf16") if auto == "bf16" else ("fp32",)
    if "keras" not in skip:
        for p in precisions:
            train[f"keras fit {p}"] = keras_fit(cfg, args.batch, p)
    if "torch" not in skip:
        for p in precisions:
            run = torch_eager(cfg, args.batch, p)
            if run is None:  # torch is not installed
                break
            train[f"torch eager {p}"] = run
    tmp = None
    if "input" not in skip:
        from input_pipeline import write_jpegs  # bench/ is on sys.path when run as a script
        tmp = tempfile.TemporaryDirectory()
        items = write_jpegs(tmp.name, args.images)
        train["input pipeline"] = input_pipeline(cfg, tmp.name, items, args.batch)
    sec = time_interleaved(train, args.steps, args.repeats)
    ips = {name: args.batch / s for name, s in sec.items()}

    for name, run in train.items():
        if hasattr(run, "forms") and "im2col" in name:
            print(f"{name}: {run.forms}")
    print("img/s: " + ", ".join(f"{name} {v:.1f}" for name, v in ips.items() if not name.startswith("GEMM")))
    hw2_default = ips[f"{default_impl} {auto}"]  # what training runs at by default here
    print(f"im2col/native train {ips['im2col fp32'] / ips['native fp32']:.2f}")
    roof = train["GEMM roof"].flops / sec["GEMM roof"]
    flops = train_flops_per_image(train["im2col fp32"].model, cfg)
    print(f"train FLOP/s / fp32 GEMM roof: im2col fp32 {flops * ips['im2col fp32'] / roof:.2f}, native fp32 "
          f"{flops * ips['native fp32'] / roof:.2f} ({flops / 1e9:.2f} GFLOP per image as direct convolutions; "
          f"roof: 2048^3 fp32 matmul {roof / 1e9:.0f} GFLOP/s)")
    if "infer" not in skip:
        print(f"im2col/native infer {ips['infer im2col'] / ips['infer native']:.2f}")
    if bf16_runs:
        by_precision = {"fp32": ips[f"{default_impl} fp32"], "bf16": ips[f"{default_impl} {bf16}"]}
        print(f"auto({auto})/best(fp32,bf16) train {by_precision[auto] / max(by_precision.values()):.2f}")
        print(f"bf16/fp32 train (im2col) {by_precision['bf16'] / by_precision['fp32']:.2f}")
    else:
        print("auto(fp32), bf16/fp32: no bf16 rows under this ONEDNN_MAX_CPU_ISA cap")
    if "GEMM bfloat16" in ips:
        print(f"bf16/fp32 GEMM alone (conv2's forward + filter-gradient shapes) "
              f"{ips['GEMM bfloat16'] / ips['GEMM float32']:.2f}")
    # Like for like in each precision, then each tool as a user gets it by default (hw2: auto;
    # Keras and torch: fp32).
    for tool, name in (("keras fit", "keras-fit"), ("torch eager", "torch-eager")):
        if tool.split()[0] in skip:
            continue
        if f"{tool} fp32" not in ips:
            print(f"hw2/{name} train: skipped: pip install torch==2.13.0")
            continue
        for p in precisions:
            print(f"hw2({default_impl} {p})/{name}({p}) train {ips[f'{default_impl} {p}'] / ips[f'{tool} {p}']:.2f}")
        if auto != "fp32":
            print(f"hw2 default({default_impl} auto={auto})/{name} default(fp32) train "
                  f"{hw2_default / ips[f'{tool} fp32']:.2f}")
    if tmp is not None:
        print(f"input pipeline (streamed JPEG decode+augment)/train({default_impl} {auto}) "
              f"{ips['input pipeline'] / hw2_default:.2f}")
        del train["input pipeline"]  # stop its prefetch threads before the folder goes
        tmp.cleanup()
    del train
    zoo_ratios(zoo, args.zoo_batch, args.steps, args.repeats)
    if "memory" not in skip:
        # Full mode measures twice: glibc's per-thread arenas fill differently from run to run.
        runs = range(1 if args.quick else 2)
        if auto != "fp32":
            gib = [peak_memory(128, 1, "auto")["peak_rss_gib"] for _ in runs]
            print(f"peak RSS of training at batch 128 ({default_impl} {auto}) {max(gib):.2f} GiB "
                  f"(runs: {', '.join(f'{g:.2f}' for g in gib)})")
        gib = {impl: [] for impl in ("im2col", "native")}
        for _ in runs:
            for impl in gib:
                gib[impl].append(peak_memory(128, 1, "fp32", impl)["peak_rss_gib"])
        print(f"peak RSS im2col/native train (fp32, batch 128) {max(gib['im2col']) / max(gib['native']):.2f} "
              + "(" + "; ".join(f"{impl} {max(g):.2f} GiB, runs {', '.join(f'{v:.2f}' for v in g)}"
                                for impl, g in gib.items()) + ")")


if __name__ == "__main__":
    main()
