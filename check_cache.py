"""What the scan learnt about each image file, kept between runs: a rerun on the same folder checks
only the files that changed.

Checking decodes every image (a JPEG at 1/8 scale): ~8-13 ms a phone photo on one core, over a
minute for 10,000 of them on 2 cores, at the start of every new run, and a time budget counts it.
The results (size, format, mode, or why the file is unusable) are kept per file with its size and
modification time, in decode_cache's folder and pruned with its files; a file whose size or time
moved is checked again. "unreadable" results (permissions, I/O errors) are not kept: they can change
while the file does not. A cache that cannot be read or written is ignored with a log line.
"""
from __future__ import annotations

import hashlib
import logging
import os

import numpy as np

import decode_cache

log = logging.getLogger(__name__)

VERSION = 1  # of hw2_dataset.inspect_image's verdicts and of this file's layout

Entry = tuple[tuple[int, int], tuple[int, int, str, str, str | None]]  # stamp, (w, h, format, mode, problem)


def cache_file(data_dir: str, min_size: int) -> str:
    key = f"checks v{VERSION}|{os.path.realpath(data_dir)}|{min_size}".encode("utf-8", "surrogateescape")
    return os.path.join(decode_cache.folder(), hashlib.sha256(key).hexdigest()[:32] + ".checks.npz")


def keeps(problem: str | None) -> bool:
    """Whether a verdict holds for as long as the file's bytes do."""
    return not (problem or "").startswith("unreadable")


def load(data_dir: str, min_size: int) -> dict[str, Entry]:
    """{relative path: (stamp, (width, height, format, mode, problem))} of an earlier scan, or {}."""
    path = cache_file(data_dir, min_size)
    if not os.path.exists(path):
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            columns = [z[k] for k in ("paths", "stamps", "sizes", "formats", "modes", "problems")]
        return {str(name): ((int(s[0]), int(s[1])), (int(wh[0]), int(wh[1]), str(fmt), str(mode), str(why) or None))
                for name, s, wh, fmt, mode, why in zip(*columns)}
    except (OSError, ValueError, KeyError, IndexError) as e:
        log.warning("ignoring the image-check cache %s (%s): checking again", path, e)
        return {}


def save(data_dir: str, min_size: int, entries: dict[str, Entry]) -> None:
    """Write the folder's verdicts (temp file + rename)."""
    path = cache_file(data_dir, min_size)
    names = sorted(entries)
    try:
        decode_cache.write_npz(path, paths=np.array(names, dtype=str),
                               stamps=np.array([entries[n][0] for n in names], np.int64).reshape(-1, 2),
                               sizes=np.array([entries[n][1][:2] for n in names], np.int64).reshape(-1, 2),
                               formats=np.array([entries[n][1][2] for n in names], dtype=str),
                               modes=np.array([entries[n][1][3] for n in names], dtype=str),
                               problems=np.array([entries[n][1][4] or "" for n in names], dtype=str))
    except (OSError, ValueError) as e:
        log.warning("could not write the image-check cache %s (%s): the next run checks again", path, e)
