"""atomic.py: a failed write leaves the previous file intact and no temporary behind."""

import os

import pytest

from atomic import write_atomic


def test_write_then_failed_rewrite_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    write_atomic(str(path), lambda f: f.write(b"first"))
    assert path.read_bytes() == b"first"

    def half_then_crash(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(str(path), half_then_crash)
    assert path.read_bytes() == b"first"
    assert os.listdir(path.parent) == ["ckpt.pt"]
