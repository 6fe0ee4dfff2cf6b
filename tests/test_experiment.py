"""hw2_experiment: a 2x2 grid x 2 folds on a tiny folder, the table, the plot, and the re-run."""
import csv
import math
import os

import pytest

import hw2_experiment
from helpers import HOLDER, make_image_folder, run_held_by_another_process
from utils import UserError


def write_folder(root):
    return make_image_folder(root, classes=("class0", "class1"), sizes=((16, 16),), formats=("png",), noise=15)


ARGS = ["--section", "tiny", "--model", "simple_cnn", "--grid", "norm=batch,none", "--folds", "2", "--max_steps", "1",
        "--save_checkpoint_steps", "1", "--fc_units", "8"]


def test_grid_times_folds_gives_one_row_per_variant_and_a_rerun_skips_all(tmp_path, capsys):
    data, out = write_folder(tmp_path / "data"), str(tmp_path / "exp")
    (tmp_path / "data" / "class0" / "broken.png").write_bytes(b"not a png")
    assert hw2_experiment.main(["--data_dir", data, "--out", out, *ARGS]) == 0
    # Each run lists what its scan skipped, as hw2_train.py does.
    listed = open(os.path.join(out, "norm-batch", "fold-0", "bad_images.txt")).read()
    assert "class0/broken.png\tnot an image" in listed
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["norm"] for r in rows) == ["batch", "none"]
    for r in rows:
        assert r["runs"] == "2" and r["failed"] == "0" and r["status"] == "ok"
        for col in ("val_top1_mean", "val_top1_std", "val_topk_mean", "best_epoch", "train_seconds",
                    "img_per_sec", "params"):
            assert math.isfinite(float(r[col])), (col, r)
    top1 = [float(r["val_top1_mean"]) for r in rows]
    assert top1 == sorted(top1, reverse=True)
    assert os.path.isfile(os.path.join(out, "norm-none", "fold-1", "best", "checkpoint"))
    assert os.path.getsize(os.path.join(out, "curves.png")) > 10_000
    assert "± " in open(os.path.join(out, "results.md")).read()

    capsys.readouterr()
    assert hw2_experiment.main(["--data_dir", data, "--out", out, *ARGS]) == 0
    err = capsys.readouterr().err
    assert err.count("skipping") == 4 and "=== run" not in err

    capsys.readouterr()
    assert hw2_experiment.main(["--out", out, *ARGS, "--plan"]) == 0
    assert capsys.readouterr().out.count(" done ") == 4


def test_a_run_another_process_is_training_is_skipped_not_failed(tmp_path, capsys):
    data, out = write_folder(tmp_path / "data"), str(tmp_path / "exp")
    busy = os.path.join(out, "norm-none", "fold-1")
    with run_held_by_another_process(busy):
        assert hw2_experiment.main(["--data_dir", data, "--out", out, *ARGS]) == 0
    assert "| 1 not finished |" in open(os.path.join(out, "results.md")).read()
    err = capsys.readouterr().err
    assert f"skipping {busy}: another process is training it ({HOLDER})" in err
    assert not os.path.exists(os.path.join(busy, "error.txt")) and not os.path.exists(os.path.join(busy, "config.json"))
    assert hw2_experiment.main(["--out", out, *ARGS, "--plan"]) == 0
    assert capsys.readouterr().out.count(" done ") == 3


def test_several_grids_make_every_combination(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--section", "tiny", "--grid", "norm=batch,none", "--grid", "dropout=0.0,0.25",
            "--folds", "3", "--plan"]
    assert hw2_experiment.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"12 runs in {tmp_path} (4 variants x 3 folds):"
    lines = [line.split() for line in out[1:]]
    assert len(lines) == 12 and all(line[0] == "new" for line in lines)
    variants = {line[2] for line in lines}
    assert variants == {f"norm={n},dropout={d}" for n in ("batch", "none") for d in ("0.0", "0.25")}


def test_list_valued_keys_take_their_values_separated_by_bars(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--section", "tiny", "--grid", "conv_stack=8,16|16", "--plan"]
    assert hw2_experiment.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"2 runs in {tmp_path} (2 variants):"
    lines = [line.split() for line in out[1:]]
    assert [(line[1], line[2]) for line in lines] == [(str(tmp_path / "conv_stack-8-16"), "conv_stack=8,16"),
                                                    (str(tmp_path / "conv_stack-16"), "conv_stack=16")]
    with pytest.raises(UserError, match="conv_stack=8 16 and conv_stack=8-16 would share the folder"):
        hw2_experiment.run(["--out", str(tmp_path), "--section", "tiny", "--grid", "conv_stack=8 16|8-16", "--plan"])


def test_a_failed_variant_is_reported_and_the_others_finish(tmp_path):
    data, out = write_folder(tmp_path / "data"), str(tmp_path / "exp")
    # an LR of 1e30 makes the second step's loss NaN, and nan_retries 0 makes that an error
    args = ["--section", "tiny", "--grid", "learning_rate=0.001,1e30", "--model", "simple_cnn",
            "--max_steps", "3", "--fc_units", "8", "--nan_retries", "0"]
    assert hw2_experiment.main(["--data_dir", data, "--out", out, *args]) == 1
    with open(os.path.join(out, "results.csv")) as f:
        rows = {r["learning_rate"]: r for r in csv.DictReader(f)}
    assert rows["0.001"]["status"] == "ok" and rows["0.001"]["runs"] == "1"
    assert rows["1e30"]["failed"] == "1" and "loss became nan" in rows["1e30"]["status"]
    assert "loss became nan" in open(os.path.join(out, "learning_rate-1e30", "error.txt")).read()


def test_grid_typos_stop_before_training(tmp_path):
    with pytest.raises(UserError, match="unknown config key 'nrom'"):
        hw2_experiment.run(["--out", str(tmp_path), "--grid", "nrom=batch"])
    with pytest.raises(UserError, match="'norm' must be one of"):
        hw2_experiment.run(["--out", str(tmp_path), "--grid", "norm=batch,group"])
    with pytest.raises(UserError, match="KEY=V1,V2"):
        hw2_experiment.run(["--out", str(tmp_path), "--grid", "norm"])


def test_a_parallel_worker_that_dies_is_marked_failed_and_the_experiment_exits_1(tmp_path, capsys):
    """--parallel runs each variant in a child process: a child that exits non-zero without writing
    its error (here a flag it refuses) must still count as failed."""
    data, out = write_folder(tmp_path / "data"), str(tmp_path / "exp")
    runs = hw2_experiment.plan_runs(out, [("norm", ["batch"])], 0)
    argv = ["--data_dir", data, "--out", out, "--section", "tiny", "--grid", "norm=batch", "--no_such_key", "1"]
    hw2_experiment._run_parallel(runs, argv, workers=2)
    assert hw2_experiment.run_status(runs[0]) == "failed"
    assert "exited with code 2" in open(os.path.join(runs[0].train_dir, "error.txt")).read()
    table = hw2_experiment.write_reports(out, runs, ["norm"], 0, "t")
    assert table[0]["failed"] == 1 and "failed" in table[0]["status"]
