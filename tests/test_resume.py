"""kill -9 at any moment loses nothing: the same command resumes to the same result, bit for bit."""
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def final_state(run_dir):
    import tensorflow as tf
    path = tf.train.latest_checkpoint(run_dir)
    reader = tf.train.load_checkpoint(path)
    # train_seconds is wall time, the one thing a resumed run may not repeat.
    names = [n for n in reader.get_variable_to_shape_map()
             if not n.startswith(("save_counter", "_CHECKPOINTABLE", "state/train_seconds"))]
    return path, {n: reader.get_tensor(n) for n in names}


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    """kill -9 at 4 seeded random points of a deterministic run (two as a save writes its files, two
    during steps; each kill costs a run's start, ~13 s on the slowest CPU), resuming each time with the
    same command: it ends bit-identical to an uninterrupted run, the best checkpoint and its
    metric included."""
    data = make_image_folder(tmp_path / "data", per_class=10)
    ref, run = str(tmp_path / "ref"), str(tmp_path / "killed")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "killed_runs.py"), data, ref, run, "4", "0"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["killed"] == len(report["points"]) == 4, report
    assert any(".data-" in point for point in report["points"])  # some kills land in the middle of a save
    assert any("run.json" in point for point in report["points"])  # some in the middle of steps
    ref_path, expected = final_state(ref)
    path, state = final_state(run)
    assert os.path.basename(path) == os.path.basename(ref_path) == "ckpt-20"
    assert state.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(state[name], expected[name], err_msg=name)
    best = [line.replace(run, "RUN") for line in p.stdout.splitlines() if line.startswith("best val top-1")]
    ref_best = [line.replace(ref, "RUN") for line in p.stdout.splitlines()
                if line.startswith("best val top-1") and ref in line]
    assert best[-1] == ref_best[0]


def test_unreadable_newest_checkpoint_falls_back_with_a_warning(tiny_run, tmp_path, capsys):
    import hw2_train
    run_dir = tiny_run.copy(tmp_path)  # ckpt-0, ckpt-2, ckpt-4
    for name in ("ckpt-4.data-00000-of-00001", "ckpt-4.index"):
        with open(os.path.join(run_dir, name), "wb") as f:
            f.write(b"garbage")  # a corrupted newest checkpoint
    with contextlib.redirect_stdout(io.StringIO()):
        assert hw2_train.main(["--train_dir", run_dir, "--section", "tiny", "--max_steps", "6"]) == 0
    err = capsys.readouterr().err
    assert "ckpt-4 is unreadable: falling back to" in err and "ckpt-2" in err
    assert "resuming from step 2" in err


def test_ctrl_c_saves_the_step_reached_and_the_same_command_resumes(tmp_path, capsys):
    import select
    import signal

    import hw2_train
    data = make_image_folder(tmp_path / "data", per_class=10)
    argv = ["--data_dir", data, "--train_dir", str(tmp_path / "run"), "--section", "tiny", "--model", "simple_cnn",
            "--fc_units", "8", "--max_steps", "300",
            "--save_checkpoint_steps", "1000", "--checkpoint_minutes", "0"]
    p = subprocess.Popen([sys.executable, "hw2_train.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    seen = ""
    try:
        while "step 3 (" not in seen:  # training has started ([tiny] logs every step)
            assert select.select([p.stdout], [], [], 120)[0], seen
            line = p.stdout.readline()
            assert line, seen
            seen += line
        p.send_signal(signal.SIGINT)
        out = seen + p.communicate(timeout=120)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, out[-2000:]
    stopped = int(out.split("interrupted at step ")[1].split(":")[0])
    assert stopped >= 3 and f"saved {tmp_path / 'run' / f'ckpt-{stopped}'}" in out
    assert "Resume with the same command:" in out and "hw2_train.py --data_dir" in out
    with contextlib.redirect_stdout(io.StringIO()) as best:
        assert hw2_train.main(argv) == 0
    assert f"resuming from step {stopped}" in capsys.readouterr().err
    assert best.getvalue().startswith("best val top-1") and "at step 300" in best.getvalue()


def test_a_second_interrupt_quits_at_once(monkeypatch):
    import signal

    import training
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    before = signal.getsignal(signal.SIGINT)
    with training.Interrupts() as interrupts:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupts.requested and not exits  # the first only asks the loop to stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert exits == [130]
    assert signal.getsignal(signal.SIGINT) is before  # handlers put back


def test_the_resume_command_is_quoted_for_the_shell_it_is_pasted_into():
    import training
    argv = ["hw2_train.py", "--data_dir", "/home/jo/my photos", "--fresh", "--time_budget", "10"]
    assert training.resume_command(argv, windows=False) == "python hw2_train.py --data_dir '/home/jo/my photos' --time_budget 10"
    argv = ["hw2_train.py", "--data_dir", r"C:\Users\Jo Doe\photos", "--fresh"]
    assert training.resume_command(argv, windows=True) == r'python hw2_train.py --data_dir "C:\Users\Jo Doe\photos"'


def test_a_run_of_hw2_0_1_0_evaluates_and_resumes(tiny_run, tmp_path, capsys):
    """hw2 0.1.0 saved a policy vector and no averaged batch-norm statistics: its runs still
    evaluate, and resume with their policy counters and plateau-lowered LR."""
    import tensorflow as tf

    import hw2
    import hw2_eval
    import hw2_train
    import run_dir as run_dirs
    import training
    run = tiny_run.copy(tmp_path)
    cfg, names = run_dirs.read_config(run)
    state = training.create_train_state(cfg, len(names))
    training.Checkpoints(state, run, None, 5).restore(os.path.join(run, "ckpt-4"))
    state.optimizer.learning_rate.assign(cfg.learning_rate / 2)  # one plateau drop
    old = tf.train.Checkpoint(model=hw2.variables_by_path(state.model), optimizer=state.optimizer,
                              ema=state.ema.shadow, policy=tf.Variable([0.75, 2, 0.75, 3, 1, 1], dtype=tf.float64))
    tf.train.CheckpointManager(old, run, max_to_keep=5, checkpoint_name="ckpt").save(checkpoint_number=4)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert hw2_eval.main(["--checkpoint_dir", run, "--no_report", "--eval_dir", str(tmp_path / "e")]) == 0
        assert hw2_train.main(["--train_dir", run, "--section", "tiny", "--max_steps", "6"]) == 0
    assert "(step 4, ema weights" in out.getvalue()
    err = capsys.readouterr().err
    assert "resumed a checkpoint of hw2 0.1.0" in err and "resuming from step 4" in err
    reader = tf.train.load_checkpoint(os.path.join(run, "ckpt-6"))
    assert reader.get_tensor("state/lr_multiplier/.ATTRIBUTES/VARIABLE_VALUE") == pytest.approx(0.5)
    assert reader.get_tensor("state/stale/.ATTRIBUTES/VARIABLE_VALUE") >= 3


def test_best_links_its_checkpoint_and_a_resume_makes_a_missing_link(tiny_run, tmp_path):
    """best/ holds links to the files of the regular checkpoint it names, not a second write of
    them; a run killed after that checkpoint and before the link resumes with the link made."""
    import tensorflow as tf

    import run_dir as run_dirs
    import training
    best = tf.train.latest_checkpoint(os.path.join(tiny_run.run, "best"))
    step = best.rsplit("-", 1)[1]
    for ext in (".index", ".data-00000-of-00001"):
        assert os.path.samefile(best + ext, os.path.join(tiny_run.run, f"ckpt-{step}{ext}"))
    run = tiny_run.copy(tmp_path)
    cfg, names = run_dirs.read_config(run)
    state = training.create_train_state(cfg, len(names))
    ckpts = training.Checkpoints(state, run, None, 5)
    ckpts.restore(os.path.join(run, "ckpt-4"))
    state.optimizer.iterations.assign(9)
    state.set(best_step=9)  # validation at step 9 was the best: the checkpoint is saved, the kill comes
    ckpts.save(9)
    assert not ckpts.best_checkpoint().endswith("-9")
    resumed = training.Checkpoints(training.create_train_state(cfg, len(names)), run, None, 5)
    assert resumed.restore_or_init(tf.distribute.get_strategy()) == 9
    assert resumed.best_checkpoint() == os.path.join(run, "best", "best-9")
    assert sorted(os.listdir(os.path.join(run, "best"))) == ["best-9.data-00000-of-00001", "best-9.index",
                                                             "checkpoint"]
    assert os.path.samefile(os.path.join(run, "best", "best-9.index"), os.path.join(run, "ckpt-9.index"))
