"""The run folder: what train.py keeps on disk, how a run resumes, and how any checkpoint is read
back.

    runs/<run name>/
        config.json               the resolved configuration (a plain dict, also in every
        checkpoint)
        log.txt                   rank 0's log
        metrics.jsonl             one row per --log-every steps; evaluations and rollbacks have
        rows too
        losses.png                every metrics.jsonl key against the step, redrawn at each log step
        samples/0010000.png       the EMA's sample grid (sample.py's grid at that step)
        checkpoints/0050000.pt    {model, ema, opt, scaler[, disc, disc_opt, disc_scaler],
                                   step, batch, rollbacks, bad_in_a_row, rng, config}

train.py resumes from the newest readable checkpoint of its run folder and continues bit for bit;
a burst of non-finite steps rolls back to the newest --ckpt-every checkpoint before it. sample.py
and analysis.py read train.py checkpoints, official REPA checkpoints and bare state dicts alike
(load_model).
"""

import argparse
import importlib
import json
import logging
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import cluster
import losses
from cluster import UserError, write_atomic
from data import SYNTHETIC
from encoders import CLIP_TEXT, TINY_RANDOM
from model import SIZES, SiT, size_config

log = logging.getLogger("train")
CHECKPOINTED = ("model", "ema", "opt", "scaler", "disc", "disc_opt", "disc_scaler")  # Run fields
# Flags that may change when a run resumes; any other difference is another experiment. Paths of
# weight files may move; the run's name is where its folder lives, not what it trains.
RESUMABLE_CHANGES = {
    "max_steps", "ckpt_every", "sample_every", "log_every", "keep_ckpts", "keep_every",
    "num_workers", "compile", "tf32", "grad_checkpointing", "max_bad_steps", "max_rollbacks",
    "preempt_signals", "out", "run_name", "data_dir", "world_size", "vae", "sample_steps",
    "eval_every", "eval_ref", "eval_samples", "eval_cfg", "eval_steps", "eval_weights",
    "enc_weights", "disc_weights", "wandb", "tensorboard", "max_bad_samples", "strict_data",
}
METRICS, LOSS_CURVES = "metrics.jsonl", "losses.png"
RUNS = "runs"  # train.py's default --out: where a bare `python sample.py` looks for a run

# ----------------------------------------------------------------------------------------------
# The folder and its log


def setup_logging(rank):
    """Rank 0 logs INFO to stderr (log.txt joins once the run starts); other ranks only warnings."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def open_log(run_dir, rank):
    """Create the run folder (once everything is built: a failed start leaves nothing behind) and
    add log.txt to rank 0's log."""
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        handler = logging.FileHandler(os.path.join(run_dir, "log.txt"))
        handler.setFormatter(logging.getLogger().handlers[0].formatter)
        logging.getLogger().addHandler(handler)


def write_config(run_dir, config, rank):
    """config.json: the resolved configuration, as every checkpoint also stores it; each random
    stand-in is said loudly."""
    for part in config["random_components"]:
        log.warning("NOT PRETRAINED: %s is a random or synthetic stand-in; numbers from this run "
                    "mean nothing", part)
    if rank == 0:
        text = json.dumps(config, indent=2).encode()
        write_atomic(os.path.join(run_dir, "config.json"), lambda f: f.write(text))


def run_name(config, base, flags):
    """preset-align-model, then each of `flags` whose value in force differs from the `base`
    configuration (the preset's): -adv0, -lr0.0002, ..."""

    skip = RESUMABLE_CHANGES | {"preset", "align", "model"}
    parts = [f"{config['preset']}-{config['align']}-{config['model'].replace('/', '')}"]
    changed = [k for k in flags if value_in_force(config, k) != value_in_force(base, k)]
    for k in sorted(k for k in changed if k not in skip):
        v = value_in_force(config, k)
        text = "-".join(f"{x:g}" if isinstance(x, float) else str(x)
                        for x in (v if isinstance(v, (list, tuple)) else [v]))
        parts.append(k.removesuffix("_weight").replace("_", "") + text.replace("/", ""))
    return "-".join(parts)


def random_components(config, dataset, run):
    """The stand-ins of this run, recorded in config.json and every checkpoint."""
    text = getattr(dataset, "text_encoder", None) == TINY_RANDOM  # COCO features of a stand-in
    return ([f"data ({SYNTHETIC})"] if dataset.synthetic else []) + (
        [f"text features ({TINY_RANDOM} text encoder)"] if text else []) + [
        f"encoder ({e.name})" for e in run.encoders if not e.pretrained] + (
        ["discriminator trunk (random ResNet-18)"] if run.disc and not run.disc.pretrained else []
    ) + (
        [f"vae ({TINY_RANDOM})"] if config["vae"] == TINY_RANDOM and config["sample_every"] else [])


def read_metrics(run_dir):
    """Every metrics.jsonl row of a run folder so far. A torn last line (a crash or a full disk in
    the middle of an append) is dropped with a warning: its step is past the newest checkpoint, so
    the resumed run writes that row again."""
    path = os.path.join(run_dir, METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines):
                raise UserError(f"{path}: line {i} is not a JSON row ({e.msg}): mend or delete "
                                "that line") from e
            log.warning("%s: dropped its torn last line (a write that did not finish)", path)
    return rows


def check_eval(config, world):
    """train.py's --eval-* flags complete and consistent, before anything is built."""
    for bad, message in [
        (not os.path.isfile(config.get("eval_ref") or ""), "--eval-every needs --eval-ref REF.npz, "
         f"an ADM reference batch (fid.py --write-ref makes one); got {config.get('eval_ref')!r}"),
        (config["eval_samples"] < 2 * world, f"--eval-samples {config['eval_samples']} is out of "
         f"range: it must be at least 2 per rank ({2 * world})"),  # a covariance per rank
        (config["eval_cfg"] > 1 and not config["class_dropout"],
         f"--eval-cfg {config['eval_cfg']:g} (--preset {config['preset']}'s unless typed) needs a "
         "null class, but --class-dropout is 0: give --eval-cfg 1 or a --class-dropout"),
        (config["vae"] == "none", "--eval-every scores decoded images: give a --vae, not none")]:
        if bad:
            raise UserError(message)


# ----------------------------------------------------------------------------------------------
# The network of a run: SiT on class labels, MMDiT (mmdit.py) on caption features; the data decides


def is_text_model(name):
    """Whether --model names a text-to-image network (MMDiT, MMDiT-T) rather than a SiT."""
    return str(name).startswith("MMDiT")


def model_size(name):
    """The size dict of --model (depth, patch size, default taps, SiT's widths): SiT-XL/2 from
    model.py, MMDiT (REPA's depth 24) or MMDiT-T from mmdit.py; ValueError for an unknown name."""
    if is_text_model(name):
        import mmdit  # text-to-image only

        if name not in mmdit.MMDIT_SIZES:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(mmdit.MMDIT_SIZES)}"
                             f" (text) or a SiT, e.g. SiT-XL/2")
        return dict(mmdit.MMDIT_SIZES[name], patch_size=2)  # REPA's MMDiT: 2 x 2 patches
    return size_config(name)


def build_network(config, dataset, z_dims):
    """The network of a resolved config: a SiT on class labels, an MMDiT on COCO caption features
    (the null caption's features its dropout condition, its text encoder recorded in config for
    sample.py). dataset: the training data, or its number of classes (bench.py, tests)."""
    text = getattr(dataset, "text_encoder", None) is not None
    if text != is_text_model(config["model"]):
        raise UserError(
            f"--model {config['model']} does not fit --data-dir {config['data_dir']}, which holds "
            + ("COCO captions: train an MMDiT (--model MMDiT; MMDiT-T: tiny)" if text else
               "class labels: train a SiT (--model SiT-XL/2), or give a COCO folder (data.py "
               "--dataset coco)"))
    size = {k: v for k, v in model_size(config["model"]).items()
            if k not in ("encoder_depth", "sra_depth", "self_depth", "self_teacher_depth")}
    res = config["resolution"]
    tokens = (res // 8 // size["patch_size"]) ** 2
    if z_dims and tokens != (res // 16) ** 2:  # every encoder here gives a (res/16)^2 token grid
        raise UserError(f"{config['model']} has {tokens} tokens but the encoder gives "
                        f"{(res // 16) ** 2}: token-wise alignment needs patch size 2 (e.g. "
                        "SiT-XL/2), or --align none / sra2")
    common = dict(input_size=res // 8, encoder_depth=config["encoder_depth"], z_dims=z_dims,
                  projector_dim=config["projector_dim"], sra_depth=config["sra_depth"],
                  sra_mlp_layers=config["sra_mlp_layers"],
                  sra_hidden_dim=config.get("sra_hidden_dim"), self_depth=config["self_depth"],
                  grad_checkpointing=bool(config["grad_checkpointing"]),
                  path_type=config["align_config"]["path_type"], **size)
    if not text:
        if config.get("text_encoder"):  # a class checkpoint must not claim a text encoder
            raise UserError(f"--text-encoder {config['text_encoder']} needs COCO caption features, "
                            f"but --data-dir {config['data_dir']} holds class labels")
        classes = dataset if isinstance(dataset, int) else dataset.num_classes
        return SiT(num_classes=classes, class_dropout_prob=config["class_dropout"], **common)
    import mmdit

    config["text_encoder"] = dataset.text_encoder  # runs.text_encoder_of reads it
    model = mmdit.MMDiT(context_dim=dataset.text_dim, **common)
    model.set_null_context(dataset.null_context)  # caption dropout: losses' drop mask swaps it in
    return model


# ----------------------------------------------------------------------------------------------
# Checkpoints: write, resume, roll back


@dataclass
class Position:
    """Where the training loop stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps taken
    batch: int = 0  # the next global batch: steps plus the batches rollbacks skipped
    # skipped ranges: dict(step, first_batch, last_batch)
    rollbacks: list = field(default_factory=list)
    bad_in_a_row: int = 0  # non-finite steps since the last finite one


def checkpoint_paths(run_dir):
    """Finished checkpoints of a run, oldest first."""
    folder = os.path.join(run_dir, "checkpoints")
    names = (
        sorted(f for f in os.listdir(folder) if f.endswith(".pt")) if os.path.isdir(folder) else []
    )
    return [os.path.join(folder, f) for f in names]


def checkpoint_step(path):
    """The step a checkpoint file is named after (checkpoints/0001000.pt -> 1000)."""
    return int(os.path.splitext(os.path.basename(path))[0])


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


def save_checkpoint(run_dir, config, run, pos, device, rank, world):
    """Rank 0 writes everything a resume needs, atomically, and keeps the newest --keep-ckpts
    (and every multiple of --keep-every); a full or failing disk stops every rank with one line,
    the previous checkpoint intact."""
    error = None
    if rank == 0:  # every rank holds the same random states: one copy resumes them all
        ckpt = {key: getattr(run, key).state_dict() for key in CHECKPOINTED
                if getattr(run, key) is not None}
        ckpt.update(step=pos.step, batch=pos.batch, rollbacks=pos.rollbacks,
                    bad_in_a_row=pos.bad_in_a_row, rng=rng_state(run.gen, device), config=config)
        path = os.path.join(run_dir, "checkpoints", f"{pos.step:07d}.pt")
        try:
            write_checkpoint(path, ckpt, checkpoint_paths(run_dir))
        except UserError as e:
            error = e
        else:
            for old in checkpoint_paths(run_dir)[: -config["keep_ckpts"]]:
                if not (config["keep_every"] and checkpoint_step(old) % config["keep_every"] == 0):
                    os.remove(old)
            log.info("saved %s", path)
    if cluster.host_all_reduce([error is not None], dist.ReduceOp.MAX, world)[0]:
        raise error or UserError("rank 0 could not write the checkpoint (its error says why)")


def write_checkpoint(path, ckpt, previous):
    """torch.save ckpt to path atomically, if the disk has room for one more checkpoint as large
    as the newest of previous (or as ckpt's tensors); UserError naming the folder, the space free
    and the space needed when it has not, or when the write fails for a disk fault."""
    folder = os.path.dirname(path)
    needed = os.path.getsize(previous[-1]) if previous else tensor_bytes(ckpt)
    cluster.require_space(folder, needed, "a checkpoint")
    try:
        write_atomic(path, lambda f: torch.save(ckpt, f))
    except (OSError, RuntimeError) as e:  # torch.save's on a full disk: "... unexpected pos"
        cluster.require_space(folder, max(needed, tensor_bytes(ckpt)), "a checkpoint")
        error = cluster.disk_error(e, folder) if isinstance(e, OSError) else None  # EIO, EROFS...
        if error is None:
            raise
        raise error from e


def tensor_bytes(obj):
    """The bytes of every tensor in a nested dict / list (a checkpoint's size, near enough)."""
    if torch.is_tensor(obj):
        return obj.nbytes
    if isinstance(obj, dict):
        obj = list(obj.values())
    return sum(tensor_bytes(v) for v in obj) if isinstance(obj, (list, tuple)) else 0


def value_in_force(config, k):
    """config's value of flag k; an alignment flag's is the one its --align preset resolved."""
    return config.get("align_config", {}).get(k, config.get(k))


def same(a, b):
    """Whether two config values are the same run's. A key one side lacks, a flag newer than the
    code that wrote it, matches a value that turns nothing on (0, None): an older run resumes."""
    if isinstance(a, dict) and isinstance(b, dict):
        return all(same(a.get(k), b.get(k)) for k in a.keys() | b.keys())
    return a == b or (a is None and not b) or (b is None and not a)


def changed_flag(stored, config, given):
    """The first flag in which config differs from a checkpoint's, flags typed this time first
    (an alignment flag typed at its preset's value changes nothing)."""
    names = set(config) | set(stored) | set(config.get("align_config", {}))
    diff = sorted(k for k in names - {"align_config"} if k not in RESUMABLE_CHANGES
                  and not same(value_in_force(config, k), value_in_force(stored, k)))
    typed = [k for k in diff if k in given]
    return (typed or diff or [None])[0], len(diff)


def load_run_checkpoint(paths, config, world, given=()):
    """(path, checkpoint): the newest readable one of paths, written by the same configuration.

    An unreadable newer file (truncated by a crash, a full disk) is skipped with a warning; the
    ranks agree on the newest file every one of them could read. given: the flags typed this
    time, named first when the configuration differs.
    """
    found, ckpt, error = -1, None, None
    for i in reversed(range(len(paths))):
        try:
            ckpt, found = torch.load(paths[i], map_location="cpu", weights_only=True), i
            break
        except Exception as e:  # truncated files and foreign pickles fail in many ways
            why = unreadable(paths[i], e)
            log.warning("%s; falling back to the previous checkpoint", why)
            error = error or why
    agreed = cluster.host_all_reduce([found], dist.ReduceOp.MIN, world)[0]
    if agreed < 0:
        raise UserError(
            f"{error or 'another rank read no checkpoint'} and no older one is readable; "
            "delete the run folder's checkpoints/ to start over"
        )
    path = paths[agreed]
    if agreed != found:  # another rank could not read a newer file: all resume from the same one
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    keys = {"model", "ema", "opt", "step", "rng", "config"}
    missing = keys - set(ckpt) if isinstance(ckpt, dict) else {"all"}
    if missing:
        raise UserError(f"{path} is not a train.py checkpoint (missing {sorted(missing)}); "
                        "use another --run-name")
    stored = ckpt["config"]
    was, now = (text_encoder_of(c) is not None for c in (ckpt, {"config": config}))
    if was != now:
        kind = {True: "text-to-image", False: "class-conditional"}
        raise UserError(f"{path} is a {kind[was]} checkpoint but this run trains {kind[now]} "
                        f"({config['model']} on {config['data_dir']}): use another --run-name")
    if now and stored.get("text_encoder") != config["text_encoder"]:
        raise UserError(f"{path} was trained on {stored.get('text_encoder')!r} text features but "
                        f"{config['data_dir']} holds {config['text_encoder']!r} ones: resume with "
                        "the run's data, or use another --run-name")
    k, n = changed_flag(stored, config, given)
    if k is not None:
        more = f", and {n - 1} more" if n > 1 else ""
        raise UserError(f"{path} was written by another config (--{k.replace('_', '-')}: "
                        f"{value_in_force(stored, k)!r} there, "
                        f"{value_in_force(config, k)!r} now{more}); "
                        "use another --run-name or the same flags")
    if stored.get("run_name") != config["run_name"]:
        log.info("resuming run %r in folder %s (the folder was copied or renamed)",
                 stored.get("run_name"), os.path.dirname(os.path.dirname(path)))
    return path, ckpt


def already_complete(run_dir, config, pos, evaluated):
    """Whether the resumed run has nothing left to do (an evaluation killed at the end still
    runs); says so, and how to train longer."""
    every = config["eval_every"]
    due = every and pos.step % every == 0 and pos.step not in evaluated
    if pos.step < config["max_steps"] or due:
        return False
    log.info("the run in %s is already complete at step %d: give a higher --max-steps to train "
             "longer, or another --run-name to start another run", run_dir, pos.step)
    return True


def load_state(run, ckpt):
    """Weights, optimizer and scaler states of a checkpoint into run (not the random states)."""
    for key in CHECKPOINTED:
        if getattr(run, key) is not None:
            getattr(run, key).load_state_dict(ckpt[key])


def resume(run_dir, run, config, device, world, given=()):
    """Load the newest usable checkpoint of run_dir into run; returns the loop's Position."""
    paths = checkpoint_paths(run_dir)
    if not paths:
        return Position()
    path, ckpt = load_run_checkpoint(paths, config, world, given)
    load_state(run, ckpt)
    set_rng_state(ckpt["rng"], run.gen, device)
    log.info("resumed from %s at step %d", path, ckpt["step"])
    return Position(ckpt["step"], ckpt["batch"], ckpt["rollbacks"], ckpt["bad_in_a_row"])


def roll_back(run_dir, run, config, pos, metrics, device, rank, world):
    """After pos.bad_in_a_row non-finite steps, reload the newest --ckpt-every checkpoint before
    them.

    The data and noise streams are not rewound: training goes on with global batch pos.batch, so
    the batches drawn since that checkpoint, the offending ones among them, are skipped. The skipped
    range joins pos.rollbacks and is saved at once as that step's checkpoint, so a resume
    reproduces the rollback.
    """
    first_bad = pos.step - pos.bad_in_a_row  # the step count before the burst's first step
    stopping = f"{pos.bad_in_a_row} non-finite steps in a row at step {pos.step}"
    if len(pos.rollbacks) >= config["max_rollbacks"]:
        raise UserError(
            f"{stopping} after {len(pos.rollbacks)} rollbacks (--max-rollbacks); the newest "
            "checkpoint is still good: lower --lr or use --precision bf16/fp32"
        )
    # periodic checkpoints only: a preemption or end-of-run one must not move where a rollback lands
    older = [p for p in checkpoint_paths(run_dir)
             if checkpoint_step(p) <= first_bad and checkpoint_step(p) % config["ckpt_every"] == 0]
    if not older:
        raise UserError(
            f"{stopping} and no --ckpt-every checkpoint from before step {first_bad + 1} "
            "to roll back to: lower --lr or use --precision bf16/fp32"
        )
    path, ckpt = load_run_checkpoint(older, config, world)
    load_state(run, ckpt)
    skipped = dict(step=ckpt["step"], first_batch=ckpt["batch"], last_batch=pos.batch - 1)
    pos.rollbacks.append(skipped)
    log.warning("%s: rollback %d of at most %d to %s; global batches %d..%d skipped", stopping,
                len(pos.rollbacks), config["max_rollbacks"], path, skipped["first_batch"],
                skipped["last_batch"])
    if rank == 0:
        for newer in checkpoint_paths(run_dir):
            if checkpoint_step(newer) > ckpt["step"]:  # written after the rollback point
                os.remove(newer)
        metrics.trim(ckpt["step"])
        metrics.write(dict(step=ckpt["step"], rollbacks=len(pos.rollbacks),
                           skipped_from_batch=skipped["first_batch"],
                           skipped_to_batch=skipped["last_batch"]))
    pos.step, pos.bad_in_a_row = ckpt["step"], 0
    save_checkpoint(run_dir, config, run, pos, device, rank, world)


# ----------------------------------------------------------------------------------------------
# Metrics: metrics.jsonl, its TensorBoard / W&B mirrors, the loss-curve plot


def check_outputs(config):
    """Before any work: --out takes files, and --wandb's or --tensorboard 1's package is there
    (UserError saying which is not)."""
    cluster.check_writable(config["out"])
    wanted = (
        [("--tensorboard 1", "torch.utils.tensorboard", "tensorboard")]
        if config["tensorboard"]
        else []
    )
    wanted += [(f"--wandb {config['wandb']}", "wandb", "wandb")] if config.get("wandb") else []
    for flag, module, package in wanted:
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(f"{flag} needs the {package} package, which is not installed: "
                            f"pip install {package}, or drop {flag.split()[0]}") from None


class Metrics:
    """Rank 0's metrics.jsonl, its optional TensorBoard / W&B mirrors (every key) and losses.png;
    on the other ranks every method does nothing, so that the loop needs no rank test."""

    def __init__(self, run_dir, config, step, rank=0):
        """Drop rows past the resumed step and open the mirrors asked for."""
        self.path, self.png = os.path.join(run_dir, METRICS), os.path.join(run_dir, LOSS_CURVES)
        self.tensorboard = self.wandb = None
        self.writes = rank == 0
        self.trim(step)
        if config["tensorboard"] and self.writes:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events it is about to write again
            self.tensorboard = SummaryWriter(
                os.path.join(run_dir, "tensorboard"), purge_step=step + 1
            )
        if config.get("wandb") and self.writes:
            import wandb

            id_path = os.path.join(run_dir, "wandb-id.txt")  # one W&B run per run folder
            if not os.path.exists(id_path):
                write_atomic(id_path, lambda f: f.write(uuid.uuid4().hex[:16].encode()))
            with open(id_path) as f:
                run_id = f.read().strip()
            self.wandb = wandb.init(project=config["wandb"], name=config["run_name"], id=run_id,
                                    resume="allow", config=config, dir=run_dir)

    def trim(self, step):
        """Drop rows past step (a resumed or rolled-back run writes them again)."""
        if self.writes and os.path.exists(self.path):
            rows = read_metrics(os.path.dirname(self.path))
            text = "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step)
            with cluster.disk_errors(os.path.dirname(self.path)):
                write_atomic(self.path, lambda f: f.write(text.encode()))

    def write(self, row):
        """Log row (a dict of numbers with a "step"), append it everywhere, redraw the curves."""
        if not self.writes:
            return
        log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in row.items()))
        with cluster.disk_errors(os.path.dirname(self.path)), open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for k, v in row.items():
                if k != "step":
                    self.tensorboard.add_scalar(k, v, row["step"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(row)  # "step" is a logged key: rollbacks and resumes may revisit a step
        with cluster.disk_errors(os.path.dirname(self.png)):
            plot_metrics(self.path, self.png)

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def metrics_row(stats, step, config, t_last, world):
    """The row of a log step: every recorded quantity's mean over the steps and the ranks."""
    keys = sorted(stats)
    means = torch.stack([torch.stack(stats[k]).mean() for k in keys])  # one host sync per row
    if world > 1:
        dist.all_reduce(means)
        means /= world
    row = dict(zip(keys, means.tolist()))
    steps, seconds = len(stats["velocity"]), time.time() - t_last
    row["bad_steps"] = round(row["bad_steps"] * steps)  # ranks agree on every skip
    return dict(step=step, **row, sec_per_step=seconds / steps,
                images_per_sec=config["batch_size"] * steps / seconds)


def plot_metrics(metrics_path, png_path):
    """One panel per numeric metrics.jsonl key (every loss term, grad norm, ...) against the step.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    rows = read_metrics(os.path.dirname(metrics_path))
    keys = sorted(
        {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    )
    if not keys:
        return
    cols, lines = min(4, len(keys)), math.ceil(len(keys) / 4)
    fig = Figure(figsize=(3.2 * cols, 2.4 * lines))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.92, wspace=0.3, hspace=0.45)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(lines, cols, i + 1)
        steps, values = zip(
            *[(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        )
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
    write_atomic(png_path, lambda f: fig.savefig(f, format="png", dpi=80))


# ----------------------------------------------------------------------------------------------
# Reading any checkpoint into a model: train.py's, official REPA checkpoints, bare state dicts

REPA_ENCODER_DEPTH = 8  # REPA's --encoder-depth default, for checkpoints that carry no args
# --ckpt name of REPA's published SiT-XL/2 EMA weights (a bare state dict)
REPA_NAME = "repa-sit-xl-2"
# REPA's utils.download_model: the file its generate.py samples when given no --ckpt
REPA_URL = ("https://www.dl.dropboxusercontent.com/scl/fi/cxedbs4da5ugjq5wg3zrg/last.pt"
            "?rlkey=8otgrdkno0nd89po3dpwngwcc&st=apcc645o&dl=0")


def first_line(error):
    """The first line of an exception's message (library messages span many lines)."""
    return (str(error).strip().splitlines() or [""])[0]


def repa_path():
    """Where REPA's published weights live once downloaded: torch's hub cache."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", f"{REPA_NAME}.pt")


def newest_checkpoint(folder):
    """The highest-step .pt of a run folder's checkpoints/ (or of the folder itself), or None."""
    sub = os.path.join(folder, "checkpoints")
    folder = sub if os.path.isdir(sub) else folder
    names = sorted(f for f in os.listdir(folder) if f.endswith(".pt"))  # zero-padded steps
    return os.path.join(folder, names[-1]) if names else None


def resolve_ckpt(ckpt):
    """(path, why) of what --ckpt names: a file, a run folder, REPA_NAME, or None (the default)."""
    if ckpt == REPA_NAME:
        return repa_path(), f"REPA's published SiT-XL/2 weights, --ckpt {REPA_NAME}"
    if ckpt is None:
        folders = [os.path.join(RUNS, d) for d in os.listdir(RUNS)] if os.path.isdir(RUNS) else []
        newest = [p for p in (newest_checkpoint(r) for r in folders if os.path.isdir(r)) if p]
        if newest:
            why = f"no --ckpt: the newest checkpoint of the most recently written run under {RUNS}/"
            return max(newest, key=os.path.getmtime), why
        return repa_path(), (f"no --ckpt and no run under {RUNS}/: REPA's published SiT-XL/2 "
                             f"weights ({REPA_NAME})")
    if os.path.isdir(ckpt):
        path = newest_checkpoint(ckpt)
        if path is None:
            raise UserError(
                f"--ckpt {ckpt}: no checkpoint (*.pt) in the folder or its checkpoints/; "
                "give a run folder or a file"
            )
        return path, f"the newest checkpoint of run folder {ckpt}"
    return ckpt, "given by --ckpt"


def download_repa(path):
    """Fetch REPA's published weights into path once (atomically, with a progress bar)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        torch.hub.download_url_to_file(REPA_URL, path, progress=True)
    except (OSError, RuntimeError, ValueError) as e:  # offline (URLError), moved file, bad hash
        raise UserError(f"cannot download {REPA_NAME} (REPA's SiT-XL/2 weights) from {REPA_URL}: "
                        f"{type(e).__name__}: {first_line(e)}; download last.pt elsewhere and pass "
                        "--ckpt PATH") from e


def unreadable(path, error):
    """Why torch.load(path, weights_only=True) failed, in one line; never torch's advice to retry
    with weights_only=False: this project does not run code a file pickles."""
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return (f"{path} is not a checkpoint of tensors (it pickles {found[1]}, which a "
                "weights-only load refuses)")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"{path} is not readable ({e.strerror})"
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or a legacy pickle
        return f"{path} is not a checkpoint ({'empty' if not head else 'not a torch.save file'})"
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    reason = (detail[1] if detail else first_line(error).split(". ")[0])[:160]
    return f"{path} is not a readable checkpoint ({type(error).__name__}: {reason})"


def read_checkpoint(path):
    """torch.load a checkpoint dict with weights_only=True (allowing REPA's argparse.Namespace)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled types weights_only refuses
        raise UserError(unreadable(path, e)) from e
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: expected a dict, found {type(ckpt).__name__}")
    return ckpt


def is_state_dict(obj):
    """True for a non-empty dict of tensors (a bare state dict, e.g. REPA's released last.pt)."""
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def text_encoder_of(ckpt):
    """The text encoder a text-to-image checkpoint conditions on; None for a class-conditional one.

    The convention: train.py stores the resolved run config in every checkpoint and a text run's
    names its text encoder (config["text_encoder"]); a checkpoint without that config (REPA's
    train_t2i.py, a bare state dict) is text-to-image when its weights are MMDiT's (joint_blocks.*).
    """
    config = ckpt.get("config")
    if isinstance(config, dict):
        return config.get("text_encoder") or None
    state = ckpt if is_state_dict(ckpt) else ckpt.get("ema", ckpt.get("model"))
    mmdit = isinstance(state, dict) and any(str(k).startswith("joint_blocks.") for k in state)
    return CLIP_TEXT if mmdit else None  # REPA trains on U-ViT's CLIP ViT-L/14 features


def infer_config(state, args=None):
    """SiT, or MMDiT (joint_blocks.*: REPA's train_t2i.py), constructor dict of a REPA state dict;
    REPA's args (argparse.Namespace) where they exist."""
    text = any(k.startswith("joint_blocks.") for k in state)
    blocks, fc1 = ("joint_blocks.", "joint_blocks.0.x_block.mlp.fc1.weight") if text else (
        "blocks.", "blocks.0.mlp.fc1.weight")
    try:
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith(blocks))
        _, num_patches, hidden = state["pos_embed"].shape
        _, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
        # (hidden, context_dim) text projection, or (num_classes + 1, hidden) label table
        condition = state["context_embedder.weight" if text
                          else "y_embedder.embedding_table.weight"]
        mlp_hidden = state[fc1].shape[0]
        projectors = sorted({int(k.split(".")[1]) for k in state if k.startswith("projectors.")})
        z_dims = [state[f"projectors.{k}.4.weight"].shape[0] for k in projectors]
        projector_dim = state["projectors.0.0.weight"].shape[0] if projectors else 2048
    except (KeyError, ValueError) as e:  # ValueError: no blocks, or a tensor of the wrong rank
        raise UserError(f"not a SiT or MMDiT state dict: cannot read {e}") from e
    common = dict(
        input_size=math.isqrt(num_patches) * patch, patch_size=patch, in_channels=in_channels,
        depth=depth, mlp_ratio=mlp_hidden / hidden, z_dims=z_dims, projector_dim=projector_dim,
        encoder_depth=getattr(args, "encoder_depth", min(REPA_ENCODER_DEPTH, depth)),
        path_type=getattr(args, "path_type", "linear"),
    )
    if text:  # MMDiT's width and heads follow from its depth (REPA: 32 x depth, depth heads)
        if hidden != 32 * depth:
            raise UserError(f"an MMDiT state dict {hidden} wide at depth {depth}, but REPA's MMDiT "
                            f"is 32 x depth ({32 * depth}) wide: not a network mmdit.py builds")
        return common | dict(context_dim=condition.shape[1])
    try:  # heads leave no trace in the weights: args.model, else the size table, else 64-dim heads
        num_heads = size_config(args.model)["num_heads"]
    except (AttributeError, TypeError, ValueError):  # no args, no args.model, or not a preset name
        preset = [s for s in SIZES.values() if (s["depth"], s["hidden_size"]) == (depth, hidden)]
        num_heads = preset[0]["num_heads"] if preset else max(1, hidden // 64)
    rows = condition.shape[0]  # num_classes (+1 null class)
    num_classes = getattr(args, "num_classes", rows - 1)  # REPA always trains with a null class
    return common | dict(
        hidden_size=hidden, num_heads=num_heads, num_classes=num_classes,
        class_dropout_prob=0.1 if rows > num_classes else 0.0,
        qk_norm=getattr(args, "qk_norm", False),
    )


def fit_error(model, state):
    """A one-line description of the first way `state` does not fit `model`, or None if it fits."""
    expected = model.state_dict()
    problems = [f"missing key {k!r}" for k in expected if k not in state]
    problems += [f"unexpected key {k!r}" for k in state if k not in expected]
    problems += [f"{k!r} has shape {tuple(state[k].shape)}, the model wants {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        return problems[0] + (
            f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        )
    return None


def sampling_state(state):
    """state less what only training used and model.py / mmdit.py build no module for: the
    projectors of width 0 that REPA's baseline saves (--enc-type None: z_dims [0]) and SRA's student
    head (ap_head.*, in SRA's released checkpoints)."""
    empty = {k.split(".")[1] for k, v in state.items()
             if re.fullmatch(r"projectors\.\d+\.4\.weight", k) and v.shape[0] == 0}
    return {k: v for k, v in state.items() if not k.startswith("ap_head.")
            and not (k.startswith("projectors.") and k.split(".")[1] in empty)}


def build_model(ckpt, path, weights="ema"):
    """SiT or MMDiT (CPU, eval mode, no gradients) from a dict read_checkpoint(path) returned."""
    if is_state_dict(ckpt):  # REPA's released weights: the EMA state dict alone
        state, config = ckpt, None
    else:
        if not is_state_dict(ckpt.get(weights)):
            raise UserError(
                f"{path}: no {weights!r} state dict in the checkpoint (keys: {sorted(ckpt)})"
            )
        state = ckpt[weights]
        config = (
            ckpt["config"].get("model_config") if isinstance(ckpt.get("config"), dict) else None
        )
        if "config" in ckpt and not isinstance(config, dict):  # train.py's must say what it is
            raise UserError(f"{path}: the checkpoint's config has no 'model_config' dict")
    if config is None:  # REPA's (and SRA's) checkpoints: no config, the shapes say it
        state = sampling_state(state)
        try:
            config = infer_config(state, ckpt.get("args"))
        except UserError as e:
            raise UserError(f"{path}: {e}") from e
    network = SiT
    if text_encoder_of(ckpt) is not None:  # text-to-image: mmdit.py's network
        import mmdit

        network = mmdit.MMDiT
    try:
        model = network(**config)
        losses.interpolant(torch.tensor(0.5), model.config["path_type"])  # a path the samplers know
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: cannot build {network.__name__} from the checkpoint config: "
                        f"{e}") from e
    error = fit_error(model, state)
    if error:
        raise UserError(f"{path}: checkpoint does not fit the model: {error}")
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def load_model(path, weights="ema"):
    """SiT (CPU, eval mode) from a train.py checkpoint, an official REPA checkpoint or a state dict.
    """
    return build_model(read_checkpoint(path), path, weights)
