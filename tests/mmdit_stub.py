"""A stand-in for mmdit.py while it is missing: MMDiT's interface for train.py and sample.py
(size_config('MMDiT-<depth>'), MMDiT(context_dim=..., **SiT keywords) with .config, forward(x, t,
context, align) -> SiTOutput) on a SiT whose label embedding is a linear map of the mean text token.
Used only when no real mmdit.py is importable (install() and stub_path())."""

import importlib.util
import os
import re
import sys

from torch import nn

from model import SiT


def size_config(name):
    """'MMDiT-<depth>' -> REPA's widths (32 x depth, depth heads), patch 2, taps at depth // 3."""
    m = re.fullmatch(r"MMDiT-(\d+)", name)
    if not m:
        raise ValueError(f"unknown model {name!r}; e.g. MMDiT-24")
    depth = int(m[1])
    tap = max(1, depth // 3)
    return dict(depth=depth, hidden_size=32 * depth, num_heads=depth, patch_size=2,
                encoder_depth=tap, sra_depth=tap)


class PooledText(nn.Module):
    """Text features (B, 77, D) -> (B, hidden): the mean token, projected."""

    def __init__(self, context_dim, hidden_size):
        super().__init__()
        self.proj = nn.Linear(context_dim, hidden_size)

    def forward(self, context, drop=None):
        return self.proj(context.float().mean(1))


class MMDiT(SiT):
    """Not REPA's MMDiT: a SiT conditioned on the pooled caption (enough to test the plumbing)."""

    def __init__(self, context_dim=768, **kwargs):
        super().__init__(**{**kwargs, "num_classes": 1, "class_dropout_prob": 0.0})
        self.y_embedder = PooledText(context_dim, self.config["hidden_size"])
        self.config = dict(self.config, context_dim=context_dim)

    def forward(self, x, t, context, align=True):
        return super().forward(x, t, context, align=align)


def install():
    """Make `import mmdit` give this stub when the repository has no mmdit.py; True if it did."""
    if "mmdit" in sys.modules or importlib.util.find_spec("mmdit") is not None:
        return False
    sys.modules["mmdit"] = sys.modules[__name__]
    return True


def stub_path(folder):
    """A folder whose mmdit.py re-exports this stub, for PYTHONPATH of subprocesses (a real
    mmdit.py beside train.py comes first on their sys.path)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "mmdit.py"), "w") as f:
        f.write("from mmdit_stub import *  # noqa: F403\n")
    return f"{folder}{os.pathsep}{os.path.dirname(os.path.abspath(__file__))}"
