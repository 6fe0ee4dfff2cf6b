"""The one image-folder writer the tests share (small real PNG/JPEG files in class folders), and
a stand-in for another process training a run."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
from PIL import Image


# For tests of the loop, the run folder or the commands, not of the network: a tiny run of
# simple_cnn builds and traces in ~2.3 s where the [tiny] inception network takes ~5.3.
SMALL_NET = ("--model", "simple_cnn", "--fc_units", "8")


def make_image_folder(root, classes=("dark", "light"), per_class: int = 8, sizes=((20, 26), (27, 24), (34, 21)),
                      formats=("png", "jpg"), seed: int = 0, noise: float = 20.0) -> str:
    """Write root/<class>/<i>.<ext> and return str(root).

    Classes are told apart by brightness (class c of n is centred on 60 + 130 c / (n - 1)), so a
    tiny network learns them in a few steps. Image i takes sizes[i % len(sizes)] (h, w) and
    formats[i % len(formats)] ("png", "jpg", "JPEG", "bmp", ...).
    """
    rng = np.random.default_rng(seed)
    n = len(classes)
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        base = 60 + (130 * c / (n - 1) if n > 1 else 0)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            pixels = np.clip(base + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8)
            ext = formats[i % len(formats)]
            Image.fromarray(pixels).save(os.path.join(root, name, f"{i}.{ext}"))
    return str(root)


def items_of(root) -> list[tuple[str, int]]:
    """(relative path, label) of every file under root/<class>/, classes sorted, as a split lists them."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    return [(f"{name}/{f}", label) for label, name in enumerate(classes)
            for f in sorted(os.listdir(os.path.join(root, name)))]


def bf16_kernels_missing() -> bool:
    """Whether ONEDNN_MAX_CPU_ISA caps oneDNN below its bf16 kernels on a CPU that has bf16
    hardware: TensorFlow's bf16 ops crash the process there (precision.py refuses bf16)."""
    import precision
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return bool(cap) and cap.upper() not in precision.BF16_ISAS and bool(
        precision.cpu_flags() & {"avx512_bf16", "amx_bf16"})


HOLDER = "hw2 (pid 4242 on box, since 2026-11-26 13:00:00)"


@contextlib.contextmanager
def run_held_by_another_process(run):
    """RUN/.lock held by a real second process, as a running hw2_train holds it (flock)."""
    os.makedirs(run, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys\n"
        f"f = open({os.path.join(str(run), '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        f"f.write({HOLDER!r}); f.flush(); print('held', flush=True)\n"
        "sys.stdin.read()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.communicate("")


class WindowsLocks:
    """msvcrt.locking as Windows has it: a byte range locked through one handle is refused to
    every other handle, of this process or another, until that handle is closed."""
    LK_NBLCK = 2

    def __init__(self):
        self.held = {}  # (device, inode, offset) -> fd

    def locking(self, fd: int, mode: int, nbytes: int) -> None:
        assert mode == self.LK_NBLCK and nbytes == 1
        key = *_file_of(fd), os.lseek(fd, 0, os.SEEK_CUR)
        holder = self.held.get(key)
        if holder not in (None, fd) and _file_of(holder) == key[:2]:  # still open on this file
            raise PermissionError(13, "Permission denied")
        self.held[key] = fd

    def unlink(self, path: str, real=os.unlink) -> None:
        """os.unlink as Windows has it, for the files locked here: no file that a handle has open."""
        st = os.stat(path)
        if any((device, inode) == (st.st_dev, st.st_ino) == _file_of(fd) for (device, inode, _), fd in self.held.items()):
            raise PermissionError(13, "The process cannot access the file", path)
        real(path)


def _file_of(fd: int) -> tuple[int, int] | None:
    """(device, inode) of an open fd, None once it is closed."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino
