"""data.py: REPA-layout pairing and validation, and the synthetic dataset."""

import json
import logging
import os
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader

from data import LatentImageDataset, SyntheticDataset, synthetic_moments
from encoders import LATENT_SCALE

# Sorted as strings, "img10" comes before "img9": REPA pairs by that string order, not
# by the number.
IMAGE_NAMES = ["a/img9.png", "a/img10.png", "b/img2.png", "b/img11.png"]
LATENT_NAMES = ["a/m9.npy", "a/m10.npy", "b/m2.npy", "b/m11.npy"]


def write_repa_dir(root, resolution=16, labels=None, num_classes=None):
    """A REPA-layout dir where image k is filled with value 10 * k and latent k with value k
    (k = number in name)."""
    labels = (
        labels if labels is not None else {n: int(n.split("m")[-1][:-4]) % 3 for n in LATENT_NAMES}
    )
    for image_name, latent_name in zip(IMAGE_NAMES, LATENT_NAMES):
        k = int(image_name.split("img")[1][:-4])
        for d in ("images", "vae-sd"):
            os.makedirs(os.path.join(root, d, image_name.split("/")[0]), exist_ok=True)
        image = np.full((resolution, resolution, 3), 10 * k, np.uint8)
        PIL.Image.fromarray(image).save(os.path.join(root, "images", image_name))
        moments = np.full((8, resolution // 8, resolution // 8), k, np.float32)
        np.save(os.path.join(root, "vae-sd", latent_name), moments)
    for d in ("images", "vae-sd"):  # files REPA's reader skips: not images, not .npy
        with open(os.path.join(root, d, "notes.txt"), "w") as f:
            f.write("not data")
    # order in the json must not matter
    meta = {"labels": [[n, y] for n, y in reversed(list(labels.items()))]}
    if num_classes is not None:
        meta["num_classes"] = num_classes
    with open(os.path.join(root, "vae-sd", "dataset.json"), "w") as f:
        json.dump(meta, f)
    return root


def test_repa_pairing_and_item_format(tmp_path):
    """Images and latents pair by sorted relative path (as REPA does); labels come from the latent
    names."""
    ds = LatentImageDataset(str(write_repa_dir(tmp_path)))
    assert len(ds) == 4 and ds.resolution == 16 and ds.latent_size == 2 and ds.synthetic is False
    assert ds.vae is None  # REPA's dataset.json does not say
    assert ds.image_fnames == ["a/img10.png", "a/img9.png", "b/img11.png", "b/img2.png"]
    assert ds.num_classes == 3  # max label 2, + 1
    expected_k = [10, 9, 11, 2]
    for i, k in enumerate(expected_k):
        image, moments, label = ds[i]
        assert (
            image.dtype == torch.uint8 and image.shape == (3, 16, 16) and torch.all(image == 10 * k)
        )
        assert (
            moments.dtype == torch.float32
            and moments.shape == (8, 2, 2)
            and torch.all(moments == k)
        )
        assert label.dtype == torch.int64 and label.shape == () and label.item() == k % 3


def test_num_classes_from_json(tmp_path):
    """A num_classes key in dataset.json wins over max label + 1 (a subset may miss the top
    classes)."""
    assert LatentImageDataset(str(write_repa_dir(tmp_path, num_classes=1000))).num_classes == 1000


def test_dataloader_batches(tmp_path):
    """Both datasets collate into (B, 3, H, W) uint8, (B, 8, h, w) float32, (B,) int64 batches."""
    for ds in (LatentImageDataset(str(write_repa_dir(tmp_path))), SyntheticDataset(4, 3, 32)):
        images, moments, labels = next(iter(DataLoader(ds, batch_size=4)))
        h = ds.latent_size
        assert images.shape == (4, 3, ds.resolution, ds.resolution) and images.dtype == torch.uint8
        assert moments.shape == (4, 8, h, h) and moments.dtype == torch.float32
        assert labels.shape == (4,) and labels.dtype == torch.int64


def remove(path):
    """Delete a file."""
    os.remove(path)


def remove_tree(path):
    """Delete a directory tree."""
    shutil.rmtree(path)


def write_json(root, meta):
    """Overwrite vae-sd/dataset.json."""
    with open(os.path.join(root, "vae-sd", "dataset.json"), "w") as f:
        json.dump(meta, f)


BAD_INPUTS = {
    "missing data dir": (lambda root: remove_tree(root), "does not exist.*data.py"),
    "missing images/": (
        lambda root: remove_tree(os.path.join(root, "images")),
        "images is missing.*data.py",
    ),
    "missing vae-sd/": (
        lambda root: remove_tree(os.path.join(root, "vae-sd")),
        "vae-sd is missing.*data.py",
    ),
    "count mismatch": (
        lambda root: remove(os.path.join(root, "vae-sd", LATENT_NAMES[0])),
        "4 images .* but 3 latent files.*data.py",
    ),
    "no files": (
        lambda root: [
            remove(os.path.join(root, d, n))
            for d, names in (("images", IMAGE_NAMES), ("vae-sd", LATENT_NAMES))
            for n in names
        ],
        "no images or latents.*data.py",
    ),
    "missing dataset.json": (
        lambda root: remove(os.path.join(root, "vae-sd", "dataset.json")),
        "dataset.json is missing.*data.py",
    ),
    "labels null": (lambda root: write_json(root, {"labels": None}), "has no labels.*data.py"),
    "label missing": (
        lambda root: write_json(root, {"labels": [[n, 0] for n in LATENT_NAMES[1:]]}),
        "no label for 1 latent files .*a/m9.npy",
    ),
    "label beyond num_classes": (
        lambda root: write_json(root, {"labels": [[n, 5] for n in LATENT_NAMES], "num_classes": 3}),
        "label 5 but num_classes 3",
    ),
    "float labels": (
        lambda root: write_json(root, {"labels": [[n, 0.5] for n in LATENT_NAMES]}),
        "one class index",
    ),
    "wrong moments shape": (
        lambda root: np.save(
            os.path.join(root, "vae-sd", "a/m10.npy"), np.zeros((4, 2, 2), np.float32)
        ),
        r"shape \(4, 2, 2\).*\(8, 2, 2\).*data.py",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_value_error(tmp_path, case):
    """Each broken layout gives a one-line ValueError that names the problem and the fix."""
    root = str(write_repa_dir(tmp_path / "data"))
    break_it, message = BAD_INPUTS[case]
    break_it(root)
    with pytest.raises(ValueError, match=message) as err:
        LatentImageDataset(root)
    assert "\n" not in str(err.value)


def test_synthetic_is_deterministic_and_labelled(caplog):
    """Items are a function of (seed, index) only; the dataset says loudly that it is synthetic."""
    with caplog.at_level(logging.WARNING):
        a = SyntheticDataset(num_images=20, num_classes=4, resolution=32, seed=0)
    assert a.synthetic is True and "SYNTHETIC" in caplog.text
    b = SyntheticDataset(num_images=20, num_classes=4, resolution=32, seed=0)
    other = SyntheticDataset(num_images=20, num_classes=4, resolution=32, seed=1)
    for i in (7, 3, 7):  # any access order
        assert all(torch.equal(x, y) for x, y in zip(a[i], b[i]))
    assert not torch.equal(a[7][0], other[7][0])
    assert not torch.equal(a[3][0], a[7][0])  # same class (3 % 4 == 7 % 4), different picture
    image, moments, label = a[6]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert moments.shape == (8, 4, 4) and moments.dtype == torch.float32
    assert label.dtype == torch.int64 and label.shape == () and label.item() == 2
    assert a.latent_size == 4 and a.resolution == 32 and a.num_classes == 4 and len(a) == 20
    with pytest.raises(IndexError):
        a[20]


def test_synthetic_moments_follow_image_and_class():
    """Moments follow the image, x0 is roughly standardised, the class is readable from the latent
    (held out)."""
    ds = SyntheticDataset(num_images=300, num_classes=10, resolution=64, seed=0)
    items = [ds[i] for i in range(300)]
    image, moments, _ = items[5]
    assert torch.equal(moments, synthetic_moments(image))
    mean, std = torch.stack([m for _, m, _ in items]).chunk(2, dim=1)  # (N, 4, 8, 8) each
    x0 = mean * LATENT_SCALE
    assert x0.mean().abs() < 0.3 and 0.7 < x0.std() < 1.4
    assert torch.allclose(std * LATENT_SCALE, torch.tensor(0.05))
    # one latent block follows its 8x8 image patch: a brighter patch gives a larger luma channel
    bright = image.clone()
    bright[:, :8, :8] = 255
    assert synthetic_moments(bright)[0, 0, 0] > moments[0, 0, 0] and torch.equal(
        synthetic_moments(bright)[:, 1:, 1:], moments[:, 1:, 1:])
    labels = torch.stack([y for _, _, y in items])
    assert torch.equal(labels, torch.arange(300) % 10)
    flat = mean.flatten(1)  # (N, 256)
    centroids = torch.stack([flat[:200][labels[:200] == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(flat[200:], centroids).argmin(1) == labels[200:]).float().mean()
    assert accuracy > 0.8


@pytest.mark.parametrize("kwargs", [dict(resolution=40), dict(num_images=0), dict(num_classes=0)])
def test_synthetic_bad_arguments(kwargs):
    """Resolutions that do not make an even latent grid, and empty datasets, are refused."""
    with pytest.raises(ValueError):
        SyntheticDataset(**kwargs)
