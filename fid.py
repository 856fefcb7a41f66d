"""ADM-compatible FID / sFID / Inception Score / precision-recall, in PyTorch alone.

Reproduces OpenAI's guided-diffusion evaluator (evaluations/evaluator.py, TensorFlow) so that a
number computed here can sit next to a published one:
  * Inception-v3 of the TF 2015-12-05 graph (the pytorch-fid / torch-fidelity weights file),
    with the graph's own preprocessing: TF1 legacy bilinear resize to 299, then (x - 128) / 128.
  * FID on pool3 (2048), sFID on mixed_6/conv = Mixed_6d.branch1x1 channels 0..6 in N,H,W,C order
    (2023), IS from softmax(pool3 @ W^T) without the bias in sequential splits of 5000, and
    improved precision / recall with k = 3 and (by default) ADM's fp16 distances.
  * The ADM reference-batch npz: arr_0 (uint8 N,H,W,3) plus optional mu, sigma, mu_s, sigma_s.

FID's tr sqrt(sigma1 sigma2) uses symmetric eigensolvers by default (--fid-route eigh, equal to
ADM's sqrtm to rounding and several times faster); --fid-route sqrtm is ADM's computation exactly.

Usage:
    python fid.py REF.npz SAMPLES.npz                # SAMPLES may also be a folder (tree) of PNGs
    torchrun --nproc_per_node=8 fid.py REF.npz SAMPLES.npz   # the same numbers, sharded over ranks
    python fid.py --write-ref OUT.npz IMAGES         # build an ADM-format reference batch
"""

import argparse
import contextlib
import dataclasses
import datetime
import errno
import hashlib
import itertools
import json
import os
import shutil
import socket
import sys
import tempfile
import urllib.parse
import urllib.request
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

# The pytorch-fid port of the TF graph's weights. The "-6726825d." filename suffix is the sha256
# prefix that torch.hub's check_hash extracts (HASH_REGEX takes the hex run between "-" and ".");
# we pin the full digest and check it on every load, not only on download.
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INPUT_SIZE = 299
POOL_DIM, SPATIAL_DIM, LOGITS_DIM = 2048, 17 * 17 * 7, 1008
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def write_atomic(path, write):
    """Create `path` by calling write(binary_file) on a temp file beside it, then os.replace it in.
    """
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)  # readers never see a half-written file
    except BaseException:
        os.unlink(tmp)
        raise


def check_output(path, flag):
    """Before any work: path's folder exists or is made, takes a file, and path is no folder;
    ValueError naming flag otherwise (a read-only, misspelt or non-folder destination)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder: give a file path")
    try:
        os.makedirs(folder, exist_ok=True)
        os.close((probe := tempfile.mkstemp(dir=folder, prefix=".tmp-"))[0])
        os.unlink(probe[1])
    except OSError as err:
        reason = {errno.ENOTDIR: "a file is in the way", errno.EEXIST: "a file is in the way"}.get(
            err.errno, err.strerror)
        raise ValueError(f"cannot write {flag} {path} into {folder} ({reason}): give a "
                         "writable folder") from None


def format_bytes(n):
    """1234567 -> '1.2 MB'."""
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.1f} GB"


def save_checked(path, write, needed):
    """write_atomic, first checking the disk has `needed` bytes free; a full disk is one line
    naming the folder, the space free and the space needed."""
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    if free >= needed:
        try:
            return write_atomic(path, write)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            free = shutil.disk_usage(folder).free
    raise ValueError(f"not enough space in {folder} for {path}: {format_bytes(free)} free, "
                     f"{format_bytes(needed)} needed; free space there or give another path, then "
                     "run the same command again")


def reachable(url, timeout=2.0):
    """Whether url's host takes a TCP connection within timeout seconds (one try)."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.getproxies().get(parts.scheme):  # only the proxy knows: let urllib ask
        return True
    try:
        socket.create_connection((parts.hostname, parts.port or 443), timeout).close()
        return True
    except OSError:  # no DNS, refused, unreachable, timed out
        return False


def sha256_of(path):
    """Hex sha256 digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def strict_fp32():
    """TF32 off for CUDA matmuls and convolutions inside (it moves Inception features at the 1e-3
    level); the caller's settings come back on exit."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------------------------
# Preprocessing: the graph's TF1 legacy bilinear resize and (x - 128) / 128
# --------------------------------------------------------------------------------------------


def _legacy_axis(in_size, out_size, device):
    """Source indices (low, high) and float32 weights along one axis, as TF1's legacy scaler
    computes them."""
    # float32, like TF's CalculateResizeScale
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    # source = dst * in/out, no half-pixel shift
    pos = torch.arange(out_size, dtype=torch.float32) * scale
    low = pos.floor()
    high = pos.ceil().clamp(max=in_size - 1)
    return low.long().to(device), high.long().to(device), (pos - low).to(device)


def tf1_resize_bilinear(x, size):
    """Resize float (N,C,H,W) to (N,C,size,size) exactly like TF1
    resize_bilinear(align_corners=False)."""
    y_lo, y_hi, y_w = _legacy_axis(x.shape[2], size, x.device)
    x_lo, x_hi, x_w = _legacy_axis(x.shape[3], size, x.device)

    def blend_columns(rows):
        """(N,C,size,W) -> (N,C,size,size): left + (right - left) * w, in TF's operation order."""
        left = rows[..., x_lo]
        return left + (rows[..., x_hi] - left) * x_w

    top = blend_columns(x[:, :, y_lo])  # N,C,size,size
    bottom = blend_columns(x[:, :, y_hi])  # N,C,size,size
    return top + (bottom - top) * y_w[:, None]


def preprocess(images):
    """uint8 (N,H,W,3) tensor -> float32 (N,3,299,299) network input, resized then scaled as in the
    graph."""
    x = images.permute(0, 3, 1, 2).float()  # N,3,H,W in [0, 255]
    return (tf1_resize_bilinear(x, INPUT_SIZE) - 128) / 128


# --------------------------------------------------------------------------------------------
# The Inception network (TF 2015-12-05 graph; names match the pytorch-fid weights file)
# --------------------------------------------------------------------------------------------


class BasicConv(nn.Module):
    """Bias-free convolution, batch norm with TF's eps 1e-3, ReLU."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        """Layers named conv and bn, as in the weights file."""
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        """(N,cin,H,W) -> (N,cout,H',W')."""
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    """3x3 stride-1 SAME average pool that, like TF, leaves the zero padding out of the mean."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class Mixed(nn.Module):
    """An Inception block: subclasses list their parallel branches; forward concatenates them."""

    def forward(self, x):
        """(N,cin,H,W) -> (N,sum of branch channels,H',W')."""
        return torch.cat(self.branches(x), 1)


class MixedA(Mixed):
    """35x35 block (Mixed_5b..5d): 1x1, 5x5, double 3x3 and average-pool branches."""

    def __init__(self, cin, pool_channels):
        """Branch layers, named as in the weights file."""
        super().__init__()
        self.branch1x1 = BasicConv(cin, 64, 1)
        self.branch5x5_1 = BasicConv(cin, 48, 1)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1)
        self.branch_pool = BasicConv(cin, pool_channels, 1)

    def branches(self, x):
        """Branch outputs in the graph's concatenation order."""
        return [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_tf_avg_pool(x)),
        ]


class MixedB(Mixed):
    """35 -> 17 reduction block (Mixed_6a)."""

    def __init__(self, cin):
        """Branch layers, named as in the weights file."""
        super().__init__()
        self.branch3x3 = BasicConv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2)

    def branches(self, x):
        """Branch outputs in the graph's concatenation order."""
        return [
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ]


class MixedC(Mixed):
    """17x17 block (Mixed_6b..6e) with factorised 1x7 / 7x1 convolutions."""

    def __init__(self, cin, c7):
        """Branch layers, named as in the weights file."""
        super().__init__()
        self.branch1x1 = BasicConv(cin, 192, 1)
        self.branch7x7_1 = BasicConv(cin, c7, 1)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv(cin, 192, 1)

    def branches(self, x):
        """Branch outputs in the graph's concatenation order; [0] is TF's mixed_N/conv."""
        tower = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        dbl = self.branch7x7dbl_1(x)
        for layer in (
            self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5,
        ):
            dbl = layer(dbl)
        return [self.branch1x1(x), tower, dbl, self.branch_pool(_tf_avg_pool(x))]


class MixedD(Mixed):
    """17 -> 8 reduction block (Mixed_7a)."""

    def __init__(self, cin):
        """Branch layers, named as in the weights file."""
        super().__init__()
        self.branch3x3_1 = BasicConv(cin, 192, 1)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2)

    def branches(self, x):
        """Branch outputs in the graph's concatenation order."""
        tower = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            tower = layer(tower)
        return [self.branch3x3_2(self.branch3x3_1(x)), tower, F.max_pool2d(x, 3, stride=2)]


class MixedE(Mixed):
    """8x8 block (Mixed_7b, 7c); the graph's last block pools with max instead of average."""

    def __init__(self, cin, max_pool):
        """Branch layers, named as in the weights file."""
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv(cin, 320, 1)
        self.branch3x3_1 = BasicConv(cin, 384, 1)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv(cin, 192, 1)

    def branches(self, x):
        """Branch outputs in the graph's concatenation order (the split towers flattened in place).
        """
        t = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return [
            self.branch1x1(x), self.branch3x3_2a(t), self.branch3x3_2b(t), self.branch3x3dbl_3a(d),
            self.branch3x3dbl_3b(d), self.branch_pool(pooled),
        ]


class FIDInception(nn.Module):
    """Inception-v3 as in the TF 2015-12-05 graph; load_state_dict(strict=True) takes the
    pytorch-fid file."""

    def __init__(self):
        """Stem, eleven mixed blocks and the 1008-way classifier, named as in the weights file."""
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3)
        self.Mixed_5b = MixedA(192, 32)
        self.Mixed_5c = MixedA(256, 64)
        self.Mixed_5d = MixedA(288, 64)
        self.Mixed_6a = MixedB(288)
        self.Mixed_6b = MixedC(768, 128)
        self.Mixed_6c = MixedC(768, 160)
        self.Mixed_6d = MixedC(768, 160)
        self.Mixed_6e = MixedC(768, 192)
        self.Mixed_7a = MixedD(768)
        self.Mixed_7b = MixedE(1280, max_pool=False)
        self.Mixed_7c = MixedE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_DIM, LOGITS_DIM)

    def forward(self, x):
        """Preprocessed (N,3,299,299) -> pool3 (N,2048), spatial (N,2023), unbiased logits (N,1008).
        """
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # N,64,147,147
        x = F.max_pool2d(x, 3, stride=2)  # N,64,73,73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # N,192,71,71
        x = F.max_pool2d(x, 3, stride=2)  # N,192,35,35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # N,288,35,35
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # N,768,17,17
        parts = self.Mixed_6d.branches(x)
        # sFID reads TF's mixed_6/conv (this block's 1x1 branch after BN+ReLU), first 7 channels,
        # flattened channels-last as TF lays it out, so stored mu_s / sigma_s line up
        spatial = parts[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # N,17*17*7
        x = self.Mixed_6e(torch.cat(parts, 1))  # N,768,17,17
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # N,2048,8,8
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)  # N,2048 (pool_3)
        # N,1008; ADM reads softmax/logits/MatMul, before the bias add
        logits = pool @ self.fc.weight.T
        return pool, spatial, logits


def default_weights_path():
    """The published weights file in the current folder (where the README keeps it), else in the
    torch.hub cache, downloaded (and hash-checked) on first use."""
    name = os.path.basename(WEIGHTS_URL)
    if os.path.isfile(name):
        return name
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if not os.path.exists(path):
        if not reachable(WEIGHTS_URL):  # fail at once, not after urllib's wait
            raise ValueError(
                f"the Inception weights {name} are neither in the current folder nor in {path}, "
                f"and {urllib.parse.urlsplit(WEIGHTS_URL).hostname} is unreachable (no network?): "
                f"fetch {WEIGHTS_URL} elsewhere and pass --weights PATH, or put it in either place")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:  # the full digest as hash_prefix: stricter than the 8-hex suffix check_hash would use
            torch.hub.download_url_to_file(WEIGHTS_URL, path, hash_prefix=WEIGHTS_SHA256)
        # offline (URLError), moved (HTTPError 404), hash mismatch (RuntimeError), ...
        except Exception as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(
                f"cannot download the Inception weights {os.path.basename(WEIGHTS_URL)} from "
                f"{WEIGHTS_URL} ({reason});"
                f" fetch that file elsewhere and pass --weights PATH, or put it at {path}"
            ) from err
    return path


def load_inception(weights=None, sha256=WEIGHTS_SHA256, device="cpu"):
    """The network with weights from `weights` (default: torch.hub cache), sha256-checked; returns
    (model, digest)."""
    path = weights or default_weights_path()
    if not os.path.isfile(path):
        raise ValueError(f"weights file not found: {path}")
    digest = sha256_of(path)
    if sha256 and not digest.startswith(sha256.lower()):
        raise ValueError(
            f"weights file {path} has sha256 {digest[:16]}..., expected {sha256[:16]}...: wrong or "
            "corrupt file; to evaluate with another file on purpose pass --weights-sha256 '' (its "
            "numbers are then not ADM's)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = FIDInception()
        model.load_state_dict(state, strict=True)
    except Exception as err:  # unpickling and layout errors span many lines; keep the first
        raise ValueError(f"cannot load weights file {path}: {str(err).splitlines()[0]}") from err
    return model.eval().requires_grad_(False).to(device), digest


# --------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------


class RunningGaussian:
    """Mean and covariance (np.cov convention, N-1) of feature rows, accumulated batch by batch in
    float64."""

    def __init__(self):
        self.count, self.shift, self.total, self.scatter = 0, None, None, None

    def update(self, feats):
        """Add a (B,D) batch of features."""
        x = feats.double()
        if self.shift is None:
            # centring on the first batch's mean keeps the raw second moment from
            # cancelling catastrophically
            self.shift = x.mean(0)  # D
            self.total = torch.zeros_like(self.shift)  # D
            self.scatter = x.new_zeros(x.shape[1], x.shape[1])  # D,D
        x = x - self.shift  # B,D
        self.count += len(x)
        self.total += x.sum(0)
        self.scatter.addmm_(x.T, x)  # D,D; in place: a temporary D x D per batch costs 3x the time

    def finalize(self):
        """(mu, sigma) as float64 numpy arrays."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.count}")
        mean = self.total / self.count  # D, relative to shift
        sigma = (self.scatter - self.count * torch.outer(mean, mean)) / (self.count - 1)  # D,D
        return (self.shift + mean).cpu().numpy(), sigma.cpu().numpy()


@dataclasses.dataclass
class Features:
    """What the evaluator needs from one image set: pool3 rows, logits, and Gaussian stats of pool3
    and spatial."""

    pool: torch.Tensor  # N,2048 float32 (CPU)
    logits: Optional[torch.Tensor]  # N,1008 float32 (CPU); None when read from the reference cache
    pool_stats: tuple  # (mu 2048, sigma 2048x2048) float64
    spatial_stats: tuple  # (mu_s 2023, sigma_s 2023x2023) float64


def in_batch_order(outputs, world, device):
    """Yield every rank's (pool, spatial, logits) batches in single-process order; each rank passes
    its own outputs.

    Rank r holds batches r, r + world, ...: round k all-gathers batch k * world + r from every
    rank r (rows padded to the round's largest batch), so every rank sees all batches, whole
    and in order.
    """
    if world == 1:
        yield from outputs
        return
    widths = (POOL_DIM, SPATIAL_DIM, LOGITS_DIM)
    for mine in itertools.chain(outputs, itertools.repeat(None)):
        # (B, 5079): pool3, spatial and logits side by side
        rows = torch.zeros(0, sum(widths), device=device) if mine is None else torch.cat(mine, 1)
        counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([len(rows)], device=device))
        longest = max(int(count) for count in counts)
        if longest == 0:  # every rank has run out of batches
            return
        gathered = [rows.new_empty(longest, rows.shape[1]) for _ in range(world)]
        # world x (longest,5079)
        dist.all_gather(gathered, F.pad(rows, (0, 0, 0, longest - len(rows))))
        for part, count in zip(gathered, counts):
            if count:
                yield part[: int(count)].split(widths, 1)


@torch.inference_mode()
def extract_features(model, batches, device="cpu", total=None, world=1):
    """Run the network over uint8 (B,H,W,3) numpy batches; keeps pool3 and logits,
    streams the statistics.

    world > 1 (under torchrun): `batches` is this rank's share, ImageSet.batches(..., rank, world);
    every rank returns the Features of all images, identical to a single process's given the same
    batch size.
    """
    pool_stats, spatial_stats = RunningGaussian(), RunningGaussian()
    pools, logits = [], []
    quiet = world > 1 and dist.get_rank() > 0  # one progress bar, rank 0's
    bar = tqdm(batches, total=total, disable=quiet or None, file=sys.stderr, desc="inception")
    with strict_fp32():
        outputs = (model(preprocess(torch.from_numpy(batch).to(device))) for batch in bar)
        for pool, spatial, logit in in_batch_order(outputs, world, device):
            pool_stats.update(pool)
            spatial_stats.update(spatial)
            pools.append(pool.cpu())
            logits.append(logit.cpu())
    if not pools:
        raise ValueError("no images to evaluate")
    return Features(
        torch.cat(pools), torch.cat(logits), pool_stats.finalize(), spatial_stats.finalize()
    )


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


FID_ROUTES = ("eigh", "sqrtm")


def psd_eigenvalues(values):
    """Eigenvalues of a symmetric PSD matrix with those within rounding of 0 set to 0; None if any
    is non-finite or negative beyond rounding (numpy's matrix_rank tolerance:
    size * eps * largest magnitude)."""
    if not np.isfinite(values).all():
        return None
    tol = len(values) * np.finfo(np.float64).eps * np.abs(values).max()
    # a zero eigenvalue comes out as +-1e-15 or so; its square root, 3e-8, times hundreds
    # would bias FID
    return None if values.min() < -tol else np.where(values > tol, values, 0)


def covariance_factor(sigma):
    """F (D,D) with F @ F.T = sigma: Cholesky when sigma is positive definite, else
    U sqrt(lambda) from eigh.

    None when sigma has eigenvalues that are non-finite or negative beyond rounding. Compute it once
    for a reference and pass it to every fid_from_stats(..., factor2=F) against that reference.
    """
    try:
        return scipy.linalg.cholesky(sigma, lower=True)
    except np.linalg.LinAlgError:  # singular (fewer images than dimensions) or broken
        values, vectors = scipy.linalg.eigh(sigma, driver="evd")
        values = psd_eigenvalues(values)
        return None if values is None else vectors * np.sqrt(values)  # D,D


def trace_sqrt_product(sigma1, factor2):
    """tr sqrt(sigma1 sigma2) from sigma2 = F F^T: F^T sigma1 F is symmetric PSD with the
    eigenvalues of sigma1 sigma2, so a symmetric eigensolver (values only) replaces sqrtm; None when
    those eigenvalues are not PSD to rounding."""
    product = factor2.T @ sigma1 @ factor2  # D,D
    values = psd_eigenvalues(scipy.linalg.eigh(product, eigvals_only=True, driver="evd"))
    return None if values is None else np.sqrt(values).sum()


def trace_sqrtm(sigma1, sigma2, eps):
    """ADM's tr sqrtm(sigma1 sigma2): scipy's sqrtm, the eps*I retry of a singular product, the
    imaginary-part check."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"singular covariance product; adding {eps} to the diagonals as ADM does")
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # rounding gives a tiny imaginary part; a large one means the statistics are broken
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"sqrtm has an imaginary component of {np.abs(covmean.imag).max():.3g}"
            )
        covmean = covmean.real
    return np.trace(covmean)


def fid_from_stats(mu1, sigma1, mu2, sigma2, eps=1e-6, route="eigh", factor2=None):
    """Frechet distance |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))
    of two Gaussians.

    route "eigh" (default): tr sqrt(F^T sigma1 F) with sigma2 = F F^T (factor2,
    covariance_factor(sigma2) when None), symmetric solvers only; it falls back to "sqrtm" with a
    warning when eigenvalues are non-finite or negative beyond rounding. route "sqrtm": ADM's
    evaluator exactly (scipy sqrtm of sigma1 sigma2).
    """
    if route not in FID_ROUTES:
        raise ValueError(f"unknown FID route {route!r}; use one of {', '.join(FID_ROUTES)}")
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma "
                         f"{sigma1.shape} vs {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("statistics contain NaN or inf")
    diff = mu1 - mu2
    tr_covmean = None
    if route == "eigh":
        factor2 = covariance_factor(sigma2) if factor2 is None else factor2
        tr_covmean = None if factor2 is None else trace_sqrt_product(sigma1, factor2)
        if tr_covmean is None:
            warnings.warn("FID route eigh: eigenvalues non-finite or negative beyond rounding; "
                          "using ADM's sqrtm")
    if tr_covmean is None:
        tr_covmean = trace_sqrtm(sigma1, sigma2, eps)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(probs, split_size=5000):
    """ADM's Inception Score: mean over sequential splits of exp(mean_x KL(p(y|x) || p(y)))."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or len(probs) == 0 or split_size < 1:
        raise ValueError("inception_score needs (N>0, classes) probabilities and split_size >= 1, "
                         f"got {probs.shape}")
    scores = []
    for start in range(0, len(probs), split_size):
        p = probs[start : start + split_size]  # S,C
        marginal = p.mean(0, keepdims=True)  # 1,C
        # xlogy makes 0 * log 0 = 0, so classes no image predicts contribute nothing instead of NaN
        kl = scipy.special.xlogy(p, p) - scipy.special.xlogy(p, marginal)  # S,C
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def pairwise_sq_dists(a, b, fp16=True):
    """Squared distances (n,m) between rows of a (n,D) and b (m,D), float32; fp16 arithmetic as ADM
    when asked."""
    if fp16:
        a16, b16 = a.half(), b.half()
        # n, squares rounded to fp16, summed with fp32 accumulation like TF
        norm_a = (a16 * a16).sum(1)
        norm_b = (b16 * b16).sum(1)  # m
        # products of fp16 values are exact in fp32: an fp32-accumulated GEMM rounded to fp16,
        # as on GPU
        dot = (a16.float() @ b16.float().T).half()  # n,m
        # n,m in fp16, ADM's operand order
        dist = (norm_a[:, None] - 2 * dot + norm_b[None, :]).clamp_min(0)
        if torch.isfinite(dist).all():
            return dist.float()
    # fp32, and ADM's fallback when fp16 overflows anywhere in the block
    a, b = a.float(), b.float()
    norm_a, norm_b = (a * a).sum(1), (b * b).sum(1)
    return (norm_a[:, None] - 2 * (a @ b.T) + norm_b[None, :]).clamp_min(0)  # n,m


def manifold_radii(feats, k=3, block=10000, fp16=True):
    """Per row, the squared distance to its k-th nearest neighbour (the (k+1)-th smallest, counting
    itself)."""
    if len(feats) <= k:
        raise ValueError(
            f"precision/recall with k={k} needs more than {k} images per set, got {len(feats)}"
        )
    radii = []
    for rows in feats.split(block):
        nearest = None  # running k+1 smallest distances of these rows, never a full N x N matrix
        for cols in feats.split(block):
            dist = pairwise_sq_dists(rows, cols, fp16)  # r,c
            pool = dist if nearest is None else torch.cat([nearest, dist], 1)
            # (r, <= k+1), ascending
            nearest = pool.topk(min(k + 1, pool.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)  # N


def precision_recall(ref, samples, k=3, block=10000, fp16=True):
    """Improved precision (samples inside some reference k-NN ball) and recall (the reverse), as
    ADM."""
    with strict_fp32():
        ref_radii = manifold_radii(ref, k, block, fp16)  # (Nr,)
        sample_radii = manifold_radii(samples, k, block, fp16)  # (Ns,)
        ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
        sample_inside = torch.zeros(len(samples), dtype=torch.bool, device=samples.device)
        for i in range(0, len(ref), block):
            for j in range(0, len(samples), block):
                # reference rows, sample columns: ADM's orientation (fp16 rounding is not symmetric)
                dist = pairwise_sq_dists(ref[i : i + block], samples[j : j + block], fp16)  # (r, s)
                ref_inside[i : i + block] |= (dist <= sample_radii[None, j : j + block]).any(1)
                sample_inside[j : j + block] |= (dist <= ref_radii[i : i + block, None]).any(0)
    return sample_inside.double().mean().item(), ref_inside.double().mean().item()


# --------------------------------------------------------------------------------------------
# Image sets and reference batches (ADM npz format)
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def open_arr0(path):
    """Yield (stream at arr_0's data, (N,H,W,3) shape) of an npz after validating arr_0's header."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not an npz file") from err
    with archive:
        if "arr_0.npy" not in archive.namelist():
            keys = ", ".join(n.removesuffix(".npy") for n in archive.namelist()) or "none"
            raise ValueError(f"{path} has no arr_0 (keys: {keys})")
        with archive.open("arr_0.npy") as stream:
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(np.lib.format.read_magic(stream))
            if read_header is None:
                raise ValueError(f"{path}: unsupported .npy version in arr_0")
            shape, fortran, dtype = read_header(stream)
            if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
                raise ValueError(
                    f"{path}: arr_0 must be C-ordered uint8 (N,H,W,3), got {dtype} {tuple(shape)}"
                )
            yield stream, tuple(shape)


def _load_image(path):
    """One image file as uint8 (H,W,3) RGB."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


class ImageSet:
    """Images from an ADM npz (arr_0 streamed from the zip, never loaded whole) or a folder tree of
    image files."""

    def __init__(self, path):
        """Open and validate `path` (npz header or folder listing) without reading the images."""
        self.path = path
        self.is_npz = os.path.isfile(path)
        if self.is_npz:
            with open_arr0(path) as (_, shape):
                self.count = shape[0]
        elif os.path.isdir(path):
            # recursive: data.py's images/ keeps one sub-folder per class
            # (images/00000/img00000000.png)
            self.files = sorted(
                os.path.join(root, f)
                for root, _, files in os.walk(path, followlinks=True)
                for f in files
                if f.lower().endswith(IMAGE_EXTS)
            )
            self.count = len(self.files)
        else:
            raise ValueError(f"no such file or folder: {path}")

    def __len__(self):
        return self.count

    def batches(self, batch_size, workers=4, rank=0, world=1):
        """Yield uint8 (B,H,W,3) numpy batches in order: all, or rank's share (batches rank, rank +
        world, ...)."""
        mine = range(rank, self.n_batches(batch_size), world)
        if self.is_npz:
            with open_arr0(self.path) as (stream, shape):
                per_image, position = int(np.prod(shape[1:])), 0
                for index in mine:
                    start = index * batch_size
                    n = min(batch_size, self.count - start)
                    # past other ranks' batches
                    stream.seek((start - position) * per_image, os.SEEK_CUR)
                    data = stream.read(n * per_image)
                    if len(data) != n * per_image:
                        raise ValueError(f"{self.path}: arr_0 is truncated")
                    position = start + n
                    # copy: torch wants writable
                    yield np.frombuffer(data, np.uint8).reshape(n, *shape[1:]).copy()
            return
        first = None
        with ThreadPoolExecutor(workers) as pool:  # PIL decodes outside the GIL
            for index in mine:
                images = list(
                    pool.map(_load_image, self.files[index * batch_size : (index + 1) * batch_size])
                )
                first = first or images[0].shape
                odd = next((im.shape for im in images if im.shape != first), None)
                if odd:
                    raise ValueError(
                        f"{self.path}: images differ in size ({first} vs {odd}); resize them first"
                    )
                yield np.stack(images)

    def n_batches(self, batch_size, rank=0, world=1):
        """How many batches batches(batch_size, rank=rank, world=world) yields (for progress bars).
        """
        return len(range(rank, -(-self.count // batch_size), world))


def read_npz_stats(path):
    """Precomputed [(mu, sigma), (mu_s, sigma_s)] of an ADM npz, each None when absent; shape- and
    NaN-checked."""
    stats = []
    with np.load(path) as npz:
        for mu_key, sigma_key, dim in (("mu", "sigma", POOL_DIM), ("mu_s", "sigma_s", SPATIAL_DIM)):
            present = [key in npz.files for key in (mu_key, sigma_key)]
            if not any(present):
                stats.append(None)
                continue
            if not all(present):
                raise ValueError(f"{path} has only one of {mu_key} and {sigma_key}")
            mu, sigma = npz[mu_key], npz[sigma_key]
            if not (
                np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)
            ):
                raise ValueError(f"{path}: {mu_key}/{sigma_key} must be floating point, got "
                                 f"{mu.dtype}/{sigma.dtype}")
            if mu.shape != (dim,) or sigma.shape != (dim, dim):
                raise ValueError(f"{path}: {mu_key} {mu.shape} / {sigma_key} {sigma.shape}, "
                                 f"expected ({dim},) / ({dim}, {dim})")
            if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
                raise ValueError(f"{path}: {mu_key}/{sigma_key} contain NaN or inf")
            stats.append((mu.astype(np.float64), sigma.astype(np.float64)))
    return stats


def cache_path(ref_path, weights_sha256):
    """Where the reference activations for these weights are cached: beside the reference file."""
    return f"{os.path.splitext(ref_path)[0]}.inception-{weights_sha256[:8]}.npz"


def with_npz_stats(feats, path):
    """feats with the statistics an ADM npz at path precomputes (mu, sigma; mu_s, sigma_s), where it
    has them."""
    pool_stats, spatial_stats = read_npz_stats(path)
    return dataclasses.replace(feats, pool_stats=pool_stats or feats.pool_stats,
                               spatial_stats=spatial_stats or feats.spatial_stats)


def features_of(model, image_set, batch_size=64, workers=4, device="cpu", rank=0, world=1):
    """Features of every image of the set; under torchrun each rank runs the network on its share.
    """
    batches = image_set.batches(batch_size, workers, rank, world)
    total = image_set.n_batches(batch_size, rank, world)
    return extract_features(model, batches, device, total, world)


def reference_features(
    model, ref, weights_sha256, batch_size=64, workers=4, device="cpu", cache=True, rank=0, world=1
):
    """The reference's Features, with ADM's precomputed statistics where REF holds them.

    The pool3 rows (for precision/recall) and the statistics of the images are cached beside REF
    once per Inception weights, and recomputed when REF's size or mtime changes.
    """
    path = cache_path(ref.path, weights_sha256)
    stat = os.stat(ref.path)
    key = np.array([stat.st_size, stat.st_mtime_ns], np.int64)
    feats = None
    if cache and os.path.exists(path):
        with np.load(path) as c:
            if np.array_equal(c["key"], key) and c["pool"].shape == (len(ref), POOL_DIM):
                feats = Features(torch.from_numpy(c["pool"]), None, (c["mu"], c["sigma"]),
                                 (c["mu_s"], c["sigma_s"]))
    if feats is None:
        feats = features_of(model, ref, batch_size, workers, device, rank, world)
        if cache and rank == 0:
            arrays = dict(
                key=key,
                pool=feats.pool.numpy(),
                mu=feats.pool_stats[0],
                sigma=feats.pool_stats[1],
                mu_s=feats.spatial_stats[0],
                sigma_s=feats.spatial_stats[1],
            )
            try:
                write_atomic(path, lambda f: np.savez(f, **arrays))
            # a read-only reference folder only costs a recomputation next time
            except OSError as err:
                print(f"fid.py: warning: cannot write cache {path}: {err}", file=sys.stderr)
    return with_npz_stats(feats, ref.path)


def score(ref, samples, device="cpu", is_split=5000, pr_block=10000, pr_fp16=True, fid_route="eigh",
          ref_factors=(None, None)):
    """Inception Score, FID, sFID, precision and recall of samples against ref (both Features).

    ref_factors: covariance_factor of ref's pool and spatial covariances, to
    reuse across evaluations.
    """
    precision, recall = precision_recall(
        ref.pool.to(device), samples.pool.to(device), 3, pr_block, pr_fp16
    )
    probs = torch.softmax(samples.logits.double(), 1).numpy()  # (N, 1008)
    return {
        "inception_score": inception_score(probs, is_split),
        "fid": fid_from_stats(
            *samples.pool_stats, *ref.pool_stats, route=fid_route, factor2=ref_factors[0]
        ),
        "sfid": fid_from_stats(
            *samples.spatial_stats, *ref.spatial_stats, route=fid_route, factor2=ref_factors[1]
        ),
        "precision": precision,
        "recall": recall,
    }


class Evaluator:
    """The evaluation against one reference, kept for many sample sets (train.py --eval-every): the
    network, the reference's features and its covariance factors are computed once."""

    def __init__(
        self, ref_path, weights=None, sha256=WEIGHTS_SHA256, device="cpu", rank=0, world=1
    ):
        self.device, self.rank = device, rank
        self.model, self.digest = load_inception(weights, sha256, device)
        if self.digest != WEIGHTS_SHA256 and rank == 0:
            print(f"fid.py: warning: NOT PRETRAINED: {weights} is not ADM's Inception (sha256 "
                  f"{self.digest[:16]}...): FIDs are not comparable", file=sys.stderr)
        self.ref = reference_features(self.model, ImageSet(ref_path), self.digest, device=device,
                                      rank=rank, world=world)
        self.factors = None

    def __call__(self, batches, total=None, world=1):
        """The five numbers of the images in batches (this rank's share, as ImageSet.batches
        splits them), on rank 0; None on the other ranks."""
        feats = extract_features(self.model, batches, self.device, total, world)
        if self.rank > 0:
            return None
        if self.factors is None:
            self.factors = tuple(
                covariance_factor(s[1]) for s in (self.ref.pool_stats, self.ref.spatial_stats)
            )
        return score(self.ref, feats, self.device, ref_factors=self.factors)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def at_least(low):
    """argparse type: an int >= low."""

    def parse(text):
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "int"  # argparse's "invalid int value" for non-numbers
    return parse


def parse_args(argv=None):
    """Command-line arguments (argv=None reads sys.argv)."""
    p = argparse.ArgumentParser(
        prog="fid.py",
        description="ADM-compatible FID / sFID / IS / precision-recall "
                    "(python fid.py REF.npz SAMPLES).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="REF.npz and SAMPLES (npz with arr_0, or a folder of images, read recursively); with "
             "--write-ref, the one image source",
    )
    p.add_argument(
        "--write-ref", metavar="OUT.npz",
        help="instead of evaluating, write an ADM reference batch from PATH: arr_0 and "
             "mu/sigma/mu_s/sigma_s",
    )
    p.add_argument(
        "--ref-images", type=at_least(1), default=10000,
        help="images kept as arr_0 by --write-ref (ADM: 10000)",
    )
    p.add_argument(
        "--seed", type=at_least(0), default=0,
        help="seed of the random arr_0 subset chosen by --write-ref",
    )
    p.add_argument("--out", help="JSON results path; unset: SAMPLES with .eval.json")
    p.add_argument(
        "--weights",
        help=f"Inception weights file; unset: {os.path.basename(WEIGHTS_URL)} in the current "
        "folder, else the torch.hub cache, downloaded if missing",
    )
    p.add_argument(
        "--weights-sha256", default=WEIGHTS_SHA256,
        help="expected sha256 (or prefix) of the weights file; '' skips the check, to evaluate "
        "with another file (a stand-in; the numbers are then not ADM's)",
    )
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    p.add_argument(
        "--batch-size", type=at_least(1), default=64, help="images per Inception forward (ADM: 64)"
    )
    p.add_argument(
        "--workers", type=at_least(1), default=min(8, os.cpu_count() or 1),
        help="threads decoding PNGs",
    )
    p.add_argument(
        "--min-images", type=at_least(4), default=2048,
        help="refuse image sets smaller than this (below 2048 the pool3 covariance is singular)",
    )
    p.add_argument(
        "--fid-route", choices=FID_ROUTES, default="eigh",
        help="FID's tr sqrt(sigma1 sigma2): eigh (symmetric eigensolver, falls back to sqrtm on "
             "bad eigenvalues) or sqrtm (ADM's evaluator exactly: scipy.linalg.sqrtm of the "
             "product; far slower)",
    )
    p.add_argument(
        "--is-split", type=at_least(1), default=5000, help="Inception Score split size (ADM: 5000)"
    )
    p.add_argument(
        "--pr-block", type=at_least(1), default=10000,
        help="rows/columns per distance block (ADM: 10000)",
    )
    p.add_argument(
        "--pr-fp16", type=int, choices=(0, 1), default=1,
        help="1: precision/recall distances in fp16 like ADM (matches its published P/R); 0: fp32",
    )
    p.add_argument(
        "--cache", type=int, choices=(0, 1), default=1,
        help="1: read/write reference activations beside REF.npz",
    )
    return p.parse_args(argv)


def _open_sets(args, count):
    """Open and validate the `count` positional image sets before any expensive work."""
    if len(args.paths) != count:
        usage = "--write-ref OUT.npz IMAGES" if count == 1 else "REF.npz SAMPLES"
        raise ValueError(f"expected {usage}, got {len(args.paths)} path(s)")
    sets = [ImageSet(path) for path in args.paths]
    for image_set in sets:
        if len(image_set) < args.min_images:
            raise ValueError(f"{image_set.path} has {len(image_set)} images, fewer than "
                             f"--min-images {args.min_images}")
        if image_set.is_npz:
            # bad precomputed statistics fail before the network loads
            read_npz_stats(image_set.path)
    return sets


def write_reference(args, rank=0, world=1):
    """Build an ADM reference batch: stats over every image of the source, arr_0 a seeded random
    subset."""
    (source,) = _open_sets(args, 1)
    check_output(args.write_ref, "--write-ref")
    keep = np.sort(np.random.default_rng(args.seed).choice(
        len(source), min(args.ref_images, len(source)), False))
    model, _ = load_inception(args.weights, args.weights_sha256, args.device)
    kept = []  # per batch of this rank's share, its images chosen for arr_0

    def keeping(batches):
        """Pass this rank's batches through, setting aside the images chosen for arr_0."""
        for index, batch in zip(range(rank, source.n_batches(args.batch_size), world), batches):
            start = index * args.batch_size
            kept.append(batch[keep[(keep >= start) & (keep < start + len(batch))] - start])
            yield batch

    batches = keeping(source.batches(args.batch_size, args.workers, rank, world))
    feats = extract_features(
        model, batches, args.device, source.n_batches(args.batch_size, rank, world), world
    )
    if world > 1:
        shares = [None] * world if rank == 0 else None
        dist.gather_object(kept, shares, dst=0)
        if rank > 0:
            return None
        # rank r's k-th batch is batch k * world + r: interleaving the shares restores
        # the source's order
        kept = [
            part for parts in itertools.zip_longest(*shares) for part in parts if part is not None
        ]
    arrays = dict(arr_0=np.concatenate(kept), mu=feats.pool_stats[0], sigma=feats.pool_stats[1])
    arrays.update(mu_s=feats.spatial_stats[0], sigma_s=feats.spatial_stats[1])
    save_checked(args.write_ref, lambda f: np.savez(f, **arrays),
                 sum(a.nbytes for a in arrays.values()) + (1 << 20))  # + zip headers
    print(f"wrote {args.write_ref}: arr_0 {arrays['arr_0'].shape}, statistics over "
          f"{len(source)} images")
    return {"path": args.write_ref, "arr_0": len(keep), "stats_images": len(source)}


def evaluate(args, rank=0, world=1):
    """Evaluate SAMPLES against REF: print the five numbers, write them as JSON, and return them
    (rank 0)."""
    ref, samples = _open_sets(args, 2)
    if not ref.is_npz:
        raise ValueError(
            f"REF must be an ADM npz (build one with --write-ref), got folder {ref.path}"
        )
    stem = os.path.splitext(samples.path)[0] if samples.is_npz else os.path.normpath(samples.path)
    out = args.out or stem + ".eval.json"
    if rank == 0:
        check_output(out, "--out")  # before hours of features, not after
    model, digest = load_inception(args.weights, args.weights_sha256, args.device)
    io = dict(
        batch_size=args.batch_size, workers=args.workers, device=args.device, rank=rank, world=world
    )
    ref_feats = reference_features(model, ref, digest, cache=args.cache, **io)
    sample_feats = features_of(model, samples, **io)
    if samples.is_npz:  # ADM also takes precomputed statistics from the sample file
        sample_feats = with_npz_stats(sample_feats, samples.path)
    if rank > 0:  # the metrics are cheap next to the network: rank 0 computes them alone
        return None
    results = score(
        ref_feats, sample_feats, args.device, args.is_split, args.pr_block, args.pr_fp16,
        args.fid_route,
    )
    results.update(ref=ref.path, samples=samples.path, num_ref=len(ref), num_samples=len(samples),
                   weights_sha256=digest, fid_route=args.fid_route, pr_fp16=bool(args.pr_fp16),
                   is_split=args.is_split)
    stored = read_npz_stats(ref.path)[0] is not None  # ADM's batches carry their mu and sigma
    results["ref_stats"] = "npz mu/sigma" if stored else f"{len(ref)} images"
    print(f"{len(samples)} samples ({samples.path}) against the reference {ref.path} (FID "
          f"statistics: {'its stored mu/sigma' if stored else f'its {len(ref)} images'}; "
          f"{len(ref)} images for precision/recall)")
    for label, key in (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid")):
        print(f"{label}: {results[key]}")
    print(f"Precision: {results['precision']}\nRecall: {results['recall']}")
    text = json.dumps(results, indent=2).encode() + b"\n"
    save_checked(out, lambda f: f.write(text), len(text))
    return results


def init_distributed(device):
    """(rank, world size, device): torchrun's environment (nccl and one GPU per rank, or gloo on
    CPU), else (0, 1)."""
    device = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, device
    cuda = device.type == "cuda"
    if cuda and device.index is None:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if cuda:
        torch.cuda.set_device(device)
    # a rank may wait
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size(), device


def main(args):
    """Run the command (under torchrun, sharded over ranks); bad input ends in a one-line error and
    exit status 1."""
    world = 1
    try:
        rank, world, args.device = init_distributed(args.device)
        return write_reference(args, rank, world) if args.write_ref else evaluate(args, rank, world)
    except (ValueError, OSError) as err:
        raise SystemExit(f"fid.py: error: {err}") from err
    except KeyboardInterrupt:  # Ctrl-C: the reference cache, once written, is kept
        print("\nfid.py: interrupted before the results were written; run the same command "
              "again (the reference activations, if cached, are reused)", file=sys.stderr)
        raise SystemExit(130) from None  # the shell's "interrupted"
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
