"""Sample from a trained SiT: Euler-Maruyama SDE (default) or Euler / Heun ODE, with classifier-free guidance.

    python sample.py --cfg 1.35                                                  # grid from the newest run
    python sample.py --ckpt runs/x --cfg 1.35                                    # ... of run folder x
    torchrun --nproc_per_node 8 sample.py --ckpt last.pt --num-samples 50000     # samples.npz for fid.py

The samplers reproduce REPA's samplers.py (t=1 is noise, t=0 data) on the path the checkpoint was trained
on (linear or cosine). Every sample's initial noise, label and SDE noise come from its own generator seeded
by (seed, global index), so the images do not depend on the number of processes or the batch size (beyond
fp32 kernel noise, which can flip a rare uint8 rounding when batches are composed differently), and an
interrupted run resumes where it stopped.
--vae none (smoke runs) saves the final scaled latents instead of images: [-4, 4] mapped to uint8, h x w x 4.
"""

import argparse
import hashlib
import json
import math
import os
import re
import zipfile

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import cluster
import losses
from cluster import write_atomic
from model import SIZES, SiT, size_config
from encoders import decode, load_vae, to_uint8

REPA_ENCODER_DEPTH = 8  # REPA's --encoder-depth default, for checkpoints that carry no args
REPA_NAME = "repa-sit-xl-2"  # --ckpt name of REPA's published SiT-XL/2 EMA weights (a bare state dict)
# REPA's utils.download_model: the file its generate.py samples when given no --ckpt
REPA_URL = ("https://www.dl.dropboxusercontent.com/scl/fi/cxedbs4da5ugjq5wg3zrg/last.pt"
            "?rlkey=8otgrdkno0nd89po3dpwngwcc&st=apcc645o&dl=0")
RUNS = "runs"  # train.py's default --out: where a bare `python sample.py` looks for a run
fail = cluster.failer("sample.py")
LATENT_RANGE = 4.0  # --vae none: scaled latents (unit-order std) in [-4, 4] map linearly to uint8

# ----------------------------------------------------------------------------------------------
# Samplers: functions of a velocity function v(x, t[, t_step]) -> (B, C, H, W), state kept in float64 as REPA


def score_from_velocity(v, x, t, path_type="linear"):
    """Score of x_t from the velocity at float time t (REPA's get_score_from_velocity), any path of losses.interpolant.

    x_t = alpha x0 + sigma eps and v = alpha' x0 + sigma' eps give eps = (x - (alpha / alpha') v) / (sigma -
    (alpha / alpha') sigma'); the score is -eps / sigma. On the linear path this is -((1 - t) v + x) / t.
    """
    alpha, sigma, d_alpha, d_sigma = losses.interpolant(torch.tensor(t, dtype=torch.float64), path_type)
    ratio = alpha / d_alpha
    return (ratio * v - x) / (sigma**2 - ratio * d_sigma * sigma)  # (B, C, H, W)


def euler_maruyama(velocity, x, num_steps=250, noise=torch.randn_like, path_type="linear"):
    """Euler-Maruyama SDE from t=1 to 0 (REPA's euler_maruyama_sampler); noise(x) draws N(0, I) like x."""
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
            d_next = velocity(x_next, t_next, t)  # REPA decides guidance once per step, at its start t
            x_next = x + (t_next - t) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


def guided_velocity(model, y, cfg=1.0, guidance_low=0.0, guidance_high=1.0):
    """Velocity function of a SiT for labels y (B,), with CFG on all channels inside the guidance interval."""
    null = model.null_condition(y)  # REPA's y_null

    def velocity(x, t, t_step=None):
        """x (B, C, H, W) float64 at time t -> v float64; t_step (default t) decides whether to guide."""
        t_step = t if t_step is None else t_step
        guide = cfg > 1 and guidance_low <= t_step <= guidance_high
        xs, ys = (torch.cat([x, x]), torch.cat([y, null])) if guide else (x, y)  # (2B, ...): one forward
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


@torch.no_grad()
def sample_latents(model, indices, args, device):
    """Final scaled latents (B, C, H, W) float64 for global sample indices, as args (mode, cfg, ...) ask."""
    gens = [torch.Generator().manual_seed(sample_seed(args.seed, i)) for i in indices]
    c, size = model.config["in_channels"], model.config["input_size"]
    # Drawn on the CPU, in REPA's order (noise, label, then SDE noise), so images do not depend on the device.
    x = torch.cat([torch.randn(1, c, size, size, generator=g) for g in gens])  # (B, C, H, W)
    y = torch.cat([torch.randint(0, model.num_classes, (1,), generator=g) for g in gens])  # (B,)
    if args.class_labels:  # given labels replace the drawn ones; the noise stays the same
        y = torch.tensor([args.class_labels[i % len(args.class_labels)] for i in indices])
    velocity = guided_velocity(model, y.to(device), args.cfg, args.guidance_low, args.guidance_high)
    x = x.to(device)
    if args.mode == "sde":

        def noise(like):
            """SDE noise (B, C, H, W): each sample's next draw from its own generator."""
            return torch.cat([torch.randn(like[:1].shape, generator=g, dtype=like.dtype) for g in gens]).to(device)

        return euler_maruyama(velocity, x, args.num_steps, noise, model.config["path_type"])
    return euler_ode(velocity, x, args.num_steps, heun=args.mode == "heun")


@torch.no_grad()
def generate_images(model, vae, indices, args, device):
    """uint8 images (B, H, W, 3) for global sample indices; with no VAE the latents as (B, h, w, 4)."""
    latents = sample_latents(model, indices, args, device).float()  # (B, C, h, w)
    rounding = args.quantize == "round"  # default floor: REPA's generate.py, which made the papers' numbers
    images = decode(vae, latents, rounding) if vae is not None else to_uint8(latents / LATENT_RANGE, rounding)
    return images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)


# ----------------------------------------------------------------------------------------------
# Checkpoints: this project's train.py format and official REPA checkpoints


def repa_path():
    """Where REPA's published weights live once downloaded: torch's hub cache."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", f"{REPA_NAME}.pt")


def newest_checkpoint(folder):
    """The highest-step .pt of a run folder's checkpoints/ (or of the folder itself), or None."""
    sub = os.path.join(folder, "checkpoints")
    folder = sub if os.path.isdir(sub) else folder
    names = sorted(f for f in os.listdir(folder) if f.endswith(".pt"))  # train.py names them by zero-padded step
    return os.path.join(folder, names[-1]) if names else None


def resolve_ckpt(ckpt):
    """(path, why) of the checkpoint --ckpt names: a file, a run folder, REPA_NAME, or None (the default)."""
    if ckpt == REPA_NAME:
        return repa_path(), f"REPA's published SiT-XL/2 weights, --ckpt {REPA_NAME}"
    if ckpt is None:
        runs = [os.path.join(RUNS, d) for d in os.listdir(RUNS)] if os.path.isdir(RUNS) else []
        newest = [p for p in (newest_checkpoint(r) for r in runs if os.path.isdir(r)) if p]
        if newest:
            why = f"no --ckpt: the newest checkpoint of the most recently written run under {RUNS}/"
            return max(newest, key=os.path.getmtime), why
        return repa_path(), f"no --ckpt and no run under {RUNS}/: REPA's published SiT-XL/2 weights ({REPA_NAME})"
    if os.path.isdir(ckpt):
        path = newest_checkpoint(ckpt)
        if path is None:
            fail(f"--ckpt {ckpt}: no checkpoint (*.pt) in the folder or its checkpoints/; give a run folder or a file")
        return path, f"the newest checkpoint of run folder {ckpt}"
    return ckpt, "given by --ckpt"


def download_repa(path):
    """Fetch REPA's published weights into path once (atomically, with a progress bar); one line if it fails."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        torch.hub.download_url_to_file(REPA_URL, path, progress=True)
    except (OSError, RuntimeError, ValueError) as e:  # offline (URLError), moved file (HTTPError), bad hash
        fail(f"cannot download {REPA_NAME} (REPA's SiT-XL/2 weights) from {REPA_URL}: "
             f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}; download last.pt elsewhere and pass --ckpt PATH")


def read_checkpoint(path):
    """torch.load a checkpoint dict with weights_only=True (allowing REPA's argparse.Namespace args)."""
    if not os.path.isfile(path):
        fail(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled types weights_only refuses
        first_line = (str(e).strip().splitlines() or [""])[0]
        fail(f"{path}: unreadable checkpoint ({type(e).__name__}: {first_line})")
    if not isinstance(ckpt, dict):
        fail(f"{path}: expected a dict, found {type(ckpt).__name__}")
    return ckpt


def is_state_dict(obj):
    """True for a non-empty dict of tensors (a bare state dict, e.g. REPA's released last.pt)."""
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def infer_config(state, args=None):
    """SiT constructor dict of a REPA state dict; REPA's args (argparse.Namespace) where they exist."""
    try:
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        _, num_patches, hidden = state["pos_embed"].shape
        _, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
        rows = state["y_embedder.embedding_table.weight"].shape[0]  # num_classes (+1 null class)
        mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        projectors = sorted({int(k.split(".")[1]) for k in state if k.startswith("projectors.")})
        z_dims = [state[f"projectors.{k}.4.weight"].shape[0] for k in projectors]
        projector_dim = state["projectors.0.0.weight"].shape[0] if projectors else 2048
    except (KeyError, ValueError) as e:  # ValueError: no blocks, or a tensor of the wrong rank
        fail(f"not a SiT state dict: cannot read {e}")
    try:  # heads leave no trace in the weights: from args.model, else the size table, else 64-dim heads
        num_heads = size_config(args.model)["num_heads"]
    except (AttributeError, TypeError, ValueError):  # no args, no args.model, or not a preset name
        preset = [s for s in SIZES.values() if (s["depth"], s["hidden_size"]) == (depth, hidden)]
        num_heads = preset[0]["num_heads"] if preset else max(1, hidden // 64)
    num_classes = getattr(args, "num_classes", rows - 1)  # REPA always trains with a null class
    return dict(
        input_size=math.isqrt(num_patches) * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_hidden / hidden, num_classes=num_classes,
        class_dropout_prob=0.1 if rows > num_classes else 0.0, z_dims=z_dims, projector_dim=projector_dim,
        encoder_depth=getattr(args, "encoder_depth", min(REPA_ENCODER_DEPTH, depth)),
        qk_norm=getattr(args, "qk_norm", False), path_type=getattr(args, "path_type", "linear"),
    )


def fit_error(model, state):
    """A one-line description of the first way `state` does not fit `model`, or None if it fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = [f"missing key {k!r}" for k in missing] + [f"unexpected key {k!r}" for k in unexpected]
    problems += [f"{k!r} has shape {tuple(state[k].shape)}, the model wants {tuple(expected[k].shape)}" for k in wrong]
    if problems:
        return problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")
    return None


def load_checkpoint(path, weights="ema"):
    """SiT (CPU, eval mode) from a train.py checkpoint, an official REPA checkpoint or a bare state dict."""
    return build_model(read_checkpoint(path), path, weights)


def build_model(ckpt, path, weights="ema"):
    """SiT (CPU, eval mode) from the dict read_checkpoint(path) returned."""
    if is_state_dict(ckpt):  # REPA's released weights: the EMA state dict alone
        state, config = ckpt, None
    else:
        if not is_state_dict(ckpt.get(weights)):
            fail(f"{path}: no {weights!r} state dict in the checkpoint (keys: {sorted(ckpt)})")
        state = ckpt[weights]
        config = ckpt["config"].get("model_config") if isinstance(ckpt.get("config"), dict) else None
        if "config" in ckpt and not isinstance(config, dict):  # a train.py checkpoint must say what it is
            fail(f"{path}: the checkpoint's config has no 'model_config' dict")
    try:
        config = config if config is not None else infer_config(state, ckpt.get("args"))
        model = SiT(**config)
        losses.interpolant(torch.tensor(0.5), model.config["path_type"])  # a path the samplers know
    except SystemExit as e:
        fail(f"{path}: {str(e).removeprefix('sample.py: error: ')}")
    except (TypeError, ValueError) as e:
        fail(f"{path}: cannot build SiT from the checkpoint config: {e}")
    error = fit_error(model, state)
    if error:
        fail(f"{path}: checkpoint does not fit the model: {error}")
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Outputs


def tile(images, cols=None):
    """(N, H, W, C) uint8 -> one (rows*H, cols*W, C) grid, row-major, unused cells black."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cells = np.zeros((rows * cols, h, w, c), np.uint8)
    cells[:n] = images
    return cells.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def write_grid(model, vae, args, device):
    """Sample indices 0..n-1 (the first n images of an npz run with the same settings) into one PNG."""
    n = args.grid_size or len(args.class_labels or []) or 16
    batches = [range(i, min(i + args.batch_size, n)) for i in range(0, n, args.batch_size)]
    images = np.concatenate([generate_images(model, vae, list(b), args, device) for b in tqdm(batches, "grid")])
    write_atomic(args.out, lambda f: Image.fromarray(tile(images)).save(f, format="PNG"))
    print(f"wrote {args.out} ({n} samples)")


def run_settings(args):
    """What decides the images; a resumed run must match it exactly."""
    keys = ("ckpt", "weights", "mode", "num_steps", "cfg", "guidance_low", "guidance_high", "class_labels",
            "seed", "vae", "quantize")
    return {k: getattr(args, k) for k in keys} | {"ckpt": os.path.abspath(args.ckpt)}


def check_settings(folder, settings, rank):
    """Refuse to resume a folder written with other settings; rank 0 records them for the next run."""
    path = os.path.join(folder, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        if changed:
            fail(f"{folder} holds samples made with other settings ({', '.join(changed)}); "
                             "use another --out or delete it")
    elif os.listdir(folder):  # never mix our PNGs into (or count) someone else's files
        fail(f"{folder} already holds files not written by sample.py; use another --out")
    elif rank == 0:
        write_atomic(path, lambda f: f.write(json.dumps(settings, indent=1).encode()))


def written_indices(folder):
    """Global indices whose PNG is already in folder (complete files only: they are written atomically)."""
    return {int(m.group(1)) for f in os.listdir(folder) if (m := re.fullmatch(r"(\d{6})\.png", f))}


def write_npz(folder, num_samples, out):
    """Stack folder's PNGs 0..N-1 into out's arr_0 (N, H, W, C) uint8 via a disk memmap, then zip it."""
    first = np.asarray(Image.open(os.path.join(folder, f"{0:06d}.png")))  # (H, W, C)
    npy = os.path.join(folder, "arr_0.npy")
    arr = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(num_samples, *first.shape))
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


def write_samples(model, vae, args, device, rank, world):
    """This rank's share of the missing samples as PNGs in out's folder; then rank 0 writes the npz."""
    folder = os.path.splitext(args.out)[0]
    os.makedirs(folder, exist_ok=True)
    if rank == 0:  # rank 0 vets the folder and records the settings before the others compare with them
        check_settings(folder, run_settings(args), rank)
    cluster.barrier(world)
    if rank:
        check_settings(folder, run_settings(args), rank)
    todo = sorted(set(range(args.num_samples)) - written_indices(folder))
    cluster.barrier(world)  # every rank listed the folder before any rank writes into it
    mine = todo[rank::world]
    bar = tqdm(total=len(mine), desc=f"sampling (rank 0 of {world})", disable=rank != 0)
    for start in range(0, len(mine), args.batch_size):
        batch = mine[start:start + args.batch_size]
        for i, image in zip(batch, generate_images(model, vae, batch, args, device)):
            write_atomic(os.path.join(folder, f"{i:06d}.png"), lambda f: Image.fromarray(image).save(f, format="PNG"))
        bar.update(len(batch))
    bar.close()
    cluster.barrier(world)  # all shares are on disk
    if rank == 0:
        write_npz(folder, args.num_samples, args.out)


# ----------------------------------------------------------------------------------------------
# Command line


def setup(args):
    """Process group and device for this run -> (rank, world, device)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and args.num_samples is None:
        fail("the grid is made by one process: run without torchrun, or give --num-samples")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    return cluster.init(args.device)


def parse_labels(text):
    """'207,360' -> [207, 360]."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parser():
    """The command line's options (parse_args checks their values)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None,
                   help=f"checkpoint file (train.py's, REPA's, or a bare SiT state dict), a run folder (its newest "
                        f"checkpoint), or {REPA_NAME} (REPA's published weights, downloaded once); default: the newest "
                        f"checkpoint of the most recently written run under {RUNS}/, else {REPA_NAME}")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of the checkpoint")
    p.add_argument("--mode", choices=["sde", "ode", "heun"], default="sde",
                   help="Euler-Maruyama SDE (the papers' sampler), Euler ODE, or Heun ODE (2N-1 evaluations)")
    p.add_argument("--num-steps", type=int, default=250, help="sampler steps (the papers: SDE with 250)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale on all 4 channels (1 = off)")
    p.add_argument("--guidance-low", type=float, default=0.0, help="guide only while t >= this (t=1 is noise)")
    p.add_argument("--guidance-high", type=float, default=1.0, help="guide only while t <= this (REPA*: 0.7)")
    p.add_argument("--class-labels", type=parse_labels, default=None,
                   help="comma-separated labels used in turn (e.g. 207,360,387); default: random labels")
    p.add_argument("--seed", type=int, default=0, help="global seed; sample i always gets the same noise and label")
    p.add_argument("--num-samples", type=int, default=None,
                   help="write this many samples as PNGs plus one ADM .npz (e.g. 50000); default: one PNG grid")
    p.add_argument("--grid-size", type=int, default=None,
                   help="images in the grid (default: one per --class-labels entry, else 16)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward, per process")
    p.add_argument("--vae", default=None,
                   help="ema | mse (sd-vae-ft-*), a hub id or folder, tiny-random (smoke), or none (save latents); "
                        "default: the --vae of the train.py run, else ema")
    p.add_argument("--quantize", choices=["floor", "round"], default="floor",
                   help="[-1, 1] -> uint8: floor truncates 255 (x + 1) / 2 as REPA's generate.py, which made the "
                        "papers' FIDs (default); round as DiT")
    p.add_argument("--out", default=None, help="output .png (grid) or .npz; default under samples/, named by settings")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    return p


def check_ranges(args):
    """Every numeric flag in its range, or a one-line error naming it."""
    for name in ("num_steps", "batch_size", "num_samples", "grid_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.seed < 0:
        fail(f"--seed {args.seed}: must be >= 0")
    if not 1 <= args.cfg < math.inf:  # also refuses nan
        fail(f"--cfg {args.cfg}: must be a finite number >= 1 (1 disables guidance)")
    for name in ("guidance_low", "guidance_high"):
        if not 0 <= getattr(args, name) <= 1:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must lie in [0, 1] (t=1 is noise)")
    if args.guidance_low > args.guidance_high:
        fail(f"--guidance-low {args.guidance_low} > --guidance-high {args.guidance_high}: the interval is empty")
    if any(c < 0 for c in args.class_labels or []):
        fail(f"--class-labels {args.class_labels}: labels must be >= 0")


def parse_args(argv=None):
    """Command-line options, range-checked; --ckpt resolved to a file path (nothing is downloaded yet)."""
    args = parser().parse_args(argv)
    check_ranges(args)
    args.ckpt, args.ckpt_reason = resolve_ckpt(args.ckpt)
    suffix = ".npz" if args.num_samples else ".png"
    if args.out is not None and not args.out.endswith(suffix):
        fail(f"--out {args.out}: must end in {suffix} {'with' if args.num_samples else 'without'} --num-samples")
    return args


def default_out(args):
    """samples/<run>-<step or file>-<settings>.png or .npz: different settings never share a file."""
    stem = os.path.splitext(os.path.basename(args.ckpt))[0]
    parent, folder = os.path.split(os.path.dirname(os.path.abspath(args.ckpt)))
    stem = f"{os.path.basename(parent)}-{stem}" if folder == "checkpoints" else stem  # train.py: run-step
    name = f"{stem}-{args.weights}-{args.mode}{args.num_steps}-cfg{args.cfg}-g{args.guidance_low}-{args.guidance_high}"
    return os.path.join("samples", f"{name}-vae-{args.vae}-seed{args.seed}{'.npz' if args.num_samples else '.png'}")


def main(args):
    """Load the model (and VAE), then write a grid or num_samples images plus their npz."""
    rank, world, device = setup(args)
    if rank == 0:
        print(f"sample.py: checkpoint {args.ckpt} ({args.ckpt_reason})", flush=True)
    if args.ckpt == repa_path() and not os.path.exists(args.ckpt):
        if rank == 0:  # one download; torchrun stops the other ranks if it fails
            download_repa(args.ckpt)
        cluster.barrier(world)
    ckpt = read_checkpoint(args.ckpt)
    model = build_model(ckpt, args.ckpt, args.weights)
    run_config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    args.vae = args.vae or run_config.get("vae") or "ema"  # a run's latents belong to the VAE it trained with
    args.out = args.out or default_out(args)
    bad = [c for c in args.class_labels or [] if not 0 <= c < model.num_classes]
    if bad:
        fail(f"--class-labels {bad}: the model has classes 0..{model.num_classes - 1}")
    if args.cfg > 1 and model.y_embedder.embedding_table.num_embeddings <= model.num_classes:
        fail("--cfg > 1 needs a null class, but the model was trained without label dropout; use --cfg 1")
    model = model.to(device)
    if args.compile:
        model = torch.compile(model)
    try:
        vae = None if args.vae == "none" else load_vae(args.vae, device)
    except OSError as e:
        fail(str(e))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.num_samples is None:
        write_grid(model, vae, args, device)
    else:
        write_samples(model, vae, args, device, rank, world)
    cluster.close(world)


if __name__ == "__main__":
    main(parse_args())
