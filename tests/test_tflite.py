"""hw2_export.py --tflite and hw2_predict.py --model model.tflite on real digit scans: the TFLite
model gives the SavedModel's top-1 and hw2_eval's probabilities; user mistakes are one line."""
import contextlib
import csv
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import evaluation
import hw2_export
import hw2_input
import hw2_predict
import hw2_train
import run_dir as run_dirs
import serving


def write_digits(root, size: int, first: int, count: int) -> list[str]:
    """scikit-learn's 8x8 digit scans 0-2 (of the first..first+count scans) as size x size PNGs in
    root/<digit>/; returns the paths written."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    paths = []
    for i in range(first, first + count):
        label = digits.target[i]
        if label < 3:
            os.makedirs(root / str(label), exist_ok=True)
            image = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8))
            paths.append(str(root / str(label) / f"{i}.png"))
            (image if size == 8 else image.resize((size, size))).save(paths[-1])
    return paths


def train_and_export(tmp):
    """A [tiny] run trained on the 301 digits 0-2 among the first 1000 scans, stored at 8x8 (hw2
    upsamples them to 20), exported with --tflite after 150 steps of 32."""
    write_digits(tmp / "digits", 8, 0, 1000)
    run, model = str(tmp / "run"), str(tmp / "model")
    with contextlib.redirect_stdout(io.StringIO()):
        assert hw2_train.main(["--data_dir", str(tmp / "digits"), "--train_dir", run, "--section", "tiny",
                               "--batch_size", "32", "--max_steps", "150", "--learning_rate", "0.01",
                               "--save_checkpoint_steps", "150", "--log_every_steps", "1000"]) == 0
        assert hw2_export.main(["--checkpoint_dir", run, "--export_dir", model, "--tflite"]) == 0
    return run, model


# One test: its run is the costly part, and a module fixture would be built again by each
# pytest-xdist worker that gets one of its tests.
def test_tflite_agrees_with_the_savedmodel_and_hw2_eval_and_predicts_the_same(tmp_path, capsys):
    run, model = train_and_export(tmp_path)
    info = json.load(open(os.path.join(model, "model.tflite.json")))
    assert info["class_names"] == ["0", "1", "2"] and info["image_size"] == 16 and info["channels"] == 3
    assert info["preprocessing"]["resize_short_side_to"] == 18 and info["preprocessing"]["center_crop"] == [16, 16]
    assert json.load(open(os.path.join(model, "hw2_export.json")))["tflite"] == "model.tflite"
    assert info["quantize"] == "none"
    cfg, names = run_dirs.read_config(run)
    items = [(path, label) for path, label in run_dirs.load_json(os.path.join(run, "split.json"), "split")["train"]]
    files = [str(tmp_path / "digits" / path) for path, _ in items]
    tflite = serving.TFLiteModel(os.path.join(model, "model.tflite"))
    got = np.stack([p for p, _ in tflite.predict_files(files, batch_size=100)])
    saved = tf.saved_model.load(model)
    served = saved.serve(tf.constant([open(f, "rb").read() for f in files]))["probabilities"].numpy()
    assert len(files) > 200
    # The SavedModel resamples the 8x8 scans in TensorFlow ops, a few grey levels from PIL
    # (serving.py): probabilities move by up to ~0.02, so an image that close to a tie may flip.
    np.testing.assert_allclose(got, served, atol=0.05)
    top2 = np.sort(served, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05
    assert clear.mean() > 0.5 and (got.argmax(1) == served.argmax(1))[clear].all()
    # A model that tells digits apart, so that agreeing on its argmax means something: 0.89 of its
    # training scans under ONEDNN_MAX_CPU_ISA=AVX2, 0.85 without. Before the batch-norm statistics
    # warmed up (hw2.StatisticsWarmUp) its 150 steps left them 22% initial values, and it scored
    # 0.38-0.48 or 0.90 with the CPU's kernels.
    assert (got.argmax(1) == [label for _, label in items]).mean() > 0.7 and len(set(got.argmax(1))) == 3
    # The TFLite path reads and prepares images with hw2's own code: hw2_eval's fp32 probabilities.
    hw2 = evaluation.Evaluator(run, 1, precision_name="fp32").evaluate(
        run_dirs.pick_checkpoint(run, prefer_best=True), hw2_input.eval_dataset(str(tmp_path / "digits"), items, cfg, 64))
    np.testing.assert_allclose(got, hw2.probabilities, atol=1e-4)

    # Any batch size: the interpreter's input is resized per batch.
    images = np.stack([tflite.preprocess(f) for f in files[:5]])
    together = tflite.probabilities(images)
    np.testing.assert_allclose(np.concatenate([tflite.probabilities(images[i:i + 1]) for i in range(5)]), together,
                               atol=1e-6)
    np.testing.assert_allclose(tflite.probabilities(images[:3]), together[:3], atol=1e-6)
    np.testing.assert_allclose(together, got[:5], atol=1e-6)


    # hw2_predict with model.tflite and with the SavedModel: the same classes, the same bad file.
    write_digits(tmp_path / "images", 20, 1000, 60)  # short side 20 = [tiny]'s base size: the same pixels
    (tmp_path / "images" / "0" / "broken.png").write_bytes(b"not a png")
    rows = {}
    for name, path in (("tflite", os.path.join(model, "model.tflite")), ("saved", model)):
        out = str(tmp_path / f"{name}.csv")
        assert hw2_predict.main(["--model", path, "--images", str(tmp_path / "images"), "--out", out,
                                 "--batch_size", "7"]) == 0
        assert "1 unreadable" in capsys.readouterr().out
        rows[name] = list(csv.DictReader(open(out)))
    assert len(rows["tflite"]) == len(rows["saved"]) > 15
    for a, b in zip(rows["tflite"], rows["saved"]):
        assert (a["path"], a["class_1"], a["class_2"]) == (b["path"], b["class_1"], b["class_2"])
        assert bool(a["error"]) == bool(b["error"]) == a["path"].endswith("broken.png")
        if not a["error"]:
            assert float(a["prob_1"]) == pytest.approx(float(b["prob_1"]), abs=1e-4)


def a_tflite_model() -> bytes:
    """A valid .tflite flatbuffer (not hw2's): x -> x + 1."""
    fn = tf.function(lambda x: x + 1.0, input_signature=[tf.TensorSpec([1, 2], tf.float32)])
    return tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()]).convert()


def test_tflite_weights_in_8_and_16_bits_give_the_float_models_answers(tmp_path):
    """--tflite dynamic / float16 on hw2's own network (weights as initialized: the conversion is
    what is tested): int8 / float16 weight tensors, a smaller file, nearly the same probabilities.
    (The [tiny] run of the test above has no weight of the 1,024 values TFLite quantizes from.)"""
    import types

    import hw2
    import layers
    import utils
    cfg = utils.load_config("tiny", {"conv2": "32", "dense_units": "256"})
    model = hw2.create_model(cfg, 3)
    model(tf.zeros([1, 16, 16, 3]))
    layers.set_conv_impl(model, "native")  # as serving.serving_model exports it
    module = types.SimpleNamespace(model=model)
    info = {"config": cfg, "tta": "none", "class_names": ["a", "b", "c"], "top_k": 1, "weights": "ema",
            "checkpoint": "ckpt-0", "hw2_version": "test", "tensorflow": tf.__version__}
    images = np.random.default_rng(0).uniform(0, 255, [8, 16, 16, 3]).astype(np.float32)
    probabilities, sizes = {}, {}
    for quantize in serving.TFLITE_QUANTIZE:
        path = str(tmp_path / f"{quantize}.tflite")
        serving.write_tflite(module, path, info, quantize)
        lite = serving.TFLiteModel(path)
        probabilities[quantize], sizes[quantize] = lite.probabilities(images), os.path.getsize(path)
        dtypes = {d["dtype"] for d in lite.interpreter.get_tensor_details()}
        assert (np.int8 in dtypes, np.float16 in dtypes) == (quantize == "dynamic", quantize == "float16"), dtypes
        assert json.load(open(path + ".json"))["quantize"] == quantize
    # Most of these weights are the dense kernel's 16 x 256 floats (16 KB): 4 KB in int8, 8 in float16.
    assert max(sizes["dynamic"], sizes["float16"]) + 8_000 < sizes["none"], sizes
    np.testing.assert_allclose(probabilities["dynamic"], probabilities["none"], atol=0.05)
    np.testing.assert_allclose(probabilities["float16"], probabilities["none"], atol=0.01)


def test_an_unknown_tflite_quantization_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert hw2_export.main(["--checkpoint_dir", str(run), "--export_dir", str(tmp_path / "m"), "--tflite", "int8"]) == 2
    assert capsys.readouterr().err.strip() == "error: --tflite int8: the weights can be none, dynamic, float16"
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "x.tflite").write_bytes(b"\0" * 64), "x.tflite is not a TFLite model"),
    (lambda d: (d / "x.tflite").write_bytes(a_tflite_model()), "x.tflite.json"),  # no description beside it
    (lambda d: None, "not found"),
])
def test_predict_tflite_user_errors(tmp_path, capsys, make, message):
    make(tmp_path)
    png = tmp_path / "a.png"
    Image.new("RGB", (20, 20)).save(png)
    assert hw2_predict.main(["--model", str(tmp_path / "x.tflite"), "--images", str(png),
                             "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
