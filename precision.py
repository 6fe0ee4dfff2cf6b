"""Which floating-point precision to train in, chosen from the hardware this process runs on.

`--precision auto` (the default) becomes bf16 mixed precision (bfloat16 compute, float32
variables and loss) only where the hardware makes it faster, and fp32 elsewhere:

- GPU with compute capability >= 8.0 (Ampere and later): bf16 tensor cores.
- CPU with AMX (`amx_bf16`, Intel Sapphire Rapids and later): bf16 GEMMs ~3.4x fp32 and the
  seed network trains ~2.1x faster (issue 9).
- CPU with `avx512_bf16` but no AMX: bf16 where this machine's bf16 GEMMs run at least
  BF16_GEMM_MIN times as fast as its fp32 ones, timed once (under a second) and cached with the
  convolution forms; fp32 elsewhere. The flag alone does not tell: on a 2-core AMD EPYC (Zen 4)
  bf16 GEMMs ran 1.4-1.6x fp32 and the seed network trained 1.65x faster in bf16, on an Intel Xeon
  whose virtual machine hides AMX they ran 0.68x and training 0.94x (bench/README.md). Where
  timing must not decide (--deterministic, the tests, several workers) the flag decides: bf16.
- Anything else (AVX2 only): fp32; bf16 is emulated there and trains ~7x slower.

fp16 (mixed_float16 with loss scaling) is offered for GPUs only, and never chosen by `auto`.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Iterable, Iterator

import utils
from utils import UserError

# precision name -> Keras mixed-precision policy
POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
PRECISIONS = ("auto",) + tuple(POLICIES)


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags of the first CPU listed (empty if unknown, e.g. not Linux)."""
    return utils.cpu_info(path)[1]


def gpu_compute_capability() -> tuple[int, int] | None:
    """Compute capability of the first visible GPU, or None on a CPU-only machine."""
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    cc = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
    return tuple(cc) if cc else (0, 0)


# ONEDNN_MAX_CPU_ISA values under which oneDNN still has its bf16 kernels. Below them (AVX2, ...)
# on a CPU that has bf16 hardware, TensorFlow's bf16 matmul crashed (segmentation fault, TF 2.21).
BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
             "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
             "ALL", "DEFAULT")


# avx512_bf16 without AMX: the bf16/fp32 GEMM speed-up from which bf16 trains faster. Measured
# pairs (GEMM -> seed network's training): Zen 4 1.4-1.6 -> 1.65, AMX 2.3 -> 1.9, a VM-hidden-AMX
# Xeon 0.68 -> 0.94; bf16 also halves the memory traffic of the ops around the GEMMs.
BF16_GEMM_MIN = 1.2


def choose(requested: str, flags: Iterable[str], gpu_cc: tuple[int, int] | None,
           isa_cap: str | None = None, bf16_gemm_speedup: Callable[[], float] | None = None) -> tuple[str, str]:
    """(fp32 | bf16 | fp16, the reason in words) for `requested` on this hardware; `isa_cap` is
    ONEDNN_MAX_CPU_ISA, which limits the kernels oneDNN may use whatever the CPU has;
    `bf16_gemm_speedup()` times this machine's bf16 GEMMs against fp32 ones, called only where the
    choice hangs on it (None: the flags decide).

    A pure function of its inputs so the policy can be tested on any machine.
    """
    if requested not in PRECISIONS:
        raise UserError(f"'precision' must be one of {'|'.join(PRECISIONS)}, got '{requested}'")
    flags = set(flags)
    if requested == "fp16" and gpu_cc is None:
        raise UserError("precision fp16 needs a GPU (on a CPU it is emulated and very slow): "
                        "use --precision bf16 or fp32")
    capped = gpu_cc is None and isa_cap is not None and isa_cap.upper() not in BF16_ISAS
    if capped and requested == "bf16" and flags & {"avx512_bf16", "amx_bf16"}:
        raise UserError(f"precision bf16 with ONEDNN_MAX_CPU_ISA={isa_cap} crashes oneDNN's bf16 kernels on "
                        "this CPU: use --precision fp32, or unset ONEDNN_MAX_CPU_ISA")
    if requested != "auto":
        return requested, "requested"
    if capped:
        return "fp32", f"auto: ONEDNN_MAX_CPU_ISA={isa_cap} leaves oneDNN no bf16 kernels"
    if gpu_cc is not None:
        if gpu_cc >= (8, 0):
            return "bf16", f"auto: GPU compute capability {gpu_cc[0]}.{gpu_cc[1]} has bf16 tensor cores"
        return "fp32", f"auto: GPU compute capability {gpu_cc[0]}.{gpu_cc[1]} has no bf16 tensor cores"
    if "amx_bf16" in flags:
        return "bf16", "auto: CPU has AMX (amx_bf16)"
    if "avx512_bf16" in flags and bf16_gemm_speedup is None:
        return "bf16", "auto: CPU has avx512_bf16 (no AMX; not timed here; 1.65x fp32 on a Zen 4)"
    # No flags to read (Windows and macOS have no /proc/cpuinfo): bf16 hardware, a Zen 4 laptop's
    # say, shows in the same timing, and bf16 runs (slowly, emulated) where there is none.
    if ("avx512_bf16" in flags or not flags) and bf16_gemm_speedup is not None:
        cpu = "CPU has avx512_bf16 but no AMX" if flags else "this CPU's flags are unknown here"
        speedup = bf16_gemm_speedup()
        if speedup >= BF16_GEMM_MIN:
            return "bf16", f"auto: {cpu}, and its bf16 GEMMs timed {speedup:.2f}x fp32"
        return "fp32", f"auto: {cpu}, and its bf16 GEMMs timed only {speedup:.2f}x fp32 (bf16 needs {BF16_GEMM_MIN}x)"
    return "fp32", "auto: CPU has no bf16 hardware" if flags else "auto: this CPU's flags are unknown here (not timed)"


def apply(precision: str) -> None:
    """Set the Keras global dtype policy; models built afterwards compute in it."""
    import keras
    keras.mixed_precision.set_global_policy(POLICIES[precision])


@contextlib.contextmanager
def policy(precision: str) -> Iterator[None]:
    """Build models inside this block to compute in `precision`; the global policy is restored
    after, so a later model (e.g. another test's) is not silently built in bf16."""
    import keras
    previous = keras.mixed_precision.global_policy()
    apply(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def for_this_machine(requested: str, timed: bool = True) -> tuple[str, str]:
    """choose() with this machine's CPU flags and GPU, and where `timed` its bf16 GEMM speed-up
    (timed once per machine, cached); logs the choice."""
    precision, reason = choose(requested, cpu_flags(), gpu_compute_capability(), os.environ.get("ONEDNN_MAX_CPU_ISA"),
                               bf16_gemm_speedup if timed else None)
    logging.info("precision %s (%s)", precision, reason)
    return precision, reason


# conv2's two GEMMs (its 3x3x64 patches by 128 filters: forward and filter gradient) at a tenth of
# the throughput bench's rows: on the hidden-AMX Xeon 0.71-0.76x at 32768 rows as at 320,000
# (0.72-0.78), timed in ~1 s instead of ~12.
GEMM_PROBE = (32768, 576, 128)


def probe_key() -> str:
    return f"precision bf16/fp32 GEMM {'x'.join(map(str, GEMM_PROBE))}"


def bf16_gemm_speedup() -> float:
    """fp32 time / bf16 time of the probe GEMMs on this machine, from the forms cache or timed now
    (0.0 if bf16 fails to run)."""
    import conv_autotune
    ms = conv_autotune.cached_entry(probe_key(), time_probe_gemms)["ms"]
    return ms["fp32"] / ms["bf16"] if ms.get("bf16") else 0.0


def conv_gemms(m: int, k: int, n: int, dtype) -> Callable[[], list]:
    """A call that runs a conv layer's two GEMMs in `dtype`, patches [m, k] by filters [k, n]
    (forward) and patches^T by dY [m, n] (filter gradient), and waits for them; also the
    throughput bench's `bf16/fp32 GEMM alone` row."""
    import tensorflow as tf
    cols, w, dy = (tf.cast(tf.random.stateless_normal(shape, [0, i]), dtype)
                   for i, shape in enumerate(((m, k), (k, n), (m, n))))
    gemms = tf.function(lambda: (tf.matmul(cols, w)[:1, :1], tf.matmul(cols, dy, transpose_a=True)[:1, :1]))
    return lambda: [t.numpy() for t in gemms()]


def time_probe_gemms() -> dict:
    """{"form": the faster precision, "ms": {"fp32", "bf16"}}, as the forms cache keeps timings."""
    import tensorflow as tf

    import conv_autotune
    calls = {name: conv_gemms(*GEMM_PROBE, dtype) for name, dtype in (("fp32", tf.float32), ("bf16", tf.bfloat16))}
    try:
        return conv_autotune.fastest(calls, probe_key())
    except tf.errors.OpError as e:  # bf16 kernels missing: no bf16 here
        logging.warning("precision: the bf16 GEMM failed to run (%s); training in fp32", e.message.splitlines()[0])
        return {"form": "fp32", "ms": {"fp32": 1.0, "bf16": 0.0}}
