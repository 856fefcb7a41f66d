"""Sample a trained SiT (class labels) or MMDiT (captions): Euler-Maruyama SDE (default) or Euler /
Heun ODE, with classifier-free guidance.

    python sample.py --cfg 1.35                                               # grid, newest run
    python sample.py --ckpt runs/x --cfg 1.35                                 # ... of run folder x
    torchrun --nproc_per_node 8 sample.py --ckpt last.pt --num-samples 50000  # npz for fid.py
    python sample.py --ckpt runs/t2i --prompt "a red bus" --prompt "two dogs" # text-to-image grid
    torchrun --nproc_per_node 8 sample.py --ckpt runs/t2i --coco-val data/coco  # 40,192 for FID

The samplers reproduce REPA's samplers.py and samplers_t2i.py (t=1 is noise, t=0 data) on the path
the checkpoint was trained on (linear or cosine). Every sample's initial noise, label and SDE noise
come from its own generator seeded by (seed, global index), so the images do not depend on the
number of processes or the batch size (beyond fp32 kernel noise, which can flip a rare uint8
rounding when batches are composed differently), and an interrupted run resumes where it stopped.
With captions (a text-to-image checkpoint) the defaults are SRA^2 Table 4's: ODE, 50 steps,
guidance 2.0, the empty caption's features as the null condition.
--vae none (smoke runs) saves the final scaled latents instead of images: [-4, 4] mapped to uint8.
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys
import zipfile

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import cluster
import losses
import runs
from cluster import UserError, at_least, fraction, write_atomic
from encoders import TINY_RANDOM, decode, load_text_encoder, load_vae, to_uint8

LATENT_RANGE = 4.0  # --vae none: scaled latents (unit-order std) in [-4, 4] map linearly to uint8

# ----------------------------------------------------------------------------------------------
# Samplers: functions of a velocity function v(x, t[, t_step]) -> (B, C, H, W); float64 state,
# as REPA's


def score_from_velocity(v, x, t, path_type="linear"):
    """Score of x_t from the velocity at float time t (REPA's get_score_from_velocity).

    x_t = alpha x0 + sigma eps and v = alpha' x0 + sigma' eps give eps = (x - (alpha / alpha') v) /
    (sigma - (alpha / alpha') sigma'); the score is -eps / sigma. Linear path: -((1 - t) v + x) / t.
    """
    alpha, sigma, d_alpha, d_sigma = losses.interpolant(
        torch.tensor(t, dtype=torch.float64), path_type
    )
    ratio = alpha / d_alpha
    return (ratio * v - x) / (sigma**2 - ratio * d_sigma * sigma)  # (B, C, H, W)


def euler_maruyama(velocity, x, num_steps=250, noise=torch.randn_like, path_type="linear"):
    """Euler-Maruyama SDE from t=1 to 0 (REPA's euler_maruyama_sampler); noise(x) draws N(0, I)."""
    t_steps = torch.linspace(1, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]
    x = x.to(torch.float64)  # (B, C, H, W)
    for i, (t, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        dt, w = t_next - t, 2 * t  # w(t) = 2t: the diffusion coefficient REPA uses on every path
        v = velocity(x, t)
        x_next = x + (v - 0.5 * w * score_from_velocity(v, x, t, path_type)) * dt
        if i < num_steps - 1:  # the last step (0.04 -> 0) returns the mean, without noise
            x_next = x_next + math.sqrt(w) * math.sqrt(abs(dt)) * noise(x)
        x = x_next
    return x


def euler_ode(velocity, x, num_steps=50, heun=False):
    """Euler (or Heun) probability-flow ODE on linspace(1, 0, N+1) (REPA's euler_sampler)."""
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    x = x.to(torch.float64)  # (B, C, H, W)
    for i, (t, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        d = velocity(x, t)
        x_next = x + (t_next - t) * d
        if heun and i < num_steps - 1:  # no correction on the last step into t=0 (as REPA and EDM)
            # REPA decides guidance once per step, at its start
            d_next = velocity(x_next, t_next, t)
            x_next = x + (t_next - t) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


def guided_velocity(model, y, cfg=1.0, guidance_low=0.0, guidance_high=1.0, null=None):
    """Velocity function of a model for conditions y, with CFG on all channels inside the interval.

    y: class labels (B,) or text context (B, 77, D); null: the unconditional condition of the same
    shape (default: the model's null class; for text, the empty caption's features).
    """
    null = model.null_condition(y) if null is None else null  # REPA's y_null

    def velocity(x, t, t_step=None):
        """x (B, C, H, W) float64 at time t -> v float64; t_step (default t) decides whether to
        guide."""
        t_step = t if t_step is None else t_step
        guide = cfg > 1 and guidance_low <= t_step <= guidance_high
        xs, ys = (torch.cat([x, x]), torch.cat([y, null])) if guide else (x, y)  # one forward of 2B
        ts = torch.full((len(xs),), t, dtype=torch.float32, device=x.device)  # (B',)
        v = model(xs.float(), ts, ys, align=False)[0].double()  # (B', C, H, W)
        if guide:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg * (v_cond - v_uncond)
        return v

    return velocity


# ----------------------------------------------------------------------------------------------
# Per-sample randomness and images


def sample_seed(seed, index):
    """Seed of global sample `index`'s own generator: a stable 63-bit hash of (seed, index)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:8], "little") >> 1


class Prompts:
    """The text-to-image condition: captions used in turn by global sample index, encoded when
    sampled; the empty caption's features are the null condition (REPA's y_null)."""

    def __init__(self, encoder, captions):
        self.encoder, self.captions, self.null = encoder, list(captions), None

    def caption(self, index):
        """Global sample index's caption."""
        return self.captions[index % len(self.captions)]

    def context(self, indices, device):
        """(B, 77, D) features of the samples' captions and the (B, 77, D) null features."""
        y = self.encoder.encode([self.caption(i) for i in indices]).to(device)  # (B, 77, D)
        if self.null is None:
            self.null = self.encoder.encode([""]).to(device)  # (1, 77, D)
        return y, self.null.to(y).expand_as(y)


def read_captions(path):
    """Captions of a file: a JSON list of strings (the captions.json sample.py writes beside its
    PNGs) or a text file with one caption per line (blank lines skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read captions ({type(e).__name__}: {e})") from e
    if path.endswith(".json"):
        try:
            captions = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not JSON ({e})") from e
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise UserError(f"{path}: expected a JSON list of caption strings")
    else:
        captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise UserError(f"{path}: no captions")
    return captions


@torch.no_grad()
def sample_latents(model, indices, *, seed=0, mode="sde", num_steps=250, cfg=1.0, guidance_low=0.0,
                   guidance_high=1.0, class_labels=None, prompts=None, device="cpu"):
    """Final scaled latents (B, C, H, W) float64 of the given global sample indices.

    class_labels: labels used in turn instead of the drawn ones (the noise stays the same).
    prompts: a Prompts for a text-to-image model (its captions condition, no label is drawn).
    """
    gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]
    c, size = model.config["in_channels"], model.config["input_size"]
    # Drawn on the CPU in REPA's order (noise, label, then SDE noise): images do not depend
    # on the device.
    x = torch.cat([torch.randn(1, c, size, size, generator=g) for g in gens])  # (B, C, H, W)
    if prompts is not None:  # REPA's generate_t2i.py draws the noise alone
        y, null = prompts.context(indices, device)  # (B, 77, D) each
    else:
        y = torch.cat([torch.randint(0, model.num_classes, (1,), generator=g) for g in gens])
        if class_labels:
            y = torch.tensor([class_labels[i % len(class_labels)] for i in indices])
        y, null = y.to(device), None
    velocity = guided_velocity(model, y, cfg, guidance_low, guidance_high, null)
    x = x.to(device)
    if mode == "sde":

        def noise(like):
            """SDE noise (B, C, H, W): each sample's next draw from its own generator."""
            draws = [torch.randn(like[:1].shape, generator=g, dtype=like.dtype) for g in gens]
            return torch.cat(draws).to(device)

        return euler_maruyama(velocity, x, num_steps, noise, model.config["path_type"])
    return euler_ode(velocity, x, num_steps, heun=mode == "heun")


@torch.no_grad()
def generate_images(model, vae, indices, *, quantize="floor", **sampling):
    """uint8 images (B, H, W, 3) of global sample indices (sample_latents' keywords in sampling);
    with no VAE the latents as (B, h, w, 4)."""
    latents = sample_latents(model, indices, **sampling).float()  # (B, C, h, w)
    rounding = quantize == "round"  # default floor: REPA's generate.py, which made the papers' FIDs
    images = (decode(vae, latents, rounding) if vae is not None
              else to_uint8(latents / LATENT_RANGE, rounding))
    return images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)


def tile(images, cols=None):
    """(N, H, W, C) uint8 -> one (rows*H, cols*W, C) grid, row-major, unused cells black."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cells = np.zeros((rows * cols, h, w, c), np.uint8)
    cells[:n] = images
    return (
        cells.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    )


def write_grid(path, model, vae, num_images=16, batch_size=64, progress=False, **sampling):
    """Samples 0..n-1 (the first n of an npz with the same settings) as one PNG grid; train.py's
    sample grids are this grid."""
    batches = [range(i, min(i + batch_size, num_images)) for i in range(0, num_images, batch_size)]
    images = np.concatenate([generate_images(model, vae, list(b), **sampling)
                             for b in tqdm(batches, "grid", disable=not progress)])
    with cluster.disk_errors(os.path.dirname(os.path.abspath(path))):
        write_atomic(path, lambda f: Image.fromarray(tile(images)).save(f, format="PNG"))


def score(model, vae, evaluator, num_samples, batch_size, rank=0, world=1, **sampling):
    """An fid.Evaluator's numbers for the samples `sample.py --num-samples N --batch-size B`
    would write, none written: rank r makes and embeds batches r, r + world, ... as fid.py reads
    them."""
    mine = range(rank, -(-num_samples // batch_size), world)
    batches = (generate_images(model, vae, list(range(k * batch_size,
                                                      min(num_samples, (k + 1) * batch_size))),
                               **sampling) for k in mine)
    return evaluator(batches, len(mine), world)

# ----------------------------------------------------------------------------------------------
# Many samples: one PNG per sample (resumable), then ADM's npz


def check_settings(folder, settings, rank):
    """Refuse to resume a folder written with other settings; rank 0 records them for the next run.
    """
    path = os.path.join(folder, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        if changed:
            raise UserError(
                f"{folder} holds samples made with other settings ({', '.join(changed)}); "
                "use another --out or delete it"
            )
    # never mix our PNGs into (or count) someone else's files; .tmp: a write an interrupt cut
    elif any(not f.endswith(".tmp") for f in os.listdir(folder)):
        raise UserError(f"{folder} already holds files not written by sample.py; use another --out")
    elif rank == 0:
        write_atomic(path, lambda f: f.write(json.dumps(settings, indent=1).encode()))


def written_indices(folder):
    """Global indices whose PNG is already in folder (complete files only: written atomically)."""
    return {int(m.group(1)) for f in os.listdir(folder) if (m := re.fullmatch(r"(\d{6})\.png", f))}


def write_npz(folder, num_samples, out):
    """Stack folder's PNGs 0..N-1 into out's arr_0 (N, H, W, C) uint8 via a disk memmap, then zip
    it."""
    first = np.asarray(Image.open(os.path.join(folder, f"{0:06d}.png")))  # (H, W, C)
    # arr_0.npy, then its copy in the zip; a memmap that hits a full disk dies of SIGBUS
    cluster.require_space(folder, npz_bytes(num_samples, first.shape), f"the npz of "
                          f"{num_samples} samples (PNGs kept: run the same command again)")
    npy = os.path.join(folder, "arr_0.npy")
    arr = np.lib.format.open_memmap(
        npy, mode="w+", dtype=np.uint8, shape=(num_samples, *first.shape)
    )
    for i in tqdm(range(num_samples), "npz"):
        arr[i] = np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png")))
    arr.flush()
    del arr  # close the memmap before zipping its file

    def zip_npy(f):
        """np.savez's layout (one stored arr_0.npy), without holding 50k images in memory."""
        with zipfile.ZipFile(f, "w", allowZip64=True) as zf:
            zf.write(npy, "arr_0.npy")

    write_atomic(out, zip_npy)
    os.remove(npy)
    print(f"wrote {out} [arr_0: {num_samples} x {' x '.join(map(str, first.shape))} uint8]")


def npz_bytes(num_samples, shape):
    """Disk space write_npz needs: the (N, H, W, C) uint8 array twice (its .npy and the zip)."""
    return 2 * num_samples * math.prod(shape)


def write_samples(out, num_samples, settings, model, vae, batch_size, rank, world, sampling,
                  captions=None):
    """This rank's share of the missing samples as PNGs in out's folder; then rank 0 writes the npz.

    captions: every sample's caption (text-to-image), written as captions.json beside the
    PNGs for pickscore.py.
    """
    folder = os.path.splitext(out)[0]
    os.makedirs(folder, exist_ok=True)
    if rank == 0:  # rank 0 vets the folder and records the settings before the others compare
        check_settings(folder, settings, rank)
        if captions is not None:
            write_atomic(os.path.join(folder, "captions.json"),
                         lambda f: f.write(json.dumps(captions, indent=0).encode()))
    cluster.barrier(world)
    if rank:
        check_settings(folder, settings, rank)
    todo = sorted(set(range(num_samples)) - written_indices(folder))
    cluster.barrier(world)  # every rank listed the folder before any rank writes into it
    mine = todo[rank::world]
    # closed on the way out of an interrupt too, so its last line comes before the message
    with tqdm(total=len(mine), desc=f"sampling (rank 0 of {world})", disable=rank != 0) as bar:
        for start in range(0, len(mine), batch_size):
            batch = mine[start:start + batch_size]
            for i, image in zip(batch, generate_images(model, vae, batch, **sampling)):
                png = os.path.join(folder, f"{i:06d}.png")
                with cluster.disk_errors(folder):
                    write_atomic(png, lambda f: Image.fromarray(image).save(f, format="PNG"))
            bar.update(len(batch))
    cluster.barrier(world)  # all shares are on disk
    if rank == 0:
        write_npz(folder, num_samples, out)


# ----------------------------------------------------------------------------------------------
# Command line


def parse_labels(text):
    """'207,360' -> [207, 360]."""
    try:
        labels = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(c < 0 for c in labels):
        raise argparse.ArgumentTypeError(f"{text}: labels must be >= 0")
    return labels


# SARA / SRA^2 (ImageNet): SDE with 250 steps; SRA^2 Table 4 (MS-COCO): ODE with 50 steps
# and guidance 2.0
CLASS_DEFAULTS = dict(mode="sde", num_steps=250, cfg=1.0)
TEXT_DEFAULTS = dict(mode="ode", num_steps=50, cfg=2.0)
COCO_VAL_SAMPLES = 40192  # REPA's generate_t2i.py: 314 batches of 128 of the 40,504 val images


def parser():
    """The command line's options."""
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", default=None,
      help="checkpoint file (train.py's, REPA's, or a bare SiT state dict), a run folder (its "
           f"newest checkpoint), or {runs.REPA_NAME} (REPA's published weights, downloaded once); "
           f"default: the newest checkpoint of the most recently written run under {runs.RUNS}/, "
           f"else {runs.REPA_NAME}")
    a("--weights", choices=["ema", "model"], default="ema", help="which weights of the checkpoint")
    a("--mode", choices=["sde", "ode", "heun"], default=None,
      help="Euler-Maruyama SDE (the papers' sampler), Euler ODE, or Heun ODE (2N-1 evaluations); "
           "default: sde, with text ode (SRA^2 Table 4)")
    a("--num-steps", type=at_least(1), default=None,
      help="sampler steps; default: 250 (the papers' SDE), with text 50 (SRA^2 Table 4's ODE)")
    a("--cfg", type=cluster.at_least(1.0, float), default=None,
      help="classifier-free guidance scale on all 4 channels (1 = off); default: 1, with text 2.0 "
           "(SRA^2 Table 4)")
    a("--guidance-low", type=fraction(), default=0.0,
      help="guide only while t >= this (t=1 is noise)")
    a("--guidance-high", type=fraction(), default=1.0,
      help="guide only while t <= this (REPA*: 0.7)")
    condition = p.add_mutually_exclusive_group()
    condition.add_argument(
        "--class-labels", type=parse_labels, default=None,
        help="comma-separated labels used in turn (e.g. 207,360,387); default: random labels")
    condition.add_argument(
        "--prompt", action="append", default=None,
        help="text-to-image: a caption (repeatable; used in turn), e.g. --prompt 'a red bus'")
    condition.add_argument(
        "--prompts", default=None,
        help="text-to-image: a file of captions, one per line, used in turn")
    condition.add_argument(
        "--coco-val", default=None,
        help="text-to-image FID: the data.py COCO folder (its val/captions.json); sample i gets "
             "one caption of val image i drawn with --seed; --num-samples default "
             f"{COCO_VAL_SAMPLES} (REPA's count)")
    a("--text-encoder-path", default=None,
      help="text-to-image: local folder of the run's text encoder (offline machines); default: "
           "the run's text encoder by name")
    a("--seed", type=at_least(0), default=0,
      help="global seed; sample i always gets the same noise and label")
    a("--num-samples", type=at_least(1), default=None,
      help="write this many samples as PNGs plus one ADM .npz (e.g. 50000); default: one PNG grid")
    a("--grid-size", type=at_least(1), default=None,
      help="images in the grid (default: one per --class-labels entry or prompt, else 16)")
    a("--batch-size", type=at_least(1), default=64, help="samples per forward, per process")
    a("--vae", default=None,
      help="ema | mse (sd-vae-ft-*), a hub id or folder, tiny-random (smoke), or none (save "
           "latents); default: the --vae of the train.py run, else ema")
    a("--quantize", choices=["floor", "round"], default="floor",
      help="[-1, 1] -> uint8: floor truncates 255 (x + 1) / 2 as REPA's generate.py, which made "
           "the papers' FIDs (default); round as DiT")
    a("--out", default=None,
      help="output .png (grid) or .npz; default under samples/, named by settings")
    a("--device", default=None, help="cpu or cuda (default: cuda if available)")
    a("--tf32", type=int, choices=[0, 1], default=1, help="TF32 matmuls on GPU")
    a("--compile", type=int, choices=[0, 1], default=0, help="1: torch.compile the model")
    return p


def parse_args(argv=None):
    """Command-line options; --ckpt resolved to a file path (nothing is downloaded yet)."""
    p = parser()
    args = p.parse_args(argv)
    text = bool(args.prompt or args.prompts or args.coco_val)
    for k, v in (TEXT_DEFAULTS if text else CLASS_DEFAULTS).items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    if args.coco_val and args.num_samples is None:
        args.num_samples = COCO_VAL_SAMPLES
    if args.guidance_low > args.guidance_high:
        p.error(f"--guidance-low {args.guidance_low} > --guidance-high {args.guidance_high}: "
                "the interval is empty")
    suffix = ".npz" if args.num_samples else ".png"
    if args.out is not None and not args.out.endswith(suffix):
        p.error(f"--out {args.out}: must end in {suffix} "
                f"{'with' if args.num_samples else 'without'} --num-samples")
    return args


SAMPLING = ("seed", "mode", "num_steps", "cfg", "guidance_low", "guidance_high", "class_labels")


def default_out(args, captions=None):
    """samples/<run>-<step or file>-<settings>.png or .npz: different settings never share a file.
    """
    stem = os.path.splitext(os.path.basename(args.ckpt))[0]
    parent, folder = os.path.split(os.path.dirname(os.path.abspath(args.ckpt)))
    stem = f"{os.path.basename(parent)}-{stem}" if folder == "checkpoints" else stem  # run-step
    text = "-cocoval" if args.coco_val else f"-prompts{digest(captions)[:8]}" if captions else ""
    name = (f"{stem}-{args.weights}-{args.mode}{args.num_steps}-cfg{args.cfg}-g{args.guidance_low}-"
            f"{args.guidance_high}-vae-{args.vae}{text}-seed{args.seed}")
    return os.path.join("samples", name + (".npz" if args.num_samples else ".png"))


def digest(captions):
    """sha256 of a caption list: a resumed folder must hold samples of the same captions."""
    return hashlib.sha256(json.dumps(captions).encode()).hexdigest()


def check_condition(args, text_encoder, path):
    """Refuse a condition the checkpoint cannot take: captions for a class-conditional model,
    labels or no caption for a text-to-image one (text_encoder: runs.text_encoder_of)."""
    flags = (("--prompt", args.prompt), ("--prompts", args.prompts), ("--coco-val", args.coco_val))
    given = next((flag for flag, value in flags if value), None)
    if text_encoder is None and given:
        raise UserError(f"{given} needs a text-to-image checkpoint, but {path} is "
                        "class-conditional; use --class-labels or no condition")
    if text_encoder and not given:
        raise UserError(f"{path} is text-to-image (text encoder {text_encoder}): give --prompt "
                        "TEXT, --prompts FILE or --coco-val DIR"
                        + (", not --class-labels" if args.class_labels else ""))


def coco_val_captions(folder, num_samples, seed):
    """Sample i's caption: one caption of val image i of data.py's COCO folder (val/captions.json,
    images in sorted COCO id order as U-ViT), drawn with numpy's default_rng(seed); the same
    whatever num_samples and the number of processes."""
    path = os.path.join(folder, "val", "captions.json")
    try:
        with open(path, encoding="utf-8") as f:
            per_image = [list(item[2]) for item in json.load(f)]  # [id, file name, [captions]]
    except (OSError, ValueError, TypeError, IndexError) as e:
        raise UserError(f"--coco-val {folder}: cannot read {path} ({type(e).__name__}: {e}); make "
                        "the folder with data.py --dataset coco (its val split)") from e
    if not per_image or not all(per_image) or not all(
            isinstance(c, str) for caps in per_image for c in caps):
        raise UserError(f"{path}: expected [[image id, file name, [caption, ...]], ...] with at "
                        "least one caption per image")
    if num_samples > len(per_image):
        raise UserError(f"--num-samples {num_samples}: {path} lists {len(per_image)} val images, "
                        "one sample per image")
    picks = np.random.default_rng(seed).integers(0, [len(c) for c in per_image])  # (images,)
    return [caps[k] for caps, k in zip(per_image[:num_samples], picks.tolist())]


def load_prompts(args, text_encoder, run_config, rank, device):
    """The Prompts of a text-to-image run: the captions, the run's text encoder (a local folder
    from --text-encoder-path), an over-long caption said once (by rank 0, before sampling)."""
    captions = (coco_val_captions(args.coco_val, args.num_samples, args.seed) if args.coco_val
                else read_captions(args.prompts) if args.prompts else args.prompt)
    path = args.text_encoder_path or run_config.get("text_encoder_path")
    with cluster.failing(f"text encoder {text_encoder}" + (f" from {path}" if path else "")):
        encoder = load_text_encoder(name=text_encoder, path=path, device=device,
                                    random=text_encoder == TINY_RANDOM)
    if rank:
        encoder.truncation_said = True  # rank 0 says it
    else:
        encoder.warn_truncation(sorted(set(captions)))
    return Prompts(encoder, captions)


def main(args):
    """Load the model (and VAE), then write a grid or num_samples images plus their npz; Ctrl-C
    says what is kept and how to go on, exit status 130."""
    with cluster.main_errors("sample.py"):
        try:
            run_sampling(args)
        except KeyboardInterrupt:
            folder = args.out and args.num_samples and os.path.splitext(args.out)[0]
            kept = (f"{len(written_indices(folder))} of {args.num_samples} samples are in "
                    f"{folder}; run the same command again to make the rest"
                    if folder and os.path.isdir(folder)
                    else "nothing was written; run the same command again")
            print(f"\nsample.py: interrupted: {kept}", file=sys.stderr)
            raise SystemExit(130) from None


def check_outputs(args, sample_shape):
    """Before any sampling: --out is no folder, its folder (and the PNG folder) take files, and the
    disk has room for the npz; one line naming the folder otherwise."""
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder: give a file path")
    cluster.check_writable(os.path.dirname(os.path.abspath(args.out)))
    if args.num_samples:
        folder = os.path.splitext(args.out)[0]
        cluster.check_writable(folder)
        # the PNGs are written one by one (a full disk then stops with one line); the npz at once
        cluster.require_space(folder, npz_bytes(args.num_samples, sample_shape),
                              f"the npz of {args.num_samples} samples")


def run_sampling(args):
    """main, raising UserError for bad input."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and args.num_samples is None:
        raise UserError(
            "the grid is made by one process: run without torchrun, or give --num-samples"
        )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    args.ckpt, why = runs.resolve_ckpt(args.ckpt)
    rank, world, device = cluster.init(args.device)
    if rank == 0:
        print(f"sample.py: checkpoint {args.ckpt} ({why})", flush=True)
    if args.ckpt == runs.repa_path() and not os.path.exists(args.ckpt):
        if rank == 0:  # one download; torchrun stops the other ranks if it fails
            runs.download_repa(args.ckpt)
        cluster.barrier(world)
    ckpt = runs.read_checkpoint(args.ckpt)
    text_encoder = runs.text_encoder_of(ckpt)
    check_condition(args, text_encoder, args.ckpt)
    model = runs.build_model(ckpt, args.ckpt, args.weights)
    run_config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    if text_encoder and not run_config and rank == 0:  # REPA's train_t2i.py, a bare state dict
        print(f"sample.py: {args.ckpt} records no text encoder: assuming {text_encoder} (CLIP "
              "ViT-L/14, REPA's); --text-encoder-path DIR gives a local copy", flush=True)
    args.vae = args.vae or run_config.get("vae") or "ema"  # a run's latents belong to its VAE
    prompts = text_encoder and load_prompts(args, text_encoder, run_config, rank, device)
    args.out = args.out or default_out(args, prompts and prompts.captions)
    if not prompts:
        bad = [c for c in args.class_labels or [] if not 0 <= c < model.num_classes]
        if bad:
            raise UserError(
                f"--class-labels {bad}: the model has classes 0..{model.num_classes - 1}")
        if args.cfg > 1 and model.y_embedder.embedding_table.num_embeddings <= model.num_classes:
            raise UserError("--cfg > 1 needs a null class, but the model was trained without "
                            "label dropout; use --cfg 1")
    side, channels = model.config["input_size"], model.config["in_channels"]
    if rank == 0:
        check_outputs(args, (side, side, channels) if args.vae == "none" else
                      (8 * side, 8 * side, 3))
    model = model.to(device)
    if args.compile:
        model = torch.compile(model)
    with cluster.failing(f"--vae {args.vae}"):
        vae = None if args.vae == "none" else load_vae(args.vae, device)
    sampling = {k: getattr(args, k) for k in SAMPLING} | dict(
        quantize=args.quantize, device=device, prompts=prompts or None)
    if args.num_samples is None:
        n = args.grid_size or len(args.class_labels or prompts and prompts.captions or []) or 16
        write_grid(args.out, model, vae, n, args.batch_size, progress=True, **sampling)
        print(f"wrote {args.out} ({n} samples)")
    else:
        settings = {k: getattr(args, k) for k in (*SAMPLING, "weights", "vae", "quantize")}
        settings["ckpt"] = os.path.abspath(args.ckpt)
        captions = None
        if prompts:
            captions = [prompts.caption(i) for i in range(args.num_samples)]
            settings |= dict(text_encoder=text_encoder, captions_sha256=digest(captions))
        write_samples(args.out, args.num_samples, settings, model, vae, args.batch_size, rank,
                      world, sampling, captions)
    cluster.close(world)


if __name__ == "__main__":
    main(parse_args())
