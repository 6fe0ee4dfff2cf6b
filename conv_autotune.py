"""Which form each of a model's convolutions (and, in training, its batch norms and max pools) takes:
the fixed defaults, or the fastest one measured on this machine and cached.

    choose_conv_forms(model, (128, 100, 100, 3), "float32", training=True, autotune=True)

Call it after building the model and before tracing its tf.functions (the forms are read at trace
time). The timing runs each candidate form of each distinct layer shape alone, for a few calls, at
the real batch size; the choice is cached per machine (CPU model and flags, GPU name, TensorFlow
version, ONEDNN_MAX_CPU_ISA cap, CPU allocator) in $XDG_CACHE_HOME/hw2/conv_forms.json
(~/.cache/hw2 by default), so the next run on this machine starts without timing. Big timings run
in a child process (CHILD_BYTES, below), so the memory they touch does not stay with the training
process.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

import keras
import numpy as np
import tensorflow as tf

import bn_forms
import conv_forms
import layers
import pool_forms
import utils

log = logging.getLogger(__name__)

# Bump when a form's code changes enough to invalidate old timings. 4: timings under TensorFlow's
# BFC allocator (utils), where malloc's page faults had weighed on the forms with big temporaries.
# 5: the gather form without a padded copy of its input, its filter gradient in bands of images.
# 6: the gather form's forward in bands of images. 7: its backward in bands a quarter the size.
# 8: the split batch norm's statistics as wide reductions (bn_forms._moments).
# 9: Winograd F(4x4, 5x5) on 8x8 tiles for 5x5 kernels (it was F(2x2, 5x5) on 6x6).
# 10: a strided layer's input gradient by col2im (conv_forms.col2im_input_grad) on CPUs.
CACHE_VERSION = 10
TIMED_CALLS = 3    # per form, after one untimed call; the fastest counts
# ...and more rounds, up to MAX_ROUNDS, until the timing has taken MIN_TIMING_S: three calls of a
# 2-ms layer on a shared machine picked the slower of two forms (the 64 px stem under the AVX2 cap:
# the gather form, 9.2 ms a step in the profile against the pairs form's 6.9).
MIN_TIMING_S = 0.25
MAX_ROUNDS = 20


def choose_conv_forms(model: keras.layers.Layer, input_shape, dtype, training: bool, autotune: bool) -> str:
    """Set the im2col form of every ConvBNReLU in `model`; return a one-line summary for the log.

    input_shape: (batch, height, width, channels) of the model's input; the batch is the one the
    forms are timed at. dtype: the compute dtype ("float32", "bfloat16" or a tf.DType). training:
    True sets the training pass's forms (timed forward + both gradients), False the inference
    pass's (forward with the batch norm folded). autotune: False sets conv_forms.default_form, with
    no timing (deterministic runs, tests); True times the candidate forms of each layer shape not
    in the cache yet (a few seconds on 2 CPU cores for the seed network) and caches the winners.
    Layers with conv_impl="native" keep tf.nn.conv2d. When training, each layer's batch norm form
    (bn_forms.py) and each max pool's gradient form (pool_forms.py) are chosen the same way, native
    layers included.
    """
    dtype = tf.as_dtype(dtype).name
    batch, image_hw = int(input_shape[0]), (int(input_shape[1]), int(input_shape[2]), int(input_shape[3]))
    convs = [c for c in layers._conv_layers(model) if c.conv_impl == "im2col"]
    native = len(layers._conv_layers(model)) - len(convs)
    cache, pending = _load_cache(), {}
    start = time.perf_counter()
    chosen = _conv_keys(convs, batch, dtype, image_hw, training, autotune, cache, pending)
    bn_chosen = _bn_keys(layers._conv_layers(model), batch, dtype, autotune, cache, pending) if training else []
    pool_chosen = _pool_keys(model, batch, dtype, autotune, cache, pending) if training else []
    entries = time_jobs(pending)
    # Batch-norm and pool forms count as tuned too: a bf16 run has one conv form per layer but still times them.
    timed = len(entries)
    tuned = sum(key is not None for _, key, _ in chosen) + sum(key is not None for _, key in bn_chosen + pool_chosen)

    def pick(key, fixed):
        return (entries.get(key) or cache[key])["form"] if key else fixed

    forms = Counter()
    for conv, key, fixed in chosen:
        forms[form := pick(key, fixed)] += 1
        if form != "default":  # "default": decided at trace time
            setattr(conv, "train_form" if training else "infer_form", form)
    for conv, key in bn_chosen:
        conv.bn_form = pick(key, "fused")
    for pool, key in pool_chosen:
        pool.form = pick(key, "native")
    bn_counts, pool_counts = Counter(c.bn_form for c, _ in bn_chosen), Counter(p.form for p, _ in pool_chosen)
    others = "".join(f"; {what} {_tally(n)}" for what, n in (("batch norm", bn_counts), ("max pool", pool_counts)) if n)
    saved = _save_cache({**cache, **entries}) if entries else ""
    counts = ", ".join(filter(None, [_tally(forms), f"{native} native" if native else ""]))
    pass_name = "training" if training else "inference"
    if not autotune:
        how = "fixed defaults"
    elif timed:
        how = f"autotuned {timed} layer shapes in {time.perf_counter() - start:.1f} s, {saved}"
    elif tuned:
        how = f"autotuned, from the cache {cache_path()}"
    else:
        how = "autotune: one candidate form per layer, nothing to time"
    return f"conv forms ({pass_name}, {dtype}, batch {batch}): {counts or 'no convolutions'}{others} ({how})"


def _tally(counts: Counter) -> str:
    """'8 matmul, 6 gather': each form with how many layers took it, the most common first."""
    return ", ".join(f"{n} {form}" for form, n in counts.most_common())


def _conv_keys(convs, batch: int, dtype: str, image_hw, training: bool, autotune: bool, cache: dict,
               pending: dict) -> list:
    """[(conv, cache key or None, fixed form)] for each im2col conv, the keys not cached yet added
    to `pending`. No key: one candidate, or no autotune; fixed form "default": the input size is
    not known, so the default rule decides at trace time."""
    chosen = []
    for conv in convs:
        spec = layer_spec(conv, dtype)
        if spec is None:
            chosen.append((conv, None, "default"))
            continue
        key, candidates = None, tunable_forms(spec)
        if autotune and len(candidates) > 1:
            # The candidates are part of the key: a form added later gets timed, not ignored.
            key = f"{spec.key()}|{'train' if training else 'infer'}|batch {batch}|{','.join(candidates)}"
            if key not in cache:
                # The first conv reads the images: its input gradient is never asked for.
                needs_dx = training and (spec.h, spec.w, spec.cin) != image_hw
                pending[key] = {"kind": "conv", "spec": list(spec), "forms": list(candidates), "batch": batch,
                                "training": training, "needs_dx": needs_dx}
        chosen.append((conv, key, conv_forms.default_form(spec, training)))
    return chosen


def _bn_keys(convs, batch: int, dtype: str, autotune: bool, cache: dict, pending: dict) -> list:
    """[(conv, cache key or None)] for each conv's training batch norm, the keys not cached yet
    added to `pending`. None means the fixed choice, fused. Split is a candidate only where no GPU
    is visible (its backward pass hands the CPU kernels' statistics to FusedBatchNormGradV3), and
    float16 runs Keras' own batch norm whatever the form (bn_forms.batch_norm)."""
    chosen = []
    tune = autotune and dtype != "float16" and not tf.config.list_physical_devices("GPU")
    for conv in convs:
        if conv.bn is None:
            continue
        key, shape = None, bn_shape(conv, batch)
        if tune and shape is not None:
            key = f"batch norm {'x'.join(map(str, shape))} {dtype}|{','.join(bn_forms.FORMS)}"
            if key not in cache:
                pending[key] = {"kind": "bn", "shape": list(shape), "dtype": dtype}
        chosen.append((conv, key))
    return chosen


# Pools smaller than this at the batch keep TensorFlow's gradient untimed: it takes well under a
# millisecond either way (the photos' 8x8x192 pool at batch 16: 2.0 against 1.2 ms, the Zen 3), less
# than the taps form's XLA compile (~0.5-1.5 s per shape, paid by every run) wins back in most runs.
POOL_MIN_BYTES = 1 << 20


def _pool_keys(model, batch: int, dtype: str, autotune: bool, cache: dict, pending: dict) -> list:
    """[(pool, cache key or None)] for each max pool's training gradient, the keys not cached yet
    added to `pending`. None means the fixed choice, native. Only where no GPU is visible (cuDNN's
    max-pool gradient is not the slow one) and for pools of POOL_MIN_BYTES or more."""
    chosen = []
    tune = autotune and not tf.config.list_physical_devices("GPU")
    pools = [p for p in model._flatten_layers(include_self=True, recursive=True) if isinstance(p, pool_forms.MaxPool2D)]
    for pool in pools:
        key, shape = None, pool.input_shape_seen
        big = shape is not None and batch * int(np.prod(shape)) * tf.as_dtype(dtype).size >= POOL_MIN_BYTES
        if tune and big and pool.data_format == "channels_last":
            size, strides = list(pool.pool_size), list(pool.strides)
            key = (f"max pool {batch}x{'x'.join(map(str, shape))} {'x'.join(map(str, size))}/"
                   f"{'x'.join(map(str, strides))} {pool.padding} {dtype}|{','.join(pool_forms.FORMS)}")
            if key not in cache:
                pending[key] = {"kind": "pool", "shape": [batch, *shape], "pool_size": size, "strides": strides,
                                "padding": pool.padding.upper(), "dtype": dtype}
        chosen.append((pool, key))
    return chosen


def time_pool_forms(job: dict) -> dict:
    """{"form": the fastest, "ms": {form: best ms}}: one max pool forward and backward."""
    x = tf.cast(tf.nn.relu(tf.random.stateless_normal(job["shape"], [0, 4])), job["dtype"])  # ReLU's ties
    size, strides, padding = tuple(job["pool_size"]), tuple(job["strides"]), job["padding"]

    def timed_call(form):
        gradient = pool_forms.taps_gradient(size, strides, padding) if form == "taps" else None

        @tf.function
        def train():
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = pool_forms.max_pool(x, size, strides, padding, gradient)
            return [tf.reduce_sum(y[:1]), tf.reduce_sum(tape.gradient(y, x, output_gradients=y)[:1])]
        return lambda: [t.numpy() for t in train()]

    calls = {form: timed_call(form) for form in pool_forms.FORMS}
    try:
        calls["taps"]()  # compiled by XLA: a TensorFlow build without XLA's CPU JIT keeps native
    except (tf.errors.OpError, ValueError) as e:
        log.warning("max pool: the taps form failed to run here (%s); keeping TensorFlow's gradient",
                    str(e).strip().splitlines()[0][:200])
        return {"form": "native", "ms": {}}
    return fastest(calls, f"max pool {job}")


def bn_shape(conv: layers.ConvBNReLU, batch: int) -> tuple[int, int, int, int] | None:
    """The shape a built ConvBNReLU's batch norm normalizes, or None if its input size is not known."""
    if conv.input_hw is None:
        return None
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    h, w = (layers._conv_output_size(n, k, s, p) for n in conv.input_hw)
    return batch, h, w, conv.filters


def time_bn_forms(shape, dtype: str) -> dict:
    """{"form": the fastest, "ms": {form: best ms}}: batch norm + ReLU forward and backward."""
    x = tf.cast(tf.random.stateless_normal(shape, [0, 3]), dtype)
    bn = keras.layers.BatchNormalization(epsilon=1e-3, dtype="float32")
    bn.build(shape)

    def timed_call(form):
        @tf.function
        def train():
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = tf.nn.relu(bn_forms.batch_norm(bn, x, True, form))
            grads = tape.gradient(y, [x, bn.gamma, bn.beta], output_gradients=y)
            return [tf.reduce_sum(y[:1])] + [tf.reduce_sum(g[:1]) for g in grads]
        return lambda: [t.numpy() for t in train()]

    return fastest({form: timed_call(form) for form in bn_forms.FORMS}, f"batch norm {shape} {dtype}")


def layer_spec(conv: layers.ConvBNReLU, dtype: str) -> conv_forms.ConvSpec | None:
    """The ConvSpec of a built ConvBNReLU, or None if its input size is not known."""
    if conv.input_hw is None:
        return None
    h, w = conv.input_hw
    kh, kw, cin, cout = conv.kernel.shape
    s = conv.stride
    return conv_forms.ConvSpec(h, w, int(cin), int(cout), int(kh), int(kw), s, s, conv.padding == "SAME", dtype)


def tunable_forms(spec: conv_forms.ConvSpec) -> tuple[str, ...]:
    """The forms worth timing: every applicable one, but 1x1 kernels are always plain matmuls (the
    gather form would do the same matmul plus a gather, or for stride 1 the very same ops), and
    Winograd (either) needs 8 input channels (on the seed network's stem, Cin 3, it took 4x the
    gather's time: its output-side transforms dwarf a GEMM with K = 3)."""
    forms = conv_forms.applicable_forms(spec)
    if "matmul" in forms:
        return ("matmul",)
    return tuple(f for f in forms if not f.startswith("winograd") or spec.cin >= 8)


# Timing at the real batch fills oneDNN's CPU memory pool, a BFC allocator that never hands memory
# back to the system: at the seed network's 100 px and batch 128 the timings left 1.8 GiB resident,
# and the first run's peak RSS rose from 3.8 to 4.9 GiB (AMD EPYC Zen 4, fp32). Timings whose
# biggest buffer passes this size run in a child process, whose pool goes when it exits (~5 s to
# start, once per machine and shape set); small ones (tests, small images) stay in this process.
CHILD_BYTES = 64 * 2**20


def job_bytes(job: dict) -> int:
    """About the biggest buffer a timing job allocates: the gather form's patch matrix, or the
    tensor a batch norm normalizes."""
    if job["kind"] in ("bn", "pool"):
        return int(np.prod(job["shape"])) * tf.as_dtype(job["dtype"]).size
    spec = conv_forms.ConvSpec(*job["spec"])
    return job["batch"] * spec.h * spec.w * spec.kh * spec.kw * spec.cin * tf.as_dtype(spec.dtype).size


def time_jobs(jobs: dict) -> dict:
    """{key: {"form", "ms"}} for {key: job}: in a child process where the buffers are big and no GPU
    is visible (a child would find the GPU's memory taken by this process), else here."""
    if jobs and max(map(job_bytes, jobs.values())) > CHILD_BYTES and not tf.config.list_physical_devices("GPU"):
        try:
            return _time_in_child(jobs)
        except (OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
            log.warning("conv forms: timing in a child process failed (%s); timing in this one", e)
    # Each timed form is a fresh tf.function by design; TensorFlow warned a user's first run
    # twice, at length, to stop retracing in a loop.
    with utils.quieted("tensorflow"):
        return {key: _time_job(job) for key, job in jobs.items()}


def _time_job(job: dict) -> dict:
    if job["kind"] == "bn":
        return time_bn_forms(tuple(job["shape"]), job["dtype"])
    if job["kind"] == "pool":
        return time_pool_forms(job)
    return time_forms(conv_forms.ConvSpec(*job["spec"]), job["forms"], job["batch"], job["training"],
                      job["needs_dx"])


def _time_in_child(jobs: dict) -> dict:
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--time_jobs"], input=json.dumps(jobs),
                       capture_output=True, text=True, timeout=1800)
    if p.returncode:
        raise subprocess.SubprocessError(f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
    entries = json.loads(p.stdout.strip().splitlines()[-1])
    if set(entries) != set(jobs):
        raise ValueError("the child timed other layer shapes than it was given")
    return entries


def time_forms(spec: conv_forms.ConvSpec, forms, batch: int, training: bool, needs_dx: bool) -> dict:
    """{"form": the fastest, "ms": {form: best ms per call}} for one layer shape."""
    return fastest({form: _timed_call(spec, form, batch, training, needs_dx) for form in forms}, spec.key())


def fastest(run: dict, what: str) -> dict:
    """{"form": the fastest, "ms": {form: best ms per call}} of {form: call}."""
    for f in run.values():
        f()  # trace and warm up
    best = {form: float("inf") for form in run}
    rounds, start = 0, time.perf_counter()
    while rounds < TIMED_CALLS or (rounds < MAX_ROUNDS and time.perf_counter() - start < MIN_TIMING_S):
        for form, f in run.items():  # interleaved, so a busy machine slows all alike
            t = time.perf_counter()
            f()
            best[form] = min(best[form], (time.perf_counter() - t) * 1000)
        rounds += 1
    winner = min(best, key=best.get)
    log.debug("forms %s: %s -> %s", what, best, winner)
    return {"form": winner, "ms": {f: round(ms, 2) for f, ms in best.items()}}


def _timed_call(spec: conv_forms.ConvSpec, form: str, batch: int, training: bool, needs_dx: bool):
    dtype = tf.as_dtype(spec.dtype)
    x = tf.cast(tf.random.stateless_normal([batch, spec.h, spec.w, spec.cin], [0, 1]), dtype)
    w = tf.cast(tf.random.stateless_normal([spec.kh, spec.kw, spec.cin, spec.cout], [0, 2]) * 0.1, dtype)
    bias = tf.zeros([spec.cout], dtype)
    sh, sw, same = spec.sh, spec.sw, spec.same

    @tf.function
    def train():
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = conv_forms.conv2d(x, w, sh, sw, same, form)
        # A non-constant upstream gradient, so no part of the backward pass folds away.
        grads = tape.gradient(y, [x, w] if needs_dx else [w], output_gradients=y)
        return [tf.reduce_sum(y[:1])] + [tf.reduce_sum(g[:1]) for g in grads]

    @tf.function
    def infer():
        return tf.reduce_sum(conv_forms.conv2d_bias_act(x, w, bias, sh, sw, same, form, True)[:1])

    f = train if training else infer
    return lambda: [t.numpy() for t in tf.nest.flatten(f())]


# ---------------------------------------------------------------------------------------------
# The cache: one JSON file, one section per machine
# ---------------------------------------------------------------------------------------------


def cache_path() -> str:
    return os.path.join(utils.user_cache_dir(), "conv_forms.json")


def machine_key() -> str:
    """What the timings depend on besides the layer: CPU (model, cores, flags, oneDNN cap, a malloc
    allocator), GPU, TF."""
    gpus = tf.config.list_physical_devices("GPU")
    gpu = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else "no GPU"
    return f"v{CACHE_VERSION}; {utils.cpu_line()}; {gpu}; TensorFlow {tf.__version__}"


def cached_entry(key: str, measure) -> dict:
    """This machine's cached entry `key`, or measure()'s, cached now (timed once per machine)."""
    cache = _load_cache()
    if key not in cache:
        cache[key] = measure()
        _save_cache(cache)
    return cache[key]


def _load_cache() -> dict:
    try:
        with open(cache_path(), encoding="utf-8") as f:
            return json.load(f).get(machine_key(), {})
    except (OSError, ValueError, AttributeError):
        return {}  # no cache yet, or unreadable: time again


def _save_cache(entries: dict) -> str:
    """Merge this machine's entries into the cache file (temp file + rename); returns "cached in
    PATH", or "not cached (PATH: why)" (the choice still holds for this run)."""
    path = cache_path()
    try:
        try:
            with open(path, encoding="utf-8") as f:
                everything = json.load(f)
        except (OSError, ValueError):
            everything = {}
        if not isinstance(everything, dict):
            everything = {}
        everything[machine_key()] = entries
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".conv_forms.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(everything, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return f"cached in {path}"
    except OSError as e:
        log.warning("conv forms: cannot write the cache %s (%s); the next run times again", path, e)
        return f"not cached ({path}: {e.strerror})"


if __name__ == "__main__" and sys.argv[1:] == ["--time_jobs"]:
    # time_jobs' child: {key: job} on stdin, {key: {"form", "ms"}} as the last line of stdout.
    print(json.dumps({key: _time_job(job) for key, job in json.load(sys.stdin).items()}))
