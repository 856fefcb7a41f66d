"""What SARA's discriminator can see under each BatchNorm treatment (losses.DISC_BN).

Real and fake token maps differ by one thing only: (a) a per-channel mean shift, (b) a
per-channel scale, (c) spatial structure (token positions shuffled). D (random ResNet-18 trunk) is
trained alone for a fixed number of steps under each treatment and scored on fresh batches, the
way its own step sees them. The README's interpretations quote this table.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import losses as L
from discriminator import build_discriminator

CHANNELS, SIDE, BATCH, STEPS, LR = 8, 4, 16, 20, 1e-3
CASES = ("mean", "scale", "spatial")
_gen = torch.Generator().manual_seed(123)
SHIFT = 0.5 * torch.randn(CHANNELS, generator=_gen)  # (D,) per-channel mean shift
SCALE = torch.exp(0.5 * torch.randn(CHANNELS, generator=_gen))  # (D,) per-channel scale


def real_tokens(n, g):
    """Spatially smooth token maps (a 2x2 map upsampled, plus noise) as tokens (n, SIDE^2, D)."""
    coarse = torch.randn(n, CHANNELS, SIDE // 2, SIDE // 2, generator=g)
    smooth = F.interpolate(coarse, size=(SIDE, SIDE), mode="bilinear", align_corners=True)
    smooth = smooth + 0.3 * torch.randn(smooth.shape, generator=g)  # (n, D, SIDE, SIDE)
    return smooth.flatten(2).transpose(1, 2)  # (n, N, D)


def fake_tokens(case, n, g):
    """Fresh real-like tokens changed in one way only."""
    z = real_tokens(n, g)  # (n, N, D)
    if case == "mean":
        return z + SHIFT
    if case == "scale":
        return z * SCALE
    order = torch.argsort(torch.rand(n, SIDE * SIDE, generator=g), dim=1)  # (n, N) per sample
    return torch.gather(z, 1, order[..., None].expand_as(z))


@pytest.fixture(scope="module")
def accuracy():
    """D's held-out accuracy per (case, treatment) after STEPS steps from the same init."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny convolutions: threads only add overhead (5x on 2 cores)
    torch.manual_seed(0)
    init, _ = build_discriminator(CHANNELS)
    table = {}
    try:
        for case in CASES:
            for bn in L.DISC_BN:
                disc = copy.deepcopy(init)
                opt = torch.optim.Adam(disc.parameters(), lr=LR, betas=(0.5, 0.999))
                g = torch.Generator().manual_seed(1)
                for _ in range(STEPS):
                    loss, _ = L.discriminator_step_loss(
                        disc, real_tokens(BATCH, g), fake_tokens(case, BATCH, g), bn)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                with torch.no_grad(), L.frozen(disc):  # 256 held-out samples in one batch
                    table[case, bn] = L.discriminator_step_loss(
                        disc, real_tokens(128, g), fake_tokens(case, 128, g), bn)[1].item()
    finally:
        torch.set_num_threads(threads)
    print("\n".join(f"{c:8s}" + "".join(f" {bn} {table[c, bn]:.2f}" for bn in L.DISC_BN)
                    for c in CASES))
    return table


@pytest.mark.slow
def test_separate_batches_are_blind_to_a_mean_shift_joint_and_eval_see_it(accuracy):
    assert abs(accuracy["mean", "separate"] - 0.5) < 0.1, accuracy
    assert min(accuracy["mean", "joint"], accuracy["mean", "eval"]) > 0.65, accuracy


@pytest.mark.slow
def test_only_joint_statistics_learn_a_per_channel_scale_in_few_steps(accuracy):
    # separate sees it only through the 1x1 stem's channel mix; eval learns the scale slowly
    others = max(accuracy["scale", "separate"], accuracy["scale", "eval"])
    assert accuracy["scale", "joint"] > 0.68 and others < 0.65, accuracy


@pytest.mark.slow
def test_every_treatment_sees_spatial_structure(accuracy):
    assert min(accuracy["spatial", bn] for bn in L.DISC_BN) > 0.7, accuracy


def test_separate_batch_statistics_remove_a_mean_shift_and_a_uniform_scale_exactly():
    """The reason, in closed form: BN(conv1(x + c)) = BN(conv1(2 x)) = BN(conv1(x)) per batch."""
    torch.manual_seed(0)
    disc, _ = build_discriminator(CHANNELS)
    g = torch.Generator().manual_seed(2)
    z, h = real_tokens(BATCH, g), real_tokens(BATCH, g)  # (B, N, D)
    with torch.no_grad(), L.frozen(disc):
        real, fake = L.discriminate(disc, z, h, "separate")
        for moved in (h + SHIFT, 2 * h):
            assert torch.allclose(L.discriminate(disc, z, moved, "separate")[1], fake, atol=1e-4)
            # one joint batch keeps the gap: the fake logits move
            joint = L.discriminate(disc, z, moved, "joint")[1]
            assert (joint - L.discriminate(disc, z, h, "joint")[1]).abs().max() > 0.01
