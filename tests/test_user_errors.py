"""Every mistake a user can make gets one clear line naming the file or flag, and exit code 2."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import hw2_eval
import hw2_train
from helpers import HOLDER, SMALL_NET, WindowsLocks, make_image_folder, run_held_by_another_process


# Where the network is not what a test is about, the smallest one: a fraction of the tracing time.
SMALL = ("--section", "tiny", *SMALL_NET)


def train(capsys, *argv):
    rc = hw2_train.main(list(argv))
    return rc, capsys.readouterr()


def test_missing_data_dir(tmp_path, capsys):
    rc, out = train(capsys, "--data_dir", str(tmp_path / "nope"), "--train_dir", str(tmp_path / "r"))
    assert rc == 2 and "nope" in out.err and out.err.startswith("error:")


def test_data_dir_without_class_folders(tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "flat" / "a.png")
    rc, out = train(capsys, "--data_dir", str(tmp_path / "flat"), "--train_dir", str(tmp_path / "r"))
    assert rc == 2 and "no class folders (found 1 image directly inside it)" in out.err


def test_empty_data_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, out = train(capsys, "--data_dir", str(tmp_path / "empty"), "--train_dir", str(tmp_path / "r"))
    assert rc == 2 and "no class folders" in out.err


def test_one_class_is_not_a_classifier_and_adding_one_fixes_it(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=3, classes=("ants",))
    run = str(tmp_path / "r")
    rc, out = train(capsys, "--data_dir", data, "--train_dir", run, *SMALL, "--max_steps", "1")
    assert rc == 2 and "one class folder (ants)" in out.err and "if the folders inside" not in out.err
    # DATA/train/<class> given as DATA: the folders inside are named, with the --data_dir to use.
    make_image_folder(tmp_path / "parts" / "train", per_class=1)
    rc, out = train(capsys, "--data_dir", str(tmp_path / "parts"), "--train_dir", str(tmp_path / "r2"), *SMALL)
    assert rc == 2 and out.err.strip().endswith(
        f"one class folder (train): a classifier needs at least 2, one per class (if the folders inside it, dark, "
        f"light, are the classes: --data_dir {tmp_path / 'parts' / 'train'})")
    make_image_folder(tmp_path / "data", per_class=3, classes=("bees",))
    rc, out = train(capsys, "--data_dir", data, "--train_dir", run, *SMALL, "--max_steps", "1")
    assert rc == 0 and "top-2" in out.out  # two classes: top-2 is reported


def test_images_added_since_the_run_began_are_named_on_resume(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=3)
    run = str(tmp_path / "r")
    # (A resume with nothing added says nothing of the kind: test_rerun_resumes_and_continues.)
    assert train(capsys, "--data_dir", data, "--train_dir", run, *SMALL, "--max_steps", "1")[0] == 0
    make_image_folder(tmp_path / "data", per_class=2, classes=("zebra",))
    rc, out = train(capsys, "--data_dir", data, "--train_dir", run, *SMALL, "--max_steps", "2")
    assert rc == 0 and "2 images and class(es) zebra not in this run's split (e.g. zebra/0.png)" in out.err


@pytest.mark.parametrize("run, data", [("data", "data"), ("data/dark", "data"), ("r", "r/data")])
def test_a_run_folder_and_the_data_stay_apart(tmp_path, capsys, run, data):
    make_image_folder(tmp_path / data, per_class=2)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc, out = train(capsys, "--data_dir", str(tmp_path / data), "--train_dir", str(tmp_path / run), "--fresh")
    assert rc == 2 and " is " in out.err and len(out.err.strip().splitlines()) == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written or moved


def test_a_run_folder_whose_path_tensorflow_would_read_as_a_pattern(tmp_path, capsys):
    """TensorFlow finds checkpoints by file pattern: in `run [1]` it finds none, and a resume
    would start over at step 0. Training and eval stop first, with one line."""
    data = make_image_folder(tmp_path / "data", per_class=2)
    run = tmp_path / "run [1]"
    rc, out = train(capsys, "--data_dir", data, "--train_dir", str(run), *SMALL, "--max_steps", "1")
    assert rc == 2 and "--train_dir" in out.err and "[ ]" in out.err and len(out.err.strip().splitlines()) == 1
    assert not run.exists()
    run.mkdir()
    assert hw2_eval.main(["--checkpoint_dir", str(run)]) == 2
    assert "--checkpoint_dir" in capsys.readouterr().err


def test_a_run_in_use_stops_a_second_training_even_with_fresh(tmp_path, capsys):
    import fcntl
    data = make_image_folder(tmp_path / "data", per_class=2)
    run = tmp_path / "r"
    with run_held_by_another_process(run):
        for extra in ([], ["--fresh"]):
            rc, out = train(capsys, "--data_dir", data, "--train_dir", str(run), *SMALL, "--max_steps", "1", *extra)
            assert rc == 2 and f"is in use by {HOLDER}" in out.err
        assert os.listdir(run) == [".lock"] and not list(tmp_path.glob("r-old-*"))  # --fresh moved nothing
    rc, out = train(capsys, "--data_dir", data, "--train_dir", str(run), *SMALL, "--max_steps", "1")
    assert rc == 0 and os.path.isfile(run / "config.json")
    with open(run / ".lock") as f:  # released when the training ended
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_on_windows_a_run_in_use_is_refused_with_its_holder(tmp_path, monkeypatch):
    """Windows has no flock: RUN/.lock takes msvcrt's lock, on a byte past the holder's line, which a
    second training must still read to say who holds the run."""
    import file_lock
    import run_dir
    monkeypatch.setattr(file_lock, "fcntl", None)
    monkeypatch.setattr(file_lock, "msvcrt", WindowsLocks())
    run = str(tmp_path / "r")
    with run_dir.prepare(run, fresh=False):
        with pytest.raises(run_dir.RunInUse, match=rf"is in use by hw2 \(pid {os.getpid()} on "):
            with run_dir.prepare(run, fresh=True):
                pass
        assert os.listdir(tmp_path) == ["r"]  # --fresh moved nothing
    with run_dir.prepare(run, fresh=False):  # released when the first ended
        pass


def test_a_run_follows_its_data_to_a_new_folder_but_not_to_another_dataset(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=3)
    other = make_image_folder(tmp_path / "other", per_class=2, seed=5)
    run = str(tmp_path / "r")
    assert train(capsys, "--data_dir", data, "--train_dir", run, *SMALL, "--max_steps", "1")[0] == 0
    rc, out = train(capsys, "--data_dir", other, "--train_dir", run, *SMALL, "--max_steps", "2")
    assert rc == 2 and "was trained on" in out.err  # both folders exist: another dataset
    moved = str(tmp_path / "disk2" / "data")
    os.makedirs(os.path.dirname(moved))
    os.rename(data, moved)  # the data moved (another disk, another machine)
    assert hw2_eval.main(["--checkpoint_dir", run, "--no_report"]) == 2
    assert f"data folder {data} is gone: evaluate another folder with --test_data_path" in capsys.readouterr().err
    rc, out = train(capsys, "--data_dir", other, "--train_dir", run, *SMALL, "--max_steps", "2")
    assert rc == 2 and "is gone, and" in out.err and "missing files" in out.err
    rc, out = train(capsys, "--data_dir", moved, "--train_dir", run, *SMALL, "--max_steps", "2")
    assert rc == 0 and f"data moved: {data} -> {moved} (all 6 train/val files are there)" in out.err
    split = json.load(open(os.path.join(run, "split.json")))
    assert split["data_dir"] == moved and len(split["train"]) + len(split["val"]) == 6
    assert hw2_eval.main(["--checkpoint_dir", run, "--no_report"]) == 0  # finds the val images, no flags
    assert "(step 2, ema weights, validation split, tta flip)" in capsys.readouterr().out


def test_class_with_only_bad_files_is_named(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=3)
    os.makedirs(tmp_path / "data" / "zebra")
    (tmp_path / "data" / "zebra" / "x.jpg").write_bytes(b"")
    rc, out = train(capsys, "--data_dir", data, "--train_dir", str(tmp_path / "r"))
    assert rc == 2 and "zebra" in out.err


def test_split_naming_missing_files(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=3)
    import hw2_dataset
    assert hw2_dataset.main(["--data_dir", data, "--out", str(tmp_path / "split.json")]) == 0
    os.remove(tmp_path / "data" / "dark" / "1.jpg")
    rc, out = train(capsys, "--split", str(tmp_path / "split.json"), "--train_dir", str(tmp_path / "r"))
    assert rc == 2 and "dark/1.jpg" in out.err


@pytest.mark.parametrize("flag, value, message", [
    ("--batch_size", "-1", "'batch_size' must be >= 0"),
    ("--max_steps", "0", "'max_steps' must be > 0"),
    ("--image_size", "3", "'image_size' must be 0 (from the images) or at least 8, got 3"),
    ("--learning_rate", "abc", "'learning_rate' must be a number"),
    ("--no_such_key", "1", "unknown config key 'no_such_key'"),
    ("--top_k", "5", "--top_k 5 must be between 1 and the number of classes (2)"),
])
def test_bad_flags(tmp_path, capsys, flag, value, message):
    data = make_image_folder(tmp_path / "data", per_class=3)
    rc, out = train(capsys, "--data_dir", data, "--train_dir", str(tmp_path / "r"), "--section", "tiny", flag, value)
    assert rc == 2 and message in out.err


def test_flags_spelled_with_hyphens_are_the_underscored_ones(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=3)
    # --batch-size reached the config check: --data-dir and --train-dir were taken too.
    rc, out = train(capsys, "--data-dir", data, "--train-dir", str(tmp_path / "r"), "--section", "tiny",
                    "--batch-size=-1")
    assert rc == 2 and "'batch_size' must be >= 0" in out.err
    import hw2_dataset
    assert hw2_dataset.main(["--data-dir", data, "--check"]) == 0


@pytest.mark.parametrize("flag, hint", [("--learning_rte", "did you mean learning_rate?"),
                                        ("--data_dri", "did you mean data_dir?"),
                                        ("--zzz", "(see [default]")])
def test_a_misspelt_flag_names_the_closest_one(tmp_path, capsys, flag, hint):
    rc, out = train(capsys, "--train_dir", str(tmp_path / "r"), flag, "1")
    assert rc == 2 and f"unknown config key '{flag[2:]}'" in out.err and hint in out.err
    assert flag != "--zzz" or "did you mean" not in out.err


def test_unwritable_train_dir(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=3)
    (tmp_path / "file").write_text("not a directory")
    rc, out = train(capsys, "--data_dir", data, "--train_dir", str(tmp_path / "file" / "run"))
    assert rc == 2 and "cannot create train_dir" in out.err


@pytest.mark.parametrize("key, value", [("dense_units", 16), ("class_names", ["a", "b", "c"])])
def test_checkpoint_of_another_network(tiny_run, tmp_path, capsys, key, value):
    other = tmp_path / "other"
    shutil.copytree(tiny_run.run, other)
    saved = json.loads((other / "config.json").read_text())
    if key == "class_names":
        saved["class_names"] = value
        split = json.loads((other / "split.json").read_text())
        split["class_names"] = value
        (other / "split.json").write_text(json.dumps(split))
    else:
        saved["config"][key] = value
    (other / "config.json").write_text(json.dumps(saved))
    assert hw2_eval.main(["--checkpoint_dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert "does not match the network in config.json" in err and "ckpt-4" in err


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_run, tmp_path, capsys, monkeypatch):
    import tensorflow as tf
    data, run_dir = tiny_run.data, str(tmp_path / "run")
    real_save = tf.train.CheckpointManager.save

    def save(self, checkpoint_number=None, **kw):
        if checkpoint_number == 2:
            raise OSError(28, "No space left on device")
        return real_save(self, checkpoint_number=checkpoint_number, **kw)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", save)
    rc, out = train(capsys, "--data_dir", data, "--train_dir", run_dir, *SMALL, "--max_steps", "2")
    assert rc == 2 and "No space left on device" in out.err and "ckpt-0" in out.err
    monkeypatch.undo()
    assert tf.train.latest_checkpoint(run_dir).endswith("ckpt-0")
    tf.train.load_checkpoint(tf.train.latest_checkpoint(run_dir))  # still readable


def test_nan_loss_restores_lowers_lr_then_stops_with_saved_state_intact(tiny_run, tmp_path, capsys):
    import tensorflow as tf
    data, run_dir = tiny_run.data, str(tmp_path / "run")
    rc, out = train(capsys, "--data_dir", data, "--train_dir", run_dir, *SMALL, "--optimizer", "sgd",
                    "--learning_rate", "1e30", "--nan_retries", "2", "--max_steps", "6")
    assert rc == 2
    assert "restored step 0, lr lowered to 5e+29" in out.err
    assert "lower --learning_rate" in out.err.strip().splitlines()[-1]
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(run_dir))
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not name.startswith("state/"):
            assert np.isfinite(value).all(), name


def test_bad_zoo_is_skipped_and_listed(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=5)
    cat = tmp_path / "data" / "dark"
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "text.png").write_text("this is not an image")
    good = (cat / "0.png").read_bytes()
    (cat / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (3, 3)).save(cat / "tiny.png")
    (cat / "notes.txt").write_text("hello")
    shutil.copy(cat / "1.jpg", tmp_path / "data" / "light" / "copy_of_dark.jpg")
    run_dir = tmp_path / "run"
    rc, out = train(capsys, "--data_dir", data, "--train_dir", str(run_dir), *SMALL, "--max_steps", "2")
    assert rc == 0
    listed = (run_dir / "bad_images.txt").read_text()
    for name, reason in [("empty.jpg", "empty"), ("text.png", "not an image"), ("truncated.png", ""),
                         ("tiny.png", "too small"), ("notes.txt", "unsupported")]:
        line = next(l for l in listed.splitlines() if name in l)
        assert reason in line, line
    # The same photo under two labels, wherever the split puts the two copies.
    assert "dark/1.jpg\tsame content as light/copy_of_dark.jpg (in classes dark and light: one label is wrong" \
        in listed
    rc, out = train(capsys, "--data_dir", data, "--train_dir", str(tmp_path / "r2"), *SMALL,
                    "--on_bad_image", "fail")
    assert rc == 2 and "bad_images.txt" in out.err


def test_nan_under_a_cosine_schedule_retries_at_a_lower_lr_from_the_restored_step(tiny_run, tmp_path, monkeypatch):
    """The LR the NaN guard lowers must survive the schedule, and the input stream must restart
    at the restored step (the stream is a pure function of the seed and the step)."""
    import tensorflow as tf

    import hw2
    import run_dir as run_dirs
    import schedules
    import training
    import utils
    real_step, calls = hw2.make_train_step, []

    def make_train_step(*args, **kwargs):
        step = real_step(*args, **kwargs)

        def once_nan(iterator):
            calls.append(1)
            out = step(iterator)
            return (tf.constant(float("nan")),) + tuple(out[1:]) if len(calls) == 4 else out
        return once_nan

    starts, real_iterator = [], training._train_iterator

    def train_iterator(cfg, split, plan, strategy, step):
        starts.append(step)
        return real_iterator(cfg, split, plan, strategy, step)

    monkeypatch.setattr(hw2, "make_train_step", make_train_step)
    monkeypatch.setattr(training, "_train_iterator", train_iterator)
    cfg = utils.load_config("tiny", {"lr_schedule": "cosine", "learning_rate": "0.01", "max_steps": "6",
                                     "model": "simple_cnn", "fc_units": "8"})
    run = str(tmp_path / "run")
    os.makedirs(run)
    split = run_dirs.prepare_split(run, cfg, tiny_run.data)

    class Rows:
        rows = []

        def on_validation(self, row):
            self.rows.append(row)

    training.train(cfg, split, run, hooks=[Rows()])
    assert starts == [0, 2]  # step 4 was NaN: back to ckpt-2, and the stream with it
    plan_lr = [schedules.lr_at(cfg, s, 2, 6) for s in (1, 3, 5)]  # the LR of the step before each validation
    assert [r["lr"] for r in Rows.rows] == pytest.approx([plan_lr[0], plan_lr[1] / 2, plan_lr[2] / 2])
    reader = tf.train.load_checkpoint(os.path.join(run, "ckpt-6"))
    assert reader.get_tensor("state/lr_multiplier/.ATTRIBUTES/VARIABLE_VALUE") == 0.5
    assert reader.get_tensor("state/nan_retries/.ATTRIBUTES/VARIABLE_VALUE") == 1


def test_a_resumed_run_goes_on_without_a_few_images_deleted_since_it_began(tmp_path, caplog):
    """Junk found in the error gallery and deleted: the run's split drops it (split.json, so that
    evaluation finds the same set, and bad_images.txt say so). Many gone, or a class left without
    train or val images, is more likely the wrong folder: one line, and --fresh."""
    import run_dir as run_dirs
    import utils
    data = make_image_folder(tmp_path / "data", per_class=24)  # 2 classes x 24: 48 train/val images
    run = str(tmp_path / "run")
    os.makedirs(run)
    cfg = utils.load_config("tiny")
    split = run_dirs.prepare_split(run, cfg, data)
    first, second = split["train"][0][0], split["val"][-1][0]
    for rel in (first, second):
        os.remove(os.path.join(data, rel))
    import evaluation  # hw2_eval before the next start: the val image gone is left out too
    with caplog.at_level("WARNING"):
        assert evaluation.eval_items(run, split["class_names"])[1] == split["val"][:-1]
    assert f"1 image of this run's validation split is gone from {data} since it was made (e.g. {second}): " \
           f"evaluating the other {len(split['val']) - 1}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        resumed = run_dirs.prepare_split(run, cfg, data)
    assert f"2 images of this run's 48 train/val images are gone from {data} (e.g. {min(first, second)}) since " \
           "it began: it goes on without them" in caplog.text
    assert resumed["train"] == split["train"][1:] and resumed["val"] == split["val"][:-1]
    saved = json.load(open(os.path.join(run, "split.json")))
    assert [tuple(e) for e in saved["train"]] == resumed["train"] and len(saved["val"]) == len(split["val"]) - 1
    assert sorted(open(os.path.join(run, "bad_images.txt")).read().splitlines()) == sorted(
        f"{rel}\tgone since the run began" for rel in (first, second))
    assert run_dirs.prepare_split(run, cfg, data)["train"] == resumed["train"]  # and stays so, quietly
    # 2 of 48 is within 5% (2.4); 4 more of the 46 left is not.
    for rel, _ in resumed["train"][:4]:
        os.remove(os.path.join(data, rel))
    with pytest.raises(utils.UserError, match=r"^4 images of this run's 46 train/val images are gone from .*; more "
                                              r"than 5% \(the wrong folder\?\): --fresh starts a new run on the "
                                              r"folder as it is now$"):
        run_dirs.prepare_split(run, cfg, data)
    # One image, but a class's only val image: that class could no longer be validated.
    small = make_image_folder(tmp_path / "small", per_class=3)
    os.makedirs(tmp_path / "run2")
    split = run_dirs.prepare_split(str(tmp_path / "run2"), cfg, small)
    rel, label = split["val"][0]
    assert sum(1 for _, lab in split["val"] if lab == label) == 1
    os.remove(os.path.join(small, rel))
    with pytest.raises(utils.UserError, match=rf"^1 image of this run's 6 train/val images is gone .*; class\(es\) "
                                              rf"{split['class_names'][label]} would have no train or val image left"):
        run_dirs.prepare_split(str(tmp_path / "run2"), cfg, small)
    # Every val image gone: evaluation has nothing left to score and names them.
    for other, _ in split["val"][1:]:
        os.remove(os.path.join(small, other))
    with pytest.raises(utils.UserError, match=rf"names {len(split['val'])} missing files, e.g. .* \(deleted or moved"):
        evaluation.eval_items(str(tmp_path / "run2"), split["class_names"])
