"""Which floating-point precision to train in, chosen from the hardware this process runs on.

`--precision auto` (the default) becomes bf16 mixed precision (bfloat16 compute, float32
variables and loss) only where the hardware makes it faster, and fp32 elsewhere:

- GPU with compute capability >= 8.0 (Ampere and later): bf16 tensor cores.
- CPU with AMX (`amx_bf16`, Intel Sapphire Rapids and later): bf16 GEMMs ~3.4x fp32 and the
  seed network trains ~2.1x faster (issue 9).
- CPU with `avx512_bf16` but no AMX (AMD Zen 4, Intel Cooper Lake): bf16 too. Measured on a
  2-core AMD EPYC (Zen 4), seed network, batch 128: bf16 trains 1.65x faster than fp32 (im2col,
  with the fused batch norm of layers.py; 1.4x before it) and a 2048^3 GEMM runs ~2x faster; not the 1.8x+ of AMX, but a gain, so
  requiring AMX would leave speed unused (bench/README.md has the figures and commands).
- Anything else (AVX2 only): fp32; bf16 is emulated there and trains ~7x slower.

fp16 (mixed_float16 with loss scaling) is offered for GPUs only, and never chosen by `auto`.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterable, Iterator

from utils import UserError

# precision name -> Keras mixed-precision policy
POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
PRECISIONS = ("auto",) + tuple(POLICIES)


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags of the first CPU listed (empty if unknown, e.g. not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


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


def choose(requested: str, flags: Iterable[str], gpu_cc: tuple[int, int] | None,
           isa_cap: str | None = None) -> tuple[str, str]:
    """(fp32 | bf16 | fp16, the reason in words) for `requested` on this hardware; `isa_cap` is
    ONEDNN_MAX_CPU_ISA, which limits the kernels oneDNN may use whatever the CPU has.

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
    if "avx512_bf16" in flags:
        return "bf16", "auto: CPU has avx512_bf16 (no AMX; measured 1.65x fp32 on a Zen 4)"
    return "fp32", "auto: CPU has no bf16 hardware"


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


def for_this_machine(requested: str) -> tuple[str, str]:
    """choose() with this machine's CPU flags and GPU; logs the choice once."""
    precision, reason = choose(requested, cpu_flags(), gpu_compute_capability(), os.environ.get("ONEDNN_MAX_CPU_ISA"))
    logging.info("precision %s (%s)", precision, reason)
    return precision, reason
