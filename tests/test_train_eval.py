"""A real train -> checkpoint -> resume -> eval on a tiny generated folder with the [tiny] section."""
import json
import os
import subprocess
import sys

import pytest

import hw2_eval
import hw2_train
from helpers import SMALL_NET, make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_dir_holds_config_split_checkpoints_and_summaries(tiny_run):
    run_dir = tiny_run.run
    saved = json.load(open(os.path.join(run_dir, "config.json")))
    assert saved["section"] == "tiny" and saved["config"]["max_steps"] == 4
    assert saved["class_names"] == ["dark", "light"]
    split = json.load(open(os.path.join(run_dir, "split.json")))
    assert len(split["train"]) + len(split["val"]) == 20
    import tensorflow as tf
    assert tf.train.latest_checkpoint(run_dir).endswith("ckpt-4")
    assert tf.train.latest_checkpoint(os.path.join(run_dir, "best")) is not None
    assert any(f.startswith("events") for f in os.listdir(os.path.join(run_dir, "train")))
    assert any(f.startswith("events") for f in os.listdir(os.path.join(run_dir, "val")))


def test_eval_of_best_reproduces_the_training_measurement(tiny_run, tmp_path, capsys):
    assert hw2_eval.main(["--checkpoint_dir", os.path.join(tiny_run.run, "best"), "--eval_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"top-1 {tiny_run.best_top1:.4f}" in out, out


def test_rerun_resumes_and_continues(tiny_run, tmp_path, capsys):
    data, run_dir = tiny_run.data, tiny_run.copy(tmp_path)
    assert hw2_train.main(["--data_dir", data, "--train_dir", run_dir, "--section", "tiny", "--max_steps", "6"]) == 0
    err = capsys.readouterr().err
    assert "resuming from step 4" in err and "not in this run's split" not in err  # the same images
    import tensorflow as tf
    assert tf.train.latest_checkpoint(run_dir).endswith("ckpt-6")


def test_eval_prints_and_records_top_k(tiny_run, tmp_path, capsys):
    run_dir, eval_dir = tiny_run.run, str(tmp_path / "my_eval")
    assert hw2_eval.main(["--checkpoint_dir", run_dir, "--eval_dir", eval_dir]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "top-2 1.0000 n=4" in out  # 2 classes: top-2 is always right
    rows = open(os.path.join(eval_dir, "results.csv")).read().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[3] == "ema"


def test_checkpoint_holds_every_model_variable(tmp_path):
    """Keras 3 layers kept in lists are skipped by tf.train.Checkpoint(model=...): guard against it."""
    import numpy as np
    import tensorflow as tf

    import hw2
    from utils import load_config
    cfg = load_config("tiny")
    a, b = hw2.create_model(cfg, 3), hw2.create_model(cfg, 3)
    rng = np.random.default_rng(0)
    for v in a.variables:
        v.assign(rng.normal(size=v.shape).astype(v.dtype) if "float" in str(v.dtype) else v.numpy() + 7)
    path = tf.train.Checkpoint(model=hw2.variables_by_path(a)).write(str(tmp_path / "ck"))
    tf.train.Checkpoint(model=hw2.variables_by_path(b)).read(path).assert_existing_objects_matched()
    assert len(a.variables) == len(b.variables) > 50
    for va, vb in zip(a.variables, b.variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=va.path)


def test_watch_mode_evaluates_then_times_out(tiny_run, tmp_path, capsys):
    run_dir = tiny_run.run
    eval_dir = str(tmp_path / "watch")
    assert hw2_eval.main(["--checkpoint_dir", run_dir, "--run_once", "0", "--eval_timeout_secs", "1",
                          "--eval_dir", eval_dir]) == 0
    out, err = capsys.readouterr()
    assert "top-1" in out and "no new checkpoint for 1s: evaluated 1" in err
    assert len(open(os.path.join(eval_dir, "results.csv")).read().splitlines()) == 2


def test_fresh_moves_the_old_run_aside(tiny_run, tmp_path, capsys):
    copy = tiny_run.copy(tmp_path)
    assert hw2_train.main(["--data_dir", tiny_run.data, "--train_dir", copy, "--section", "tiny", "--max_steps", "2",
                           "--fresh"]) == 0
    moved = [p for p in os.listdir(tmp_path) if p.startswith("run-copy-old-")]
    assert len(moved) == 1 and os.path.isdir(os.path.join(tmp_path, moved[0], "best"))
    assert "moved the previous run to" in capsys.readouterr().err


def test_eval_on_a_test_folder_and_the_best_checkpoint(tiny_run, tmp_path, capsys):
    test = make_image_folder(tmp_path / "test", per_class=3)
    assert hw2_eval.main(["--checkpoint_dir", os.path.join(tiny_run.run, "best"), "--test_data_path", test,
                          "--raw", "--num_examples", "5", "--eval_dir", str(tmp_path / "e")]) == 0
    assert "n=5" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--top_k", "3"], "--top_k 3 must be between 1 and the number of classes (2)"),
    (["--test_data_path", "{other}"], "test classes not seen in training: bird (training classes: dark, light)"),
    (["--test_data_path", "{alike}"], "test classes not seen in training: Light (training classes: dark, light; "
                                      "rename Light to light)"),
    (["--checkpoint", "{run}/ckpt-999"], "checkpoint not found"),
])
def test_eval_user_errors(tiny_run, tmp_path, capsys, argv, message):
    run_dir = tiny_run.run
    other = make_image_folder(tmp_path / "other", per_class=2, classes=("bird", "dark"))
    alike = make_image_folder(tmp_path / "alike", per_class=2, classes=("Light", "dark"))
    argv = [a.format(other=other, alike=alike, run=run_dir) for a in argv]
    assert hw2_eval.main(["--checkpoint_dir", run_dir] + argv) == 2
    assert message in capsys.readouterr().err


def test_eval_of_a_run_without_checkpoints(tiny_run, tmp_path, capsys):
    import shutil
    run_dir = tiny_run.run
    for name in ("config.json", "split.json"):
        shutil.copy(os.path.join(run_dir, name), tmp_path / name)
    assert hw2_eval.main(["--checkpoint_dir", str(tmp_path)]) == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_changed_network_on_resume_is_refused(tiny_run, capsys):
    assert hw2_train.main(["--train_dir", tiny_run.run, "--section", "tiny", "--dense_units", "16"]) == 2
    assert "was trained with dense_units=8, now dense_units=16" in capsys.readouterr().err


def test_cli_mistakes_are_one_line_without_traceback(tmp_path, capsys):
    # The real command line once (TensorFlow's start-up banner filtered, nothing but the error)...
    argv = ["hw2_train.py", "--data_dir", str(tmp_path / "missing"), "--train_dir", str(tmp_path / "r")]
    p = subprocess.run([sys.executable] + argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0], p.stderr
    # ... and the same wrapper around the other scripts, in this process.
    export = tmp_path / "model"
    export.mkdir()
    (export / "saved_model.pb").write_bytes(b"")
    for main, argv, needle in [
        (hw2_train.main, ["--train_dir", str(tmp_path / "r2"), "--section", "nope"], "unknown section 'nope'"),
        (hw2_eval.main, ["--checkpoint_dir", str(tmp_path)], "not a hw2 run directory"),
        (hw2_eval.main, ["--checkpoint_dir", str(export)], f"{export} is an exported SavedModel, not a hw2 run "
         "directory: point --checkpoint_dir at the hw2_train.py --train_dir it came from (hw2_predict.py --model "
         "takes the export)"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err, err


def test_a_command_ends_without_the_interpreters_teardown_and_loses_no_output(tmp_path):
    """utils.console(main): main's code is the exit code, exit handlers run and the output is
    flushed, but the interpreter's teardown (where TensorFlow frees a run's objects, seconds to
    tens of seconds) is skipped. An object freed only in that teardown tells which exit was taken."""
    code = ("import atexit, sys, utils\n"
            "class FreedInTeardown:\n"
            "    def __del__(self, open=open, path=sys.argv[1] + '/teardown'): open(path, 'w').close()\n"
            "kept = FreedInTeardown()\n"
            "atexit.register(lambda: open(sys.argv[1] + '/atexit', 'w').close())\n"
            "print('saved', end='')\n"
            "sys.stderr.write('a note')\n")
    for how, teardown in (("sys.exit(3)", True), ("utils.console(lambda: 3)()", False)):
        out = tmp_path / how.split("(")[0]
        out.mkdir()
        p = subprocess.run([sys.executable, "-c", code + how, str(out)], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        assert (p.returncode, p.stdout, p.stderr) == (3, "saved", "a note"), how
        assert (out / "atexit").exists() and (out / "teardown").exists() == teardown, how


def test_tied_logits_are_not_all_correct():
    """in_top_k counted every class tied at the boundary as a hit: equal logits scored top-1 1.0."""
    import numpy as np
    import tensorflow as tf

    import evaluation
    import hw2
    labels = [0, 1, 2, 0, 1, 2]
    logits = tf.zeros([6, 3])
    assert float(hw2.count_correct(logits, labels, 1)) == 2  # the lowest class wins a tie, as argmax
    assert float(hw2.count_correct(logits, labels, 2)) == 4
    m = evaluation.metrics(np.array(labels), tf.nn.softmax(logits).numpy(), 2)
    assert m["top1"] == pytest.approx(1 / 3) and m["topk"] == pytest.approx(2 / 3)


def test_eval_of_a_model_with_equal_logits_agrees_with_its_per_class_report(tiny_run, tmp_path, capsys):
    import csv

    import tensorflow as tf

    import run_dir as run_dirs
    import training
    copy = tiny_run.copy(tmp_path)
    cfg, names = run_dirs.read_config(copy)
    state = training.create_train_state(cfg, len(names))
    ckpts = training.Checkpoints(state, copy, None, keep=5)
    step = ckpts.restore(os.path.join(copy, "ckpt-4"))
    logits_layer = [v for v in state.model.trainable_variables if "softmax_linear" in v.path]
    for v in logits_layer + [s for s, v in zip(state.ema.shadow, state.model.trainable_variables)
                             if "softmax_linear" in v.path]:
        v.assign(tf.zeros_like(v))
    ckpts.save(step + 1)
    assert hw2_eval.main(["--checkpoint_dir", copy, "--eval_dir", str(tmp_path / "e")]) == 0
    assert "top-1 0.5000 " in capsys.readouterr().out  # every image predicted "dark": half the val set
    recall = {r["class"]: r["recall"] for r in csv.DictReader(open(tmp_path / "e" / "per_class.csv"))}
    assert recall["dark"] == "1.0000" and recall["light"] == "0.0000"


def test_another_optimizer_on_resume_carries_the_run_over(tiny_run, tmp_path, capsys):
    copy = tiny_run.copy(tmp_path)
    assert hw2_train.main(["--train_dir", copy, "--section", "tiny", "--max_steps", "6", "--optimizer", "sgd"]) == 0
    err = capsys.readouterr().err
    assert "optimizer changed from adam to sgd with momentum: its state starts fresh" in err
    assert "resuming from step 4" in err
    # The same max_steps: the run restores ckpt-6 (sgd's) and stops, no step to trace.
    assert hw2_train.main(["--train_dir", copy, "--section", "tiny", "--max_steps", "6", "--optimizer", "sgd"]) == 0
    err = capsys.readouterr().err
    assert "resuming from step 6" in err and "optimizer changed" not in err  # now it is the run's own


def test_adamw_scales_the_kernels_each_step_and_adds_no_l2_to_the_loss():
    import numpy as np
    import tensorflow as tf

    import hw2
    import utils
    for l2_on, decayed_ndims in [("all", {2, 4}), ("dense", {2})]:
        cfg = utils.load_config("tiny", {"optimizer": "adamw", "weight_decay": 0.5, "learning_rate": 0.01,
                                         "l2_on": l2_on})
        model = hw2.create_model(cfg, 2)
        assert model.losses == []  # the decay is the optimizer's, not an L2 term in the loss
        optimizer = hw2.make_optimizer(cfg, model)
        before = [v.numpy() for v in model.trainable_variables]
        # Zero gradients: Adam's own step is 0, so what moves is the decay alone.
        optimizer.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_variables])
        for v, old in zip(model.trainable_variables, before):
            factor = 1 - 0.5 * 0.01 if len(v.shape) in decayed_ndims else 1.0
            np.testing.assert_allclose(v.numpy(), old * factor, rtol=1e-6, err_msg=v.path)
        assert any(len(v.shape) == 4 for v in model.trainable_variables)  # the conv kernels were checked


def test_fused_adam_steps_like_keras_adam_in_one_kernel_a_variable():
    """make_optimizer's Adam and AdamW update each variable with TensorFlow's fused ResourceApplyAdam
    and move the weights and both moments as Keras' own do, step after step."""
    import types

    import keras
    import numpy as np
    import tensorflow as tf

    import hw2
    import utils
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 2, 4), (4,), (5, 3)]
    grads = [[tf.constant(rng.standard_normal(s), tf.float32) for s in shapes] for _ in range(3)]
    for name, stock in [("adam", keras.optimizers.Adam), ("adamw", keras.optimizers.AdamW)]:
        cfg = utils.load_config("tiny", {"optimizer": name, "weight_decay": 0.1, "learning_rate": 0.01})
        start = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        ours_vars, stock_vars = ([keras.Variable(v) for v in start] for _ in range(2))
        model = types.SimpleNamespace(trainable_variables=ours_vars, dtype_policy=keras.DTypePolicy("float32"))
        ours = hw2.make_optimizer(cfg, model)
        theirs = stock(0.01, weight_decay=0.1) if name == "adamw" else stock(0.01)
        if name == "adamw":  # make_optimizer decays kernels only, as timm does
            theirs.exclude_from_weight_decay(var_list=[v for v in stock_vars if len(v.shape) == 1])
        theirs.build(stock_vars)
        step = tf.function(lambda g: ours.apply_gradients(zip(g, ours_vars)), autograph=False)
        for g in grads:
            step(g)
            theirs.apply_gradients(zip(g, stock_vars))
        assert len(ours.variables) == len(theirs.variables)  # iterations, learning rate, both moments
        for a, b in zip(ours_vars + ours.variables, stock_vars + theirs.variables):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=f"{name} {a.path}")
        ops = step.get_concrete_function(grads[0]).graph.get_operations()
        assert sum(op.type == "ResourceApplyAdam" for op in ops) == len(shapes)


def _validator(tmp_path, **overrides):
    """(a [tiny] Validator over a 10-image val folder in batches of 4, the folder, its items)."""
    import types

    import tensorflow as tf

    import hw2_dataset
    import training
    import utils
    data = make_image_folder(tmp_path / "data", per_class=5)
    items = hw2_dataset.scan_dataset(data).items
    cfg = utils.load_config("tiny", {"eval_batch_size": "4", "precision": "fp32", **overrides})
    state = training.create_train_state(cfg, 2, precision="fp32")
    validator = training.Validator(state, {"data_dir": data, "val": items}, cfg, types.SimpleNamespace(top_k=2),
                                   tf.distribute.get_strategy(), {"val": tf.summary.create_noop_writer()})
    return validator, data, items


def test_validation_takes_exactly_one_pass_of_its_persistent_iterator_each_time(tmp_path):
    """After the first pass the Validator takes each pass from one iterator over the val set
    repeated: every validation sees every image once (batches of 4 over 10 images: the partial
    last batch keeps the passes apart) and, with the weights unchanged, gives the first's result.
    A pass cut short starts a new iterator, so the next one is aligned again."""
    validator = _validator(tmp_path)[0]
    first = validator(1)
    assert first["n"] == 10 and validator.per_pass == 3
    iterator = validator._iterator
    assert [validator(step) for step in (2, 3, 4)] == [first] * 3 and validator._iterator is iterator
    cut = validator._one_pass()
    next(cut)
    cut.close()
    assert validator._iterator is None and validator(5) == first


def test_validation_counts_its_passes_again_when_val_files_vanish_mid_run(tmp_path):
    """Too big to cache (cache_images_mb 0) and decoded every pass (decode_cache off; decode_store
    would serve the vanished files from disk, as RAM does), the val set is read again; two files gone
    mid-run leave 8 images in 2 batches of 4, not 3: once a validation sees the count move, the
    next counts its batches again and every later one sees the 8 once."""
    validator, data, items = _validator(tmp_path, cache_images_mb="0", decode_cache="false")
    assert validator(1)["n"] == 10 and validator(2)["n"] == 10
    for path, _ in items[:2]:
        os.remove(os.path.join(data, path))
    # The 3rd may take images the prefetch read before the files went, and the 4th may then cross
    # into the next pass (12 images): that moved count makes the 5th count its batches again.
    validator(3), validator(4)
    assert [validator(step)["n"] for step in (5, 6, 7, 8)] == [8] * 4


def test_adamw_with_an_l2_sized_weight_decay_warns(caplog):
    import hw2
    import utils
    cfg = utils.load_config("tiny", {"optimizer": "adamw"})  # weight_decay stays adam's 0.0005
    hw2.make_optimizer(cfg, hw2.create_model(cfg, 2))
    assert "decoupled decay wants ~0.05-1" in caplog.text


def test_adamw_resumes_an_adam_run_with_its_slots(tiny_run, tmp_path, capsys):
    copy = tiny_run.copy(tmp_path)
    argv = ["--train_dir", copy, "--section", "tiny", "--max_steps", "6", "--optimizer", "adamw", "--weight_decay", "0.1"]
    assert hw2_train.main(argv) == 0
    err = capsys.readouterr().err
    assert "resuming from step 4" in err and "optimizer changed" not in err  # Adam's moments carry over


def test_the_seed_eval_command_line(tiny_run, tmp_path, monkeypatch, capsys):
    """The seed report's command, as its users type it (a 1 s timeout instead of waiting 10 minutes)."""
    monkeypatch.chdir(tmp_path)
    test = make_image_folder(tmp_path / "test", per_class=6)
    argv = ["--section", "ecm", "--eval_dir", "./eval_dir", "--checkpoint_dir", tiny_run.run, "--test_data_path",
            test, "--num_examples", "900", "--top_k", "1", "--run_once", "0", "--eval_timeout_secs", "1"]
    assert hw2_eval.main(argv) == 0
    assert "top-1" in capsys.readouterr().out and os.path.isfile(tmp_path / "eval_dir" / "results.csv")
    argv[1] = "nope"
    assert hw2_eval.main(argv) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown section 'nope'")


def test_class_balance_weights_reach_the_loop(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=12)
    for i in range(3, 12):  # 12 dark, 3 light
        os.remove(os.path.join(data, "light", f"{i}.{'png' if i % 2 == 0 else 'jpg'}"))
    assert hw2_train.main(["--data_dir", data, "--train_dir", str(tmp_path / "run"), "--section", "tiny",
                           "--model", "simple_cnn", "--fc_units", "8", "--max_steps", "1",
                           "--class_balance", "weights"]) == 0
    assert "class_balance weights: dark 0.33, light 1.67" in capsys.readouterr().err  # 10 and 2 train images


def test_auto_image_and_batch_size_come_from_the_data_and_stay_on_resume(tmp_path):
    import run_dir as run_dirs
    import utils
    data = make_image_folder(tmp_path / "data", per_class=10, sizes=((45, 60), (60, 45), (47, 47)))
    cfg = utils.load_config("tiny", {"image_size": "0", "batch_size": "0"})
    run = str(tmp_path / "run")
    os.makedirs(run)
    split = run_dirs.prepare_split(run, cfg, data)
    resolved = run_dirs.resolve_auto(cfg, split, run)
    assert resolved.image_size == 40  # median short side 45, down to a multiple of 8
    assert resolved.batch_size == 16  # 16 training images: the smallest auto batch
    run_dirs.save_config(run, "tiny", utils.Config({**resolved, "image_size": 32}), split["class_names"])
    assert run_dirs.resolve_auto(cfg, split, run).image_size == 32  # a resumed run keeps what it had
    assert run_dirs.resolve_config(run, "tiny", {"image_size": "0"}).image_size == 0  # no "changed network"


def test_a_small_folder_trains_with_strong_augmentation_and_config_json_says_so(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=6)
    run = tmp_path / "run"
    assert hw2_train.main(["--data_dir", data, "--train_dir", str(run), "--section", "tiny", *SMALL_NET, "--augment",
                           "auto", "--max_steps", "1"]) == 0
    assert "augment auto: strong (10 training images, strong below 1000)" in capsys.readouterr().err
    saved = json.loads((run / "config.json").read_text())["config"]
    assert (saved["augment"], saved["scale_max"], saved["rotate_deg"]) == ("strong", 1.5, 20.0)


def test_a_run_times_its_conv_forms_once_and_caches_them(tiny_run, tmp_path, monkeypatch, capsys):
    """Outside tests (conftest sets HW2_CONV_AUTOTUNE=0) a run times each conv shape's forms once
    per machine and caches the winners; the next run reads them; --deterministic never times."""
    monkeypatch.setenv("HW2_CONV_AUTOTUNE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # Winograd is a candidate: fp32, and simple_cnn's second conv is 3x3 stride 1 with 8 input channels
    argv = ["--data_dir", tiny_run.data, "--section", "tiny", *SMALL_NET, "--max_steps", "1", "--precision", "fp32"]
    assert hw2_train.main(argv + ["--train_dir", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "conv forms (training" in err and "autotuned" in err and "from the cache" not in err
    cache = tmp_path / "cache" / "hw2" / "conv_forms.json"
    assert cache.is_file() and "winograd" in cache.read_text()
    assert hw2_train.main(argv + ["--train_dir", str(tmp_path / "b")]) == 0
    assert "from the cache" in capsys.readouterr().err
    assert hw2_train.main(argv + ["--train_dir", str(tmp_path / "c"), "--deterministic", "true"]) == 0
    assert "(fixed defaults)" in capsys.readouterr().err


def test_names_that_are_not_utf8_train_evaluate_and_predict(tmp_path, capsys):
    """Latin-1 names from an old camera or a Windows zip: a class folder, a good image and a broken
    one. Every file hw2 writes about them (config.json, bad_images.txt, errors.csv, predictions.csv)
    must be written, and config.json must give back the same class name."""
    import hw2_predict
    data = make_image_folder(tmp_path / "data", per_class=6)
    try:
        os.rename(data + "/light", os.fsencode(data) + b"/caf\xe9")
        os.rename(data + "/dark/0.png", os.fsencode(data) + b"/dark/\xe9t\xe9.png")
    except (OSError, UnicodeError):
        pytest.skip("this file system insists on UTF-8 names")
    with open(os.fsencode(data) + b"/dark/cass\xe9.jpg", "wb") as f:
        f.write(b"not an image")
    run = str(tmp_path / "run")
    assert hw2_train.main(["--data_dir", data, "--train_dir", run, "--section", "tiny", *SMALL_NET, "--max_steps",
                           "2"]) == 0
    assert json.load(open(os.path.join(run, "config.json")))["class_names"] == ["caf" + os.fsdecode(b"\xe9"), "dark"]
    assert "dark/cass\\xe9.jpg\tnot an image" in open(os.path.join(run, "bad_images.txt"), encoding="utf-8").read()
    assert hw2_eval.main(["--checkpoint_dir", run, "--test_data_path", data, "--eval_dir", str(tmp_path / "e")]) == 0
    assert "caf\\xe9," in open(tmp_path / "e" / "per_class.csv", encoding="utf-8").read()
    out = str(tmp_path / "predictions.csv")
    assert hw2_predict.main(["--checkpoint_dir", run, "--images", data, "--out", out]) == 0
    text = open(out, encoding="utf-8").read()
    assert "dark/\\xe9t\\xe9.png," in text and "cass\\xe9.jpg" in text
