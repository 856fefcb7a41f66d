"""The method's load-bearing lines, each pinned by a test that fails when the line changes.

Velocity target sign, the SRA^2 target, label dropout, the discriminator's real / fake sides, the
EMA, the papers' defaults, the guidance interval's upper edge, and gradient routing from inputs
that require grad.
References are built so they cannot hide the bug: no all-zero model outputs, no symmetric inputs,
tolerances far below the effect.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import losses as L
import sample
import train
from discriminator import build_discriminator
from model import SiT, SiTOutput, size_config

CPU = torch.device("cpu")


def tiny_sit(seed=0):
    """A SiT-T-sized model with a projector and an SRA^2 head, every weight (zero-init ones too)
    moved off init.

    The zero-initialised output layer would make the velocity exactly 0 and hide sign
    or routing bugs.
    """
    torch.manual_seed(seed)
    model = SiT(input_size=8, hidden_size=64, depth=4, num_heads=4, num_classes=10, encoder_depth=2,
                z_dims=[32], projector_dim=64, sra_depth=1)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def tiny_run(*flags, batch_size=8, resolution=32):
    """train.py's Run, resolved config and AlignConfig for the smoke preset plus flags, and one
    fixed batch."""
    argv = ["--preset", "smoke", "--batch-size", str(batch_size), "--resolution", str(resolution),
            "--projector-dim", "64", *flags]
    config = train.resolve_config(train.parse_args(argv))
    torch.manual_seed(0)
    run = train.build_run(config, 10, CPU, 1)
    g = torch.Generator().manual_seed(1)
    h = resolution // 8
    images = torch.randint(
        0, 256, (batch_size, 3, resolution, resolution), generator=g, dtype=torch.uint8
    )
    moments = torch.cat([torch.randn(batch_size, 4, h, h, generator=g),
                         # (B, 8, h, w) mean, std
                         0.1 * torch.rand(batch_size, 4, h, h, generator=g)], dim=1)
    labels = torch.arange(batch_size) % 10
    return run, config, L.AlignConfig(**config["align_config"]), (images, moments, labels)


# ----------------------------------------------------------------------------------------------
# 1. The velocity target is d/dt x_t (eps - x0 on the linear path), not its negation; SRA^2's is x0


def oracle_batch(preset, path):
    """x0 (16, 4, 4, 4), labels, the alignment and one seeded draw of t and eps (oracle tests)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 4, 4, 4, generator=g)
    align = L.align_config(preset, path_type=path)
    noise = L.draw_noise(16, x0.shape[1:], align, 0.0, generator=g)
    return x0, torch.zeros(16, dtype=torch.long), align, noise


def path_point(path, x0, eps, t):
    """x_t written out here, independently of losses.interpolant: t (B,) -> (B, C, H, W)."""
    t = t.view(-1, 1, 1, 1)
    if path == "linear":
        return (1 - t) * x0 + t * eps
    return torch.cos(t * math.pi / 2) * x0 + torch.sin(t * math.pi / 2) * eps


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_velocity_target_is_the_time_derivative_of_the_path(path):
    x0, y, align, noise = oracle_batch("none", path)

    def x_at(t):
        return path_point(path, x0, noise.eps, t)

    # d/dt x_t by forward-mode AD
    _, v_true = torch.func.jvp(x_at, (noise.t,), (torch.ones_like(noise.t),))
    if path == "linear":
        torch.testing.assert_close(v_true, noise.eps - x0)

    def oracle(sign):
        """A model that returns sign * the true velocity of the x_t it is given."""
        def model(x, t, y, drop=None):
            torch.testing.assert_close(x, x_at(t))  # the loss noised x0 along this same path
            return SiTOutput(sign * v_true, [], None)
        return model

    exact = L.training_losses(oracle(1), x0, y, [], align, noise).terms["velocity"].item()
    negated = L.training_losses(oracle(-1), x0, y, [], align, noise).terms["velocity"].item()
    assert exact < 1e-10  # float rounding only
    # ||v - (-v)||^2 = 4 ||v||^2
    assert negated == pytest.approx(4 * v_true.square().mean().item(), rel=1e-5)
    assert negated > 1.0


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_sra2_target_is_the_clean_latent_that_was_noised(path):
    """SRA2 (7): a head that returns exactly the clean x0 scores 0; one that returns its noised
    input x_t scores the smooth-L1 of x_t - x0, written out here."""
    x0, y, align, noise = oracle_batch("sra2", path)

    def head(returns_x0):
        """A model whose velocity is off (so only the sra term is judged) and whose SRA^2 head
        returns x0 or its input x_t."""
        def model(x, t, y, drop=None):
            return SiTOutput(torch.zeros_like(x), [], x0.clone() if returns_x0 else x.clone())
        return model

    exact = L.training_losses(head(True), x0, y, [], align, noise).terms["sra"].item()
    noised = L.training_losses(head(False), x0, y, [], align, noise).terms["sra"].item()
    assert exact < 1e-12
    d, beta = (path_point(path, x0, noise.eps, noise.t) - x0).abs(), 0.05
    hand = torch.where(d < beta, 0.5 * d**2 / beta, d - beta / 2).mean().item()
    assert noised == pytest.approx(hand, rel=1e-5) and noised > 0.3


# ----------------------------------------------------------------------------------------------
# 2. Label dropout: the rate of --class-dropout, and the model conditioned on the null class


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 1.0])
def test_label_dropout_rate_matches_class_dropout(rate):
    n = 200_000
    drop = L.draw_noise(
        n, (1, 1, 1), L.align_config("none"), rate, generator=torch.Generator().manual_seed(0)
    ).drop
    # Binomial(n, rate): 5 standard deviations (0.0034 at rate 0.1); the seed is fixed, so
    # this cannot flake.
    assert abs(drop.float().mean().item() - rate) <= 5 * math.sqrt(rate * (1 - rate) / n)


def test_dropped_rows_are_conditioned_on_the_null_class():
    # training mode: the label embedder would draw its own dropout if not told
    model = tiny_sit().train()
    g = torch.Generator().manual_seed(2)
    x0, y = torch.randn(64, 4, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    align = L.align_config("none")
    noise = L.draw_noise(64, x0.shape[1:], align, 0.5, generator=g)
    assert 10 < noise.drop.sum() < 54  # both kinds of rows, many of each
    seen = []
    model.y_embedder.register_forward_hook(lambda module, args, out: seen.append(out))
    L.training_losses(model, x0, y, [], align, noise)
    table = model.y_embedder.embedding_table.weight  # (11, H): row 10 is the null class
    assert not torch.allclose(table[10], table[:10]), (
        "null row equals a class row: the test would be blind"
    )
    torch.testing.assert_close(seen[0], table[torch.where(noise.drop, 10, y)], rtol=0, atol=0)


def test_train_step_drops_labels_at_the_class_dropout_flag():
    rows = 4096  # one token per image (16 px, SiT-T/2): a large batch costs little
    run, config, align, batch = tiny_run(
        "--align", "none", "--class-dropout", "0.25", batch_size=rows, resolution=16
    )
    # before the step changes it
    null = run.model.y_embedder.embedding_table.weight[10].detach().clone()
    seen = []
    run.model.y_embedder.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    train.train_step(run, config, align, batch, 0, slice(0, rows))
    # a class row equals the null row with p ~ 0
    dropped = (seen[0] == null).all(dim=1).float().mean().item()
    # 0.034, far from 0.1 (the default) and 0
    assert abs(dropped - 0.25) <= 5 * math.sqrt(0.25 * 0.75 / rows)


# ----------------------------------------------------------------------------------------------
# 3. The discriminator calls encoder tokens real and projector tokens fake; L_adv pulls toward real


def smooth_and_rough_tokens(b=8, d=32, seed=1):
    """Encoder-like tokens z (spatially smooth maps) and projector-like tokens h (i.i.d.),
    (B, 16, D) each."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(b, d, 2, 2, generator=g)
    z_map = F.interpolate(coarse, size=(4, 4), mode="bilinear", align_corners=True)  # (B, D, 4, 4)
    # (B, 16, D)
    z = (z_map + 0.1 * torch.randn(z_map.shape, generator=g)).flatten(2).transpose(1, 2)
    return z, torch.randn(b, 16, d, generator=g)


def test_discriminator_step_learns_encoder_real_projector_fake_and_adv_pulls_toward_real():
    z, h0 = smooth_and_rough_tokens()
    torch.manual_seed(0)
    disc, disc_opt = build_discriminator(32)
    for _ in range(30):
        loss, _ = L.discriminator_step_loss(disc, z, h0)
        disc_opt.zero_grad()
        loss.backward()
        disc_opt.step()
    with torch.no_grad():
        # (B,) logits, D as the generator sees it (one joint batch, the default treatment)
        real, fake = L.discriminate(disc, z, h0)
    assert real.min() > 0.5 and fake.max() < -0.5, (real, fake)
    disc_opt.zero_grad(set_to_none=True)

    # One generator step on the projector tokens alone, through training_losses' adversarial term.
    h = h0.clone().requires_grad_(True)

    def model(x, t, y, drop=None):
        """A stand-in SiT whose projector output is the leaf h."""
        return SiTOutput(torch.ones_like(x), [h], None)

    x0 = torch.randn(8, 4, 2, 2)
    align = L.align_config("none", adv_weight=1.0)
    noise = L.draw_noise(8, x0.shape[1:], align, 0.0, generator=torch.Generator().manual_seed(3))
    out = L.training_losses(model, x0, torch.zeros(8, dtype=torch.long), [z], align, noise, disc)
    out.terms["adv"].backward()
    assert all(p.grad is None or not p.grad.any() for p in disc.parameters())  # D is fixed here
    with torch.no_grad():
        moved = L.discriminate(disc, z, h0 - 50.0 * h.grad)[1]  # (B,) one SGD step
    # D's verdict on every moved sample rises toward its verdict on the encoder's tokens
    # (by 0.25 to 1.3 here).
    assert (moved - fake).min() > 0.1 and moved.max() < real.min(), (moved, fake)


def test_train_step_trains_the_discriminator_on_encoder_real_projector_fake():
    # 4 x 4 token maps; a D learning rate above the paper's, so six steps separate them by
    # a wide margin.
    run, config, align, batch = tiny_run(
        "--align", "sara", "--disc-every", "1", "--disc-lr", "1e-3", resolution=64
    )
    images, _, labels = batch
    for step in range(6):
        train.train_step(run, config, align, batch, step, slice(0, 8))
    with torch.no_grad():
        z = run.encoders[0](images)  # (B, N, D)
        x0 = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        noise = L.draw_noise(
            8, x0.shape[1:], align, 0.0, generator=torch.Generator().manual_seed(6)
        )
        h = L.training_losses(run.model, x0, labels, [z], align, noise, run.disc).h_dens[0]
        real, fake = L.discriminate(run.disc, z, h, align.disc_bn)
    assert real.min() > 0.3 and fake.max() < -0.3, (real, fake)  # on a fresh noise draw too


def disc_state(disc):
    """Copies of D's parameters and BatchNorm buffers (running statistics, num_batches_tracked)."""
    return {k: v.detach().clone() for k, v in disc.state_dict().items()}


def changed(before, after, buffers):
    """The names among D's parameters (buffers=False) or buffers (True) whose values moved."""
    return {k for k in before if (k.split(".")[-1].startswith(("running", "num_batches")))
            == buffers and not torch.equal(before[k], after[k])}


def test_train_step_steps_the_discriminator_on_its_schedule_only():
    run, config, align, batch = tiny_run("--align", "sara", "--disc-every", "3")
    weights = {k for k, _ in run.disc.named_parameters()}
    for step in range(7):
        before = disc_state(run.disc)
        record = train.train_step(run, config, align, batch, step, slice(0, 8))
        moved = changed(before, disc_state(run.disc), buffers=False)
        assert moved == (weights if step % 3 == 0 else set()), step
        assert ("disc_loss" in record) == (step % 3 == 0)
    # ceil(7 / 3) = 3 Adam steps (0, 3, 6) on every parameter
    assert {int(s["step"]) for s in run.disc_opt.state_dict()["state"].values()} == {3}


# (D's training flag, BatchNorm updates per D step, rows D sees in the generator's pass of B = 8)
DISC_BN_STATE = {"joint": (True, 1, 16), "separate": (True, 2, 8), "eval": (False, 0, 16)}


@pytest.mark.parametrize("bn", L.DISC_BN)
def test_train_step_keeps_d_in_its_batchnorm_treatments_mode_and_statistics(bn):
    """The generator's pass leaves D's statistics alone; D's step records them as its treatment
    says; the adversarial term's logits are D's, evaluated in the treatment's mode."""
    training, updates, rows = DISC_BN_STATE[bn]
    run, config, align, batch = tiny_run("--align", "sara", "--disc-every", "2", "--disc-bn", bn)
    calls = []
    run.disc.register_forward_hook(lambda m, args, out: calls.append((m.training, args[0], out)))
    nbt = [k for k in run.disc.state_dict() if k.endswith("num_batches_tracked")]
    for step in (1, 2):  # a generator step alone, then one with D's step
        before, reference = disc_state(run.disc), copy.deepcopy(run.disc).train(training)
        calls.clear()
        record = train.train_step(run, config, align, batch, step, slice(0, 8))
        after = disc_state(run.disc)
        assert run.disc.training == training and {c[0] for c in calls} == {training}
        (mode, x, logits), *_ = calls  # the generator's pass comes first
        z = L.tokens_to_map(run.encoders[0](batch[0]))  # (B, D, s, s) the encoder's tokens
        assert len(x) == rows and (rows == 8 or torch.equal(x[:8], z))  # joint: real rows first
        with torch.no_grad():
            torch.testing.assert_close(logits, reference(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(record["adv"], L.generator_adv_loss(logits[-8:]))
        d_step = step == 2
        assert changed(before, after, buffers=True) == (set(before) - set(dict(
            run.disc.named_parameters())) if d_step and updates else set()), step
        assert all(int(after[k] - before[k]) == updates * d_step for k in nbt), step


def test_default_disc_batchnorm_is_joint():
    """The measured choice (tests/test_discriminator.py, README): one joint batch per D step."""
    config = train.resolve_config(train.parse_args(["--align", "sara"]))
    assert L.AlignConfig().disc_bn == config["align_config"]["disc_bn"] == "joint"


# ----------------------------------------------------------------------------------------------
# 4. EMA: ema <- decay * ema + (1 - decay) * model


def test_update_ema_closed_form():
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        ema.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 5.0]]))
        ema.bias.copy_(torch.tensor([4.0, -8.0]))
        model.weight.copy_(torch.tensor([[9.0, -6.0, 3.0], [7.0, 4.0, -3.0]]))
        model.bias.copy_(torch.tensor([0.0, 8.0]))
    e0, m0 = [p.clone() for p in ema.parameters()], [p.clone() for p in model.parameters()]
    train.update_ema(ema, model, 0.75)  # 0.75 and 0.25: exact in binary, and far apart
    for e, a, m, p in zip(ema.parameters(), e0, m0, model.parameters()):
        torch.testing.assert_close(e.data, 0.75 * a + 0.25 * m, rtol=0, atol=1e-6)
        assert torch.equal(p, m)  # the model is read, never written
    train.update_ema(ema, model, 0.75)  # a second update: m + 0.75^2 (e0 - m)
    torch.testing.assert_close(ema.weight.data, m0[0] + 0.5625 * (e0[0] - m0[0]), rtol=0, atol=1e-6)


def test_train_step_updates_the_ema_with_the_ema_decay_flag():
    run, config, align, batch = tiny_run("--align", "none", "--ema-decay", "0.75", "--lr", "1e-2")
    # starts as a copy
    assert all(torch.equal(e, p) for e, p in zip(run.ema.parameters(), run.model.parameters()))
    g = torch.Generator().manual_seed(7)
    # an EMA away from the weights, so decay and 1 - decay give different results everywhere
    with torch.no_grad():
        for e in run.ema.parameters():
            e.add_(0.1 * torch.randn(e.shape, generator=g))
    ema_before = [e.clone() for e in run.ema.parameters()]
    model_before = run.model.final_layer.linear.weight.detach().clone()
    record = train.train_step(run, config, align, batch, 0, slice(0, 8))
    assert record["bad_steps"] == 0 and not torch.equal(
        run.model.final_layer.linear.weight, model_before
    )
    for e, a, p in zip(run.ema.parameters(), ema_before, run.model.parameters()):
        torch.testing.assert_close(e, 0.75 * a + 0.25 * p.detach(), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 5. Every paper default, against the papers' numbers


# Every weight of every alignment preset: lambda 0.5 (REPA's --proj-coeff; SARA Table 4), beta 0.5
# and gamma 0.05 (SARA Table 4), SRA^2 lambda 1.0 (SRA^2 section 4.2), SRA's 0.2 (its train.py);
# 0 for a term the preset does not use.
WEIGHTS = ("patch_weight", "struc_weight", "adv_weight", "sra_weight", "self_weight")
PRESET_WEIGHTS = {
    "none": (0.0, 0.0, 0.0, 0.0, 0.0),
    "repa": (0.5, 0.0, 0.0, 0.0, 0.0),
    "sara": (0.5, 0.5, 0.05, 0.0, 0.0),
    "sra": (0.0, 0.0, 0.0, 0.0, 0.2),  # SRA's train.py: 2 x 0.1 (before epoch 150) at 256 px
    "sra2": (0.0, 0.0, 0.0, 1.0, 0.0),
    "repa+sra2": (0.5, 0.0, 0.0, 1.0, 0.0),  # SRA^2 Table 2
    "sara+sra2": (0.5, 0.5, 0.05, 1.0, 0.0),
}

# (alignment preset, model, flag, expected value, where the number comes from)
PAPER_DEFAULTS = [
    *[
        (align, "SiT-XL/2", flag, w, "SARA Table 4 / SRA^2 section 4.2")
        for align, ws in PRESET_WEIGHTS.items()
        for flag, w in zip(WEIGHTS, ws)
    ],
    ("sra2", "SiT-XL/2", "sra_beta", 0.05, "SRA^2 eq. (7): beta 0.05 in all experiments"),
    ("sara+sra2", "SiT-XL/2", "sra_beta", 0.05, "SRA^2 eq. (7)"),
    ("sara", "SiT-B/2", "encoder_depth", 4, "SARA Table 4: alignment depth 4 for SiT-B"),
    ("sara", "SiT-L/2", "encoder_depth", 8, "SARA Table 4: alignment depth 8 for SiT-L"),
    ("sara", "SiT-XL/2", "encoder_depth", 8, "SARA Table 4: alignment depth 8 for SiT-XL"),
    ("sra2", "SiT-B/2", "sra_depth", 2, "SRA^2 section 4.2: layer 2 for B"),
    ("sra2", "SiT-L/2", "sra_depth", 8, "SRA^2 section 4.2: layer 8 for L"),
    ("sra2", "SiT-XL/2", "sra_depth", 8, "SRA^2 section 4.2: layer 8 for XL"),
    ("sra2", "SiT-B/2", "sra_mlp_layers", 5, "SRA^2 Table 1: 5-layer MLP"),
    ("sra", "SiT-XL/2", "self_depth", 8, "SRA's README: --block-out-s 8 for SiT-XL/2"),
    ("sra", "SiT-XL/2", "self_teacher_depth", 20, "SRA's README: --block-out-t 20 for SiT-XL/2"),
    ("sra", "SiT-B/2", "self_depth", 4, "SRA's train.py default --block-out-s 4"),
    ("sra", "SiT-B/2", "self_teacher_depth", 8, "SRA's train.py default --block-out-t 8"),
    ("sra", "SiT-XL/2", "self_t_max", 0.2, "SRA's README: --t-max 0.2"),
    (
        "sara", "SiT-XL/2", "disc_every", 5,
        "SARA appendix A: one D update per five generator updates",
    ),
    ("sara", "SiT-XL/2", "disc_pretrained", 1, "SARA appendix A: pretrained ResNet-18"),
    ("sara", "SiT-XL/2", "disc_lr", 2e-4, "not in the paper: our choice, DCGAN's Adam"),
    ("sara", "SiT-XL/2", "disc_betas", (0.5, 0.999), "not in the paper: our choice, DCGAN's Adam"),
    ("sara", "SiT-XL/2", "lr", 1e-4, "SARA Table 4 / appendix A: AdamW lr 1e-4"),
    ("sara", "SiT-XL/2", "adam_betas", (0.9, 0.999), "SARA Table 4: (beta1, beta2)"),
    ("sara", "SiT-XL/2", "weight_decay", 0.0, "SARA appendix A: no weight decay"),
    ("sara", "SiT-XL/2", "batch_size", 256, "SARA Table 4"),
    ("sara", "SiT-XL/2", "ema_decay", 0.9999, "REPA's train.py (SARA follows REPA's setup)"),
    ("sara", "SiT-XL/2", "class_dropout", 0.1, "REPA's train.py --cfg-prob"),
    ("sara", "SiT-XL/2", "max_grad_norm", 1.0, "REPA's train.py --max-grad-norm"),
    ("sara", "SiT-XL/2", "sample_steps", 250, "SARA section 4.1: SDE Euler-Maruyama, NFE 250"),
    ("sara", "SiT-XL/2", "path_type", "linear", "SARA Table 4: alpha_t = 1 - t, sigma_t = t"),
]


def resolved_value(config, flag):
    """A flag's value in train.py's resolved config (alignment options live in
    config['align_config'])."""
    value = config["align_config"][flag] if flag in config["align_config"] else config[flag]
    return tuple(value) if isinstance(value, list) else value


@pytest.mark.parametrize("align,model,flag,expected,source", PAPER_DEFAULTS, ids=lambda v: str(v))
def test_paper_defaults(align, model, flag, expected, source):
    config = train.resolve_config(
        train.parse_args(["--preset", "imagenet256", "--align", align, "--model", model])
    )
    assert resolved_value(config, flag) == expected, source


def test_every_alignment_preset_has_its_weights_pinned():
    assert set(PRESET_WEIGHTS) == set(L.ALIGN_PRESETS)


@pytest.mark.parametrize("size,depth,hidden,heads",
                         [("B", 12, 768, 12), ("L", 24, 1024, 16), ("XL", 28, 1152, 16)])
def test_sit_sizes_match_sara_table_4(size, depth, hidden, heads):
    config = size_config(f"SiT-{size}/2")
    assert (config["depth"], config["hidden_size"], config["num_heads"]) == (depth, hidden, heads)


def test_sampler_defaults_match_the_papers():
    args = sample.parse_args(["--ckpt", "x.pt"])
    # SARA section 4.1 and SRA^2 section 4.1: SDE Euler-Maruyama with 250 steps, no
    # guidance unless asked.
    assert (args.mode, args.num_steps, args.cfg, args.guidance_low, args.guidance_high) == (
        "sde", 250, 1.0, 0.0, 1.0,
    )


def test_built_optimizers_use_the_paper_settings():
    run, *_ = tiny_run("--align", "sara")
    (group,) = run.opt.param_groups
    assert isinstance(run.opt, torch.optim.AdamW)
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (1e-4, (0.9, 0.999), 0.0)
    (group,) = run.disc_opt.param_groups
    assert type(run.disc_opt) is torch.optim.Adam and (group["lr"], tuple(group["betas"])) == (
        2e-4,
        (0.5, 0.999),
    )
    assert run.model.y_embedder.dropout_prob == 0.1


# ----------------------------------------------------------------------------------------------
# 6. The guidance interval includes its upper edge: with [0, 1] the first step, at t = 1, is guided


def test_default_guidance_interval_guides_the_first_step_at_t_1():
    model = tiny_sit().eval()
    g = torch.Generator().manual_seed(4)
    x, y, cfg = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([1, 7, 3]), 2.5
    t1 = torch.ones(3)
    with torch.no_grad():
        v = sample.guided_velocity(model, y, cfg)(x.double(), 1.0)  # the default interval [0, 1]
        v_cond = model(x, t1, y, align=False).v.double()
        v_uncond = model(x, t1, torch.full_like(y, 10), align=False).v.double()
    assert (v_cond - v_uncond).abs().max() > 1e-2  # the label matters, so guidance is visible
    torch.testing.assert_close(v, v_uncond + cfg * (v_cond - v_uncond), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["sde", "ode", "heun"])
def test_default_guidance_interval_guides_every_step(sampler):
    batches = []

    class Recorder(torch.nn.Module):
        """A stand-in SiT that records the batch size and time of every forward."""

        def null_condition(self, y):
            return torch.full_like(y, 10)

        def forward(self, x, t, y, align):
            batches.append((round(t[0].item(), 6), len(x)))
            return (0.1 * x,)

    velocity = sample.guided_velocity(Recorder(), torch.tensor([3, 4]), cfg=1.5)
    x = torch.randn(2, 4, 2, 2)
    if sampler == "sde":
        sample.euler_maruyama(velocity, x, num_steps=4)
    else:
        sample.euler_ode(velocity, x, num_steps=4, heun=sampler == "heun")
    assert batches[0] == (1.0, 4)  # t = 1: conditional and null halves in one forward
    assert all(b == 4 for _, b in batches), batches


# ----------------------------------------------------------------------------------------------
# 7. Encoder tokens and x0 are targets: no term sends them a gradient, whatever the caller passes


@pytest.mark.parametrize("preset,term", [("none", "velocity"), ("repa", "patch"), ("none", "struc"),
                                         ("none", "adv"), ("sra2", "sra"), ("sara+sra2", "total")])
def test_no_gradient_reaches_encoder_tokens_or_x0(preset, term):
    model = tiny_sit()
    torch.manual_seed(1)
    disc, _ = build_discriminator(32)
    g = torch.Generator().manual_seed(2)
    # e.g. from a VAE being fine-tuned
    x0 = torch.randn(4, 4, 8, 8, generator=g).requires_grad_(True)
    # e.g. from an encoder not under no_grad
    z = torch.randn(4, 16, 32, generator=g).requires_grad_(True)
    align = L.align_config(preset, **({f"{term}_weight": 1.0} if term in ("struc", "adv") else {}))
    out = L.training_losses(
        model, x0, torch.arange(4),
        [z],
        align, L.draw_noise(4, x0.shape[1:], align, 0.1, generator=g), disc,
    )
    loss = out.total if term == "total" else out.terms[term]
    loss.backward()
    assert x0.grad is None or not x0.grad.any()
    assert z.grad is None or not z.grad.any()
    # the term did train the model
    assert any(p.grad is not None and p.grad.any() for p in model.parameters())


def test_no_gradient_reaches_the_targets_of_each_term_function():
    """The per-term functions detach their targets themselves, for callers other than
    training_losses."""
    g = torch.Generator().manual_seed(0)
    z, x0 = (
        torch.randn(2, 16, 8, generator=g).requires_grad_(True),
        torch.randn(2, 4, 4, 4, generator=g).requires_grad_(True),
    )
    h, pred = (
        torch.randn(2, 16, 8, generator=g).requires_grad_(True),
        torch.randn(2, 4, 4, 4, generator=g).requires_grad_(True),
    )
    (L.patch_loss([z], [h]) + L.struc_loss(z, h) + L.sra_loss(pred, x0)).backward()
    assert z.grad is None and x0.grad is None
    assert h.grad.any() and pred.grad.any()


def test_discriminator_step_sends_no_gradient_to_its_inputs():
    z, h = smooth_and_rough_tokens(b=4)
    z, h = z.requires_grad_(True), h.requires_grad_(True)
    torch.manual_seed(0)
    disc, _ = build_discriminator(32)
    loss, _ = L.discriminator_step_loss(disc, z, h)
    loss.backward()
    assert z.grad is None and h.grad is None
    assert disc.conv1.weight.grad.any()


# ----------------------------------------------------------------------------------------------
# 8. Alignment that ends (--align-until, HASTE): from that step no term, no encoder, no D step


def test_align_until_turns_every_alignment_term_and_its_compute_off_from_its_step():
    run, config, align, batch = tiny_run("--align", "sara+sra2", "--disc-every", "1",
                                         "--align-until", "3")
    calls = {"encoder": 0, "disc": 0}
    run.encoders[0].register_forward_hook(lambda *_: calls.__setitem__("encoder",
                                                                       calls["encoder"] + 1))
    run.disc.register_forward_hook(lambda *_: calls.__setitem__("disc", calls["disc"] + 1))
    heads = {k for k, _ in run.model.named_parameters() if k.startswith(("projectors", "sra_"))}
    assert heads and any(k.startswith("sra_") for k in heads)
    for step in range(5):
        calls.update(encoder=0, disc=0)
        before = disc_state(run.disc) | {k: v.detach().clone()
                                         for k, v in run.model.named_parameters() if k in heads}
        record = train.train_step(run, config, align, batch, step, slice(0, 8))
        aligned = step < 3
        terms = {"patch", "struc", "adv", "sra", "disc_loss", "disc_acc"}
        assert (terms <= set(record)) if aligned else not terms & set(record), (step, record)
        # one encoder forward; the generator's pass through D and D's own step
        assert calls == ({"encoder": 1, "disc": 2} if aligned else {"encoder": 0, "disc": 0})
        after = disc_state(run.disc) | dict(run.model.named_parameters())
        still = {k for k in before if torch.equal(before[k], after[k])}
        assert not (set(before) - still if not aligned else still & heads), step
    assert {int(s["step"]) for s in run.disc_opt.state_dict()["state"].values()} == {3}
