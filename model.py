"""SiT: a latent diffusion transformer with REPA / SARA projectors, an SRA^2 latent head and an SRA
self-alignment head.

Drop-in compatible with REPA's models/sit.py: same constructor keywords, same state_dict keys
(an official REPA checkpoint's "ema" dict loads with strict=True), same outputs. Read bottom-up:
helpers, embedders, block, final layer, alignment heads, the model, then the size table.
Time runs REPA's way: t=0 is data, t=1 is noise, and the raw t in [0, 1] goes into the embedder.
"""

import math
import re
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------
# Helpers


def modulate(x, shift, scale):
    """adaLN modulation: per-sample shift and scale broadcast over the tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (B, N, H)


def sincos_1d(dim, pos):
    """1D sin-cos embedding (MAE convention: sin half first) of positions pos -> (M, dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))  # (dim/2,)
    out = np.outer(pos.reshape(-1), omega)  # (M, dim/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, dim)


def sincos_2d(dim, grid_size):
    """Frozen 2D sin-cos position embedding: first half encodes the column (x), second the row."""
    cols, rows = np.meshgrid(
        np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)
    )
    # (G*G, dim)
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


def mlp(widths, act=nn.SiLU):
    """A per-token MLP Linear-act-...-Linear through the given widths (indices 0, 2, 4, ...)."""
    layers = []
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(w_in, w_out)] + ([act()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def unpatchify(x, patch_size, channels):
    """Tokens (B, N, p*p*C) -> image (B, C, H, W), tokens in row-major order."""
    b, n, _ = x.shape
    h = w = math.isqrt(n)
    x = x.reshape(b, h, w, patch_size, patch_size, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, h * patch_size, w * patch_size)


# ----------------------------------------------------------------------------------------------
# Embedders


class PatchEmbed(nn.Module):
    """Image to patch tokens with one strided conv (timm's PatchEmbed, same parameter names)."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        """(B, C, H, W) -> (B, N, hidden)."""
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar t -> vector: 256 [cos, sin] frequency features, then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def frequencies(t, dim, max_period=10000):
        """GLIDE sinusoidal features of (possibly fractional) t: (B,) -> (B, dim)."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)

    def forward(self, t):
        """(B,) raw t in [0, 1] (REPA; SiT's official code also feeds raw t) -> (B, hidden)."""
        return self.mlp(self.frequencies(t, self.freq_dim).to(t.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector; index num_classes is the null class used for CFG and label dropout."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, y, drop=None):
        """(B,) int labels -> (B, hidden); drop (B,) bool forces the null class
        (REPA's force_drop_ids).

        Without drop, training mode drops each label with dropout_prob from the global RNG, as REPA.
        """
        if drop is None and self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
        if drop is not None:
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)


# ----------------------------------------------------------------------------------------------
# Transformer block


class Attention(nn.Module):
    """Multi-head self-attention through torch's fused scaled_dot_product_attention kernels."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):
        """(B, N, H) -> (B, N, H)."""
        b, n, h = x.shape
        q, k, v = (
            self.qkv(x).reshape(b, n, 3, self.num_heads, h // self.num_heads).permute(2, 0, 3, 1, 4)
        )  # 3 x (B, heads, N, d)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return self.proj(x.transpose(1, 2).reshape(b, n, h))


class Mlp(nn.Module):
    """Transformer MLP with tanh-approximated GELU (names fc1 / fc2 as in timm)."""

    def __init__(self, hidden_size, mlp_hidden):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x):
        """(B, N, H) -> (B, N, H)."""
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning on c = t_emb + y_emb."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        """x (B, N, H), c (B, H) -> (B, N, H)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a Linear to p*p*C values per token (no learned sigma)."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        """x (B, N, H), c (B, H) -> (B, N, p*p*C)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------------------------
# Alignment heads (mmdit.py builds the same ones)


def check_taps(depth, **taps):
    """ValueError unless each head taps a block of the model (0: no such head)."""
    for name, tap in taps.items():
        if not 0 <= tap <= depth:
            raise ValueError(f"{name}={tap} must lie in [1, depth={depth}] (or 0 for no head)")


def projectors(hidden_size, projector_dim, z_dims):
    """REPA projector, one per encoder: H -> 2048 -> 2048 -> D_enc with SiLU (keys
    projectors.K.{0,2,4})."""
    return nn.ModuleList(mlp([hidden_size, projector_dim, projector_dim, z]) for z in z_dims)


def sra_head(hidden_size, patch_size, channels, layers=5, width=None):
    """SRA^2 head P(.): per-token MLP H -> width (2H unless given) x (layers-1) -> p*p*C, to be
    unpatchified to the latent."""
    width = width or 2 * hidden_size
    return mlp([hidden_size] + [width] * (layers - 1) + [patch_size**2 * channels])


def self_head(hidden_size):
    """SRA's student head (its SimpleHead): per-token H -> 2H -> H with SiLU, keys self_head.{0,2}.
    """
    return mlp([hidden_size, 2 * hidden_size, hidden_size])


def add_heads(model, hidden_size, z_dims, projector_dim, sra_depth, sra_mlp_layers, sra_hidden_dim,
              self_depth):
    """The alignment heads as model's submodules: a REPA projector per encoder in z_dims, the
    SRA^2 head and SRA's student head where their tap block is set (0: none). Registered in this
    order: seeded builds follow it."""
    model.projectors = projectors(hidden_size, projector_dim, z_dims)
    if sra_depth:
        model.sra_head = sra_head(hidden_size, model.patch_size, model.in_channels, sra_mlp_layers,
                                  sra_hidden_dim)
    if self_depth:
        model.self_head = self_head(hidden_size)


def read_taps(model, i, x, heads):
    """After block i, every head that taps it reads the raw residual stream x (B, N, H), before any
    norm, into heads (SiTOutput's fields by name). SiT and MMDiT (its image stream) alike."""
    if i == model.encoder_depth:
        heads["h_dens"] = [proj(x) for proj in model.projectors]  # per encoder (B, N, D_enc)
    if i == model.sra_depth:  # (B, C, H, W)
        heads["x0_hat"] = unpatchify(model.sra_head(x), model.patch_size, model.in_channels)
    if i == model.self_depth:
        heads["h_self"] = model.self_head(x)  # (B, N, H)


# ----------------------------------------------------------------------------------------------
# The model


class SiTOutput(NamedTuple):
    """What one forward returns; indexable like REPA's (v, zs_tilde) tuple: out[0] is the velocity.
    """

    v: torch.Tensor  # (B, C, H, W) predicted velocity eps - x0
    h_dens: list  # per encoder: (B, N, D_enc) projector output h_den, SARA (5) (empty if none)
    x0_hat: torch.Tensor | None  # (B, C, H, W) SRA^2 head's prediction of the clean latent, or None
    h_self: torch.Tensor | None = None  # (B, N, H) SRA student head's tokens, or None


class SiT(nn.Module):
    """Diffusion transformer over latent patches; REPA's constructor keywords and state_dict keys.
    """

    def __init__(
        self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
        mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, encoder_depth=8,
        z_dims=(768,),
        projector_dim=2048, sra_depth=0, sra_mlp_layers=5, sra_hidden_dim=None, self_depth=0,
        grad_checkpointing=False, path_type="linear",
        **repa_kwargs,
    ):
        super().__init__()
        # REPA passes use_cfg / decoder_hidden_size / qk_norm / fused_attn; none changes the
        # network we build (REPA's final layer width is always hidden_size for S..XL presets).
        unknown = set(repa_kwargs) - {"use_cfg", "decoder_hidden_size", "qk_norm", "fused_attn"}
        if unknown:
            raise TypeError(f"SiT got unknown arguments {sorted(unknown)}")
        if repa_kwargs.get("qk_norm"):
            raise ValueError(
                "qk_norm=True is not supported (REPA's published checkpoints use qk_norm=False)"
            )
        z_dims = [d for d in z_dims if d > 0]  # REPA writes z_dims=[0] for "no encoder"
        check_taps(depth, encoder_depth=encoder_depth if z_dims else 0, sra_depth=sra_depth,
                   self_depth=self_depth)
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels,
            hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob, num_classes=num_classes,
            encoder_depth=encoder_depth, z_dims=list(z_dims), projector_dim=projector_dim,
            sra_depth=sra_depth, sra_mlp_layers=sra_mlp_layers, sra_hidden_dim=sra_hidden_dim,
            self_depth=self_depth,
            # the interpolant it was trained on: the sampler's score depends on it
            path_type=path_type,
        )  # plain dict: enough to rebuild this exact network and sample it
        self.patch_size, self.in_channels, self.num_classes = patch_size, in_channels, num_classes
        self.encoder_depth, self.sra_depth, self.self_depth = encoder_depth, sra_depth, self_depth
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(  # frozen sin-cos
            torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)
        )
        add_heads(self, hidden_size, z_dims, projector_dim, sra_depth, sra_mlp_layers,
                  sra_hidden_dim, self_depth)
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """REPA / DiT init: xavier Linear, zero-init adaLN and output layers, frozen sin-cos pos."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        grid = math.isqrt(self.x_embedder.num_patches)
        self.pos_embed.data.copy_(
            torch.from_numpy(sincos_2d(self.pos_embed.shape[-1], grid)).float().unsqueeze(0)
        )
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the patch conv as a Linear
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def null_condition(self, y):
        """The null class for each label in y (B,): the unconditional half of classifier-free
        guidance."""
        return torch.full_like(y, self.num_classes)

    def forward(self, x, t, y, align=True, drop=None, stop_at=None):
        """x (B, C, H, W) noisy latent, t (B,) in [0, 1], y (B,) labels -> SiTOutput.

        align=False skips the alignment heads (sampling needs only the velocity); drop (B,) bool
        replaces labels by the null class (else training mode draws label dropout); stop_at=k
        returns block k's residual stream (B, N, H) instead, running no block after it (SRA's
        teacher features).
        """
        x = self.x_embedder(x) + self.pos_embed  # (B, N, H)
        c = self.t_embedder(t) + self.y_embedder(y, drop)  # (B, H)
        heads = dict(h_dens=[], x0_hat=None, h_self=None)
        for i, block in enumerate(self.blocks, start=1):
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)  # (B, N, H)
            if i == stop_at:
                return x
            if align:
                read_taps(self, i, x, heads)
        x = self.final_layer(x, c)  # (B, N, p*p*C)
        return SiTOutput(unpatchify(x, self.patch_size, self.in_channels), **heads)


# ----------------------------------------------------------------------------------------------
# Sizes: every preset is built from this one table (S..XL: SiT / DiT Table 1). Alignment taps from
# the papers: REPA/SARA at block 8, or 4 for 12-block models; SRA^2 at block 2 for B, 8 for L and
# XL; SRA's student -> EMA teacher blocks 8 -> 20 for XL (its README), 4 -> 8 for 12 blocks (its
# train.py defaults), 8 -> 16 for L (our choice: the teacher two thirds deep, as 8 of 12).

SIZES = {  # T is tiny: smoke runs, tests
    "T":  dict(depth=4,  hidden_size=128,  num_heads=4,  encoder_depth=2, sra_depth=1,
               self_depth=1, self_teacher_depth=3),
    "S":  dict(depth=12, hidden_size=384,  num_heads=6,  encoder_depth=4, sra_depth=2,
               self_depth=4, self_teacher_depth=8),
    "B":  dict(depth=12, hidden_size=768,  num_heads=12, encoder_depth=4, sra_depth=2,
               self_depth=4, self_teacher_depth=8),
    "L":  dict(depth=24, hidden_size=1024, num_heads=16, encoder_depth=8, sra_depth=8,
               self_depth=8, self_teacher_depth=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16, encoder_depth=8, sra_depth=8,
               self_depth=8, self_teacher_depth=20),
}
PATCH_SIZES = (2, 4, 8)
MODEL_NAMES = [f"SiT-{s}/{p}" for s in SIZES for p in PATCH_SIZES]


def size_config(name):
    """'SiT-XL/2' -> dict(depth, hidden_size, num_heads, patch_size and the default taps)."""
    m = re.fullmatch(r"SiT-(T|S|B|L|XL)/(\d+)", name)
    if not m or int(m.group(2)) not in PATCH_SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return dict(SIZES[m.group(1)], patch_size=int(m.group(2)))


def build_sit(name, **kwargs):
    """Build SiT by name ('SiT-B/2'); kwargs (encoder_depth, z_dims, sra_depth, ...) override."""
    size = size_config(name)
    for tap in ("sra_depth", "self_depth", "self_teacher_depth"):
        size.pop(tap)  # no SRA^2 or SRA head unless asked for (the teacher's tap is the loss's)
    return SiT(**{**size, **kwargs})
