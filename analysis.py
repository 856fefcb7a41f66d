r"""What alignment does to a SiT's representation: REPA's CKNNA and linear probe, SARA Fig. 2,
SRA^2 Fig. 2.

    python analysis.py --ckpt runs/x/checkpoints/0400000.pt --data-dir data/imagenet256 \
        --out analysis/x
    torchrun --nproc_per_node 8 analysis.py --ckpt last.pt --data-dir data/imagenet256 \
        --num-images 50000 --out a/x
    python analysis.py --ckpt tiny.pt --data-dir synthetic --enc-type tiny-random \
        --num-images 64 --out /tmp/a    # CPU

Features: each image's SD-VAE latent x0 is noised with the training interpolant at every --t (fixed
per-image noise, the null class as REPA's authors do, so no label leaks in); forward hooks on
model.blocks record the hidden state after every block, the model returns the projector output at
the tap; the frozen encoder sees the clean image.
Mean-pooled features of every image go to memory-mapped files under --out (each torchrun rank
writes its share, so the ranks must see the same --out); the token-level Gram matrices for the
spectra are accumulated on the fly, so memory stays bounded at 50k images.
Then rank 0 computes, and writes analysis.json plus one PNG per figure:
  cknna.png         CKNNA (Huh et al. 2024, k=10) of every SiT block vs the encoder, one curve
                    per t (REPA Fig. 2/3)
  linear_probe.png  top-1 of a BatchNorm + Linear probe per block on a held-out split
                    (REPA Table 2, issue #32)
  sara_fig2a.png    rows of the token autocorrelation A(h) (SARA eq. 7): encoder, SiT tap, projector
  sara_fig2b.png    singular-value energy of the (images x tokens, D) representation; top-50
                    share (SARA Fig. 2b)
  sra2_fig2.png     PCA to RGB of the VAE latent and of SiT block features across blocks and t
                    (SRA^2 Fig. 2)
References: Huh et al., "The Platonic Representation Hypothesis" (ICML 2024); REPA
(arXiv 2410.06940); SARA (arXiv 2503.08253); SRA^2 (arXiv 2601.17830).
"""

import argparse
import functools
import json
import logging
import math
import os
import shutil

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import cluster
import losses
import runs
from cluster import UserError, at_least, fraction, positive, ranged, write_atomic
from data import SYNTHETIC, LatentImageDataset, SyntheticDataset
from encoders import TINY_RANDOM, load_encoders, sample_latent
from sample import sample_seed

log = logging.getLogger("analysis")
TOPK = 10  # CKNNA neighbours (Huh et al. and REPA)
CLAMP_QUANTILE = 0.95  # Huh et al.'s outlier clamp
CKNNA_EPS = 1e-6  # added to the denominator, as the authors' code does
TOP_SINGULAR = 50  # SARA Fig. 2b
SPECTRUM_POINTS = 128  # singular values kept in the JSON and the figure
# SARA Fig. 2a reference patches (row, col) as fractions of the grid
REF_PATCHES = ((0.5, 0.5), (0.15, 0.15))


# ----------------------------------------------------------------------------------------------
# CKNNA: mutual k-nearest-neighbour kernel alignment (Huh et al. 2024, the metric of REPA
# Fig. 2 and 3), exactly as the authors' code computes it, in O(N k) memory once every row's
# neighbours are known.


def clamp_outliers(x, q=CLAMP_QUANTILE, chunk=4096):
    """Huh et al.'s preprocessing before the metric (not part of it): x (N, D) clipped
    elementwise to +-q_val.

    q_val is the mean over rows of each row's q-quantile of |x| (their remove_outliers, default
    mode). We clamp each representation (one SiT block at one t, the encoder, ...) on its own; the
    authors' pipeline stacks all layers of a model into one tensor first, which at SiT's growing
    activation scale would clip late blocks hard.
    Returns (clamped x, q_val).
    """
    quantiles = [
        torch.quantile(x[i : i + chunk].abs().float(), q, dim=1) for i in range(0, len(x), chunk)
    ]
    # torch.quantile refuses > 16M elements: rows in chunks
    q_val = torch.cat(quantiles).mean().item()
    return x.clamp(-q_val, q_val), q_val


def neighbours(x, k=TOPK, block=1024):
    """Each row's k nearest other rows by cosine similarity: x (N, D) -> (indices (N, k),
    similarities (N, k)).

    Rows are L2-normalised, so the similarities are the entries of the kernel K = X X^T that CKNNA
    keeps. Computed in row blocks of the (N, N) kernel: memory O(block * N).
    """
    n = len(x)
    if not 4 <= n or k >= n:
        raise ValueError(f"CKNNA needs more than k={k} samples and at least 4, got {n}")
    x = F.normalize(x, dim=1)  # (N, D)
    idx, sim = [], []
    for start in range(0, n, block):
        rows = x[start:start + block] @ x.T  # (b, N) block of K
        b = len(rows)
        # the diagonal is never a neighbour
        rows[torch.arange(b), torch.arange(start, start + b)] = -math.inf
        s, i = rows.topk(k, dim=1)  # (b, k)
        idx.append(i), sim.append(s)
    return torch.cat(idx), torch.cat(sim)


def hsic_unbiased(rows, cols, a, b, m):
    """Unbiased HSIC (Song et al. 2012, eq. 5) of two m x m matrices A, B that are zero except on
    one shared set of off-diagonal entries (rows[e], cols[e]), where A = a[e] and B = b[e]:
    [sum(A o B^T) + sum(A) sum(B) / ((m-1)(m-2)) - 2 sum(A B) / (m-2)] / (m (m-3)).
    """
    a, b = a.double(), b.double()
    # entry (i, j) and its transpose (j, i) as one integer
    key, key_t = rows * m + cols, cols * m + rows
    order = key.argsort()
    pos = torch.searchsorted(key[order], key_t).clamp(max=len(key) - 1)
    hit = key[order][pos] == key_t  # (j, i) is in the support too
    trace = (a[hit] * b[order[pos[hit]]]).sum()  # sum_ij A_ij B_ji
    col_a = torch.zeros(m, dtype=a.dtype, device=a.device).index_add_(0, cols, a)  # 1^T A
    row_b = torch.zeros(m, dtype=b.dtype, device=b.device).index_add_(0, rows, b)  # B 1
    return (trace + a.sum() * b.sum() / ((m - 1) * (m - 2)) - 2 * (col_a @ row_b) / (m - 2)) / (
        m * (m - 3)
    )


def cknna_from_neighbours(nx, ny):
    """CKNNA of two representations from their neighbours() (indices, similarities), each (N, k).

    HSIC_u(M o K, M o L) / (sqrt(HSIC_u(M_K o K, M_K o K) HSIC_u(M_L o L, M_L o L)) + 1e-6), where
    M_K keeps each row's k nearest neighbours under K, M_L under L, and M = M_K o M_L the
    neighbours they share.
    """
    (idx_x, sim_x), (idx_y, sim_y) = nx, ny
    m = len(idx_x)
    rows = torch.arange(m, device=idx_x.device)[:, None].expand_as(idx_x)  # (N, k)
    match = idx_x[:, :, None] == idx_y[:, None, :]  # (N, k, k): X's neighbour slot s is Y's slot u
    mutual = match.any(dim=2)  # (N, k): X's neighbour is also one of Y's
    sim_y_at_x = (match * sim_y[:, None, :]).sum(dim=2)  # (N, k): L at X's neighbour slots
    kl = hsic_unbiased(rows[mutual], idx_x[mutual], sim_x[mutual], sim_y_at_x[mutual], m)
    kk = hsic_unbiased(rows.flatten(), idx_x.flatten(), sim_x.flatten(), sim_x.flatten(), m)
    ll = hsic_unbiased(rows.flatten(), idx_y.flatten(), sim_y.flatten(), sim_y.flatten(), m)
    return (kl / (torch.sqrt(kk * ll) + CKNNA_EPS)).item()


def cknna(x, y, k=TOPK):
    """CKNNA of features x (N, D) and y (N, D'), one row per sample (e.g. mean-pooled tokens); rows
    L2-normalised."""
    return cknna_from_neighbours(neighbours(x, k), neighbours(y, k))


# ----------------------------------------------------------------------------------------------
# Linear probe (REPA Table 2; the protocol its authors give in REPA issue #32)


def linear_probe(x, labels, num_classes, holdout=0.2, epochs=30, lr=1e-3, batch_size=1024, seed=0):
    """Top-1 accuracy on a held-out split of BatchNorm1d (no affine, MAE's recipe) + Linear trained
    on x (N, D).

    No augmentation; the split and the training order are fixed by seed. Adam with
    a cosine schedule.
    """
    n = len(x)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    n_test = min(max(1, round(holdout * n)), n - 1)
    test, train = perm[:n_test].to(x.device), perm[n_test:].to(x.device)
    with torch.random.fork_rng(devices=[]):  # the same probe every time, global RNG untouched
        torch.manual_seed(seed)
        probe = nn.Sequential(
            nn.BatchNorm1d(x.shape[1], affine=False, eps=1e-6), nn.Linear(x.shape[1], num_classes)
        )
        nn.init.trunc_normal_(probe[1].weight, std=0.01)  # MAE's head init
        nn.init.zeros_(probe[1].bias)
    probe = probe.to(x.device)
    batch_size = min(batch_size, len(train))
    steps = epochs * math.ceil(len(train) / batch_size)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=gen).to(x.device)]
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            if len(batch) < 2:  # BatchNorm needs two samples to normalise
                continue
            loss = F.cross_entropy(probe(x[batch]), labels[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    probe.eval()
    with torch.no_grad():
        return (probe(x[test]).argmax(dim=1) == labels[test]).float().mean().item()


# ----------------------------------------------------------------------------------------------
# Singular-value energy (SARA Fig. 2b), from the D x D Gram matrix accumulated over batches


def spectrum(gram):
    """Energy share s_i^2 / sum_j s_j^2 of each singular value of R, largest first, from gram = R^T
    R (D, D)."""
    # (D,) squared singular values
    energy = torch.linalg.eigvalsh(gram.double()).flip(0).clamp_min(0)
    return energy / energy.sum()


def top_energy_share(gram, top=TOP_SINGULAR):
    """sum_{i<=top} s_i^2 / sum_i s_i^2 of the stacked (images x tokens, D) representation R, gram =
    R^T R."""
    return spectrum(gram)[:top].sum().item()


# ----------------------------------------------------------------------------------------------
# Features: SiT hidden states through forward hooks on model.blocks


def image_noise(indices, shape):
    """Per-image (eps for the VAE posterior sample, eps of the interpolant), each (B, C, h, w),
    fixed by the index."""
    gens = [torch.Generator().manual_seed(sample_seed(0, i)) for i in indices]
    eps_x0 = torch.cat([torch.randn(1, *shape, generator=g) for g in gens])  # (B, C, h, w)
    eps = torch.cat([torch.randn(1, *shape, generator=g) for g in gens])  # (B, C, h, w)
    return eps_x0, eps


@torch.no_grad()
def sit_features(model, x0, eps, t, y, path="linear", keep=(), use_labels=False):
    """SiT at time t on x_t = alpha_t x0 + sigma_t eps (the training interpolant) with the null
    class unless use_labels.

    Returns (mean-pooled hidden state after every block (depth, B, H), {block: full tokens
    (B, N, H)} for the 1-indexed blocks in keep, projector outputs at the tap: per encoder
    (B, N, D_enc)).
    """
    b = len(x0)
    ts = torch.full((b,), float(t), device=x0.device)  # (B,)
    alpha, sigma, _, _ = (c.view(-1, 1, 1, 1) for c in losses.interpolant(ts, path))  # (B, 1, 1, 1)
    pooled, kept = [], {}

    def record(i, module, inputs, output):
        """Hook on block i: the residual stream after it."""
        pooled.append(output.float().mean(dim=1))  # (B, H)
        if i in keep:
            kept[i] = output.float()  # (B, N, H)

    hooks = [
        blk.register_forward_hook(functools.partial(record, i))
        for i, blk in enumerate(model.blocks, start=1)
    ]
    try:
        drop = torch.full((b,), not use_labels, device=x0.device)  # (B,) True: the null class
        out = model(alpha * x0 + sigma * eps, ts, y, drop=drop)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(pooled), kept, [z.float() for z in out.h_dens]


def batch_features(model, encoder, batch, indices, args, device, keep=()):
    """Everything analysed for one batch: encoder tokens, x0, and per t the SiT features
    (see sit_features)."""
    images, moments, labels = (x.to(device) for x in batch)
    eps_x0, eps = (
        e.to(device) for e in image_noise(indices, (model.in_channels, *moments.shape[-2:]))
    )
    x0 = sample_latent(moments, eps_x0)  # (B, C, h, w) the scaled clean latent training noises
    enc = encoder(images).float()  # (B, N_enc, D_enc) on the clean image
    per_t = [
        sit_features(model, x0, eps, t, labels, args.path_type, keep, args.use_labels)
        for t in args.t
    ]
    return enc, x0, labels, per_t


# ----------------------------------------------------------------------------------------------
# Streaming pass: pooled features to memory-mapped files, token Gram matrices in memory


def t_key(t):
    """JSON / file key of a time t."""
    return f"{t:g}"


class FeatureStore:
    """Mean-pooled features of all N images in .npy memmaps under folder, written row by row by
    every rank."""

    def __init__(self, folder, n, depth, hidden, enc_dim, ts, projector, create):
        shapes = {"labels": ((n,), np.int64), "encoder": ((n, enc_dim), np.float32)}
        for t in ts:
            # block-major: each block contiguous
            shapes[f"blocks_t{t_key(t)}"] = ((depth, n, hidden), np.float32)
            if projector:
                shapes[f"projector_t{t_key(t)}"] = ((n, enc_dim), np.float32)
        os.makedirs(folder, exist_ok=True)
        self.arrays = {
            name: np.lib.format.open_memmap(
                os.path.join(folder, f"{name}.npy"),
                mode="w+" if create else "r+",
                dtype=dtype,
                shape=shape,
            )
            for name, (shape, dtype) in shapes.items()
        }

    def __getitem__(self, name):
        return self.arrays[name]

    def flush(self):
        for a in self.arrays.values():
            a.flush()


def gram(tokens):
    """(B, N, D) tokens -> (D, D) float64 Gram matrix R^T R of their rows (an fp32 product per
    batch)."""
    r = tokens.flatten(0, 1).float()  # (B N, D)
    return (r.T @ r).double()


def extract(model, encoder, dataset, args, store, rank, world, device):
    """This rank's share of the first --num-images images into store; returns the all-reduced token
    Gram matrices."""
    indices = list(range(args.num_images))[rank::world]
    loader = DataLoader(
        Subset(dataset, indices), batch_size=args.batch_size, num_workers=args.num_workers
    )
    grams = {}

    def add(name, tokens):
        """Accumulate one representation's token Gram matrix."""
        g = gram(tokens)
        grams[name] = grams[name] + g if name in grams else g

    tap, proj = model.encoder_depth, args.projector
    bar = tqdm(total=len(indices), desc=f"features (rank 0 of {world})", disable=rank != 0,
               dynamic_ncols=True)
    for start, batch in zip(range(0, len(indices), args.batch_size), loader):
        rows = np.array(indices[start:start + args.batch_size])
        enc, _, labels, per_t = batch_features(
            model, encoder, batch, rows.tolist(), args, device, keep=(tap,)
        )
        store["labels"][rows] = labels.cpu().numpy()
        store["encoder"][rows] = enc.mean(dim=1).cpu().numpy()
        add("encoder", enc)
        for t, (pooled, kept, zs) in zip(args.t, per_t):
            store[f"blocks_t{t_key(t)}"][:, rows] = pooled.cpu().numpy()
            add(f"tap_t{t_key(t)}", kept[tap])
            if proj is not None:
                store[f"projector_t{t_key(t)}"][rows] = zs[proj].mean(dim=1).cpu().numpy()
                add(f"projector_t{t_key(t)}", zs[proj])
        bar.update(len(rows))
    bar.close()
    store.flush()
    for name in sorted(grams):  # every rank holds the same names in the same order
        if world > 1:
            torch.distributed.all_reduce(grams[name])
    return grams


# ----------------------------------------------------------------------------------------------
# Metrics over the stored features (rank 0)


def compute_metrics(store, grams, args, depth, num_classes, device):
    """Every number of analysis.json except the figures' own: CKNNA, linear probes, spectra, clamp
    values."""
    labels = torch.from_numpy(np.asarray(store["labels"])).to(device)
    probe = functools.partial(
        linear_probe, labels=labels, num_classes=num_classes, holdout=args.probe_holdout,
        epochs=args.probe_epochs, lr=args.probe_lr, batch_size=args.probe_batch_size,
    )
    proj = args.projector is not None
    todo = 1 + len(args.t) * (depth + proj)
    bar = tqdm(total=todo, desc="CKNNA and probes", dynamic_ncols=True)

    def analyse(array):
        """(CKNNA neighbours of the clamped features, clamp value, probe top-1) of one (N, D)
        representation."""
        x = torch.from_numpy(np.asarray(array)).to(device)  # (N, D)
        clamped, q_val = clamp_outliers(x)
        result = neighbours(clamped), q_val, probe(x) if args.probe else None
        bar.update(1)
        return result

    enc_nn, enc_q, enc_top1 = analyse(store["encoder"])
    out = {
        "cknna": {},
        "linear_probe": {"encoder": enc_top1, "chance": 1 / num_classes},
        "clamp_q_val": {"encoder": enc_q},
    }
    # The encoder against itself: 1 but for the authors' 1e-6 in the denominator, which weighs more
    # as N grows (the masked HSICs shrink like k / N); every score above is biased down by about
    # the same factor.
    out["cknna_ceiling"] = cknna_from_neighbours(enc_nn, enc_nn)
    for t in args.t:
        k = t_key(t)
        rows = [analyse(store[f"blocks_t{k}"][b]) for b in range(depth)]
        out["cknna"][k] = {"blocks": [cknna_from_neighbours(r[0], enc_nn) for r in rows]}
        out["linear_probe"][k] = {"blocks": [r[2] for r in rows]}
        out["clamp_q_val"][k] = {"blocks": [r[1] for r in rows]}
        if proj:
            p_nn, p_q, p_top1 = analyse(store[f"projector_t{k}"])
            out["cknna"][k]["projector"] = cknna_from_neighbours(p_nn, enc_nn)
            out["linear_probe"][k]["projector"] = p_top1
            out["clamp_q_val"][k]["projector"] = p_q
    bar.close()
    out["svd_energy"] = {
        name: {
            f"top{TOP_SINGULAR}_share": top_energy_share(g),
            "spectrum": spectrum(g)[:SPECTRUM_POINTS].tolist(),
        }
        for name, g in sorted(grams.items())
    }
    return out


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib, imported where needed so the metrics never need it)


def save_figure(fig, path):
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=80))
    plt.close(fig)


def pyplot():
    """matplotlib.pyplot on the non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(metrics, key, ylabel, title, tap, path, reference=None):
    """One curve per t of metrics[key][t]['blocks'] over the blocks; the projector as a marker at
    the tap."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    # skip 'encoder', 'chance'
    curves = {t: row for t, row in metrics[key].items() if isinstance(row, dict)}
    depth = len(next(iter(curves.values()))["blocks"])
    for t, row in curves.items():
        line, = ax.plot(range(1, depth + 1), row["blocks"], marker="o", ms=3, label=f"t = {t}")
        if row.get("projector") is not None:
            ax.plot([tap], [row["projector"]], marker="*", ms=12, color=line.get_color(), ls="none")
    ax.axvline(tap, color="grey", ls=":", lw=1, label=f"tap (block {tap}); * projector")
    if reference is not None:
        ax.axhline(reference[1], color="black", ls="--", lw=1, label=reference[0])
    ax.set(
        xlabel="SiT block", ylabel=ylabel, title=title,
        xticks=range(1, depth + 1, max(1, depth // 14)),
    )
    ax.legend(fontsize=7)
    save_figure(fig, path)


def grid_position(n_tokens, frac):
    """Token index of the (row, col) fraction on a sqrt(N) x sqrt(N) grid, and the grid size."""
    g = math.isqrt(n_tokens)
    r, c = (min(int(f * g), g - 1) for f in frac)
    return r * g + c, g, (r, c)


def plot_autocorrelation(images, columns, path):
    """SARA Fig. 2a: per image and reference patch, that patch's row of A(h) (SARA eq. 7)
    over the image.

    columns: list of (title, tokens (B, N, D)); each representation on its own token grid.
    """
    plt = pyplot()
    rows = [(i, frac) for i in range(len(images)) for frac in REF_PATCHES]
    fig, axes = plt.subplots(len(rows), 1 + len(columns),
                             figsize=(1.3 * (1 + len(columns)), 1.3 * len(rows)), squeeze=False,
                             layout="constrained")
    size = images.shape[-1]
    for r, (i, frac) in enumerate(rows):
        axes[r, 0].imshow(images[i].permute(1, 2, 0).cpu().numpy())
        for c, (title, tokens) in enumerate(columns, start=1):
            ref, g, (pr, pc) = grid_position(tokens.shape[1], frac)
            # the reference patch's row of A(h) as a (g, g) map
            heat = losses.autocorrelation(tokens[i:i + 1])[0, ref].reshape(g, g).cpu().numpy()
            ax = axes[r, c]
            ax.imshow(images[i].permute(1, 2, 0).cpu().numpy())
            ax.imshow(heat, cmap="jet", alpha=0.55, vmin=-1, vmax=1, extent=(0, size, size, 0),
                      interpolation="nearest")
            cell = size / g
            ax.add_patch(
                plt.Rectangle((pc * cell, pr * cell), cell, cell, fill=False, color="black", lw=1.5)
            )
            if r == 0:
                ax.set_title(title, fontsize=7)
    axes[0, 0].set_title("image", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("SARA Fig. 2a: autocorrelation row of the outlined reference patch "
                 "(cosine, -1 blue .. 1 red)", fontsize=8)
    save_figure(fig, path)


def plot_spectra(svd, path):
    """SARA Fig. 2b: normalised singular-value energy of each representation, top-50 share in the
    legend."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    for name, s in svd.items():
        ax.plot(range(1, len(s["spectrum"]) + 1), s["spectrum"],
                label=f"{name}: top-{TOP_SINGULAR} {100 * s[f'top{TOP_SINGULAR}_share']:.1f}%")
    ax.axvline(TOP_SINGULAR, color="grey", ls=":", lw=1)
    ax.set(xlabel="singular value index", ylabel="s_i^2 / sum s^2", yscale="log",
           title="SARA Fig. 2b: energy of the (images x tokens, D) representation")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def pca_rgb(maps):
    """PCA of token maps (B, N, D) jointly over the images -> RGB (B, g, g, 3) in [0, 1], explained
    variance (3,)."""
    b, n, d = maps.shape
    x = maps.reshape(b * n, d).double()
    x = x - x.mean(dim=0)
    _, s, v = torch.linalg.svd(x, full_matrices=False)
    k = min(3, v.shape[0])
    proj = x @ v[:k].T  # (B N, k)
    proj = (proj - proj.min(dim=0).values) / (
        proj.max(dim=0).values - proj.min(dim=0).values
    ).clamp_min(1e-12)
    # fewer than 3 channels: black ones
    rgb = torch.cat([proj, proj.new_zeros(b * n, 3 - k)], dim=1)
    g = math.isqrt(n)
    return rgb.reshape(b, g, g, 3).float().cpu().numpy(), (s[:k] ** 2 / (s**2).sum()).tolist()


def plot_pca(images, x0, per_t, blocks, ts, path):
    """SRA^2 Fig. 2: per image, the VAE latent and SiT blocks at each t, PCA to RGB; returns
    explained variances."""
    plt = pyplot()
    vae_rgb, vae_var = pca_rgb(x0.flatten(2).transpose(1, 2))  # latent pixels as tokens (B, h w, C)
    panels = {(t, blk): pca_rgb(kept[blk]) for t, (_, kept, _) in zip(ts, per_t) for blk in blocks}
    n_img, cols = len(images), 1 + len(blocks)
    fig, axes = plt.subplots(n_img * (1 + len(ts)), cols,
                             figsize=(1.1 * cols, 1.1 * n_img * (1 + len(ts))), squeeze=False,
                             layout="constrained")
    for i in range(n_img):
        top = i * (1 + len(ts))
        axes[top, 0].imshow(images[i].permute(1, 2, 0).cpu().numpy())
        axes[top, 1].imshow(vae_rgb[i], interpolation="nearest")
        axes[top, 1].set_title("VAE latent", fontsize=7)
        for j, t in enumerate(ts, start=1):
            axes[top + j, 0].text(0.5, 0.5, f"t = {t_key(t)}", ha="center", va="center", fontsize=8)
            for c, blk in enumerate(blocks, start=1):
                axes[top + j, c].imshow(panels[(t, blk)][0][i], interpolation="nearest")
                if i == 0 and j == 1:
                    axes[top + j, c].set_title(f"block {blk}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
        if not ax.images and not ax.texts:
            ax.axis("off")
    fig.suptitle(
        "SRA^2 Fig. 2: PCA (3 components -> RGB) of VAE latents and SiT block features", fontsize=8
    )
    save_figure(fig, path)
    return {
        "vae": vae_var,
        **{t_key(t): {str(blk): panels[(t, blk)][1] for blk in blocks} for t in ts},
    }


def pca_blocks(depth, tap, count):
    """count block indices spread over 1..depth, always with the tap."""
    picks = {round(x) for x in np.linspace(1, depth, min(count, depth))} | (
        {tap} if 1 <= tap <= depth else set()
    )
    return sorted(picks)


def figures(model, encoder, dataset, metrics, args, device):
    """The five PNGs; returns the figures' own numbers (PCA explained variances)."""
    tap = model.encoder_depth
    plot_curves(
        metrics, "cknna", "CKNNA vs encoder", f"CKNNA (k={TOPK}) of SiT blocks vs {args.enc_type}",
        tap, os.path.join(args.out, "cknna.png"),
    )
    if args.probe:
        plot_curves(
            metrics, "linear_probe", "held-out top-1",
            "Linear probe (BatchNorm + Linear) per block", tap,
            os.path.join(args.out, "linear_probe.png"),
            reference=(f"encoder {args.enc_type}", metrics["linear_probe"]["encoder"]),
        )
    plot_spectra(metrics["svd_energy"], os.path.join(args.out, "sara_fig2b.png"))
    n = min(args.figure_images, args.num_images)
    blocks = pca_blocks(len(model.blocks), tap, args.pca_blocks)
    batch = [torch.stack(x) for x in zip(*(dataset[i] for i in range(n)))]
    enc, x0, _, per_t = batch_features(
        model, encoder, batch, list(range(n)), args, device, keep={*blocks, tap}
    )
    columns = [(f"encoder {args.enc_type}", enc)]
    for t, (_, kept, zs) in zip(args.t, per_t):
        columns.append((f"SiT block {tap}, t={t_key(t)}", kept[tap]))
        if args.projector is not None:
            columns.append((f"projector, t={t_key(t)}", zs[args.projector]))
    plot_autocorrelation(batch[0], columns, os.path.join(args.out, "sara_fig2a.png"))
    return {
        "pca_explained_variance": plot_pca(
            batch[0], x0, per_t, blocks, args.t, os.path.join(args.out, "sra2_fig2.png")
        )
    }


# ----------------------------------------------------------------------------------------------
# Setup


def build_dataset(args, resolution):
    """The REPA-layout dataset of --data-dir or the synthetic one, at the model's resolution."""
    if args.data_dir == SYNTHETIC:
        return SyntheticDataset(args.num_images, args.synthetic_classes, resolution, seed=0)
    try:
        dataset = LatentImageDataset(args.data_dir)
    except ValueError as e:
        raise UserError(str(e)) from e
    if dataset.resolution != resolution:
        raise UserError(
            f"{args.data_dir} holds {dataset.resolution} px images but the checkpoint's "
            f"SiT takes {resolution} px"
        )
    if args.num_images > len(dataset):
        raise UserError(f"--num-images {args.num_images} but {args.data_dir} holds {len(dataset)} "
                        "images; ask for fewer")
    return dataset


def setup(args, device):
    """Model, encoder, dataset and the resolved options (path, encoder, projector); records the
    random stand-ins."""
    args.ckpt = runs.resolve_ckpt(args.ckpt)[0] if os.path.isdir(args.ckpt) else args.ckpt
    ckpt = runs.read_checkpoint(args.ckpt)
    model = runs.build_model(ckpt, args.ckpt, args.weights)
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    args.path_type = model.config["path_type"]  # the training interpolant (linear if unrecorded)
    args.enc_type = (
        args.enc_type or config.get("enc_type") or getattr(ckpt.get("args"), "enc_type", None)
    )
    if args.enc_type is None:
        log.warning(
            "%s records no encoder and --enc-type is not given: using dinov2-vit-b (REPA's)",
            args.ckpt,
        )
        args.enc_type = "dinov2-vit-b"
    if not args.use_labels and model.y_embedder.embedding_table.num_embeddings <= model.num_classes:
        raise UserError("the model has no null class (trained without label dropout): "
                        "pass --use-labels 1")
    resolution = model.config["input_size"] * 8
    with cluster.failing(f"--enc-type {args.enc_type}"):
        encoders = load_encoders(args.enc_type, device, resolution, args.enc_weights)
    if len(encoders) != 1:
        raise UserError(f"--enc-type {args.enc_type}: analyse one encoder at a time (pick its "
                        "projector with --projector)")
    encoder = encoders[0]
    z_dims = model.config["z_dims"]
    if args.projector is None and z_dims:
        args.projector = 0
    if args.projector is not None and not 0 <= args.projector < len(z_dims):
        raise UserError(f"--projector {args.projector}: the model has {len(z_dims)} projectors")
    if args.projector is not None and z_dims[args.projector] != encoder.embed_dim:
        raise UserError(
            f"projector {args.projector} outputs {z_dims[args.projector]} dims but "
            f"{args.enc_type} gives {encoder.embed_dim}: pass the encoder the model was "
            "trained with (--enc-type)"
        )
    dataset = build_dataset(args, resolution)
    random_parts = [f"training run: {part}" for part in config.get("random_components", [])]
    random_parts += [f"data ({SYNTHETIC})"] if dataset.synthetic else []
    if getattr(dataset, "vae", None) == TINY_RANDOM:
        random_parts.append(f"data latents (VAE {TINY_RANDOM})")
    random_parts += [f"encoder ({encoder.name})"] if not encoder.pretrained else []
    for part in random_parts:
        log.warning(
            "NOT PRETRAINED: %s is a random or synthetic stand-in; these numbers mean nothing", part
        )
    return model.to(device), encoder, dataset, random_parts


def parse_args(argv=None):
    """Command-line options; checks that need no model happen here."""
    p = argparse.ArgumentParser(prog="analysis.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    count, flag = at_least(1), dict(type=int, choices=[0, 1])
    a("--ckpt", required=True,
      help="train.py checkpoint or run folder (its newest), official REPA checkpoint, or SiT "
           "state dict")
    a("--weights", choices=["ema", "model"], default="ema", help="which weights of the checkpoint")
    a("--data-dir", required=True, help=f"REPA-layout folder from data.py, or '{SYNTHETIC}'")
    a("--synthetic-classes", type=count, default=10, help="number of classes of the synthetic data")
    a("--num-images", type=at_least(TOPK + 1), default=10000,
      help=f"the first this many images of the dataset (CKNNA's k = {TOPK} needs more than {TOPK})")
    a("--t", type=fraction(), nargs="+", default=[0.25, 0.5, 0.75],
      help="times t in [0, 1] (t=1 is noise) to analyse the SiT at")
    a("--enc-type",
      help="encoder as train.py's --enc-type (default: the checkpoint's, else dinov2-vit-b)")
    a("--enc-weights", help="local encoder checkpoint instead of downloading (as train.py)")
    a("--projector", type=at_least(0),
      help="which projector matches --enc-type (default 0; none if the model has none)")
    a("--use-labels", **flag, default=0,
      help="1: condition on the true labels; 0: the null class, as REPA's authors (no label leaks)")
    a("--probe", **flag, default=1, help="0: skip the linear probes")
    a("--probe-holdout", type=ranged(float, "in (0, 1)", lambda v: 0 < v < 1), default=0.2,
      help="held-out fraction of the images for the probe's top-1")
    a("--probe-epochs", type=count, default=30, help="linear probe training epochs")
    a("--probe-lr", type=positive(), default=1e-3, help="linear probe Adam learning rate (cosine)")
    a("--probe-batch-size", type=count, default=1024, help="linear probe batch size")
    a("--figure-images", type=count, default=4,
      help="images in the SARA Fig. 2a and SRA^2 Fig. 2 figures")
    a("--pca-blocks", type=count, default=6,
      help="SiT blocks in the PCA figure (spread over the depth)")
    a("--batch-size", type=count, default=64, help="images per forward, per process")
    a("--num-workers", type=at_least(0), default=4, help="data loader workers per process")
    a("--out", required=True,
      help="output folder: analysis.json, the PNGs, features/ while running")
    a("--keep-features", **flag, default=0, help="1: keep the pooled features (out/features/*.npy)")
    a("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return p.parse_args(argv)


def main(args):
    """Extract features (sharded), then on rank 0: metrics, analysis.json and the figures;
    returns the JSON dict."""
    with cluster.main_errors("analysis.py"):
        return analyse(args)


def analyse(args):
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cluster.check_writable(args.out)  # before any network is built or image read
    rank, world, device = cluster.init(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # exact metrics
    if args.num_images < world:
        raise UserError(f"--num-images {args.num_images} is fewer than the {world} processes; "
                        "use fewer processes")
    model, encoder, dataset, random_parts = setup(args, device)
    depth, hidden = len(model.blocks), model.config["hidden_size"]
    folder = os.path.join(args.out, "features")
    store_args = (folder, args.num_images, depth, hidden, encoder.embed_dim, args.t,
                  args.projector is not None)
    if rank == 0:
        FeatureStore(*store_args, create=True).flush()
    cluster.barrier(world)  # the files exist before any rank opens them
    grams = extract(
        model, encoder, dataset, args, FeatureStore(*store_args, create=False), rank, world, device
    )
    cluster.barrier(world)  # every rank's rows are on disk
    result = None
    if rank == 0:
        store = FeatureStore(*store_args, create=False)
        metrics = compute_metrics(store, grams, args, depth, dataset.num_classes, device)
        metrics.update(figures(model, encoder, dataset, metrics, args, device))
        settings = {k: v for k, v in vars(args).items() if k not in ("device",)}
        result = {
            "settings": settings,
            "random_components": random_parts,
            "model_config": model.config,
            "tap_block": model.encoder_depth,
            "num_classes": dataset.num_classes,
            "world_size": world,
            **metrics,
        }
        text = json.dumps(result, indent=1).encode()
        write_atomic(os.path.join(args.out, "analysis.json"), lambda f: f.write(text))
        if not args.keep_features:
            shutil.rmtree(folder)
        print(f"wrote {os.path.join(args.out, 'analysis.json')} and the figures")
    cluster.close(world)
    return result


if __name__ == "__main__":
    main(parse_args())
