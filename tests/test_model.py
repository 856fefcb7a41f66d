"""model.py: REPA parity (weights, init, outputs), sizes, taps, checkpointing, bad arguments."""

import os

import pytest
import torch

from model import MODEL_NAMES, SIZES, SiT, build_sit, size_config

REF_PATH = os.path.join(os.path.dirname(__file__), "data", "repa_reference.pt")
REF = torch.load(REF_PATH, weights_only=True)["model"]


def repa_tiny(**kw):
    """The tiny SiT of the REPA reference, constructed with REPA's own keyword arguments."""
    return SiT(path_type="linear", decoder_hidden_size=REF["config"]["hidden_size"], qk_norm=False,
               **{**REF["config"], **kw})


def test_repa_state_dict_loads_strict_and_outputs_match():
    net = repa_tiny().eval()
    net.load_state_dict(REF["state_dict"], strict=True)
    with torch.no_grad():
        out = net(REF["x"], REF["t"], REF["y"])
    assert (out.v - REF["v_eval"]).abs().max() <= 1e-5
    assert out[0] is out.v  # REPA's samplers index the output
    assert len(out.h_dens) == len(REF["zs_eval"]) == 2
    for z, z_ref in zip(out.h_dens, REF["zs_eval"]):
        assert (z - z_ref).abs().max() <= 1e-5


def test_repa_label_dropout_matches_in_training_mode():
    net = repa_tiny().train()
    net.load_state_dict(REF["state_dict"])
    torch.manual_seed(2)
    with torch.no_grad():
        v = net(REF["x"], REF["t"], REF["y"]).v
    assert (v - REF["v_train"]).abs().max() <= 1e-5
    torch.manual_seed(3)  # other dropout draws give another output: the reference is not trivial
    with torch.no_grad():
        assert not torch.allclose(net(REF["x"], REF["t"], REF["y"]).v, v)


def test_initialization_matches_repa_with_the_same_seed():
    torch.manual_seed(0)
    state = repa_tiny().state_dict()
    assert state.keys() == REF["init_stats"].keys()
    for k, (s, sq) in REF["init_stats"].items():
        assert torch.allclose(state[k].double().sum(), s, atol=1e-6), k
        assert torch.allclose(state[k].double().square().sum(), sq, rtol=1e-6, atol=1e-9), k
    assert state["final_layer.linear.weight"].abs().sum() == 0  # adaLN-Zero / zero output init


def test_size_table_and_parameter_count():
    assert len(MODEL_NAMES) == 15
    assert size_config("SiT-XL/2") == dict(SIZES["XL"], patch_size=2)
    with torch.device("meta"):  # no memory: shapes only
        xl = build_sit("SiT-XL/2", z_dims=[])
    n = sum(p.numel() for p in xl.parameters())
    # DiT-XL/2 has 675.1M parameters with learn_sigma; SiT drops the 1152*16+16 sigma outputs.
    assert n == 675_129_632 - 1152 * 16 - 16
    with pytest.raises(ValueError, match="unknown model"):
        size_config("SiT-M/2")
    with pytest.raises(ValueError, match="unknown model"):
        size_config("SiT-B/3")


def test_small_preset_runs_with_both_taps():
    torch.manual_seed(0)
    net = build_sit(
        "SiT-S/8", input_size=16, num_classes=10, encoder_depth=4, z_dims=[12, 20], sra_depth=2
    ).eval()
    x = torch.randn(2, 4, 16, 16)
    out = net(x, torch.rand(2), torch.tensor([0, 10]))
    assert out.v.shape == x.shape and out.x0_hat.shape == x.shape
    assert [z.shape for z in out.h_dens] == [(2, 4, 12), (2, 4, 20)]
    plain = net(x, torch.rand(2), torch.tensor([0, 10]), align=False)
    assert plain.h_dens == [] and plain.x0_hat is None


def test_taps_read_the_residual_stream_after_the_named_block():
    torch.manual_seed(0)
    net = SiT(input_size=8, hidden_size=32, depth=3, num_heads=2, num_classes=5, encoder_depth=2,
              z_dims=[8], projector_dim=16, sra_depth=3, self_depth=1).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    h = net.x_embedder(x) + net.pos_embed
    c = net.t_embedder(t) + net.y_embedder(y)
    feats = []
    for block in net.blocks:
        h = block(h, c)
        feats.append(h)
    out = net(x, t, y)
    assert torch.allclose(out.h_dens[0], net.projectors[0](feats[1]), atol=1e-6)
    assert out.x0_hat.shape == x.shape
    assert torch.allclose(out.x0_hat[:, :, :2, :2].permute(0, 2, 3, 1).reshape(2, 16),
                          # token 0 is the top-left 2x2 patch
                          net.sra_head(feats[2])[:, 0], atol=1e-6)
    assert torch.allclose(out.h_self, net.self_head(feats[0]), atol=1e-6)  # SRA's student head
    assert [k for k in net.state_dict() if "self_head" in k] == [
        "self_head.0.weight", "self_head.0.bias", "self_head.2.weight", "self_head.2.bias"]
    assert net.self_head[0].weight.shape == (64, 32)  # SRA's SimpleHead: H -> 2H -> H
    assert net(x, t, y, align=False).h_self is None
    # SRA's teacher: block k's residual stream, and no block after k runs
    calls = []
    net.blocks[2].register_forward_hook(lambda *_: calls.append(1))
    for k in (1, 2):
        assert torch.allclose(net(x, t, y, align=False, stop_at=k), feats[k - 1], atol=1e-6)
    assert calls == []


def test_gradient_checkpointing_is_exact():
    torch.manual_seed(0)
    kw = dict(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5, encoder_depth=1,
              z_dims=[8], projector_dim=16)
    a, b = SiT(**kw), SiT(grad_checkpointing=True, **kw)
    b.load_state_dict(a.state_dict())
    for p in a.parameters():
        p.data.normal_(0, 0.1)
    b.load_state_dict(a.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    for net in (a, b):
        torch.manual_seed(1)
        out = net(x, t, y)
        (out.v.square().sum() + out.h_dens[0].sum()).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="encoder_depth=5"):
        SiT(input_size=8, hidden_size=32, depth=4, num_heads=2, encoder_depth=5, z_dims=[8])
    with pytest.raises(TypeError, match="unknown arguments"):
        SiT(input_size=8, hidden_size=32, depth=2, num_heads=2, bogus=1)
    # REPA's "no encoder"
    assert not SiT(input_size=8, hidden_size=32, depth=2, num_heads=2, z_dims=[0]).projectors
