"""encoders.py: spec parsing, the tiny random encoder, every REPA family's architecture,
preprocessing and weight loading, and parity with REPA's own code (random weights: no network)."""

import logging
import os
import socket
import sys
import time
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

import discriminator
import encoders
import pickscore
from cluster import UserError
from encoders import FAMILIES, build_encoder, canonical_name, load_encoders, timm_name

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
# noqa: E402  (official_state / save_torchscript re-derive the files)
import make_encoder_reference as reference

REFERENCE_PATH = os.path.join(os.path.dirname(__file__), "data", "encoder_reference.pt")
REFERENCE = torch.load(REFERENCE_PATH, weights_only=True)
REPA_NAMES = [f"{f}-vit-{s}" for f, fam in FAMILIES.items() for s in fam.timm_names]


@pytest.fixture(scope="module")
def vit_s():
    """The DINOv2 ViT-S/14 architecture with random weights at 256 px."""
    return load_encoders("dinov2-vit-s", "cpu", 256, pretrained=False)[0]


def random_images(n=2, resolution=256, seed=0):
    """uint8 images (n, 3, R, R)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, resolution, resolution), generator=g, dtype=torch.uint8)


def test_tiny_random_shapes_determinism_and_label(caplog):
    """(B, (R/16)^2, 32) tokens, the same weights on every load, global RNG untouched, loudly not
    pretrained."""
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


def test_tiny_tokenizer_ids_are_pinned_and_shared():
    """The byte-level tokenizer of the tiny stand-ins (text encoder, PickScore): lower-cased, a
    printable ASCII byte c is id 2 + ord(c) - 33 inside a word and 258 + ord(c) - 33 as a word's
    last; non-ASCII bytes and punctuation are tokens too (none unknown), start 0 and end 1."""
    tokenizer = encoders.tiny_tokenizer()
    dogs, cafe = tokenizer(["Two dogs, on a beach!", "café"])["input_ids"]
    assert dogs == [0, 85, 88, 336, 69, 80, 72, 340, 269, 80, 335, 322, 67, 70, 66, 68, 329, 258, 1]
    assert dogs[1:4] == [2 + ord("t") - 33, 2 + ord("w") - 33, 258 + ord("o") - 33]
    assert cafe == [0, 68, 66, 71, 129, 360, 1]  # é is the two bytes c3 a9
    vocab = tokenizer.get_vocab()
    assert encoders.tiny_text_encoder().tokenizer.get_vocab() == vocab
    assert pickscore.tiny_random()[1].tokenizer.get_vocab() == vocab


def test_dinov2_s_tokens_shape_and_pos_embed(vit_s):
    """256 px -> (B, 256, 384) patch tokens; the pos-embed is a 16x16 grid plus the class position.
    """
    assert vit_s.name == "dinov2-vit-s" and vit_s.embed_dim == 384 and vit_s.pretrained is False
    assert vit_s.model.pos_embed.shape == (1, 1 + 16 * 16, 384)
    assert vit_s(random_images()).shape == (2, 256, 384)
    with pytest.raises(ValueError, match="built for"):
        vit_s(random_images(1, 128))


def test_dinov2_preprocessing_by_hand(vit_s, monkeypatch):
    """What the ViT sees is x/255, ImageNet mean/std, bicubic to 224: checked on constant and random
    images."""
    seen = []
    forward = vit_s.model.forward_intermediates
    monkeypatch.setattr(
        vit_s.model, "forward_intermediates", lambda x, **kw: seen.append(x) or forward(x, **kw)
    )
    white = torch.full((1, 3, 256, 256), 255, dtype=torch.uint8)
    vit_s(white)
    # (1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225; bicubic keeps a
    # constant image constant
    expected = torch.tensor([2.2489083, 2.4285714, 2.64]).view(1, 3, 1, 1).expand(1, 3, 224, 224)
    assert seen[0].shape == (1, 3, 224, 224)
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=0)
    images = random_images(2)
    vit_s(images)
    x = (
        images.double() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).double()
    ) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1).double()
    x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
    torch.testing.assert_close(seen[1].double(), x, atol=5e-4, rtol=0)  # float32 bicubic rounding


@pytest.mark.slow
def test_tokens_are_final_norm_patch_tokens(vit_s):
    """The output equals timm's last-block normed patch tokens (no cls, no registers), with and
    without registers."""
    for enc, prefix in (
        (vit_s, 1),
        (load_encoders("dinov2-vit-s-reg", "cpu", 256, pretrained=False)[0], 5),
    ):
        assert enc.model.num_prefix_tokens == prefix
        images = random_images(1)
        x = F.interpolate(encoders.normalize(images.float() / 255), 224, mode="bicubic")
        last = enc.model.forward_intermediates(
            x, indices=[11], norm=True, output_fmt="NLC", intermediates_only=True
        )
        torch.testing.assert_close(enc(images), last[0], atol=1e-5, rtol=0)


def official_dinov2_checkpoint(vit_s, path, registers=False):
    """A random ViT-S/14 state dict in the official DINOv2 layout (518 px pos-embed, mask_token,
    register_tokens)."""
    g = torch.Generator().manual_seed(0)
    state = dict(vit_s.model.state_dict())
    # 518 px / 14 = 37 patches a side
    state["pos_embed"] = torch.randn(1, 1 + 37 * 37, 384, generator=g)
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
    torch.testing.assert_close(
        enc.model.pos_embed, resample_abs_pos_embed(state["pos_embed"], [16, 16])
    )
    torch.testing.assert_close(
        enc.model.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"]
    )
    # registers: the official layout (class position in pos_embed, register_tokens) becomes timm's
    path = str(tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    state = official_dinov2_checkpoint(vit_s, path, registers=True)
    enc = load_encoders("dinov2reg-vit-s", "cpu", 256, weights=path)[0]
    torch.testing.assert_close(enc.model.reg_token, state["register_tokens"])
    torch.testing.assert_close(enc.model.cls_token, state["cls_token"] + state["pos_embed"][:, 0])
    torch.testing.assert_close(
        enc.model.pos_embed,
        resample_abs_pos_embed(state["pos_embed"][:, 1:], [16, 16], num_prefix_tokens=0),
    )
    assert enc(random_images(1)).shape == (1, 256, 384)
    # registers checkpoint into the plain architecture
    with pytest.raises(RuntimeError, match="do not fit"):
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
    monkeypatch.setattr(encoders, "hub_reachable", lambda: True)  # online, and the download fails
    with pytest.raises(
        RuntimeError, match=r"dinov2-vit-b \(vit_base_patch14_dinov2.lvd142m\).*weights="
    ) as err:
        load_encoders("dinov2-vit-b", "cpu", 256)
    assert isinstance(err.value.__cause__, OSError)


def test_names_map_to_timm_models():
    """Every REPA name (and our -reg alias) maps to a pretrained timm model of timm 1.0.31, MoCo v3
    to an architecture."""
    available = set(timm.list_models(pretrained=True))
    for size, timm_size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")):
        assert (
            timm_name(canonical_name(f"dinov2-vit-{size}"))
            == f"vit_{timm_size}_patch14_dinov2.lvd142m"
        )
        assert canonical_name(f"dinov2-vit-{size}-reg") == canonical_name(f"dinov2reg-vit-{size}")
        assert timm_name(f"dinov2reg-vit-{size}") == f"vit_{timm_size}_patch14_reg4_dinov2.lvd142m"
    assert sorted(REPA_NAMES) == sorted(
        [f"dinov2{r}-vit-{s}" for r in ("", "reg") for s in "sblg"]
        + ["dinov1-vit-b", "mae-vit-l", "clip-vit-l", "jepa-vit-h"]
        + [f"mocov3-vit-{s}" for s in "sbl"]
    )
    for name in REPA_NAMES:
        tagged = timm_name(name)
        assert (
            (tagged in available) if not name.startswith("mocov3") else tagged in timm.list_models()
        )
    # CLIP was trained with QuickGELU
    assert timm_name("clip-vit-l") == "vit_large_patch14_clip_quickgelu_224.openai"


def test_spec_with_several_encoders():
    """A comma-separated spec gives one encoder per entry, in order, each with its own width."""
    encs = load_encoders("tiny-random, dinov2-vit-s", "cpu", 256, pretrained=False)
    assert [e.name for e in encs] == ["tiny-random", "dinov2-vit-s"]
    assert [e.embed_dim for e in encs] == [32, 384]
    assert all(not e.training and not any(p.requires_grad for p in e.parameters()) for e in encs)


@pytest.mark.parametrize("spec", ["dinov3-vit-b", "dinov2-vit-x", "mae-vit-b", "dinov1-vit-s",
                                  "mocov3-vit-h", "dinov2-vit-b,clip-vit-B", "jepa-vit-l", " , "])
def test_unknown_or_empty_spec(spec):
    """Unknown encoders name the known ones; an empty spec says what to write."""
    with pytest.raises(ValueError, match="unknown encoder|empty encoder spec") as err:
        load_encoders(spec, "cpu", 256, pretrained=False)
    assert "dinov2-vit-b" in str(err.value)


def test_resolution_checks():
    """DINOv2 needs 256 or 512 px, the other families 256 px (REPA's limits); the tiny encoder a
    multiple of 16."""
    with pytest.raises(ValueError, match="needs a multiple of 256 px"):
        load_encoders("dinov2-vit-s", "cpu", 300, pretrained=False)
    with pytest.raises(ValueError, match="DINOv2 only"):
        load_encoders("mae-vit-l", "cpu", 512, pretrained=False)
    with pytest.raises(ValueError, match="divisible by 16"):
        load_encoders("tiny-random", "cpu", 72)


@pytest.mark.parametrize("name", sorted(REFERENCE["families"]))
def test_tokens_equal_repa_code(name, tmp_path):
    """REPA's load_encoders + preprocess_raw_image + token slicing (reduced width/depth of each
    family, random weights in the official checkpoint layout, tests/data/make_encoder_reference.py)
    == our tokens, fp32 max abs diff <= 1e-4."""
    ref = REFERENCE["families"][name]
    images = reference.images()
    assert int(images.long().sum()) == REFERENCE["image_sum"]  # the same batch REPA's code saw
    state = reference.official_state(ref["layout"], REFERENCE["weight_seed"])
    path = str(tmp_path / ref["file"])
    if name.startswith("clip"):  # openai/CLIP's release is a TorchScript archive of fp16 weights
        reference.save_torchscript(state, path)
    else:
        torch.save(state, path)
    enc = build_encoder(name, 256, weights=path, **ref["arch"])
    tokens = enc(images)
    assert tokens.shape == ref["tokens"].shape == (1, 256, enc.embed_dim)
    torch.testing.assert_close(tokens, ref["tokens"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", REPA_NAMES)
def test_full_size_architectures(name):
    """Every REPA name builds its full-size ViT (on the meta device: no memory, no forward) with a
    16x16 grid at 256 px."""
    family, _, size = name.rpartition("-vit-")
    width, depth, heads = dict(
        s=(384, 12, 6), b=(768, 12, 12), l=(1024, 24, 16), g=(1536, 40, 24), h=(1280, 32, 16)
    )[size]
    heads = 12 if name == "mocov3-vit-s" else heads  # MoCo v3's ViT-S has 12 heads of 32
    with torch.device("meta"):
        enc = build_encoder(name, 256, pretrained=False)
    m = enc.model
    assert (enc.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (width, depth, heads)
    grid = enc.input_size // m.patch_embed.patch_size[0]
    assert grid == 16 and m.patch_embed.patch_size[0] == FAMILIES[family].patch
    assert m.num_prefix_tokens == dict(dinov2reg=5, jepa=0).get(family, 1)
    assert m.pos_embed.shape[1] == 256 + (
        1 if family in ("dinov2", "dinov1", "mocov3", "mae", "clip") else 0
    )
    # DINOv2-g has a SwiGLU FFN
    act = "QuickGELU" if family == "clip" else "SiLU" if size == "g" else "GELU"
    assert type(m.blocks[0].mlp.act).__name__ == act


# family -> (input size, mean, std) the ViT sees at 256 px (REPA train.py preprocess_raw_image)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SEEN = dict(
    dinov1=(256, *IMAGENET),
    mocov3=(256, *IMAGENET),
    mae=(256, *IMAGENET),
    jepa=(224, *IMAGENET),
    clip=(224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
)


@pytest.mark.parametrize("family", sorted(SEEN))
def test_preprocessing_by_family(family, monkeypatch):
    """What each ViT sees: x/255, the family's mean/std, bicubic to 224 for CLIP and I-JEPA only
    (CLIP resizes first)."""
    name = next(n for n in REPA_NAMES if n.startswith(family + "-"))
    enc = build_encoder(name, 256, pretrained=False, depth=1, embed_dim=64, num_heads=1)
    seen = []
    forward = enc.model.forward_intermediates
    monkeypatch.setattr(
        enc.model, "forward_intermediates", lambda x, **kw: seen.append(x) or forward(x, **kw)
    )
    size, mean, std = SEEN[family]
    images = random_images(1)
    enc(images)
    x = images.double() / 255
    if family == "clip":
        x = F.interpolate(x, size=(size, size), mode="bicubic")
    x = (x - torch.tensor(mean).view(1, 3, 1, 1).double()) / torch.tensor(std).view(
        1, 3, 1, 1
    ).double()
    if family == "jepa":
        x = F.interpolate(x, size=(size, size), mode="bicubic")
    assert seen[0].shape == (1, 3, size, size)
    torch.testing.assert_close(seen[0].double(), x, atol=5e-4, rtol=0)  # float32 bicubic rounding
    if size == 256:  # no resize at all: exact
        torch.testing.assert_close(seen[0].double(), x, atol=1e-5, rtol=0)


def test_mocov3_needs_its_official_file():
    """timm publishes no MoCo v3 weights: asking for them names the checkpoint and --enc-weights in
    one line."""
    with pytest.raises(
        RuntimeError, match=r"timm publishes no weights for mocov3-vit-l: download .*--enc-weights"
    ):
        load_encoders("mocov3-vit-l", "cpu", 256)


@pytest.mark.parametrize("name", ["mae-vit-l", "clip-vit-l", "jepa-vit-h", "dinov1-vit-b"])
def test_download_failure_names_the_official_file(name, monkeypatch):
    """A failed timm download names the model, the official checkpoint to fetch by hand and
    --enc-weights."""
    def offline(model_name, pretrained=False, **kwargs):
        """Stand-in for timm.create_model without network."""
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(encoders, "hub_reachable", lambda: True)
    with pytest.raises(
        RuntimeError,
        match=rf"{name} \({timm_name(name)}\).*\(facebookresearch|openai.*--enc-weights",
    ):
        load_encoders(name, "cpu", 256)


def test_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path):
    """A checkpoint of another size (the reduced MAE reference into the full MoCo v3 ViT-S) says it
    does not fit."""
    ref = REFERENCE["families"]["mae-vit-l"]
    path = str(tmp_path / "mae.pth")
    torch.save(reference.official_state(ref["layout"]), path)
    with pytest.raises(
        RuntimeError, match=r"do not fit mocov3 .*embed_dim 384\): wrong model size or variant"
    ):
        build_encoder("mocov3-vit-s", 256, weights=path)


def test_several_families_give_the_projector_widths():
    """A comma-separated spec of several families: one encoder each, in order; their widths are
    SiT's z_dims."""
    with torch.device("meta"):
        encs = load_encoders(
            "clip-vit-L, mae-vit-l,jepa-vit-h,mocov3-vit-s", "meta", 256, pretrained=False
        )
    assert [e.name for e in encs] == ["clip-vit-l", "mae-vit-l", "jepa-vit-h", "mocov3-vit-s"]
    # train.py: z_dims=[e.embed_dim for e in encoders]
    assert [e.embed_dim for e in encs] == [1024, 1024, 1280, 384]


def test_reachable_is_one_short_connection_attempt(monkeypatch):
    """A listening port is reachable; a closed one is not, at once (no retries)."""
    for name in ("http_proxy", "https_proxy", "all_proxy"):  # a direct connection
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    assert encoders.reachable.__wrapped__(f"http://127.0.0.1:{port}/x")
    server.close()
    start = time.monotonic()
    assert not encoders.reachable.__wrapped__(f"http://127.0.0.1:{port}/x")
    assert not encoders.reachable.__wrapped__("https://no-such-host.invalid/")
    assert time.monotonic() - start < 2 * encoders.CONNECT_TIMEOUT


def test_behind_a_proxy_the_client_is_left_to_ask(monkeypatch):
    """A cluster that reaches the hub only through HTTPS_PROXY: no direct connection is tried."""
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setattr(socket, "create_connection", None)  # calling it would fail
    assert encoders.reachable.__wrapped__("https://huggingface.co")


def hub_offline_timm(cached):
    """timm.create_model as huggingface_hub's offline mode makes it: the cache or a miss at once;
    noisy as the hub clients are."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def create_model(name, pretrained=False, **kwargs):
        assert constants.HF_HUB_OFFLINE  # never a request, hence no retries
        warnings.warn("hub warning spam")
        logging.getLogger("huggingface_hub").warning("more hub spam")
        if not cached:
            raise LocalEntryNotFoundError("Cannot find the requested files in the local cache")
        model = torch.nn.Identity()
        model.embed_dim = 8
        return model
    return create_model


def test_offline_encoder_fails_at_once_in_one_line_naming_the_flag(monkeypatch, caplog, recwarn):
    """No network: one line naming the official file and --enc-weights, nothing else said."""
    from huggingface_hub import constants

    monkeypatch.setattr(encoders, "reachable", lambda url: False)
    monkeypatch.setattr(timm, "create_model", hub_offline_timm(cached=False))
    offline = constants.HF_HUB_OFFLINE
    with pytest.raises(UserError) as err:
        load_encoders("dinov2-vit-b", "cpu", 256)
    assert str(err.value) == (
        "cannot load the pretrained weights of encoder dinov2-vit-b (vit_base_patch14_dinov2."
        "lvd142m): the Hugging Face hub is unreachable (no network?) and the local cache does not "
        "hold it; download dinov2_vitb14_pretrain.pth (facebookresearch/dinov2) elsewhere and "
        "pass it as --enc-weights FILE")
    assert constants.HF_HUB_OFFLINE == offline  # restored
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING] and not len(recwarn)


def test_offline_encoder_in_the_hub_cache_loads(monkeypatch):
    monkeypatch.setattr(encoders, "reachable", lambda url: False)
    monkeypatch.setattr(timm, "create_model", hub_offline_timm(cached=True))
    assert build_encoder("dinov2-vit-b").embed_dim == 8


def test_offline_vae_and_text_encoder_name_their_flags(monkeypatch):
    from diffusers.models import AutoencoderKL
    from huggingface_hub import constants

    def from_pretrained(*args, **kwargs):
        assert constants.HF_HUB_OFFLINE
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(encoders, "reachable", lambda url: False)
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", from_pretrained)
    with pytest.raises(UserError, match=r"^cannot load the SD-VAE 'mse' \(stabilityai/sd-vae-ft-"
                                        r"mse\): the Hugging Face hub is unreachable .* as --vae$"):
        encoders.load_vae("mse")
    from transformers import CLIPTextModel

    monkeypatch.setattr(CLIPTextModel, "from_pretrained", from_pretrained)
    with pytest.raises(UserError, match=r"text encoder .* unreachable .*--text-encoder-path$"):
        encoders.load_text_encoder()


def test_offline_discriminator_trunk_names_disc_weights(monkeypatch, tmp_path):
    """Not in torch.hub's cache and the server unreachable: one line at once, --disc-weights."""
    monkeypatch.setattr(encoders, "reachable", lambda url: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserError, match=r"^cannot download the ResNet-18 trunk: download.pytorch."
                                        r"org is unreachable .*resnet18-f37072fd.pth elsewhere "
                                        r"and pass --disc-weights FILE$"):
        discriminator.build_discriminator(32, pretrained=True)
