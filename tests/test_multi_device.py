"""The multi-device path on CPU: logical devices in one process, and two worker processes."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from helpers import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_devices_take_the_same_step_as_one(tmp_path):
    import tensorflow as tf

    from distributed_step import one_step
    init, out = str(tmp_path / "init.npz"), str(tmp_path / "two.npz")
    one = one_step(tf.distribute.get_strategy(), False, init)  # writes the initial weights
    p = subprocess.run([sys.executable, os.path.join(HERE, "distributed_step.py"), "--init", init, "--out", out],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and "replicas 2" in p.stdout, p.stderr[-3000:]
    two = np.load(out)
    # Global batch 8 split 4+4: with synchronized batch norm the step is the one-device step.
    assert two["1_loss"] == pytest.approx(one["loss"], rel=1e-5)
    weights = [k for k in one if k.startswith("v")]
    assert len(weights) >= 8  # two convs with batch norm, two dense layers
    for k in weights:
        np.testing.assert_allclose(two[f"1_{k}"], one[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # Without it each replica normalizes by its own 4 examples: a valid step, measurably different.
    unsynced = float(two["0_loss"])
    assert np.isfinite(unsynced) and unsynced != pytest.approx(one["loss"], rel=1e-5)
    assert unsynced == pytest.approx(one["loss"], rel=0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_workers(data, run_dirs, max_steps, tmp=None):
    """Run worker 0 and worker 1 on 127.0.0.1, each with its own --train_dir; (exit codes, outputs).
    tmp: the workers' TMPDIR (where worker 1 writes its checkpoints)."""
    hosts = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **({"TMPDIR": str(tmp)} if tmp else {}))
    env.pop("TF_CONFIG", None)
    procs = [subprocess.Popen([sys.executable, "hw2_multi_gpu_train.py", "--data_dir", data, "--train_dir", run_dir,
                               "--section", "tiny", "--model", "simple_cnn", "--fc_units", "8",
                               "--max_steps", str(max_steps), "--worker_hosts", hosts,
                               "--mix", "cutmix",  # the mixed step (its step-seeded draw) runs distributed too
                               "--time_budget", "30",  # its per-step agreement (an all-reduce) runs too
                               "--task_index", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i, run_dir in enumerate(run_dirs)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], outs


def test_two_workers_train_one_run_that_eval_restores(tmp_path):
    data = make_image_folder(tmp_path / "data")
    run_dir = str(tmp_path / "run")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    codes, outs = two_workers(data, [run_dir, run_dir], 4, tmp)
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert not [f for f in os.listdir(tmp) if f.startswith("hw2-")]  # worker 1's checkpoints went with it
    assert "2 replica(s) in all" in outs[0]
    import tensorflow as tf
    assert tf.train.latest_checkpoint(run_dir).endswith("ckpt-4")
    assert tf.train.latest_checkpoint(os.path.join(run_dir, "best"))
    import contextlib
    import io

    import hw2_eval
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert hw2_eval.main(["--checkpoint_dir", run_dir, "--no_report"]) == 0
    assert "top-1" in out.getvalue() and "step 4" in out.getvalue()

    # A restarted worker whose RUN is a local folder (not the chief's) must not hang in a save
    # the chief never joins: both stop with one line that says why.
    codes, outs = two_workers(data, [run_dir, str(tmp_path / "local")], 6, tmp)
    assert codes == [2, 2], outs
    assert not [f for f in os.listdir(tmp) if f.startswith("hw2-")]  # and when it stopped on an error
    for out in outs:
        last = out.strip().splitlines()[-1]
        assert last.startswith("error: the workers found different checkpoints") and "shared" in last, out[-2000:]


def test_more_gpus_than_present_is_an_error_and_cpu_devices_only_when_asked(monkeypatch):
    import tensorflow as tf

    import hw2_multi_gpu_train
    from utils import UserError
    two_gpus = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in range(2)]
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: two_gpus if kind == "GPU" else [])
    with pytest.raises(UserError, match="--num_gpus 4, but this machine has 2 GPU"):
        hw2_multi_gpu_train.local_devices(4)
    assert hw2_multi_gpu_train.local_devices(2) == ["/gpu:0", "/gpu:1"]
