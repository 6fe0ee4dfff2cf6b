"""Per-class numbers against a hand-computed case; run.json / summary.csv / curves.png of a real tiny
run (and its resume); hw2_eval.py's per-class report and --all_checkpoints table."""
import contextlib
import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

import class_report
import hw2_eval
import hw2_train
import run_dir as run_dirs
import run_record
from helpers import make_image_folder


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ hand-computed per-class numbers

def test_confusion_and_per_class_numbers_match_a_hand_computed_case():
    labels = [0, 0, 0, 1, 1, 2]
    predictions = [0, 0, 1, 1, 2, 2]
    cm = class_report.confusion_matrix(labels, predictions, 4)  # class "d": never seen, never predicted
    np.testing.assert_array_equal(cm, [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    rows = {r["class"]: r for r in class_report.per_class_metrics(labels, predictions, ["a", "b", "c", "d"])}
    expected = {  # precision = tp / predicted, recall = tp / support
        "a": (2 / 2, 2 / 3, 0.8, 3),
        "b": (1 / 2, 1 / 2, 0.5, 2),
        "c": (1 / 2, 1 / 1, 2 / 3, 1),
        "d": (0.0, 0.0, 0.0, 0),
        # over a, b, c: "d", never seen and never predicted, says nothing about the model
        "macro avg": ((1 + .5 + .5) / 3, (2 / 3 + .5 + 1) / 3, (0.8 + 0.5 + 2 / 3) / 3, 6),
        "weighted avg": ((3 * 1 + 2 * .5 + .5) / 6, 4 / 6, (3 * .8 + 2 * .5 + 2 / 3) / 6, 6),
    }
    for name, (p, r, f1, support) in expected.items():
        got = rows[name]
        np.testing.assert_allclose([got["precision"], got["recall"], got["f1"]], [p, r, f1], err_msg=name)
        assert got["support"] == support
    # A class absent from the test set but predicted still counts: its false positives are news.
    macro = class_report.per_class_metrics([0, 0], [0, 1], ["a", "b", "c"])[-2]
    np.testing.assert_allclose([macro["precision"], macro["recall"]], [(1 + 0) / 2, (0.5 + 0) / 2])


def test_class_report_files_and_tensorboard_image(tmp_path):
    probabilities = np.array([[.9, .1, 0], [.2, .7, .1], [.6, .3, .1], [0, .1, .9]])
    class_report.write_class_report([0, 1, 1, 2], probabilities, ["cat", "dog", "eel"], str(tmp_path), step=7)
    with open(tmp_path / "confusion.csv") as f:
        assert f.read().splitlines() == ["true \\ predicted,cat,dog,eel", "cat,1,0,0", "dog,1,1,0", "eel,0,0,1"]
    per_class = {r["class"]: r for r in read_csv(tmp_path / "per_class.csv")}
    assert per_class["cat"] == {"class": "cat", "precision": "0.5000", "recall": "1.0000", "f1": "0.6667",
                                "support": "1"}
    assert per_class["weighted avg"]["recall"] == "0.7500"  # = top-1
    assert Image.open(tmp_path / "confusion.png").size[0] > 300
    import tensorflow as tf
    event = [f for f in os.listdir(tmp_path) if f.startswith("events")][0]
    tags = {v.tag for e in tf.compat.v1.train.summary_iterator(str(tmp_path / event)) for v in e.summary.value}
    assert "confusion_matrix" in tags


def test_confusion_png_scales_to_100_classes(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"class_{i:03d}_with_a_long_name" for i in range(100)]
    labels = rng.integers(0, 100, 2000)
    cm = class_report.confusion_matrix(labels, np.where(rng.random(2000) < .8, labels, rng.integers(0, 100, 2000)), 100)
    png = class_report.plot_confusion(cm, names, "100 classes")
    (tmp_path / "c100.png").write_bytes(png)
    w, h = Image.open(tmp_path / "c100.png").size
    assert w >= 2000 and h >= 2000  # ~25 px per class row: names stay legible


# ------------------------------------------------------------------ run record of a real run

def test_run_json_and_summary_of_a_tiny_run(tiny_run):
    run_dir = tiny_run.run
    record = json.load(open(os.path.join(run_dir, "run.json")))
    assert record["hw2_version"] == "0.1.0" and record["section"] == "tiny"
    assert record["config"]["max_steps"] == 4 and record["start_step"] == 0
    assert record["tensorflow"].startswith("2.") and record["python"].count(".") == 2
    assert any("CPU" in d for d in record["devices"])
    assert record["split_sha1"] == run_record.file_sha1(os.path.join(run_dir, "split.json"))
    assert len(record["split_sha1"]) == 40 and "git_commit" in record
    rows = read_csv(os.path.join(run_dir, "summary.csv"))
    assert list(rows[0]) == run_record.SUMMARY_COLUMNS
    assert [int(r["step"]) for r in rows] == [2, 4]  # save_checkpoint_steps = 2 in [tiny]
    for r in rows:
        assert 0 <= float(r["val_top1_ema"]) <= float(r["val_topk_ema"]) == 1.0  # top-2 of 2 classes
        assert float(r["lr"]) == pytest.approx(1e-3) and float(r["train_loss"]) > 0
        assert r["top_k"] == "2"
    assert float(rows[1]["epoch"]) == pytest.approx(4 / 2)  # 16 train images // batch 8 = 2 steps per epoch
    assert Image.open(os.path.join(run_dir, "curves.png")).size[0] > 600


def test_resume_appends_to_summary_and_keeps_the_earlier_start(tiny_run, tmp_path):
    resumed = tiny_run.copy(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        assert hw2_train.main(["--train_dir", resumed, "--section", "tiny", "--max_steps", "6"]) == 0
    assert [int(r["step"]) for r in read_csv(os.path.join(resumed, "summary.csv"))] == [2, 4, 6]
    record = json.load(open(os.path.join(resumed, "run.json")))
    assert record["start_step"] == 4 and [s["start_step"] for s in record["previous_starts"]] == [0]


def test_resume_drops_summary_rows_after_the_checkpoint(tmp_path):
    """A run that died after logging step 6 but resumes from ckpt-4 must not list step 6 twice."""
    (tmp_path / "split.json").write_text("{}")
    rows = [[s, 1, 1e-3, 1, .5, 1, .5, 1, 2, 0, 1, "t"] for s in (2, 4, 6)]
    run_dirs.write_csv(str(tmp_path / "summary.csv"), run_record.SUMMARY_COLUMNS, rows)
    hook = run_record.RunRecord(str(tmp_path))
    hook.on_start({"cfg": {"section": "tiny"}, "split": {"data_dir": "d", "class_names": ["a"], "train": [],
                   "val": []}, "start_step": 4, "replicas": 1, "global_batch": 8, "steps_per_epoch": 1,
                   "params": 10})
    hook.on_validation({"step": 6, "epoch": 6.0, "lr": 1e-3, "train_loss": .3, "train_top1": .9, "val_loss": .2,
                        "val_top1": 1.0, "val_topk": 1.0, "top_k": 2, "is_best": True, "seconds": 1.0})
    steps = [int(r["step"]) for r in read_csv(str(tmp_path / "summary.csv"))]
    assert steps == [2, 4, 6]
    assert not os.path.isfile(tmp_path / "curves.png")  # drawn once a minute at most, and at the end
    hook.on_end({})
    assert os.path.isfile(tmp_path / "curves.png")


def test_a_summary_that_cannot_be_written_costs_no_training_and_no_rows(tmp_path, caplog):
    """On Windows a summary.csv open in Excel cannot be written: training goes on, and the rows it
    could not write follow at the next validation that can."""
    hook = run_record.RunRecord(str(tmp_path))
    row = {"epoch": 1.0, "lr": 1e-3, "train_loss": .3, "train_top1": .9, "val_loss": .2, "val_top1": 1.0,
           "val_topk": 1.0, "top_k": 2, "is_best": False, "seconds": 1.0}
    hook.on_validation({**row, "step": 2})
    locked = tmp_path / "summary.csv.away"
    os.rename(tmp_path / "summary.csv", locked)
    os.mkdir(tmp_path / "summary.csv")  # what open() cannot append to, as Excel's lock
    for step in (4, 6):
        hook.on_validation({**row, "step": step})
    assert "could not write" in caplog.text and "2 row(s) wait" in caplog.text
    os.rmdir(tmp_path / "summary.csv")
    os.rename(locked, tmp_path / "summary.csv")
    hook.on_end({})
    assert [int(r["step"]) for r in read_csv(str(tmp_path / "summary.csv"))] == [2, 4, 6]


# ------------------------------------------------------------------ hw2_eval.py

def test_eval_writes_the_per_class_report(tiny_run, tmp_path, capsys):
    run_dir = tiny_run.run
    assert hw2_eval.main(["--checkpoint_dir", run_dir, "--eval_dir", str(tmp_path)]) == 0
    assert "per-class report (EMA weights, step 4)" in capsys.readouterr().out
    per_class = read_csv(tmp_path / "per_class.csv")
    assert [r["class"] for r in per_class] == ["dark", "light", "macro avg", "weighted avg"]
    cm = [r for r in csv.reader(open(tmp_path / "confusion.csv"))]
    assert sum(int(v) for row in cm[1:] for v in row[1:]) == int(per_class[-1]["support"]) == 4
    # --train_dir, as hw2_train names the run, is the same flag
    assert hw2_eval.main(["--train_dir", run_dir, "--eval_dir", str(tmp_path / "no"), "--no_report"]) == 0
    assert "(step 4, ema weights" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "no" / "per_class.csv")


def test_a_test_folder_holding_training_images_is_flagged(tiny_run, tmp_path, capsys):
    import shutil
    test = tmp_path / "test"
    make_image_folder(test, per_class=3, seed=7)  # new images: nothing to flag
    assert hw2_eval.main(["--checkpoint_dir", tiny_run.run, "--test_data_path", str(test), "--no_report"]) == 0
    assert "also in this run's" not in capsys.readouterr().err
    shutil.copy(os.path.join(tiny_run.data, "dark", "0.png"), test / "light" / "copy.png")  # under another name
    assert hw2_eval.main(["--checkpoint_dir", tiny_run.run, "--test_data_path", str(test), "--no_report"]) == 0
    assert "1 of 7 test images are also in this run's train/val split (the same bytes, e.g. light/copy.png)" \
        in capsys.readouterr().err


def test_all_checkpoints_table(tiny_run, tmp_path, capsys):
    run_dir = tiny_run.run
    assert hw2_eval.main(["--checkpoint_dir", run_dir, "--all_checkpoints", "--eval_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = read_csv(tmp_path / "all_checkpoints.csv")
    import tensorflow as tf
    kept = tf.train.get_checkpoint_state(run_dir).all_model_checkpoint_paths
    kept_steps = sorted(int(p.rsplit("-", 1)[1]) for p in kept)
    assert kept_steps[-2:] == [2, 4]
    # best/best-N duplicates one of the kept ones and is evaluated once
    assert sorted((int(r["step"]), r["weights"]) for r in rows) == [(s, w) for s in kept_steps for w in ("ema", "raw")]
    assert sum(r["best"] == "1" for r in rows) == 1
    best = next(r for r in rows if r["best"] == "1")
    assert float(best["top1"]) == max(float(r["top1"]) for r in rows)
    assert out.count("<- best") == 1 and "= best/" in out and "top-2" in out
    assert os.path.isfile(tmp_path / "per_class.csv") and os.path.isfile(tmp_path / "confusion.png")


def test_histograms_are_written_and_change_nothing(tmp_path):
    """summary_every_steps: weights, gradients and activations (with their zero fraction) as the
    CIFAR-10 tutorial wrote them, and the cross-entropy apart from the total loss; a run with them
    ends bit-identical to one without."""
    import tensorflow as tf

    data = make_image_folder(tmp_path / "data", per_class=6)
    runs = {}
    for every in ("0", "1"):
        run = str(tmp_path / f"every{every}")
        with contextlib.redirect_stdout(io.StringIO()):
            assert hw2_train.main(["--data_dir", data, "--train_dir", run, "--section", "tiny", "--max_steps", "2",
                                   "--deterministic", "true", "--summary_every_steps", every]) == 0
        reader = tf.train.load_checkpoint(os.path.join(run, "ckpt-2"))
        runs[every] = {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()
                       if not n.startswith(("save_counter", "_CHECKPOINTABLE", "state/train_seconds"))}
    for name, value in runs["0"].items():
        np.testing.assert_array_equal(runs["1"][name], value, err_msg=name)
    tags = set()
    for event_file in os.listdir(tmp_path / "every1" / "train"):
        for e in tf.compat.v1.train.summary_iterator(str(tmp_path / "every1" / "train" / event_file)):
            tags |= {v.tag for v in e.summary.value}
    assert {"cross_entropy", "loss", "activations/conv2", "activations/conv2/zero_fraction",
            "activations/inception3"} <= tags
    assert any(t.startswith("weights/") for t in tags) and any(t.startswith("gradients/") for t in tags)


def test_histograms_bucketed_in_numpy_read_back_as_tensorboards_own(tmp_path):
    """hw2.write_histogram writes the buckets tf.summary.histogram computes with its own ops."""
    import tensorflow as tf
    import hw2

    rng = np.random.default_rng(0)
    data = {"normal": rng.normal(size=[7, 5, 3]).astype(np.float32), "ties": np.array([0.0, 0.0, 1.0, 2.0, 3.0]),
            "same": np.full([4], 2.5, np.float32), "empty": np.zeros([0], np.float32),
            "relu": np.maximum(rng.normal(size=1000), 0.0).astype(np.float32)}
    tables = {}
    for how in ("tensorboard", "numpy"):
        writer = tf.summary.create_file_writer(str(tmp_path / how))
        with writer.as_default(step=3):
            for name, x in data.items():
                (tf.summary.histogram if how == "tensorboard" else hw2.write_histogram)(name, x)
        writer.close()
        (event,) = os.listdir(tmp_path / how)
        tables[how] = {v.tag: (v.metadata.plugin_data.plugin_name, tf.make_ndarray(v.tensor))
                       for e in tf.compat.v1.train.summary_iterator(str(tmp_path / how / event)) for v in e.summary.value}
    assert set(tables["numpy"]) == set(data)
    for name in data:
        plugin, table = tables["numpy"][name]
        ref_plugin, ref = tables["tensorboard"][name]
        assert plugin == ref_plugin == "histograms" and table.shape == ref.shape == (30, 3), name
        np.testing.assert_allclose(table[:, :2], ref[:, :2], rtol=1e-12, err_msg=name)
        np.testing.assert_array_equal(table[:, 2], ref[:, 2], err_msg=name)
    assert tables["numpy"]["relu"][1][:, 2].sum() == 1000 and tables["numpy"]["relu"][1][0, 2] > 400


def test_evaluating_averaged_then_raw_weights_never_mixes_them(tiny_run):
    """The averaged weights are copied in, not swapped and left: the averages stay averages."""
    import evaluation
    import hw2_input
    ev = evaluation.Evaluator(tiny_run.run, 2)
    split = run_dirs.load_json(os.path.join(tiny_run.run, "split.json"), "split")
    dataset = hw2_input.eval_dataset(split["data_dir"], [tuple(v) for v in split["val"]], ev.saved.cfg, 8)
    path = os.path.join(tiny_run.run, "ckpt-4")
    averaged = ev.evaluate(path, dataset, averaged=True).probabilities
    for v, s in zip(ev.saved.model.trainable_variables, ev.saved.ema.shadow):
        np.testing.assert_array_equal(v.numpy(), s.numpy())
    raw = ev.evaluate(path, dataset, averaged=False).probabilities
    np.testing.assert_array_equal(ev.evaluate(path, dataset, averaged=True).probabilities, averaged)
    fresh = evaluation.Evaluator(tiny_run.run, 2).evaluate(path, dataset, averaged=False).probabilities
    np.testing.assert_array_equal(raw, fresh)
    assert np.abs(raw - averaged).max() > 1e-6
