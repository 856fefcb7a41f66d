"""mmdit.py and the text encoder: parity with REPA's MMDiT from a fixture, taps, heads, training
losses on a tiny MMDiT; CLIP text features' padding, truncation and null caption (tiny random)."""

import copy
import logging
import os
import sys

import pytest
import torch

import losses
import sample
from encoders import TEXT_TOKENS, TINY_RANDOM, load_text_encoder
from mmdit import MMDIT_SIZES, MMDiT, build_mmdit
from model import SiTOutput

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
from make_mmdit_fixture import dequantize  # noqa: E402  (the fixture's weights, unpacked)

REF_PATH = os.path.join(os.path.dirname(__file__), "data", "mmdit_reference.pt")
REF = torch.load(REF_PATH, weights_only=True)
TINY = REF["tiny"]


def tiny(**kw):
    """A tiny MMDiT (depth 2: 64 wide, 2 heads) on a 4x16x16 latent with p=2 (64 tokens)."""
    torch.manual_seed(0)
    return MMDiT(**{**dict(input_size=16, depth=2, mlp_ratio=2.0, context_dim=12, encoder_depth=1,
                           z_dims=[10], projector_dim=16), **kw})


# ----------------------------------------------------------------------------------------------
# MMDiT against REPA's models/mmdit.py


def test_repa_state_dict_loads_strict_and_outputs_match():
    net = MMDiT(**TINY["config"]).eval()
    net.load_state_dict(dequantize(TINY["state"]), strict=True)
    with torch.no_grad():
        out = net(TINY["x"].float(), TINY["t"], TINY["context"].float())
    assert isinstance(out, SiTOutput) and out.x0_hat is None
    assert (out.v - TINY["v"]).abs().max() <= 1e-5 and TINY["v"].abs().mean() > 0.1
    assert len(out.h_dens) == len(TINY["zs"]) == 2
    for z, z_ref in zip(out.h_dens, TINY["zs"]):
        assert (z - z_ref).abs().max() <= 1e-5


def test_initialization_is_pytorch_default_as_repa_with_the_same_seed():
    torch.manual_seed(0)
    state = MMDiT(**TINY["config"]).state_dict()
    assert state.keys() == TINY["init_stats"].keys()
    for k, (s, sq) in TINY["init_stats"].items():
        assert torch.allclose(state[k].double().sum(), s, atol=1e-6), k
        assert torch.allclose(state[k].double().square().sum(), sq, rtol=1e-6, atol=1e-9), k
    # no adaLN-Zero: the gates and the output layer start non-zero, unlike SiT's
    assert state["joint_blocks.0.x_block.adaLN_modulation.1.weight"].abs().min() > 0
    assert state["final_layer.linear.weight"].abs().min() > 0


def test_full_size_has_repa_keys_shapes_and_512m_parameters():
    with torch.device("meta"):  # no memory: shapes only
        net = build_mmdit("MMDiT", z_dims=[768])
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == REF["full"]["shapes"]
    assert sum(p.numel() for p in net.parameters()) == REF["full"]["params"] == 512_415_504
    assert net.pos_embed.shape == (1, 256, 768) and net.joint_blocks[0].num_heads == 24
    last = net.joint_blocks[-1].context_block  # pre-only: its q, k, v feed the attention, no more
    assert not hasattr(last.attn, "proj") and not hasattr(last, "mlp")
    assert MMDIT_SIZES["MMDiT"]["encoder_depth"] == 8
    with pytest.raises(ValueError, match="unknown model"):
        build_mmdit("MMDiT-XL")

# ----------------------------------------------------------------------------------------------
# The text encoder


@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder(random=True)


def reference_ids(tokenizer, caption):
    """CLIP's 77 ids built by hand: start, one token per character (the tiny vocabulary has no
    merges; a word's last character carries '</w>'), end, then end-of-text up to 77."""
    vocab = tokenizer.get_vocab()
    pieces = []
    for word in caption.split():
        chars = [tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(c)[0][0] for c in word]
        pieces += chars[:-1] + [chars[-1] + "</w>"]
    ids = [tokenizer.bos_token_id] + [vocab[p] for p in pieces][: TEXT_TOKENS - 2]
    ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids + [tokenizer.eos_token_id] * (TEXT_TOKENS - len(ids)))


def test_text_features_are_clip_last_hidden_state_of_77_eot_padded_tokens(text_encoder):
    captions = ["a red bus", "two dogs on a beach", ""]
    feats = text_encoder.encode(captions)
    assert feats.shape == (3, TEXT_TOKENS, text_encoder.dim) and feats.dtype == torch.float32
    ids = torch.stack([reference_ids(text_encoder.tokenizer, c) for c in captions])  # (3, 77)
    assert ids[0, 8:].eq(text_encoder.tokenizer.eos_token_id).all()  # "a red bus": 1 + 7 + EOT
    with torch.no_grad():
        ref = text_encoder.model(input_ids=ids).last_hidden_state
    assert torch.allclose(feats, ref, atol=1e-6)
    # the null condition is the empty caption's features, the same in any batch
    assert torch.allclose(text_encoder.null_context()[0], feats[2], atol=1e-6)
    assert not torch.allclose(feats[0], feats[2], atol=1e-3)  # captions do condition


def test_long_captions_are_truncated_and_said_once(caplog):
    encoder = load_text_encoder(random=True)
    long = " ".join(["bus"] * 40)  # 120 tokens in the byte-level vocabulary
    with caplog.at_level(logging.WARNING, logger="encoders"):
        feats = encoder.encode([long, "a cat"])
        encoder.encode([long])
    said = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(said) == 1 and "122 tokens" in said[0].getMessage()
    ids = reference_ids(encoder.tokenizer, long)  # the first 75 caption tokens, then EOT
    with torch.no_grad():
        ref = encoder.model(input_ids=ids[None]).last_hidden_state[0]
    assert torch.allclose(feats[0], ref, atol=1e-6)


def test_tiny_random_text_encoder_is_loud_and_fixed(caplog):
    with caplog.at_level(logging.WARNING, logger="encoders"):
        a, b = load_text_encoder(random=True), load_text_encoder(name=TINY_RANDOM)
    assert "TINY RANDOMLY INITIALISED" in caplog.text and "NOT CLIP" in caplog.text
    assert a.name == TINY_RANDOM and not a.pretrained
    assert torch.equal(a.encode(["a red bus"]), b.encode(["a red bus"]))
    with pytest.raises(ValueError, match="list of caption strings"):
        a.encode("a red bus")


def test_text_encoder_from_a_local_folder(tmp_path, text_encoder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_encoder(path=str(tmp_path / "missing"))
    text_encoder.model.save_pretrained(tmp_path)
    with pytest.raises(OSError, match="lacks CLIP's tokenizer files"):
        load_text_encoder(path=str(tmp_path))
    text_encoder.tokenizer.save_pretrained(tmp_path)
    local = load_text_encoder(path=str(tmp_path))
    assert local.pretrained and local.name == "openai/clip-vit-large-patch14"
    assert torch.equal(local.encode(["a red bus"]), text_encoder.encode(["a red bus"]))


# ----------------------------------------------------------------------------------------------
# MMDiT: taps, heads, caption dropout, arguments, training losses


def test_taps_read_the_image_stream_after_the_named_block():
    net = tiny(depth=3, encoder_depth=2, sra_depth=1, self_depth=2).eval()
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.rand(2), torch.randn(2, 5, 12)
    h, c, context = net.x_embedder(x) + net.pos_embed, net.t_embedder(t), net.context_embedder(ctx)
    feats = []
    for block in net.joint_blocks:
        context, h = block(context, h, c)
        feats.append(h)
    assert context is None  # the last block's text stream is pre-only
    out = net(x, t, ctx)
    assert out.v.shape == x.shape and out.x0_hat.shape == x.shape
    assert [z.shape for z in out.h_dens] == [(2, 64, 10)]
    assert torch.allclose(out.h_dens[0], net.projectors[0](feats[1]), atol=1e-6)
    # SRA^2 head after block 1; token 0 is the top-left 2x2 patch of the latent
    assert torch.allclose(out.x0_hat[:, :, :2, :2].permute(0, 2, 3, 1).reshape(2, 16),
                          net.sra_head(feats[0])[:, 0], atol=1e-6)
    assert torch.allclose(out.h_self, net.self_head(feats[1]), atol=1e-6)  # SRA's student head
    for k in (1, 3):  # SRA's teacher: the image stream after block k (the last: pre-only text)
        assert torch.allclose(net(x, t, ctx, align=False, stop_at=k), feats[k - 1], atol=1e-6)
    plain = net(x, t, ctx, align=False)
    assert plain.h_dens == [] and plain.x0_hat is None and plain.h_self is None
    assert torch.equal(plain.v, out.v)
    # the text conditions the image: another context, another velocity
    assert not torch.allclose(net(x, t, torch.randn(2, 5, 12)).v, out.v, atol=1e-4)


def test_dropped_captions_get_the_null_context():
    net = tiny().eval()
    x, t, ctx = torch.randn(3, 4, 16, 16), torch.rand(3), torch.randn(3, 7, 12)
    drop = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match="set_null_context"):
        net(x, t, ctx, drop=drop)
    null = torch.randn(7, 12)
    net.set_null_context(null)
    assert "null_context" not in net.state_dict()  # data, not a weight: REPA's keys stay exact
    expected = torch.where(drop.view(-1, 1, 1), null.expand(3, 7, 12), ctx)
    assert torch.equal(net.null_condition(ctx), null.expand(3, 7, 12))
    assert torch.allclose(net(x, t, ctx, drop=drop).v, net(x, t, expected).v, atol=1e-6)


def test_samples_with_captions_and_the_empty_caption_as_null(text_encoder):
    net = tiny(context_dim=text_encoder.dim, z_dims=[0]).eval()
    prompts = sample.Prompts(text_encoder, ["a red bus", "a cat"])
    kw = dict(seed=3, mode="ode", num_steps=3, cfg=2.0)
    guided = sample.sample_latents(net, [0, 1], prompts=prompts, **kw)
    assert guided.shape == (2, 4, 16, 16) and torch.isfinite(guided).all()
    # the model's own null context (set from the same empty caption) guides the same way
    net.set_null_context(text_encoder.null_context()[0])
    context, null = prompts.context([0, 1], "cpu")
    assert torch.equal(net.null_condition(context), null)
    plain = sample.sample_latents(net, [0, 1], prompts=prompts, **{**kw, "cfg": 1.0})
    assert not torch.allclose(plain, guided, atol=1e-4)  # guidance does something
    with pytest.raises(ValueError, match="null context must be"):
        net.set_null_context(torch.randn(77, 768))


def test_gradient_checkpointing_is_exact():
    a, b = tiny(), tiny(grad_checkpointing=True)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.rand(2), torch.randn(2, 5, 12)
    for net in (a, b):
        out = net.train()(x, t, ctx)
        (out.v.square().sum() + out.h_dens[0].sum()).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match=r"text features \(B, L, 12\), got \(2, 5, 768\)"):
        tiny()(torch.randn(2, 4, 16, 16), torch.rand(2), torch.randn(2, 5, 768))
    with pytest.raises(ValueError, match="encoder_depth=3"):
        MMDiT(input_size=16, depth=2, encoder_depth=3, z_dims=[8])
    with pytest.raises(TypeError, match="unknown arguments"):
        MMDiT(input_size=16, depth=2, bogus=1)
    with pytest.raises(ValueError, match="qk_norm=None"):
        MMDiT(input_size=16, depth=2, qk_norm="rms")
    # REPA's own keywords at the values its T2I code uses; z_dims=[0] is REPA's "no encoder"
    net = MMDiT(input_size=16, depth=2, z_dims=[0], learn_sigma=False, attn_mode="torch")
    assert not net.projectors


@pytest.mark.parametrize("preset,terms", [("repa+sra2", {"velocity", "patch", "sra"}),
                                          ("sra", {"velocity", "self"})])
def test_training_losses_train_a_tiny_mmdit(preset, terms):
    """Table 4's +REPA / +SRA^2 and +SRA terms on a tiny MMDiT (SRA: its own EMA as the teacher,
    at block 2 of 2, fed the same dropped captions)."""
    net = tiny(sra_depth=2, sra_hidden_dim=32, self_depth=1).train()
    net.set_null_context(torch.randn(7, 12))
    g = torch.Generator().manual_seed(0)
    x0, ctx = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 7, 12, generator=g)
    z_encs = [torch.randn(4, 64, 10, generator=g)]  # one encoder's tokens of the clean images
    align = losses.align_config(preset, self_teacher_depth=2)
    noise = losses.draw_noise(4, (4, 16, 16), align, 0.5, generator=g)
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    assert noise.drop.any()  # the null context is in play
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    steps = []
    for _ in range(6):  # one batch, one draw of noise: overfitting must lower the loss
        step = losses.training_losses(net, x0, ctx, z_encs, align, noise, teacher=teacher)
        assert step.terms.keys() == terms
        opt.zero_grad()
        step.total.backward()
        opt.step()
        steps.append(step)
    first, last = steps[0], steps[-1]
    assert last.total < 0.9 * first.total
    assert all(last.terms[k] < first.terms[k] for k in first.terms)  # every term learns
    assert net.context_embedder.weight.grad.abs().sum() > 0  # the text path trains
