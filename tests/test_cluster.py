"""cluster.py: a failed write leaves the previous file intact and no temporary behind; an output
folder that is read-only, a file, or full is one line naming it."""

import errno
import os

import pytest

import cluster
from cluster import UserError, check_writable, disk_error, disk_errors, require_space, write_atomic
from helpers import disk_free


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


def test_check_writable_creates_the_folder_and_leaves_nothing(tmp_path):
    folder = tmp_path / "a" / "b"
    check_writable(str(folder))
    assert folder.is_dir() and os.listdir(folder) == []


def test_check_writable_refuses_a_file_as_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    for folder in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(UserError, match=f"^{folder} is not a folder .*give another path$"):
            check_writable(str(folder))


def _chmod_blocks_writes(folder):
    """Whether a read-only mode stops this user (root ignores it)."""
    os.chmod(folder, 0o555)
    try:
        open(folder / "probe", "w").close()
    except PermissionError:
        return True
    os.remove(folder / "probe")
    return False


def test_check_writable_refuses_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    try:
        if not _chmod_blocks_writes(folder):
            pytest.skip("running as root: chmod does not make a folder read-only")
        with pytest.raises(UserError, match=f"^no permission to write to {folder}: "):
            check_writable(str(folder))
        with pytest.raises(UserError, match=f"^no permission to write to {folder / 'sub'}"):
            check_writable(str(folder / "sub"))
    finally:
        os.chmod(folder, 0o755)


def test_check_writable_refuses_a_read_only_file_system(tmp_path, monkeypatch):
    """EROFS (a read-only mount; also what root gets there) is one line naming the folder."""

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cluster.tempfile, "mkstemp", read_only)
    with pytest.raises(UserError, match=f"^{tmp_path} is on a read-only file system"):
        check_writable(str(tmp_path))


def test_require_space_names_folder_free_and_needed(tmp_path, monkeypatch):
    disk_free(monkeypatch, 3_000_000)
    require_space(str(tmp_path), 3_000_000, "a checkpoint")  # exactly enough passes
    with pytest.raises(UserError) as e:
        require_space(str(tmp_path / "not" / "yet"), 2_907_392_000, "a checkpoint")
    assert str(e.value) == (
        f"not enough space in {tmp_path / 'not' / 'yet'} for a checkpoint: 3.0 MB free, 2.9 GB "
        "needed; free space there or write to another folder, then run the same command again")


def test_disk_error_turns_disk_faults_into_one_line(tmp_path, monkeypatch):
    disk_free(monkeypatch, 512)
    full = disk_error(OSError(errno.ENOSPC, "No space left on device"), str(tmp_path))
    assert str(full) == (f"the disk holding {tmp_path} is full (512 B free): free space there or "
                         "write to another folder, then run the same command again")
    assert "input/output error" in str(disk_error(OSError(errno.EIO, "I/O"), "d"))
    assert "read-only" in str(disk_error(OSError(errno.EROFS, "RO"), "d"))
    assert disk_error(FileNotFoundError(errno.ENOENT, "missing"), "d") is None
    with pytest.raises(UserError, match="is full"), disk_errors(str(tmp_path)):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(FileNotFoundError), disk_errors(str(tmp_path)):
        raise FileNotFoundError(errno.ENOENT, "missing")
