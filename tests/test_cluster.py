"""cluster.py: a failed write leaves the previous file intact and no temporary behind."""

import os

import pytest

from cluster import write_atomic


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


def test_data_and_folder_are_fsynced_in_order(tmp_path, monkeypatch):
    """The temporary file is fsynced before the rename, the folder after it (a power cut keeps old
    or new)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os,
        "fsync",
        lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd),
    )
    monkeypatch.setattr(
        os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b)
    )
    path = tmp_path / "ckpt.pt"
    write_atomic(str(path), lambda f: f.write(b"data"))
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert (
        events[0][1].endswith(".tmp")
        and events[1][1] == str(path)
        and events[2][1] == str(tmp_path)
    )
    assert path.read_bytes() == b"data"
