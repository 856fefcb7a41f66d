"""Every training loss of the REPA / SARA / SRA / SRA^2 family: small pure functions plus one
combiner.

Conventions (REPA's loss.py): t=0 is data and t=1 is noise, x_t = alpha_t x0 + sigma_t eps, and the
model predicts the velocity d/dt x_t (eps - x0 on the linear path). The official SiT code runs time
the other way (t=1 data); REPA, SARA, SRA and SRA^2 all use this direction.
Equation numbers: "SARA (n)" is eq. (n) of SARA (arXiv 2503.08253), "SRA2 (n)" of SRA^2
(arXiv 2601.17830). SRA (arXiv 2505.02831) is cited by its terms' names (L_SRA); its details
(schedule, interval, head) follow its official code, with which the paper's results were made.
"""

import contextlib
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Interpolant, time sampling, denoising loss


def interpolant(t, path="linear"):
    """(alpha_t, sigma_t, d alpha_t/dt, d sigma_t/dt) of the linear or cosine (GVP) path."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path == "cosine":
        a = t * math.pi / 2
        return torch.cos(a), torch.sin(a), -math.pi / 2 * torch.sin(a), math.pi / 2 * torch.cos(a)
    raise ValueError(f"unknown path {path!r}; choose linear or cosine")


def sample_time(n, weighting="uniform", path="linear", device="cpu", generator=None):
    """n training times in (0, 1): uniform, or REPA's 'lognormal' (EDM sigma = exp(N(0,1)))."""
    if weighting == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if weighting == "lognormal":
        sigma = torch.randn(n, device=device, generator=generator).exp()
        # The time at which the path's noise-to-signal ratio sigma_t / alpha_t equals sigma.
        return sigma / (1 + sigma) if path == "linear" else 2 / math.pi * torch.atan(sigma)
    raise ValueError(f"unknown time weighting {weighting!r}; choose uniform or lognormal")


def velocity_loss(v_pred, v_target):
    """L_velocity: mean over every element of (f(x_t, t, y) - v)^2 (SARA (2), SRA2 L_phi)."""
    return (v_pred.float() - v_target.float()).square().mean()


# ----------------------------------------------------------------------------------------------
# Representation alignment to an external encoder (REPA, SARA)


def patch_loss(z_encs, h_dens):
    """L_patch, SARA (6) = REPA: minus the mean token-wise cosine similarity over encoders, batch,
    tokens."""
    # REPA averages per-sample token means over the batch and encoders: equal to this flat mean.
    cos = [
        F.cosine_similarity(z.detach().float(), h.float(), dim=-1).mean()
        for z, h in zip(z_encs, h_dens, strict=True)
    ]
    return -torch.stack(cos).mean()


def autocorrelation(h):
    """A(h), SARA (7): cosine similarity between every pair of one image's tokens, (B, N, D) ->
    (B, N, N)."""
    h = F.normalize(h.float(), dim=-1)  # (B, N, D)
    return h @ h.transpose(1, 2)  # (B, N, N)


def struc_loss(z_enc, h_den, reduction="mean"):
    """L_struc, SARA (8): ||A(z_enc) - A(h_den)||_F^2, averaged over the batch.

    reduction='mean' also divides by the N*N entries (our reading, see the README: the literal sum
    is N^2 = 65,536 times larger at 256 tokens and would swamp the other terms at beta = 0.5).
    """
    # (B, N, N); encoder side fixed
    sq = (autocorrelation(z_enc.detach()) - autocorrelation(h_den)).square()
    if reduction == "mean":
        return sq.mean()
    if reduction == "sum":
        return sq.sum(dim=(1, 2)).mean()
    raise ValueError(f"unknown struc reduction {reduction!r}; choose mean or sum")


def tokens_to_map(h):
    """Tokens (B, N, D) in row-major order -> feature map (B, D, sqrt N, sqrt N) for the
    discriminator."""
    b, n, d = h.shape
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"{n} tokens do not form a square map")
    return h.transpose(1, 2).reshape(b, d, s, s)


def discriminator_loss(real_logits, fake_logits):
    """L_D, SARA (9): -E[log D(z_enc)] - E[log(1 - D(h_den))], as BCE with logits."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def generator_adv_loss(fake_logits):
    """L_adv, SARA (10), non-saturating: -E[log D(h_den)], as BCE with logits."""
    return F.softplus(-fake_logits.float()).mean()


@contextlib.contextmanager
def frozen(module):
    """Let gradients flow through module to its inputs while the module stays as it is: its
    parameters collect no gradient and its BatchNorm layers record no running statistics (in
    training mode they still normalise with the batch's own)."""
    flags = [p.requires_grad for p in module.parameters()]
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    module.requires_grad_(False)
    for m in norms:
        m.track_running_stats = False
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)
        for m in norms:
            m.track_running_stats = True


# How D's BatchNorm sees the two sides (our choice, see the README; SARA says nothing about it):
# joint: one forward of cat([real, fake]), so a shift of mean or scale between the sides survives
# the normalisation; separate: real and fake each normalised by its own batch statistics, blind to
# such a shift; eval: the running statistics, never updated (BatchNorm as a fixed affine map).
DISC_BN = ("joint", "separate", "eval")


def discriminate(disc, z_enc, h_den, bn="joint"):
    """D's logits on encoder tokens (real) and projector tokens (fake), each (B, N, D) -> (B,),
    normalised as the BatchNorm treatment bn says (D is put in the mode it names)."""
    if bn not in DISC_BN:
        raise ValueError(f"unknown discriminator BatchNorm treatment {bn!r}; choose one of "
                         f"{', '.join(DISC_BN)}")
    disc.train(bn != "eval")
    real, fake = tokens_to_map(z_enc), tokens_to_map(h_den)  # (B, D, s, s)
    if bn == "separate":
        return disc(real), disc(fake)
    both = disc(torch.cat([real, fake]))  # (2B,) one batch, one set of statistics
    return both[: len(real)], both[len(real):]


def discriminator_step_loss(disc, z_enc, h_den, bn="joint"):
    """L_D (SARA (9)) on one batch plus D's accuracy; the denoiser side is detached (D's step only).
    """
    real, fake = discriminate(disc, z_enc.detach(), h_den.detach(), bn)  # encoder: positives
    acc = torch.cat([real > 0, fake < 0]).float().mean()
    return discriminator_loss(real, fake), acc


def generator_adv_logits(disc, z_enc, h_den, bn="joint"):
    """D's logits (B,) on the projector tokens for L_adv, D fixed (frozen) and the real side
    detached: as in D's own step, joint shares one batch's statistics with the real tokens."""
    with frozen(disc):
        if bn == "separate":  # the fake batch alone
            disc.train()
            return disc(tokens_to_map(h_den))
        return discriminate(disc, z_enc.detach(), h_den, bn)[1]


# ----------------------------------------------------------------------------------------------
# Self-representation alignment to the VAE latent (SRA^2)


def sra_loss(x0_hat, x0, t=None, objective="smooth_l1", beta=0.05, t_range=(0.0, 1.0)):
    """L_align, SRA2 (7): head prediction vs the clean scaled latent x0 (detached), zero outside
    t_range.

    smooth_l1 (beta 0.05, the paper's), l1, l2 (mean reductions, as the authors' SRA code) or
    cosine (1 - cos over the channels at each latent position).
    """
    # SRA2 (7) as printed is discontinuous at |df| = beta (its linear branch is |df|/beta - 1/2);
    # we use torch's smooth_l1 (0.5 df^2 / beta, else |df| - beta / 2), whose quadratic branch it
    # shares.
    x0_hat, x0 = x0_hat.float(), x0.detach().float()
    if objective == "smooth_l1":
        per = F.smooth_l1_loss(x0_hat, x0, beta=beta, reduction="none")  # (B, C, H, W)
    elif objective == "l1":
        per = (x0_hat - x0).abs()
    elif objective == "l2":
        per = (x0_hat - x0).square()
    elif objective == "cosine":
        per = 1 - F.cosine_similarity(x0_hat, x0, dim=1)  # (B, H, W)
    else:
        raise ValueError(
            f"unknown SRA^2 objective {objective!r}; choose smooth_l1, l1, l2 or cosine"
        )
    per_sample = per.flatten(1).mean(dim=1)  # (B,)
    if t is not None and tuple(t_range) != (0.0, 1.0):
        # SRA2 Table 1 timestep ablation
        per_sample = per_sample * ((t >= t_range[0]) & (t <= t_range[1])).float()
    return per_sample.mean()


# ----------------------------------------------------------------------------------------------
# Self-representation alignment to the model's own EMA (SRA)


def self_loss(h_student, h_teacher, beta=0.05):
    """L_SRA of SRA: the student head's tokens at block s and time t vs the EMA teacher's raw
    tokens at a later block and a lower noise level (detached), both (B, N, H); smooth-L1 with
    beta 0.05, mean over every element (SRA's code, as the paper's results were made)."""
    return F.smooth_l1_loss(h_student.float(), h_teacher.detach().float(), beta=beta)


def teacher_time(t, dt, t_max):
    """The teacher's time t - t_max * dt, clamped to [0, 1] (SRA's dynamic interval, dt ~ U(0, 1)):
    never noisier than the student's."""
    return (t - t_max * dt).clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# The combiner: SARA (11) / SRA2 (8)


@dataclass(frozen=True)
class AlignConfig:
    """Weights and options of every term; a weight of 0 switches its term (and its compute) off."""

    patch_weight: float = 0.0  # lambda, SARA (11) / REPA
    struc_weight: float = 0.0  # beta, SARA (11)
    adv_weight: float = 0.0  # gamma, SARA (11)
    sra_weight: float = 0.0  # lambda of SRA2 (8)
    struc_reduction: str = "mean"
    sra_objective: str = "smooth_l1"
    sra_beta: float = 0.05  # smooth-L1 beta, SRA2 (7)
    sra_t_range: tuple = (0.0, 1.0)  # SRA^2 applies for t in [lo, hi] (SRA2 Table 1 ablation)
    self_weight: float = 0.0  # SRA's lambda (at_epoch applies its schedule)
    self_teacher_depth: int = 0  # the EMA teacher's tap block (the student's is the model's)
    self_t_max: float = 0.0  # the teacher's time is t - U(0, t_max) (SRA's dynamic interval)
    disc_bn: str = "joint"  # D's BatchNorm treatment, one of DISC_BN
    path_type: str = "linear"
    weighting: str = "uniform"

    @property
    def needs_encoder(self):
        """Whether any term compares against an external encoder's tokens."""
        return bool(self.patch_weight or self.struc_weight or self.adv_weight)


# The papers' weights: SARA Table 4 (lambda, beta, gamma), SRA^2 section 4 (lambda = 1) and SRA's
# code (2 x 0.1 at 256 px; the self_* options are SRA's, the sra_* ones SRA^2's).
ALIGN_PRESETS = {
    "none":      dict(),
    "repa":      dict(patch_weight=0.5),
    "sara":      dict(patch_weight=0.5, struc_weight=0.5, adv_weight=0.05),
    "sra":       dict(self_weight=0.2, self_t_max=0.2),
    "sra2":      dict(sra_weight=1.0),
    "repa+sra2": dict(patch_weight=0.5, sra_weight=1.0),
    "sara+sra2": dict(patch_weight=0.5, struc_weight=0.5, adv_weight=0.05, sra_weight=1.0),
}


def align_config(preset, **overrides):
    """AlignConfig of a named preset with per-term overrides (None means keep the preset's value).
    """
    if preset not in ALIGN_PRESETS:
        raise ValueError(f"unknown alignment preset {preset!r}; choose one of "
                         f"{', '.join(ALIGN_PRESETS)}")
    names = {f.name for f in fields(AlignConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown alignment options {sorted(unknown)}")
    overrides = {
        k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None
    }
    return replace(AlignConfig(**ALIGN_PRESETS[preset]), **overrides)


def at_epoch(align, epoch):
    """align at this epoch of the data, under SRA's weight schedule (its train.py at 256 px):
    self_weight up to epoch 149, then x 0.1 per 1000 epochs (the smooth-L1 term grows in training;
    this keeps it at the velocity loss's scale)."""
    return replace(align, self_weight=align.self_weight * 0.1 ** (max(epoch - 149, 0) / 1000))


@dataclass
class Noise:
    """Every random draw of one training step, made outside the model so it can be sliced per rank.
    """

    t: torch.Tensor  # (B,) times
    eps: torch.Tensor  # (B, C, H, W) Gaussian noise of the interpolant
    drop: torch.Tensor  # (B,) bool, labels replaced by the null class (classifier-free guidance)
    dt: torch.Tensor | None = None  # (B,) U(0, 1): the SRA teacher's time offset, in t_max units

    def __getitem__(self, sl):
        """The draws of a slice of the batch (one rank's share of the global batch)."""
        return Noise(self.t[sl], self.eps[sl], self.drop[sl],
                     None if self.dt is None else self.dt[sl])


def draw_noise(n, shape, align, label_dropout, device="cpu", generator=None):
    """Time, interpolant noise and label dropout (and SRA's teacher offset, only when its term is
    on, so that the other runs' draws stay as they were) for n samples of latent shape (C, H, W)."""
    t = sample_time(n, align.weighting, align.path_type, device, generator)  # (n,)
    eps = torch.randn((n, *shape), device=device, generator=generator)  # (n, C, H, W)
    drop = torch.rand(n, device=device, generator=generator) < label_dropout  # (n,)
    dt = torch.rand(n, device=device, generator=generator) if align.self_weight else None
    return Noise(t, eps, drop, dt)


@dataclass
class StepLosses:
    """One step's total loss, every component (for logging) and the denoiser's aligned tokens."""

    total: torch.Tensor
    terms: dict  # name -> scalar tensor, unweighted
    h_dens: list  # projector outputs per encoder (B, N, D_enc), for the discriminator's own step


def training_losses(model, x0, y, z_encs, align, noise, disc=None, teacher=None):
    """Total loss of one step, SARA (11) / SRA2 (8) and SRA's sum: L_vel + lam L_patch + beta
    L_struc + gamma L_adv + lam_sra L_align + lam_self L_SRA.

    x0 (B, C, H, W) scaled clean latents; z_encs per encoder (B, N, D) frozen tokens of the clean
    image; noise from draw_noise; disc the bare discriminator (its parameters get no gradient here);
    teacher the EMA of model (SRA's teacher, run without gradients).
    """
    t, eps = noise.t, noise.eps
    # data, not a parameter: no term (through x_t or a target) trains whatever produced it
    x0 = x0.detach()
    # (B, 1, 1, 1)
    alpha, sigma, d_alpha, d_sigma = (c.view(-1, 1, 1, 1) for c in interpolant(t, align.path_type))
    x_t = alpha * x0 + sigma * eps  # (B, C, H, W)
    out = model(x_t, t, y, drop=noise.drop)
    terms = {"velocity": velocity_loss(out.v, d_alpha * x0 + d_sigma * eps)}
    if align.needs_encoder and len(out.h_dens) != len(z_encs):
        raise ValueError(
            f"model has {len(out.h_dens)} projectors but {len(z_encs)} encoders were given"
        )
    if align.patch_weight:
        terms["patch"] = patch_loss(z_encs, out.h_dens)
    if align.struc_weight:
        terms["struc"] = torch.stack(
            [
                struc_loss(z, h, align.struc_reduction)
                for z, h in zip(z_encs, out.h_dens, strict=True)
            ]
        ).mean()
    if align.adv_weight:
        # one discriminator, on the first encoder's tokens (our choice, see the README)
        terms["adv"] = generator_adv_loss(
            generator_adv_logits(disc, z_encs[0], out.h_dens[0], align.disc_bn))
    if align.sra_weight:
        if out.x0_hat is None:
            raise ValueError("the SRA^2 term needs a model built with sra_depth > 0")
        terms["sra"] = sra_loss(
            out.x0_hat, x0, t, align.sra_objective, align.sra_beta, align.sra_t_range
        )
    if align.self_weight:
        if out.h_self is None or teacher is None:
            raise ValueError("the SRA term needs a model built with self_depth > 0 and a teacher")
        if align.self_teacher_depth < 1:
            raise ValueError("the SRA term needs self_teacher_depth >= 1: the teacher's tap block")
        # the same x0, eps and dropped labels at the teacher's lower noise level (SRA's code)
        t_teacher = teacher_time(t, noise.dt, align.self_t_max)  # (B,)
        a, s = (c.view(-1, 1, 1, 1) for c in interpolant(t_teacher, align.path_type)[:2])
        with torch.no_grad():
            h_teacher = teacher(a * x0 + s * eps, t_teacher, y, align=False, drop=noise.drop,
                                stop_at=align.self_teacher_depth)  # (B, N, H)
        terms["self"] = self_loss(out.h_self, h_teacher)
    weights = {
        "velocity": 1.0,
        "patch": align.patch_weight,
        "struc": align.struc_weight,
        "adv": align.adv_weight,
        "sra": align.sra_weight,
        "self": align.self_weight,
    }
    total = sum(weights[k] * v for k, v in terms.items())
    return StepLosses(total, terms, out.h_dens)

