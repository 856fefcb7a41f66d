"""What every script needs to run on a cluster: torchrun process groups, preemption signals, durable
atomic writes, output locations checked before the work, and one way to stop on bad input.

train.py, sample.py, data.py and analysis.py use it; fid.py keeps its own small copies so that it
stays a self-contained evaluator.
"""

import argparse
import contextlib
import datetime
import errno
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------
# One way to fail: a one-line error that says what was wrong and what to do, never a traceback


class UserError(ValueError):
    """Bad input or a fault the user can mend; the message says what was wrong and what to do.

    Library code raises it; only a script's main turns it into one line (see main_errors).
    """


RANK_ERROR_DELAY = 3  # seconds a rank other than 0 waits before it repeats rank 0's error


@contextlib.contextmanager
def main_errors(script):
    """Around a script's main: a UserError ends the process as `script: error: message`,
    exit status 1.

    Under torchrun the ranks mostly hit the same error: rank 0 says it at once; another rank says it
    only if it is still alive RANK_ERROR_DELAY seconds later (torchrun stops every rank once one has
    failed), so the line appears once and torchrun's summary names one failed rank, not all.
    """
    try:
        yield
    except UserError as e:
        rank = int(os.environ.get("RANK", 0))
        if rank:  # its own error (rank 0 did not fail), or torchrun ends this process first
            signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # rank 0 has said it
            if StopRequest.stopping:  # torchrun's SIGTERM came during training: the same
                os._exit(0)
            time.sleep(RANK_ERROR_DELAY)
        where = f" (rank {rank})" if rank else ""
        raise SystemExit(f"{script}: error{where}: {e}") from None


@contextlib.contextmanager
def failing(what):
    """Turn a failed download, a missing or foreign file or an unknown name inside into
    UserError('what: reason')."""
    try:
        yield
    except UserError:
        raise
    # hub, URL and file errors: OSError / RuntimeError
    except (OSError, RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"{what}: {type(e).__name__}: {first}") from e


# ----------------------------------------------------------------------------------------------
# Process groups: one process per GPU under torchrun, else one process

# gloo group for host-side agreement (stop flags, checkpoint choice): never waits on a GPU
_host_group = None


def init(device=None, timeout=None):
    """(rank, world size, device): torchrun's environment (nccl on GPU, gloo on CPU) or
    a single process.

    device None picks this rank's GPU, or the CPU; timeout (a timedelta) bounds every collective.
    """
    global _host_group
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # torchrun: one GPU per rank
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    cuda = device.type == "cuda"
    timeout = timeout or datetime.timedelta(minutes=30)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout,
                            # bound to the rank's GPU for barriers
                            device_id=device if cuda else None)
    # None: the gloo world
    _host_group = dist.new_group(backend="gloo", timeout=timeout) if cuda else None
    return dist.get_rank(), dist.get_world_size(), device


def host_all_reduce(values, op, world):
    """Reduce a list of ints over the ranks on the host (gloo; op a dist.ReduceOp); no GPU
    synchronisation."""
    if world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=op, group=_host_group)
    return t.tolist()


def host_all_gather(items, world):
    """Every rank's list of picklable items, concatenated in rank order, on the host (gloo)."""
    if world == 1:
        return list(items)
    parts = [None] * world
    dist.all_gather_object(parts, list(items), group=_host_group)
    return [item for part in parts for item in part]


INTERRUPT = "INT"  # Ctrl-C: always a stop request in training, and ignored by loader workers
# a second Ctrl-C this many seconds after the first quits at once; sooner, it is the same one
# (torchrun forwards to its workers the Ctrl-C the terminal already sent them)
REPEAT_AFTER = 1.0


class StopRequest:
    """Remembers that one of the given signals (SIGTERM, SIGUSR1, SIGINT, ...) reached this
    process."""

    stopping = False  # any stop signal reached this process (main_errors asks)

    def __init__(self):
        self.signal, self.since = None, 0.0

    def handle(self, signum, frame):
        """Signal handler: note the signal (the training loop stops at a step boundary); a second
        Ctrl-C quits at once, exit status 130, without a checkpoint of this step."""
        name, now = signal.Signals(signum).name, time.monotonic()
        ctrl_c = signum == signal.SIGINT
        if ctrl_c and self.signal == name and now - self.since > REPEAT_AFTER:
            print("\nsecond Ctrl-C: quit without a checkpoint of this step", file=sys.stderr)
            raise SystemExit(130)
        if self.signal is None:
            self.signal, self.since = name, now
            StopRequest.stopping = True
            if ctrl_c:
                logging.getLogger("train").info(  # rank 0 only: the others log warnings only
                    "Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to quit "
                    "at once)")

    def agreed(self, world):
        """Whether any rank was signalled; every rank gets the same answer (one host all-reduce of
        an int)."""
        return bool(host_all_reduce([self.signal is not None], dist.ReduceOp.MAX, world)[0])


@contextlib.contextmanager
def stop_signals(names):
    """A StopRequest fed by the signals named (e.g. ("TERM", "USR1")) and Ctrl-C; the previous
    handlers come back on exit, and a run that Ctrl-C stopped exits with status 130 (the shell's
    "interrupted": `train.py && sample.py` does not go on with an unfinished run)."""
    stop = StopRequest()
    previous = {name: signal.signal(getattr(signal, f"SIG{name}"), stop.handle)
                for name in dict.fromkeys((*names, INTERRUPT))}
    try:
        yield stop
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, f"SIG{name}"), handler)
    if stop.signal == signal.SIGINT.name:
        raise SystemExit(130)


def ignore_signals(names, worker_id=None):
    """Data loader workers ignore the stop signals and Ctrl-C (a cluster may signal every process,
    a terminal signals the whole process group): the main process decides."""
    for name in dict.fromkeys((*names, INTERRUPT)):
        signal.signal(getattr(signal, f"SIG{name}"), signal.SIG_IGN)


def barrier(world):
    """Wait for every rank (nothing to wait for in a single process)."""
    if world > 1:
        dist.barrier()


def close(world):
    """Tear the process group down at the end of a distributed run."""
    if world > 1:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Durable writes: a reader never sees a half-written file, a power cut never leaves an empty one


def fsync_folder(folder):
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened
    (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, write):
    """Create path through write(binary file object) under a temporary name beside it, then
    rename it in.

    The temporary name ends in .tmp, so folder scans for .png / .npy / .pt never pick it up, and an
    interrupted write leaves at worst a stray .tmp file, never a truncated output. The data is
    fsynced before the rename and the folder after it, so after a power cut path holds either the
    old or the new file, never an empty or partial one.
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


# ----------------------------------------------------------------------------------------------
# Output locations: prove a folder takes files and has room before the work, so that a read-only,
# misspelt or full destination is one line up front, not a traceback after hours of work


def format_bytes(n):
    """1234567 -> '1.2 MB' (decimal units, as df -H and disk vendors count)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _existing(folder):
    """folder, or its nearest existing parent (where a folder still to be made will live)."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return folder


def free_bytes(folder):
    """Bytes free to this user on the file system that holds (or will hold) folder."""
    return shutil.disk_usage(_existing(folder)).free


def disk_error(exc, folder):
    """The one-line UserError for an OSError that a disk fault raised while writing into folder
    (full, quota, I/O error, read-only, no permission, a file in the way); None for other errors.

    Around a write, disk_errors(folder) does this.
    """
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{format_bytes(free_bytes(folder))} free"
        except OSError:
            free = "no space left"
        return UserError(f"the disk holding {folder} is full ({free}): free space there or "
                         "write to another folder, then run the same command again")
    if code == errno.EIO:
        return UserError(f"input/output error writing to {folder}: the disk or network file "
                         "system is failing; write to another folder")
    if code == errno.EROFS:
        return UserError(f"{folder} is on a read-only file system: give a writable folder")
    if code in (errno.EACCES, errno.EPERM):
        return UserError(f"no permission to write to {folder}: give a folder you can write to")
    if code in (errno.ENOTDIR, errno.EEXIST):
        return UserError(f"{folder} is not a folder (a file is in the way): give another path")
    return None


@contextlib.contextmanager
def disk_errors(folder):
    """Inside, an OSError from a disk fault (see disk_error) becomes its one-line UserError."""
    try:
        yield
    except OSError as e:
        error = disk_error(e, folder)
        if error is None:
            raise
        raise error from e


def check_writable(folder):
    """Create folder if needed and prove it takes a file (a temporary one, created and removed);
    UserError naming the folder if it cannot (read-only, no permission, a file in the way)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{folder} is not a folder (a file is in the way): give another path")
    with disk_errors(folder):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-check-", suffix=".tmp", dir=folder)
        os.close(fd)
        os.remove(tmp)


def require_space(folder, needed_bytes, what):
    """UserError unless the disk holding folder has needed_bytes free for `what` (e.g. 'a
    checkpoint'); the message names the folder, the space free and the space needed."""
    free = free_bytes(folder)
    if free < needed_bytes:
        raise UserError(f"not enough space in {folder} for {what}: {format_bytes(free)} free, "
                        f"{format_bytes(needed_bytes)} needed; free space there or write to "
                        "another folder, then run the same command again")


# ----------------------------------------------------------------------------------------------
# Command-line values: argparse types that refuse what is out of range, next to the flag they check


def ranged(kind, must, ok):
    """argparse type: text -> kind(text), refused unless finite and ok(value); `must` says the
    range."""

    def parse(text):
        value = kind(text)  # a ValueError here is argparse's "invalid int value"
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {must}")
        return value

    parse.__name__ = kind.__name__
    return parse


def at_least(low, kind=int):
    """A number >= low (int unless kind says otherwise)."""
    return ranged(kind, f"at least {low}", lambda v: v >= low)


def multiple_of(k):
    """A positive int divisible by k."""
    return ranged(int, f"a positive multiple of {k}", lambda v: v > 0 and v % k == 0)


def positive(kind=float):
    """A number > 0."""
    return ranged(kind, "greater than 0", lambda v: v > 0)


def fraction(below_one=False):
    """A float in [0, 1], or in [0, 1) with below_one."""
    if below_one:
        return ranged(float, "in [0, 1)", lambda v: 0 <= v < 1)
    return ranged(float, "in [0, 1]", lambda v: 0 <= v <= 1)


def signal_names(text):
    """--preempt-signals: 'TERM,USR1' -> ('TERM', 'USR1'); 'none' -> ()."""
    if text.lower() == "none":
        return ()
    names = tuple(n.strip().upper().removeprefix("SIG") for n in text.split(","))
    for name in names:
        if not isinstance(getattr(signal, f"SIG{name}", None), signal.Signals) or name in (
            "KILL",
            "STOP",
        ):
            raise argparse.ArgumentTypeError(
                f"{name} is not a signal a process can catch; use e.g. TERM,USR1 or none")
    return names
