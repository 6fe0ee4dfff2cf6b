"""Decoded images kept on disk between runs, so a folder decodes once, not once a run.

Decoding is most of a run's start on a real folder: 2,000 phone JPEGs took ~23 s on 2 cores, and
a time budget counts it. Every later run on the same folder at the same decode size (a rerun, a
resume, each variant and fold of hw2_experiment, hw2_eval's runs) reads the images back instead:
hw2_input's training preload and its evaluation sets that fit in RAM (cache_images_mb).

One file per (folder, decode short side) in the user's cache folder (XDG_CACHE_HOME or ~/.cache,
`hw2/decoded/`): every image decoded so far, each with its file's size and modification time. An
image whose file changed since is decoded again; one that failed to decode is not kept (it is tried,
and reported, again). A cache that cannot be read or written is ignored with a log line: it only
ever saves time. Files not used for MAX_AGE_DAYS, or beyond MAX_TOTAL_BYTES (oldest first), go;
so do decode_store's files of folders too big for RAM, which live beside these.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time

import numpy as np

import utils

log = logging.getLogger(__name__)

VERSION = 1  # of the decoding (hw2_dataset.read_image) and of this file's layout
MAX_AGE_DAYS = 30
MAX_TOTAL_BYTES = 4 * 2**30


def folder() -> str:
    return os.path.join(utils.user_cache_dir(), "decoded")


def cache_file(data_dir: str, short_side: int) -> str:
    key = f"v{VERSION}|{os.path.realpath(data_dir)}|{short_side}".encode("utf-8", "surrogateescape")
    return os.path.join(folder(), hashlib.sha256(key).hexdigest()[:32] + ".npz")


def file_stamp(path: str) -> tuple[int, int] | None:
    """(size, mtime in ns) of a file, None if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def load(data_dir: str, short_side: int) -> dict[str, tuple[tuple[int, int], np.ndarray]]:
    """{relative path: ((size, mtime_ns), uint8 image [H, W, 3])} of this folder's cache, or {}."""
    path = cache_file(data_dir, short_side)
    if not os.path.exists(path):
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            flat, offsets, shapes = z["flat"], z["offsets"], z["shapes"]
            names, stamps = z["paths"], z["stamps"]
        entries = {str(name): ((int(s[0]), int(s[1])), flat[offsets[i]:offsets[i + 1]].reshape(shapes[i]))
                   for i, (name, s) in enumerate(zip(names, stamps))}
        os.utime(path)  # recently used: the last to be pruned
        return entries
    except (OSError, ValueError, KeyError, IndexError) as e:
        log.warning("ignoring the decoded-image cache %s (%s): decoding again", path, e)
        return {}


def save(data_dir: str, short_side: int, entries: dict[str, tuple[tuple[int, int], np.ndarray]]) -> None:
    """Write this folder's cache (temp file + rename), then prune old and excess cache files."""
    path = cache_file(data_dir, short_side)
    names = sorted(entries)
    images = [entries[n][1] for n in names]
    try:
        write_npz(path, flat=np.concatenate([im.ravel() for im in images]) if images else np.zeros(0, np.uint8),
                  offsets=np.cumsum([0] + [im.size for im in images], dtype=np.int64),
                  shapes=np.array([im.shape for im in images], np.int32).reshape(-1, 3),
                  paths=np.array(names, dtype=str),
                  stamps=np.array([entries[n][0] for n in names], np.int64).reshape(-1, 2))
    except (OSError, ValueError) as e:
        log.warning("could not write the decoded-image cache %s (%s): the next run decodes again", path, e)
        return
    prune(path)


def write_npz(path: str, **arrays: np.ndarray) -> None:
    """np.savez to a temp file beside `path`, then renamed over it: a reader never sees half a file
    (a temp file left by a crash goes with the next prune). Raises OSError or ValueError."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def prune(*keep: str) -> None:
    """Remove cache files unused for MAX_AGE_DAYS, then the oldest beyond MAX_TOTAL_BYTES."""
    try:
        files = [os.path.join(folder(), n) for n in os.listdir(folder()) if n.endswith((".npz", ".tmp", ".images"))]
        stats = sorted(((st.st_mtime, st.st_size, f) for f, st in ((f, os.stat(f)) for f in files)), reverse=True)
    except OSError:
        return
    total, now = 0, time.time()
    for mtime, size, f in stats:  # newest first
        stale = now - mtime > MAX_AGE_DAYS * 86400 or (f.endswith(".tmp") and now - mtime > 3600)
        if f not in keep and (stale or total + size > MAX_TOTAL_BYTES):
            try:
                os.remove(f)
                continue
            except OSError:
                pass
        total += size


def still_current(data_dir: str, entries: dict) -> dict:
    """The entries whose file still has the size and modification time they were decoded at."""
    return {name: e for name, e in entries.items() if file_stamp(os.path.join(data_dir, name)) == e[0]}
