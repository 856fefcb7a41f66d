"""Training data: the REPA layout (images + SD-VAE posterior moments + labels) and a synthetic stand-in.

Both datasets yield (image uint8 (3, H, W), moments float32 (8, H/8, W/8) = posterior [mean, std], label int64).
x0 is not sampled here: train.py draws x0 = (mean + std * eps) * 0.18215 from the moments every step (encoders.sample_latent).
"""

import colorsys
import json
import logging
import os

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from encoders import LATENT_SCALE

log = logging.getLogger(__name__)

PREPARE_HINT = "run prepare.py --source <imagenet train folder> --dest <data dir> to create it"


def supported_ext():
    """File extensions REPA's CustomDataset reads: every image format PIL knows, plus .npy."""
    PIL.Image.init()
    return set(PIL.Image.EXTENSION) | {".npy"}


def list_files(root):
    """Sorted relative paths of the supported files below root, exactly as REPA's CustomDataset lists them."""
    exts = supported_ext()
    names = (os.path.relpath(os.path.join(d, f), start=root) for d, _, files in os.walk(root) for f in files)
    return sorted(n for n in names if os.path.splitext(n)[1].lower() in exts)


def load_image(path):
    """An image file (PNG etc., or .npy) -> uint8 array (C, H, W), as REPA's CustomDataset decodes it."""
    if path.lower().endswith(".npy"):
        image = np.load(path)
        return image.reshape(-1, *image.shape[-2:])
    image = np.array(PIL.Image.open(path))
    return image.reshape(*image.shape[:2], -1).transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)


class LatentImageDataset(Dataset):
    """data_dir/images/** paired by sorted order with data_dir/vae-sd/** moments, labels from vae-sd/dataset.json."""

    synthetic = False

    def __init__(self, data_dir):
        """Index data_dir and validate it; ValueError with the fix when the layout is broken."""
        if not os.path.isdir(data_dir):
            raise ValueError(f"data dir {data_dir} does not exist: {PREPARE_HINT}")
        self.images_dir = os.path.join(data_dir, "images")
        self.features_dir = os.path.join(data_dir, "vae-sd")
        for d in (self.images_dir, self.features_dir):
            if not os.path.isdir(d):
                raise ValueError(f"{d} is missing (REPA layout: images/ and vae-sd/): {PREPARE_HINT}")
        self.image_fnames = list_files(self.images_dir)
        self.feature_fnames = list_files(self.features_dir)
        if not self.feature_fnames:
            raise ValueError(f"no images or latents under {data_dir}: {PREPARE_HINT}")
        if len(self.image_fnames) != len(self.feature_fnames):
            raise ValueError(f"{len(self.image_fnames)} images in {self.images_dir} but {len(self.feature_fnames)} "
                             f"latent files in {self.features_dir}: an interrupted preparation? re-run prepare.py")
        self.labels, self.num_classes, self.vae = self.read_labels()
        if self.vae == "tiny-random":
            log.warning("data: %s was encoded with the TINY RANDOM VAE (prepare.py --vae tiny-random): "
                        "for smoke runs and tests only", self.features_dir)
        image = load_image(os.path.join(self.images_dir, self.image_fnames[0]))
        self.resolution = image.shape[-2]
        moments = np.load(os.path.join(self.features_dir, self.feature_fnames[0]), mmap_mode="r")
        expected = (8, self.resolution // 8, image.shape[-1] // 8)
        if image.shape[0] != 3 or tuple(moments.shape) != expected:
            raise ValueError(f"{self.feature_fnames[0]} holds moments of shape {tuple(moments.shape)} for a "
                             f"{tuple(image.shape)} image; SD-VAE posterior [mean, std] is {expected} for RGB: "
                             f"re-run prepare.py")
        self.latent_size = expected[1]

    def read_labels(self):
        """(labels in feature order, number of classes, VAE name or None) from vae-sd/dataset.json."""
        path = os.path.join(self.features_dir, "dataset.json")
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing (it holds the class labels): {PREPARE_HINT}")
        with open(path, "rb") as f:
            meta = json.load(f)
        if not meta.get("labels"):
            raise ValueError(f"{path} has no labels (class-conditional training needs them): {PREPARE_HINT}")
        by_name = dict(meta["labels"])
        missing = [n for n in self.feature_fnames if n.replace("\\", "/") not in by_name]
        if missing:
            raise ValueError(f"{path} has no label for {len(missing)} latent files (e.g. {missing[0]}): "
                             f"re-run prepare.py")
        labels = np.array([by_name[n.replace("\\", "/")] for n in self.feature_fnames])
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.min() < 0:
            raise ValueError(f"{path}: labels must be one class index >= 0 per file, got {labels.dtype} "
                             f"of shape {labels.shape}")
        num_classes = int(meta.get("num_classes", labels.max() + 1))  # prepare.py stores it; REPA's json does not
        if labels.max() >= num_classes:
            raise ValueError(f"{path}: label {labels.max()} but num_classes {num_classes}: re-run prepare.py")
        return labels.astype(np.int64), num_classes, meta.get("vae")  # vae: written by prepare.py only

    def __len__(self):
        return len(self.feature_fnames)

    def __getitem__(self, idx):
        """(image uint8 (3, H, W), moments float32 (8, h, w), label int64 scalar) of pair idx."""
        image = load_image(os.path.join(self.images_dir, self.image_fnames[idx]))
        moments = np.load(os.path.join(self.features_dir, self.feature_fnames[idx]))
        return torch.from_numpy(image), torch.from_numpy(moments).float(), torch.tensor(self.labels[idx])


# Synthetic latents: 8x average-pooled colour in [-1, 1] mixed to luma and two colour-opponent channels, plus the
# 8x8 local contrast of luma as a fourth channel (it sees the stripes the pooling averages away); centred and scaled
# per channel with constants measured on this dataset so that x0 = mean * 0.18215 has about zero mean and unit
# variance, as SD-VAE latents do. The posterior std is a small constant: x0 noise of 0.05.
SYNTH_MIX = torch.tensor([[0.299, 0.587, 0.114], [0.5, -0.5, 0.0], [-0.25, -0.25, 0.5]])
SYNTH_CENTER = torch.tensor([-0.45, -0.017, 0.01, 0.045])  # feature means over 32-256 px
SYNTH_SCALE = torch.tensor([0.15, 0.22, 0.18, 0.05])  # feature stds over 32-256 px
SYNTH_STD = 0.05 / LATENT_SCALE


def synthetic_moments(image):
    """uint8 image (3, H, W) -> deterministic VAE-like posterior [mean, std] (8, H/8, W/8), see the note above."""
    x = image.float() / 127.5 - 1  # [-1, 1], the VAE's input range
    colour = torch.einsum("oc,chw->ohw", SYNTH_MIX, F.avg_pool2d(x, 8))  # (3, h, w)
    luma = torch.einsum("c,chw->hw", SYNTH_MIX[0], x)[None]  # (1, H, W)
    contrast = (F.avg_pool2d(luma**2, 8) - F.avg_pool2d(luma, 8) ** 2).clamp_min(0).sqrt()  # (1, h, w)
    features = torch.cat([colour, contrast])  # (4, h, w)
    mean = (features - SYNTH_CENTER[:, None, None]) / SYNTH_SCALE[:, None, None] / LATENT_SCALE
    return torch.cat([mean, torch.full_like(mean, SYNTH_STD)])  # (8, h, w)


def synthetic_image(label, num_classes, resolution, rng):
    """Procedural uint8 picture (3, H, W): colours, shape, stripes set by the class; placement and noise by rng."""
    hue = (label * 0.618034) % 1  # golden-ratio hues keep neighbouring classes apart
    fg = np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95))
    bg = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1, 0.6, 0.35))
    y, x = np.meshgrid(np.linspace(-1, 1, resolution), np.linspace(-1, 1, resolution), indexing="ij")
    cy, cx = rng.uniform(-0.3, 0.3, size=2)
    radius = rng.uniform(0.35, 0.6)
    dy, dx = y - cy, x - cx
    shape = label % 3  # disc, square or diamond
    dist = np.hypot(dy, dx) if shape == 0 else np.maximum(abs(dy), abs(dx)) if shape == 1 else abs(dy) + abs(dx)
    mask = np.clip((radius - dist) * resolution / 4, 0, 1)  # soft edge a few pixels wide
    angle = np.pi * label / num_classes + rng.normal(0, 0.1)
    freq = 2 + (label // 3) % 5  # stripe periods across the picture
    stripes = 0.5 + 0.5 * np.sin(np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    shade = rng.uniform(0.8, 1.2)
    picture = bg[:, None, None] * (1 - mask) + fg[:, None, None] * mask * (0.6 + 0.4 * stripes) * shade  # (3, H, W)
    picture += rng.normal(0, 0.02, size=picture.shape)
    return torch.from_numpy(np.clip(picture * 255 + 0.5, 0, 255).astype(np.uint8))


class SyntheticDataset(Dataset):
    """SYNTHETIC class-conditional data for smoke runs and tests: procedural images, VAE-like moments, no download."""

    synthetic = True

    def __init__(self, num_images=1024, num_classes=10, resolution=256, seed=0):
        """num_images items (label = index % num_classes) at resolution px, fixed by seed."""
        if resolution % 16 or resolution <= 0:
            raise ValueError(f"synthetic resolution must be a positive multiple of 16 (8x VAE, 2x patches), "
                             f"got {resolution}")
        if num_images < 1 or num_classes < 1:
            raise ValueError(f"synthetic data needs num_images >= 1 and num_classes >= 1, "
                             f"got {num_images} and {num_classes}")
        self.num_images, self.num_classes, self.resolution, self.seed = num_images, num_classes, resolution, seed
        self.latent_size = resolution // 8
        log.warning("data: SYNTHETIC procedural dataset (%d images, %d classes, %d px), not ImageNet: "
                    "for smoke runs and tests only", num_images, num_classes, resolution)

    def __len__(self):
        return self.num_images

    def __getitem__(self, idx):
        """(image uint8 (3, H, W), moments float32 (8, h, w), label int64 scalar), a function of (seed, idx) only."""
        if not 0 <= idx < self.num_images:
            raise IndexError(f"index {idx} out of range for {self.num_images} synthetic images")
        label = idx % self.num_classes  # balanced classes
        image = synthetic_image(label, self.num_classes, self.resolution, np.random.default_rng([self.seed, idx]))
        return image, synthetic_moments(image), torch.tensor(label, dtype=torch.int64)
