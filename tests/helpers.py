"""Helpers the tests share: stand-in weights that need no download, a folder snapshot, Ctrl-C."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn


def random_inception(model, seed=0):
    """fid.py's Inception with seeded random weights and O(1) activations (no download)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                # He scaling keeps ~90 ReLU layers from exploding or vanishing, so parity tests
                # see real signal
                module.weight.normal_(0, (2 / module.weight[0].numel()) ** 0.5, generator=gen)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.8, 1.2, generator=gen)
                module.bias.normal_(0, 0.1, generator=gen)
                module.running_mean.normal_(0, 0.1, generator=gen)
                module.running_var.uniform_(0.5, 1.5, generator=gen)
        # logits of a few units: softmax not saturated
        model.fc.weight.normal_(0, 0.05, generator=gen)
        model.fc.bias.normal_(0, 1, generator=gen)
    return model


def cli_error(capsys, parse, *argv):
    """The last line argparse prints when parse(argv) refuses argv (it exits with status 2)."""
    with pytest.raises(SystemExit) as stop:
        parse(list(argv))
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


class TextVelocity(nn.Module):
    """A tiny stand-in text-to-image velocity model with MMDiT's call (x, t, context) -> (v,).

    Nonlinear in x, t and every context token, so a sampler that feeds the wrong context, the wrong
    time or the wrong half of a guided batch changes its output.
    """

    def __init__(self, channels=4, size=8, dim=16, tokens=77, path_type="linear"):
        super().__init__()
        self.config = dict(in_channels=channels, input_size=size, path_type=path_type)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.token_weights = nn.Parameter(torch.randn(tokens) / tokens)
        self.context = nn.Linear(dim, channels)
        self.time = nn.Linear(1, channels)

    def forward(self, x, t, context, align=True):
        """x (B, C, H, W), t (B,), context (B, tokens, dim) -> (v (B, C, H, W),)."""
        pooled = torch.einsum("bnd,n->bd", context, self.token_weights)  # (B, dim)
        shift = self.context(pooled) + self.time(t[:, None].to(x.dtype))  # (B, C)
        return (torch.tanh(self.conv(x) + shift[:, :, None, None]) + 0.5 * x,)


def snapshot(dest):
    """{relative path: (bytes, mtime_ns)} of every file under dest."""
    out = {}
    for d, _, files in os.walk(dest):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, dest)] = (fh.read(), os.stat(p).st_mtime_ns)
    return out


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def interrupted(code, marker, timeout=300):
    """Run `python -c code` in the repository until it creates the file marker, then press Ctrl-C
    (SIGINT); its (exit status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + timeout
    while not os.path.exists(marker):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    return proc.wait(timeout), proc.stderr.read()


def verify_reads(monkeypatch, stop_at=None):
    """The prepared items data.verify reads from now on, in the returned list; at item stop_at it
    gets a KeyboardInterrupt (Ctrl-C) instead."""
    import data

    real = getattr(data.PreparedFiles.__getitem__, "real", data.PreparedFiles.__getitem__)
    checked = []

    def getitem(self, k):
        if self.indices[k] == stop_at:
            raise KeyboardInterrupt
        checked.append(self.indices[k])
        return real(self, k)

    getitem.real = real
    monkeypatch.setattr(data.PreparedFiles, "__getitem__", getitem)
    return checked


def disk_free(monkeypatch, free):
    """shutil.disk_usage (as cluster.py calls it) reports `free` bytes free."""
    import cluster

    usage = shutil._ntuple_diskusage(10**12, 10**12 - free, free)
    monkeypatch.setattr(cluster.shutil, "disk_usage", lambda path: usage)


def disk_fills(monkeypatch, module, full):
    """module.write_atomic fails with ENOSPC (a full disk) once full(path) says so."""
    real = module.write_atomic

    def write_atomic(path, write):
        if full(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, write)

    monkeypatch.setattr(module, "write_atomic", write_atomic)
