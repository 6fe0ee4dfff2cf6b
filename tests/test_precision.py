"""The precision policy (from fake CPU flags and GPU capabilities) and mixed-precision training steps."""
import os
import platform

import keras
import numpy as np
import pytest
import tensorflow as tf

import hw2
import precision
import utils
from helpers import bf16_kernels_missing
from utils import UserError

SPR = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}  # Intel Sapphire Rapids
ZEN4 = {"avx2", "avx512f", "avx512_bf16"}  # AMD EPYC Zen 4: bf16 dot products, no AMX
ZEN3 = {"avx2", "fma"}


@pytest.mark.parametrize("flags, gpu_cc, expected", [
    (SPR, None, "bf16"),
    (ZEN4, None, "bf16"),  # untimed here: the flag (timed, below)
    (ZEN3, None, "fp32"),
    (set(), None, "fp32"),  # unknown CPU (no /proc/cpuinfo)
    (ZEN3, (8, 0), "bf16"),  # A100: the GPU decides, not the host CPU
    (SPR, (9, 0), "bf16"),
    (SPR, (7, 0), "fp32"),  # V100: no bf16 tensor cores; fp16 only when asked for
    (ZEN3, (7, 5), "fp32"),
])
def test_auto_follows_the_hardware(flags, gpu_cc, expected):
    chosen, reason = precision.choose("auto", flags, gpu_cc)
    assert chosen == expected
    assert reason.startswith("auto: ")


@pytest.mark.parametrize("requested", ["fp32", "bf16"])
def test_an_explicit_precision_is_kept_on_any_hardware(requested):
    for flags, gpu_cc in [(ZEN3, None), (SPR, None), (ZEN3, (8, 6))]:
        assert precision.choose(requested, flags, gpu_cc) == (requested, "requested")


def test_an_isa_cap_below_bf16_kernels_means_fp32():
    """ONEDNN_MAX_CPU_ISA=AVX2 on a bf16 CPU: auto picks fp32, and bf16 (which crashed) is refused."""
    assert precision.choose("auto", ZEN4, None, "AVX2") == ("fp32", "auto: ONEDNN_MAX_CPU_ISA=AVX2 leaves oneDNN "
                                                                     "no bf16 kernels")
    assert precision.choose("auto", SPR, None, "avx512_core_amx")[0] == "bf16"
    with pytest.raises(UserError, match="ONEDNN_MAX_CPU_ISA=AVX2"):
        precision.choose("bf16", ZEN4, None, "AVX2")
    assert precision.choose("bf16", ZEN3, None, "AVX2") == ("bf16", "requested")  # emulated, slow, but runs
    assert precision.choose("auto", ZEN3, (8, 0), "AVX2")[0] == "bf16"  # the GPU decides


def test_avx512_bf16_without_amx_is_bf16_only_where_its_gemms_are_faster():
    """The flag alone did not tell (bf16 GEMMs 1.4-1.6x fp32 on a Zen 4, 0.68x on a Xeon whose
    virtual machine hides AMX): auto times them there, and nowhere else."""
    assert precision.choose("auto", ZEN4, None, bf16_gemm_speedup=lambda: 1.5)[0] == "bf16"
    chosen, reason = precision.choose("auto", ZEN4, None, bf16_gemm_speedup=lambda: 0.68)
    assert chosen == "fp32" and "0.68x" in reason
    assert precision.choose("auto", ZEN4, None)[0] == "bf16"  # untimed (--deterministic, tests): the flag
    # No flags to read (Windows, macOS): a Zen 4 laptop's bf16 shows in the timing alone.
    chosen, reason = precision.choose("auto", set(), None, bf16_gemm_speedup=lambda: 1.5)
    assert chosen == "bf16" and "unknown" in reason and "1.50x" in reason
    assert precision.choose("auto", set(), None, bf16_gemm_speedup=lambda: 0.14)[0] == "fp32"  # emulated

    def not_here():
        raise AssertionError("timed where the choice does not hang on it")
    for requested, flags, gpu_cc, cap in [("auto", SPR, None, None), ("auto", ZEN3, None, None),
                                          ("auto", ZEN4, (8, 0), None), ("auto", ZEN4, None, "AVX2"),
                                          ("fp32", ZEN4, None, None), ("bf16", ZEN4, None, None),
                                          ("auto", set(), None, "AVX2"), ("auto", set(), (8, 0), None)]:
        precision.choose(requested, flags, gpu_cc, cap, not_here)


@pytest.mark.skipif(bf16_kernels_missing(), reason="bf16 crashes under this ONEDNN_MAX_CPU_ISA cap")
def test_the_gemm_timing_runs_once_per_machine_and_decides(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(precision, "GEMM_PROBE", (512, 64, 32))  # the same code at a test's size
    speedup = precision.bf16_gemm_speedup()
    assert speedup > 0  # bf16 runs everywhere (emulated, slowly, without bf16 hardware)
    assert precision.probe_key() in (tmp_path / "hw2" / "conv_forms.json").read_text()
    monkeypatch.setattr(precision, "time_probe_gemms", lambda: pytest.fail("timed again"))
    assert precision.bf16_gemm_speedup() == speedup  # from the cache

    import conv_autotune
    monkeypatch.setattr(precision, "GEMM_PROBE", (64, 64, 32))
    conv_autotune.cached_entry(precision.probe_key(), lambda: {"form": "fp32", "ms": {"fp32": 1.0, "bf16": 2.0}})
    monkeypatch.setattr(precision, "cpu_flags", lambda: ZEN4)
    assert precision.for_this_machine("auto")[0] == "fp32"  # the planted timing: bf16 at half speed
    assert precision.for_this_machine("auto", timed=False)[0] == "bf16"


def test_fp16_needs_a_gpu_and_unknown_names_fail():
    assert precision.choose("fp16", ZEN3, (7, 0)) == ("fp16", "requested")
    with pytest.raises(UserError, match="GPU"):
        precision.choose("fp16", SPR, None)
    with pytest.raises(UserError, match="fp8"):
        precision.choose("fp8", SPR, None)


def test_cpu_flags_reads_the_first_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 amx_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert precision.cpu_flags(str(info)) == {"fpu", "avx2", "amx_bf16"}
    assert precision.cpu_flags(str(tmp_path / "missing")) == set()
    assert utils.cpu_line(str(info)).startswith(f"X ({os.cpu_count()} cores; avx2 amx_bf16")
    # Not Linux: the name the OS gives, and the flags said to be unknown (not "no avx2").
    line = utils.cpu_line(str(tmp_path / "missing"))
    assert "flags unknown" in line and "no avx2" not in line and line.startswith(platform.machine())


def test_config_default_is_auto_and_choices_are_checked():
    assert utils.load_config("default").precision == "auto"
    with pytest.raises(UserError, match="precision"):
        utils.load_config("default", {"precision": "fp8"})


def _one_step(cfg, model):
    strategy = tf.distribute.get_strategy()
    optimizer = hw2.make_optimizer(cfg, model)
    ema = hw2.EMA(model, cfg.ema_decay)  # the model comes built in a given precision: no create_train_state
    rng = np.random.default_rng(0)
    x = rng.normal(size=(cfg.batch_size, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    y = rng.integers(0, 3, cfg.batch_size).astype(np.int32)
    iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    step = hw2.make_train_step(model, optimizer, ema, strategy, cfg.batch_size)
    return optimizer, [float(t) for t in step(iterator)], [float(t) for t in step(iterator)]


@pytest.mark.skipif(bf16_kernels_missing(), reason="bf16 crashes under this ONEDNN_MAX_CPU_ISA cap")
@pytest.mark.parametrize("name, compute", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_mixed_precision_step_has_fp32_variables_and_a_finite_loss(name, compute):
    cfg = utils.load_config("tiny")
    with precision.policy(name):
        model = hw2.create_model(cfg, 3)
    assert keras.mixed_precision.global_policy().name == "float32"  # restored for later models
    assert model.dtype_policy.compute_dtype == compute
    assert {v.dtype for v in model.variables} <= {"float32", "int64"}  # int64: dropout seed states
    assert model(tf.zeros([2, cfg.image_size, cfg.image_size, 3])).dtype == tf.float32  # fp32 logits
    optimizer, first, second = _one_step(cfg, model)
    # fp16 trains through a loss-scaling optimizer; bf16 has fp32's exponent range and needs none.
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) == (name == "fp16")
    assert all(np.isfinite(first + second))
    # Dynamic loss scaling starts high and skips a step whose scaled gradients overflow (halving
    # the scale); that happens on the first step for some random initializations.
    applied = int(optimizer.iterations.numpy())
    assert applied == 2 if name == "bf16" else applied >= 1
    assert all(np.all(np.isfinite(v.numpy())) for v in model.trainable_variables)


def test_fp32_path_is_unchanged():
    cfg = utils.load_config("tiny")
    x = tf.random.stateless_normal([2, cfg.image_size, cfg.image_size, 3], seed=[1, 2])
    keras.utils.set_random_seed(0)
    plain = hw2.create_model(cfg, 3)
    keras.utils.set_random_seed(0)
    with precision.policy("fp32"):
        chosen = hw2.create_model(cfg, 3)
    assert chosen.dtype_policy.name == plain.dtype_policy.name == "float32"
    np.testing.assert_array_equal(plain(x).numpy(), chosen(x).numpy())
    optimizer, first, _ = _one_step(cfg, chosen)
    assert not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    assert all(np.isfinite(first))
