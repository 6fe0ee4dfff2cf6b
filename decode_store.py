"""Decoded images of a folder too big for RAM, kept in one file on disk and read back by offset.

Images beyond cache_images_mb used to be decoded again on every epoch and every validation. A phone
JPEG takes ~20-26 ms of one core to decode even at libjpeg's 1/8 scale, where training at 64 px
takes ~14 core-ms an image: streamed, such a folder trained at a third of its speed. Now each image
is decoded the first time a pass asks for it, appended to a file in the user's cache folder
(decode_cache.folder()), and read back from there after that (os.pread releases the GIL; the OS's
page cache keeps what fits in RAM; Windows has no os.pread: a seek and a read under one lock). The
file outlives the run like decode_cache's: a rerun, a resume, each variant and fold of
hw2_experiment read the images back.

`<key>.images` holds the raw uint8 pixels, `<key>.index.npz` each stored image's file stamp, offset
and shape. One writer per file (file_lock): a second process (`hw2_eval.py` beside a training run)
reads what is indexed, takes up the writer's newer index at most every INDEX_EVERY_S, and decodes
the rest without storing it. An image whose file changed since is decoded again. The index is
written every INDEX_EVERY_S and at exit, so a killed run loses at most the images stored since. A
changed or deleted file's old pixels stay in the data file until such pixels outweigh the live ones
(a folder cleaned up or replaced); the next run then starts a new file (on Windows, only once no
other process has the old one open).
Nothing here can fail a run: any OS error turns storing off with one log line.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import threading
import time
from typing import Callable

import numpy as np

import decode_cache
import file_lock

log = logging.getLogger(__name__)

INDEX_EVERY_S = 60.0
# The data file starts with MAGIC and a random identity that its index repeats: an index never
# points into another file (one written after this one was pruned and made again), which would give
# another image's pixels without an error.
MAGIC = b"hw2dec01"
HEADER_SIZE = 16
FREE_DISK_RESERVE = 2 * 2**30  # stop storing before the disk gets this full
# Pixels of images whose files changed or went stay in the data file (appends only, so a reader's
# offsets stay true) until they outweigh the live ones and this much.
STALE_BYTES_KEPT = 256 * 2**20

Reader = Callable[[bytes, int], tuple[np.ndarray, np.bool_]]
# Windows opens files as text unless told: its newline translation would garble the pixels.
OPEN_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0)
WINDOWS = os.name == "nt"  # deletes no file that a process has open, this one included

_stores: dict[tuple[str, int], "Store"] = {}
_stores_lock = threading.Lock()


def open_store(data_dir: str, short_side: int, reader: Reader) -> "Store":
    """This process's store for (folder, decode short side): one per file, shared by every dataset
    built on the folder (a second one in the same process could not take the file's lock)."""
    key = (os.path.abspath(data_dir), int(short_side))
    with _stores_lock:
        if key not in _stores:
            _stores[key] = Store(data_dir, int(short_side), reader)
        return _stores[key]


def close_all() -> None:
    """Write every open store's index and let its file go (the next open_store opens it afresh)."""
    with _stores_lock:
        stores = list(_stores.values())
        _stores.clear()
    for store in stores:
        store.close()


class Store:
    """get(path, short_side) -> (uint8 image [H, W, 3], ok): `reader`'s result, from disk when stored."""

    def __init__(self, data_dir: str, short_side: int, reader: Reader):
        self.data_dir, self.short_side, self.reader = os.path.abspath(data_dir), short_side, reader
        base = decode_cache.cache_file(data_dir, short_side).removesuffix(".npz")
        self.data_path, self.index_path = base + ".images", base + ".index.npz"
        self.lock = threading.Lock()
        self.fd, self.writable, self.owner = -1, False, False  # owner: holds the lock, writes the index
        self.index: dict[str, tuple[tuple[int, int], int, tuple[int, ...]]] = {}  # rel path -> stamp, offset, shape
        self.slots: dict[bytes, tuple[int, tuple[int, ...]] | None] = {}  # checked this run; None: decode
        self.dirty, self.saved_at, self.end, self.file_id = False, time.monotonic(), HEADER_SIZE, b""
        self.loaded_at = time.monotonic()
        try:
            os.makedirs(decode_cache.folder(), exist_ok=True)
            self._open_file()
            # Pixels appended after the last index write (a killed run) are unreachable: cut them.
            # A stale image's pixels before that stay: another process may still read them.
            self.end = _end(self.index)
            if self.writable and self._mostly_stale():
                # Unlinked, not emptied: another process still reading it keeps its own inode,
                # whose offsets its index gives, while this run starts a new file.
                old_fd, self.index = self.fd, {}
                if WINDOWS:
                    os.close(old_fd)
                    old_fd = self.fd = -1
                os.unlink(self.data_path)
                self._open_file()
                if old_fd >= 0:
                    os.close(old_fd)
                self.end = _end(self.index)
            if self.writable:
                os.ftruncate(self.fd, self.end)
                os.utime(self.data_path)  # recently used: the last to be pruned
                decode_cache.prune(self.data_path, self.index_path)
                atexit.register(self.save_index)
        except OSError as e:
            self._stop_storing(e)
            self.owner = False
        if self.fd >= 0:
            log.info("decoded images beyond cache_images_mb %s %s (%d there already)",
                     "are kept in" if self.writable else "are read from (another run writes)",
                     self.data_path, len(self.index))

    def _open_file(self) -> None:
        self.fd = os.open(self.data_path, OPEN_FLAGS, 0o644)
        # No lock (a file system without them): read what is there, never write beside another writer.
        self.writable = self.owner = file_lock.try_lock(self.fd) is True
        header = _pread(self.fd, HEADER_SIZE, 0)
        if header[:len(MAGIC)] == MAGIC and len(header) == HEADER_SIZE:
            self.file_id = header[len(MAGIC):]
            self.index = _load_index(self.index_path, os.fstat(self.fd).st_size, self.file_id)
        elif self.writable:  # new, or not ours: start it afresh under a new identity
            self.file_id = os.urandom(HEADER_SIZE - len(MAGIC))
            os.ftruncate(self.fd, 0)
            _pwrite(self.fd, MAGIC + self.file_id, 0)

    def _mostly_stale(self) -> bool:
        """Forget the images whose files changed or went; True when their pixels fill most of the
        data file (a folder cleaned up or replaced), which is then better started afresh than kept."""
        live = decode_cache.still_current(self.data_dir, self.index)
        live_bytes = sum(int(np.prod(shape)) for _, _, shape in live.values())
        self.dirty, self.index = len(live) < len(self.index), live
        return self.end - HEADER_SIZE - live_bytes > max(live_bytes, STALE_BYTES_KEPT)

    def get(self, path: bytes, short_side) -> tuple[np.ndarray, np.bool_]:
        """Called from tf.data's threads with the same arguments as `reader`."""
        with self.lock:
            slot = self.slots[path] if path in self.slots else self._check(path)
            if slot is None and not self.owner:
                slot = self._refresh(path)
        if slot is not None:
            offset, shape = slot
            size = int(np.prod(shape))
            try:
                data = _pread(self.fd, size, offset)
                if len(data) == size:
                    return np.frombuffer(data, np.uint8).reshape(shape), np.bool_(True)
            except OSError:
                pass  # the file went (pruned by another run): decode it instead
        stamp = decode_cache.file_stamp(os.fsdecode(path))
        image, ok = self.reader(path, short_side)
        if ok and stamp is not None and self.writable:
            self._append(path, stamp, np.ascontiguousarray(image))
        return image, ok

    def _check(self, path: bytes):
        """The stored slot of `path` if its file is unchanged since it was stored, else None."""
        rel = os.path.relpath(os.fsdecode(path), self.data_dir)
        entry = self.index.get(rel)
        slot = None
        if entry is not None:
            if decode_cache.file_stamp(os.fsdecode(path)) == entry[0]:
                slot = entry[1], entry[2]
            else:
                del self.index[rel]  # changed: decoded again and stored anew
                self.dirty = True
        self.slots[path] = slot
        return slot

    def _refresh(self, path: bytes):
        """A reader takes up what the writer has stored since (its index, at most every INDEX_EVERY_S)."""
        if self.fd < 0 or not self.file_id or time.monotonic() - self.loaded_at < INDEX_EVERY_S:
            return None
        self.loaded_at = time.monotonic()
        try:
            self.index = _load_index(self.index_path, os.fstat(self.fd).st_size, self.file_id)
        except OSError:
            return None
        self.slots = {p: slot for p, slot in self.slots.items() if slot is not None}
        return self._check(path)

    def _append(self, path: bytes, stamp: tuple[int, int], image: np.ndarray) -> None:
        with self.lock:
            if not self.writable or not self._room(image.nbytes):
                return
            offset = self.end
            self.end += image.nbytes
        try:
            _pwrite(self.fd, image.tobytes(), offset)
        except OSError as e:
            self._stop_storing(e)
            return
        with self.lock:
            # Published only once its pixels are written: another thread may read it at once.
            self.slots[path] = offset, image.shape
            self.index[os.path.relpath(os.fsdecode(path), self.data_dir)] = stamp, offset, image.shape
            self.dirty = True
            due = time.monotonic() - self.saved_at > INDEX_EVERY_S
        if due:
            self.save_index()

    def _room(self, nbytes: int) -> bool:
        """Whether one more image fits under decode_cache's size limit and the disk's reserve
        (checked every 64 MiB, not every image)."""
        if self.end + nbytes > decode_cache.MAX_TOTAL_BYTES:
            self._stop_storing(f"it reached decode_cache.MAX_TOTAL_BYTES ({decode_cache.MAX_TOTAL_BYTES / 2**30:g} GiB)")
            return False
        if (self.end + nbytes) >> 26 != self.end >> 26 or self.end == HEADER_SIZE:
            try:
                free = shutil.disk_usage(os.path.dirname(self.data_path)).free
            except OSError:
                free = 0
            if free - nbytes < FREE_DISK_RESERVE:
                self._stop_storing(f"under {FREE_DISK_RESERVE / 2**30:g} GiB free on its disk")
                return False
        return True

    def _stop_storing(self, why) -> None:
        if self.writable or self.fd < 0:
            log.warning("not storing more decoded images in %s (%s): the rest are decoded on every pass",
                        self.data_path, why)
        self.writable = False

    def close(self) -> None:
        """Write the index and release the file, between passes: a dataset still holding `get`
        decodes every image from then on."""
        self.save_index()
        with self.lock:
            fd, self.fd, self.writable, self.slots, self.index = self.fd, -1, False, {}, {}
        if fd >= 0:
            os.close(fd)

    def save_index(self) -> None:
        """Write the index (temp file + rename), if anything was stored or dropped since the last write."""
        with self.lock:
            if not self.dirty or not self.owner:
                return
            entries, self.dirty, self.saved_at = dict(self.index), False, time.monotonic()
        names = sorted(entries)
        try:
            decode_cache.write_npz(self.index_path, file_id=np.frombuffer(self.file_id, np.uint8),
                                   paths=np.array(names, dtype=str),
                                   stamps=np.array([entries[n][0] for n in names], np.int64).reshape(-1, 2),
                                   offsets=np.array([entries[n][1] for n in names], np.int64),
                                   shapes=np.array([entries[n][2] for n in names], np.int32).reshape(-1, 3))
        except (OSError, ValueError) as e:
            log.warning("could not write %s (%s): the next run decodes those images again", self.index_path, e)


def _end(index: dict) -> int:
    """Where the data file's last indexed image ends."""
    return max((offset + int(np.prod(shape)) for _, offset, shape in index.values()), default=HEADER_SIZE)


_seek_lock = threading.Lock()


def _pread(fd: int, size: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    with _seek_lock:  # Windows: the file position is shared by every thread
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, size)


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    if hasattr(os, "pwrite"):
        written = os.pwrite(fd, data, offset)
    else:
        with _seek_lock:
            os.lseek(fd, offset, os.SEEK_SET)
            written = os.write(fd, data)
    if written != len(data):
        raise OSError(f"wrote {written} of {len(data)} bytes")


def _load_index(path: str, data_size: int, file_id: bytes) -> dict:
    """{rel path: (stamp, offset, shape)} of the entries whose pixels lie inside the data file."""
    if not os.path.exists(path):
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            if z["file_id"].tobytes() != file_id:
                return {}
            names, stamps, offsets, shapes = z["paths"], z["stamps"], z["offsets"], z["shapes"]
        entries = {}
        for name, stamp, offset, shape in zip(names, stamps, offsets, shapes):
            if int(offset) + int(np.prod(shape)) <= data_size:
                entries[str(name)] = (int(stamp[0]), int(stamp[1])), int(offset), tuple(int(s) for s in shape)
        return entries
    except (OSError, ValueError, KeyError, IndexError) as e:
        log.warning("ignoring the decoded-image index %s (%s): decoding again", path, e)
        return {}
