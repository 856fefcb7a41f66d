"""Train SiT (or MMDiT, text-to-image) with REPA / SARA / SRA^2 representation alignment.

    torchrun --nproc_per_node=8 train.py --align sara --data-dir data/imagenet256   # SARA Table 4
    torchrun --nproc_per_node=8 train.py --preset coco256 --align sra2              # SRA^2 Table 4
    python train.py --preset smoke --align sara                                      # CPU, seconds

Read it top to bottom: the presets, the command line, building the run, `train_step` (one update of
SARA (11) / SRA^2 (8), and the discriminator's own step), then the loop. What keeps a cluster run
alive lives elsewhere: the run folder (checkpoints, resume, NaN rollback, metrics) in runs.py,
process groups and preemption signals in cluster.py. One process per GPU under torchrun (NCCL;
gloo on CPU), one plain process otherwise; re-running the same command resumes exactly.
"""

import argparse
import copy
import dataclasses
import logging
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import cluster
import fid
import losses
import runs
import sample
from cluster import UserError, at_least, fraction, positive
from data import SYNTHETIC, TrainingBatches, build_dataset, sampling_condition
from discriminator import build_discriminator, is_disc_step
from encoders import TINY_RANDOM, load_encoders, load_vae, sample_latent

log = logging.getLogger("train")

# ----------------------------------------------------------------------------------------------
# Presets: the papers' ImageNet 256 recipe (SARA Table 4), REPA's MS-COCO text-to-image recipe
# (SRA^2 Table 4: MMDiT, 150K steps) and a CPU smoke run of the same code

PRESETS = {
    "imagenet256": dict(model="SiT-XL/2", data_dir="data/imagenet256", enc_type="dinov2-vit-b",
                        vae="ema", batch_size=256, max_steps=400_000, ckpt_every=50_000,
                        sample_every=10_000, log_every=100, resolution=256, num_workers=8,
                        precision="fp16", disc_pretrained=1,
                        sample_steps=250, eval_steps=250, eval_cfg=1.0),  # SDE, no guidance
    "coco256":     dict(model="MMDiT", data_dir="data/coco256", enc_type="dinov2-vit-b",
                        vae="mse", batch_size=256, max_steps=150_000, ckpt_every=50_000,
                        sample_every=10_000, log_every=100, resolution=256, num_workers=8,
                        precision="fp16", disc_pretrained=1,
                        sample_steps=50, eval_steps=50, eval_cfg=2.0,  # ODE, guidance 2.0
                        text_encoder="openai/clip-vit-large-patch14"),
    "smoke":       dict(model="SiT-T/2", data_dir=SYNTHETIC, enc_type=TINY_RANDOM,
                        vae=TINY_RANDOM, batch_size=8, max_steps=20, ckpt_every=10,
                        sample_every=20, log_every=5, resolution=64, num_workers=0,
                        precision="fp32", disc_pretrained=0,
                        sample_steps=10, eval_steps=250, eval_cfg=1.0),
}

# ----------------------------------------------------------------------------------------------
# The command line: every flag left unset takes its value from --preset (or the alignment preset)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    count, natural, below_one = at_least(1), at_least(0), fraction(below_one=True)
    flag = dict(type=int, choices=[0, 1])
    a("--preset", default="imagenet256", choices=list(PRESETS), help="the preset flags override")
    a("--align", default="sara", choices=list(losses.ALIGN_PRESETS), help="alignment preset")
    a("--model", help="SiT-XL/2, SiT-B/2, ... (T: tiny); on COCO data MMDiT (MMDiT-T: tiny)")
    a("--data-dir", help=f"REPA-layout folder from data.py, '{SYNTHETIC}', or a COCO folder")
    a("--text-encoder", help="COCO data: the text encoder its features must be of (unset: any)")
    a("--synthetic-images", type=count, default=256, help="images of the synthetic data")
    a("--synthetic-classes", type=count, default=10, help="classes of the synthetic data")
    a("--max-bad-samples", type=natural, default=100, help="unreadable samples replaced, at most")
    a("--strict-data", **flag, default=0, help="1: stop at the first unreadable sample")
    a("--resolution", type=cluster.multiple_of(8), help="image side in pixels")
    a("--enc-type", help="encoder(s), REPA's names, comma-separated; or tiny-random")
    a("--enc-weights", help="local encoder checkpoint(s), comma-separated, instead of downloading")
    a("--vae", help="SD-VAE of the grids: ema, mse, hub id, folder, tiny-random, none")
    # Optimisation (SARA Table 4)
    a("--batch-size", type=count, help="global batch size, split evenly over the ranks")
    a("--max-steps", type=count, help="total optimizer steps")
    a("--lr", type=positive(), default=1e-4, help="AdamW learning rate")
    a("--adam-betas", type=below_one, nargs=2, default=(0.9, 0.999), help="Adam betas")
    a("--weight-decay", type=at_least(0.0, float), default=0.0, help="AdamW weight decay")
    a("--max-grad-norm", type=positive(), default=1.0, help="gradient clipping norm")
    a("--ema-decay", type=fraction(), default=0.9999, help="EMA decay per step")
    a("--class-dropout", type=below_one, default=0.1, help="label dropout (for CFG)")
    a("--precision", choices=["fp16", "bf16", "fp32"], help="fp16 (GradScaler), bf16 or fp32")
    a("--max-bad-steps", type=count, default=50, help="non-finite steps in a row that roll back")
    a("--max-rollbacks", type=natural, default=3, help="rollbacks before a stop")
    a("--seed", type=natural, default=0, help="every draw is a function of it")
    # Model and alignment: weights and options default to the --align preset's (losses.AlignConfig)
    a("--encoder-depth", type=count, help="REPA/SARA tap block (default: 4 for S/B, 8 for L/XL)")
    a("--projector-dim", type=count, default=2048, help="REPA projector hidden width")
    a("--sra-depth", type=count, help="SRA^2 tap block (default: 2 for S/B, 8 for L/XL)")
    a("--sra-mlp-layers", type=count, default=5, help="SRA^2 head depth (SRA^2 Table 1: 2 or 5)")
    a("--sra-hidden-dim", type=count, help="SRA^2 head width (default 2 x hidden size)")
    a("--self-depth", type=count, help="SRA student tap (default 4 S/B, 8 L/XL/MMDiT)")
    a("--self-teacher-depth", type=count, help="SRA EMA teacher tap (8 S/B, 16 L/MMDiT, 20 XL)")
    weight = at_least(0.0, float)
    a("--patch-weight", type=weight, help="lambda of the patch term, SARA (6) (preset: 0.5)")
    a("--struc-weight", type=weight, help="beta of the structural term, SARA (8) (preset: 0.5)")
    a("--adv-weight", type=weight, help="gamma of the adversarial term, SARA (10) (preset: 0.05)")
    a("--sra-weight", type=weight, help="lambda of the SRA^2 term, SRA^2 (8) (preset: 1.0)")
    a("--self-weight", type=weight, help="lambda of SRA's L_SRA (preset: 0.2, SRA's schedule)")
    a("--self-t-max", type=fraction(), help="SRA: the teacher sees t - U(0, T_MAX) (preset: 0.2)")
    a("--struc-reduction", choices=["mean", "sum"], help="SARA (8) over N x N entries")
    a("--sra-objective", choices=["smooth_l1", "l1", "l2", "cosine"], help="SRA^2 (7) objective")
    a("--sra-beta", type=positive(), help="smooth-L1 beta of SRA^2 (7) (default 0.05)")
    a("--sra-t-range", type=fraction(), nargs=2, metavar=("LO", "HI"), help="SRA^2 only at these t")
    a("--path-type", choices=["linear", "cosine"], help="interpolant (default linear)")
    a("--weighting", choices=["uniform", "lognormal"], help="time distribution")
    a("--align-until", type=natural, default=0,
      help="no alignment (encoder, D) from this step on, as HASTE (2505.16792)")
    a("--disc-every", type=count, default=5, help="one discriminator update per this many steps")
    a("--disc-lr", type=positive(), default=2e-4, help="discriminator Adam learning rate")
    a("--disc-betas", type=below_one, nargs=2, default=(0.5, 0.999), help="D betas")
    a("--disc-pretrained", **flag, help="1: ImageNet ResNet-18 trunk (the paper's); 0: random")
    a("--disc-weights", help="local torchvision ImageNet ResNet-18 file (resnet18-f37072fd.pth)")
    a("--disc-sync-bn", **flag, default=0, help="1: D's BatchNorm over the global batch (DDP)")
    a("--disc-bn", choices=losses.DISC_BN,
      help="D's BatchNorm: joint (real+fake one batch, default), separate, eval (fixed stats)")
    # Speed
    a("--tf32", **flag, default=1, help="TF32 matmuls on GPU")
    a("--compile", **flag, default=0, help="1: torch.compile the model")
    a("--grad-checkpointing", **flag, default=0, help="1: activation checkpointing per block")
    a("--num-workers", type=natural, help="data loader workers per rank")
    # Output
    a("--out", default=runs.RUNS, help="folder that holds the run folders")
    a("--run-name", help="run folder (default: preset-align-model, then each flag that differs)")
    a("--ckpt-every", type=count, help="checkpoint every this many steps (and at the end)")
    a("--keep-ckpts", type=count, default=3, help="how many newest checkpoints to keep")
    a("--keep-every", type=natural, default=0, help="also keep every multiple of this for good")
    a("--log-every", type=count, help="log line and metrics.jsonl row every this many steps")
    a("--sample-every", type=natural, help="EMA sample grid every this many steps (0: never)")
    a("--sample-steps", type=count, help="sampler steps of the sample grid (preset's)")
    # Evaluation during training: the EMA's samples scored by fid.py (a trend line, not 50k)
    a("--eval-every", type=natural, default=0, help="FID, sFID, IS, P/R every N steps")
    a("--eval-ref", help="ADM reference batch .npz for --eval-every (fid.py --write-ref makes one)")
    a("--eval-samples", type=at_least(4), default=10000, help="samples (papers: 50k)")
    a("--eval-cfg", type=at_least(1.0, float), help="sample.py --cfg (preset: 1; coco256: 2)")
    a("--eval-steps", type=count, help="sample.py --num-steps (preset: 250; coco256: 50)")
    a("--eval-weights", help="Inception weights file (fid.py --weights)")
    # Clusters and experiment logging
    a("--preempt-signals", type=cluster.signal_names, default="TERM,USR1",
      help="signals that checkpoint the current step and stop (comma-separated, or none)")
    a("--wandb", metavar="PROJECT", help="also log every metrics.jsonl key to this W&B project")
    a("--tensorboard", **flag, default=0, help="1: also log every metrics.jsonl key to TensorBoard")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Building the run: the resolved configuration (a plain dict), then the networks and optimizers


def resolve_config(args, world=1):
    """The run's configuration: the preset, then the flags, then what follows from them."""
    config = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if v is not None}}
    lo, hi = config.get("sra_t_range") or (0, 1)
    if lo > hi:
        raise UserError(f"--sra-t-range {lo:g} {hi:g} is empty: give LO <= HI")
    try:
        size = runs.model_size(config["model"])
        align = losses.align_config(config["align"], **{  # unset flags keep the preset's value
            f.name: config.get(f.name) for f in dataclasses.fields(losses.AlignConfig)})
    except ValueError as e:
        raise UserError(str(e)) from e
    if config["batch_size"] % world:
        raise UserError(f"--batch-size {config['batch_size']} does not divide by the {world} "
                        f"ranks; use a multiple of {world}")
    if align.self_weight and not align.self_teacher_depth:  # SRA's EMA teacher taps the size's
        align = dataclasses.replace(align, self_teacher_depth=size["self_teacher_depth"])
    config["align_config"] = dataclasses.asdict(align)
    config["encoder_depth"] = config.get("encoder_depth") or size["encoder_depth"]
    for tap, weight in (("sra_depth", align.sra_weight), ("self_depth", align.self_weight)):
        config[tap] = (config.get(tap) or size[tap]) if weight else 0  # a head only for its term
    for name in ("encoder_depth", "sra_depth", "self_depth", "self_teacher_depth"):
        if runs.value_in_force(config, name) > size["depth"]:
            raise UserError(f"--{name.replace('_', '-')} {runs.value_in_force(config, name)} is "
                            f"out of range: {config['model']} has {size['depth']} blocks")
    if config["eval_every"]:
        runs.check_eval(config, world)
    config["run_name"] = config.get("run_name") or default_run_name(args, config, world)
    config["world_size"] = world
    return config


def default_run_name(args, config, world):
    """preset-align-model plus each flag that differs from the preset (...-SiT-XL2-adv0): an
    ablation gets its own folder."""
    base = resolve_config(parse_args(["--preset", config["preset"], "--align", config["align"],
                                      "--model", config["model"], "--run-name", "base"]), world)
    return runs.run_name(config, base, vars(args))


@dataclasses.dataclass
class Run:
    """Everything a training step touches; checkpoints store all but the encoders and wrappers."""

    model: torch.nn.Module  # the bare SiT / MMDiT: saved, EMA'd and clipped
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


def build_run(config, dataset, device, world):
    """Model, EMA, optimizers, scalers, encoders and discriminator of a resolved config; the model
    is a SiT on class labels (dataset: the data or its number of classes) or an MMDiT on COCO
    captions (runs.build_network)."""
    align = losses.AlignConfig(**config["align_config"])
    encoders = []
    if align.needs_encoder:
        with cluster.failing("--enc-type " + config["enc_type"]):
            encoders = load_encoders(config["enc_type"], device, config["resolution"],
                                     config.get("enc_weights"))
    model = runs.build_network(config, dataset, [e.embed_dim for e in encoders]).to(device)

    def wrap(module):
        """DDP under torchrun (gradient all-reduce), the bare module otherwise."""
        if world == 1:
            return module
        # --align-until: the heads leave the graph at that step, which plain DDP refuses
        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
                   find_unused_parameters=bool(config["align_until"]))

    fp16 = config["precision"] == "fp16"
    run = Run(
        model=model, ema=copy.deepcopy(model).eval().requires_grad_(False),  # DiT's: a frozen copy
        opt=torch.optim.AdamW(model.parameters(), lr=config["lr"],
                              betas=tuple(config["adam_betas"]),
                              weight_decay=config["weight_decay"], fused=device.type == "cuda"),
        scaler=torch.amp.GradScaler(device.type, enabled=fp16),
        gen=torch.Generator(device).manual_seed(config["seed"]), encoders=encoders,
        forward_model=torch.compile(wrap(model)) if config["compile"] else wrap(model),
    )
    if align.adv_weight:
        with cluster.failing("the discriminator's ResNet-18 trunk (--disc-pretrained 1; offline: "
                             "--disc-weights)"):
            disc, run.disc_opt = build_discriminator(
                model.config["z_dims"][0], bool(config["disc_pretrained"]), config["disc_lr"],
                tuple(config["disc_betas"]), sync_bn=bool(config["disc_sync_bn"]),
                weights=config.get("disc_weights"))
        run.disc = disc.to(device)
        run.disc_scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        run.forward_disc = wrap(run.disc)
    return run


def autocast_args(precision, device):
    """torch.autocast keywords for --precision (fp32: autocast off)."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return dict(device_type=device.type, dtype=dtype, enabled=precision != "fp32")


@torch.no_grad()
def update_ema(ema, model, decay):
    """DiT / REPA EMA: ema <- decay * ema + (1 - decay) * model, one fused lerp over all tensors."""
    targets = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(list(ema.parameters()), targets, 1 - decay)


# ----------------------------------------------------------------------------------------------
# One training step


def train_step(run, config, align, batch, step, rows):
    """One generator update (and D's, on its schedule) on this rank's share `rows` of the global
    batch; returns what to log."""
    images, moments, labels = batch
    device, size = moments.device, run.model.config["input_size"]
    shape, n = (run.model.in_channels, size, size), config["batch_size"]
    if config["align_until"] and step >= config["align_until"]:  # HASTE: alignment has ended
        align = losses.align_config("none", path_type=align.path_type, weighting=align.weighting)

    # Every random draw of the step is made for the global batch, then this rank's rows are taken:
    # the run does not depend on the number of GPUs. x0 = (mean + std * eps) * 0.18215 (REPA).
    noise = losses.draw_noise(n, shape, align, config["class_dropout"], device, run.gen)[rows]
    x0 = sample_latent(moments, torch.randn(n, *shape, device=device, generator=run.gen)[rows])

    # The loss of SARA (11) / SRA^2 (8); the frozen encoders see the clean image.
    amp = autocast_args(config["precision"], device)
    with torch.autocast(**amp):
        with torch.no_grad():
            z_encs = [enc(images) for enc in run.encoders] if align.needs_encoder else []
        out = losses.training_losses(run.forward_model, x0, labels, z_encs, align, noise, run.disc,
                                     run.ema)  # the EMA: SRA's teacher

    # Backward, unscale, clip the true gradients; a non-finite step is skipped (the EMA too).
    run.scaler.scale(out.total).backward()
    run.scaler.unscale_(run.opt)
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

    # SARA's discriminator: its own step, once per --disc-every, on detached tokens, SARA (9).
    if run.disc is not None and align.adv_weight and is_disc_step(step, config["disc_every"]):
        with torch.autocast(**amp):
            d_loss, d_acc = losses.discriminator_step_loss(run.forward_disc, z_encs[0],
                                                           out.h_dens[0], align.disc_bn)
        run.disc_scaler.scale(d_loss).backward()
        run.disc_scaler.step(run.disc_opt)
        run.disc_scaler.update()
        run.disc_opt.zero_grad(set_to_none=True)
        record.update(disc_loss=d_loss.detach().float(), disc_acc=d_acc.detach().float())
    return record


# ----------------------------------------------------------------------------------------------
# Evaluation during training: sample.py's samples, fid.py's network and scores


def evaluate(ema, vae, evaluator, config, step, metrics, rank, world, device, condition):
    """fid.py's five numbers for `sample.py --seed SEED --cfg EVAL_CFG --num-steps EVAL_STEPS
    --num-samples EVAL_SAMPLES`, as one metrics row; condition: data.sampling_condition's (text
    runs: the ODE on the val split's captions)."""
    t_start, n = time.time(), config["eval_samples"]
    scores = sample.score(ema, vae, evaluator, n, config["batch_size"] // world, rank, world,
                          seed=config["seed"], cfg=config["eval_cfg"],
                          num_steps=config["eval_steps"], device=device, **condition)
    if rank == 0:
        metrics.write(dict(step=step, **scores, eval_samples=n, eval_cfg=config["eval_cfg"],
                           eval_steps=config["eval_steps"], eval_sec=time.time() - t_start,
                           inception_sha256=evaluator.digest))
    cluster.barrier(world)


# ----------------------------------------------------------------------------------------------
# The loop


def main(args):
    """Train (bad input ends in one line); returns the run folder."""
    with cluster.main_errors("train.py"), cluster.stop_signals(args.preempt_signals) as stop:
        return train(args, stop)


def train(args, stop):
    # Setup: process group, configuration, data, networks; the run folder once all of it worked
    rank, world, device = cluster.init()
    runs.setup_logging(rank)
    config = resolve_config(args, world)
    run_dir = os.path.join(config["out"], config["run_name"])
    runs.check_outputs(config)  # --out writable, logger packages installed
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(config["tf32"])
    torch.manual_seed(config["seed"])  # the same initial weights on every rank and in every run
    dataset = build_dataset(config)
    run = build_run(config, dataset, device, world)
    condition = sampling_condition(config, dataset)  # text runs: captions of grids and evaluations
    config["model_config"] = run.model.config
    config["random_components"] = runs.random_components(config, dataset, run)  # never silent
    vae = None
    if (rank == 0 and config["sample_every"] or config["eval_every"]) and config["vae"] != "none":
        with cluster.failing(f"--vae {config['vae']}"):
            vae = load_vae(config["vae"], device)
    evaluator = None
    if config["eval_every"]:  # a given --eval-weights file is used whatever its checksum, and named
        with cluster.failing("the FID Inception or --eval-ref (offline: --eval-weights FILE)"):
            evaluator = fid.Evaluator(config["eval_ref"], config.get("eval_weights"), "", device,
                                      rank, world)

    # Resume from the newest readable checkpoint (a fresh start has none)
    runs.open_log(run_dir, rank)
    typed = {k for k, v in vars(args).items() if v != vars(parse_args([]))[k]}
    pos = runs.resume(run_dir, run, config, device, world, typed)
    evaluated = {row["step"] for row in runs.read_metrics(run_dir) if "fid" in row} | {0}
    if runs.already_complete(run_dir, config, pos, evaluated):
        cluster.close(world)
        return run_dir
    runs.write_config(run_dir, config, rank)  # and the stand-ins, loudly
    metrics = runs.Metrics(run_dir, config, pos.step, rank)
    cluster.barrier(world)  # rank 0 has trimmed metrics.jsonl to the resumed step

    # Data: global batch i is a fixed slice of a per-epoch seeded permutation, from pos.batch on
    loader = TrainingBatches(dataset, config, rank, world, pos.batch, device, run_dir)
    local = config["batch_size"] // world
    rows = slice(rank * local, (rank + 1) * local)  # this rank's share of each global draw
    align = losses.AlignConfig(**config["align_config"])
    stats, t_last = {}, time.time()
    run.model.train()
    bar = tqdm(total=config["max_steps"], initial=pos.step, disable=rank != 0, dynamic_ncols=True)
    for batch in loader:
        # Evaluate before the step: a run killed during an evaluation repeats it when resumed
        if evaluator and pos.step % config["eval_every"] == 0 and pos.step not in evaluated:
            evaluate(run.ema, vae, evaluator, config, pos.step, metrics, rank, world, device,
                     condition)
            evaluated.add(pos.step)
        if pos.step >= config["max_steps"]:
            break

        # One step; a burst of non-finite steps rolls back to the newest checkpoint before it
        epoch = pos.batch // loader.per_epoch  # SRA's weight follows the epochs of the data
        record = train_step(run, config, losses.at_epoch(align, epoch), batch, pos.step, rows)
        pos.step, pos.batch = pos.step + 1, pos.batch + 1
        pos.bad_in_a_row = pos.bad_in_a_row + 1 if record["bad_steps"] else 0
        bar.update(1)
        for k, v in record.items():
            stats.setdefault(k, []).append(v)
        if pos.bad_in_a_row >= config["max_bad_steps"]:
            runs.roll_back(run_dir, run, config, pos, metrics, device, rank, world)
            stats, t_last, bar.n = {}, time.time(), pos.step
            continue

        # Log the means since the last row (over steps and ranks), draw the EMA's grid
        if pos.step % config["log_every"] == 0 or pos.step == config["max_steps"]:
            row, t_last = runs.metrics_row(stats, pos.step, config, t_last, world), time.time()
            stats = {}
            loader.update(row)  # unreadable samples: counted, listed, a stop past the bound
            metrics.write(row)
        if config["sample_every"] and pos.step % config["sample_every"] == 0 and rank == 0:
            sample.write_grid(os.path.join(run_dir, "samples", f"{pos.step:07d}.png"), run.ema, vae,
                              seed=config["seed"], num_steps=config["sample_steps"], device=device,
                              **condition)

        # Checkpoint periodically, at the end, and when a preemption signal reached any rank
        preempted = stop.agreed(world)  # one host all-reduce per step: every rank stops together
        if pos.step % config["ckpt_every"] == 0 or pos.step == config["max_steps"] or preempted:
            runs.save_checkpoint(run_dir, config, run, pos, device, rank, world)
        if preempted:
            log.info("preempted (%s): stopped after step %d with a checkpoint; re-run the same "
                     "command to continue", stop.signal or "another rank's signal", pos.step)
            break
    bar.close()
    loader.update()
    metrics.close()
    cluster.close(world)
    return run_dir


if __name__ == "__main__":
    main(parse_args())
