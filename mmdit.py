"""MMDiT: REPA's text-to-image diffusion transformer (SD3's joint blocks, trimmed), with REPA / SARA
projectors, an SRA^2 latent head and an SRA self-alignment head on the image stream.

Drop-in compatible with REPA's models/mmdit.py: same state_dict keys (a checkpoint of REPA's
train_t2i.py loads with strict=True), same outputs; the forward returns model.py's SiTOutput, so
losses.training_losses trains both models. 256 image tokens (the 4x32x32 latent, p=2) and the text
tokens (77 CLIP ViT-L/14 features) meet in one joint attention per block; every other weight is per
stream. adaLN is driven by the time embedding alone (no pooled text vector, no class label); width
is 32 x depth with depth heads of 32; the last block's text stream only feeds its attention.
Read top to bottom: helpers, embedders, the joint block, the final layer, the model, the size table;
the parts shared with SiT come from model.py. Time runs REPA's way: t=0 data, t=1 noise, raw t in.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model import (
    FinalLayer,
    Mlp,
    PatchEmbed,
    SiTOutput,
    TimestepEmbedder,
    add_heads,
    check_taps,
    modulate,
    read_taps,
    sincos_2d,
    unpatchify,
)

# ----------------------------------------------------------------------------------------------
# Helpers (modulate, sincos_2d, unpatchify and the alignment heads are model.py's)


def joint_attention(qkv_context, qkv_x, num_heads):
    """One attention over [context; x]: qkv (B, L, 3H), (B, N, 3H) -> outputs (B, L, H), (B, N, H).

    The text tokens come first in the sequence, as REPA; no padding mask (CLIP's padding tokens are
    attended to, as in REPA's and U-ViT's training).
    """
    qkv = torch.cat([qkv_context, qkv_x], dim=1)  # (B, L+N, 3H)
    b, n, h3 = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, num_heads, h3 // (3 * num_heads)).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L+N, d)
    out = out.transpose(1, 2).reshape(b, n, h3 // 3)  # (B, L+N, H)
    return out.split([qkv_context.shape[1], qkv_x.shape[1]], dim=1)


# ----------------------------------------------------------------------------------------------
# Embedders: PatchEmbed and TimestepEmbedder are model.py's (REPA's are the same maps, same keys);
# the text features enter through one Linear (context_embedder, 768 -> H in REPA).


# ----------------------------------------------------------------------------------------------
# Joint block


class StreamAttention(nn.Module):
    """One stream's attention weights: qkv in, proj out (none in a pre-only stream)."""

    def __init__(self, hidden_size, pre_only=False):
        super().__init__()
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        if not pre_only:
            self.proj = nn.Linear(hidden_size, hidden_size)


class StreamBlock(nn.Module):
    """One stream's half of a joint block (REPA's DismantledBlock): adaLN-modulated pre-norm
    attention input, then gated attention output and MLP. A pre-only stream stops at its q, k, v."""

    def __init__(self, hidden_size, mlp_ratio=4.0, pre_only=False):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = StreamAttention(hidden_size, pre_only)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        n_mods = 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, n_mods * hidden_size)
        )

    def pre_attention(self, x, c):
        """x (B, N, H), c (B, H) -> qkv (B, N, 3H) and the modulations post_attention needs."""
        mods = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=-1)  # each (B, H)
        return self.attn.qkv(modulate(self.norm1(x), mods[0], mods[1])), mods[2:]

    def post_attention(self, x, attn, mods):
        """Residual stream x (B, N, H) plus the gated attention output and gated MLP."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(attn)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """Text and image streams, separate weights, one attention over both (SD3's MM-DiT block)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, pre_only=False):
        super().__init__()
        self.num_heads = num_heads
        self.context_block = StreamBlock(hidden_size, mlp_ratio, pre_only)
        self.x_block = StreamBlock(hidden_size, mlp_ratio)

    def forward(self, context, x, c):
        """context (B, L, H), x (B, N, H), c (B, H) -> (context or None if pre-only, x)."""
        qkv_context, mods_context = self.context_block.pre_attention(context, c)  # (B, L, 3H)
        qkv_x, mods_x = self.x_block.pre_attention(x, c)  # (B, N, 3H)
        attn_context, attn_x = joint_attention(qkv_context, qkv_x, self.num_heads)
        if not self.context_block.pre_only:
            context = self.context_block.post_attention(context, attn_context, mods_context)
        else:
            context = None
        return context, self.x_block.post_attention(x, attn_x, mods_x)


# ----------------------------------------------------------------------------------------------
# Final layer: model.py's FinalLayer (REPA's is the same, same keys), on the image tokens only.


# ----------------------------------------------------------------------------------------------
# The model

# REPA's constructor keywords that would change the network, at the only values its T2I code uses
# (train_t2i.py passes none of them); attn_mode only picks an attention kernel.
REPA_FIXED = dict(
    learn_sigma=False, adm_in_channels=None, context_embedder_config=None, register_length=0,
    rmsnorm=False, scale_mod_only=False, swiglu=False, out_channels=None, qk_norm=None,
    qkv_bias=True,
)


class MMDiT(nn.Module):
    """Text-conditioned diffusion transformer over latent patches; REPA's state_dict keys.

    No adaLN-Zero and no xavier init: REPA's MMDiT keeps PyTorch's default initialisation of every
    layer (it has no initialize_weights), so a seeded build here equals REPA's seeded build; only
    the sin-cos position embedding is set (a buffer, frozen).
    """

    def __init__(
        self, input_size=32, patch_size=2, in_channels=4, depth=24, mlp_ratio=4.0, context_dim=768,
        encoder_depth=8, z_dims=(768,), projector_dim=2048, sra_depth=0, sra_mlp_layers=5,
        sra_hidden_dim=None, self_depth=0, grad_checkpointing=False, path_type="linear",
        **repa_kwargs,
    ):
        super().__init__()
        unknown = set(repa_kwargs) - set(REPA_FIXED) - {"attn_mode"}
        if unknown:
            raise TypeError(f"MMDiT got unknown arguments {sorted(unknown)}")
        for k, v in repa_kwargs.items():
            same = v == REPA_FIXED.get(k, v) or (k == "out_channels" and v == in_channels)
            if not same:
                raise ValueError(
                    f"MMDiT supports only {k}={REPA_FIXED[k]!r} (REPA's T2I model), got {v!r}"
                )
        z_dims = [d for d in z_dims if d > 0]  # REPA writes z_dims=[0] for "no encoder"
        check_taps(depth, encoder_depth=encoder_depth if z_dims else 0, sra_depth=sra_depth,
                   self_depth=self_depth)
        hidden_size, num_heads = 32 * depth, depth  # REPA: heads of 32, one per block
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, depth=depth,
            mlp_ratio=mlp_ratio, context_dim=context_dim, encoder_depth=encoder_depth,
            z_dims=list(z_dims), projector_dim=projector_dim, sra_depth=sra_depth,
            sra_mlp_layers=sra_mlp_layers, sra_hidden_dim=sra_hidden_dim, self_depth=self_depth,
            # the interpolant it was trained on: the sampler's score depends on it
            path_type=path_type,
        )  # plain dict: enough to rebuild this exact network and sample it
        self.patch_size, self.in_channels = patch_size, in_channels
        self.encoder_depth, self.sra_depth, self.self_depth = encoder_depth, sra_depth, self_depth
        self.grad_checkpointing = grad_checkpointing

        # built in REPA's order, so torch.manual_seed gives REPA's initial weights
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        # REPA crops a 16x16 sin-cos table to the grid; at its one grid (16, the 32 px latent with
        # p=2) that is the whole table, which is what any other square grid gets here
        grid = input_size // patch_size
        self.register_buffer("pos_embed", torch.zeros(1, grid * grid, hidden_size))  # (1, N, H)
        self.pos_embed.copy_(torch.from_numpy(sincos_2d(hidden_size, grid)).float().unsqueeze(0))
        self.joint_blocks = nn.ModuleList(
            JointBlock(hidden_size, num_heads, mlp_ratio, pre_only=i == depth - 1)
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        add_heads(self, hidden_size, z_dims, projector_dim, sra_depth, sra_mlp_layers,
                  sra_hidden_dim, self_depth)
        # the empty caption's features (1, L, context_dim), set by set_null_context: not a weight
        # (no state_dict key), it comes with the data and the text encoder
        self.register_buffer("null_context", None, persistent=False)

    def set_null_context(self, features):
        """Set the null condition (the empty caption's text features, (L, D) or (1, L, D)) that
        replaces dropped captions (drop) and guides sampling (null_condition)."""
        features = torch.as_tensor(features).float()
        if features.ndim not in (2, 3) or features.shape[-1] != self.config["context_dim"]:
            raise ValueError(
                f"null context must be (L, {self.config['context_dim']}) text features, got "
                f"{tuple(features.shape)}: the empty caption of the model's text encoder"
            )
        features = features.reshape(1, -1, features.shape[-1])  # (1, L, D)
        self.null_context = features.to(self.pos_embed.device)

    def null_condition(self, context):
        """The null context (B, L, D) for a batch of contexts: the unconditional half of CFG."""
        if self.null_context is None:
            raise ValueError("MMDiT has no null context: call set_null_context with the empty "
                             "caption's features (the dataset's empty_context.npy)")
        return self.null_context.to(context).expand_as(context)

    def forward(self, x, t, context, align=True, drop=None, stop_at=None):
        """x (B, C, H, W) noisy latent, t (B,) in [0, 1], context (B, L, D) text features ->
        SiTOutput.

        align=False skips the alignment heads (sampling needs only the velocity); drop (B,) bool
        replaces those rows' contexts by the null context (caption dropout); stop_at=k returns
        block k's image stream (B, N, H) instead, running no block after it (SRA's teacher).
        """
        if context.ndim != 3 or context.shape[-1] != self.config["context_dim"]:
            raise ValueError(
                f"MMDiT takes text features (B, L, {self.config['context_dim']}), got "
                f"{tuple(context.shape)}: a text encoder of another width than the model's?"
            )
        if drop is not None and drop.any():
            context = torch.where(drop.view(-1, 1, 1), self.null_condition(context), context)
        x = self.x_embedder(x) + self.pos_embed  # (B, N, H)
        c = self.t_embedder(t)  # (B, H): the time alone drives adaLN
        context = self.context_embedder(context)  # (B, L, H)
        heads = dict(h_dens=[], x0_hat=None, h_self=None)
        for i, block in enumerate(self.joint_blocks, start=1):
            if self.grad_checkpointing and self.training:
                context, x = checkpoint(block, context, x, c, use_reentrant=False)
            else:
                context, x = block(context, x, c)  # (B, L, H) (None after the last), (B, N, H)
            if i == stop_at:
                return x
            if align:  # the image stream
                read_taps(self, i, x, heads)
        x = self.final_layer(x, c)  # (B, N, p*p*C)
        return SiTOutput(unpatchify(x, self.patch_size, self.in_channels), **heads)


# ----------------------------------------------------------------------------------------------
# Sizes: REPA trains depth 24 (768 wide, 24 heads; REPA projector at block 8); the SRA^2 head taps
# block 8 and SRA's student -> teacher blocks are 8 -> 16, as for SiT-L's 24 blocks (our choice: the
# papers do not state them for MMDiT). T is tiny: smoke runs and tests.

MMDIT_SIZES = {
    "MMDiT-T": dict(depth=2,  encoder_depth=1, sra_depth=1, self_depth=1, self_teacher_depth=2),
    "MMDiT":   dict(depth=24, encoder_depth=8, sra_depth=8, self_depth=8, self_teacher_depth=16),
}


def build_mmdit(name, **kwargs):
    """Build an MMDiT by name ('MMDiT'); kwargs (encoder_depth, z_dims, sra_depth, ...) override."""
    if name not in MMDIT_SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MMDIT_SIZES)}")
    size = dict(MMDIT_SIZES[name])
    for tap in ("sra_depth", "self_depth", "self_teacher_depth"):
        size.pop(tap)  # no SRA^2 or SRA head unless asked for (the teacher's tap is the loss's)
    return MMDiT(**{**size, **kwargs})
