"""The frozen networks: representation encoders for the alignment losses and the SD-VAE
of the latents.

Encoders: every encoder REPA's --enc-type knows (DINOv2 S/B/L/g with and without registers,
DINOv1-B, MoCo v3 S/B/L, MAE-L, CLIP-L, I-JEPA-H) and a tiny random encoder for smoke runs.

Every encoder takes the raw uint8 images (B, 3, H, W) and returns patch tokens (B, (H/16)^2,
embed_dim), with REPA's preprocessing done inside (train.py's preprocess_raw_image) and REPA's
choice of tokens (utils.load_encoders and the token slicing in train.py); FAMILIES below lists both
per family. Names follow REPA's --enc-type ("mae-vit-l", "dinov2reg-vit-b", alias
"dinov2-vit-b-reg"), comma-separated for several encoders at once; "tiny-random" for smoke runs and
tests. The architectures are timm ViTs; so are the weights wherever timm publishes them (all but
MoCo v3, whose official checkpoint is passed as a local file).

SD-VAE (at the end): maps 256 px images to 4x32x32 latents. data.py encodes with it, train.py and
sample.py decode with it. The latent convention is REPA's: images in [-1, 1], posterior [mean, std]
stored per image, and the diffusion model sees x0 = (mean + std * eps) * 0.18215.

Text encoder (at the very end, text-to-image only): CLIP ViT-L/14's text transformer through
transformers, captions -> (B, 77, 768) token features, the empty caption's as the null condition;
a tiny random one (byte-level tokenizer) for smoke runs and tests.
"""

import contextlib
import functools
import logging
import os
import socket
import urllib.parse
import urllib.request
import warnings
import zipfile
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from cluster import UserError

# smoke runs and tests only: randomly initialised, never a real encoder or VAE
TINY_RANDOM = "tiny-random"

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Offline machines: one short connection attempt finds out that a download server is unreachable;
# the pretrained parts then read local caches only, and a part that is not there fails at once in
# one line naming the flag of a local file (the hub clients would retry for a minute, with warnings)

CONNECT_TIMEOUT = 2.0  # seconds: a reachable server answers a TCP connect far sooner


@functools.cache
def reachable(url, timeout=CONNECT_TIMEOUT):
    """Whether url's host takes a TCP connection within timeout seconds (one try, once a process).
    """
    parts = urllib.parse.urlsplit(url)
    if urllib.request.getproxies().get(parts.scheme):  # only the proxy knows: let the client ask
        return True
    try:
        socket.create_connection(
            (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), timeout
        ).close()
        return True
    except OSError:  # no DNS, refused, unreachable, timed out
        return False


def hub_reachable():
    """Whether the Hugging Face hub can be asked (not HF_HUB_OFFLINE=1, its host answers)."""
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE and reachable(constants.ENDPOINT)


HUB_LOGGERS = ("huggingface_hub", "timm", "diffusers", "transformers")


@contextlib.contextmanager
def hub_cache_only():
    """Inside, huggingface_hub, timm, diffusers and transformers read their local caches only: no
    request, no retry (huggingface_hub's offline mode, which they all consult per call), and their
    warnings about the failed lookups stay unsaid (the caller says what failed, once)."""
    from huggingface_hub import constants

    loggers = [logging.getLogger(n) for n in HUB_LOGGERS]
    levels = [lg.level for lg in loggers]
    offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            yield
    finally:
        constants.HF_HUB_OFFLINE = offline
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def from_hub(load, what, todo):
    """load() (a hub download); with the hub unreachable, load() from the local caches only, and a
    UserError 'cannot load what ...: todo' at once when they do not hold it."""
    if hub_reachable():
        return load()
    try:
        with hub_cache_only():
            return load()
    except Exception as e:  # the clients' cache misses share no base class
        log.debug("offline load of %s failed: %r", what, e)
        raise UserError(f"cannot load {what}: the Hugging Face hub is unreachable (no network?) "
                        f"and the local cache does not hold it; {todo}") from None


def check_download(url, what, todo):
    """UserError at once when torch.hub would have to download url (not in its cache) and url's
    server is unreachable; torch.hub itself would fail later, or hang where packets are dropped."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.isfile(cached) and not reachable(url):
        host = urllib.parse.urlsplit(url).hostname
        raise UserError(f"cannot download {what}: {host} is unreachable (no network?); {todo}")


class Family(NamedTuple):
    """How REPA builds, feeds and reads one encoder family."""
    # size letter -> timm model, with its pretrained tag when timm publishes the weights
    timm_names: dict
    patch: int
    # bicubic resize to patch * 16 * (resolution // 256) px, so the grid is 16x16 per 256 px
    resize: bool
    # tokens after the final LayerNorm (False: the last block's output, as REPA's wrappers return)
    final_norm: bool
    weights_hint: str  # where the official checkpoint comes from, for the error messages
    # CLIP: x / 255, resize, then CLIP's mean/std; the others normalise with ImageNet's, then resize
    clip: bool = False


DINOV2 = {
    s: f"vit_{n}_patch14_dinov2.lvd142m"
    for s, n in dict(s="small", b="base", l="large", g="giant").items()
}
FAMILIES = {
    # DINOv2 (torch.hub in REPA): x_norm_patchtokens, class (and register) tokens dropped, 224 px
    "dinov2": Family(
        DINOV2, patch=14, resize=True, final_norm=True,
        weights_hint="dinov2_vit{s}14_pretrain.pth (facebookresearch/dinov2)",
    ),
    "dinov2reg": Family(
        {s: n.replace("14_", "14_reg4_") for s, n in DINOV2.items()},
        patch=14, resize=True, final_norm=True,
        weights_hint="dinov2_vit{s}14_reg4_pretrain.pth (facebookresearch/dinov2)",
    ),
    # DINOv1 ViT-B/16 at 256 px: final-norm patch tokens (REPA's models/dinov1.py is not published;
    # this is what the DINO repo's get_intermediate_layers returns, class token dropped)
    "dinov1": Family(
        {"b": "vit_base_patch16_224.dino"},
        patch=16, resize=False, final_norm=True,
        weights_hint="dino_vitbase16_pretrain.pth (facebookresearch/dino)",
    ),
    # MoCo v3 at 256 px (REPA's models/mocov3_vit.py): forward_features, i.e. after the final norm,
    # class dropped. timm publishes no MoCo v3 weights: these are architectures only
    "mocov3": Family(
        {"s": "vit_small_patch16_224", "b": "vit_base_patch16_224", "l": "vit_large_patch16_224"},
        patch=16, resize=False, final_norm=True,
        weights_hint="the MoCo v3 ViT-{S}/16 checkpoint REPA uses "
                     "(its ckpts/mocov3_vit{s}.pth, from LTH14/rcg)",
    ),
    # MAE ViT-L/16 at 256 px (REPA's models/mae_vit.py): the last block's output WITHOUT the final
    # norm, class dropped
    "mae": Family(
        {"l": "vit_large_patch16_224.mae"},
        patch=16, resize=False, final_norm=False,
        weights_hint="mae_pretrain_vit_large.pth (facebookresearch/mae)",
    ),
    # CLIP ViT-L/14 (REPA's models/clip_vit.py): ln_pre, the transformer, no ln_post and no
    # proj, class dropped
    "clip": Family(
        {"l": "vit_large_patch14_clip_quickgelu_224.openai"},
        patch=14, resize=True, final_norm=False,
        weights_hint="ViT-L-14.pt (openai/CLIP)", clip=True,
    ),
    # I-JEPA ViT-H/14 (REPA's models/jepa.py): the context encoder after its final norm; no class
    # token, 224 px
    "jepa": Family(
        {"h": "vit_huge_patch14_gap_224.in1k_ijepa"},
        patch=14, resize=True, final_norm=True,
        weights_hint="IN1K-vit.h.14-300e.pth.tar (facebookresearch/ijepa)",
    ),
}


def canonical_name(name):
    """One --enc-type entry -> its canonical REPA name; ValueError naming the known encoders if it
    is unknown."""
    name = name.strip().lower()
    if name.startswith("dinov2-vit-") and name.endswith("-reg"):
        # our alias -> REPA's spelling
        name = "dinov2reg-vit-" + name[len("dinov2-vit-"):-len("-reg")]
    family, _, size = name.rpartition("-vit-")
    if name == TINY_RANDOM or size in getattr(FAMILIES.get(family), "timm_names", {}):
        return name
    known = [f"{f}-vit-{s}" for f, fam in FAMILIES.items() for s in fam.timm_names]
    raise ValueError(
        f"unknown encoder {name!r}: use one of {', '.join(known + [TINY_RANDOM])} "
        "(comma-separated for several; 'dinov2-vit-b-reg' is an alias of 'dinov2reg-vit-b')"
    )


def timm_name(name):
    """Canonical REPA name ('mae-vit-l') -> timm model name, with its pretrained tag when timm has
    the weights."""
    family, _, size = name.rpartition("-vit-")
    return FAMILIES[family].timm_names[size]


def normalize(x, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """Images in [0, 1] (B, 3, H, W) -> normalised with mean/std (ImageNet's unless told), as REPA
    does."""
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std  # (B, 3, H, W)


class FrozenEncoder(nn.Module):
    """Base of the frozen encoders: no gradients, always in eval mode, checks the input resolution.
    """

    def __init__(self, name, embed_dim, resolution, pretrained):
        """Record what every encoder reports: name, token width, input resolution, real weights or
        not."""
        super().__init__()
        self.name, self.embed_dim, self.resolution, self.pretrained = (
            name, embed_dim, resolution, pretrained,
        )

    def train(self, mode=True):
        """Stay in eval mode whatever the caller asks: the encoder is a fixed target."""
        return super().train(False)

    def check_images(self, images):
        """ValueError unless images are (B, 3, resolution, resolution), the size the token grid was
        built for."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.resolution, self.resolution):
            raise ValueError(
                f"encoder {self.name} was built for (B, 3, {self.resolution}, {self.resolution}) "
                f"images, got {tuple(images.shape)}: pass the same resolution to load_encoders"
            )


class ViTEncoder(FrozenEncoder):
    """A timm ViT of one REPA family returning the tokens REPA aligns to, for raw uint8 images."""

    def __init__(self, name, resolution=256, pretrained=True, weights=None, **arch):
        """Canonical name; weights from a local file, else timm's download, else
        random (pretrained=False).

        arch: timm keyword overrides (depth, embed_dim, num_heads, ...) for reduced test variants
        of a family.
        """
        import timm

        family = name.rpartition("-vit-")[0]
        fam = FAMILIES[family]
        if resolution % 256 or (resolution != 256 and not family.startswith("dinov2")):
            raise ValueError(
                f"encoder {name} needs "
                f"{'a multiple of 256' if family.startswith('dinov2') else '256'} "
                f"px (REPA: 256, or 512 with DINOv2 only), got {resolution}"
            )
        # the pos-embed is resampled to this grid from the checkpoint's (bicubic, antialiased, class
        # position kept: timm's resample_abs_pos_embed, the call REPA makes on every checkpoint)
        input_size = fam.patch * 16 * (resolution // 256) if fam.resize else resolution
        kwargs = dict(img_size=input_size, num_classes=0)
        if name == "mocov3-vit-s":
            kwargs["num_heads"] = 12  # MoCo v3's ViT-S has 12 heads of 32 (timm's has 6 of 64)
        kwargs.update(arch)
        tname, hint = timm_name(name), fam.weights_hint.format(s=name[-1], S=name[-1].upper())
        if weights is not None and not os.path.isfile(weights):
            raise FileNotFoundError(f"encoder weights file {weights} does not exist")
        if weights is not None:
            model = load_weights(
                timm.create_model(tname.split(".")[0], pretrained=False, **kwargs), weights, family
            )
        elif pretrained and "." not in tname:  # no pretrained tag: timm has the architecture only
            raise RuntimeError(f"timm publishes no weights for {name}: download {hint} and pass it "
                               "as a local file (--enc-weights)")
        elif pretrained:
            try:
                model = from_hub(lambda: timm.create_model(tname, pretrained=True, **kwargs),
                                 f"the pretrained weights of encoder {name} ({tname})",
                                 f"download {hint} elsewhere and pass it as --enc-weights FILE")
            except UserError:
                raise
            # hub errors come in many types; all mean the same thing to the user
            except Exception as e:
                raise RuntimeError(
                    f"could not load the pretrained weights of {name} ({tname}) through timm: "
                    f"{type(e).__name__}: {e}. Check the network or the Hugging Face cache, or "
                    f"download {hint} and pass it as a local file (--enc-weights / weights=...)"
                ) from e
        else:
            log.warning(
                "encoder %s: RANDOMLY INITIALISED architecture (pretrained=False), tests only", name
            )
            model = timm.create_model(tname.split(".")[0], pretrained=False, **kwargs)
        super().__init__(name, model.embed_dim, resolution, pretrained or weights is not None)
        self.model, self.input_size, self.family = model, input_size, fam

    @torch.no_grad()
    def forward(self, images):
        """uint8 images (B, 3, H, W) -> the family's patch tokens (B, (H/16)^2, embed_dim)."""
        self.check_images(images)
        x = images.float() / 255
        if self.family.clip:  # REPA resizes, then normalises with CLIP's mean/std
            x = normalize(
                F.interpolate(x, self.input_size, mode="bicubic"), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
            )
        else:  # ImageNet's mean/std, then the resize of DINOv2 and I-JEPA
            x = normalize(x)
            if self.family.resize:
                x = F.interpolate(x, self.input_size, mode="bicubic")  # (B, 3, 224, 224) at 256 px
        # the last block's tokens, prefix (class, registers) dropped, final norm as the family's
        # REPA code does
        return self.model.forward_intermediates(
            x, indices=1, norm=self.family.final_norm, output_fmt="NLC", intermediates_only=True
        )[0]  # (B, N, D)


def read_checkpoint(path):
    """A local checkpoint file -> state dict: .safetensors, a torch file, or a TorchScript archive
    (CLIP's)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    if zipfile.is_zipfile(path) and any(
        n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist()
    ):
        # openai/CLIP ships TorchScript archives, which torch.load(weights_only=True) refuses; CLIP
        # loads them so too
        return torch.jit.load(path, map_location="cpu").state_dict()
    return torch.load(path, map_location="cpu", weights_only=True)


def mocov3_state_dict(state):
    """Official MoCo v3 checkpoint ({'state_dict': {'module.base_encoder.*'}}) -> the
    timm ViT's keys.

    As REPA's fix_mocov3_state_dict: keep the base encoder without its head, undo the checkpoint's
    blocks.13/14 norm13 / fc13 / norm14 / fc14 naming bug.
    """
    state = state.get("state_dict", state)
    prefix, out = "module.base_encoder.", {}
    # already the timm ViT's keys (e.g. bench.py's random weights)
    if not any(k.startswith(prefix) for k in state):
        return state
    fixes = {"blocks.13.norm13": "blocks.13.norm1", "blocks.13.mlp.fc13": "blocks.13.mlp.fc1",
             "blocks.14.norm14": "blocks.14.norm2", "blocks.14.mlp.fc14": "blocks.14.mlp.fc2"}
    for k, v in state.items():
        if not k.startswith(prefix) or k[len(prefix):].split(".")[0] in ("head", "fc"):
            continue
        k = k[len(prefix):]
        for bad, good in fixes.items():
            k = k.replace(bad, good)
        out[k] = v
    return out


def load_weights(model, path, family):
    """Load a local official checkpoint of the family (or timm's .safetensors / .pth) into its timm
    ViT."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = read_checkpoint(path)
    try:
        if family == "mocov3":
            state = mocov3_state_dict(state)
        # converts the official DINOv2 / CLIP / MAE ('model') / I-JEPA ('encoder') layouts and
        # resamples the pos-embed; float32, as CLIP's are fp16
        state = {k: v.float() for k, v in checkpoint_filter_fn(state, model).items()}
        # CLIP's proj becomes a head; REPA's tokens come before it
        if isinstance(model.head, nn.Identity):
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        model.load_state_dict(state, strict=True)
    # missing keys, shapes, unexpected nesting
    except (RuntimeError, ValueError, KeyError, AttributeError) as e:
        raise RuntimeError(
            f"encoder weights {path} do not fit {family} {type(model).__name__} "
            f"(embed_dim {model.embed_dim}): wrong model size or variant? {e}"
        ) from e
    return model


class TinyRandomEncoder(FrozenEncoder):
    """Smoke runs and tests only: a seeded random 16x16-stride conv patchifier + LayerNorm, no real
    representation."""

    def __init__(self, resolution=256, embed_dim=32, seed=0):
        """Random weights from seed, built without touching the global RNG."""
        if resolution % 16:
            raise ValueError(
                f"tiny-random encoder needs a resolution divisible by 16, got {resolution}"
            )
        super().__init__(TINY_RANDOM, embed_dim, resolution, pretrained=False)
        log.warning(
            "encoder tiny-random: a TINY RANDOMLY INITIALISED encoder, NOT a real representation; "
            "alignment to it is meaningless outside smoke runs and tests"
        )
        with torch.random.fork_rng(devices=[]):  # the same weights every time, global RNG untouched
            torch.manual_seed(seed)
            # one token per 16x16 px
            self.patchify = nn.Conv2d(3, embed_dim, kernel_size=16, stride=16)
            self.norm = nn.LayerNorm(embed_dim)

    @torch.no_grad()
    def forward(self, images):
        """uint8 images (B, 3, H, W) -> tokens (B, (H/16)^2, embed_dim): SiT-*/2's token grid on the
        8x latent."""
        self.check_images(images)
        x = self.patchify(normalize(images.float() / 255))  # (B, D, H/16, W/16)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, N, D), row-major tokens


def build_encoder(name, resolution=256, pretrained=True, weights=None, **arch):
    """One encoder by (canonical or alias) name; pretrained=False builds the architecture with
    random weights."""
    name = canonical_name(name)
    if name == TINY_RANDOM:
        return TinyRandomEncoder(resolution)
    return ViTEncoder(name, resolution, pretrained, weights, **arch)


def load_encoders(spec, device, resolution=256, weights=None, pretrained=True):
    """REPA's --enc-type spec ('dinov2-vit-b,dinov2-vit-l') -> list of frozen eval encoders."""
    # weights: None, or local checkpoint files comma-separated in the order of spec (an empty entry
    # downloads); pretrained=False builds the architectures with random weights (tests). All names
    # are checked before any download.
    names = [canonical_name(n) for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError(
            f"empty encoder spec {spec!r}: name at least one encoder, e.g. dinov2-vit-b"
        )
    paths = weights.split(",") if weights else [""] * len(names)
    if len(paths) != len(names):
        raise ValueError(
            f"{len(paths)} encoder weight files for {len(names)} encoders in {spec!r}: "
            "give one per encoder, comma-separated (empty to download)"
        )
    encoders = [
        build_encoder(n, resolution, pretrained, p.strip() or None) for n, p in zip(names, paths)
    ]
    return [e.to(device).eval().requires_grad_(False) for e in encoders]


# ----------------------------------------------------------------------------------------------
# The SD-VAE: images <-> latents

LATENT_SCALE = 0.18215  # SD-VAE latent scaling (same value for -ema and -mse)
VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def load_vae(name, device="cpu"):
    """AutoencoderKL by short name (ema / mse), hub id or local folder; 'tiny-random' for smoke
    runs."""
    from diffusers.models import AutoencoderKL

    if name == TINY_RANDOM:
        log.warning(
            "VAE: using a TINY RANDOMLY INITIALISED AutoencoderKL; decoded images are meaningless"
        )
        torch.manual_seed(0)  # the same tiny VAE in every process and run
        vae = AutoencoderKL(
            block_out_channels=(8, 8, 8, 8),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=4, latent_channels=4,
        )  # 3 downsamplings: the same 8x spatial reduction as SD-VAE
    else:
        hub_id = VAES.get(name, name)
        try:
            vae = AutoencoderKL.from_pretrained(hub_id) if os.path.isdir(hub_id) else from_hub(
                lambda: AutoencoderKL.from_pretrained(hub_id), f"the SD-VAE {name!r} ({hub_id})",
                "save it elsewhere (AutoencoderKL.save_pretrained) and pass that folder as --vae")
        except OSError as e:  # diffusers' message spans lines; keep the first and say what to do
            raise OSError(
                f"cannot load the SD-VAE {name!r} ({VAES.get(name, name)}): "
                f"{str(e).splitlines()[0]} Use ema / mse with network access, or a local "
                "diffusers folder"
            ) from e
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_moments(vae, images, logvar=False):
    """uint8 images (B, 3, H, W) -> posterior [mean, std] (B, 8, H/8, W/8) in float32; with logvar,
    [mean, logvar] as U-ViT's COCO features store it (diffusers clamps logvar to [-30, 20])."""
    x = images.to(vae.device, torch.float32) / 127.5 - 1  # [-1, 1], as REPA encodes
    dist = vae.encode(x).latent_dist
    spread = dist.logvar if logvar else dist.std
    return torch.cat([dist.mean, spread], dim=1).float()  # (B, 8, h, w)


def sample_latent(moments, eps):
    """Moments (B, 8, h, w) and eps (B, 4, h, w) -> scaled x0 = (mean + std * eps) * 0.18215
    (REPA, every step)."""
    mean, std = moments.float().chunk(2, dim=1)  # (B, 4, h, w) each
    return (mean + std * eps) * LATENT_SCALE


def to_uint8(x, rounding=False):
    """[-1, 1] floats -> uint8: truncation as REPA's generate.py (the papers' FIDs), or rounding as
    DiT."""
    # REPA's exact float ops: one ulp can flip a floor
    x = x * 127.5 + 128.0 if rounding else 255 * ((x + 1) / 2)
    return x.clamp(0, 255).to(torch.uint8)  # to() truncates


@torch.no_grad()
def decode(vae, latents, rounding=False):
    """Scaled latents (B, 4, h, w) -> uint8 images (B, 3, 8h, 8w)."""
    return to_uint8(
        vae.decode(latents.to(vae.device, torch.float32) / LATENT_SCALE).sample, rounding
    )


# ----------------------------------------------------------------------------------------------
# The text encoder (text-to-image): CLIP ViT-L/14's text transformer, as REPA's T2I features
#
# REPA's MS-COCO features come from U-ViT's FrozenCLIPEmbedder (libs/clip.py): the transformers
# CLIPTokenizer and CLIPTextModel of openai/clip-vit-large-patch14, every caption padded to 77
# tokens ("max_length", the pad token being end-of-text) and truncated there, input_ids only (no
# attention mask: the causal mask already keeps padding from earlier tokens), last_hidden_state.

CLIP_TEXT = "openai/clip-vit-large-patch14"
TEXT_TOKENS = 77  # CLIP's context length: every caption becomes this many tokens


class TextEncoder(nn.Module):
    """A frozen tokenizer + text transformer: captions -> (B, 77, dim) token features."""

    def __init__(self, name, tokenizer, model, pretrained):
        super().__init__()
        self.name, self.tokenizer, self.model, self.pretrained = name, tokenizer, model, pretrained
        self.dim = model.config.hidden_size
        self.truncation_said = False  # a caption over 77 tokens is reported once per encoder
        self.requires_grad_(False)

    def train(self, mode=True):
        """Stay in eval mode whatever the caller asks: the features are a fixed condition."""
        return super().train(False)

    def warn_truncation(self, captions):
        """Say once that captions longer than 77 tokens lose their tail (CLIP sees no more)."""
        if self.truncation_said:
            return
        ids = self.tokenizer(captions, truncation=False, verbose=False)["input_ids"]
        long = [(len(i), c) for i, c in zip(ids, captions) if len(i) > TEXT_TOKENS]
        if long:
            self.truncation_said = True
            log.warning(
                "text encoder %s: a caption of %d tokens (start and end included) is truncated "
                "to %d (CLIP's context), e.g. %r; said once, later ones are truncated silently",
                self.name, long[0][0], TEXT_TOKENS, long[0][1][:60] + "...",
            )

    @torch.no_grad()
    def encode(self, captions):
        """list of B captions -> float32 last_hidden_state (B, 77, dim) on the encoder's device."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("encode takes a list of caption strings, e.g. encode(['a red bus'])")
        captions = list(captions)
        self.warn_truncation(captions)
        ids = self.tokenizer(
            captions, truncation=True, max_length=TEXT_TOKENS, padding="max_length",
            return_tensors="pt",
        )["input_ids"]  # (B, 77), end-of-text after the caption up to 77
        device = next(self.model.parameters()).device
        return self.model(input_ids=ids.to(device)).last_hidden_state.float()  # (B, 77, dim)

    def null_context(self):
        """The empty caption's features (1, 77, dim): the null condition of guidance (REPA's
        y_null, U-ViT's empty_context)."""
        return self.encode([""])


def tiny_tokenizer():
    """Smoke runs and tests only: a byte-level CLIPTokenizer built in code, offline (every byte one
    token, no merges; ids: start 0, end 1, the 256 byte symbols, then each as a word's last)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte-level symbols
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {s: i for i, s in enumerate(specials + chars + [c + "</w>" for c in chars])}
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_text_encoder(dim=32, seed=0):
    """Smoke runs and tests only: tiny_tokenizer and a 2-layer random CLIPTextModel, the same
    weights every time."""
    from transformers import CLIPTextConfig, CLIPTextModel

    log.warning(
        "text encoder tiny-random: a TINY RANDOMLY INITIALISED CLIP text model with a byte-level "
        "vocabulary, NOT CLIP; its text conditioning is meaningless outside smoke runs and tests"
    )
    tokenizer = tiny_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TEXT_TOKENS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # global RNG untouched
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    return TextEncoder(TINY_RANDOM, tokenizer, model.eval(), pretrained=False)


def load_text_encoder(name=CLIP_TEXT, path=None, device="cpu", random=False):
    """The frozen text encoder by hub name, from a local folder (path: a saved copy of the hub
    repository, for offline machines), or the tiny random one (random=True or name 'tiny-random').
    """
    if random or name == TINY_RANDOM:
        return tiny_text_encoder().to(device)
    from transformers import CLIPTextModel, CLIPTokenizer

    if path is not None and not os.path.isdir(path):
        raise FileNotFoundError(
            f"text encoder folder {path} does not exist: give a local copy of the {name} hub "
            "repository (its tokenizer and config files and weights)"
        )
    source = path or name

    def load():
        return (CLIPTextModel.from_pretrained(source, dtype=torch.float32),
                CLIPTokenizer.from_pretrained(source))

    try:
        model, tokenizer = load() if os.path.isdir(source) else from_hub(
            load, f"the text encoder {name!r}", "save a copy of its hub repository elsewhere and "
            "pass that folder as --text-encoder-path")
    except OSError as e:  # transformers' message spans lines; keep the first and say what to do
        raise OSError(
            f"cannot load the text encoder {name!r} from {source}: {str(e).splitlines()[0]} "
            "Check the network or the Hugging Face cache, or pass a local copy of the repository "
            "as the text encoder's folder"
        ) from e
    # transformers builds a near-empty tokenizer when the folder has no tokenizer files
    if len(tokenizer) != model.config.vocab_size:
        raise OSError(
            f"text encoder {source}: the tokenizer has {len(tokenizer)} tokens but the model "
            f"{model.config.vocab_size}: the folder lacks CLIP's tokenizer files (vocab.json, "
            "merges.txt) or mixes two models"
        )
    return TextEncoder(name, tokenizer, model.eval(), pretrained=True).to(device)
