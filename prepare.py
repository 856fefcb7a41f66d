"""Turn an ImageNet-style folder of class folders into the REPA layout that data.py (and REPA itself) reads.

    dest/images/00000/img00000000.png          ADM center crop ("center-crop-dhariwal") to --resolution
    dest/images/dataset.json                   {"labels": [["00000/img00000000.png", 0], ...]}
    dest/vae-sd/00000/img-mean-std-00000000.npy  SD-VAE posterior [mean, std], float32 (8, res/8, res/8)
    dest/vae-sd/dataset.json                   {"labels": [["00000/img-mean-std-00000000.npy", 0], ...], ...}

Class index = position of the top-level folder name in sorted order; image index = position of its relative path
in sorted order (as REPA's preprocessing/dataset_tools.py numbers them); symlinked folders are followed. Run as
`python prepare.py ...` or on all GPUs with `torchrun --nproc_per_node=N prepare.py ...`: each rank takes every
N-th image. Resumable: re-running the same command skips every image whose latent file exists; each file is
written under a temporary name and then renamed, so an interrupted run leaves no half-written file behind.
"""

import argparse
import datetime
import json
import logging
import os

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import cluster
import encoders
from cluster import write_atomic
from data import supported_ext

log = logging.getLogger("prepare")


def build_parser():
    """The argument parser of prepare.py."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", required=True, help="ImageNet-style folder: one sub-folder of images per class")
    p.add_argument("--dest", required=True, help="output data dir (gets images/ and vae-sd/); train.py --data-dir")
    p.add_argument("--resolution", type=int, default=256, help="side of the square center-cropped images (px)")
    p.add_argument("--vae", default="mse", help="SD-VAE that encodes the latents: ema / mse (REPA encodes with "
                   "stabilityai/sd-vae-ft-mse), a hub id, a local folder, or tiny-random (tests only)")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE forward pass on each rank")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader processes per rank that decode and crop the source images (0: in-process)")
    p.add_argument("--max-images", type=int, default=None, help="only the first N images in sorted order")
    p.add_argument("--png-compress", type=int, default=0, choices=range(10),
                   help="PNG zlib level: 0 as REPA/edm2 (uncompressed, fastest to read), up to 9 (smallest)")
    p.add_argument("--device", default=None, help="torch device for the VAE; None: this rank's GPU, else cpu")
    return p


def parse_args(argv=None):
    """Command-line flags of prepare.py (sys.argv when argv is None)."""
    return build_parser().parse_args(argv)


def center_crop_dhariwal(image, size):
    """ADM's center crop: halve with BOX while the short side >= 2 * size, bicubic to short side = size, crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=PIL.Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=PIL.Image.Resampling.BICUBIC)
    array = np.array(image)  # (H, W, 3)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


def check_flags(args):
    """A one-line error for the first numeric flag outside its range."""
    for flag, value, must, ok in [("--resolution", args.resolution, "a positive multiple of 8 (the VAE's stride)",
                                   args.resolution > 0 and args.resolution % 8 == 0),
                                  ("--batch-size", args.batch_size, "at least 1", args.batch_size >= 1),
                                  ("--workers", args.workers, "at least 0", args.workers >= 0),
                                  ("--max-images", args.max_images, "at least 1",
                                   args.max_images is None or args.max_images >= 1)]:
        if not ok:
            raise SystemExit(f"prepare.py: error: {flag} {value} is out of range: it must be {must}")


def walk(source):
    """os.walk that follows symlinked folders (ImageNet subsets are often built from them), but not in a loop."""
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
    """Sorted relative image paths under the class folders of source, their labels and the sorted class names."""
    if not os.path.isdir(source):
        raise SystemExit(f"prepare.py: --source {source} is not a directory: point it at the ImageNet train folder")
    exts = supported_ext() - {".npy"}
    paths = sorted(os.path.relpath(os.path.join(d, f), source).replace("\\", "/")
                   for d, files in walk(source) for f in files if os.path.splitext(f)[1].lower() in exts)
    loose = [p for p in paths if "/" not in p]
    if loose:
        log.warning("ignoring %d images directly in %s (e.g. %s): only class folders are read",
                    len(loose), source, loose[0])
    paths = [p for p in paths if "/" in p]
    if not any(e.is_dir() for e in os.scandir(source)):
        raise SystemExit(f"prepare.py: no class folders in {source}: expected one sub-folder of images per class")
    if not paths:
        raise SystemExit(f"prepare.py: no images in the class folders of {source} "
                         f"(looked for {', '.join(sorted(exts)[:6])}, ...)")
    classes = sorted({p.split("/")[0] for p in paths})  # from all images: --max-images keeps the full label set
    index = {c: i for i, c in enumerate(classes)}
    paths = paths[:max_images]
    return paths, [index[p.split("/")[0]] for p in paths], classes


def output_names(idx):
    """REPA's file names of image idx: the PNG under images/ and the moments under vae-sd/."""
    s = f"{idx:08d}"
    return f"{s[:5]}/img{s}.png", f"{s[:5]}/img-mean-std-{s}.npy"


class CroppedImages(Dataset):
    """(index, center-cropped uint8 image (3, R, R)) for a list of (index, source path) pairs."""

    def __init__(self, items, resolution):
        """items: (index, source path) pairs; resolution: side of the crop."""
        self.items, self.resolution = items, resolution

    def __len__(self):
        """Number of images to process."""
        return len(self.items)

    def __getitem__(self, i):
        """(index, uint8 (3, R, R)) of the i-th pending image."""
        idx, path = self.items[i]
        with PIL.Image.open(path) as image:
            array = center_crop_dhariwal(image.convert("RGB"), self.resolution)  # (R, R, 3)
        return idx, torch.from_numpy(array).permute(2, 0, 1)


def write_json(path, meta):
    """Write meta as JSON atomically; an identical existing file is left untouched (a finished run stays as is)."""
    text = json.dumps(meta).encode()
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == text:
                return
    write_atomic(path, lambda f: f.write(text))


def main(args):
    """Crop, encode and write this rank's share of the images, then (rank 0) the label files."""
    check_flags(args)
    paths, labels, classes = list_source(args.source, args.max_images)
    # a resumed run can leave one rank hours of work behind the others: the final barrier must wait that long
    rank, world, device = cluster.init(args.device, timeout=datetime.timedelta(hours=24))
    images_dir, latents_dir = os.path.join(args.dest, "images"), os.path.join(args.dest, "vae-sd")
    mine = range(rank, len(paths), world)  # strided shard: every rank gets a spread of classes
    pending = [(i, os.path.join(args.source, paths[i])) for i in mine
               if not os.path.exists(os.path.join(latents_dir, output_names(i)[1]))]
    if rank == 0:
        log.info("%d images in %d classes; rank 0 of %d: %d to do, %d already written",
                 len(paths), len(classes), world, len(pending), len(mine) - len(pending))
    if pending:
        try:
            vae = encoders.load_vae(args.vae, device)
        except OSError as e:
            raise SystemExit(f"prepare.py: error: {e}") from None
        loader = DataLoader(CroppedImages(pending, args.resolution), batch_size=args.batch_size,
                            num_workers=args.workers, pin_memory=device.type == "cuda")
        bar = tqdm(total=len(mine), initial=len(mine) - len(pending), unit="img", disable=rank != 0)
        for indices, images in loader:  # (B,), uint8 (B, 3, R, R)
            for i, image in zip(indices.tolist(), images):
                png = os.path.join(images_dir, output_names(i)[0])
                if not os.path.exists(png):  # a run stopped between the two files left the PNG only
                    picture = PIL.Image.fromarray(image.permute(1, 2, 0).numpy())
                    write_atomic(png, lambda f: picture.save(f, format="png", compress_level=args.png_compress))
            moments = encoders.encode_moments(vae, images.to(device)).cpu().numpy()  # (B, 8, R/8, R/8) float32
            for i, m in zip(indices.tolist(), moments):  # after the PNGs: a latent file implies its image
                write_atomic(os.path.join(latents_dir, output_names(i)[1]), lambda f: np.save(f, m))
            bar.update(len(indices))
        bar.close()
    cluster.barrier(world)  # every shard on disk before the labels name them
    if rank == 0:
        names = [output_names(i) for i in range(len(paths))]
        meta = {"num_classes": len(classes), "classes": classes, "vae": args.vae}  # extra keys; REPA reads "labels"
        for d, k in ((images_dir, 0), (latents_dir, 1)):
            write_json(os.path.join(d, "dataset.json"), {"labels": [[n[k], y] for n, y in zip(names, labels)], **meta})
        log.info("wrote %d images and latents to %s", len(paths), args.dest)
    cluster.close(world)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(parse_args())
