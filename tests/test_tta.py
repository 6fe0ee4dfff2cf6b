"""Test-time augmentation: hw2_eval --tta flip and the export's --tta flip give the mean of two
separate passes, one over the images and one over their mirrors; --tta auto (the default) is flip
for a run that trained with flip_lr and none for one that did not."""
import contextlib
import csv
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

import class_report
import evaluation
import hw2_eval
import hw2_export
import hw2_input
import run_dir as run_dirs
import serving
from helpers import make_image_folder


def test_eval_tta_flip_is_the_mean_of_the_image_and_mirror_passes(tiny_run, tmp_path, capsys):
    best = os.path.join(tiny_run.run, "best")
    test = make_image_folder(tmp_path / "test", per_class=6, seed=3, noise=60)
    # The default (--tta auto) is flip for this run, which trained with flip_lr = true ([tiny]).
    assert hw2_eval.main(["--checkpoint_dir", best, "--test_data_path", test,
                          "--eval_dir", str(tmp_path / "eval")]) == 0
    assert "tta flip" in capsys.readouterr().out

    cfg, names = run_dirs.read_config(tiny_run.run)
    data_dir, items, _ = evaluation.eval_items(tiny_run.run, names, test)
    dataset = hw2_input.eval_dataset(data_dir, items, cfg, 16)
    mirrored = dataset.map(lambda images, labels: (tf.image.flip_left_right(images), labels))
    path = run_dirs.pick_checkpoint(best)
    plain = evaluation.Evaluator(tiny_run.run, 2, tta="none")  # one pass, in the run's precision
    image, mirror = plain.evaluate(path, dataset), plain.evaluate(path, mirrored)
    assert np.abs(image.probabilities - mirror.probabilities).max() > 1e-3  # the mirror really differs
    mean = (image.probabilities + mirror.probabilities) / 2
    tta = evaluation.Evaluator(tiny_run.run, 2, tta="flip").evaluate(path, dataset)
    np.testing.assert_allclose(tta.probabilities, mean, atol=1e-6)

    # What hw2_eval wrote: the loss and top-1 of those probabilities, the mistakes among them.
    expected = evaluation.metrics(image.labels, mean, 2)
    row = list(csv.DictReader(open(tmp_path / "eval" / "results.csv")))[-1]
    assert float(row["loss"]) == pytest.approx(expected["loss"], abs=2e-6)
    assert float(row["top1"]) == pytest.approx(expected["top1"], abs=1e-6) and row["data"].endswith("tta flip")
    errors = list(csv.DictReader(open(tmp_path / "eval" / "errors.csv")))
    wrong = class_report.mistakes(image.labels, mean)
    assert [r["path"] for r in errors] == [os.path.join(data_dir, items[i][0]) for i in wrong]
    assert [float(r["probability"]) for r in errors] == pytest.approx(mean[wrong].max(axis=1), abs=2e-6)


def test_auto_tta_is_flip_only_where_the_run_trained_on_mirrors():
    assert evaluation.resolve_tta("auto", {"flip_lr": True}) == "flip"
    assert evaluation.resolve_tta("auto", {"flip_lr": False}) == "none"  # digits, text: a mirror is not the class
    assert evaluation.resolve_tta("none", {"flip_lr": True}) == "none"
    assert evaluation.resolve_tta("flip", {"flip_lr": False}) == "flip"  # what the user asks for


def test_export_tta_flip_is_the_mean_of_the_image_and_mirror_passes(tiny_run, tmp_path):
    """The exported graph (bytes in) against the plain graph run on the files and on mirrored copies.
    Sizes where hw2's eval crop is centred exactly ([tiny]: 20 x W -> 18 x W', W' - 16 even), so
    the crop of a mirror is the mirror of the crop. The default export (--tta auto) of this run,
    which trained with flip_lr = true, is the flip graph, and says so (`--tta flip` resolves by
    the same code: test_auto_tta_is_flip_only_where_the_run_trained_on_mirrors)."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert hw2_export.main(["--checkpoint_dir", tiny_run.run, "--export_dir", str(tmp_path / "model")]) == 0
    assert out.getvalue().rstrip().endswith("tta flip")
    assert json.load(open(tmp_path / "model" / "hw2_export.json"))["tta"] == "flip"
    rng = np.random.default_rng(6)
    files, mirrors = [], []
    for i, width in enumerate([20, 22, 24, 22, 20, 24]):
        pixels = np.clip(rng.normal(60 + 25 * i, 50, (20, width, 3)), 0, 255).astype(np.uint8)
        pixels[:, : width // 3] = 240  # a bright band on one side: the mirror changes the prediction
        for out, image in ((files, Image.fromarray(pixels)), (mirrors, ImageOps.mirror(Image.fromarray(pixels)))):
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            out.append(buffer.getvalue())
    flip = tf.saved_model.load(str(tmp_path / "model"))
    plain = serving.build_serving_module(tiny_run.run, run_dirs.pick_checkpoint(tiny_run.run, prefer_best=True),
                                         tta="none")
    image, mirror = (plain.serve(tf.constant(b))["probabilities"].numpy() for b in (files, mirrors))
    assert np.abs(image - mirror).max() > 1e-3
    np.testing.assert_allclose(flip.serve(tf.constant(files))["probabilities"].numpy(), (image + mirror) / 2,
                               atol=1e-5)


@pytest.mark.parametrize("script", [hw2_eval, hw2_export])
def test_unknown_tta_is_one_error_line(tiny_run, tmp_path, capsys, script):
    argv = ["--checkpoint_dir", tiny_run.run, "--tta", "rotate"]
    if script is hw2_export:
        argv += ["--export_dir", str(tmp_path / "model")]
    assert script.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --tta must be one of auto|none|flip, got 'rotate'"
    assert not os.path.exists(tmp_path / "model")
