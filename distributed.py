"""Process groups for train.py, sample.py and prepare.py: one process per GPU under torchrun, else one process."""

import contextlib
import datetime
import os
import signal

import torch
import torch.distributed as dist

_host_group = None  # gloo group for host-side agreement (stop flags, checkpoint choice): never waits on a GPU


def init(device=None, timeout=None):
    """(rank, world size, device): torchrun's environment (nccl on GPU, gloo on CPU) or a single process.

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
                            device_id=device if cuda else None)  # bound to the rank's GPU for barriers
    _host_group = dist.new_group(backend="gloo", timeout=timeout) if cuda else None  # None: the gloo world
    return dist.get_rank(), dist.get_world_size(), device


def host_all_reduce(values, op, world):
    """Reduce a list of ints over the ranks on the host (gloo; op a dist.ReduceOp); no GPU synchronisation."""
    if world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=op, group=_host_group)
    return t.tolist()


class StopRequest:
    """Remembers that one of the given signals (SIGTERM, SIGUSR1, ...) reached this process."""

    def __init__(self):
        self.signal = None

    def handle(self, signum, frame):
        """Signal handler: only note the signal; the training loop stops at a step boundary."""
        self.signal = signal.Signals(signum).name

    def agreed(self, world):
        """Whether any rank was signalled; every rank gets the same answer (one host all-reduce of an int)."""
        return bool(host_all_reduce([self.signal is not None], dist.ReduceOp.MAX, world)[0])


@contextlib.contextmanager
def stop_signals(names):
    """A StopRequest fed by the signals named (e.g. ("TERM", "USR1")); the previous handlers come back on exit."""
    stop = StopRequest()
    previous = {name: signal.signal(getattr(signal, f"SIG{name}"), stop.handle) for name in names}
    try:
        yield stop
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, f"SIG{name}"), handler)


def ignore_signals(names, worker_id=None):
    """Data loader workers ignore the stop signals (a cluster may signal every process): the main process decides."""
    for name in names:
        signal.signal(getattr(signal, f"SIG{name}"), signal.SIG_IGN)


def barrier(world):
    """Wait for every rank (nothing to wait for in a single process)."""
    if world > 1:
        dist.barrier()


def close(world):
    """Tear the process group down at the end of a distributed run."""
    if world > 1:
        dist.destroy_process_group()
