"""data.py: ADM center crop, end to end with the tiny random VAE, resume, bad input, and torchrun on
2 ranks."""

import io
import json
import logging
import os
import subprocess
import sys
import types

import numpy as np
import PIL.Image
import pytest
import torch

import data
import encoders
from data import LatentImageDataset
from helpers import cli_error, disk_fills, disk_free, interrupted, snapshot, verify_reads

# (class folder, file name, width, height); classes in sorted folder order:
# goldfish 0, tench 1, zebra 2
SOURCE = [
    ("tench", "b.JPEG", 300, 400),
    ("tench", "a.png", 1030, 600),
    ("goldfish", "x.JPEG", 90, 100),
    ("goldfish", "sub/y.JPEG", 520, 600),
    ("zebra", "z.JPEG", 64, 64),
]


def write_source(root):
    """Random images in class folders; returns root."""
    rng = np.random.default_rng(0)
    for folder, name, w, h in SOURCE:
        os.makedirs(os.path.join(root, folder, os.path.dirname(name)), exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            os.path.join(root, folder, name)
        )
    return str(root)


TINY = ["--resolution", "32", "--vae", "tiny-random", "--workers", "0", "--batch-size", "2"]


def run(source, dest, *extra):
    """data.py in this process with the tiny VAE at 32 px."""
    data.main(data.parse_args(["--source", source, "--dest", dest, *TINY, *extra]))


def test_center_crop_halves_then_crops_exactly():
    """1024x512 red | green green | blue: one BOX halving to 512x256, no resize, the middle 256
    columns = green."""
    array = np.zeros((512, 1024, 3), np.uint8)
    array[:, :256, 0] = 255
    array[:, 256:768, 1] = 255
    array[:, 768:, 2] = 255
    out = data.center_crop_dhariwal(PIL.Image.fromarray(array), 256)
    assert out.shape == (256, 256, 3) and np.all(out == [0, 255, 0])


def test_center_crop_non_integer_scale():
    """400x300 to 64: two halvings (300 >= 128, 150 >= 128) to 100x75, bicubic to 85x64, columns
    10..73 kept."""
    array = np.tile(
        np.arange(400, dtype=np.float64)[None, :, None] * 255 / 399, (300, 1, 3)
    ).astype(np.uint8)
    image = PIL.Image.fromarray(array)
    out = data.center_crop_dhariwal(image, 64)
    halved = image.resize((200, 150), PIL.Image.Resampling.BOX).resize(
        (100, 75), PIL.Image.Resampling.BOX
    )
    expected = np.array(halved.resize((85, 64), PIL.Image.Resampling.BICUBIC))[:, 10:74]
    assert out.shape == (64, 64, 3) and np.array_equal(out, expected)
    # a left-to-right ramp stays one: not transposed
    assert np.all(np.diff(out[32, :, 0].astype(int)) >= 0)
    # portrait 300x500 to 256: no halving (300 < 512), bicubic to 256x427, rows 85..340 kept
    tall = PIL.Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (500, 300, 3), dtype=np.uint8)
    )
    expected = np.array(tall.resize((256, 427), PIL.Image.Resampling.BICUBIC))[85:341]
    assert np.array_equal(data.center_crop_dhariwal(tall, 256), expected)


@pytest.mark.slow
def test_end_to_end_then_resume(tmp_path, caplog):
    """Class folders -> REPA layout read back with the right labels, crops, latents; a re-run
    rewrites nothing."""
    source, dest = write_source(tmp_path / "src"), str(tmp_path / "out")
    run(source, dest)
    with caplog.at_level(logging.WARNING):
        ds = LatentImageDataset(dest)
    assert ds.vae == "tiny-random" and "TINY RANDOM VAE" in caplog.text
    # sorted relative paths: goldfish/sub/y, goldfish/x, tench/a, tench/b, zebra/z; classes in
    # sorted folder order
    order = [
        "goldfish/sub/y.JPEG", "goldfish/x.JPEG", "tench/a.png", "tench/b.JPEG", "zebra/z.JPEG",
    ]
    assert len(ds) == 5 and ds.num_classes == 3 and ds.resolution == 32 and ds.latent_size == 4
    assert [ds[i][2].item() for i in range(5)] == [0, 0, 1, 1, 2]
    vae = encoders.load_vae("tiny-random")
    for i, name in enumerate(order):
        image, moments, _ = ds[i]
        expected = data.center_crop_dhariwal(
            PIL.Image.open(os.path.join(source, name)).convert("RGB"), 32
        )
        assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)
        torch.testing.assert_close(moments, encoders.encode_moments(vae, image[None])[0])
    with open(os.path.join(dest, "vae-sd", "dataset.json")) as f:
        meta = json.load(f)
    assert meta["labels"][2] == ["00000/img-mean-std-00000002.npy", 1]
    assert meta["classes"] == ["goldfish", "tench", "zebra"] and meta["vae"] == "tiny-random"
    with open(os.path.join(dest, "images", "dataset.json")) as f:
        assert json.load(f)["labels"][4] == ["00000/img00000004.png", 2]

    before = snapshot(dest)
    run(source, dest)
    assert snapshot(dest) == before  # same files, same bytes, not even rewritten
    lost = os.path.join(dest, "vae-sd", "00000", "img-mean-std-00000003.npy")
    os.remove(lost)  # as if stopped between the PNG and its latent
    run(source, dest)
    after = snapshot(dest)
    assert after.keys() == before.keys()
    assert all(
        after[k] == before[k]
        for k in before
        if not k.endswith("00003.npy") and "dataset.json" not in k
    )
    # redone in a batch of one instead of two: equal up to float rounding of the convolutions
    redone, original = (
        np.load(io.BytesIO(s["vae-sd/00000/img-mean-std-00000003.npy"][0])) for s in (after, before)
    )
    assert redone.shape == (8, 4, 4) and redone.dtype == np.float32
    # batch-size-dependent conv rounding
    np.testing.assert_allclose(redone, original, rtol=1e-4, atol=1e-5)


class RecordingVAE:
    """An SD-VAE stand-in that records what encode is given and returns its 8x8 means as the
    posterior mean (std 0.5): the moments data.py writes then show the range too."""

    device = torch.device("cpu")

    def __init__(self):
        self.inputs = []

    def encode(self, x):
        self.inputs.append(x.clone())
        mean = torch.nn.functional.avg_pool2d(x, 8).repeat(1, 2, 1, 1)[:, :4]  # (B, 4, H/8, W/8)
        dist = types.SimpleNamespace(mean=mean, std=torch.full_like(mean, 0.5))
        return types.SimpleNamespace(latent_dist=dist)


def test_the_vae_sees_uint8_0_and_255_as_minus_one_and_plus_one(tmp_path, monkeypatch):
    """Black, random and white 32x32 PNGs (no resize: the crop is exact) reach the VAE as
    u / 127.5 - 1, so 0 -> -1 and 255 -> +1, the range the decode path (to_uint8) inverts."""
    vae = RecordingVAE()
    monkeypatch.setattr(encoders, "load_vae", lambda name, device="cpu": vae)
    rng = np.random.default_rng(0)
    pixels = {"a_black": np.zeros((32, 32, 3), np.uint8),
              "b_random": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
              "c_white": np.full((32, 32, 3), 255, np.uint8)}
    for name, array in pixels.items():
        os.makedirs(tmp_path / "src" / name)
        PIL.Image.fromarray(array).save(tmp_path / "src" / name / "x.png")
    run(str(tmp_path / "src"), str(tmp_path / "out"))  # batches of 2: two encode calls
    seen = torch.cat(vae.inputs)  # (3, 3, 32, 32) in source order
    assert seen.dtype == torch.float32 and seen.shape == (3, 3, 32, 32)
    assert torch.all(seen[0] == -1) and torch.all(seen[2] == 1)
    u = torch.from_numpy(pixels["b_random"]).permute(2, 0, 1).double()  # (3, 32, 32)
    torch.testing.assert_close(seen[1].double(), (u - 127.5) / 127.5, rtol=0, atol=1e-6)
    for i, sign in ((0, -1), (2, 1)):  # what the VAE returned is what was written
        path = tmp_path / "out" / "vae-sd" / data.output_names(i)[1]
        moments = np.load(path)  # (8, 4, 4): mean, std
        assert np.all(moments[:4] == sign) and np.all(moments[4:] == 0.5)


def test_max_images_and_png_compression(tmp_path):
    """--max-images takes the first images in sorted order; compressed PNGs decode to the same
    pixels."""
    source = write_source(tmp_path / "src")
    run(source, str(tmp_path / "a"), "--max-images", "2")
    run(source, str(tmp_path / "b"), "--max-images", "2", "--png-compress", "9")
    a, b = LatentImageDataset(str(tmp_path / "a")), LatentImageDataset(str(tmp_path / "b"))
    assert len(a) == 2 and a.num_classes == 3  # the json records all classes, not just those seen
    assert torch.equal(a[1][0], b[1][0])
    size = os.path.getsize(os.path.join(tmp_path, "a", "images", "00000", "img00000001.png"))
    assert size > os.path.getsize(os.path.join(tmp_path, "b", "images", "00000", "img00000001.png"))


def test_bad_source_is_a_clear_exit(tmp_path):
    """Missing source, no class folders, no images, a bad resolution: one-line SystemExit messages.
    """
    cases = {
        "missing": "is not a directory",
        "loose": "no class folders",
        "empty": "no images in the class folders",
    }
    os.makedirs(tmp_path / "loose")
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "loose" / "a.png")
    os.makedirs(tmp_path / "empty" / "cls")
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("no images here")
    for case, message in cases.items():
        with pytest.raises(SystemExit, match=message):
            run(str(tmp_path / case), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_every_flag_has_help():
    """argparse help on every flag, and the defaults REPA's preprocessing uses."""
    actions = [a for a in data.build_parser()._actions if a.dest != "help"]
    assert len(actions) == 15 and all(a.help and len(a.help) > 20 for a in actions)
    args = data.parse_args(["--source", "s", "--dest", "d"])
    assert (
        args.resolution == 256
        and args.vae == "mse"
        and args.png_compress == 0
        and args.max_images is None
    )


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(tmp_path):
    """torchrun with 2 gloo ranks writes the same files as one process."""
    source, dest = write_source(tmp_path / "src"), str(tmp_path / "ddp")
    run(source, str(tmp_path / "single"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "data.py",
               "--source", source, "--dest", dest, *TINY]
    result = subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "rank 0 of 2: 3 to do" in result.stderr  # images 0, 2, 4: a strided shard, not all five
    single, ddp = snapshot(tmp_path / "single"), snapshot(dest)
    assert single.keys() == ddp.keys() and len(single) == 12
    # PNGs and labels to the byte; latents to float rounding (the batches are made up differently)
    for k in single:
        if k.endswith(".npy"):
            np.testing.assert_allclose(
                *(np.load(io.BytesIO(s[k][0])) for s in (single, ddp)), rtol=1e-5, atol=1e-6
            )
        else:
            assert single[k][0] == ddp[k][0], k


def test_symlinked_class_folders_are_followed(tmp_path):
    """An ImageNet subset built from symlinks: a linked class folder counts, a link back up does not
    loop."""
    write_source(tmp_path / "full")
    os.makedirs(tmp_path / "subset")
    os.symlink(tmp_path / "full" / "zebra", tmp_path / "subset" / "zebra", target_is_directory=True)
    os.symlink(tmp_path / "full" / "tench", tmp_path / "subset" / "tench", target_is_directory=True)
    os.symlink(tmp_path / "subset", tmp_path / "full" / "tench" / "loop", target_is_directory=True)
    paths, labels, classes = data.list_source(str(tmp_path / "subset"))
    assert paths == ["tench/a.png", "tench/b.JPEG", "zebra/z.JPEG"] and labels == [0, 0, 1]
    assert classes == ["tench", "zebra"]


def test_numeric_flags_are_range_checked(capsys):
    multiple = "a positive multiple of 8"
    for flag, value, must in [
        ("--resolution", "0", multiple),
        ("--resolution", "30", multiple),
        ("--batch-size", "0", "at least 1"),
        ("--workers", "-1", "at least 0"),
        ("--max-images", "0", "at least 1"),
    ]:
        line = cli_error(capsys, data.parse_args, "--source", "s", "--dest", "d", flag, value)
        assert (
            line == f"data.py: error: argument {flag}: {value} is out of range: it must be {must}"
        )


# ----------------------------------------------------------------------------------------------
# Faults: bad source images, bad prepared files (--verify), Ctrl-C, a full disk

ORDER = ["goldfish/sub/y.JPEG", "goldfish/x.JPEG", "tench/a.png", "tench/b.JPEG", "zebra/z.JPEG"]


@pytest.fixture
def fast_vae(monkeypatch):
    """RecordingVAE in place of the tiny random one: per image, so batching changes no bit."""
    monkeypatch.setattr(encoders, "load_vae", lambda name, device="cpu": RecordingVAE())


def made(monkeypatch):
    """The indices whose latent file data.py writes from now on."""
    indices, real = [], data.save_npy
    monkeypatch.setattr(data, "save_npy", lambda path, array: indices.append(
        int(os.path.basename(path)[-12:-4])) or real(path, array))
    return indices


def bad_list(dest):
    with open(os.path.join(dest, data.BAD_FILES)) as f:
        return [line.rstrip("\n").split("\t") for line in f]


def test_unreadable_source_images_are_skipped_listed_and_made_once_repaired(
    tmp_path, fast_vae, monkeypatch, caplog
):
    source, dest = write_source(tmp_path / "src"), str(tmp_path / "out")
    clean = str(tmp_path / "clean")
    run(source, clean)
    truncated, garbage = (os.path.join(source, name) for name in ORDER[3:])
    originals = [open(p, "rb").read() for p in (truncated, garbage)]
    with open(truncated, "r+b") as f:
        f.truncate(len(originals[0]) // 2)
    with open(garbage, "wb") as f:
        f.write(b"\x00garbage" * 100)
    with caplog.at_level(logging.WARNING):
        run(source, dest)
    skipped = [r.getMessage() for r in caplog.records if "skipping source image" in r.getMessage()]
    assert len(skipped) == 2 and truncated in skipped[0] and garbage in skipped[1]
    (p1, r1), (p2, r2) = bad_list(dest)
    assert (p1, p2) == (truncated, garbage)
    assert r1.startswith("OSError: image file is truncated")
    assert r2.startswith("UnidentifiedImageError: cannot identify image file")
    ds = LatentImageDataset(dest)  # the three good images, their labels
    assert len(ds) == 3 and [ds[i][2].item() for i in range(3)] == [0, 0, 1]
    for path, content in zip((truncated, garbage), originals):
        with open(path, "wb") as f:
            f.write(content)
    redone = made(monkeypatch)
    run(source, dest)
    assert redone == [3, 4] and not os.path.exists(os.path.join(dest, data.BAD_FILES))
    assert {k: v[0] for k, v in snapshot(dest).items()} == {
        k: v[0] for k, v in snapshot(clean).items()}


def test_verify_lists_bad_prepared_files_and_a_rerun_remakes_exactly_those(
    tmp_path, fast_vae, monkeypatch, capsys
):
    source, dest = write_source(tmp_path / "src"), str(tmp_path / "out")
    run(source, dest)
    before = snapshot(dest)
    image, latent = (lambda i: os.path.join(dest, "images", data.output_names(i)[0]),
                     lambda i: os.path.join(dest, "vae-sd", data.output_names(i)[1]))
    with open(image(1), "r+b") as f:
        f.truncate(100)
    with open(latent(2), "wb") as f:
        f.write(b"garbage" * 20)
    np.save(latent(0), np.full((8, 4, 4), np.nan, np.float32))
    os.remove(image(3))  # its latent is there: only --verify finds it
    data.main(data.parse_args(["--verify", dest, "--workers", "2"]))
    listed = bad_list(dest)
    assert [p for p, _ in listed] == [
        "vae-sd/00000/img-mean-std-00000000.npy", "images/00000/img00000001.png",
        "vae-sd/00000/img-mean-std-00000002.npy", "images/00000/img00000003.png"]
    assert [r for _, r in listed][::2] == [
        "non-finite values", "not an array file (garbage or pickled data)"]
    assert listed[1][1].startswith("unreadable (OSError: image file is truncated")
    assert listed[3][1] == "missing"
    assert "4 of the 10 files" in capsys.readouterr().out
    redone = made(monkeypatch)
    run(source, dest)
    assert sorted(redone) == [0, 1, 2, 3]
    assert {k: v[0] for k, v in snapshot(dest).items()} == {k: v[0] for k, v in before.items()}
    assert not os.path.exists(os.path.join(dest, data.BAD_FILES))


def test_verify_continues_where_it_was_interrupted(tmp_path, fast_vae, monkeypatch):
    source, dest = write_source(tmp_path / "src"), str(tmp_path / "out")
    run(source, dest)
    np.save(os.path.join(dest, "vae-sd", data.output_names(0)[1]), np.zeros((8, 4, 4), np.int64))
    checked = verify_reads(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        data.verify(dest, 0, chunk=2)
    with open(os.path.join(dest, "verify-progress.json")) as f:
        assert json.load(f)["checked"] == 2
    resumed = verify_reads(monkeypatch)
    bad = data.verify(dest, 0, chunk=2)
    assert checked + resumed == [0, 1, 2, 2, 3, 4]  # the chunk cut off is read again, not the first
    assert bad == [("vae-sd/00000/img-mean-std-00000000.npy", "dtype int64, expected floating")]
    assert not os.path.exists(os.path.join(dest, "verify-progress.json"))


def test_ctrl_c_keeps_the_files_and_a_rerun_continues(tmp_path, fast_vae, monkeypatch):
    source, dest, marker = write_source(tmp_path / "src"), str(tmp_path / "out"), tmp_path / "m"
    argv = ["--source", source, "--dest", dest, *TINY]
    code = (
        "import os, time, data\n"
        "real = data.save_npy\n"
        "def stall(path, array):\n"
        "    real(path, array)\n"
        "    if path.endswith('00001.npy'):\n"
        f"        open({str(marker)!r}, 'w').close()\n"
        "        time.sleep(60)\n"
        "data.save_npy = stall\n"
        f"data.main(data.parse_args({argv!r}))\n"
    )
    status, err = interrupted(code, marker)
    assert status == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == ("data.py: interrupted: every file written so far is "
                                            "kept; run the same command again to continue")
    assert sorted(os.listdir(os.path.join(dest, "vae-sd", "00000"))) == [
        "img-mean-std-00000000.npy", "img-mean-std-00000001.npy"]
    redone = made(monkeypatch)  # the tiny random VAE made those two; this run's VAE the rest
    run(source, dest)
    assert redone == [2, 3, 4] and len(LatentImageDataset(dest)) == 5


def test_full_disk_is_one_line(tmp_path, fast_vae, monkeypatch):
    source, dest = write_source(tmp_path / "src"), str(tmp_path / "out")
    disk_free(monkeypatch, 999)
    with pytest.raises(SystemExit) as e:
        run(source, dest)
    # 5 x (32 x 32 x 3 PNG pixels + 8 x 4 x 4 float32 + 4 kB for headers and folders)
    assert str(e.value) == (f"data.py: error: not enough space in {dest} for the images and "
                            "latents: 999 B free, 38.4 kB needed; free space there or write to "
                            "another folder, then run the same command again")
    disk_free(monkeypatch, 10**9)
    real = data.write_atomic
    disk_fills(monkeypatch, data, lambda path: path.endswith("00002.png"))
    with pytest.raises(SystemExit, match=f"^data.py: error: the disk holding {dest}/images/00000 "
                                         "is full"):
        run(source, dest)
    monkeypatch.setattr(data, "write_atomic", real)
    redone = made(monkeypatch)
    run(source, dest)
    assert redone == [2, 3, 4]


def test_verify_and_source_flags_are_one_line(tmp_path, capsys):
    error = cli_error(capsys, data.parse_args, "--dest", "d")
    assert error.endswith("required: --source, --dest (or --verify DEST)")
    with pytest.raises(SystemExit, match=f"^data.py: error: --verify {tmp_path}: no images/ and "
                                         "vae-sd/ folders there"):
        data.main(data.parse_args(["--verify", str(tmp_path)]))
