"""Training data in REPA's layout: make it from class folders (run this file), read it, or stand in
for it; and the text-to-image data of MS-COCO 2014 (the COCO section at the end).

Reading: the REPA layout (images + SD-VAE posterior moments + labels) and a synthetic stand-in.
Both datasets yield (image uint8 (3, H, W), moments float32 (8, H/8, W/8) = posterior [mean, std],
label int64); CocoDataset yields text features (77, D) in the label's place. x0 is not sampled
here: train.py draws x0 = (mean + std * eps) * 0.18215 from the moments every step
(encoders.sample_latent).

Making it (`python data.py --source ... --dest ...`, at the end of this file):

    dest/images/00000/img00000000.png            ADM center crop ("center-crop-dhariwal")
    dest/images/dataset.json                     {"labels": [["00000/img00000000.png", 0], ...]}
    dest/vae-sd/00000/img-mean-std-00000000.npy  SD-VAE posterior [mean, std] (8, res/8, res/8)
    dest/vae-sd/dataset.json                     {"labels": [["00000/img-mean-std-00000000.npy",
                                                 0], ...], ...}

Class index = position of the top-level folder name in sorted order; image index = position of
its relative path in sorted order (as REPA's preprocessing/dataset_tools.py numbers them);
symlinked folders are followed. Run as `python data.py ...` or on all GPUs with
`torchrun --nproc_per_node=N data.py ...`: each rank takes every N-th image. Resumable: re-running
the same command skips every image whose latent file exists; each file is written under a
temporary name and then renamed, so an interrupted run leaves no half-written file behind. A
source image that does not decode is skipped, logged once and listed in dest/bad_files.txt.
`python data.py --verify DEST` reads every prepared file of either layout back in parallel
(resumably) and lists the bad ones there, and the next run makes exactly the listed and the
missing files again. `--dataset coco` makes the COCO layout the same way (a COCO source image
that does not decode stops the run instead; --verify's listed files remake their whole image, its
crop, moments and every caption's features).
"""

import argparse
import colorsys
import datetime
import functools
import json
import logging
import os
import re
import sys

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import cluster
import encoders
from cluster import UserError, write_atomic
from encoders import LATENT_SCALE

log = logging.getLogger(__name__)

PREPARE_HINT = "run data.py --source <imagenet train folder> --dest <data dir> to create it"


def supported_ext():
    """File extensions REPA's CustomDataset reads: every image format PIL knows, plus .npy."""
    PIL.Image.init()
    return set(PIL.Image.EXTENSION) | {".npy"}


def list_files(root):
    """Sorted relative paths of the supported files below root, exactly as REPA's CustomDataset
    lists them."""
    exts = supported_ext()
    names = (
        os.path.relpath(os.path.join(d, f), start=root)
        for d, _, files in os.walk(root)
        for f in files
    )
    return sorted(n for n in names if os.path.splitext(n)[1].lower() in exts)


def load_image(path):
    """An image file (PNG etc., or .npy) -> uint8 array (C, H, W), as REPA's CustomDataset decodes
    it."""
    if path.lower().endswith(".npy"):
        image = np.load(path)
        return image.reshape(-1, *image.shape[-2:])
    image = np.array(PIL.Image.open(path))
    return image.reshape(*image.shape[:2], -1).transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)


class BadSample(ValueError):
    """A sample file that does not read as training data: path says which, reason why."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def read_checked(path, shape, dtype, read):
    """read(path) as an array of the given shape and dtype (np.uint8 images, np.floating or one
    float type, finite); BadSample saying why not (truncated, undecodable, wrong shape or dtype)."""
    try:
        array = read(path)
    except (ValueError, OSError, EOFError, SyntaxError) as e:  # truncated, undecodable, I/O
        if isinstance(e, ValueError) and path.endswith(".npy"):  # np.load never runs a pickle
            raise BadSample(path, "not an array file (garbage or pickled data)") from e
        text = " ".join(str(e).split())[:200]  # one line
        raise BadSample(path, f"unreadable ({type(e).__name__}: {text})") from e
    if not np.issubdtype(array.dtype, dtype):
        raise BadSample(path, f"dtype {array.dtype}, expected {dtype.__name__}")
    if tuple(array.shape) != tuple(shape):
        raise BadSample(path, f"shape {tuple(array.shape)}, expected {tuple(shape)}")
    if np.issubdtype(dtype, np.floating) and not np.isfinite(array).all():
        raise BadSample(path, "non-finite values")
    return array


class LatentImageDataset(Dataset):
    """data_dir/images/** paired by sorted order with data_dir/vae-sd/** moments, labels from
    vae-sd/dataset.json."""

    synthetic = False

    def __init__(self, data_dir):
        """Index data_dir and validate it; ValueError with the fix when the layout is broken."""
        if not os.path.isdir(data_dir):
            raise ValueError(f"data dir {data_dir} does not exist: {PREPARE_HINT}")
        self.images_dir = os.path.join(data_dir, "images")
        self.features_dir = os.path.join(data_dir, "vae-sd")
        for d in (self.images_dir, self.features_dir):
            if not os.path.isdir(d):
                raise ValueError(
                    f"{d} is missing (REPA layout: images/ and vae-sd/): {PREPARE_HINT}"
                )
        self.image_fnames = list_files(self.images_dir)
        self.feature_fnames = list_files(self.features_dir)
        if not self.feature_fnames:
            raise ValueError(f"no images or latents under {data_dir}: {PREPARE_HINT}")
        if len(self.image_fnames) != len(self.feature_fnames):
            raise ValueError(
                f"{len(self.image_fnames)} images in {self.images_dir} but "
                f"{len(self.feature_fnames)} "
                f"latent files in {self.features_dir}: an interrupted preparation? re-run data.py"
            )
        self.labels, self.num_classes, self.vae = self.read_labels()
        if self.vae == "tiny-random":
            log.warning(
                "data: %s was encoded with the TINY RANDOM VAE (data.py --vae tiny-random): "
                "for smoke runs and tests only",
                self.features_dir,
            )
        image, moments = self.first_readable()
        self.resolution = image.shape[-2]
        expected = (8, self.resolution // 8, image.shape[-1] // 8)
        if image.shape[0] != 3 or tuple(moments.shape) != expected:
            raise ValueError(
                f"{self.feature_fnames[0]} holds moments of shape {tuple(moments.shape)} for a "
                f"{tuple(image.shape)} image; SD-VAE posterior [mean, std] is {expected} for RGB: "
                f"re-run data.py"
            )
        self.latent_size, self.shapes = expected[1], (tuple(image.shape), expected)

    def read_labels(self):
        """(labels in feature order, number of classes, VAE name or None) from vae-sd/dataset.json.
        """
        path = os.path.join(self.features_dir, "dataset.json")
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing (it holds the class labels): {PREPARE_HINT}")
        with open(path, "rb") as f:
            meta = json.load(f)
        if not meta.get("labels"):
            raise ValueError(
                f"{path} has no labels (class-conditional training needs them): {PREPARE_HINT}"
            )
        by_name = dict(meta["labels"])
        missing = [n for n in self.feature_fnames if n.replace("\\", "/") not in by_name]
        if missing:
            raise ValueError(
                f"{path} has no label for {len(missing)} latent files (e.g. {missing[0]}): "
                f"re-run data.py"
            )
        labels = np.array([by_name[n.replace("\\", "/")] for n in self.feature_fnames])
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.min() < 0:
            raise ValueError(
                f"{path}: labels must be one class index >= 0 per file, got {labels.dtype} "
                f"of shape {labels.shape}"
            )
        # data.py stores it; REPA's json does not
        num_classes = int(meta.get("num_classes", labels.max() + 1))
        if labels.max() >= num_classes:
            raise ValueError(
                f"{path}: label {labels.max()} but num_classes {num_classes}: re-run data.py"
            )
        return labels.astype(np.int64), num_classes, meta.get("vae")  # vae: written by data.py only

    def first_readable(self):
        """(image, moments) of the first pair whose files decode: their shapes set the layout."""
        for image_name, feature_name in zip(self.image_fnames, self.feature_fnames):
            try:
                return (load_image(os.path.join(self.images_dir, image_name)),
                        np.load(os.path.join(self.features_dir, feature_name), mmap_mode="r"))
            except (ValueError, OSError, EOFError, SyntaxError):  # a bad file: BadSample later
                continue
        raise ValueError(f"no image and latent file under {self.images_dir} and "
                         f"{self.features_dir} decodes: re-run data.py")

    def __len__(self):
        return len(self.feature_fnames)

    def __getitem__(self, idx):
        """(image uint8 (3, H, W), moments float32 (8, h, w), label int64 scalar) of pair idx;
        BadSample when one of its files does not read as one."""
        image = read_checked(os.path.join(self.images_dir, self.image_fnames[idx]),
                             self.shapes[0], np.uint8, load_image)
        moments = read_checked(os.path.join(self.features_dir, self.feature_fnames[idx]),
                               self.shapes[1], np.floating, np.load)
        return (
            torch.from_numpy(image),
            torch.from_numpy(moments).float(),
            torch.tensor(self.labels[idx]),
        )


# Synthetic latents: 8x average-pooled colour in [-1, 1] mixed to luma and two colour-opponent
# channels, plus the 8x8 local contrast of luma as a fourth channel (it sees the stripes the pooling
# averages away); centred and scaled per channel with constants measured on this dataset so that
# x0 = mean * 0.18215 has about zero mean and unit variance, as SD-VAE latents do. The posterior
# std is a small constant: x0 noise of 0.05.
SYNTH_MIX = torch.tensor([[0.299, 0.587, 0.114], [0.5, -0.5, 0.0], [-0.25, -0.25, 0.5]])
SYNTH_CENTER = torch.tensor([-0.45, -0.017, 0.01, 0.045])  # feature means over 32-256 px
SYNTH_SCALE = torch.tensor([0.15, 0.22, 0.18, 0.05])  # feature stds over 32-256 px
SYNTH_STD = 0.05 / LATENT_SCALE


def synthetic_moments(image):
    """uint8 image (3, H, W) -> deterministic VAE-like posterior [mean, std] (8, H/8, W/8), see the
    note above."""
    x = image.float() / 127.5 - 1  # [-1, 1], the VAE's input range
    colour = torch.einsum("oc,chw->ohw", SYNTH_MIX, F.avg_pool2d(x, 8))  # (3, h, w)
    luma = torch.einsum("c,chw->hw", SYNTH_MIX[0], x)[None]  # (1, H, W)
    # (1, h, w)
    contrast = (F.avg_pool2d(luma**2, 8) - F.avg_pool2d(luma, 8) ** 2).clamp_min(0).sqrt()
    features = torch.cat([colour, contrast])  # (4, h, w)
    mean = (features - SYNTH_CENTER[:, None, None]) / SYNTH_SCALE[:, None, None] / LATENT_SCALE
    return torch.cat([mean, torch.full_like(mean, SYNTH_STD)])  # (8, h, w)


def synthetic_image(label, num_classes, resolution, rng):
    """Procedural uint8 picture (3, H, W): colours, shape, stripes set by the class; placement and
    noise by rng."""
    hue = (label * 0.618034) % 1  # golden-ratio hues keep neighbouring classes apart
    fg = np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95))
    bg = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1, 0.6, 0.35))
    y, x = np.meshgrid(
        np.linspace(-1, 1, resolution), np.linspace(-1, 1, resolution), indexing="ij"
    )
    cy, cx = rng.uniform(-0.3, 0.3, size=2)
    radius = rng.uniform(0.35, 0.6)
    dy, dx = y - cy, x - cx
    shape = label % 3  # disc, square or diamond
    dist = (
        np.hypot(dy, dx)
        if shape == 0
        else np.maximum(abs(dy), abs(dx))
        if shape == 1
        else abs(dy) + abs(dx)
    )
    mask = np.clip((radius - dist) * resolution / 4, 0, 1)  # soft edge a few pixels wide
    angle = np.pi * label / num_classes + rng.normal(0, 0.1)
    freq = 2 + (label // 3) % 5  # stripe periods across the picture
    stripes = 0.5 + 0.5 * np.sin(
        np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 2 * np.pi)
    )
    shade = rng.uniform(0.8, 1.2)
    picture = (
        bg[:, None, None] * (1 - mask) + fg[:, None, None] * mask * (0.6 + 0.4 * stripes) * shade
    )  # (3, H, W)
    picture += rng.normal(0, 0.02, size=picture.shape)
    return torch.from_numpy(np.clip(picture * 255 + 0.5, 0, 255).astype(np.uint8))


class SyntheticDataset(Dataset):
    """SYNTHETIC class-conditional data for smoke runs and tests: procedural images, VAE-like
    moments, no download."""

    synthetic = True

    def __init__(self, num_images=1024, num_classes=10, resolution=256, seed=0):
        """num_images items (label = index % num_classes) at resolution px, fixed by seed."""
        if resolution % 16 or resolution <= 0:
            raise ValueError(
                f"synthetic resolution must be a positive multiple of 16 (8x VAE, 2x patches), "
                f"got {resolution}"
            )
        if num_images < 1 or num_classes < 1:
            raise ValueError(f"synthetic data needs num_images >= 1 and num_classes >= 1, "
                             f"got {num_images} and {num_classes}")
        self.num_images, self.num_classes, self.resolution, self.seed = (
            num_images, num_classes, resolution, seed,
        )
        self.latent_size = resolution // 8
        log.warning(
            "data: SYNTHETIC procedural dataset (%d images, %d classes, %d px), not ImageNet: "
            "for smoke runs and tests only", num_images, num_classes, resolution,
        )

    def __len__(self):
        return self.num_images

    def __getitem__(self, idx):
        """(image uint8 (3, H, W), moments float32 (8, h, w), label int64 scalar), a function of
        (seed, idx) only."""
        if not 0 <= idx < self.num_images:
            raise IndexError(f"index {idx} out of range for {self.num_images} synthetic images")
        label = idx % self.num_classes  # balanced classes
        image = synthetic_image(
            label, self.num_classes, self.resolution, np.random.default_rng([self.seed, idx])
        )
        return image, synthetic_moments(image), torch.tensor(label, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# What train.py reads: the dataset of --data-dir and the order of its global batches

SYNTHETIC = "synthetic"  # --data-dir value of the built-in procedural dataset


def build_dataset(config):
    """The REPA-layout dataset of config's data_dir, or the synthetic one (loudly labelled)."""
    try:
        if config["data_dir"] == SYNTHETIC:
            dataset = SyntheticDataset(config["synthetic_images"], config["synthetic_classes"],
                                       config["resolution"], config["seed"])
        elif is_coco(config["data_dir"]):  # text-to-image (see the COCO section below)
            dataset = CocoDataset(config["data_dir"], "train", config["seed"],
                                  {k: config.get(k) for k in ("text_encoder", "moments")})
        else:
            dataset = LatentImageDataset(config["data_dir"])
    except ValueError as e:
        raise UserError(str(e)) from e
    if dataset.resolution != config["resolution"]:
        raise UserError(f"{config['data_dir']} holds {dataset.resolution} px images but "
                        f"--resolution is {config['resolution']}")
    GlobalBatchSampler(len(dataset), config["batch_size"], 0, 1, 0, 0)  # one batch, before the run
    return dataset


class GlobalBatchSampler(Sampler):
    """Endless batches: this rank's slice of global batch i of epoch e = randperm(seed, e)[i*G :
    (i+1)*G].

    The composition of every global batch depends only on the seed, so any number of ranks sees the
    same data as one process, and a resumed run restarts at the exact batch it stopped at. keyed:
    the items are (index, step) pairs, for datasets whose draws depend on the step (COCO captions).
    """

    def __init__(self, size, global_batch, rank, world, seed, start_step, keyed=False):
        if size < global_batch:
            raise UserError(f"the dataset has {size} images, fewer than one global batch of "
                            f"{global_batch}")
        self.size, self.global_batch, self.seed, self.start_step, self.keyed = (
            size, global_batch, seed, start_step, keyed,
        )
        self.local = global_batch // world
        self.offset = rank * self.local
        self.per_epoch = size // global_batch  # the last partial batch of an epoch is dropped

    def __iter__(self):
        """Index lists of length global_batch / world, from start_step on, forever."""
        step, epoch, perm = self.start_step, -1, None
        while True:
            e, i = divmod(step, self.per_epoch)
            if e != epoch:
                gen = torch.Generator().manual_seed(self.seed + e)
                epoch, perm = e, torch.randperm(self.size, generator=gen)
            start = i * self.global_batch + self.offset
            batch = perm[start : start + self.local].tolist()
            yield [(i, step) for i in batch] if self.keyed else batch
            step += 1


class StandIns(Dataset):
    """dataset[i] plus a note: "" when sample i read, else "path<TAB>reason" of its bad file and the
    next readable sample in index order (i + 1, i + 2, ..., wrapping) instead: a function of the
    files alone, so the same on every rank and on every resume."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        """key: an index, or (index, step) for a keyed dataset (the step stays)."""
        idx, *step = key if isinstance(key, tuple) else (key,)
        bad = None
        for k in range(len(self.dataset)):
            try:
                nxt = (idx + k) % len(self.dataset)
                sample = self.dataset[(nxt, *step) if step else nxt]
                return (*sample, f"{bad.path}\t{bad.reason}" if bad else "")
            except BadSample as e:
                bad = bad or e
        raise bad  # not one readable sample left


BAD_SAMPLES = "bad_samples.txt"  # in the run folder: a "path<TAB>reason" line per unreadable file


class TrainingBatches:
    """This rank's share of every global batch from start_batch on, on the device, each unreadable
    sample replaced (StandIns): logged once with its path and reason, counted in the metrics rows
    (bad_samples) and listed in the run folder (if given); past --max-bad-samples files (none
    without that key; with --strict-data 1 at the first) the run stops."""

    def __init__(self, dataset, config, rank, world, start_batch, device, run_dir=None):
        sampler = GlobalBatchSampler(len(dataset), config["batch_size"], rank, world,
                                     config["seed"], start_batch,
                                     keyed=getattr(dataset, "keyed", False))
        self.loader = DataLoader(
            StandIns(dataset), batch_sampler=sampler, num_workers=config["num_workers"],
            pin_memory=device.type == "cuda", persistent_workers=config["num_workers"] > 0,
            generator=torch.Generator(),  # private: iterating never touches the global RNG
            worker_init_fn=functools.partial(cluster.ignore_signals, config["preempt_signals"]))
        self.config, self.rank, self.world, self.device = config, rank, world, device
        self.per_epoch = sampler.per_epoch  # global batches per epoch of the data
        self.path = os.path.join(run_dir, BAD_SAMPLES) if run_dir else None
        self.listed = {}  # path -> reason, kept across resumes in bad_samples.txt
        if self.path and os.path.isfile(self.path):
            with open(self.path) as f:
                self.listed = dict(line.rstrip("\n").split("\t", 1) for line in f if line.strip())
        self.seen = []  # notes of this rank's replaced samples since the last update

    def __iter__(self):
        """(images, moments, labels) on the device."""
        for *batch, notes in self.loader:
            for note in filter(None, notes):
                self.note(note)
            yield [x.to(self.device, non_blocking=True) for x in batch]

    def repair(self):
        return f"repair with python data.py --verify {self.config['data_dir']}"

    def note(self, note):
        """A replaced sample: said once (on the rank that read it), or the stop of --strict-data."""
        path, reason = note.split("\t")
        if self.config.get("strict_data"):
            raise UserError(f"unreadable sample {path} ({reason}) and --strict-data 1: "
                            f"{self.repair()}, or --strict-data 0 to train on with stand-ins")
        if path not in self.listed and note not in self.seen:
            log.warning("unreadable sample %s (%s): the next readable one stands in for it", path,
                        reason)
        self.seen.append(note)

    def update(self, row=None):
        """On every rank at once (a log step, the end): row's bad_samples (replaced since the last
        row, all ranks), the new files listed, and the stop past --max-bad-samples."""
        seen, self.seen = cluster.host_all_gather(self.seen, self.world), []
        if row is not None:
            row["bad_samples"] = len(seen)
        new = {p: r for p, r in (n.split("\t") for n in seen) if p not in self.listed}
        self.listed.update(new)
        if new and self.rank == 0 and self.path:
            text = "".join(f"{p}\t{r}\n" for p, r in sorted(self.listed.items()))
            write_atomic(self.path, lambda f: f.write(text.encode()))
        if new and len(self.listed) > self.config.get("max_bad_samples", 0):
            names = ", ".join(sorted(self.listed)[:3]) + (", ..." if len(self.listed) > 3 else "")
            raise UserError(f"{len(self.listed)} unreadable samples, more than --max-bad-samples "
                            f"{self.config['max_bad_samples']} ({names}; all in {self.path}): "
                            f"{self.repair()}, or raise --max-bad-samples")


# ----------------------------------------------------------------------------------------------
# Making the REPA layout from ImageNet-style class folders (`python data.py` / `torchrun data.py`)


def build_parser():
    p = argparse.ArgumentParser(prog="data.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--verify", metavar="DEST", default=None,
        help="instead of preparing: read back every prepared file of DEST in parallel (images, "
        "latents and, for COCO, every caption's features and the null caption's: decode, shape, "
        "dtype, finite; resumable) and list the bad ones in DEST/bad_files.txt, which the next "
        "preparation run makes again",
    )
    p.add_argument(
        "--source",
        help="ImageNet-style folder: one sub-folder of images per class (--dataset coco: the COCO "
        "2014 folder with train2014/, val2014/ and annotations/captions_*2014.json)",
    )
    p.add_argument(
        "--dest",
        help="output data dir (gets images/ and vae-sd/); train.py --data-dir",
    )
    p.add_argument(
        "--resolution", type=cluster.multiple_of(8), default=256,
        help="side of the square center-cropped images (px)",
    )
    p.add_argument(
        "--vae",
        default="mse",
        help="SD-VAE that encodes the latents: ema / mse (REPA encodes with "
        "stabilityai/sd-vae-ft-mse), a hub id, a local folder, or tiny-random (tests only)",
    )
    p.add_argument(
        "--batch-size", type=cluster.at_least(1), default=64,
        help="images per VAE forward pass on each rank",
    )
    p.add_argument(
        "--workers",
        type=cluster.at_least(0),
        default=min(8, os.cpu_count() or 1),
        help="DataLoader processes per rank that decode and crop the source images (0: in-process)",
    )
    p.add_argument(
        "--max-images", type=cluster.at_least(1), default=None,
        help="only the first N images in sorted order",
    )
    p.add_argument(
        "--png-compress", type=int, default=0,
        choices=range(10),
        help="PNG zlib level: 0 as REPA/edm2 (uncompressed, fastest to read), up to 9 (smallest)",
    )
    p.add_argument(
        "--device", default=None, help="torch device for the VAE; None: this rank's GPU, else cpu"
    )
    add_coco_flags(p)
    return p


def parse_args(argv=None):
    """Command-line flags of data.py (sys.argv when argv is None)."""
    p = build_parser()
    args = p.parse_args(argv)
    if not args.verify and not (args.source and args.dest):
        p.error("the following arguments are required: --source, --dest (or --verify DEST)")
    return args


def center_crop_dhariwal(image, size):
    """ADM's center crop: halve with BOX while the short side >= 2 * size, bicubic to short side =
    size, crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=PIL.Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(
        tuple(round(s * scale) for s in image.size), resample=PIL.Image.Resampling.BICUBIC
    )
    array = np.array(image)  # (H, W, 3)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


def walk(source):
    """os.walk that follows symlinked folders (ImageNet subsets are often built from them), but not
    in a loop."""
    for folder, dirs, files in os.walk(source, followlinks=True):
        above, up = set(), folder
        while True:  # real paths of this folder and its parents up to source
            above.add(os.path.realpath(up))
            if os.path.samefile(up, source):
                break
            up = os.path.dirname(up)
        dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(folder, d)) not in above]
        yield folder, files


def list_source(source, max_images=None):
    """Sorted relative image paths under the class folders of source, their labels and the sorted
    class names."""
    if not os.path.isdir(source):
        raise UserError(
            f"--source {source} is not a directory: point it at the ImageNet train folder"
        )
    exts = supported_ext() - {".npy"}
    paths = sorted(
        os.path.relpath(os.path.join(d, f), source).replace("\\", "/")
        for d, files in walk(source)
        for f in files
        if os.path.splitext(f)[1].lower() in exts
    )
    loose = [p for p in paths if "/" not in p]
    if loose:
        log.warning("ignoring %d images directly in %s (e.g. %s): only class folders are read",
                    len(loose), source, loose[0])
    paths = [p for p in paths if "/" in p]
    if not any(e.is_dir() for e in os.scandir(source)):
        raise UserError(
            f"no class folders in {source}: expected one sub-folder of images per class"
        )
    if not paths:
        raise UserError(f"no images in the class folders of {source} "
                        f"(looked for {', '.join(sorted(exts)[:6])}, ...)")
    # from all images: --max-images keeps the full label set
    classes = sorted({p.split("/")[0] for p in paths})
    index = {c: i for i, c in enumerate(classes)}
    paths = paths[:max_images]
    return paths, [index[p.split("/")[0]] for p in paths], classes


def output_names(idx):
    """REPA's file names of image idx: the PNG under images/ and the moments under vae-sd/."""
    s = f"{idx:08d}"
    return f"{s[:5]}/img{s}.png", f"{s[:5]}/img-mean-std-{s}.npy"


class CroppedImages(Dataset):
    """(index, center-cropped uint8 image (3, R, R), "") for a list of (index, source path) pairs;
    (index, zeros, reason) for a source that does not decode (truncated, not an image)."""

    def __init__(self, items, resolution, crop=center_crop_dhariwal):
        """items: (index, source path) pairs; resolution: side of the crop; crop(PIL, side)."""
        self.items, self.resolution, self.crop = items, resolution, crop

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        """(index, uint8 (3, R, R), reason or "") of the i-th pending image."""
        idx, path = self.items[i]
        try:
            with PIL.Image.open(path) as image:
                array = self.crop(image.convert("RGB"), self.resolution)  # (R, R, 3)
        # PIL: UnidentifiedImageError / OSError ("image file is truncated"), SyntaxError, ...
        except (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            return idx, torch.zeros(3, self.resolution, self.resolution, dtype=torch.uint8), (
                f"{type(e).__name__}: {first}")
        return idx, torch.from_numpy(array).permute(2, 0, 1), ""


def write_json(path, meta):
    """Write meta as JSON atomically; an identical existing file is left untouched (a finished run
    stays as is)."""
    text = json.dumps(meta).encode()
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == text:
                return
    write_atomic(path, lambda f: f.write(text))


def main(args):
    """data.py: a bad source or VAE ends in one line, `data.py: error: ...`; Ctrl-C keeps every
    file written and says how to go on (exit status 130)."""
    with cluster.main_errors("data.py"):
        try:
            if args.verify:
                verify(args.verify, args.workers)
            else:
                prepare_coco(args) if args.dataset == "coco" else prepare(args)
        except KeyboardInterrupt:
            print("\ndata.py: interrupted: every file written so far is kept; run the same "
                  "command again to continue", file=sys.stderr)
            raise SystemExit(130) from None


def prepare(args):
    """Crop, encode and write this rank's share of the images, then (rank 0) the label files.

    A source image that does not decode is skipped, said once and listed in dest/bad_files.txt; the
    images listed there by --verify are made again, with the missing ones."""
    paths, labels, classes = list_source(args.source, args.max_images)
    # a resumed run can leave one rank hours of work behind the others: the final barrier waits
    rank, world, device = cluster.init(args.device, timeout=datetime.timedelta(hours=24))
    images_dir, latents_dir = os.path.join(args.dest, "images"), os.path.join(args.dest, "vae-sd")
    remake = {i for i in listed_bad(args.dest, imagenet_key)[1] if i < len(paths)}  # by --verify
    mine = range(rank, len(paths), world)  # strided shard: every rank gets a spread of classes
    pending = [(i, os.path.join(args.source, paths[i])) for i in mine
               if i in remake or not os.path.exists(os.path.join(latents_dir, output_names(i)[1]))]
    if rank == 0:
        log.info("%d images in %d classes; rank 0 of %d: %d to do, %d already written",
                 len(paths), len(classes), world, len(pending), len(mine) - len(pending))
        for folder in (images_dir, latents_dir):
            cluster.check_writable(folder)
    if pending and args.png_compress == 0:  # uncompressed PNGs: the space needed is known
        r = args.resolution
        cluster.require_space(args.dest, len(pending) * world * (3 * r * r + 32 * (r // 8) ** 2
                                                                 + 4096), "the images and latents")
    bad = []  # (index, source path, reason) of this rank's sources that do not decode
    if pending:
        with cluster.failing(f"--vae {args.vae}"):
            vae = encoders.load_vae(args.vae, device)
        loader = DataLoader(CroppedImages(pending, args.resolution), batch_size=args.batch_size,
                            num_workers=args.workers, pin_memory=device.type == "cuda")
        bar = tqdm(total=len(mine), initial=len(mine) - len(pending), unit="img", disable=rank != 0)
        with bar:
            for indices, images, reasons in loader:  # (B,), uint8 (B, 3, R, R), B strings
                ok = [k for k, reason in enumerate(reasons) if not reason]
                for k in (k for k, reason in enumerate(reasons) if reason):
                    bad.append((int(indices[k]), pending_path(pending, int(indices[k])),
                                reasons[k]))
                    log.warning("skipping source image %s: %s (listed in %s)", bad[-1][1],
                                reasons[k], os.path.join(args.dest, BAD_FILES))
                indices, images = indices[ok].tolist(), images[ok]
                for i, image in zip(indices, images):
                    png = os.path.join(images_dir, output_names(i)[0])
                    # a run stopped between the two files left the PNG only
                    if i in remake or not os.path.exists(png):
                        save_png(png, image, args.png_compress)
                if indices:  # (B, 8, R/8, R/8) float32
                    moments = encoders.encode_moments(vae, images.to(device)).cpu().numpy()
                # after the PNGs: a latent file implies its image
                for i, m in zip(indices, moments if indices else []):
                    save_npy(os.path.join(latents_dir, output_names(i)[1]), m)
                bar.update(len(reasons))
    bad = cluster.host_all_gather(bad, world)
    cluster.barrier(world)  # every shard on disk before the labels name them
    if rank == 0:
        write_bad_list(args.dest, sorted((path, reason) for _, path, reason in bad))
        skipped = {i for i, *_ in bad}
        names = [(output_names(i), y) for i, y in enumerate(labels) if i not in skipped]
        # extra keys; REPA reads "labels"
        meta = {"num_classes": len(classes), "classes": classes, "vae": args.vae}
        with cluster.disk_errors(args.dest):
            for d, k in ((images_dir, 0), (latents_dir, 1)):
                write_json(os.path.join(d, "dataset.json"),
                           {"labels": [[n[k], y] for n, y in names], **meta})
        log.info("wrote %d images and latents to %s%s", len(names), args.dest,
                 f"; {len(bad)} unreadable source images skipped, listed in "
                 f"{os.path.join(args.dest, BAD_FILES)}" if bad else "")
    cluster.close(world)


def pending_path(pending, idx):
    """The source path of image idx among the pending (index, path) pairs."""
    return next(path for i, path in pending if i == idx)


# ----------------------------------------------------------------------------------------------
# The list of bad files, and `data.py --verify DEST`: every prepared file read back in parallel.
# A layout (ImageNetFiles here, CocoFiles in the COCO section) groups a folder's files by what one
# preparation step makes (an image index, a COCO image, the null caption): its keys, the files of
# a key as (path in dest, kind) and the (shape, dtype, read) each kind must pass; key(path) is the
# key a bad file's path names, which the next preparation run makes again.

BAD_FILES = "bad_files.txt"  # in dest: "path<TAB>reason" per unreadable source or prepared file
PREPARED = re.compile(r"(images|vae-sd)/\d{5}/img(?:-mean-std-)?(\d{8})\.(?:png|npy)")


def listed_bad(dest, key):
    """(entries [(path, reason)], the keys of the prepared files among them) of dest's bad list;
    key(path): a layout's key of a prepared file, None for another path (a source image)."""
    path = os.path.join(dest, BAD_FILES)
    if not os.path.isfile(path):
        return [], set()
    with open(path) as f:
        entries = [tuple(line.rstrip("\n").split("\t", 1)) for line in f if "\t" in line]
    return entries, {k for p, _ in entries if (k := key(p)) is not None}


def write_bad_list(dest, entries):
    """dest/bad_files.txt with these (path, reason) entries; none: no file."""
    path = os.path.join(dest, BAD_FILES)
    if entries:
        text = "".join(f"{p}\t{r}\n" for p, r in entries)
        write_atomic(path, lambda f: f.write(text.encode()))
    elif os.path.exists(path):
        os.remove(path)


def image_checks(side):
    """The (shape, dtype, read) a crop and its VAE moments must pass at this side."""
    return {"image": ((3, side, side), np.uint8, load_image),
            "moments": ((8, side // 8, side // 8), np.floating, np.load)}


def first_side(dest, file_lists):
    """Side of the first crop in dest that reads with its moments: every crop must have it.
    file_lists: layout.files(key) of image keys, the crop first and the moments second."""
    for (image, _), (moments, _), *_ in file_lists:
        try:
            side = load_image(os.path.join(dest, image)).shape[-1]
            np.load(os.path.join(dest, moments), mmap_mode="r")
            return side
        except (ValueError, OSError, EOFError, SyntaxError):
            continue
    raise UserError(f"--verify {dest}: not one image and latent file there reads: run data.py "
                    "again")


def imagenet_key(path):
    """The image index a path of the ImageNet layout names (None: no prepared file)."""
    m = PREPARED.fullmatch(path)
    return int(m.group(2)) if m else None


class ImageNetFiles:
    """--verify's view of the REPA layout: key = image index -> images/ PNG, vae-sd/ moments."""

    key = staticmethod(imagenet_key)

    def __init__(self, dest):
        """Every index with a file under images/ or vae-sd/ or named by vae-sd/dataset.json."""
        images_dir, latents_dir = os.path.join(dest, "images"), os.path.join(dest, "vae-sd")
        found = [imagenet_key(f"{os.path.basename(d)}/{n}".replace("\\", "/"))
                 for d in (images_dir, latents_dir) for n in list_files(d)]
        indices = {i for i in found if i is not None}
        labels = os.path.join(latents_dir, "dataset.json")
        if os.path.isfile(labels):  # the files it names, present or not
            with open(labels, "rb") as f:
                named = [imagenet_key(f"vae-sd/{n}") for n, _ in json.load(f)["labels"]]
            indices |= {i for i in named if i is not None}
        if not indices:
            raise UserError(f"--verify {dest}: no image or latent files there")
        self.keys = sorted(indices)
        self.checks = image_checks(first_side(dest, map(self.files, self.keys)))

    def files(self, idx):
        image, latent = output_names(idx)
        return [(f"images/{image}", "image"), (f"vae-sd/{latent}", "moments")]


def prepared_layout(dest):
    """The layout of a folder data.py prepared; a one-line UserError for any other folder."""
    if is_coco(dest):
        return CocoFiles(dest)
    if all(os.path.isdir(os.path.join(dest, d)) for d in ("images", "vae-sd")):
        return ImageNetFiles(dest)
    raise UserError(f"--verify {dest}: no images/ and vae-sd/ folders there (ImageNet) and no "
                    "dataset.json or empty_context.npy of COCO's: give a folder data.py prepared")


class PreparedFiles(Dataset):
    """For each key of a prepared folder's layout, the "path<TAB>reason" of its files that do not
    read back as data (missing, truncated, undecodable, wrong shape or dtype, non-finite)."""

    def __init__(self, dest, indices, layout):
        self.dest, self.indices, self.layout = dest, indices, layout

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        found = []
        for rel, kind in self.layout.files(self.indices[k]):
            path = os.path.join(self.dest, rel)
            try:
                if not os.path.isfile(path):
                    raise BadSample(path, "missing")
                read_checked(path, *self.layout.checks[kind])
            except BadSample as e:
                found.append(f"{rel}\t{e.reason}")
        return found


def verify(dest, workers, chunk=4096):
    """Read back every prepared file of dest (either layout) in parallel (workers processes), chunk
    by chunk, saving progress after each (a re-run continues); write the bad ones to
    bad_files.txt and return them as (path, reason) pairs."""
    layout = prepared_layout(dest)
    indices = layout.keys
    progress_path = os.path.join(dest, "verify-progress.json")
    progress = {"indices": len(indices), "checked": 0, "bad": []}
    if os.path.isfile(progress_path):
        with open(progress_path) as f:
            saved = json.load(f)
        if saved.get("indices") == len(indices):
            progress = saved
            log.info("--verify: continuing after %d of %d files", saved["checked"], len(indices))
    with tqdm(total=len(indices), initial=progress["checked"], unit="img") as bar:
        while progress["checked"] < len(indices):
            part = indices[progress["checked"]:progress["checked"] + chunk]
            loader = DataLoader(PreparedFiles(dest, part, layout), batch_size=64,
                                num_workers=workers, collate_fn=list)
            for batch in loader:
                for lines in batch:
                    progress["bad"] += lines
                bar.update(len(batch))
            progress["checked"] += len(part)
            with cluster.disk_errors(dest):
                write_json(progress_path, progress)
    sources = [e for e in listed_bad(dest, layout.key)[0] if layout.key(e[0]) is None]
    bad = [tuple(line.split("\t", 1)) for line in progress["bad"]]
    write_bad_list(dest, sources + bad)
    os.remove(progress_path)
    total = sum(len(layout.files(k)) for k in indices)
    if bad:
        print(f"data.py --verify: {len(bad)} of the {total} files in {dest} do not read back, "
              f"listed in {os.path.join(dest, BAD_FILES)}: run the data.py command that made the "
              "folder again to make exactly those again")
    else:
        print(f"data.py --verify: all {total} files in {dest} read back as data")
    return bad


# ----------------------------------------------------------------------------------------------
# Text-to-image data: MS-COCO 2014 in U-ViT's feature layout, the one REPA's train_t2i.py reads
# (`python data.py --dataset coco --source <COCO 2014 folder> --dest <data dir>`, and CocoDataset)
#
#     dest/train/{i}.png        image i, U-ViT's LANCZOS centre crop (REPA's MSCOCOFeatureDataset
#                               reads it; U-ViT's script writes none, REPA issue #58)
#     dest/train/{i}.npy        SD-VAE posterior [mean, logvar] (8, res/8, res/8) float32, as U-ViT
#     dest/train/{i}_{k}.npy    text features of caption k of image i (77, D), float32 or float16
#     dest/train/captions.json  [[COCO image id, file name, [caption, ...]], ...] in index order
#     dest/val/...              the same for val2014
#     dest/empty_context.npy    the empty caption's features (77, D): the null condition
#     dest/dataset.json         how it was made: crop, VAE, moment convention, text encoder, splits
#
# Image i is the i-th image id in sorted order of the captions file (U-ViT's sorted(coco.imgs)),
# caption k its k-th caption in file order (pycocotools' getAnnIds order). dataset.json is written
# first with the settings (a resumed run must use the same ones) and lists a split only once every
# file of it is on disk. A folder with empty_context.npy but no dataset.json is U-ViT's or REPA's
# preparation: [mean, logvar] moments and CLIP ViT-L/14 features, read as they are.
# The reader converts every moment convention to the [mean, std] the ImageNet data stores. Caption
# dropout is the training side's: the drop mask of losses.draw_noise (the draw that drops class
# labels) replaces a row's text features by null_context, so no dataset draws it (REPA's
# CFGDataset does, from Python's global random, which a resumed run does not replay).

COCO_SPLITS = ("train", "val")
COCO_HINT = "run data.py --dataset coco --source <COCO 2014 folder> --dest <data dir>"
UVIT_TEXT_ENCODER = encoders.CLIP_TEXT  # U-ViT's FrozenCLIPEmbedder: CLIP ViT-L/14
MOMENTS = ("mean-std", "mean-logvar")  # conventions of stored posterior moments
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers, U-ViT and REPA clamp logvar to this before exp
LATENT_FILE, IMAGE_FILE, CAPTION_FILE = (
    re.compile(r"(\d+)\.npy"), re.compile(r"(\d+)\.png"), re.compile(r"(\d+)_(\d+)\.npy"),
)
NULL_KEY = "empty_context"  # --verify's key of the null caption's features (image i's: "train/i")
COCO_PREPARED = re.compile(  # a prepared file's path in dest: (image "split/i", the null's)
    rf"((?:{'|'.join(COCO_SPLITS)})/\d+)(?:_\d+)?\.(?:png|npy)|({NULL_KEY})\.npy")


def coco_splits(text):
    """--splits: 'train,val' -> ('train', 'val')."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",")))
    if not names or any(n not in COCO_SPLITS for n in names):
        raise argparse.ArgumentTypeError(f"{text}: the splits are train and/or val, "
                                         "comma-separated")
    return names


def add_coco_flags(p):
    """data.py's --dataset coco flags."""
    p.add_argument(
        "--dataset", choices=("imagenet", "coco"), default="imagenet",
        help="imagenet: class folders -> REPA's layout; coco: COCO 2014 images and captions -> the "
        "text-to-image layout (see the COCO section of data.py)",
    )
    p.add_argument(
        "--splits", type=coco_splits, default=COCO_SPLITS,
        help="--dataset coco: the splits to make, comma-separated (train2014, val2014)",
    )
    p.add_argument(
        "--text-encoder", default=UVIT_TEXT_ENCODER,
        help="--dataset coco: text encoder of the caption features (encoders.load_text_encoder "
        "name; U-ViT and REPA use CLIP ViT-L/14; tiny-random for tests)",
    )
    p.add_argument(
        "--text-encoder-path", default=None,
        help="--dataset coco: local folder with the text encoder's weights (offline machines)",
    )
    p.add_argument(
        "--text-fp16", type=int, choices=[0, 1], default=0,
        help="--dataset coco: 1 stores the text features as float16 (half the disk: about 49 GB "
        "instead of 98 GB for train2014); 0 float32 as U-ViT",
    )


def center_crop_lanczos(image, size):
    """U-ViT's COCO crop (REPA trains on it): the central min(H, W) square, LANCZOS to size."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return np.array(square.resize((size, size), PIL.Image.Resampling.LANCZOS))  # (R, R, 3)


def read_json(path):
    """A JSON file's content; UserError if it is not JSON."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({type(e).__name__}: {e})") from e


def read_coco_captions(source, split, max_images=None):
    """[(image id, file name, [captions in file order]), ...] of split, sorted by image id and
    checked against the images of source/<split>2014 before anything is written."""
    folder = os.path.join(source, f"{split}2014")
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is missing: --source must hold {split}2014/ and "
                        f"annotations/captions_{split}2014.json (COCO 2014), or leave {split} out "
                        f"of --splits")
    name = f"captions_{split}2014.json"
    path = next((p for p in (os.path.join(source, "annotations", name), os.path.join(source, name))
                 if os.path.isfile(p)), None)
    if path is None:
        raise UserError(f"{name} is in neither {source}/annotations nor {source}: unpack COCO's "
                        "annotations_trainval2014.zip there")
    meta = read_json(path)
    try:
        files = {int(im["id"]): str(im["file_name"]) for im in meta["images"]}
        captions = {i: [] for i in files}
        stray = [a["image_id"] for a in meta["annotations"] if a["image_id"] not in captions]
        for a in meta["annotations"]:
            captions.get(a["image_id"], []).append(str(a["caption"]))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is not a COCO captions file (images need id and file_name, "
                        f"annotations image_id and caption): {type(e).__name__}: {e}") from e
    if not files:
        raise UserError(f"{path} lists no images")
    if stray:
        raise UserError(f"{path}: {len(stray)} captions name images it does not list (e.g. id "
                        f"{stray[0]}): a damaged captions file")
    bare = [i for i, c in captions.items() if not c]
    if bare:
        raise UserError(f"{path}: {len(bare)} images have no caption (e.g. id {bare[0]})")
    present = set(os.listdir(folder))
    missing = [n for n in files.values()
               if n not in present and not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise UserError(f"{len(missing)} of the {len(files)} images {path} names are not in "
                        f"{folder} (e.g. {missing[0]}): the captions file does not match the "
                        "images (another split's?)")
    return [(i, files[i], captions[i]) for i in sorted(files)[:max_images]]


def coco_settings(args, text):
    """What a COCO folder is made with: a resumed run must use the same."""
    return {"dataset": "coco", "resolution": args.resolution, "crop": "center-lanczos",
            "vae": args.vae, "moments": "mean-logvar", "text_encoder": text.name,
            "text_dim": text.dim, "text_dtype": "float16" if args.text_fp16 else "float32"}


def resumed_meta(dest, settings):
    """dest's dataset.json when it was made with these settings, a new one for a new dest;
    UserError for other settings or data another tool made."""
    path = os.path.join(dest, "dataset.json")
    if not os.path.isfile(path):
        if os.path.exists(os.path.join(dest, "empty_context.npy")):
            raise UserError(f"{dest} holds features another tool made (no dataset.json): give "
                            "data.py a new --dest")
        return {**settings, "splits": {}}
    meta = read_json(path)
    changed = [f"{k} {meta.get(k)!r} (now {v!r})" for k, v in settings.items() if meta.get(k) != v]
    if changed:
        raise UserError(f"{dest} was made with {', '.join(changed)}: re-run with its flags or "
                        "give a new --dest")
    return meta


def save_npy(path, array):
    """np.save, atomically; a full or failing disk is one line (cluster.disk_error)."""
    with cluster.disk_errors(os.path.dirname(path)):
        write_atomic(path, lambda f: np.save(f, array))


def save_png(path, image, compress_level):
    """uint8 (3, H, W) -> PNG file, atomically; a full or failing disk is one line."""
    picture = PIL.Image.fromarray(image.permute(1, 2, 0).numpy())
    with cluster.disk_errors(os.path.dirname(path)):
        write_atomic(path, lambda f: picture.save(f, format="png", compress_level=compress_level))


@torch.no_grad()
def text_features(text, captions, dtype):
    """Captions -> numpy (N, 77, D) features of the text encoder, in dtype."""
    return text.encode(list(captions)).float().cpu().numpy().astype(dtype)


def prepare_coco(args):
    """Crop, encode and write this rank's share of every split; rank 0 the null features and the
    json files."""
    # every split checked before anything is written
    splits = {s: read_coco_captions(args.source, s, args.max_images) for s in args.splits}
    rank, world, device = cluster.init(args.device, timeout=datetime.timedelta(hours=24))
    with cluster.failing(f"--text-encoder {args.text_encoder}"):
        text = encoders.load_text_encoder(name=args.text_encoder, path=args.text_encoder_path,
                                          device=device,
                                          random=args.text_encoder == encoders.TINY_RANDOM)
    dtype = np.float16 if args.text_fp16 else np.float32
    meta_path = os.path.join(args.dest, "dataset.json")
    meta = resumed_meta(args.dest, coco_settings(args, text))
    entries, remake = listed_bad(args.dest, coco_key)  # found by --verify: made again
    cluster.barrier(world)  # every rank has read the old json before rank 0 writes
    if rank == 0:
        write_json(meta_path, meta)
        null = os.path.join(args.dest, "empty_context.npy")
        if NULL_KEY in remake or not os.path.exists(null):
            save_npy(null, text_features(text, [""], dtype)[0])  # (77, D)
    vae = None
    for split, items in splits.items():
        folder, source = os.path.join(args.dest, split), os.path.join(args.source, f"{split}2014")
        mine = range(rank, len(items), world)
        # the moments are written last: they mark image i done
        pending = [(i, os.path.join(source, items[i][1])) for i in mine if f"{split}/{i}" in remake
                   or not os.path.exists(os.path.join(folder, f"{i}.npy"))]
        if rank == 0:
            log.info("%s: %d images; rank 0 of %d: %d to do, %d already written", split,
                     len(items), world, len(pending), len(mine) - len(pending))
        if pending and vae is None:
            with cluster.failing(f"--vae {args.vae}"):
                vae = encoders.load_vae(args.vae, device)
        loader = DataLoader(CroppedImages(pending, args.resolution, center_crop_lanczos),
                            batch_size=args.batch_size, num_workers=args.workers,
                            pin_memory=device.type == "cuda")
        for indices, images, reasons in tqdm(loader, unit="batch",
                                             disable=rank != 0 or not pending):
            indices = indices.tolist()  # images: uint8 (B, 3, R, R)
            for i, reason in zip(indices, reasons):  # COCO's fixed image ids: none may go missing
                if reason:
                    raise UserError(f"source image {os.path.join(source, items[i][1])} does not "
                                    f"decode ({reason}): replace it with COCO's file, then run "
                                    "the same command again")
            for i, image in zip(indices, images):
                png = os.path.join(folder, f"{i}.png")
                if f"{split}/{i}" in remake or not os.path.exists(png):
                    save_png(png, image, args.png_compress)
            features = iter(text_features(text, [c for i in indices for c in items[i][2]], dtype))
            for i in indices:
                for k in range(len(items[i][2])):
                    save_npy(os.path.join(folder, f"{i}_{k}.npy"), next(features))  # (77, D)
            # (B, 8, R/8, R/8) [mean, logvar], U-ViT's convention
            moments = encoders.encode_moments(vae, images.to(device), logvar=True).cpu().numpy()
            for i, m in zip(indices, moments):
                save_npy(os.path.join(folder, f"{i}.npy"), m)
        cluster.barrier(world)  # every shard of the split on disk before the json lists it
        if rank == 0:
            write_json(os.path.join(folder, "captions.json"), [list(item) for item in items])
            meta["splits"][split] = {"images": len(items),
                                     "captions": sum(len(c) for *_, c in items)}
            write_json(meta_path, meta)
            log.info("%s: wrote %d images to %s", split, len(items), folder)
    if rank == 0:  # the listed files of these splits and the null are made again: off the list
        made = {*args.splits, NULL_KEY}
        write_bad_list(args.dest, [(p, r) for p, r in entries
                                   if (k := coco_key(p)) is None or k.split("/")[0] not in made])
    cluster.close(world)


def coco_key(path):
    """--verify's key of a path of the COCO layout: "split/i" for the files of image i, NULL_KEY
    for the null caption's, None for another path."""
    m = COCO_PREPARED.fullmatch(path)
    return (m[1] or m[2]) if m else None


class CocoFiles:
    """--verify's view of the COCO layout: key "split/i" -> image i's crop, moments and the
    features of each of its captions; NULL_KEY -> empty_context.npy. Sizes and the feature dtype
    come from dataset.json (a U-ViT folder has none: the first crop that reads, the null's width,
    float32), the captions per image from captions.json (a split still being made: its files)."""

    key = staticmethod(coco_key)

    def __init__(self, dest):
        meta = coco_meta(dest)
        self.captions = {}  # "split/i" -> the number of caption files image i must have
        for split in COCO_SPLITS:
            folder = os.path.join(dest, split)
            if not os.path.isdir(folder):
                continue
            found = {}  # image -> 1 + its highest caption index on disk (1 with none: COCO's least)
            for name in os.listdir(folder):
                if m := CAPTION_FILE.fullmatch(name):
                    found[int(m[1])] = max(found.get(int(m[1]), 1), int(m[2]) + 1)
                elif m := LATENT_FILE.fullmatch(name) or IMAGE_FILE.fullmatch(name):
                    found.setdefault(int(m[1]), 1)
            listed = os.path.join(folder, "captions.json")
            if os.path.isfile(listed):  # every image of the split, made or not
                found.update((i, len(c)) for i, (*_, c) in enumerate(read_json(listed)))
            self.captions.update((f"{split}/{i}", n) for i, n in sorted(found.items()))
        if not self.captions:
            raise UserError(f"--verify {dest}: no image files in a train/ or val/ folder there: "
                            f"{COCO_HINT}")
        self.keys = [NULL_KEY, *self.captions]
        side = meta.get("resolution") or first_side(dest, map(self.files, self.keys[1:]))
        try:
            dim = meta.get("text_dim") or np.load(os.path.join(dest, "empty_context.npy"),
                                                  mmap_mode="r").shape[-1]
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"--verify {dest}: no text_dim in a dataset.json and empty_context.npy "
                            f"does not read ({type(e).__name__}): {COCO_HINT}") from e
        text = np.dtype(meta.get("text_dtype", "float32")).type
        self.checks = {**image_checks(side), "text": ((encoders.TEXT_TOKENS, dim), text, np.load)}

    def files(self, key):
        if key == NULL_KEY:
            return [("empty_context.npy", "text")]
        return [(f"{key}.png", "image"), (f"{key}.npy", "moments"),
                *((f"{key}_{k}.npy", "text") for k in range(self.captions[key]))]


def mean_std(moments, convention):
    """Stored moments (..., 8, h, w) -> float32 posterior [mean, std]. [mean, logvar] (U-ViT, REPA)
    becomes std = exp(0.5 * clamp(logvar, -30, 20)): diffusers' formula and REPA's
    sample_posterior, so the latents equal those of REPA's training."""
    moments = torch.as_tensor(moments).float()
    if convention == "mean-std":
        return moments
    if convention != "mean-logvar":
        raise UserError(f"unknown moment convention {convention!r}: expected one of {MOMENTS}")
    mean, logvar = moments.chunk(2, dim=-3)  # (..., 4, h, w) each
    return torch.cat([mean, torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))], dim=-3)


def is_coco(data_dir):
    """Whether data_dir holds the text-to-image layout (made here, or by U-ViT's / REPA's scripts).
    """
    path = os.path.join(data_dir, "dataset.json")
    if os.path.isfile(os.path.join(data_dir, "empty_context.npy")):
        return True
    try:
        return read_json(path).get("dataset") == "coco" if os.path.isfile(path) else False
    except (UserError, AttributeError):
        return False


def coco_meta(data_dir):
    """dataset.json of a COCO folder, or the settings of U-ViT's preparation where it has none."""
    path = os.path.join(data_dir, "dataset.json")
    if os.path.isfile(path):
        meta = read_json(path)
        if meta.get("moments") not in MOMENTS:
            raise UserError(f"{path}: moments {meta.get('moments')!r} is none of {MOMENTS}: "
                            "re-run data.py")
        return meta
    if not os.path.isfile(os.path.join(data_dir, "empty_context.npy")):
        raise UserError(f"{data_dir} is no COCO feature folder (no dataset.json, no "
                        f"empty_context.npy): {COCO_HINT}")
    log.warning("data: %s has no dataset.json: read as U-ViT's / REPA's preparation ([mean, "
                "logvar] moments, %s text features)", data_dir, UVIT_TEXT_ENCODER)
    return {"dataset": "coco", "moments": "mean-logvar", "text_encoder": UVIT_TEXT_ENCODER,
            "splits": None}


def scan_split(folder):
    """(number of images, captions per image) of a split folder, checked file by file."""
    names = os.listdir(folder)
    latents = {int(m[1]) for m in map(LATENT_FILE.fullmatch, names) if m}
    images = {int(m[1]) for m in map(IMAGE_FILE.fullmatch, names) if m}
    last = {}  # image -> highest caption index, and the caption count
    counts = np.zeros(len(latents), np.int64)
    for m in map(CAPTION_FILE.fullmatch, names):
        if m and int(m[1]) < len(latents):
            counts[int(m[1])] += 1
            last[int(m[1])] = max(last.get(int(m[1]), 0), int(m[2]))
    size = len(latents)
    if not size:
        raise UserError(f"no moments files ({{i}}.npy) in {folder}: {COCO_HINT}")
    if latents != set(range(size)):
        gap = min(set(range(size)) - latents)
        raise UserError(f"{folder}: {gap}.npy is missing among {size} moments files: an "
                        "interrupted preparation? re-run data.py")
    if images != latents:
        raise UserError(f"{folder} has {len(images)} images ({{i}}.png) for {size} moments files: "
                        "U-ViT's script writes no images (REPA issue #58) and the encoders need "
                        f"them: {COCO_HINT}")
    bad = [i for i in range(size) if not counts[i] or last[i] != counts[i] - 1]
    if bad:
        raise UserError(f"{folder}: the caption features of image {bad[0]} are not "
                        f"{bad[0]}_0.npy .. {bad[0]}_{{n-1}}.npy: re-run data.py")
    return size, counts


class CocoDataset(Dataset):
    """One split of the COCO layout: (image uint8 (3, H, W), moments float32 (8, h, w) = posterior
    [mean, std] whatever the files store, text features float32 (77, D) of one of its captions).

    Indexed by (index, step), as GlobalBatchSampler(keyed=True) hands them, the caption is drawn
    from (seed, step, index) alone: a resumed or multi-GPU run sees the same captions. By index
    alone it is one fixed caption per (seed, index), e.g. for evaluation prompts.
    """

    synthetic = False
    keyed = True

    def __init__(self, data_dir, split="train", seed=0, expect=None):
        """Index and validate a split; expect: {dataset.json key: value} the run needs (None: any),
        e.g. {"text_encoder": ..., "moments": ...}; UserError saying the fix when broken."""
        if not os.path.isdir(data_dir):
            raise UserError(f"data dir {data_dir} does not exist: {COCO_HINT}")
        self.meta, self.seed = coco_meta(data_dir), seed
        for key, value in (expect or {}).items():
            if value is not None and self.meta.get(key) != value:
                raise UserError(f"{data_dir} was made with {key} {self.meta.get(key)!r} but the "
                                f"run expects {value!r}: make the data again with data.py or run "
                                f"with the data's {key}")
        self.folder = os.path.join(data_dir, split)
        if not os.path.isdir(self.folder):
            raise UserError(f"{self.folder} is missing (split {split}): {COCO_HINT} --splits "
                            f"{split}")
        done = self.meta.get("splits")
        if done is not None and split not in done:
            raise UserError(f"split {split} of {data_dir} is unfinished (its dataset.json does "
                            "not list it): re-run data.py with the same flags")
        self.size, self.num_captions = scan_split(self.folder)
        if done is not None and [done[split]["images"], done[split]["captions"]] != [
                self.size, int(self.num_captions.sum())]:
            raise UserError(f"{self.folder} holds {self.size} images and "
                            f"{self.num_captions.sum()} captions, but dataset.json says "
                            f"{done[split]['images']} and {done[split]['captions']}: re-run "
                            "data.py")
        null = os.path.join(data_dir, "empty_context.npy")
        if not os.path.isfile(null):
            raise UserError(f"{null} (the empty caption's features) is missing: re-run data.py")
        self.null_context = torch.from_numpy(np.load(null)).float()  # (77, D)
        self.text_encoder, self.text_dim = self.meta["text_encoder"], self.null_context.shape[-1]
        self.moments, self.vae = self.meta["moments"], self.meta.get("vae")
        i, image, moments, context = self.first_readable()
        self.resolution, self.latent_size = image.shape[-2], image.shape[-2] // 8
        if tuple(moments.shape) != (8, self.latent_size, image.shape[-1] // 8):
            raise UserError(f"{self.folder}/{i}.npy holds moments of shape {moments.shape} for a "
                            f"{image.shape} image: re-run data.py")
        if context.shape != self.null_context.shape:
            raise UserError(f"{self.folder}/{i}_0.npy holds text features of shape "
                            f"{context.shape} but the null caption's are "
                            f"{tuple(self.null_context.shape)}: re-run data.py")
        self.shapes = image.shape, moments.shape, context.shape
        path = os.path.join(self.folder, "captions.json")
        self.captions = [c for *_, c in read_json(path)] if os.path.isfile(path) else None
        for part, name in (("text encoder", self.text_encoder), ("VAE", self.vae)):
            if name == encoders.TINY_RANDOM:
                log.warning("data: %s was made with the TINY RANDOM %s: for smoke runs and tests "
                            "only", data_dir, part)

    def first_readable(self):
        """(index, image, moments, first caption's features) of the first image whose files
        decode: their shapes set the layout (a damaged file is a BadSample when it is drawn)."""
        for i in range(self.size):
            try:
                return (i, load_image(os.path.join(self.folder, f"{i}.png")),
                        *(np.load(os.path.join(self.folder, n), mmap_mode="r")
                          for n in (f"{i}.npy", f"{i}_0.npy")))
            except (ValueError, OSError, EOFError, SyntaxError):
                continue
        raise UserError(f"no image of {self.folder} has files that decode: re-run data.py")

    def __len__(self):
        return self.size

    def caption_index(self, idx, step=None):
        """Which caption of image idx a step shows: a function of (seed, step, idx) only."""
        key = [self.seed, idx] if step is None else [self.seed, step, idx]
        return int(np.random.default_rng(key).integers(self.num_captions[idx]))

    def __getitem__(self, key):
        """(image uint8 (3, H, W), moments float32 (8, h, w) [mean, std], text (77, D) float32) of
        key = index or (index, step); BadSample when one of its files does not read as one."""
        idx, step = key if isinstance(key, tuple) else (key, None)
        if not 0 <= idx < self.size:
            raise IndexError(f"index {idx} out of range for {self.size} images")
        k = self.caption_index(idx, step)
        path = functools.partial(os.path.join, self.folder)
        image = read_checked(path(f"{idx}.png"), self.shapes[0], np.uint8, load_image)
        moments = read_checked(path(f"{idx}.npy"), self.shapes[1], np.floating, np.load)
        context = read_checked(path(f"{idx}_{k}.npy"), self.shapes[2], np.floating, np.load)
        return (torch.from_numpy(image), mean_std(moments, self.moments),
                torch.from_numpy(context).float())


class StoredPrompts:
    """sample.py's Prompts over a COCO split's stored caption features (no text encoder needed):
    sample i conditions on image i's fixed caption (caption_index(i), a function of the seed) and
    the null caption's features are the null condition. train.py's grids and --eval-every."""

    def __init__(self, dataset):
        self.dataset = dataset

    def context(self, indices, device):
        """(B, 77, D) features of the samples' captions and the (B, 77, D) null features."""
        d = self.dataset
        rows = [np.load(os.path.join(d.folder, f"{i % d.size}_{d.caption_index(i % d.size)}.npy"))
                for i in indices]
        y = torch.from_numpy(np.stack(rows)).float().to(device)  # (B, 77, D)
        return y, d.null_context.to(device).expand_as(y)


def sampling_condition(config, dataset):
    """sample.py keywords of train.py's grids and evaluations: none for class labels; for captions
    the val split's (the train split's for grids when there is no val split) and Table 4's ODE."""
    if not isinstance(dataset, CocoDataset):
        return {}
    val = os.path.isdir(os.path.join(config["data_dir"], "val"))
    if config["eval_every"] and not val:
        raise UserError(f"--eval-every scores val captions, but {config['data_dir']} has no val "
                        "split: make it with data.py --dataset coco --splits val")
    split = CocoDataset(config["data_dir"], "val", config["seed"]) if val else dataset
    return dict(prompts=StoredPrompts(split), mode="ode")

if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    main(parse_args())
