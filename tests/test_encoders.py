"""encoders.py: spec parsing, the tiny random encoder, and the DINOv2 architecture, preprocessing and weight loading
(random weights: no network)."""

import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

import encoders
from encoders import canonical_name, dinov2_timm_name, load_encoders


@pytest.fixture(scope="module")
def vit_s():
    """The DINOv2 ViT-S/14 architecture with random weights at 256 px."""
    return load_encoders("dinov2-vit-s", "cpu", 256, pretrained=False)[0]


def random_images(n=2, resolution=256, seed=0):
    """uint8 images (n, 3, R, R)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, resolution, resolution), generator=g, dtype=torch.uint8)


def test_tiny_random_shapes_determinism_and_label(caplog):
    """(B, (R/16)^2, 32) tokens, the same weights on every load, global RNG untouched, loudly not pretrained."""
    rng_before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING):
        a, b = load_encoders("tiny-random,tiny-random", "cpu", 64)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert "NOT a real representation" in caplog.text
    assert a.name == "tiny-random" and a.embed_dim == 32 and a.pretrained is False
    images = random_images(3, 64)
    za = a(images)
    assert za.shape == (3, 16, 32) and torch.equal(za, b(images))
    assert not torch.equal(za[0], za[1])
    assert load_encoders("tiny-random", "cpu", 256)[0](random_images(1, 256)).shape == (1, 256, 32)
    # LayerNorm output: zero mean and unit variance over the channels of each token
    assert torch.allclose(za.mean(-1), torch.zeros(3, 16), atol=1e-5)
    a.train()
    assert not a.training and not any(p.requires_grad for p in a.parameters())


def test_dinov2_s_tokens_shape_and_pos_embed(vit_s):
    """256 px -> (B, 256, 384) patch tokens; the pos-embed is a 16x16 grid plus the class position."""
    assert vit_s.name == "dinov2-vit-s" and vit_s.embed_dim == 384 and vit_s.pretrained is False
    assert vit_s.model.pos_embed.shape == (1, 1 + 16 * 16, 384)
    assert vit_s(random_images()).shape == (2, 256, 384)
    with pytest.raises(ValueError, match="built for"):
        vit_s(random_images(1, 128))


def test_dinov2_preprocessing_by_hand(vit_s, monkeypatch):
    """What the ViT sees is x/255, ImageNet mean/std, bicubic to 224: checked on constant and random images."""
    seen = []
    forward_features = vit_s.model.forward_features
    monkeypatch.setattr(vit_s.model, "forward_features", lambda x: seen.append(x) or forward_features(x))
    white = torch.full((1, 3, 256, 256), 255, dtype=torch.uint8)
    vit_s(white)
    # (1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225; bicubic keeps a constant image constant
    expected = torch.tensor([2.2489083, 2.4285714, 2.64]).view(1, 3, 1, 1).expand(1, 3, 224, 224)
    assert seen[0].shape == (1, 3, 224, 224)
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=0)
    images = random_images(2)
    vit_s(images)
    x = (images.double() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).double()) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1).double()
    x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
    torch.testing.assert_close(seen[1].double(), x, atol=5e-4, rtol=0)  # float32 bicubic rounding


@pytest.mark.slow
def test_tokens_are_final_norm_patch_tokens(vit_s):
    """The output equals timm's last-block normed patch tokens (no cls, no registers), with and without registers."""
    for enc, prefix in ((vit_s, 1), (load_encoders("dinov2-vit-s-reg", "cpu", 256, pretrained=False)[0], 5)):
        assert enc.model.num_prefix_tokens == prefix
        images = random_images(1)
        x = F.interpolate(encoders.normalize(images), 224, mode="bicubic")
        last = enc.model.forward_intermediates(x, indices=[11], norm=True, output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(enc(images), last[0], atol=1e-5, rtol=0)


def official_dinov2_checkpoint(vit_s, path, registers=False):
    """A random ViT-S/14 state dict in the official DINOv2 layout (518 px pos-embed, mask_token, register_tokens)."""
    g = torch.Generator().manual_seed(0)
    state = dict(vit_s.model.state_dict())
    state["pos_embed"] = torch.randn(1, 1 + 37 * 37, 384, generator=g)  # 518 px / 14 = 37 patches a side
    state["mask_token"] = torch.zeros(1, 384)
    if registers:
        state["register_tokens"] = torch.randn(1, 4, 384, generator=g)
    torch.save(state, path)
    return state


@pytest.mark.slow
def test_local_weights_resampled_as_repa(vit_s, tmp_path):
    """A local official checkpoint loads; its 37x37 pos-embed is resampled to 16x16 as REPA does."""
    path = str(tmp_path / "dinov2_vits14_pretrain.pth")
    state = official_dinov2_checkpoint(vit_s, path)
    enc = load_encoders("dinov2-vit-s", "cpu", 256, weights=path)[0]
    assert enc.pretrained is True
    # REPA: resample_abs_pos_embed(pos_embed, [16, 16]) on the torch.hub model (class position kept)
    torch.testing.assert_close(enc.model.pos_embed, resample_abs_pos_embed(state["pos_embed"], [16, 16]))
    torch.testing.assert_close(enc.model.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])
    # registers: the official layout (class position in pos_embed, register_tokens) becomes timm's
    path = str(tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    state = official_dinov2_checkpoint(vit_s, path, registers=True)
    enc = load_encoders("dinov2reg-vit-s", "cpu", 256, weights=path)[0]
    torch.testing.assert_close(enc.model.reg_token, state["register_tokens"])
    torch.testing.assert_close(enc.model.cls_token, state["cls_token"] + state["pos_embed"][:, 0])
    torch.testing.assert_close(enc.model.pos_embed,
                               resample_abs_pos_embed(state["pos_embed"][:, 1:], [16, 16], num_prefix_tokens=0))
    assert enc(random_images(1)).shape == (1, 256, 384)
    with pytest.raises(RuntimeError, match="do not fit"):  # registers checkpoint into the plain architecture
        load_encoders("dinov2-vit-s", "cpu", 256, weights=path)


def test_weights_errors(tmp_path):
    """A missing weights file and a file count that does not match the spec are clear errors."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoders("dinov2-vit-s", "cpu", 256, weights=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="2 encoder weight files for 1 encoders"):
        load_encoders("dinov2-vit-s", "cpu", 256, weights="a.pth,b.pth")


def test_download_failure_is_a_clear_error(monkeypatch):
    """When timm cannot fetch the weights, the error names the model and the local-file way out."""
    def offline(name, pretrained=False, **kwargs):
        """Stand-in for timm.create_model without network."""
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match=r"dinov2-vit-b \(vit_base_patch14_dinov2.lvd142m\).*weights=") as err:
        load_encoders("dinov2-vit-b", "cpu", 256)
    assert isinstance(err.value.__cause__, OSError)


def test_names_map_to_timm_models():
    """Every REPA name (and our -reg alias) maps to a pretrained timm DINOv2 model of timm 1.0.31."""
    available = set(timm.list_models("*dinov2*", pretrained=True))
    for size, timm_size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")):
        assert dinov2_timm_name(canonical_name(f"dinov2-vit-{size}")) == f"vit_{timm_size}_patch14_dinov2.lvd142m"
        assert canonical_name(f"dinov2-vit-{size}-reg") == canonical_name(f"dinov2reg-vit-{size}")
        assert dinov2_timm_name(f"dinov2reg-vit-{size}") == f"vit_{timm_size}_patch14_reg4_dinov2.lvd142m"
        assert dinov2_timm_name(f"dinov2reg-vit-{size}") in available
        assert dinov2_timm_name(f"dinov2-vit-{size}") in available


def test_spec_with_several_encoders():
    """A comma-separated spec gives one encoder per entry, in order, each with its own width."""
    encs = load_encoders("tiny-random, dinov2-vit-s", "cpu", 256, pretrained=False)
    assert [e.name for e in encs] == ["tiny-random", "dinov2-vit-s"]
    assert [e.embed_dim for e in encs] == [32, 384]
    assert all(not e.training and not any(p.requires_grad for p in e.parameters()) for e in encs)


@pytest.mark.parametrize("spec", ["dinov3-vit-b", "dinov2-vit-x", "mae-vit-l", "dinov2-vit-b,clip-vit-L", " , "])
def test_unknown_or_empty_spec(spec):
    """Unknown encoders name the known ones; an empty spec says what to write."""
    with pytest.raises(ValueError, match="unknown encoder|empty encoder spec") as err:
        load_encoders(spec, "cpu", 256, pretrained=False)
    assert "dinov2-vit-b" in str(err.value)


def test_resolution_checks():
    """DINOv2 needs a multiple of 256 px (REPA: 256 or 512); the tiny encoder a multiple of 16."""
    with pytest.raises(ValueError, match="multiple of 256"):
        load_encoders("dinov2-vit-s", "cpu", 300, pretrained=False)
    with pytest.raises(ValueError, match="divisible by 16"):
        load_encoders("tiny-random", "cpu", 72)
