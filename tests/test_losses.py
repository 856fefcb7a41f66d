"""losses.py and discriminator.py: closed forms, invariants, gradient routing, presets, overfitting.
"""

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

import losses as L
from discriminator import Discriminator, build_discriminator, is_disc_step
from model import SiT, SiTOutput


def test_interpolant_closed_forms_and_derivatives():
    t = torch.tensor([0.0, 0.25, 1.0], requires_grad=True)
    a, s, da, ds = L.interpolant(t, "linear")
    assert torch.equal(a, 1 - t) and torch.equal(s, t) and (da == -1).all() and (ds == 1).all()
    a, s, da, ds = L.interpolant(t, "cosine")
    assert torch.allclose(a.square() + s.square(), torch.ones(3))  # variance preserving
    assert torch.allclose(torch.autograd.grad(a.sum(), t, retain_graph=True)[0], da)
    assert torch.allclose(torch.autograd.grad(s.sum(), t)[0], ds)
    with pytest.raises(ValueError, match="unknown path"):
        L.interpolant(t, "edm")


def test_time_sampling():
    g = torch.Generator().manual_seed(0)
    u = L.sample_time(20000, "uniform", generator=g)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    ln = L.sample_time(20000, "lognormal", "linear", generator=g)
    # sigma = exp(N(0,1)) has median 1, t = sigma / (1 + sigma)
    assert abs(ln.median() - 0.5) < 0.02
    lc = L.sample_time(20000, "lognormal", "cosine", generator=g)
    assert abs(lc.median() - 0.5) < 0.02  # atan(1) * 2 / pi
    with pytest.raises(ValueError, match="weighting"):
        L.sample_time(3, "cosmap")


def test_velocity_loss_by_hand():
    assert L.velocity_loss(
        torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    ).item() == pytest.approx(2.5)


def test_patch_loss_hand_and_invariants():
    z = torch.randn(2, 5, 7)
    assert L.patch_loss([z], [z]).item() == pytest.approx(-1.0, abs=1e-6)
    assert L.patch_loss([z], [-z]).item() == pytest.approx(1.0, abs=1e-6)
    z1, h1 = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]]), torch.tensor([[[0.0, 3.0], [2.0, 2.0]]])
    assert L.patch_loss([z1], [h1]).item() == pytest.approx(-(0 + 1) / 2)  # cosines 0 and 1
    # Two encoders: the mean of their terms, as REPA's projection loss.
    assert L.patch_loss([z1, z], [h1, z]).item() == pytest.approx((-0.5 - 1) / 2, abs=1e-6)


def test_struc_loss_hand_and_invariants():
    z = torch.randn(3, 6, 5)
    assert L.struc_loss(z, z).item() == pytest.approx(0.0, abs=1e-7)
    scale = torch.rand(3, 6, 1) + 0.1  # per-token positive rescaling leaves every cosine unchanged
    assert L.struc_loss(z, z * scale).item() == pytest.approx(0.0, abs=1e-7)
    h = torch.randn(3, 6, 5)
    assert L.struc_loss(z, h * scale).item() == pytest.approx(L.struc_loss(z, h).item(), rel=1e-5)
    assert L.struc_loss(z, h, "sum").item() == pytest.approx(
        36 * L.struc_loss(z, h).item(), rel=1e-5
    )
    # Hand case: two tokens; A(z) = [[1, 0], [0, 1]], A(h) = [[1, 1], [1, 1]] -> two off-diagonal
    # errors of 1.
    z2, h2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[1.0, 1.0], [2.0, 2.0]]])
    assert L.struc_loss(z2, h2, "sum").item() == pytest.approx(2.0, abs=1e-6)
    assert L.struc_loss(z2, h2, "mean").item() == pytest.approx(0.5, abs=1e-6)


def test_adversarial_losses_equal_bce_closed_form():
    real, fake = torch.randn(7), torch.randn(7)
    ones, zeros = torch.ones(7), torch.zeros(7)
    expected_d = (F.binary_cross_entropy_with_logits(real, ones)
                  + F.binary_cross_entropy_with_logits(fake, zeros))
    assert torch.allclose(L.discriminator_loss(real, fake), expected_d)
    # SARA eq. (9), written out
    by_hand = -torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean()
    assert torch.allclose(L.discriminator_loss(real, fake), by_hand, atol=1e-5)
    assert torch.allclose(
        L.generator_adv_loss(fake), -torch.log(torch.sigmoid(fake)).mean(), atol=1e-6
    )
    assert L.generator_adv_loss(torch.zeros(3)).item() == pytest.approx(math.log(2))


def test_vae_align_objectives():
    pred, x0 = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    assert torch.allclose(L.sra_loss(pred, x0), F.smooth_l1_loss(pred, x0, beta=0.05))
    d = torch.tensor([0.01, 0.2])  # one in the quadratic zone, one in the linear zone (beta 0.05)
    hand = (0.5 * 0.01**2 / 0.05 + (0.2 - 0.5 * 0.05)) / 2
    assert L.sra_loss(d.view(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)).item() == pytest.approx(hand)
    assert torch.allclose(L.sra_loss(pred, x0, objective="l1"), (pred - x0).abs().mean())
    assert torch.allclose(L.sra_loss(pred, x0, objective="l2"), (pred - x0).square().mean())
    assert L.sra_loss(x0 * 3, x0, objective="cosine").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="objective"):
        L.sra_loss(pred, x0, objective="kl")


def test_vae_align_timestep_range_zeroes_outside():
    pred, x0 = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])
    per = F.smooth_l1_loss(pred, x0, beta=0.05, reduction="none").flatten(1).mean(1)
    lo = L.sra_loss(pred, x0, t, t_range=(0.0, 0.5))
    assert lo.item() == pytest.approx((per[0] + per[1]).item() / 4, rel=1e-6)
    hi = L.sra_loss(pred, x0, t, t_range=(0.5, 1.0))
    assert (lo + hi).item() == pytest.approx(per.mean().item(), rel=1e-6)


def test_sra_self_loss_is_smooth_l1_with_beta_005_and_trains_the_student_only():
    teacher = torch.zeros(2, 3, 4, requires_grad=True)
    student = torch.full((2, 3, 4), 0.01, requires_grad=True)
    assert L.self_loss(student, teacher).item() == pytest.approx(0.5 * 0.01**2 / 0.05)  # quadratic
    assert L.self_loss(torch.ones(2, 3, 4), teacher).item() == pytest.approx(1 - 0.025)  # linear
    L.self_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0  # the teacher's side is a target


def test_sra_teacher_time_is_never_noisier_and_stays_in_range():
    t, dt = torch.tensor([0.05, 0.5, 1.0, 0.3]), torch.tensor([0.9, 0.5, 0.0, 1.0])
    assert torch.allclose(L.teacher_time(t, dt, 0.2), torch.tensor([0.0, 0.4, 1.0, 0.1]))
    g = torch.Generator().manual_seed(0)
    t, dt = torch.rand(1000, generator=g), torch.rand(1000, generator=g)
    tt = L.teacher_time(t, dt, 0.2)
    assert (tt <= t).all() and (tt >= 0).all() and (t - tt).max() <= 0.2 + 1e-6


def test_sra_weight_schedule_follows_the_official_train_py():
    align = L.align_config("sra")
    assert align.self_weight == 0.2  # SRA's train.py: 2 x 0.1 at 256 px
    # 2 * 0.1 ** ((epoch - 149) / 1000 + 1) after epoch 149, 2 * 0.1 before (SRA's train.py)
    for epoch in (0, 149, 150, 649, 1149):
        official = 2 * 0.1 ** (((epoch - 149) / 1000 + 1) if epoch > 149 else 1)
        assert L.at_epoch(align, epoch).self_weight == pytest.approx(official)
    assert L.at_epoch(align, 1149).self_weight == pytest.approx(0.02)
    repa = L.align_config("repa")
    assert L.at_epoch(repa, 5000) == repa  # only SRA's weight has a schedule


def test_sra_draws_leave_the_other_presets_draws_as_they_were():
    def draw(preset):
        return L.draw_noise(6, (4, 2, 2), L.align_config(preset), 0.5,
                            generator=torch.Generator().manual_seed(0))

    plain, sra = draw("none"), draw("sra")
    assert plain.dt is None and sra.dt.shape == (6,) and 0 <= sra.dt.min() and sra.dt.max() < 1
    assert all(torch.equal(getattr(plain, k), getattr(sra, k)) for k in ("t", "eps", "drop"))
    assert torch.equal(sra[2:4].dt, sra.dt[2:4]) and plain[2:4].dt is None


SRA_REF = os.path.join(os.path.dirname(__file__), "data", "sra_reference.pt")


def sra_reference_models(ref):
    """The student (training mode) and EMA teacher (eval) of tests/data/sra_reference.pt."""
    tiny = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=4, num_heads=2,
                num_classes=10, z_dims=[], self_depth=int(ref["student_depth"]))
    student, teacher = SiT(**tiny), SiT(**tiny)
    student.load_state_dict(ref["student"])
    teacher.load_state_dict(ref["teacher"])
    return student.train(), teacher.eval().requires_grad_(False)


def test_sra_matches_the_official_code():
    """SRA's SRALoss on its own SiT (tests/data/make_sra_reference.py), the same weights and draws:
    the student head's tokens, the teacher's tokens at its lower noise level, both losses and the
    total at SRA's early weight 0.2."""
    ref = torch.load(SRA_REF, weights_only=True)
    student, teacher = sra_reference_models(ref)
    align = L.align_config("sra", self_teacher_depth=int(ref["teacher_depth"]),
                           self_t_max=float(ref["t_max"]))
    noise = L.Noise(ref["t"], ref["eps"], ref["drop"], ref["dt"])
    out = L.training_losses(student, ref["x0"], ref["labels"], [], align, noise, teacher=teacher)
    h_teacher = teacher(torch.zeros_like(ref["x0"]), ref["t"], ref["labels"], stop_at=3)
    assert not torch.allclose(h_teacher, ref["h_teacher"])  # the teacher's input matters
    t_teacher = L.teacher_time(ref["t"], ref["dt"], 0.2).view(-1, 1, 1, 1)
    h_teacher = teacher((1 - t_teacher) * ref["x0"] + t_teacher * ref["eps"], t_teacher.flatten(),
                        ref["labels"], drop=ref["drop"], stop_at=3)
    assert torch.allclose(h_teacher, ref["h_teacher"], atol=1e-5)
    t = ref["t"].view(-1, 1, 1, 1)
    mine = student((1 - t) * ref["x0"] + t * ref["eps"], ref["t"], ref["labels"], drop=ref["drop"])
    assert mine.h_self.shape == ref["h_self"].shape == (6, 16, 16)
    assert torch.allclose(mine.h_self, ref["h_self"], atol=1e-6)  # the student head's tokens
    assert torch.allclose(mine.v, ref["v"], atol=1e-6)
    assert out.terms["velocity"].item() == pytest.approx(ref["velocity"].item(), rel=1e-5)
    assert out.terms["self"].item() == pytest.approx(ref["self_loss"].item(), rel=1e-5)
    total = ref["velocity"] + 0.2 * ref["self_loss"]
    assert out.total.item() == pytest.approx(total.item(), rel=1e-5)


def test_sra_trains_the_student_head_and_never_the_teacher():
    ref = torch.load(SRA_REF, weights_only=True)
    student, teacher = sra_reference_models(ref)
    teacher.requires_grad_(True)  # even a teacher that could take gradients gets none
    align = L.align_config("sra", self_teacher_depth=3)
    noise = L.Noise(ref["t"], ref["eps"], ref["drop"], ref["dt"])
    out = L.training_losses(student, ref["x0"], ref["labels"], [], align, noise, teacher=teacher)
    out.terms["self"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.self_head[0].weight.grad.abs().sum() > 0
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # through the student's tap
    assert student.blocks[3].attn.qkv.weight.grad is None  # blocks after the tap: velocity only
    with pytest.raises(ValueError, match="self_depth > 0 and a teacher"):
        L.training_losses(student, ref["x0"], ref["labels"], [], align, noise)
    with pytest.raises(ValueError, match="self_teacher_depth"):
        L.training_losses(student, ref["x0"], ref["labels"], [], L.align_config("sra"), noise,
                          teacher=teacher)


def test_presets_and_overrides():
    sara = L.align_config("sara")
    assert (sara.patch_weight, sara.struc_weight, sara.adv_weight, sara.sra_weight) == (
        0.5, 0.5, 0.05, 0.0,
    )
    assert L.align_config("sra2").sra_weight == 1.0 and not L.align_config("sra2").needs_encoder
    assert L.align_config("repa+sra2").patch_weight == 0.5
    # SARA Table 2: patch + struc
    ablation = L.align_config("sara", adv_weight=0.0, struc_weight=None)
    assert (ablation.patch_weight, ablation.struc_weight, ablation.adv_weight) == (0.5, 0.5, 0.0)
    with pytest.raises(ValueError, match="unknown alignment preset"):
        L.align_config("dino")
    with pytest.raises(ValueError, match="unknown alignment options"):
        L.align_config("sara", gama=0.1)


def test_discriminator_shapes_and_schedule():
    torch.manual_seed(0)
    disc = Discriminator(32)
    assert not disc.pretrained and disc.conv1.kernel_size == (1, 1)
    assert disc(torch.randn(3, 32, 16, 16)).shape == (3,)
    assert [s for s in range(12) if is_disc_step(s)] == [0, 5, 10]
    # token n at row n // 2, column n % 2
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    assert torch.equal(L.tokens_to_map(h)[1, :, 1, 0], h[1, 2])
    with pytest.raises(ValueError, match="square"):
        L.tokens_to_map(torch.randn(1, 6, 3))


def noise(x0, seed=None):
    """One step's random draws for the batch x0 (fixed when seeded)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return L.draw_noise(x0.shape[0], x0.shape[1:], L.align_config("none"), 0.1, generator=g)


def test_noise_draws_and_slicing():
    n = noise(torch.zeros(6, 4, 2, 2), seed=0)
    assert n.t.shape == (6,) and n.eps.shape == (6, 4, 2, 2) and n.drop.dtype == torch.bool
    assert torch.equal(n[2:4].eps, n.eps[2:4]) and torch.equal(n[2:4].t, n.t[2:4])
    assert torch.equal(noise(torch.zeros(6, 4, 2, 2), seed=0).eps, n.eps)
    x0 = torch.randn(6, 4, 2, 2)
    alpha, sigma, _, _ = L.interpolant(n.t.view(-1, 1, 1, 1))
    calls = []
    def model(x, t, y, drop):
        calls.append((x, t, drop))
        return SiTOutput(torch.zeros_like(x), [], None)

    out = L.training_losses(
        model, x0, torch.zeros(6, dtype=torch.long), [], L.align_config("none"), n
    )
    assert torch.allclose(calls[0][0], alpha * x0 + sigma * n.eps) and calls[0][2] is n.drop
    # v = eps - x0
    assert out.terms["velocity"].item() == pytest.approx((n.eps - x0).square().mean().item())


def tiny_setup(preset, seed=0):
    """A tiny SiT with projector and SRA^2 head, a frozen 'encoder', a discriminator and one batch.
    """
    torch.manual_seed(seed)
    model = SiT(input_size=8, hidden_size=64, depth=4, num_heads=4, num_classes=10, encoder_depth=2,
                z_dims=[32], projector_dim=64, sra_depth=1, self_depth=1)
    # stands in for DINOv2: must get no gradient
    encoder = torch.nn.Linear(12, 32).requires_grad_(True)
    disc, disc_opt = build_discriminator(32)
    x0, y = torch.randn(8, 4, 8, 8), torch.randint(0, 10, (8,))
    with torch.no_grad():
        z = encoder(torch.randn(8, 16, 12))
    return model, encoder, disc, disc_opt, x0, y, [z], L.align_config(preset, self_teacher_depth=3)


def test_gradient_routing():
    model, encoder, disc, disc_opt, x0, y, z, align = tiny_setup("sara+sra2")
    out = L.training_losses(model, x0, y, z, align, noise(x0), disc)
    out.total.backward()
    assert all(p.grad is None for p in disc.parameters())  # generator loss never trains D
    assert all(p.grad is None for p in encoder.parameters())
    assert model.projectors[0][0].weight.grad.abs().sum() > 0
    assert model.x_embedder.proj.weight.grad.abs().sum() > 0
    assert model.sra_head[0].weight.grad.abs().sum() > 0
    # The adversarial gradient alone reaches the projector through D.
    model.zero_grad()
    adv_only = L.training_losses(
        model, x0, y, z, L.align_config("none", adv_weight=0.05), noise(x0), disc
    )
    (adv_only.total - adv_only.terms["velocity"]).backward()
    assert model.projectors[0][-1].weight.grad.abs().sum() > 0
    # D's own step: only D's parameters change.
    model.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d_before = [p.clone() for p in disc.parameters()]
    d_loss, acc = L.discriminator_step_loss(disc, z[0], out.h_dens[0])
    disc_opt.zero_grad()
    d_loss.backward()
    disc_opt.step()
    assert 0 <= acc <= 1
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(a, b) for a, b in zip(d_before, disc.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(L.ALIGN_PRESETS))
def test_every_preset_overfits_one_batch(preset):
    model, encoder, disc, _, x0, y, z, align = tiny_setup(preset)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)  # SRA's, held fixed here
    draws = L.draw_noise(8, x0.shape[1:], align, 0.1, generator=torch.Generator().manual_seed(0))
    history = []
    for _ in range(120):
        out = L.training_losses(model, x0, y, z, align, draws, disc, teacher)  # one fixed batch
        assert torch.isfinite(out.total)
        history.append({k: v.item() for k, v in out.terms.items()})
        opt.zero_grad()
        out.total.backward()
        opt.step()
    first, last = history[0], history[-1]
    assert set(first) == {"velocity"} | {
        k for k in ("patch", "struc", "adv", "sra", "self") if getattr(align, f"{k}_weight")
    }
    assert last["velocity"] < 0.5 * first["velocity"]
    for term in set(first) - {"velocity"}:
        assert last[term] < first[term], term  # D is held fixed here, so L_adv must fall too


def test_discriminator_learns_to_separate():
    model, encoder, disc, disc_opt, x0, y, z, align = tiny_setup("sara")
    h = L.training_losses(model, x0, y, z, align, noise(x0), disc).h_dens[0].detach()
    first = None
    for _ in range(30):
        loss, acc = L.discriminator_step_loss(disc, z[0], h)
        first = first if first is not None else loss.item()
        disc_opt.zero_grad()
        loss.backward()
        disc_opt.step()
    assert loss.item() < 0.5 * first and acc.item() == 1.0


def test_discriminator_trunk_from_a_local_file(tmp_path):
    """--disc-weights: torchvision's ResNet-18 file fills bn1, layer1 and layer2 exactly; the run
    counts it pretrained."""
    import torchvision

    torch.manual_seed(3)
    resnet = torchvision.models.resnet18()
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    disc, _ = build_discriminator(32, weights=str(tmp_path / "resnet18.pth"))
    for name in ("bn1", "layer1", "layer2"):
        for key, value in getattr(resnet, name).state_dict().items():
            assert torch.equal(getattr(disc, name).state_dict()[key], value), f"{name}.{key}"
    assert disc.pretrained and not build_discriminator(32)[0].pretrained
