"""Process groups for train.py, sample.py and prepare.py: one process per GPU under torchrun, else one process."""

import datetime
import os

import torch
import torch.distributed as dist


def init(device=None, timeout=None):
    """(rank, world size, device): torchrun's environment (nccl on GPU, gloo on CPU) or a single process.

    device None picks this rank's GPU, or the CPU; timeout (a timedelta) bounds every collective.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # torchrun: one GPU per rank
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout or datetime.timedelta(minutes=30),
                            device_id=device if cuda else None)  # bound to the rank's GPU for barriers
    return dist.get_rank(), dist.get_world_size(), device


def barrier(world):
    """Wait for every rank (nothing to wait for in a single process)."""
    if world > 1:
        dist.barrier()


def close(world):
    """Tear the process group down at the end of a distributed run."""
    if world > 1:
        dist.destroy_process_group()
