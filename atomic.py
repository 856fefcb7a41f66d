"""Atomic, durable file writes for train.py, sample.py and prepare.py: a reader never sees a half-written file.

fid.py keeps its own copy so that it stays a self-contained evaluator.
"""

import os


def fsync_folder(folder):
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, write):
    """Create path through write(binary file object) under a temporary name beside it, then rename it in.

    The temporary name ends in .tmp, so folder scans for .png / .npy / .pt never pick it up, and an
    interrupted write leaves at worst a stray .tmp file, never a truncated output. The data is fsynced
    before the rename and the folder after it, so after a power cut path holds either the old or the
    new file, never an empty or partial one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(folder)
    finally:
        if os.path.exists(tmp):  # write() failed: drop the partial file
            os.remove(tmp)
