"""Text-to-image sampling and evaluation: the samplers with a text context against REPA's
samplers_t2i.py, prompts and COCO-val captions in sample.py, PickScore."""

import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import encoders
import pickscore
import runs
import sample
from cluster import UserError
from helpers import TextVelocity
from mmdit import MMDiT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_PATH = os.path.join(REPO, "tests", "data", "repa_t2i_sampler_reference.pt")
REF = torch.load(REF_PATH, weights_only=True)


def reference_model():
    """The TextVelocity whose REPA T2I sampler outputs the fixture holds (made by
    tests/data/make_repa_reference.py)."""
    model = TextVelocity()
    model.load_state_dict(REF["state_dict"])
    return model.eval()


class FixedEncoder:
    """A stand-in text encoder: each caption's features from a table ('' is the null caption)."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def encode(self, captions):
        self.calls.append(list(captions))
        return torch.stack([self.table[c] for c in captions])  # (B, 77, D)


# ----------------------------------------------------------------------------------------------
# Samplers against REPA's samplers_t2i.py


def case_id(c):
    return f"{c['sampler']}{c['num_steps']}{'-heun' * c['heun']}-cfg{c['cfg']}-{c['path_type']}"


@pytest.mark.parametrize("case", REF["cases"], ids=case_id)
def test_samplers_match_repa_t2i(case):
    """ODE with 50 steps (guided and not), Heun and SDE with the guidance interval, both paths:
    guided_velocity with a context and the null context equals REPA's T2I samplers."""
    y, null = case["context"], REF["null"].expand_as(case["context"])
    velocity = sample.guided_velocity(
        reference_model(), y, case["cfg"], case["guidance_low"], case["guidance_high"], null
    )
    torch.manual_seed(case["global_seed"])  # REPA drew x and the contexts, then the SDE noise
    torch.randn(case["x"].shape), torch.randn(case["context"].shape)
    if case["sampler"] == "sde":
        out = sample.euler_maruyama(
            velocity, case["x"], case["num_steps"], path_type=case["path_type"]
        )
    else:
        out = sample.euler_ode(velocity, case["x"], case["num_steps"], heun=case["heun"])
    assert out.dtype == torch.float64 and case["out"].abs().max() > 1
    torch.testing.assert_close(out, case["out"], rtol=1e-5, atol=1e-5)


def test_the_null_context_matters():
    """Guidance 2.0 with the context itself as the null equals no guidance and differs from the
    fixture's guided run by far more than the parity tolerance: the parity sees the null half."""
    case = REF["cases"][1]  # ODE, 50 steps, guidance 2.0
    y = case["context"]
    run = lambda null: sample.euler_ode(  # noqa: E731
        sample.guided_velocity(reference_model(), y, 2.0, null=null), case["x"], 50)
    unguided = sample.euler_ode(sample.guided_velocity(reference_model(), y, null=y), case["x"], 50)
    torch.testing.assert_close(run(y), unguided)
    assert (run(y) - case["out"]).abs().max() > 0.01


def test_per_sample_prompts_match_repa_t2i_and_ignore_batching():
    """Sample i with caption i = REPA's T2I SDE run alone with the global RNG seeded by
    sample_seed(seed, i) and caption i's context; any batch order gives the same samples."""
    ref = REF["per_index"]
    table = {f"caption {i}": ref["contexts"][i] for i in ref["indices"]} | {"": REF["null"][0]}
    encoder = FixedEncoder(table)
    prompts = sample.Prompts(encoder, [f"caption {i}" for i in ref["indices"]])
    opts = dict(num_steps=ref["num_steps"], cfg=ref["cfg"], guidance_high=ref["guidance_high"],
                prompts=prompts)
    out = sample.sample_latents(reference_model(), ref["indices"], seed=ref["seed"], **opts)
    torch.testing.assert_close(out, ref["out"], rtol=1e-5, atol=1e-5)
    shuffled = sample.sample_latents(reference_model(), [2, 0], seed=ref["seed"], **opts)
    torch.testing.assert_close(shuffled, ref["out"][[2, 0]], rtol=1e-5, atol=1e-5)
    assert encoder.calls.count([""]) == 1  # the null caption is encoded once


# ----------------------------------------------------------------------------------------------
# PickScore


@pytest.fixture(scope="module")
def tiny_pickscore():
    return pickscore.tiny_random()


def test_pickscore_is_logit_scale_times_cosine(tiny_pickscore):
    """score = exp(logit_scale) * cos(projected text, projected image) of each image with its own
    caption, the embeddings computed by hand from the CLIP towers; captions matter per image."""
    model, processor = tiny_pickscore
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    captions = ["a red bus", "two dogs on a beach", "x"]
    scores = pickscore.score(model, processor, images, captions)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    inputs = processor(text=captions, images=[Image.fromarray(i) for i in images], padding=True,
                       return_tensors="pt")
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(inputs.pixel_values).pooler_output)
        text = model.text_projection(
            model.text_model(inputs.input_ids, inputs.attention_mask).pooler_output)
    expected = model.logit_scale.exp() * (
        (image / image.norm(dim=-1, keepdim=True)) * (text / text.norm(dim=-1, keepdim=True))
    ).sum(-1)
    torch.testing.assert_close(scores, expected)
    swapped = pickscore.score(model, processor, images, captions[::-1])
    assert swapped[1] == scores[1] and (swapped[0] - scores[0]).abs() > 1e-3


def test_pickscore_cli_on_a_sample_folder(tmp_path, capsys):
    """The CLI scores a folder of PNGs with sample.py's captions.json: the mean of the library's
    per-image scores, the count said; a caption count that does not match is a one-line error
    before anything loads."""
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    captions = [f"caption {c}" for c in "abcde"]
    (folder / "captions.json").write_text(json.dumps(captions))
    argv = [str(folder), str(folder / "captions.json"), "--tiny-random", "1", "--batch-size", "2"]
    result = pickscore.main(pickscore.parser().parse_args(argv))
    model, processor = pickscore.tiny_random()
    expected = pickscore.score(model, processor, images, captions).double().mean().item()
    assert result["pickscore"] == pytest.approx(expected, abs=1e-5)
    assert "mean over 5 samples" in capsys.readouterr().out
    saved = json.loads((tmp_path / "samples.pickscore.json").read_text())
    assert saved["num_samples"] == 5 and saved["weights"] == "tiny-random"
    (tmp_path / "four.txt").write_text("a\nb\n\nc\nd\n")
    with pytest.raises(SystemExit, match=r"^pickscore.py: error: .* 5 images but the captions "
                                         r"are 4; give the captions"):
        # before any weights load: no stand-in asked for, and no network needed
        pickscore.main(pickscore.parser().parse_args([str(folder), str(tmp_path / "four.txt")]))
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(SystemExit, match=r"^pickscore.py: error: .*file is not a folder"):
        # an --out that cannot be written: said before any weights load or image is scored
        pickscore.main(pickscore.parser().parse_args(
            [str(folder), str(folder / "captions.json"), "--out", str(tmp_path / "file" / "x")]))


# ----------------------------------------------------------------------------------------------
# sample.py on a text-to-image checkpoint


@pytest.fixture
def text_ckpt(tmp_path):
    """Path of a train.py-style checkpoint of a tiny MMDiT (config: text encoder tiny-random, whose
    features are 32 wide)."""
    torch.manual_seed(3)  # PyTorch's default init (REPA's MMDiT has no zero-init): non-trivial v
    model = MMDiT(input_size=8, patch_size=2, depth=2, context_dim=32, encoder_depth=1, z_dims=[])
    path = str(tmp_path / "t2i.pt")
    torch.save(dict(ema=model.state_dict(), model=model.state_dict(), step=1,
                    config=dict(model_config=model.config, text_encoder="tiny-random", vae="none")),
               path)
    return path


def run(*argv):
    sample.main(sample.parse_args(list(map(str, argv))))


def test_prompt_grid_holds_the_prompts_samples(text_ckpt, tmp_path):
    """--prompt (repeated) and --prompts FILE give the same grid: one tile per prompt, tile i the
    latents of sample i with caption i."""
    flags = ["--ckpt", text_ckpt, "--num-steps", "3", "--vae", "none"]
    run(*flags, "--prompt", "a red bus", "--prompt", "two dogs", "--out", tmp_path / "a.png")
    (tmp_path / "p.txt").write_text("a red bus\n\ntwo dogs\n")
    run(*flags, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "b.png")
    grid = np.asarray(Image.open(tmp_path / "a.png"))
    assert grid.shape == (8, 16, 4)  # two 8x8 latent tiles side by side, the 4 latent channels
    assert np.array_equal(grid, np.asarray(Image.open(tmp_path / "b.png")))
    model = runs.build_model(torch.load(text_ckpt, weights_only=True), text_ckpt)
    prompts = sample.Prompts(encoders.load_text_encoder(name="tiny-random", random=True),
                             ["a red bus", "two dogs"])
    tiles = sample.generate_images(model, None, [0, 1], mode="ode", num_steps=3, cfg=2.0,
                                   prompts=prompts)  # the text defaults: ODE, guidance 2.0
    assert np.array_equal(grid, np.concatenate(list(tiles), axis=1))
    assert not np.array_equal(tiles[0], tiles[1])


def test_a_long_prompt_is_truncated_and_said_once(text_ckpt, tmp_path, caplog):
    """A prompt over 77 tokens is said once for the run, though every batch encodes it; its tail
    past 77 tokens changes nothing."""
    long = " ".join(["word"] * 40)  # the tiny encoder: 4 tokens a word, 162 with start and end
    flags = ["--ckpt", text_ckpt, "--num-steps", "2", "--vae", "none", "--batch-size", "1",
             "--grid-size", "3", "--prompt", "a cat", "--prompt"]
    with caplog.at_level("WARNING"):
        run(*flags, long, "--out", tmp_path / "long.png")
    said = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(said) == 1 and "a caption of 162 tokens" in said[0]
    run(*flags, long + " and a different tail", "--out", tmp_path / "tail.png")
    grids = [np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("long", "tail")]
    assert np.array_equal(*grids)


def test_prompt_samples_write_their_captions_and_resume_only_with_them(text_ckpt, tmp_path):
    """--num-samples with prompts: PNGs, npz and captions.json (prompts in turn); the same folder
    with other prompts is refused."""
    out = tmp_path / "s.npz"
    flags = ["--ckpt", text_ckpt, "--num-steps", "2", "--vae", "none", "--num-samples", "3",
             "--out", out]
    run(*flags, "--prompt", "a", "--prompt", "b")
    assert np.load(out)["arr_0"].shape == (3, 8, 8, 4)
    assert json.loads((tmp_path / "s" / "captions.json").read_text()) == ["a", "b", "a"]
    with pytest.raises(SystemExit, match=r"^sample.py: error: .*other settings \(captions_sha256"):
        run(*flags, "--prompt", "c")


def test_a_checkpoint_of_the_other_kind_is_a_one_line_error(text_ckpt, tmp_path):
    """Captions for a class-conditional checkpoint, labels or no caption for a text one."""
    from model import SiT

    sit = SiT(input_size=8, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=4,
              z_dims=[])
    class_ckpt = str(tmp_path / "class.pt")
    torch.save(dict(ema=sit.state_dict(), model=sit.state_dict(),
                    config=dict(model_config=sit.config)), class_ckpt)
    cases = [
        ((class_ckpt, "--prompt", "a red bus"), "--prompt needs a text-to-image checkpoint, but "
         f"{class_ckpt} is class-conditional; use --class-labels or no condition"),
        ((text_ckpt, "--class-labels", "3"), f"{text_ckpt} is text-to-image (text encoder "
         "tiny-random): give --prompt TEXT, --prompts FILE or --coco-val DIR, not --class-labels"),
        ((text_ckpt,), f"{text_ckpt} is text-to-image (text encoder tiny-random): give --prompt "
         "TEXT, --prompts FILE or --coco-val DIR"),
    ]
    for (ckpt, *argv), message in cases:
        with pytest.raises(SystemExit) as stop:
            run("--ckpt", ckpt, "--vae", "none", "--out", tmp_path / "x.png", *argv)
        assert str(stop.value) == f"sample.py: error: {message}"
    assert not (tmp_path / "x.png").exists()
    # REPA's train_t2i.py checkpoints carry no config: MMDiT's weights say what they are
    assert runs.text_encoder_of({"ema": {"joint_blocks.0.x": torch.zeros(1)}, "args": None}) == (
        "openai/clip-vit-large-patch14")
    assert runs.text_encoder_of({"pos_embed": torch.zeros(1)}) is None


def coco_val_folder(folder):
    """A data.py COCO folder's val/captions.json of 40 images with 3 to 5 captions; its items."""
    (folder / "val").mkdir()
    items = [[i + 10, f"COCO_val2014_{i + 10:012d}.jpg", [f"image {i} caption {k}"
                                                           for k in range(3 + i % 3)]]
             for i in range(40)]
    (folder / "val" / "captions.json").write_text(json.dumps(items))
    return items


def test_coco_val_captions_are_one_seeded_caption_per_image(tmp_path):
    """Sample i gets one of val image i's captions, drawn with the seed: the same on every call
    and for any count (a prefix), another seed another choice; more samples than images is an
    error; --coco-val defaults to REPA's 40,192 samples, ODE 50 steps, guidance 2.0."""
    items = coco_val_folder(tmp_path)
    chosen = sample.coco_val_captions(str(tmp_path), 40, seed=0)
    assert chosen == sample.coco_val_captions(str(tmp_path), 40, seed=0)
    assert all(c in item[2] for c, item in zip(chosen, items))
    picks = np.random.default_rng(0).integers(0, [len(item[2]) for item in items])
    assert chosen == [item[2][k] for item, k in zip(items, picks)]
    assert sample.coco_val_captions(str(tmp_path), 7, seed=0) == chosen[:7]
    other = sample.coco_val_captions(str(tmp_path), 40, seed=1)
    assert other != chosen and len({c.split(" caption")[0] for c in other}) == 40
    with pytest.raises(UserError, match="--num-samples 41: .* lists 40 val images"):
        sample.coco_val_captions(str(tmp_path), 41, seed=0)
    with pytest.raises(UserError, match="no such file|cannot read"):
        sample.coco_val_captions(str(tmp_path / "nowhere"), 4, seed=0)
    args = sample.parse_args(["--coco-val", str(tmp_path)])
    assert (args.num_samples, args.mode, args.num_steps, args.cfg) == (40192, "ode", 50, 2.0)


def test_coco_val_samples_carry_their_captions(text_ckpt, tmp_path):
    """--coco-val writes sample i with val image i's seeded caption, listed in captions.json."""
    coco_val_folder(tmp_path)
    chosen = sample.coco_val_captions(str(tmp_path), 40, seed=0)
    out = tmp_path / "coco.npz"
    run("--ckpt", text_ckpt, "--coco-val", tmp_path, "--num-samples", "3", "--num-steps", "2",
        "--vae", "none", "--out", out)
    assert json.loads((tmp_path / "coco" / "captions.json").read_text()) == chosen[:3]
    prompts = sample.Prompts(encoders.load_text_encoder(name="tiny-random", random=True), chosen)
    model = runs.build_model(torch.load(text_ckpt, weights_only=True), text_ckpt)
    expected = sample.generate_images(model, None, [0, 1, 2], mode="ode", num_steps=2, cfg=2.0,
                                      prompts=prompts)
    assert np.array_equal(np.load(out)["arr_0"], expected)


@pytest.mark.parametrize("layout", ["train_t2i", "bare"])
def test_a_repa_t2i_checkpoint_samples_with_a_local_text_encoder(tmp_path, capsys, layout):
    """REPA's train_t2i.py checkpoint ({model, ema, opt, args}, no config) or a bare MMDiT state
    dict: the MMDiT is read off its weights (and args: encoder depth 1; else REPA's 8, at most the
    depth), its text encoder is CLIP ViT-L/14 from --text-encoder-path (said once), and the grid
    is that of the same MMDiT given directly (the EMA weights, not the raw ones)."""
    torch.manual_seed(4)
    depth = 1 if layout == "train_t2i" else 2
    raw, ema = (MMDiT(input_size=8, patch_size=2, depth=2, context_dim=32, encoder_depth=depth,
                      z_dims=[16], projector_dim=24) for _ in range(2))
    path = str(tmp_path / "repa_t2i.pt")
    args = argparse.Namespace(encoder_depth=1, path_type="linear", qk_norm=False)
    torch.save(dict(model=raw.state_dict(), ema=ema.state_dict(), opt={}, args=args)
               if layout == "train_t2i" else ema.state_dict(), path)
    ckpt = runs.read_checkpoint(path)
    assert runs.text_encoder_of(ckpt) == encoders.CLIP_TEXT
    assert runs.build_model(ckpt, path).config == ema.config
    wide = ema.state_dict() | {"pos_embed": torch.zeros(1, 16, 96)}  # 96 = 48 x depth 2
    with pytest.raises(UserError, match=r"^x.pt: an MMDiT state dict 96 wide at depth 2, but "
                                        r"REPA's MMDiT is 32 x depth \(64\) wide"):
        runs.build_model(wide, "x.pt")
    baseline = MMDiT(input_size=8, patch_size=2, depth=2, context_dim=32, encoder_depth=2,
                     z_dims=[])
    empty = {"projectors.0.0.weight": torch.ones(24, 64), "projectors.0.0.bias": torch.ones(24),
             "projectors.0.2.weight": torch.ones(24, 24), "projectors.0.2.bias": torch.ones(24),
             "projectors.0.4.weight": torch.ones(0, 24), "projectors.0.4.bias": torch.ones(0)}
    # REPA's baseline (--enc-type None) saves a projector of width 0: it aligns nothing
    assert runs.build_model(baseline.state_dict() | empty, "x.pt").config == baseline.config
    local = tmp_path / "clip"
    tiny = encoders.load_text_encoder(random=True)
    tiny.model.save_pretrained(local)
    tiny.tokenizer.save_pretrained(local)
    run("--ckpt", path, "--text-encoder-path", local, "--prompt", "a red bus", "--num-steps", "2",
        "--vae", "none", "--out", tmp_path / "g.png")
    expected = sample.generate_images(ema.eval(), None, [0], mode="ode", num_steps=2, cfg=2.0,
                                      prompts=sample.Prompts(tiny, ["a red bus"]))[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), expected)
    said = [line for line in capsys.readouterr().out.splitlines() if "records no text" in line]
    assert said == [f"sample.py: {path} records no text encoder: assuming {encoders.CLIP_TEXT} "
                    "(CLIP ViT-L/14, REPA's); --text-encoder-path DIR gives a local copy"]
