"""Text-to-image sampling and evaluation: the samplers with a text context against REPA's
samplers_t2i.py, prompts and COCO-val captions in sample.py, PickScore."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import pickscore
import sample
from helpers import TextVelocity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = torch.load(
    os.path.join(REPO, "tests", "data", "repa_t2i_sampler_reference.pt"), weights_only=True
)


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
    per-image scores, the count said; a caption count that does not match is a one-line error."""
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
        pickscore.main(pickscore.parser().parse_args(argv[:1] + [str(tmp_path / "four.txt")]
                                                     + argv[2:]))
