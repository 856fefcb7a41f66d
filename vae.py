"""The SD-VAE that maps 256 px images to 4x32x32 latents: loading, encoding to moments, decoding.

prepare.py encodes with it, train.py decodes its sample grids with it, sample.py decodes with it.
The latent convention is REPA's: images in [-1, 1], posterior [mean, std] stored per image, and
the diffusion model sees x0 = (mean + std * eps) * 0.18215.
"""

import logging

import torch

LATENT_SCALE = 0.18215  # SD-VAE latent scaling (same value for -ema and -mse)
VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
TINY_RANDOM = "tiny-random"  # smoke runs and tests only: randomly initialised, never a real VAE

log = logging.getLogger(__name__)


def load_vae(name, device="cpu"):
    """AutoencoderKL by short name (ema / mse), hub id or local folder; 'tiny-random' for smoke runs."""
    from diffusers.models import AutoencoderKL

    if name == TINY_RANDOM:
        log.warning("VAE: using a TINY RANDOMLY INITIALISED AutoencoderKL; decoded images are meaningless")
        torch.manual_seed(0)  # the same tiny VAE in every process and run
        vae = AutoencoderKL(
            block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4, latent_channels=4,
        )  # 3 downsamplings: the same 8x spatial reduction as SD-VAE
    else:
        try:
            vae = AutoencoderKL.from_pretrained(VAES.get(name, name))
        except OSError as e:  # diffusers' message spans lines; keep the first and say what to do
            raise OSError(f"cannot load the SD-VAE {name!r} ({VAES.get(name, name)}): {str(e).splitlines()[0]} "
                          "Use ema / mse with network access, or a local diffusers folder") from e
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_moments(vae, images):
    """uint8 images (B, 3, H, W) -> posterior [mean, std] (B, 8, H/8, W/8) in float32."""
    x = images.to(vae.device, torch.float32) / 127.5 - 1  # [-1, 1], as REPA encodes
    dist = vae.encode(x).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).float()  # (B, 8, h, w)


def sample_latent(moments, eps):
    """Moments (B, 8, h, w) and eps (B, 4, h, w) -> scaled x0 = (mean + std * eps) * 0.18215 (REPA, every step)."""
    mean, std = moments.float().chunk(2, dim=1)  # (B, 4, h, w) each
    return (mean + std * eps) * LATENT_SCALE


def to_uint8(x, rounding=False):
    """[-1, 1] floats -> uint8: truncation as REPA's generate.py (the papers' FIDs), or rounding as DiT."""
    x = x * 127.5 + 128.0 if rounding else 255 * ((x + 1) / 2)  # REPA's exact float ops: one ulp can flip a floor
    return x.clamp(0, 255).to(torch.uint8)  # to() truncates


@torch.no_grad()
def decode(vae, latents, rounding=False):
    """Scaled latents (B, 4, h, w) -> uint8 images (B, 3, 8h, 8w)."""
    return to_uint8(vae.decode(latents.to(vae.device, torch.float32) / LATENT_SCALE).sample, rounding)
