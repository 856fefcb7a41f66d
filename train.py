"""Train SiT with REPA / SARA / SRA^2 representation alignment.

    torchrun --nproc_per_node=8 train.py --align sara --data-dir data/imagenet256   # SARA Table 4
    python train.py --preset smoke --align sara                                        # CPU, minutes

One process per GPU under torchrun (NCCL; gloo on CPU), one plain process otherwise. Re-running the
same command resumes from the newest checkpoint in the run folder and continues exactly.
"""

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import distributed
import fid
import losses
import sample
from atomic import write_atomic
from data import LatentImageDataset, SyntheticDataset
from discriminator import build_discriminator, is_disc_step
from encoders import TINY_RANDOM, load_encoders
from model import SiT, size_config
from sample import LATENT_RANGE, euler_maruyama, guided_velocity, tile
from vae import decode, load_vae, sample_latent, to_uint8

log = logging.getLogger("train")
SYNTHETIC = "synthetic"  # --data-dir value for the built-in procedural dataset

# ----------------------------------------------------------------------------------------------
# Run presets: the paper's ImageNet 256 recipe (SARA Table 4) and a CPU smoke run of the same code.

PRESETS = {
    "imagenet256": dict(model="SiT-XL/2", data_dir="data/imagenet256", enc_type="dinov2-vit-b", vae="ema",
                        batch_size=256, max_steps=400_000, ckpt_every=50_000, sample_every=10_000, log_every=100,
                        resolution=256, num_workers=8, precision="fp16", sample_steps=250, disc_pretrained=True),
    "smoke":       dict(model="SiT-T/2", data_dir=SYNTHETIC, enc_type=TINY_RANDOM, vae=TINY_RANDOM,
                        batch_size=8, max_steps=20, ckpt_every=10, sample_every=20, log_every=5,
                        resolution=64, num_workers=0, precision="fp32", sample_steps=10, disc_pretrained=False),
}
CHECKPOINTED = ("model", "ema", "opt", "scaler", "disc", "disc_opt", "disc_scaler")  # Run fields with state
# Flags that may change when a run is resumed; any other difference means another experiment.
RESUMABLE_CHANGES = {"max_steps", "ckpt_every", "sample_every", "log_every", "keep_ckpts", "num_workers",
                     "compile", "tf32", "max_bad_steps", "out", "data_dir", "world_size", "grad_checkpointing",
                     "vae", "sample_steps", "keep_every", "eval_every", "eval_ref", "eval_samples", "eval_cfg",
                     "eval_steps", "eval_weights"}


def fail(msg):
    """Stop with a one-line error (what was wrong and what to do), never a traceback."""
    raise SystemExit(f"train.py: error: {msg}")


@contextlib.contextmanager
def pretrained_or_fail(what):
    """Turn a failed download, a missing local file or an unknown name into a one-line error naming the flag."""
    try:
        yield
    except (OSError, RuntimeError, ValueError) as e:  # hub, URL and file errors are OSError / RuntimeError
        fail(f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


# ----------------------------------------------------------------------------------------------
# Configuration


def parse_args(argv=None):
    """Command line; every flag left unset takes its value from --preset."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", default="imagenet256", choices=list(PRESETS), help="run preset the other flags override")
    a("--align", default="sara", choices=list(losses.PRESETS), help="alignment preset (losses.PRESETS: the papers' weights)")
    a("--model", help="SiT size, e.g. SiT-XL/2, SiT-B/2 (T is a tiny test size)")
    a("--data-dir", help=f"REPA-layout folder (images/, vae-sd/) from prepare.py, or '{SYNTHETIC}'")
    a("--synthetic-images", type=int, default=256, help="number of images of the synthetic dataset")
    a("--synthetic-classes", type=int, default=10, help="number of classes of the synthetic dataset")
    a("--resolution", type=int, help="image resolution in pixels (latents are 8x smaller)")
    a("--enc-type", help="encoder(s) as REPA's --enc-type, comma-separated, e.g. dinov2-vit-b; or tiny-random")
    a("--enc-weights", help="local encoder checkpoint(s), comma-separated, instead of downloading")
    a("--vae", help="SD-VAE for sample grids: ema, mse, a hub id, a local folder, tiny-random, or none")
    # Optimisation (SARA Table 4)
    a("--batch-size", type=int, help="global batch size, split evenly over the ranks")
    a("--max-steps", type=int, help="total optimizer steps")
    a("--lr", type=float, default=1e-4, help="AdamW learning rate")
    a("--adam-betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    a("--ema-decay", type=float, default=0.9999, help="EMA decay per step")
    a("--class-dropout", type=float, default=0.1, help="label dropout for classifier-free guidance")
    a("--precision", choices=["fp16", "bf16", "fp32"], help="fp16 (with a GradScaler), bf16 or fp32")
    a("--max-bad-steps", type=int, default=50, help="stop after this many consecutive non-finite steps")
    a("--seed", type=int, default=0, help="global seed; every draw is a function of it and the step")
    # Model and alignment
    a("--encoder-depth", type=int, help="REPA/SARA tap block (default: 4 for S/B, 8 for L/XL)")
    a("--projector-dim", type=int, default=2048, help="REPA projector hidden width")
    a("--sra-depth", type=int, help="SRA^2 tap block (default: 2 for S/B, 8 for L/XL)")
    a("--sra-mlp-layers", type=int, default=5, help="SRA^2 head depth (SRA^2 Table 1: 2 or 5)")
    a("--sra-hidden-dim", type=int, help="SRA^2 head width (default 2 x hidden size)")
    a("--patch-weight", type=float, help="lambda of the patch term, SARA (6) (preset default 0.5)")
    a("--struc-weight", type=float, help="beta of the structural term, SARA (8) (preset default 0.5)")
    a("--adv-weight", type=float, help="gamma of the adversarial term, SARA (10) (preset default 0.05)")
    a("--sra-weight", type=float, help="lambda of the SRA^2 term, SRA^2 (8) (preset default 1.0)")
    a("--struc-reduction", choices=["mean", "sum"], help="SARA (8) reduction over the N x N entries")
    a("--sra-objective", choices=["smooth_l1", "l1", "l2", "cosine"], help="SRA^2 alignment objective")
    a("--sra-beta", type=float, help="smooth-L1 beta of SRA^2 (7) (default 0.05)")
    a("--sra-t-range", type=float, nargs=2, metavar=("LO", "HI"), help="apply SRA^2 only for t in [LO, HI]")
    a("--path-type", choices=["linear", "cosine"], help="interpolant (default linear)")
    a("--weighting", choices=["uniform", "lognormal"], help="training time distribution (default uniform)")
    a("--disc-every", type=int, default=5, help="one discriminator update per this many generator steps")
    a("--disc-lr", type=float, default=2e-4, help="discriminator Adam learning rate")
    a("--disc-betas", type=float, nargs=2, default=(0.5, 0.999), help="discriminator Adam betas")
    a("--disc-pretrained", type=int, choices=[0, 1], help="1: ImageNet ResNet-18 trunk (paper); 0: random")
    # Speed
    a("--tf32", type=int, choices=[0, 1], default=1, help="TF32 matmuls on GPU")
    a("--compile", type=int, choices=[0, 1], default=0, help="torch.compile the model")
    a("--grad-checkpointing", type=int, choices=[0, 1], default=0, help="activation checkpointing per block")
    a("--num-workers", type=int, help="data loader workers per rank")
    # Output
    a("--out", default="runs", help="folder that holds the run folders")
    a("--run-name", help="run folder name (default: preset-align-model)")
    a("--ckpt-every", type=int, help="checkpoint every this many steps (and at the end)")
    a("--keep-ckpts", type=int, default=3, help="how many newest checkpoints to keep")
    a("--log-every", type=int, help="log line and metrics.jsonl row every this many steps")
    a("--sample-every", type=int, help="EMA sample grid every this many steps (0: never)")
    a("--sample-steps", type=int, help="SDE steps of the sample grid")
    a("--keep-every", type=int, default=0,
      help="also keep every checkpoint whose step is a multiple of this for good, e.g. 100000 (0: none)")
    # Evaluation during training: FID of the EMA model, sampled as sample.py samples (a trend line, not 50k)
    a("--eval-every", type=int, default=0, help="FID (sFID, IS, P/R) of the EMA model every this many steps (0: never)")
    a("--eval-ref", help="ADM reference batch .npz for --eval-every, e.g. VIRTUAL_imagenet256_labeled.npz")
    a("--eval-samples", type=int, default=10000, help="samples per evaluation, split over the ranks (papers: 50k)")
    a("--eval-cfg", type=float, default=1.0, help="guidance scale of the evaluation samples (sample.py --cfg)")
    a("--eval-steps", type=int, default=250, help="SDE steps of the evaluation samples (sample.py --num-steps)")
    a("--eval-weights", help="Inception weights file (fid.py --weights); default: torch.hub cache, downloaded once")
    return p.parse_args(argv)


def resolve_config(args, world=1):
    """The run's full configuration as a plain dict: preset, then flags, then derived values."""
    cfg = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if v is not None}}
    try:
        size = size_config(cfg["model"])
        align = losses.align_config(cfg["align"], **{  # flags left unset keep the alignment preset's value
            f.name: cfg.get(f.name) for f in fields(losses.AlignConfig)})
    except ValueError as e:
        fail(str(e))
    if cfg["batch_size"] % world:
        fail(f"--batch-size {cfg['batch_size']} does not divide by the {world} ranks; use a multiple of {world}")
    if cfg["resolution"] % 8:
        fail(f"--resolution {cfg['resolution']} must be a multiple of 8 (the VAE downsamples 8x)")
    cfg["align_config"] = asdict(align)
    cfg["encoder_depth"] = cfg.get("encoder_depth") or size["encoder_depth"]
    cfg["sra_depth"] = (cfg.get("sra_depth") or size["sra_depth"]) if align.sra_weight else 0
    cfg["run_name"] = cfg.get("run_name") or default_run_name(args, cfg, world)
    cfg["world_size"] = world
    check_eval(cfg, world)
    return cfg


def default_run_name(args, cfg, world):
    """preset-align-model plus every experiment flag that differs from the preset, e.g. imagenet256-sara-SiT-XL2-adv0.

    An ablation thus gets its own folder without --run-name (resuming refuses another config's checkpoint).
    """
    base = resolve_config(parse_args(["--preset", cfg["preset"], "--align", cfg["align"], "--model", cfg["model"],
                                      "--run-name", "base"]), world)
    def value(c, k):
        """The value in force: alignment flags resolve through the alignment preset."""
        return c["align_config"][k] if k in c["align_config"] else c.get(k)

    skip = RESUMABLE_CHANGES | {"preset", "align", "model", "run_name"}
    parts = [f"{cfg['preset']}-{cfg['align']}-{cfg['model'].replace('/', '')}"]
    for k in sorted(k for k in vars(args) if k not in skip and value(cfg, k) != value(base, k)):
        v = value(cfg, k)
        text = "-".join(f"{x:g}" if isinstance(x, float) else str(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
        parts.append(k.removesuffix("_weight").replace("_", "") + text.replace("/", ""))
    return "-".join(parts)


# ----------------------------------------------------------------------------------------------
# Data


class GlobalBatchSampler(Sampler):
    """Endless batches: this rank's slice of global batch i of epoch e = randperm(seed, e)[i*G : (i+1)*G].

    The composition of every global batch depends only on the seed, so any number of ranks sees the
    same data as one process, and a resumed run restarts at the exact batch it stopped at.
    """

    def __init__(self, size, global_batch, rank, world, seed, start_step):
        if size < global_batch:
            fail(f"the dataset has {size} images, fewer than one global batch of {global_batch}")
        self.size, self.global_batch, self.seed, self.start_step = size, global_batch, seed, start_step
        self.local = global_batch // world
        self.offset = rank * self.local
        self.per_epoch = size // global_batch  # the last partial batch of an epoch is dropped

    def __iter__(self):
        """Index lists of length global_batch / world, from start_step on, forever."""
        step, epoch, perm = self.start_step, -1, None
        while True:
            e, i = divmod(step, self.per_epoch)
            if e != epoch:
                epoch, perm = e, torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + e))
            start = i * self.global_batch + self.offset
            yield perm[start : start + self.local].tolist()
            step += 1


def build_dataset(cfg):
    """The REPA-layout dataset of --data-dir, or the synthetic one (loudly labelled)."""
    if cfg["data_dir"] == SYNTHETIC:
        return SyntheticDataset(cfg["synthetic_images"], cfg["synthetic_classes"], cfg["resolution"], cfg["seed"])
    try:
        dataset = LatentImageDataset(cfg["data_dir"])
    except ValueError as e:
        fail(str(e))
    if dataset.resolution != cfg["resolution"]:
        fail(f"{cfg['data_dir']} holds {dataset.resolution} px images but --resolution is {cfg['resolution']}")
    return dataset


# ----------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_paths(run_dir):
    """Finished checkpoints of a run, oldest first."""
    folder = os.path.join(run_dir, "checkpoints")
    names = sorted(f for f in os.listdir(folder) if f.endswith(".pt")) if os.path.isdir(folder) else []
    return [os.path.join(folder, f) for f in names]


def load_run_checkpoint(path, cfg):
    """A checkpoint of this run, checked to be whole and written by the same configuration."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated files and foreign pickles fail in many ways; all mean "not ours"
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
             "delete it to resume from the previous one")
    missing = {"model", "ema", "opt", "step", "rng", "config"} - set(ckpt) if isinstance(ckpt, dict) else {"all"}
    if missing:
        fail(f"{path} is not a train.py checkpoint (missing {sorted(missing)}); use another --run-name")
    diff = sorted(k for k in set(cfg) | set(ckpt["config"]) if k not in RESUMABLE_CHANGES
                  and cfg.get(k) != ckpt["config"].get(k))
    if diff:
        k = diff[0]
        fail(f"{path} was written by another config ({k}: {ckpt['config'].get(k)!r} there, {cfg.get(k)!r} now"
             f"{f', and {len(diff) - 1} more' if len(diff) > 1 else ''}); use another --run-name or the same flags")
    return ckpt


def rng_state(gen, device):
    """Every random state the run reads: torch's CPU and CUDA RNGs and the shared step generator."""
    state = {"cpu": torch.get_rng_state(), "gen": gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, gen, device):
    """Restore rng_state()."""
    torch.set_rng_state(state["cpu"])
    gen.set_state(state["gen"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------------
# Training


@torch.no_grad()
def update_ema(ema, model, decay):
    """DiT / REPA EMA over parameters: ema <- decay * ema + (1 - decay) * model."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


@torch.no_grad()
def write_sample_grid(ema, vae, cfg, step, run_dir, device):
    """A grid of EMA samples for fixed classes and noise (SDE, no guidance), decoded when there is a VAE."""
    g = torch.Generator().manual_seed(cfg["seed"])
    n, c, s = 16, ema.in_channels, ema.config["input_size"]
    x = torch.randn(n, c, s, s, generator=g).to(device)  # (16, C, h, w) the same every time
    y = (torch.arange(n) * 997 % ema.num_classes).to(device)  # 16 fixed, spread-out classes

    def noise(like):
        """The SDE's fresh noise, from the grid's own generator."""
        return torch.randn(like.shape, generator=g, dtype=like.dtype).to(device)

    velocity = guided_velocity(ema, y)
    latents = euler_maruyama(velocity, x, cfg["sample_steps"], noise, ema.config["path_type"]).float()  # (16, C, h, w)
    images = decode(vae, latents) if vae is not None else to_uint8(latents[:, :3] / LATENT_RANGE)  # (16, 3, H, W)
    path = os.path.join(run_dir, "samples", f"{step:07d}.png")
    grid = tile(images.permute(0, 2, 3, 1).cpu().numpy())  # (4h, 4w, 3)
    write_atomic(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))


def setup_logging(run_dir, rank):
    """Rank 0 logs INFO to stderr and run_dir/log.txt; other ranks only warnings."""
    handlers = [logging.StreamHandler()]
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(run_dir, "log.txt")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@dataclass
class Run:
    """Everything a training step touches; checkpoints store all but the encoders and wrappers."""

    model: torch.nn.Module  # the bare SiT: saved, EMA'd and clipped
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    gen: torch.Generator  # the same on every rank: one global draw per step, sliced per rank
    encoders: list
    forward_model: torch.nn.Module  # DDP and / or torch.compile wrapper of model
    disc: torch.nn.Module | None = None
    disc_opt: torch.optim.Optimizer | None = None
    disc_scaler: torch.amp.GradScaler | None = None
    forward_disc: torch.nn.Module | None = None  # DDP wrapper of disc, for D's own step only


def build_run(cfg, num_classes, device, world):
    """Model, EMA, optimizers, scalers, encoders and discriminator from a resolved config."""
    align = losses.AlignConfig(**cfg["align_config"])
    with pretrained_or_fail("--enc-type " + cfg["enc_type"]):
        encoders = (load_encoders(cfg["enc_type"], device, cfg["resolution"], cfg.get("enc_weights"))
                    if align.needs_encoder else [])
    size = {k: v for k, v in size_config(cfg["model"]).items() if k not in ("encoder_depth", "sra_depth")}
    tokens = (cfg["resolution"] // 8 // size["patch_size"]) ** 2
    if encoders and tokens != (cfg["resolution"] // 16) ** 2:  # every encoder here gives a (res/16)^2 grid
        fail(f"{cfg['model']} has {tokens} tokens but the encoder gives {(cfg['resolution'] // 16) ** 2}: "
             "token-wise alignment needs patch size 2 (e.g. SiT-XL/2), or --align none / sra2")
    model = SiT(
        input_size=cfg["resolution"] // 8, num_classes=num_classes, class_dropout_prob=cfg["class_dropout"],
        encoder_depth=cfg["encoder_depth"], z_dims=[e.embed_dim for e in encoders], projector_dim=cfg["projector_dim"],
        sra_depth=cfg["sra_depth"], sra_mlp_layers=cfg["sra_mlp_layers"], sra_hidden_dim=cfg.get("sra_hidden_dim"),
        grad_checkpointing=bool(cfg["grad_checkpointing"]), path_type=align.path_type, **size,
    ).to(device)

    def wrap(module):
        """DDP under torchrun (gradient all-reduce), the bare module otherwise."""
        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else module

    run = Run(
        model=model, ema=copy.deepcopy(model).eval().requires_grad_(False),  # DiT-style EMA: a copy, no grad, eval
        opt=torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=tuple(cfg["adam_betas"]),
                              weight_decay=cfg["weight_decay"]),
        scaler=torch.amp.GradScaler(device.type, enabled=cfg["precision"] == "fp16"),
        gen=torch.Generator(device).manual_seed(cfg["seed"]), encoders=encoders,
        forward_model=torch.compile(wrap(model)) if cfg["compile"] else wrap(model),
    )
    if align.adv_weight:
        with pretrained_or_fail("the discriminator's ResNet-18 trunk (--disc-pretrained 1)"):
            disc, run.disc_opt = build_discriminator(model.config["z_dims"][0], bool(cfg["disc_pretrained"]),
                                                     cfg["disc_lr"], tuple(cfg["disc_betas"]))
        run.disc = disc.to(device)
        run.disc_scaler = torch.amp.GradScaler(device.type, enabled=cfg["precision"] == "fp16")
        run.forward_disc = wrap(run.disc)
    return run


def train_step(run, cfg, align, batch, step, rows):
    """One generator update (and D's, on its schedule) on this rank's batch; returns what to log."""
    images, moments, labels = batch
    device = moments.device
    latent_shape = (run.model.in_channels, run.model.config["input_size"], run.model.config["input_size"])
    noise = losses.draw_noise(cfg["batch_size"], latent_shape, align, cfg["class_dropout"], device, run.gen)[rows]
    x0 = sample_latent(moments, torch.randn(cfg["batch_size"], *latent_shape, device=device, generator=run.gen)[rows])
    amp = dict(device_type=device.type, dtype=torch.float16 if cfg["precision"] == "fp16" else torch.bfloat16,
               enabled=cfg["precision"] != "fp32")
    with torch.autocast(**amp):
        with torch.no_grad():
            z_encs = [enc(images) for enc in run.encoders]  # per encoder (B, N, D) on the clean image
        out = losses.training_losses(run.forward_model, x0, labels, z_encs, align, noise, run.disc)
    run.scaler.scale(out.total).backward()
    run.scaler.unscale_(run.opt)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg["max_grad_norm"])
    finite = bool(torch.isfinite(grad_norm))  # all-reduced gradients: every rank agrees
    if finite:
        run.scaler.step(run.opt)
        update_ema(run.ema, run.model, cfg["ema_decay"])
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    record = {k: v.detach().float() for k, v in out.terms.items()}
    record.update({"grad_norm": grad_norm.detach().float()} if finite else {})
    record.update(bad_steps=torch.tensor(float(not finite)))
    if run.disc is not None and is_disc_step(step, cfg["disc_every"]):
        with torch.autocast(**amp):
            d_loss, d_acc = losses.discriminator_step_loss(run.forward_disc, z_encs[0], out.hs[0])
        run.disc_scaler.scale(d_loss).backward()
        run.disc_scaler.step(run.disc_opt)
        run.disc_scaler.update()
        run.disc_opt.zero_grad(set_to_none=True)
        record.update(disc_loss=d_loss.detach().float(), disc_acc=d_acc.detach().float())
    return record


def main(args):
    """Build everything from the resolved config, resume if a checkpoint exists, train, checkpoint."""
    rank, world, device = distributed.init()
    cfg = resolve_config(args, world)
    run_dir = os.path.join(cfg["out"], cfg["run_name"])
    setup_logging(run_dir, rank)
    align = losses.AlignConfig(**cfg["align_config"])
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg["tf32"])

    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank and in every run
    dataset = build_dataset(cfg)
    run = build_run(cfg, dataset.num_classes, device, world)
    cfg["model_config"] = run.model.config
    random_parts = ([f"data ({SYNTHETIC})"] if dataset.synthetic else []) + [
        f"encoder ({e.name})" for e in run.encoders if not e.pretrained] + (
        ["discriminator trunk (random ResNet-18)"] if run.disc is not None and not run.disc.pretrained else []) + (
        [f"vae ({TINY_RANDOM})"] if cfg["vae"] == TINY_RANDOM and cfg["sample_every"] else [])
    cfg["random_components"] = random_parts  # in config.json and every checkpoint: no silent stand-ins
    for part in random_parts:
        log.warning("NOT PRETRAINED: %s is a random or synthetic stand-in; numbers from this run mean nothing", part)

    step = 0
    ckpts = checkpoint_paths(run_dir)
    if ckpts:
        ckpt = load_run_checkpoint(ckpts[-1], cfg)
        for key in CHECKPOINTED:
            if getattr(run, key) is not None:
                getattr(run, key).load_state_dict(ckpt[key])
        set_rng_state(ckpt["rng"], run.gen, device)
        step = ckpt["step"]
        log.info("resumed from %s at step %d", ckpts[-1], step)
    if rank == 0:
        write_atomic(os.path.join(run_dir, "config.json"), lambda f: f.write(json.dumps(cfg, indent=2).encode()))
        trim_metrics(os.path.join(run_dir, "metrics.jsonl"), step)
    vae = None
    if (rank == 0 and cfg["sample_every"] or cfg["eval_every"]) and cfg["vae"] != "none":
        with pretrained_or_fail(f"--vae {cfg['vae']}"):
            vae = load_vae(cfg["vae"], device)
    evaluator = build_evaluator(cfg, run_dir, rank, world, device) if cfg["eval_every"] else None

    local_batch = cfg["batch_size"] // world
    loader = DataLoader(
        dataset, batch_sampler=GlobalBatchSampler(len(dataset), cfg["batch_size"], rank, world, cfg["seed"], step),
        num_workers=cfg["num_workers"], pin_memory=device.type == "cuda", persistent_workers=cfg["num_workers"] > 0,
        generator=torch.Generator())  # a private generator: iterating never touches the global RNG
    rows = slice(rank * local_batch, (rank + 1) * local_batch)  # this rank's share of each global draw
    stats, bad_in_a_row, t_last = {}, 0, time.time()
    run.model.train()
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=rank != 0, dynamic_ncols=True)
    for batch in loader:
        if evaluator and step and step % cfg["eval_every"] == 0 and step not in evaluator.done:  # also on resume
            evaluate(run.ema, vae, evaluator, cfg, step, run_dir, rank, world, device)
        if step >= cfg["max_steps"]:
            break
        record = train_step(run, cfg, align, [x.to(device, non_blocking=True) for x in batch], step, rows)
        bad_in_a_row = bad_in_a_row + 1 if record["bad_steps"] else 0
        step += 1
        bar.update(1)
        for k, v in record.items():
            stats.setdefault(k, []).append(v)
        if bad_in_a_row >= cfg["max_bad_steps"]:
            fail(f"{bad_in_a_row} non-finite steps in a row at step {step}; the newest checkpoint is still good: "
                 "lower --lr or use --precision bf16/fp32")
        if step % cfg["log_every"] == 0 or step == cfg["max_steps"]:
            t_now = time.time()
            row = reduce_stats(stats, world)
            row.update(step=step, sec_per_step=(t_now - t_last) / len(stats["velocity"]),
                       images_per_sec=cfg["batch_size"] * len(stats["velocity"]) / (t_now - t_last))
            stats, t_last = {}, t_now
            if rank == 0:
                log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
                with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
        if cfg["sample_every"] and step % cfg["sample_every"] == 0 and rank == 0:
            write_sample_grid(run.ema, vae, cfg, step, run_dir, device)
        if step % cfg["ckpt_every"] == 0 or step == cfg["max_steps"]:
            save_checkpoint(run_dir, cfg, step, run, device, rank, world)
    bar.close()
    distributed.close(world)
    return run_dir


# ----------------------------------------------------------------------------------------------
# Evaluation during training: sample.py's samples scored by fid.py's network (a trend line, not 50k)


def check_eval(config, world):
    """--keep-every and the --eval-* flags in range and complete, before anything is built."""
    for name in ("keep_every", "eval_every"):
        if config[name] < 0:
            fail(f"--{name.replace('_', '-')} {config[name]}: must be >= 0 (0: off)")
    if not config["eval_every"]:
        return
    if not config.get("eval_ref") or not os.path.isfile(config["eval_ref"]):
        fail(f"--eval-every needs --eval-ref REF.npz, an ADM reference batch (fid.py --write-ref makes one); "
             f"got {config.get('eval_ref')!r}")
    if config["eval_samples"] < max(4, 2 * world):  # k=3 neighbours for P/R; a covariance per rank
        fail(f"--eval-samples {config['eval_samples']}: must be >= {max(4, 2 * world)} (4, and 2 per rank)")
    if config["eval_steps"] < 1:
        fail(f"--eval-steps {config['eval_steps']}: must be >= 1")
    if not 1 <= config["eval_cfg"] < math.inf:
        fail(f"--eval-cfg {config['eval_cfg']}: must be a finite number >= 1 (1 disables guidance)")
    if config["eval_cfg"] > 1 and not config["class_dropout"]:
        fail("--eval-cfg > 1 needs a null class, but --class-dropout is 0")
    if config["vae"] == "none":
        fail("--eval-every scores decoded images: give a --vae other than none")


@dataclass
class Evaluator:
    """What every evaluation reuses: fid.py's network, the reference (rank 0) and the steps already scored."""

    inception: torch.nn.Module
    digest: str  # sha256 of the Inception weights, written with every score
    ref: fid.Features | None  # rank 0: reference pool3 rows and the statistics FID compares against
    done: set = field(default_factory=set)  # steps with a score in metrics.jsonl (a resumed run skips them)


def build_evaluator(config, run_dir, rank, world, device):
    """Load fid.py's Inception; rank 0 reads the reference's features, from a cache in the run folder after once."""
    with pretrained_or_fail("the FID Inception weights (give a local file with --eval-weights)"):
        sha256 = "" if config.get("eval_weights") else fid.WEIGHTS_SHA256  # a given file is used, and named
        inception, digest = fid.load_inception(config.get("eval_weights"), sha256, device)
    if digest != fid.WEIGHTS_SHA256:
        log.warning("NOT PRETRAINED: --eval-weights %s is not ADM's Inception (sha256 %s...): FIDs are not comparable",
                    config["eval_weights"], digest[:16])
    ref = None
    if rank == 0:
        path = config["eval_ref"]
        cache = os.path.join(run_dir, f"eval-ref-{digest[:8]}.npz")
        key = np.array([os.path.getsize(path), os.stat(path).st_mtime_ns], np.int64)  # a changed file is redone
        if os.path.exists(cache) and np.array_equal(np.load(cache)["key"], key):
            with np.load(cache) as c:
                ref = fid.Features(torch.from_numpy(c["pool"]), None, (c["mu"], c["sigma"]), (c["mu_s"], c["sigma_s"]))
        else:
            with pretrained_or_fail(f"--eval-ref {path}"):
                images = fid.ImageSet(path)
                feats = fid.extract_features(inception, images.batches(64), device, images.n_batches(64))
                pool_stats, spatial_stats = fid.read_npz_stats(path)  # ADM's own mu / sigma first, as fid.py
            ref = fid.Features(feats.pool, None, pool_stats or feats.pool_stats, spatial_stats or feats.spatial_stats)
            arrays = dict(key=key, pool=ref.pool.numpy(), mu=ref.pool_stats[0], sigma=ref.pool_stats[1],
                          mu_s=ref.spatial_stats[0], sigma_s=ref.spatial_stats[1])
            write_atomic(cache, lambda f: np.savez(f, **arrays))
    distributed.barrier(world)  # rank 0 has trimmed metrics.jsonl to the resumed step
    path = os.path.join(run_dir, "metrics.jsonl")
    done = {row["step"] for row in map(json.loads, open(path)) if "fid" in row} if os.path.exists(path) else set()
    return Evaluator(inception, digest, ref, done)


def merge_gaussians(parts):
    """Mean and covariance (N-1 convention) of a union of sets, each given as (count, mean, covariance)."""
    n = sum(c for c, _, _ in parts)
    mu = sum(c * m for c, m, _ in parts) / n  # (D,)
    scatter = sum((c - 1) * s + c * np.outer(m - mu, m - mu) for c, m, s in parts)  # (D, D)
    return mu, scatter / (n - 1)


@torch.no_grad()
def evaluate(ema, vae, evaluator, config, step, run_dir, rank, world, device):
    """FID, sFID, IS, precision, recall of the EMA model's first --eval-samples samples, as fid.py scores them.

    The samples are those of `sample.py --seed SEED --cfg EVAL_CFG --num-steps EVAL_STEPS` (per-index seeds,
    so any world size gives the same images); rank r makes and embeds indices r, r + world, ...
    """
    t_start = time.time()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # fid.py turns TF32 off
    options = sample.parser().parse_args(
        ["--seed", str(config["seed"]), "--cfg", str(config["eval_cfg"]), "--num-steps", str(config["eval_steps"])])
    mine, size = list(range(rank, config["eval_samples"], world)), config["batch_size"] // world
    batches = (sample.generate_images(ema, vae, mine[i : i + size], options, device) for i in range(0, len(mine), size))
    feats = fid.extract_features(evaluator.inception, batches, device, -(-len(mine) // size))
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    parts = [feats]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, feats)
    evaluator.done.add(step)
    if rank == 0:
        pool = torch.empty(config["eval_samples"], fid.POOL_DIM)  # (N, 2048) in sample-index order, as in the npz
        logits = torch.empty(config["eval_samples"], fid.LOGITS_DIM)  # (N, 1008)
        for r, part in enumerate(parts):
            pool[r::world], logits[r::world] = part.pool, part.logits
        ref = evaluator.ref
        precision, recall = fid.precision_recall(ref.pool.to(device), pool.to(device))
        row = dict(
            step=step,
            fid=fid.fid_from_stats(*merge_gaussians([(len(p.pool), *p.pool_stats) for p in parts]), *ref.pool_stats),
            sfid=fid.fid_from_stats(*merge_gaussians([(len(p.pool), *p.spatial_stats) for p in parts]),
                                    *ref.spatial_stats),
            inception_score=fid.inception_score(torch.softmax(logits.double(), 1).numpy()),
            precision=precision, recall=recall, eval_samples=config["eval_samples"], eval_cfg=config["eval_cfg"],
            eval_steps=config["eval_steps"], eval_sec=time.time() - t_start, inception_sha256=evaluator.digest)
        log.info("eval step %d, %d samples: FID %.4f sFID %.4f IS %.2f precision %.3f recall %.3f (%.0f s)", step,
                 config["eval_samples"], row["fid"], row["sfid"], row["inception_score"], precision, recall,
                 row["eval_sec"])
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    distributed.barrier(world)


def reduce_stats(stats, world):
    """Mean of each logged quantity over the interval and the ranks (bad_steps summed)."""
    keys = sorted(stats)
    means = torch.stack([torch.stack(stats[k]).mean() for k in keys])
    if world > 1:
        dist.all_reduce(means)
        means /= world
    row = dict(zip(keys, means.tolist()))
    row["bad_steps"] = round(row["bad_steps"] * len(stats["velocity"]))  # ranks agree on every skip
    return row


def save_checkpoint(run_dir, cfg, step, run, device, rank, world):
    """Rank 0 writes everything a resume needs, atomically, and keeps the newest --keep-ckpts."""
    if rank == 0:  # every rank holds the same random states: one copy resumes them all
        ckpt = {key: getattr(run, key).state_dict() for key in CHECKPOINTED if getattr(run, key) is not None}
        ckpt.update(step=step, rng=rng_state(run.gen, device), config=cfg)
        path = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
        write_atomic(path, lambda f: torch.save(ckpt, f))
        for old in checkpoint_paths(run_dir)[: -cfg["keep_ckpts"]]:
            if not (cfg["keep_every"] and int(os.path.basename(old)[:-3]) % cfg["keep_every"] == 0):  # kept for good
                os.remove(old)
        log.info("saved %s", path)
    distributed.barrier(world)


def trim_metrics(path, step):
    """Drop metrics rows past the resumed step, so a resumed run's metrics.jsonl has no duplicates."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    write_atomic(path, lambda f: f.write("".join(rows).encode()))


if __name__ == "__main__":
    main(parse_args())
