"""Train SiT with REPA / SARA / SRA^2 representation alignment.

    torchrun --nproc_per_node=8 train.py --align sara --data-dir data/imagenet256   # SARA Table 4
    python train.py --preset smoke --align sara                                        # CPU, minutes

One process per GPU under torchrun (NCCL; gloo on CPU), one plain process otherwise. Re-running the
same command resumes from the newest checkpoint in the run folder and continues exactly. SIGTERM / SIGUSR1
(--preempt-signals) end the run after the current step with a checkpoint; a burst of non-finite steps rolls
back to the newest checkpoint before it (--max-rollbacks).
"""

import argparse
import copy
import functools
import importlib
import json
import logging
import math
import os
import signal
import time
import uuid
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import cluster
import fid
import losses
import sample
from cluster import write_atomic
from data import LatentImageDataset, SyntheticDataset
from discriminator import build_discriminator, is_disc_step
from encoders import TINY_RANDOM, decode, load_encoders, load_vae, sample_latent, to_uint8
from model import SiT, size_config
from sample import LATENT_RANGE, euler_maruyama, guided_velocity, tile

log = logging.getLogger("train")
fail = cluster.failer("train.py")
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
# Weight-file flags are paths: local copies of the same weights may move.
RESUMABLE_CHANGES = {"max_steps", "ckpt_every", "sample_every", "log_every", "keep_ckpts", "keep_every", "num_workers",
                     "compile", "tf32", "grad_checkpointing", "max_bad_steps", "max_rollbacks", "preempt_signals",
                     "out", "data_dir", "world_size", "vae", "sample_steps", "eval_every", "eval_ref", "eval_samples",
                     "eval_cfg", "eval_steps", "eval_weights", "enc_weights", "disc_weights", "wandb", "tensorboard"}
METRICS = "metrics.jsonl"
LOSS_CURVES = "losses.png"


# ----------------------------------------------------------------------------------------------
# Configuration


def signal_names(text):
    """--preempt-signals: 'TERM,USR1' -> ('TERM', 'USR1'); 'none' -> ()."""
    names = () if text.lower() == "none" else tuple(n.strip().upper().removeprefix("SIG") for n in text.split(","))
    for name in names:
        if not isinstance(getattr(signal, f"SIG{name}", None), signal.Signals) or name in ("KILL", "STOP"):
            raise argparse.ArgumentTypeError(f"{name} is not a signal a process can catch; use e.g. TERM,USR1 or none")
    return names


def parse_args(argv=None):
    """Command line; every flag left unset takes its value from --preset."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", default="imagenet256", choices=list(PRESETS), help="run preset the other flags override")
    a("--align", default="sara", choices=list(losses.PRESETS), help="alignment preset (losses.PRESETS: the papers' weights)")
    a("--model", help="SiT size, e.g. SiT-XL/2, SiT-B/2 (T is a tiny test size)")
    a("--data-dir", help=f"REPA-layout folder (images/, vae-sd/) from data.py, or '{SYNTHETIC}'")
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
    a("--max-bad-steps", type=int, default=50,
      help="this many consecutive non-finite steps roll back to the newest checkpoint before them")
    a("--max-rollbacks", type=int, default=3, help="stop the run at the next burst after this many rollbacks")
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
    a("--disc-weights", help="local file of torchvision's ImageNet ResNet-18 (resnet18-f37072fd.pth) instead of the download")
    a("--disc-sync-bn", type=int, choices=[0, 1], default=0,
      help="1: D's BatchNorm uses the global batch's statistics under DDP; 0: each rank's own (as the papers)")
    # Speed
    a("--tf32", type=int, choices=[0, 1], default=1, help="TF32 matmuls on GPU")
    a("--compile", type=int, choices=[0, 1], default=0, help="torch.compile the model")
    a("--grad-checkpointing", type=int, choices=[0, 1], default=0, help="activation checkpointing per block")
    a("--num-workers", type=int, help="data loader workers per rank")
    # Output
    a("--out", default="runs", help="folder that holds the run folders")
    a("--run-name", help="run folder name (default: preset-align-model, then each flag that differs from the preset)")
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
    # Clusters and experiment logging
    a("--preempt-signals", type=signal_names, default="TERM,USR1",
      help="signals that end the run after the current step with a checkpoint (comma-separated, or none)")
    a("--wandb", metavar="PROJECT", help="also log every metrics.jsonl key to this Weights & Biases project")
    a("--tensorboard", type=int, choices=[0, 1], default=0, help="1: also log every metrics.jsonl key to TensorBoard")
    return p.parse_args(argv)


# The range of every numeric flag, checked before anything is built: flag -> (what it must be, test).
AT_LEAST_1 = ("at least 1", lambda v: v >= 1)
AT_LEAST_0 = ("at least 0", lambda v: v >= 0)
POSITIVE = ("greater than 0", lambda v: v > 0)
UNIT = ("in [0, 1]", lambda v: 0 <= v <= 1)
BELOW_1 = ("in [0, 1)", lambda v: 0 <= v < 1)
FLAG_RANGES = {
    "synthetic_images": AT_LEAST_1, "synthetic_classes": AT_LEAST_1,
    "resolution": ("a positive multiple of 8 (the VAE downsamples 8x)", lambda v: v > 0 and v % 8 == 0),
    "batch_size": AT_LEAST_1, "max_steps": AT_LEAST_1, "lr": POSITIVE, "adam_betas": BELOW_1,
    "weight_decay": AT_LEAST_0, "max_grad_norm": POSITIVE, "ema_decay": UNIT, "class_dropout": BELOW_1,
    "max_bad_steps": AT_LEAST_1, "max_rollbacks": AT_LEAST_0, "seed": AT_LEAST_0, "encoder_depth": AT_LEAST_1,
    "projector_dim": AT_LEAST_1, "sra_depth": AT_LEAST_1, "sra_mlp_layers": AT_LEAST_1, "sra_hidden_dim": AT_LEAST_1,
    "patch_weight": AT_LEAST_0, "struc_weight": AT_LEAST_0, "adv_weight": AT_LEAST_0, "sra_weight": AT_LEAST_0,
    "sra_beta": POSITIVE, "sra_t_range": UNIT, "disc_every": AT_LEAST_1, "disc_lr": POSITIVE, "disc_betas": BELOW_1,
    "num_workers": AT_LEAST_0, "ckpt_every": AT_LEAST_1, "keep_ckpts": AT_LEAST_1, "log_every": AT_LEAST_1,
    "sample_every": AT_LEAST_0, "sample_steps": AT_LEAST_1, "keep_every": AT_LEAST_0, "eval_every": AT_LEAST_0,
    "eval_samples": ("at least 4 (precision/recall use 3 neighbours)", lambda v: v >= 4), "eval_steps": AT_LEAST_1,
    "eval_cfg": AT_LEAST_1,  # 1 disables guidance
}


def check_ranges(config):
    """One-line error for the first numeric flag (preset values included) outside its range."""
    for name, (must, ok) in FLAG_RANGES.items():
        value = config.get(name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(math.isfinite(v) and ok(v) for v in values):
            shown = " ".join(f"{v:g}" for v in values)
            fail(f"--{name.replace('_', '-')} {shown} is out of range: it must be {must}")
    lo, hi = config.get("sra_t_range") or (0, 1)
    if lo > hi:
        fail(f"--sra-t-range {lo:g} {hi:g} is empty: give LO <= HI")


def resolve_config(args, world=1):
    """The run's full configuration as a plain dict: preset, then flags, then derived values."""
    config = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if v is not None}}
    check_ranges(config)
    try:
        size = size_config(config["model"])
        align = losses.align_config(config["align"], **{  # flags left unset keep the alignment preset's value
            f.name: config.get(f.name) for f in fields(losses.AlignConfig)})
    except ValueError as e:
        fail(str(e))
    if config["batch_size"] % world:
        fail(f"--batch-size {config['batch_size']} does not divide by the {world} ranks; use a multiple of {world}")
    config["align_config"] = asdict(align)
    config["encoder_depth"] = config.get("encoder_depth") or size["encoder_depth"]
    config["sra_depth"] = (config.get("sra_depth") or size["sra_depth"]) if align.sra_weight else 0
    for name in ("encoder_depth", "sra_depth"):
        if config[name] > size["depth"]:
            fail(f"--{name.replace('_', '-')} {config[name]} is out of range: {config['model']} has {size['depth']} blocks")
    config["run_name"] = config.get("run_name") or default_run_name(args, config, world)
    config["world_size"] = world
    check_eval(config, world)
    return config


def default_run_name(args, config, world):
    """preset-align-model plus every experiment flag that differs from the preset, e.g. imagenet256-sara-SiT-XL2-adv0.

    An ablation thus gets its own folder without --run-name (resuming refuses another config's checkpoint).
    """
    base = resolve_config(parse_args(["--preset", config["preset"], "--align", config["align"], "--model", config["model"],
                                      "--run-name", "base"]), world)
    def value(c, k):
        """The value in force: alignment flags resolve through the alignment preset."""
        return c["align_config"][k] if k in c["align_config"] else c.get(k)

    skip = RESUMABLE_CHANGES | {"preset", "align", "model", "run_name"}
    parts = [f"{config['preset']}-{config['align']}-{config['model'].replace('/', '')}"]
    for k in sorted(k for k in vars(args) if k not in skip and value(config, k) != value(base, k)):
        v = value(config, k)
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


def build_dataset(config):
    """The REPA-layout dataset of --data-dir, or the synthetic one (loudly labelled)."""
    if config["data_dir"] == SYNTHETIC:
        return SyntheticDataset(config["synthetic_images"], config["synthetic_classes"], config["resolution"], config["seed"])
    try:
        dataset = LatentImageDataset(config["data_dir"])
    except ValueError as e:
        fail(str(e))
    if dataset.resolution != config["resolution"]:
        fail(f"{config['data_dir']} holds {dataset.resolution} px images but --resolution is {config['resolution']}")
    return dataset


# ----------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_paths(run_dir):
    """Finished checkpoints of a run, oldest first."""
    folder = os.path.join(run_dir, "checkpoints")
    names = sorted(f for f in os.listdir(folder) if f.endswith(".pt")) if os.path.isdir(folder) else []
    return [os.path.join(folder, f) for f in names]


def checkpoint_step(path):
    """The step a checkpoint file is named after (checkpoints/0001000.pt -> 1000)."""
    return int(os.path.splitext(os.path.basename(path))[0])


# AlignConfig fields before they took their flags' names: checkpoints written then still resume.
OLD_ALIGN_NAMES = {"patch": "patch_weight", "struc": "struc_weight", "adv": "adv_weight", "vae": "sra_weight",
                   "vae_objective": "sra_objective", "vae_beta": "sra_beta", "path": "path_type"}


def upgrade_config(stored):
    """A checkpoint's config in today's names, with flags added since at their defaults (what the run used)."""
    defaults = {k: v for k, v in vars(parse_args(["--preset", stored["preset"]])).items() if v is not None}
    config = {**defaults, **stored}
    align = dict(config["align_config"])
    if "vae_t_lo" in align:
        align["sra_t_range"] = (align.pop("vae_t_lo"), align.pop("vae_t_hi"))
    config["align_config"] = {OLD_ALIGN_NAMES.get(k, k): v for k, v in align.items()}
    config["model_config"] = {"path_type": config["align_config"]["path_type"], **config.get("model_config", {})}
    return config


def load_run_checkpoint(paths, config, world):
    """(path, checkpoint): the newest readable one of paths, checked to be written by the same configuration.

    An unreadable newer file (truncated by a crash, a full disk) is skipped with a warning; the ranks
    agree on the newest file every one of them could read.
    """
    found, ckpt, error = -1, None, None
    for i in reversed(range(len(paths))):
        try:
            ckpt, found = torch.load(paths[i], map_location="cpu", weights_only=True), i
            break
        except Exception as e:  # truncated files and foreign pickles fail in many ways; all mean "not ours"
            why = f"{paths[i]} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            log.warning("%s; falling back to the previous checkpoint", why)
            error = error or why
    agreed = cluster.host_all_reduce([found], dist.ReduceOp.MIN, world)[0]
    if agreed < 0:
        fail(f"{error or 'another rank read no checkpoint'} and no older one is readable; "
             "delete the run folder's checkpoints/ to start over")
    path = paths[agreed]
    if agreed != found:  # another rank could not read a newer file: all resume from the same one
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"model", "ema", "opt", "step", "rng", "config"} - set(ckpt) if isinstance(ckpt, dict) else {"all"}
    if missing:
        fail(f"{path} is not a train.py checkpoint (missing {sorted(missing)}); use another --run-name")
    ckpt["config"] = upgrade_config(ckpt["config"])
    diff = sorted(k for k in set(config) | set(ckpt["config"]) if k not in RESUMABLE_CHANGES
                  and config.get(k) != ckpt["config"].get(k))
    if diff:
        k = diff[0]
        fail(f"{path} was written by another config ({k}: {ckpt['config'].get(k)!r} there, {config.get(k)!r} now"
             f"{f', and {len(diff) - 1} more' if len(diff) > 1 else ''}); use another --run-name or the same flags")
    return path, ckpt


def load_state(run, ckpt):
    """Weights, optimizer and scaler states of a checkpoint into run (not the random states)."""
    for key in CHECKPOINTED:
        if getattr(run, key) is not None:
            getattr(run, key).load_state_dict(ckpt[key])


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
    """DiT / REPA EMA over parameters: ema <- decay * ema + (1 - decay) * model, one fused lerp over all tensors."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


@torch.no_grad()
def write_sample_grid(ema, vae, config, step, run_dir, device):
    """A grid of EMA samples for fixed classes and noise (SDE, no guidance), decoded when there is a VAE."""
    g = torch.Generator().manual_seed(config["seed"])
    n, c, s = 16, ema.in_channels, ema.config["input_size"]
    x = torch.randn(n, c, s, s, generator=g).to(device)  # (16, C, h, w) the same every time
    y = (torch.arange(n) * 997 % ema.num_classes).to(device)  # 16 fixed, spread-out classes

    def noise(like):
        """The SDE's fresh noise, from the grid's own generator."""
        return torch.randn(like.shape, generator=g, dtype=like.dtype).to(device)

    velocity = guided_velocity(ema, y)
    latents = euler_maruyama(velocity, x, config["sample_steps"], noise, ema.config["path_type"]).float()  # (16, C, h, w)
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


def build_run(config, num_classes, device, world):
    """Model, EMA, optimizers, scalers, encoders and discriminator from a resolved config."""
    align = losses.AlignConfig(**config["align_config"])
    with cluster.failing(fail, "--enc-type " + config["enc_type"]):
        encoders = (load_encoders(config["enc_type"], device, config["resolution"], config.get("enc_weights"))
                    if align.needs_encoder else [])
    size = {k: v for k, v in size_config(config["model"]).items() if k not in ("encoder_depth", "sra_depth")}
    tokens = (config["resolution"] // 8 // size["patch_size"]) ** 2
    if encoders and tokens != (config["resolution"] // 16) ** 2:  # every encoder here gives a (res/16)^2 grid
        fail(f"{config['model']} has {tokens} tokens but the encoder gives {(config['resolution'] // 16) ** 2}: "
             "token-wise alignment needs patch size 2 (e.g. SiT-XL/2), or --align none / sra2")
    model = SiT(
        input_size=config["resolution"] // 8, num_classes=num_classes, class_dropout_prob=config["class_dropout"],
        encoder_depth=config["encoder_depth"], z_dims=[e.embed_dim for e in encoders], projector_dim=config["projector_dim"],
        sra_depth=config["sra_depth"], sra_mlp_layers=config["sra_mlp_layers"], sra_hidden_dim=config.get("sra_hidden_dim"),
        grad_checkpointing=bool(config["grad_checkpointing"]), path_type=align.path_type, **size,
    ).to(device)

    def wrap(module):
        """DDP under torchrun (gradient all-reduce), the bare module otherwise."""
        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else module

    run = Run(
        model=model, ema=copy.deepcopy(model).eval().requires_grad_(False),  # DiT-style EMA: a copy, no grad, eval
        opt=torch.optim.AdamW(model.parameters(), lr=config["lr"], betas=tuple(config["adam_betas"]),
                              weight_decay=config["weight_decay"], fused=device.type == "cuda"),  # one kernel per step
        scaler=torch.amp.GradScaler(device.type, enabled=config["precision"] == "fp16"),
        gen=torch.Generator(device).manual_seed(config["seed"]), encoders=encoders,
        forward_model=torch.compile(wrap(model)) if config["compile"] else wrap(model),
    )
    if align.adv_weight:
        with cluster.failing(fail, "the discriminator's ResNet-18 trunk (--disc-pretrained 1; offline: --disc-weights)"):
            disc, run.disc_opt = build_discriminator(model.config["z_dims"][0], bool(config["disc_pretrained"]),
                                                     config["disc_lr"], tuple(config["disc_betas"]),
                                                     sync_bn=bool(config.get("disc_sync_bn")),
                                                     weights=config.get("disc_weights"))
        run.disc = disc.to(device)
        run.disc_scaler = torch.amp.GradScaler(device.type, enabled=config["precision"] == "fp16")
        run.forward_disc = wrap(run.disc)
    return run


def autocast_args(precision, device):
    """torch.autocast keywords for --precision (fp32: autocast off)."""
    return dict(device_type=device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
                enabled=precision != "fp32")


def train_step(run, config, align, batch, step, rows):
    """One generator update (and D's, on its schedule) on this rank's batch; returns what to log."""
    images, moments, labels = batch
    device = moments.device
    latent_shape = (run.model.in_channels, run.model.config["input_size"], run.model.config["input_size"])
    noise = losses.draw_noise(config["batch_size"], latent_shape, align, config["class_dropout"], device, run.gen)[rows]
    x0 = sample_latent(moments, torch.randn(config["batch_size"], *latent_shape, device=device, generator=run.gen)[rows])
    amp = autocast_args(config["precision"], device)
    with torch.autocast(**amp):
        with torch.no_grad():
            z_encs = [enc(images) for enc in run.encoders]  # per encoder (B, N, D) on the clean image
        out = losses.training_losses(run.forward_model, x0, labels, z_encs, align, noise, run.disc)
    run.scaler.scale(out.total).backward()
    run.scaler.unscale_(run.opt)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config["max_grad_norm"])
    finite = bool(torch.isfinite(grad_norm))  # all-reduced gradients: every rank agrees
    if finite:
        run.scaler.step(run.opt)
        update_ema(run.ema, run.model, config["ema_decay"])
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    record = {k: v.detach().float() for k, v in out.terms.items()}
    record.update({"grad_norm": grad_norm.detach().float()} if finite else {})
    record.update(bad_steps=torch.tensor(float(not finite)))
    if run.disc is not None and is_disc_step(step, config["disc_every"]):
        with torch.autocast(**amp):
            d_loss, d_acc = losses.discriminator_step_loss(run.forward_disc, z_encs[0], out.h_dens[0])
        run.disc_scaler.scale(d_loss).backward()
        run.disc_scaler.step(run.disc_opt)
        run.disc_scaler.update()
        run.disc_opt.zero_grad(set_to_none=True)
        record.update(disc_loss=d_loss.detach().float(), disc_acc=d_acc.detach().float())
    return record


def main(args):
    """Train with the --preempt-signals caught (the previous handlers come back after); returns the run folder."""
    with cluster.stop_signals(args.preempt_signals) as stop:
        return run_training(args, stop)


def run_training(args, stop):
    """Build everything from the resolved config, resume if a checkpoint exists, train, checkpoint."""
    rank, world, device = cluster.init()
    config = resolve_config(args, world)
    run_dir = os.path.join(config["out"], config["run_name"])
    setup_logging(run_dir, rank)
    align = losses.AlignConfig(**config["align_config"])
    require_loggers(config)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(config["tf32"])

    torch.manual_seed(config["seed"])  # the same initial weights on every rank and in every run
    dataset = build_dataset(config)
    run = build_run(config, dataset.num_classes, device, world)
    config["model_config"] = run.model.config
    random_parts = ([f"data ({SYNTHETIC})"] if dataset.synthetic else []) + [
        f"encoder ({e.name})" for e in run.encoders if not e.pretrained] + (
        ["discriminator trunk (random ResNet-18)"] if run.disc is not None and not run.disc.pretrained else []) + (
        [f"vae ({TINY_RANDOM})"] if config["vae"] == TINY_RANDOM and config["sample_every"] else [])
    config["random_components"] = random_parts  # in config.json and every checkpoint: no silent stand-ins
    for part in random_parts:
        log.warning("NOT PRETRAINED: %s is a random or synthetic stand-in; numbers from this run mean nothing", part)

    # batch_index: the next global batch (steps plus the batches rollbacks skipped); bad_in_a_row: non-finite steps
    step, batch_index, rollbacks, bad_in_a_row = 0, 0, [], 0
    ckpts = checkpoint_paths(run_dir)
    if ckpts:
        path, ckpt = load_run_checkpoint(ckpts, config, world)
        load_state(run, ckpt)
        set_rng_state(ckpt["rng"], run.gen, device)
        step, batch_index, rollbacks = ckpt["step"], ckpt.get("batch", ckpt["step"]), ckpt.get("rollbacks", [])
        bad_in_a_row = ckpt.get("bad_in_a_row", 0)  # a run stopped inside a burst counts on
        log.info("resumed from %s at step %d", path, step)
    metrics = None
    if rank == 0:
        write_atomic(os.path.join(run_dir, "config.json"), lambda f: f.write(json.dumps(config, indent=2).encode()))
        metrics = MetricsLog(run_dir, config, step)
    vae = None
    if (rank == 0 and config["sample_every"] or config["eval_every"]) and config["vae"] != "none":
        with cluster.failing(fail, f"--vae {config['vae']}"):
            vae = load_vae(config["vae"], device)
    evaluator = build_evaluator(config, run_dir, rank, world, device) if config["eval_every"] else None

    local_batch = config["batch_size"] // world
    loader = DataLoader(
        dataset, batch_sampler=GlobalBatchSampler(len(dataset), config["batch_size"], rank, world, config["seed"],
                                                  batch_index),
        num_workers=config["num_workers"], pin_memory=device.type == "cuda", persistent_workers=config["num_workers"] > 0,
        generator=torch.Generator(),  # a private generator: iterating never touches the global RNG
        worker_init_fn=functools.partial(cluster.ignore_signals, config["preempt_signals"]))  # main process decides
    rows = slice(rank * local_batch, (rank + 1) * local_batch)  # this rank's share of each global draw
    stats, t_last = {}, time.time()
    run.model.train()
    bar = tqdm(total=config["max_steps"], initial=step, disable=rank != 0, dynamic_ncols=True)
    for batch in loader:
        if evaluator and step and step % config["eval_every"] == 0 and step not in evaluator.done:  # also on resume
            evaluate(run.ema, vae, evaluator, config, step, metrics, rank, world, device)
        if step >= config["max_steps"]:
            break
        record = train_step(run, config, align, [x.to(device, non_blocking=True) for x in batch], step, rows)
        bad_in_a_row = bad_in_a_row + 1 if record["bad_steps"] else 0
        step, batch_index = step + 1, batch_index + 1
        bar.update(1)
        for k, v in record.items():
            stats.setdefault(k, []).append(v)
        if bad_in_a_row >= config["max_bad_steps"]:
            step = roll_back(run, config, run_dir, step, bad_in_a_row, batch_index, rollbacks, metrics, device, rank,
                             world)
            stats, bad_in_a_row, t_last, bar.n = {}, 0, time.time(), step
            continue
        if step % config["log_every"] == 0 or step == config["max_steps"]:
            t_now = time.time()
            row = reduce_stats(stats, world)
            row.update(step=step, sec_per_step=(t_now - t_last) / len(stats["velocity"]),
                       images_per_sec=config["batch_size"] * len(stats["velocity"]) / (t_now - t_last))
            stats, t_last = {}, t_now
            if rank == 0:
                log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
                metrics.write(row)
        if config["sample_every"] and step % config["sample_every"] == 0 and rank == 0:
            write_sample_grid(run.ema, vae, config, step, run_dir, device)
        preempted = stop.agreed(world)  # one host all-reduce per step: every rank stops after the same step
        if step % config["ckpt_every"] == 0 or step == config["max_steps"] or preempted:
            save_checkpoint(run_dir, config, step, run, device, rank, world, batch=batch_index, rollbacks=rollbacks,
                            bad_in_a_row=bad_in_a_row)
        if preempted:
            log.info("preempted (%s): stopped after step %d with a checkpoint; re-run the same command to continue",
                     f"{stop.signal} here" if stop.signal else "a signal on another rank", step)
            break
    bar.close()
    if metrics is not None:
        metrics.close()
    cluster.close(world)
    return run_dir


# ----------------------------------------------------------------------------------------------
# Evaluation during training: sample.py's samples scored by fid.py's network (a trend line, not 50k)


def check_eval(config, world):
    """--keep-every and the --eval-* flags in range and complete, before anything is built."""
    if not config["eval_every"]:
        return
    if not config.get("eval_ref") or not os.path.isfile(config["eval_ref"]):
        fail(f"--eval-every needs --eval-ref REF.npz, an ADM reference batch (fid.py --write-ref makes one); "
             f"got {config.get('eval_ref')!r}")
    if config["eval_samples"] < 2 * world:  # a covariance per rank
        fail(f"--eval-samples {config['eval_samples']} is out of range: it must be at least 2 per rank ({2 * world})")
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
    factors: tuple | None  # rank 0: the reference covariances' factors (FID, sFID), computed once for every evaluation
    done: set = field(default_factory=set)  # steps with a score in metrics.jsonl (a resumed run skips them)


def build_evaluator(config, run_dir, rank, world, device):
    """Load fid.py's Inception; rank 0 reads the reference's features, from a cache in the run folder after once."""
    with cluster.failing(fail, "the FID Inception weights (give a local file with --eval-weights)"):
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
            with cluster.failing(fail, f"--eval-ref {path}"):
                images = fid.ImageSet(path)
                feats = fid.extract_features(inception, images.batches(64), device, images.n_batches(64))
                pool_stats, spatial_stats = fid.read_npz_stats(path)  # ADM's own mu / sigma first, as fid.py
            ref = fid.Features(feats.pool, None, pool_stats or feats.pool_stats, spatial_stats or feats.spatial_stats)
            arrays = dict(key=key, pool=ref.pool.numpy(), mu=ref.pool_stats[0], sigma=ref.pool_stats[1],
                          mu_s=ref.spatial_stats[0], sigma_s=ref.spatial_stats[1])
            write_atomic(cache, lambda f: np.savez(f, **arrays))
    cluster.barrier(world)  # rank 0 has trimmed metrics.jsonl to the resumed step
    path = os.path.join(run_dir, METRICS)
    done = {row["step"] for row in map(json.loads, open(path)) if "fid" in row} if os.path.exists(path) else set()
    factors = tuple(fid.covariance_factor(s[1]) for s in (ref.pool_stats, ref.spatial_stats)) if ref else None
    return Evaluator(inception, digest, ref, factors, done)


def merge_gaussians(parts):
    """Mean and covariance (N-1 convention) of a union of sets, each given as (count, mean, covariance)."""
    n = sum(c for c, _, _ in parts)
    mu = sum(c * m for c, m, _ in parts) / n  # (D,)
    scatter = sum((c - 1) * s + c * np.outer(m - mu, m - mu) for c, m, s in parts)  # (D, D)
    return mu, scatter / (n - 1)


@torch.no_grad()
def evaluate(ema, vae, evaluator, config, step, metrics, rank, world, device):
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
            fid=fid.fid_from_stats(*merge_gaussians([(len(p.pool), *p.pool_stats) for p in parts]), *ref.pool_stats,
                                   factor2=evaluator.factors[0]),
            sfid=fid.fid_from_stats(*merge_gaussians([(len(p.pool), *p.spatial_stats) for p in parts]),
                                    *ref.spatial_stats, factor2=evaluator.factors[1]),
            inception_score=fid.inception_score(torch.softmax(logits.double(), 1).numpy()),
            precision=precision, recall=recall, eval_samples=config["eval_samples"], eval_cfg=config["eval_cfg"],
            eval_steps=config["eval_steps"], eval_sec=time.time() - t_start, inception_sha256=evaluator.digest)
        log.info("eval step %d, %d samples: FID %.4f sFID %.4f IS %.2f precision %.3f recall %.3f (%.0f s)", step,
                 config["eval_samples"], row["fid"], row["sfid"], row["inception_score"], precision, recall,
                 row["eval_sec"])
        metrics.write(row)
    cluster.barrier(world)


def roll_back(run, config, run_dir, step, burst, batch_index, rollbacks, metrics, device, rank, world):
    """After `burst` non-finite steps in a row, reload the newest periodic checkpoint before them; returns its step.

    The data and noise streams are not rewound: training goes on with global batch batch_index, so the
    batches drawn since that checkpoint, the offending ones among them, are skipped. The skipped range is
    appended to rollbacks and saved at once as that step's checkpoint, so a resume reproduces the rollback.
    """
    first_bad = step - burst  # the step count before the burst's first step
    stopping = f"{burst} non-finite steps in a row at step {step}"
    if len(rollbacks) >= config["max_rollbacks"]:
        fail(f"{stopping} after {len(rollbacks)} rollbacks (--max-rollbacks); the newest checkpoint is still good: "
             "lower --lr or use --precision bf16/fp32")
    # only periodic checkpoints: a preemption or end-of-run one in between must not change where a rollback lands
    older = [p for p in checkpoint_paths(run_dir)
             if checkpoint_step(p) <= first_bad and checkpoint_step(p) % config["ckpt_every"] == 0]
    if not older:
        fail(f"{stopping} and no --ckpt-every checkpoint from before step {first_bad + 1} to roll back to: lower "
             "--lr or use --precision bf16/fp32")
    path, ckpt = load_run_checkpoint(older, config, world)
    load_state(run, ckpt)
    rollback = dict(step=ckpt["step"], first_batch=ckpt.get("batch", ckpt["step"]), last_batch=batch_index - 1)
    rollbacks.append(rollback)
    log.warning("%s: rollback %d of at most %d to %s; global batches %d..%d skipped", stopping, len(rollbacks),
                config["max_rollbacks"], path, rollback["first_batch"], rollback["last_batch"])
    if rank == 0:
        for newer in checkpoint_paths(run_dir):
            if checkpoint_step(newer) > ckpt["step"]:  # written after the rollback point: another history now
                os.remove(newer)
        trim_metrics(os.path.join(run_dir, METRICS), ckpt["step"])
        metrics.write(dict(step=ckpt["step"], rollbacks=len(rollbacks), skipped_from_batch=rollback["first_batch"],
                           skipped_to_batch=rollback["last_batch"]))
    save_checkpoint(run_dir, config, ckpt["step"], run, device, rank, world, batch=batch_index, rollbacks=rollbacks,
                    bad_in_a_row=0)
    return ckpt["step"]


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


def save_checkpoint(run_dir, config, step, run, device, rank, world, **extra):
    """Rank 0 writes everything a resume needs, atomically, and keeps the newest --keep-ckpts.

    extra: batch (the next global batch) and rollbacks (skipped batch ranges), see roll_back.
    """
    if rank == 0:  # every rank holds the same random states: one copy resumes them all
        ckpt = {key: getattr(run, key).state_dict() for key in CHECKPOINTED if getattr(run, key) is not None}
        ckpt.update(step=step, rng=rng_state(run.gen, device), config=config, **extra)
        path = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
        write_atomic(path, lambda f: torch.save(ckpt, f))
        for old in checkpoint_paths(run_dir)[: -config["keep_ckpts"]]:
            if not (config["keep_every"] and int(os.path.basename(old)[:-3]) % config["keep_every"] == 0):  # kept for good
                os.remove(old)
        log.info("saved %s", path)
    cluster.barrier(world)


def trim_metrics(path, step):
    """Drop metrics rows past the resumed step, so a resumed run's metrics.jsonl has no duplicates."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    write_atomic(path, lambda f: f.write("".join(rows).encode()))



# ----------------------------------------------------------------------------------------------
# Experiment logging


def require_loggers(config):
    """A one-line error when --wandb or --tensorboard 1 is asked for and its package is missing."""
    wanted = [("--tensorboard 1", "torch.utils.tensorboard", "tensorboard")] if config["tensorboard"] else []
    wanted += [(f"--wandb {config['wandb']}", "wandb", "wandb")] if config.get("wandb") else []
    for flag, module, package in wanted:
        try:
            importlib.import_module(module)
        except ImportError:
            fail(f"{flag} needs the {package} package, which is not installed: pip install {package}, "
                 f"or drop {flag.split()[0]}")


class MetricsLog:
    """Rank 0's metrics.jsonl, its optional TensorBoard / W&B mirrors (every key) and the loss-curve PNG."""

    def __init__(self, run_dir, config, step):
        """Trim rows past the resumed step and open the mirrors asked for."""
        self.path, self.png = os.path.join(run_dir, METRICS), os.path.join(run_dir, LOSS_CURVES)
        trim_metrics(self.path, step)
        self.tensorboard = self.wandb = None
        if config["tensorboard"]:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events it is about to write again
            self.tensorboard = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=step + 1)
        if config.get("wandb"):
            import wandb

            id_path = os.path.join(run_dir, "wandb-id.txt")  # one W&B run per run folder, across resumes
            if not os.path.exists(id_path):
                write_atomic(id_path, lambda f: f.write(uuid.uuid4().hex[:16].encode()))
            with open(id_path) as f:
                run_id = f.read().strip()
            self.wandb = wandb.init(project=config["wandb"], name=config["run_name"], id=run_id, resume="allow",
                                    config=config, dir=run_dir)

    def write(self, row):
        """Append row (a dict of numbers with a "step") everywhere and redraw the loss curves."""
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for k, v in row.items():
                if k != "step":
                    self.tensorboard.add_scalar(k, v, row["step"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(row)  # "step" is a logged key: rollbacks and resumes may revisit a step
        plot_metrics(self.path, self.png)

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_metrics(metrics_path, png_path):
    """One panel per numeric metrics.jsonl key (every loss term, grad norm, ...) against the step, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keys = sorted({k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
    if not keys:
        return
    cols, lines = min(4, len(keys)), math.ceil(len(keys) / 4)
    fig = Figure(figsize=(3.2 * cols, 2.4 * lines))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.92, wspace=0.3, hspace=0.45)  # "tight" costs 2x
    for i, key in enumerate(keys):
        ax = fig.add_subplot(lines, cols, i + 1)
        steps, values = zip(*[(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))])
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
    write_atomic(png_path, lambda f: fig.savefig(f, format="png", dpi=80))


if __name__ == "__main__":
    main(parse_args())
