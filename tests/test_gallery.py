"""The error gallery: eval_dataset's positions name each example's file (past unreadable files and
--num_examples sampling), errors.csv lists exactly the mistakes, errors.png is drawn."""
import csv
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import class_report
import evaluation
import hw2_eval
import hw2_input
import run_dir as run_dirs
from helpers import items_of, make_image_folder
from utils import load_config


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("num_examples", [None, 9])
def test_eval_dataset_positions_name_each_file_past_unreadable_files_and_sampling(tmp_path, num_examples):
    data = make_image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=5)
    items = items_of(data)
    broken = {"a/1.jpg", "b/3.jpg", "c/0.png"}
    for rel in broken:
        (tmp_path / "data" / rel).write_bytes(b"not an image any more")
    cfg = load_config("tiny")
    batches = list(hw2_input.eval_dataset(data, items, cfg, 4, num_examples, with_index=True).as_numpy_iterator())
    images, labels, positions = (np.concatenate(part) for part in zip(*batches))
    sampled = {rel for rel, _ in hw2_input.sample_items(items, num_examples, cfg.seed)}
    assert positions.tolist() == [i for i, (rel, _) in enumerate(items) if rel in sampled and rel not in broken]
    assert labels.tolist() == [items[i][1] for i in positions]
    # Each image is its file's: the same as the default pipeline given exactly those items.
    alone = list(hw2_input.eval_dataset(data, [items[i] for i in positions], cfg, 4).as_numpy_iterator())
    np.testing.assert_array_equal(images, np.concatenate([x for x, _ in alone]))
    np.testing.assert_array_equal(labels, np.concatenate([y for _, y in alone]))


def test_error_gallery_orders_mistakes_and_names_odd_files(tmp_path):
    names = ["cat", "dog", "eel"]
    paths = []
    for i, name in enumerate([b"a.png", b"b.png", "\u00e9t\u00e9.png".encode(), b"d\xff.png", b"e.png"]):
        path = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), name))  # b"\xff": not UTF-8
        Image.new("RGB", (30, 20), (40 * i, 90, 200)).save(path, "PNG")
        paths.append(path)
    labels = [0, 1, 2, 0, 1]
    probabilities = np.array([[.9, .05, .05],  # right
                              [.5, .5, 0.],  # a tie goes to the lower class: predicted cat
                              [.1, .8, .1],
                              [.2, .2, .6],
                              [.1, .8, .1]])  # right
    os.remove(paths[1])  # gone since the evaluation: still listed, drawn as unreadable
    rows = class_report.write_error_gallery(labels, probabilities, paths, names, str(tmp_path / "eval"), step=3)
    written = read_csv(tmp_path / "eval" / "errors.csv")
    assert [(r["true_class"], r["predicted_class"], r["probability"], r["true_class_probability"])
            for r in written] == [("eel", "dog", "0.800000", "0.100000"), ("cat", "eel", "0.600000", "0.200000"),
                                  ("dog", "cat", "0.500000", "0.500000")]
    assert [os.path.basename(r["path"]) for r in written] == ["\u00e9t\u00e9.png", "d\\xff.png", "b.png"]
    assert [r["path"] for r in rows] == [paths[2], paths[3], paths[1]]
    assert Image.open(tmp_path / "eval" / "errors.png").size[0] > 500

    class_report.write_error_gallery([0, 1], np.eye(2), paths[:2], names[:2], str(tmp_path / "none"), step=3)
    assert open(tmp_path / "none" / "errors.csv").read().splitlines() == [",".join(class_report.ERROR_COLUMNS)]
    assert Image.open(tmp_path / "none" / "errors.png").size[0] > 300


def test_eval_writes_errors_csv_with_exactly_the_mistakes(tiny_run, tmp_path, capsys):
    """hw2_eval on a test folder whose "light" class also holds dark images, with --num_examples:
    errors.csv holds exactly the misclassified sampled files, most confident first."""
    test = make_image_folder(tmp_path / "test", per_class=8, seed=7)
    dark = make_image_folder(tmp_path / "more", classes=("dark",), per_class=4, seed=8)
    for i, name in enumerate(sorted(os.listdir(os.path.join(dark, "dark")))):
        shutil.copy(os.path.join(dark, "dark", name), os.path.join(test, "light", f"looks_dark_{i}.png"))
    eval_dir = str(tmp_path / "eval")
    best = os.path.join(tiny_run.run, "best")
    assert hw2_eval.main(["--checkpoint_dir", best, "--test_data_path", test, "--num_examples", "15",
                          "--eval_dir", eval_dir]) == 0
    out = capsys.readouterr().out
    written = read_csv(os.path.join(eval_dir, "errors.csv"))
    assert f"errors.csv ({len(written)} misclassified), errors.png" in out, out

    cfg, names = run_dirs.read_config(tiny_run.run)
    data_dir, items, _ = evaluation.eval_items(tiny_run.run, names, test)
    sample = hw2_input.sample_items(items, 15, cfg.seed)
    result = evaluation.Evaluator(tiny_run.run, 2).evaluate(run_dirs.pick_checkpoint(best),
                                                            hw2_input.eval_dataset(data_dir, sample, cfg, 16))
    wrong = class_report.mistakes(result.labels, result.probabilities)
    assert len(wrong) > 0 and len(written) == len(wrong) == round((1 - result.metrics["top1"]) * 15)
    for r, i in zip(written, wrong):
        assert r["path"] == os.path.join(data_dir, sample[i][0])
        assert r["true_class"] == names[result.labels[i]]
        assert r["predicted_class"] == names[result.probabilities[i].argmax()]
        assert float(r["probability"]) == pytest.approx(result.probabilities[i].max(), abs=2e-6)
        assert float(r["true_class_probability"]) == pytest.approx(result.probabilities[i, result.labels[i]],
                                                                   abs=2e-6)
    assert [float(r["probability"]) for r in written] == sorted((float(r["probability"]) for r in written),
                                                               reverse=True)
    assert Image.open(os.path.join(eval_dir, "errors.png")).size[0] > 500
