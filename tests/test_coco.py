"""data.py's text-to-image data: COCO 2014 -> U-ViT's feature layout (LANCZOS crop, [mean, logvar]
moments, one feature file per caption, the null caption), read back as [mean, std] with one
caption per image per step drawn from (seed, step, index); resume and bad input."""

import functools
import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

import data
import encoders
from cluster import UserError
from data import BadSample, CocoDataset, GlobalBatchSampler
from helpers import snapshot, verify_reads

TOKENS, DIM = 77, 8
LOAD_TEXT_ENCODER = encoders.load_text_encoder  # the real one, before the stub replaces it


class StubText:
    """Text encoder stand-in with encoders.load_text_encoder's API: the features of a caption are
    a fixed function of its characters (position t sees character t, padding past the end)."""

    name, dim = "stub-text", DIM

    def encode(self, captions):
        codes = torch.zeros(len(captions), TOKENS)
        for b, text in enumerate(captions):
            chars = [ord(c) for c in text[:TOKENS]]
            codes[b, : len(chars)] = torch.tensor(chars, dtype=torch.float32)
        freqs = torch.arange(1, DIM + 1) / 50  # (D,)
        return torch.sin(codes[..., None] * freqs + torch.arange(TOKENS)[:, None])  # (B, 77, D)


@pytest.fixture(autouse=True)
def stub_text(monkeypatch):
    """Every load_text_encoder call returns the stub (no download, no CLIP)."""
    calls = []

    def load(name, path=None, device="cpu", random=False):
        calls.append(name)
        return StubText()

    monkeypatch.setattr(encoders, "load_text_encoder", load, raising=False)
    return calls


# image id -> (width, height) and its captions; listed unsorted, captions interleaved in the file
TRAIN = {
    42: ((90, 60), ["a red bus", "a bus on a street", "red", "the bus", "a vehicle"]),
    7: ((48, 64), ["a cat", "a small cat", "cat on a mat", "feline", "a pet", "sleepy cat"]),
    19: ((75, 75), ["a tree", "green tree", "one tree", "a plant", "tall tree"]),
}
VAL = {3: ((64, 40), ["a dog", "dog running", "a brown dog", "puppy", "an animal"])}


def file_name(split, image_id):
    return f"COCO_{split}2014_{image_id:012d}.jpg"


def write_coco(root, splits=(("train", TRAIN), ("val", VAL))):
    """A tiny COCO 2014 folder: random JPEGs and a captions json per split; returns root."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split, images in splits:
        os.makedirs(os.path.join(root, f"{split}2014"), exist_ok=True)
        anns = []
        for image_id, ((w, h), captions) in images.items():
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            PIL.Image.fromarray(pixels).save(os.path.join(root, f"{split}2014",
                                                          file_name(split, image_id)))
            anns += [{"image_id": image_id, "id": 100 * image_id + k, "caption": c}
                     for k, c in enumerate(captions)]
        anns.sort(key=lambda a: (a["id"] % 100, -a["image_id"]))  # images interleaved
        meta = {"images": [{"id": i, "file_name": file_name(split, i), "width": w, "height": h}
                           for i, ((w, h), _) in images.items()], "annotations": anns}
        with open(os.path.join(root, "annotations", f"captions_{split}2014.json"), "w") as f:
            json.dump(meta, f)
    return str(root)


TINY = ["--dataset", "coco", "--resolution", "32", "--vae", "tiny-random", "--workers", "0",
        "--batch-size", "2"]


def run(source, dest, *extra):
    """data.py --dataset coco in this process, tiny VAE, 32 px, stub text encoder."""
    data.main(data.parse_args(["--source", source, "--dest", dest, *TINY, *extra]))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(source, dest) of one preparation of both splits, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("coco")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(encoders, "load_text_encoder", lambda **kw: StubText(), raising=False)
        source = write_coco(root / "src")
        run(source, str(root / "out"))
    return source, str(root / "out")


def uvit_crop(path, size):
    """U-ViT's datasets.center_crop, written out: numpy slice of the central square, LANCZOS."""
    img = np.array(PIL.Image.open(path).convert("RGB"))
    crop = min(img.shape[:2])
    img = img[(img.shape[0] - crop) // 2:(img.shape[0] + crop) // 2,
              (img.shape[1] - crop) // 2:(img.shape[1] + crop) // 2]
    return np.array(PIL.Image.fromarray(img).resize((size, size), PIL.Image.LANCZOS))


def test_crop_is_uvits_lanczos_center_crop(tmp_path):
    """Landscape, portrait, odd margins and square: the same pixels as U-ViT's crop, and not ADM's
    (which would BOX-halve and resize bicubically)."""
    rng = np.random.default_rng(1)
    for w, h in [(90, 60), (48, 65), (75, 75), (301, 200)]:
        path = tmp_path / f"{w}x{h}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        out = data.center_crop_lanczos(PIL.Image.open(path).convert("RGB"), 32)
        assert out.shape == (32, 32, 3) and np.array_equal(out, uvit_crop(path, 32))
        adm = data.center_crop_dhariwal(PIL.Image.open(path).convert("RGB"), 32)
        assert not np.array_equal(out, adm)


def test_layout_files_and_json(prepared):
    """U-ViT's file names, sorted image ids, captions in file order, [mean, logvar] moments of the
    crop, the stub's features per caption and of the empty caption, and what dataset.json says."""
    source, dest = prepared
    vae, text = encoders.load_vae("tiny-random"), StubText()
    for split, images in (("train", TRAIN), ("val", VAL)):
        for i, image_id in enumerate(sorted(images)):  # index = rank of the id: 7, 19, 42
            folder = os.path.join(dest, split)
            png = np.array(PIL.Image.open(os.path.join(folder, f"{i}.png")))
            expected = uvit_crop(os.path.join(source, f"{split}2014", file_name(split, image_id)),
                                 32)
            assert np.array_equal(png, expected)
            moments = np.load(os.path.join(folder, f"{i}.npy"))
            x = torch.from_numpy(png).permute(2, 0, 1)[None]
            dist = vae.encode(x.float() / 127.5 - 1).latent_dist
            assert moments.shape == (8, 4, 4) and moments.dtype == np.float32
            np.testing.assert_allclose(moments, torch.cat([dist.mean, dist.logvar], 1)[0],
                                       rtol=1e-5, atol=1e-6)
            captions = images[image_id][1]
            for k, caption in enumerate(captions):
                features = np.load(os.path.join(folder, f"{i}_{k}.npy"))
                assert features.dtype == np.float32
                np.testing.assert_array_equal(features, text.encode([caption])[0].numpy())
            assert not os.path.exists(os.path.join(folder, f"{i}_{len(captions)}.npy"))
    np.testing.assert_array_equal(np.load(os.path.join(dest, "empty_context.npy")),
                                  text.encode([""])[0].numpy())
    with open(os.path.join(dest, "dataset.json")) as f:
        meta = json.load(f)
    assert meta == {"dataset": "coco", "resolution": 32, "crop": "center-lanczos",
                    "vae": "tiny-random", "moments": "mean-logvar", "text_encoder": "stub-text",
                    "text_dim": DIM, "text_dtype": "float32",
                    "splits": {"train": {"images": 3, "captions": 16},
                               "val": {"images": 1, "captions": 5}}}
    with open(os.path.join(dest, "train", "captions.json")) as f:
        assert json.load(f)[0] == [7, file_name("train", 7), TRAIN[7][1]]


def test_dataset_reads_mean_std(prepared, caplog):
    """Items: the PNG, the moments as [mean, std] (diffusers' std of the crop), one caption's
    features; the null caption; the tiny stand-ins said loudly."""
    _, dest = prepared
    with caplog.at_level(logging.WARNING):
        ds = CocoDataset(dest, "train", seed=0)
    assert "TINY RANDOM VAE" in caplog.text
    assert len(ds) == 3 and ds.resolution == 32 and ds.latent_size == 4 and ds.text_dim == DIM
    assert ds.num_captions.tolist() == [6, 5, 5] and ds.text_encoder == "stub-text"
    assert ds.captions[2] == TRAIN[42][1]
    vae = encoders.load_vae("tiny-random")
    image, moments, context = ds[(1, 5)]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    torch.testing.assert_close(moments, encoders.encode_moments(vae, image[None])[0],
                               rtol=1e-5, atol=1e-6)
    k = ds.caption_index(1, 5)
    assert context.dtype == torch.float32 and context.shape == (TOKENS, DIM)
    assert torch.equal(context, StubText().encode([TRAIN[19][1][k]])[0])
    assert torch.equal(ds.null_context, StubText().encode([""])[0])


def test_moment_conventions_convert_exactly():
    """[mean, logvar] -> [mean, exp(0.5 * clamp(logvar, -30, 20))], bitwise as diffusers computes
    std; [mean, std] passes; an unknown convention is refused."""
    gen = torch.Generator().manual_seed(0)
    moments = torch.randn(2, 8, 3, 3, generator=gen) * 4
    moments[0, 4, 0, 0], moments[0, 5, 0, 0] = -50.0, 30.0  # beyond the clamp on both sides
    out = data.mean_std(moments.numpy(), "mean-logvar")
    dist = DiagonalGaussianDistribution(moments)
    assert torch.equal(out[:, :4], moments[:, :4]) and torch.equal(out[:, 4:], dist.std)
    assert out[0, 4, 0, 0] == np.exp(-15.0).astype(np.float32) and out[0, 5, 0, 0] == torch.exp(
        torch.tensor(10.0))
    assert torch.equal(data.mean_std(moments[0], "mean-logvar"), out[0])  # one item (8, h, w)
    assert torch.equal(data.mean_std(moments, "mean-std"), moments)
    with pytest.raises(UserError, match="unknown moment convention"):
        data.mean_std(moments, "mean-var")


def test_caption_choice_is_a_function_of_seed_step_index(prepared):
    """Two datasets agree item by item in any order; steps draw every caption; a resumed sampler
    hands the same (index, step) keys, so a resumed run sees the same captions."""
    _, dest = prepared
    a, b = CocoDataset(dest, seed=3), CocoDataset(dest, seed=3)
    keys = [(i, s) for s in range(40) for i in range(3)]
    picks = [a.caption_index(*key) for key in keys]
    assert picks == [b.caption_index(*key) for key in reversed(keys)][::-1]
    assert all(torch.equal(x, y) for x, y in zip(a[(2, 7)], b[(2, 7)]))
    for i in range(3):
        assert {p for (j, _), p in zip(keys, picks) if j == i} == set(range(a.num_captions[i]))
    other = CocoDataset(dest, seed=4)
    assert picks != [other.caption_index(*key) for key in keys]
    assert a.caption_index(1) == b.caption_index(1)  # by index alone: one caption per seed
    sampler = GlobalBatchSampler(3, 2, 0, 1, seed=0, start_step=0, keyed=True)
    batches = [next(it) for it in [iter(sampler)] for _ in range(5)]
    assert all(step == s for s, batch in enumerate(batches) for _, step in batch)
    resumed = iter(GlobalBatchSampler(3, 2, 0, 1, seed=0, start_step=3, keyed=True))
    assert [next(resumed), next(resumed)] == batches[3:]
    loader = data.TrainingBatches(a, {"batch_size": 2, "seed": 0, "num_workers": 0,
                                      "preempt_signals": ()}, 0, 1, 3, torch.device("cpu"))
    images, moments, context = next(iter(loader))  # (2, 3, 32, 32), (2, 8, 4, 4), (2, 77, D)
    expected = [a[key] for key in batches[3]]
    assert torch.equal(context, torch.stack([e[2] for e in expected]))
    assert torch.equal(moments, torch.stack([e[1] for e in expected]))


def test_fp16_features_read_as_float32(tmp_path):
    source = write_coco(tmp_path / "src", (("val", VAL),))
    run(source, str(tmp_path / "out"), "--splits", "val", "--text-fp16", "1")
    stored = np.load(tmp_path / "out" / "val" / "0_3.npy")
    assert stored.dtype == np.float16
    ds = CocoDataset(str(tmp_path / "out"), "val")
    assert ds.meta["text_dtype"] == "float16" and ds.null_context.dtype == torch.float32
    k = ds.caption_index(0, 1)
    expected = StubText().encode([VAL[3][1][k]])[0].half().float()
    assert torch.equal(ds[(0, 1)][2], expected)
    assert data.verify(str(tmp_path / "out"), 0) == []  # --verify checks the recorded dtype
    np.save(tmp_path / "out" / "val" / "0_3.npy", stored.astype(np.float32))
    assert data.verify(str(tmp_path / "out"), 0) == [("val/0_3.npy",
                                                      "dtype float32, expected float16")]


def test_resume_rewrites_nothing_and_redoes_one_image(tmp_path):
    """A re-run writes nothing; an image whose moments file is gone is redone (its PNG kept), the
    others are untouched."""
    source, dest = write_coco(tmp_path / "src"), str(tmp_path / "out")
    run(source, dest)
    before = snapshot(dest)
    run(source, dest)
    assert snapshot(dest) == before
    os.remove(os.path.join(dest, "train", "1.npy"))  # as if stopped before image 1's moments
    run(source, dest)
    after = snapshot(dest)
    assert after.keys() == before.keys()
    redone = {k for k in before if after[k] != before[k]}
    assert redone <= {"train/1.npy"} | {f"train/1_{k}.npy" for k in range(5)}
    assert "train/1.npy" in redone and after["train/1.png"] == before["train/1.png"]
    assert all(after[k][0] == before[k][0] for k in redone if not k.endswith("1.npy"))


def test_uvit_folder_trains_as_it_is(tmp_path, caplog):
    """A folder made by U-ViT's script (plus REPA's PNGs): no dataset.json, [mean, logvar]
    moments: read as CLIP-L features and converted; a run expecting another encoder is refused."""
    root = tmp_path / "coco256_features"
    os.makedirs(root / "train")
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 8, 2, 2, generator=gen)
    for i in range(2):
        PIL.Image.new("RGB", (16, 16), (i, 0, 0)).save(root / "train" / f"{i}.png")
        np.save(root / "train" / f"{i}.npy", raw[i].numpy())
        for k in range(5 + i):
            np.save(root / "train" / f"{i}_{k}.npy", np.full((TOKENS, 4), 10 * i + k, np.float32))
    np.save(root / "empty_context.npy", np.zeros((TOKENS, 4), np.float32))
    assert data.is_coco(str(root))
    with caplog.at_level(logging.WARNING):
        ds = CocoDataset(str(root), expect={"text_encoder": data.UVIT_TEXT_ENCODER,
                                            "moments": None})
    assert "no dataset.json" in caplog.text and ds.moments == "mean-logvar" and ds.captions is None
    assert ds.num_captions.tolist() == [5, 6] and ds.resolution == 16
    _, moments, context = ds[(1, 9)]
    assert torch.equal(moments, data.mean_std(raw[1], "mean-logvar"))
    assert context[0, 0] == 10 + ds.caption_index(1, 9)
    with pytest.raises(UserError, match="made with text_encoder 'openai/clip-vit-large-patch14' "
                                        "but the run expects 'stub-text'"):
        CocoDataset(str(root), expect={"text_encoder": "stub-text"})
    with pytest.raises(UserError, match="moments 'mean-logvar' but the run expects 'mean-std'"):
        CocoDataset(str(root), expect={"moments": "mean-std"})
    os.remove(root / "train" / "0.png")  # U-ViT's own script writes no PNGs (REPA issue #58)
    with pytest.raises(UserError, match="1 images .* for 2 moments files.*REPA issue #58"):
        CocoDataset(str(root))
    # --verify: 16 px crops (the first that reads), 4 wide float32 features (the null's)
    assert data.verify(str(root), 0) == [("train/0.png", "missing")]
    np.save(root / "train" / "1_2.npy", np.zeros((TOKENS, 8), np.float32))
    np.save(root / "train" / "1.npy", np.zeros((8, 4, 4), np.float32))
    assert data.verify(str(root), 0) == [
        ("train/0.png", "missing"), ("train/1.npy", "shape (8, 4, 4), expected (8, 2, 2)"),
        ("train/1_2.npy", "shape (77, 8), expected (77, 4)")]


def drop_val_json(source):
    os.remove(os.path.join(source, "annotations", "captions_val2014.json"))


def swap_captions(source):
    """train2014's captions file replaced by val's."""
    ann = os.path.join(source, "annotations")
    os.replace(os.path.join(ann, "captions_val2014.json"),
               os.path.join(ann, "captions_train2014.json"))


def edit_train_json(source, edit):
    path = os.path.join(source, "annotations", "captions_train2014.json")
    with open(path) as f:
        meta = json.load(f)
    edit(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


SOURCE_ERRORS = {
    "captions of another split": (swap_captions, "1 of the 1 images .* are not in .*train2014 "
                                  r"\(e.g. COCO_val2014_000000000003.jpg\).*does not match"),
    "missing split folder": (lambda s: os.rename(os.path.join(s, "val2014"),
                                                 os.path.join(s, "v")), "val2014 is missing"),
    "missing captions file": (drop_val_json, "captions_val2014.json is in neither"),
    "image without captions": (lambda s: edit_train_json(s, lambda m: m.update(annotations=[
        a for a in m["annotations"] if a["image_id"] != 19])), "1 images have no caption .*19"),
    "caption of an unlisted image": (lambda s: edit_train_json(s, lambda m: m["annotations"].append(
        {"image_id": 5, "id": 1, "caption": "x"})), "1 captions name images it does not list"),
    "not a captions file": (lambda s: edit_train_json(s, lambda m: m.pop("images")),
                            "is not a COCO captions file"),
}


@pytest.mark.parametrize("case", list(SOURCE_ERRORS))
def test_bad_source_is_one_line_and_writes_nothing(tmp_path, case):
    source = write_coco(tmp_path / "src")
    break_it, message = SOURCE_ERRORS[case]
    break_it(source)
    with pytest.raises(SystemExit, match=message) as stop:
        run(source, str(tmp_path / "out"))
    assert str(stop.value).startswith("data.py: error: ") and "\n" not in str(stop.value)
    assert not os.path.exists(tmp_path / "out")


def test_resume_with_other_settings_is_refused(tmp_path):
    """Another text encoder or dtype on a folder made with other settings: refused before writing.
    """
    source, dest = write_coco(tmp_path / "src", (("val", VAL),)), str(tmp_path / "out")
    run(source, dest, "--splits", "val")
    before = snapshot(dest)
    with pytest.raises(SystemExit, match=r"made with text_dtype 'float32' \(now 'float16'\)"):
        run(source, dest, "--splits", "val", "--text-fp16", "1")
    StubText.name = "other-text"
    try:
        with pytest.raises(SystemExit, match="text_encoder 'stub-text' .now 'other-text'"):
            run(source, dest, "--splits", "val")
    finally:
        StubText.name = "stub-text"
    assert snapshot(dest) == before


def test_reader_errors(prepared, tmp_path):
    """Missing and unfinished splits, a gap in the files, counts that disagree with dataset.json."""
    _, dest = prepared
    with pytest.raises(UserError, match="does not exist"):
        CocoDataset(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="is no COCO feature folder"):
        CocoDataset(str(tmp_path))
    source = write_coco(tmp_path / "src", (("val", VAL),))
    run(source, str(tmp_path / "out"), "--splits", "val")
    out = str(tmp_path / "out")
    with open(os.path.join(out, "dataset.json")) as f:
        meta = json.load(f)
    with pytest.raises(UserError, match=r"train is missing \(split train\).*--splits train"):
        CocoDataset(out, "train")
    os.makedirs(os.path.join(out, "train"))
    with pytest.raises(UserError, match="split train of .* is unfinished"):
        CocoDataset(out, "train")
    os.remove(os.path.join(out, "val", "0_2.npy"))
    with pytest.raises(UserError, match="caption features of image 0 are not"):
        CocoDataset(out, "val")
    os.remove(os.path.join(out, "val", "0_3.npy"))
    os.remove(os.path.join(out, "val", "0_4.npy"))
    np.save(os.path.join(out, "val", "0_2.npy"), np.zeros((TOKENS, DIM), np.float32))
    with pytest.raises(UserError, match="3 captions, but dataset.json says 1 and 5"):
        CocoDataset(out, "val")
    assert data.is_coco(out) and not data.is_coco(str(tmp_path / "src"))
    assert meta["splits"] == {"val": {"images": 1, "captions": 5}}


def test_build_dataset_picks_coco(prepared):
    _, dest = prepared
    config = {"data_dir": dest, "seed": 0, "resolution": 32, "text_encoder": "stub-text",
              "batch_size": 2}
    assert isinstance(data.build_dataset(config), CocoDataset)
    with pytest.raises(UserError, match="run expects 'clip'"):
        data.build_dataset({**config, "text_encoder": "clip"})
    with pytest.raises(UserError, match="32 px images but --resolution is 256"):
        data.build_dataset({**config, "resolution": 256})


def test_damaged_file_is_a_bad_sample(tmp_path):
    """A truncated caption file or PNG is a BadSample naming it (the training side skips it), not
    a crash; the rest of the split still reads."""
    source, dest = write_coco(tmp_path / "src", (("val", VAL),)), str(tmp_path / "out")
    run(source, dest, "--splits", "val")
    ds = CocoDataset(dest, "val")
    k = ds.caption_index(0, 2)
    path = os.path.join(dest, "val", f"0_{k}.npy")
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(BadSample, match=f"0_{k}.npy"):
        ds[(0, 2)]
    other = next(s for s in range(3, 50) if ds.caption_index(0, s) != k)
    assert ds[(0, other)][2].shape == (TOKENS, DIM)


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(tmp_path, monkeypatch):
    """torchrun with 2 gloo ranks and the real tiny random text encoder writes what one process
    writes: PNGs, json and text features to the byte, moments to float rounding."""
    monkeypatch.setattr(encoders, "load_text_encoder", LOAD_TEXT_ENCODER)
    source, dest = write_coco(tmp_path / "src"), str(tmp_path / "ddp")
    tiny_text = ["--text-encoder", "tiny-random"]
    run(source, str(tmp_path / "single"), *tiny_text)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "data.py",
               "--source", source, "--dest", dest, *TINY, *tiny_text]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train: 3 images; rank 0 of 2: 2 to do" in result.stderr  # images 0 and 2
    single, ddp = snapshot(tmp_path / "single"), snapshot(dest)
    # dataset.json, empty_context.npy; train: PNGs, moments, captions, captions.json; val: the same
    assert single.keys() == ddp.keys() and len(single) == 2 + (3 + 3 + 16 + 1) + (1 + 1 + 5 + 1)
    for k in single:
        if k.endswith(".npy") and "_" not in os.path.basename(k) and "empty" not in k:
            np.testing.assert_allclose(
                *(np.load(io.BytesIO(s[k][0])) for s in (single, ddp)), rtol=1e-5, atol=1e-6)
        else:
            assert single[k][0] == ddp[k][0], k
    ds = CocoDataset(dest)
    assert ds.text_encoder == "tiny-random" and ds.text_dim == 32


# ----------------------------------------------------------------------------------------------
# data.py --verify DEST on a COCO folder, and the repair by the next preparation run

def bad_list(dest):
    """bad_files.txt's [path, reason] lines ([] without the file)."""
    if not os.path.isfile(path := os.path.join(dest, data.BAD_FILES)):
        return []
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f]


def verify_cli(dest, capsys):
    """data.py --verify DEST on 2 workers: (bad_list(DEST), what it printed)."""
    data.main(data.parse_args(["--verify", dest, "--workers", "2"]))
    return bad_list(dest), capsys.readouterr().out


def test_verify_a_clean_folder_writes_nothing(prepared, capsys):
    _, dest = prepared
    before = snapshot(dest)
    # the null; train: 3 crops, 3 moments, 16 captions; val: 1, 1 and 5
    assert verify_cli(dest, capsys) == ([], f"data.py --verify: all 30 files in {dest} read back "
                                            "as data\n")
    assert snapshot(dest) == before


def test_verify_lists_bad_files_and_a_rerun_remakes_exactly_those_images(
        tmp_path, capsys, monkeypatch):
    """A truncated crop, garbage moments, a missing and a NaN caption file, the null of the wrong
    dtype: listed with their reasons (also after an interrupted --verify), their images and the
    null made again by the same command (nothing else), and --verify is clean again."""
    source, dest = write_coco(tmp_path / "src"), str(tmp_path / "out")
    run(source, dest)
    before = snapshot(dest)
    out = functools.partial(os.path.join, dest)
    with open(out("train", "1.png"), "r+b") as f:
        f.truncate(100)
    with open(out("train", "2.npy"), "wb") as f:
        f.write(b"garbage" * 20)
    os.remove(out("train", "2_1.npy"))
    np.save(out("val", "0_3.npy"), np.full((TOKENS, DIM), np.nan, np.float32))
    np.save(out("empty_context.npy"), np.load(out("empty_context.npy")).astype(np.float64))
    checked = verify_reads(monkeypatch, "val/0")  # keys: the null, train/0, 1, 2, val/0
    with pytest.raises(KeyboardInterrupt):
        data.verify(dest, 0, chunk=2)
    assert checked == ["empty_context", "train/0", "train/1", "train/2"]
    with open(out("verify-progress.json")) as f:
        assert json.load(f)["checked"] == 4
    verify_reads(monkeypatch)  # no more interrupt
    listed, printed = verify_cli(dest, capsys)  # goes on with val/0
    listed_paths = [p for p, _ in listed]
    assert listed_paths == ["empty_context.npy", "train/1.png", "train/2.npy", "train/2_1.npy",
                            "val/0_3.npy"]
    assert listed[0][1] == "dtype float64, expected float32"
    assert listed[1][1].startswith("unreadable (OSError: image file is truncated")
    assert [r for _, r in listed[2:]] == ["not an array file (garbage or pickled data)", "missing",
                                          "non-finite values"]
    assert "5 of the 30 files" in printed and not os.path.exists(out("verify-progress.json"))
    run(source, dest, "--splits", "val")  # makes val/0 and the null again: train's stay listed
    assert [p for p, _ in bad_list(dest)] == listed_paths[1:4]
    run(source, dest)
    after = snapshot(dest)
    assert after.keys() == before.keys()
    redone = {k for k in after if after[k][1] != before[k][1]}
    images = ("train/1", "train/2", "val/0")
    assert redone == {"empty_context.npy"} | {k for k in before if k.startswith(images)}
    for k in before:  # the same bytes again; the moments to float rounding (other batches)
        if k.endswith(tuple(f"{i}.npy" for i in images)):
            np.testing.assert_allclose(*(np.load(io.BytesIO(s[k][0])) for s in (after, before)),
                                       rtol=1e-5, atol=1e-6)
        else:
            assert after[k][0] == before[k][0], k
    assert not os.path.exists(out(data.BAD_FILES))
    assert verify_cli(dest, capsys)[0] == []


def test_verify_of_no_dataset_is_one_line(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "notes.txt").write_text("not a dataset")
    with pytest.raises(SystemExit) as stop:
        data.main(data.parse_args(["--verify", str(tmp_path)]))
    assert str(stop.value) == (f"data.py: error: --verify {tmp_path}: no images/ and vae-sd/ "
                               "folders there (ImageNet) and no dataset.json or empty_context.npy "
                               "of COCO's: give a folder data.py prepared")
    (tmp_path / "dataset.json").write_text(json.dumps({"dataset": "coco",
                                                       "moments": "mean-logvar"}))
    with pytest.raises(SystemExit, match=f"^data.py: error: --verify {tmp_path}: no image files "
                                         "in a train/ or val/ folder there: run data.py") as stop:
        data.main(data.parse_args(["--verify", str(tmp_path)]))
    assert "\n" not in str(stop.value)
