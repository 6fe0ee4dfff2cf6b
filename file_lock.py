"""A non-blocking exclusive lock on an open file, held until the file is closed or the process ends
(kill -9 included): fcntl.flock on Linux and macOS, msvcrt.locking on Windows.

run_dir.py locks RUN/.lock with it (one training per run folder); decode_store.py locks its data
file (one writer per file).
"""
from __future__ import annotations

import os

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:  # everywhere else
    msvcrt = None

# Windows locks are mandatory: no other process can read a locked byte. The lock goes on one byte
# far past anything the file will hold (run_dir's holder line, decode_store's pixels: at most
# decode_cache.MAX_TOTAL_BYTES), where Windows allows a lock, so other processes still read the
# file, as they do beside flock's advisory lock.
WINDOWS_LOCK_OFFSET = 2**40


def try_lock(fd: int) -> bool | None:
    """True: this process now holds the file open as `fd`; False: another process holds it; None: no
    lock here (a file system without locks, such as some network mounts, or an OS with neither kind):
    the caller goes unguarded or does without."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:
            return None
    if msvcrt is not None:
        try:
            position = os.lseek(fd, 0, os.SEEK_CUR)
            os.lseek(fd, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # from the file position, 1 byte
            finally:
                os.lseek(fd, position, os.SEEK_SET)
            return True
        except PermissionError:  # EACCES: the byte is locked by another handle
            return False
        except OSError:
            return None
    return None
