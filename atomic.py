"""Atomic file writes for train.py, sample.py and prepare.py: a reader never sees a half-written file.

fid.py keeps its own copy so that it stays a self-contained evaluator.
"""

import os


def write_atomic(path, write):
    """Create path through write(binary file object) under a temporary name beside it, then rename it in.

    The temporary name ends in .tmp, so folder scans for .png / .npy / .pt never pick it up, and an
    interrupted write leaves at worst a stray .tmp file, never a truncated output.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # write() failed: drop the partial file
            os.remove(tmp)
