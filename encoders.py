"""Frozen representation encoders for the alignment losses: DINOv2 S/B/L/g (with and without registers) and a
tiny random encoder for smoke runs.

Every encoder takes the raw uint8 images (B, 3, H, W) and returns patch tokens (B, N, embed_dim), with REPA's
preprocessing done inside (train.py's preprocess_raw_image): x / 255, ImageNet mean/std, bicubic resize to
224 * (resolution // 256); the tokens are DINOv2's x_norm_patchtokens (after the final norm, without the class and
register tokens) on a 16x16 grid at 256 px, the positional embedding resampled to that grid as REPA does.
Names follow REPA's --enc-type: "dinov2-vit-b", "dinov2reg-vit-b" (alias "dinov2-vit-b-reg"), comma-separated for
several encoders at once; "tiny-random" for smoke runs and tests.
"""

import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

TINY_RANDOM = "tiny-random"  # smoke runs and tests only: randomly initialised, never a real representation
DINOV2_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
DINOV2_PATCH = 14

log = logging.getLogger(__name__)


def dinov2_timm_name(name):
    """Canonical REPA name ('dinov2-vit-b', 'dinov2reg-vit-b') -> timm model name with its pretrained tag."""
    family, _, size = name.split("-")
    reg = "_reg4" if family == "dinov2reg" else ""
    return f"vit_{DINOV2_SIZES[size]}_patch14{reg}_dinov2.lvd142m"


def canonical_name(name):
    """One --enc-type entry -> its canonical REPA name; ValueError naming the known encoders if it is unknown."""
    name = name.strip().lower()
    if name.startswith("dinov2-vit-") and name.endswith("-reg"):
        name = "dinov2reg-vit-" + name[len("dinov2-vit-"):-len("-reg")]  # our alias -> REPA's spelling
    family, _, size = name.rpartition("-vit-")
    if name == TINY_RANDOM or (family in ("dinov2", "dinov2reg") and size in DINOV2_SIZES):
        return name
    known = [f"{f}-vit-{s}" for f in ("dinov2", "dinov2reg") for s in DINOV2_SIZES]
    raise ValueError(f"unknown encoder {name!r}: use one of {', '.join(known + [TINY_RANDOM])} "
                     "(comma-separated for several; 'dinov2-vit-b-reg' is an alias of 'dinov2reg-vit-b')")


def normalize(images):
    """uint8 images (B, 3, H, W) -> float32 in [0, 1] normalised with the ImageNet mean/std, as REPA does."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std  # (B, 3, H, W)


class FrozenEncoder(nn.Module):
    """Base of the frozen encoders: no gradients, always in eval mode, checks the input resolution."""

    def __init__(self, name, embed_dim, resolution, pretrained):
        """Record what every encoder reports: name, token width, input resolution, real weights or not."""
        super().__init__()
        self.name, self.embed_dim, self.resolution, self.pretrained = name, embed_dim, resolution, pretrained

    def train(self, mode=True):
        """Stay in eval mode whatever the caller asks: the encoder is a fixed target."""
        return super().train(False)

    def check_images(self, images):
        """ValueError unless images are (B, 3, resolution, resolution), the size the token grid was built for."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.resolution, self.resolution):
            raise ValueError(f"encoder {self.name} was built for (B, 3, {self.resolution}, {self.resolution}) "
                             f"images, got {tuple(images.shape)}: pass the same resolution to load_encoders")


class DinoV2Encoder(FrozenEncoder):
    """A timm DINOv2 ViT returning x_norm_patchtokens for raw uint8 images, preprocessed as REPA does."""

    def __init__(self, name, resolution=256, pretrained=True, weights=None):
        """Canonical name; weights from a local file, else timm's download, else random (pretrained=False)."""
        import timm

        if resolution % 256:
            raise ValueError(f"DINOv2 encoders need a resolution that is a multiple of 256 (REPA: 256 or 512), "
                             f"got {resolution}")
        input_size = 224 * (resolution // 256)  # 16x16 patches of 14 px at 256 px, as in REPA
        timm_name = dinov2_timm_name(name)
        # img_size makes timm resample the 37x37 pretrained pos-embed to the 16x16 grid (bicubic, antialiased: the
        # same resample_abs_pos_embed call REPA makes on the torch.hub model)
        kwargs = dict(img_size=input_size, num_classes=0)
        if weights is not None and not os.path.isfile(weights):
            raise FileNotFoundError(f"encoder weights file {weights} does not exist")
        if weights is not None:
            model = load_timm_weights(timm.create_model(timm_name, pretrained=False, **kwargs), weights)
        elif pretrained:
            try:
                model = timm.create_model(timm_name, pretrained=True, **kwargs)
            except Exception as e:  # hub errors come in many types; all mean the same thing to the user
                raise RuntimeError(
                    f"could not load the pretrained weights of {name} ({timm_name}) through timm: "
                    f"{type(e).__name__}: {e}. Check the network or the Hugging Face cache, or download the "
                    f"checkpoint and pass it as a local file (weights=...)") from e
        else:
            log.warning("encoder %s: RANDOMLY INITIALISED DINOv2 architecture (pretrained=False), tests only", name)
            model = timm.create_model(timm_name, pretrained=False, **kwargs)
        super().__init__(name, model.embed_dim, resolution, pretrained or weights is not None)
        self.model, self.input_size = model, input_size

    @torch.no_grad()
    def forward(self, images):
        """uint8 images (B, 3, H, W) -> patch tokens after the final norm (B, (H/16)^2, embed_dim)."""
        self.check_images(images)
        x = normalize(images)  # REPA normalises, then resizes
        x = F.interpolate(x, self.input_size, mode="bicubic")  # (B, 3, 224, 224) at 256 px
        tokens = self.model.forward_features(x)  # (B, prefix + N, D), final norm applied
        return tokens[:, self.model.num_prefix_tokens:]  # drop cls (+ registers): (B, N, D)


def load_timm_weights(model, path):
    """Load a local checkpoint (DINOv2's own .pth, timm's .safetensors or .pth) into a timm ViT."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        # converts the official DINOv2 key layout (mask_token, register_tokens), resamples the pos-embed to the grid
        model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"encoder weights {path} do not fit {type(model).__name__} "
                           f"(embed_dim {model.embed_dim}): wrong model size or variant? {e}") from e
    return model


class TinyRandomEncoder(FrozenEncoder):
    """Smoke runs and tests only: a seeded random 16x16-stride conv patchifier + LayerNorm, no real representation."""

    def __init__(self, resolution=256, embed_dim=32, seed=0):
        """Random weights from seed, built without touching the global RNG."""
        if resolution % 16:
            raise ValueError(f"tiny-random encoder needs a resolution divisible by 16, got {resolution}")
        super().__init__(TINY_RANDOM, embed_dim, resolution, pretrained=False)
        log.warning("encoder tiny-random: a TINY RANDOMLY INITIALISED encoder, NOT a real representation; "
                    "alignment to it is meaningless outside smoke runs and tests")
        with torch.random.fork_rng(devices=[]):  # the same weights every time, global RNG untouched
            torch.manual_seed(seed)
            self.patchify = nn.Conv2d(3, embed_dim, kernel_size=16, stride=16)  # one token per 16x16 px
            self.norm = nn.LayerNorm(embed_dim)

    @torch.no_grad()
    def forward(self, images):
        """uint8 images (B, 3, H, W) -> tokens (B, (H/16)^2, embed_dim): SiT-*/2's token grid on the 8x latent."""
        self.check_images(images)
        x = self.patchify(normalize(images))  # (B, D, H/16, W/16)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, N, D), row-major tokens


def build_encoder(name, resolution=256, pretrained=True, weights=None):
    """One encoder by (canonical or alias) name; pretrained=False builds the architecture with random weights."""
    name = canonical_name(name)
    if name == TINY_RANDOM:
        return TinyRandomEncoder(resolution)
    return DinoV2Encoder(name, resolution, pretrained, weights)


def load_encoders(spec, device, resolution=256, weights=None, pretrained=True):
    """REPA's --enc-type spec ('dinov2-vit-b,dinov2-vit-l') -> list of frozen eval encoders."""
    # weights: None, or local checkpoint files comma-separated in the order of spec (an empty entry downloads);
    # pretrained=False builds the DINOv2 architectures with random weights (tests)
    names = [canonical_name(n) for n in spec.split(",") if n.strip()]  # all names checked before any download
    if not names:
        raise ValueError(f"empty encoder spec {spec!r}: name at least one encoder, e.g. dinov2-vit-b")
    paths = weights.split(",") if weights else [""] * len(names)
    if len(paths) != len(names):
        raise ValueError(f"{len(paths)} encoder weight files for {len(names)} encoders in {spec!r}: "
                         "give one per encoder, comma-separated (empty to download)")
    encoders = [build_encoder(n, resolution, pretrained, p.strip() or None) for n, p in zip(names, paths)]
    return [e.to(device).eval().requires_grad_(False) for e in encoders]
