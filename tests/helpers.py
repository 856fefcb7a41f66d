"""Helpers the tests share: stand-in weights that need no download, a folder snapshot."""

import os

import pytest
import torch
import torch.nn as nn


def random_inception(model, seed=0):
    """fid.py's Inception with seeded random weights and O(1) activations (no download)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                # He scaling keeps ~90 ReLU layers from exploding or vanishing, so parity tests see
                # real signal
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


def snapshot(dest):
    """{relative path: (bytes, mtime_ns)} of every file under dest."""
    out = {}
    for d, _, files in os.walk(dest):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, dest)] = (fh.read(), os.stat(p).st_mtime_ns)
    return out
