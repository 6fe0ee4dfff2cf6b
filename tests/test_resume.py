"""kill -9 at any moment loses nothing: the same command resumes to the same result, bit for bit."""
import os
import signal
import subprocess
import sys
import time

import numpy as np

from helpers import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(data, run_dir):
    return [sys.executable, "hw2_train.py", "--data_dir", data, "--train_dir", run_dir, "--section", "tiny",
            "--max_steps", "12", "--save_checkpoint_steps", "3", "--deterministic", "true"]


def final_state(run_dir):
    import tensorflow as tf
    path = tf.train.latest_checkpoint(run_dir)
    reader = tf.train.load_checkpoint(path)
    names = [n for n in reader.get_variable_to_shape_map() if not n.startswith(("save_counter", "_CHECKPOINTABLE"))]
    return path, {n: reader.get_tensor(n) for n in names}


def run_to_end(cmd, kill_when=None, timeout=240):
    """Run cmd; if kill_when(run_dir_files) turns true, SIGKILL it and return False."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    try:
        while p.poll() is None:
            if kill_when is not None and kill_when():
                p.send_signal(signal.SIGKILL)
                p.wait()
                return False, ""
            if time.time() > deadline:
                raise AssertionError("training did not finish in time")
            time.sleep(0.02)
        out = p.stdout.read()
        assert p.returncode == 0, out[-3000:]
        return True, out
    finally:
        if p.poll() is None:
            p.kill()


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    data = make_image_folder(tmp_path / "data")
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
    done, ref_out = run_to_end(command(data, ref_dir))
    ref_path, ref = final_state(ref_dir)

    def exists(name):
        return lambda: os.path.exists(os.path.join(run_dir, name))

    kills = [
        exists("ckpt-0.index"),                       # right after the first save
        exists("ckpt-3.data-00000-of-00001"),         # in the middle of a save (data written, no index yet)
        exists("best/checkpoint"),                    # while the best copy is being written
    ]
    killed = 0
    for kill_when in kills:
        finished, _ = run_to_end(command(data, run_dir), kill_when)
        killed += not finished
        assert not os.path.exists(os.path.join(run_dir, "ckpt-12.index")) or finished
    finished, out = run_to_end(command(data, run_dir))
    assert finished and "resuming from step" in out
    assert killed >= 3
    path, state = final_state(run_dir)
    assert os.path.basename(path) == os.path.basename(ref_path) == "ckpt-12"
    assert state.keys() == ref.keys()
    for name in ref:
        np.testing.assert_array_equal(state[name], ref[name], err_msg=name)
    # the best checkpoint and its metric agree too
    best_line = [l for l in out.splitlines() if l.startswith("best val top-1")][-1]
    ref_best = [l for l in ref_out.splitlines() if l.startswith("best val top-1")][-1]
    assert best_line.replace(run_dir, "") == ref_best.replace(ref_dir, "")


def test_deterministic_runs_are_identical(tmp_path):
    data = make_image_folder(tmp_path / "data")
    states = []
    for name in ("a", "b"):
        run_to_end(command(data, str(tmp_path / name))[:-4] + ["--max_steps", "3", "--deterministic", "true"])
        states.append(final_state(str(tmp_path / name))[1])
    for name in states[0]:
        np.testing.assert_array_equal(states[0][name], states[1][name], err_msg=name)


def test_unreadable_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    data = make_image_folder(tmp_path / "data")
    run_dir = str(tmp_path / "run")
    cmd = command(data, run_dir)[:-6] + ["--max_steps", "4", "--save_checkpoint_steps", "2"]
    run_to_end(cmd)
    with open(os.path.join(run_dir, "ckpt-4.data-00000-of-00001"), "wb") as f:
        f.write(b"garbage")  # a corrupted newest checkpoint
    with open(os.path.join(run_dir, "ckpt-4.index"), "wb") as f:
        f.write(b"garbage")
    finished, out = run_to_end(cmd[:-4] + ["--max_steps", "6", "--save_checkpoint_steps", "2"])
    assert "ckpt-4 is unreadable: falling back to" in out and "ckpt-2" in out
    assert "resuming from step 2" in out
