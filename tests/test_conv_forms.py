"""conv_autotune.choose_conv_forms: fixed defaults, timed choices, the per-machine cache."""

import json
import logging
import os
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import conv_autotune  # noqa: E402
import conv_forms  # noqa: E402
import pool_forms  # noqa: E402
from layers import ConvBNReLU, ConvStack, InceptionModule  # noqa: E402

INPUT = (4, 12, 12, 3)


def small_model():
    """Every kind of layer shape: a 3-channel stem, stride 2, 1x1s and 3x3s with 16+ channels."""
    inputs = keras.Input(INPUT[1:])
    x = ConvStack([16, 16], strides=[1, 2])(inputs)
    x = InceptionModule(2, (8, 16, 16, 8), 16)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    model(tf.zeros(INPUT))  # as hw2.create_model does: the inception's max pool sees its input shape
    return model


def convs(model):
    return [layer for layer in model._flatten_layers() if isinstance(layer, ConvBNReLU)]


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def test_fixed_defaults_without_autotune(cache_home):
    model = small_model()
    line = conv_autotune.choose_conv_forms(model, INPUT, "float32", training=True, autotune=False)
    forms = {c.name: c.train_form for c in convs(model)}
    # Stem and stride 2: gather; the 1x1s: matmul; 3x3 stride 1 with 16 channels in: Winograd.
    assert forms["conv0"] == forms["conv1"] == "gather"
    assert {forms[n] for n in ("a_1x1", "b_1x1", "c_1x1", "d_1x1")} == {"matmul"}
    assert {forms[n] for n in ("b_3x3", "c_3x3a", "c_3x3b")} == {"winograd"}
    assert all(c.infer_form is None for c in convs(model))  # the inference pass is set separately
    assert {c.bn_form for c in convs(model)} == {"fused"}
    assert line.startswith("conv forms (training, float32, batch 4): ") and "fixed defaults" in line
    assert "; batch norm 9 fused; max pool 1 native (" in line
    assert not (cache_home / "hw2").exists()  # nothing timed, nothing written
    # bfloat16 takes Winograd too, on F(2x2, 3x3)'s small tiles (conv_forms.tile_side).
    conv_autotune.choose_conv_forms(model, INPUT, tf.bfloat16, training=False, autotune=False)
    assert {c.infer_form for c in convs(model)} == {"gather", "matmul", "winograd"}


def test_autotune_times_once_then_reads_the_cache(cache_home, monkeypatch):
    monkeypatch.setattr(conv_autotune, "POOL_MIN_BYTES", 0)  # the max pool too, small as it is here
    model = small_model()
    line = conv_autotune.choose_conv_forms(model, INPUT, "float32", training=True, autotune=True)
    assert "autotuned" in line and "in " in line
    path = cache_home / "hw2" / "conv_forms.json"
    entries = json.loads(path.read_text())[conv_autotune.machine_key()]
    # Timed: the stem (3 input channels: gather or pairs; Winograd needs 8), the inception's three
    # 3x3s (one shape: gather, winograd or pairs) and conv1 (3x3 stride 2: gather or winograd_s2).
    # Not the 1x1s (always matmul). And the batch norm of each output shape: conv0's 12x12x16, conv1's and the
    # 16-wide towers' 6x6x16, the 8-wide towers' 6x6x8. And the inception's max pool (3x3/1 on 6x6x16).
    stem_key = "12x12x3-3x3/1x1-same-16-float32|train|batch 4|gather,pairs"
    conv_key = "6x6x16-3x3/1x1-same-16-float32|train|batch 4|gather,winograd,pairs"
    s2_key = "12x12x16-3x3/2x2-same-16-float32|train|batch 4|gather,winograd_s2"
    bn_keys = [f"batch norm 4x{shape} float32|fused,split" for shape in ("12x12x16", "6x6x16", "6x6x8")]
    pool_key = "max pool 4x6x6x16 3x3/1x1 same float32|native,taps"
    assert sorted(entries) == sorted([stem_key, conv_key, s2_key, pool_key] + bn_keys)
    assert set(entries[pool_key]["ms"]) == {"native", "taps"}
    assert next(p for p in model._flatten_layers() if isinstance(p, pool_forms.MaxPool2D)).form == \
        entries[pool_key]["form"]
    assert set(entries[stem_key]["ms"]) == {"gather", "pairs"}
    assert set(entries[conv_key]["ms"]) == {"gather", "winograd", "pairs"}
    assert set(entries[s2_key]["ms"]) == {"gather", "winograd_s2"}
    assert next(c for c in convs(model) if c.name == "conv0").train_form == entries[stem_key]["form"]
    assert next(c for c in convs(model) if c.name == "conv1").train_form == entries[s2_key]["form"]
    assert all(set(entries[k]["ms"]) == {"fused", "split"} for k in bn_keys)
    assert all(entry["form"] in entry["ms"] for entry in entries.values())
    chosen = [c.train_form for c in convs(model)]
    assert all(f in conv_forms.FORMS for f in chosen)
    assert {c.bn_form for c in convs(model)} <= {"fused", "split"}

    # A second model on this machine takes the cached choice without timing anything.
    again = small_model()
    second = conv_autotune.choose_conv_forms(again, INPUT, "float32", training=True, autotune=True)
    assert "from the cache" in second
    assert [c.train_form for c in convs(again)] == chosen

    # A cached choice is used as is, so a planted one shows it was read.
    key = "6x6x16-3x3/1x1-same-16-float32|train|batch 4|gather,winograd,pairs"
    entries[key]["form"] = "gather" if entries[key]["form"] == "winograd" else "winograd"
    path.write_text(json.dumps({conv_autotune.machine_key(): entries}))
    third = small_model()
    stem = bn_keys[0]
    entries[stem]["form"] = "fused" if entries[stem]["form"] == "split" else "split"
    path.write_text(json.dumps({conv_autotune.machine_key(): entries}))
    third = small_model()
    conv_autotune.choose_conv_forms(third, INPUT, "float32", training=True, autotune=True)
    assert next(c for c in convs(third) if c.name == "b_3x3").train_form == entries[key]["form"]
    assert next(c for c in convs(third) if c.name == "conv0").bn_form == entries[stem]["form"]


def test_short_timings_take_more_rounds(monkeypatch):
    # Calls of a few ms are timed round after round until MIN_TIMING_S (at most MAX_ROUNDS), long
    # ones TIMED_CALLS times; each form once more, untimed, first.
    calls = {"a": 0, "b": 0}

    def call(form, seconds):
        def f():
            calls[form] += 1
            time.sleep(seconds)
        return f

    # A MIN_TIMING_S far above what 20 rounds take, so that MAX_ROUNDS binds however slowly a busy
    # machine wakes from the sleeps (at 0.25 s, rounds of over 12.5 ms would end the timing early).
    monkeypatch.setattr(conv_autotune, "MIN_TIMING_S", 60.0)
    result = conv_autotune.fastest({"a": call("a", 0.002), "b": call("b", 0.0)}, "short")
    assert result["form"] == "b" and result["ms"]["a"] >= 2.0
    assert calls == {"a": conv_autotune.MAX_ROUNDS + 1, "b": conv_autotune.MAX_ROUNDS + 1}
    monkeypatch.setattr(conv_autotune, "MIN_TIMING_S", 0.0)
    calls.update(a=0, b=0)
    conv_autotune.fastest({"a": call("a", 0.0), "b": call("b", 0.0)}, "long")
    assert calls == {"a": conv_autotune.TIMED_CALLS + 1, "b": conv_autotune.TIMED_CALLS + 1}


def test_timing_many_shapes_prints_no_tensorflow_retracing_warning():
    """Each timed form is a fresh tf.function; TensorFlow's 'triggered tf.function retracing'
    warning (seen twice in a first run on a new machine) must not reach the user's log."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    tf.get_logger().addHandler(handler)
    try:
        jobs = {f"bn {c}": {"kind": "bn", "shape": [2, 4, 4, c], "dtype": "float32"} for c in (3, 4, 5, 6, 7, 9)}
        entries = conv_autotune.time_jobs(jobs)
    finally:
        tf.get_logger().removeHandler(handler)
    assert set(entries) == set(jobs)
    assert not [r for r in records if "retracing" in r.getMessage()]


def test_big_timings_run_in_a_child_process(cache_home, monkeypatch, caplog):
    """Past CHILD_BYTES the timings run in a child (oneDNN's memory pool keeps what they touch), and
    a child that fails falls back to timing here."""
    monkeypatch.setattr(conv_autotune, "CHILD_BYTES", 0)
    monkeypatch.setattr(conv_autotune, "_time_job", lambda job: pytest.fail("timed in this process"))
    model = small_model()
    line = conv_autotune.choose_conv_forms(model, INPUT, "float32", training=True, autotune=True)
    assert "autotuned 6 layer shapes" in line  # the three 3x3 shapes and three batch-norm shapes
    entries = json.loads((cache_home / "hw2" / "conv_forms.json").read_text())[conv_autotune.machine_key()]
    assert len(entries) == 6 and all(e["form"] in e["ms"] for e in entries.values())
    assert next(c for c in convs(model) if c.name == "b_3x3").train_form == \
        entries["6x6x16-3x3/1x1-same-16-float32|train|batch 4|gather,winograd,pairs"]["form"]

    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home / "again"))
    monkeypatch.setattr(conv_autotune, "CHILD_BYTES", 0)
    monkeypatch.setattr(conv_autotune.sys, "executable", "/bin/false")
    with caplog.at_level("WARNING"):
        line = conv_autotune.choose_conv_forms(small_model(), INPUT, "float32", training=True, autotune=True)
    assert "autotuned 6 layer shapes" in line
    assert "timing in a child process failed (exit 1" in caplog.text


def test_chosen_forms_train_like_native(cache_home):
    """Whatever the autotune picked, a training step gives the gradients of tf.nn.conv2d with the
    fused batch norm, with every batch norm split as well."""
    keras.utils.set_random_seed(0)
    model = small_model()
    conv_autotune.choose_conv_forms(model, INPUT, "float32", training=True, autotune=True)
    chosen_bn = [c.bn_form for c in convs(model)]
    x = tf.constant(np.random.default_rng(0).normal(size=INPUT), tf.float32)
    grads = {}
    for impl, bn in (("im2col", chosen_bn), ("im2col", ["split"] * 9), ("native", ["fused"] * 9)):
        for c, form in zip(convs(model), bn):
            c.conv_impl, c.bn_form = impl, form
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True) ** 2)
        grads[impl, tuple(bn)] = tape.gradient(loss, model.trainable_weights)
    reference = grads.pop(("native", ("fused",) * 9))
    # Relative to each gradient's norm, not elementwise: nine layers of batch norm over 4 images
    # amplify rounding, and one CI CPU put 2 of 432 stem-kernel entries 1.8% (1.3e-4) off while the
    # tensor as a whole agreed to ~1e-4. A wrong form is off by O(1).
    for key, got in grads.items():
        for weight, a, b in zip(model.trainable_weights, got, reference):
            error = np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))
            assert error < 1e-3, f"{key} {weight.path}: relative error {error:.2e}"


def test_unwritable_cache_still_chooses(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    model = small_model()
    line = conv_autotune.choose_conv_forms(model, INPUT, "float32", training=False, autotune=True)
    assert f"s, not cached ({blocker}/hw2/conv_forms.json: Not a directory)" in line
    assert all(c.infer_form in conv_forms.FORMS for c in convs(model))


def test_native_layers_are_left_alone(cache_home):
    model = small_model()
    for c in convs(model):
        c.conv_impl = "native"
    line = conv_autotune.choose_conv_forms(model, INPUT, "float32", training=True, autotune=True)
    assert all(c.train_form is None for c in convs(model))
    assert "batch 4): 9 native; batch norm " in line
    assert {c.bn_form for c in convs(model)} <= {"fused", "split"}  # the batch norm is chosen still
    if not tf.config.list_physical_devices("GPU"):  # where batch norm has two forms to time
        # The three batch norms; the max pool (9 KB at this batch) is under POOL_MIN_BYTES, not worth a compile.
        assert "autotuned 3 layer shapes" in line and "; max pool 1 native (" in line
        again = conv_autotune.choose_conv_forms(model, INPUT, "float32", training=True, autotune=True)
        assert "from the cache" in again  # not "nothing to time": its batch norms were timed
