"""Shared test setup: the top-level modules on the path, TensorFlow quiet, and one tiny trained
run (the [tiny] section, 4 steps on a generated 2-class folder) that every module may read.

A test that changes the run works on a copy (`tiny_run.copy(tmp_path)`).
"""
import contextlib
import io
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Each pytest-xdist worker's TensorFlow (and the training subprocesses its tests start) gets its
# share of the cores, not all of them: on CI's 2 cores two workers of 2 + 2 threads each waited on
# one another, and one thread each ran the suite in 243-255 s against 270-271 (AMD EPYC Zen 4).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _threads = str(max(1, _cores // _workers))
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", _threads)
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", _threads)
# Fixed convolution forms (conv_forms.default_form): a test's result must not depend on timings,
# and every test-started training run (subprocesses too) would otherwise time forms on its own.
os.environ["HW2_CONV_AUTOTUNE"] = "0"
# The decoded-image cache (decode_cache.py) and any other user cache of the tests' runs, and of the
# training subprocesses they start, go to a folder of this session, not the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="hw2-tests-cache-")


@dataclass
class TinyRun:
    data: str  # DATA/dark, DATA/light: 10 images each, PNG and JPEG, mixed sizes
    run: str  # RUN after `hw2_train.py --section tiny --max_steps 4`
    best_top1: float  # what training printed for RUN/best

    def copy(self, tmp_path) -> str:
        target = str(tmp_path / "run-copy")
        shutil.copytree(self.run, target)
        return target


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    import hw2_train
    from helpers import make_image_folder
    tmp = tmp_path_factory.mktemp("tiny_run")
    data = make_image_folder(tmp / "data", per_class=10, formats=("png", "jpg", "JPEG"))
    run = str(tmp / "run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert hw2_train.main(["--data_dir", data, "--train_dir", run, "--section", "tiny", "--max_steps", "4"]) == 0
    best_line = out.getvalue().strip().splitlines()[-1]
    assert best_line.startswith("best val top-1"), best_line
    return TinyRun(data, run, float(best_line.split()[3]))
