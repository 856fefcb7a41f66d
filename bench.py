"""Benchmark training and sampling cost: step time, peak memory and FLOPs per alignment preset
vs vanilla SiT.

    python bench.py                                  # GPU: SiT-XL/2, 256 px, batch 32 (one GPU's
                                                     # share of 256)
    python bench.py --gpu OUT_DIR                    # the prepared GPU run (at most 8 minutes):
                                                     # OUT_DIR/table.md and results.json
    python bench.py --threads 1 --encoder dinov2-vit-b   # shared CPU: the real DINOv2-B
                                                         # architecture, random weights
    python bench.py --fid                            # fid.py: FID from stats vs torch-fidelity

Each preset is one train.py train_step (build_run, the same flags as train.py) on random data.
Plain `bench.py` runs each preset and the sampler in a fresh child process, so the peak memory is
theirs alone; `--gpu` runs every configuration in one process (the peak reset per configuration)
to fit its time budget. Step time is the median over --steps after --warmup steps, so SARA's
discriminator update (one step in --disc-every) is left out of it and of the FLOPs.
"""

import argparse
import contextlib
import datetime
import functools
import gc
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import tempfile
import time
import traceback

import torch
from torch.utils import flop_counter

import analysis
import cluster
import fid
import losses
import mmdit
import runs
import sample
import train
from cluster import at_least, write_atomic
from encoders import CLIP_TEXT, FAMILIES, TEXT_TOKENS, TINY_RANDOM, build_encoder, canonical_name

NUM_CLASSES = 1000  # ImageNet: the label table's size is part of the model
PEAK_TFLOPS = 790.0  # the H200 at hand, dense bf16, as issue 22 gives it (A100: 312)
GPU_PRESETS = "none,repa,sara,sra2,repa+sra2"  # --gpu's: the papers' methods
FIRST_COMPILE_S = 90.0  # --gpu's guess at torch.compile of SiT-XL/2 forward + backward
# SRA^2 Table 5 (H100, batch 256 on 8 GPUs): per-batch training time over SiT-XL/2's
PAPER_X_NONE = {"repa": 1.22, "sra": 1.37, "sra2": 1.11}
# MMDiT's alignment presets: z_dims (REPA's projector), the SRA^2 head's block and SRA's student
# head's (SiT-L's 8 of 24)
MMDIT_ALIGN = {"none": dict(z_dims=()), "repa": dict(z_dims=(768,)),
               "sra": dict(z_dims=(), self_depth=8), "sra2": dict(z_dims=(), sra_depth=8)}
# CLIP ViT-L/14's text model (encoders.CLIP_TEXT), counted once with FlopCounterMode: it runs once
# per caption in data preparation (features are precomputed), once per prompt when sampling
CLIP_TEXT_PARAMS, CLIP_TEXT_GFLOPS = 123.06e6, 13.3

# torch counts CPU attention as 0 FLOPs (its CPU flash kernel has no formula): give it torch's
# own SDPA formulas.
aten = torch.ops.aten
flop_counter.flop_registry.setdefault(
    aten._scaled_dot_product_flash_attention_for_cpu, flop_counter.sdpa_flop
)
flop_counter.flop_registry.setdefault(aten._scaled_dot_product_flash_attention_for_cpu_backward,
                                      flop_counter.sdpa_backward_flop)

# The device every measurement runs on (--device); use_device sets it in each process.
DEVICE, GPU = torch.device("cpu"), False


def use_device(name):
    """Measure on device `name` ('cuda' or 'cpu') from here on, in this process."""
    global DEVICE, GPU
    DEVICE, GPU = torch.device(name), name == "cuda"


use_device("cuda" if torch.cuda.is_available() else "cpu")


def device_defaults(gpu):
    """Flag defaults by device: the paper's model on a GPU; on CPU a size whose whole bench takes
    a few minutes on 2 cores."""
    if gpu:  # train.py's imagenet256 recipe
        return dict(model="SiT-XL/2", batch_size=32, encoder="dinov2-vit-b", precision="fp16",
                    warmup=3, steps=10, sample_steps=250, sample_batch=64,
                    max_batch=2048, fid_images=1024, fid_batch=64, fid_pr_rows=10_000)
    # CPU autocast fp16 is not a real training path; the first (FLOP-counted) step warms up too
    return dict(model="SiT-S/2", batch_size=2, encoder=TINY_RANDOM, precision="fp32", warmup=1,
                steps=5, sample_steps=10, sample_batch=4, max_batch=8,
                fid_images=16, fid_batch=8, fid_pr_rows=2048)


def comma_list(allowed, kind=str):
    """argparse type: 'a,b' -> [kind(a), kind(b)], each one of allowed."""

    def parse(text):
        items = [kind(x) for x in text.split(",")]
        if not items or any(x not in allowed for x in items):
            raise argparse.ArgumentTypeError(
                f"{text} is not a comma-separated list of {', '.join(map(str, allowed))}")
        return items

    return parse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default (this device's)."""


def parse_args(argv=None):
    """Command line (argv=None reads sys.argv); defaults depend on --device."""
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", choices=["cuda", "cpu"], default=DEVICE.type,
                        help="where to measure (default: cuda when present)")
    known, _ = device.parse_known_args(argv)
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__, parents=[device],
                                formatter_class=HelpFormatter)
    a = p.add_argument
    count, flag = at_least(1), dict(type=int, choices=[0, 1])
    a("--model", help="SiT size, e.g. SiT-XL/2, SiT-B/2")
    a("--resolution", type=int, default=256, help="image resolution in pixels")
    a("--batch-size", type=count, help="images per training step")
    a("--precision", choices=["fp16", "bf16", "fp32"], help="train.py --precision")
    a("--encoder",
      help="train.py --enc-type: dinov2-vit-b (-s, -l, -g; comma-separated), tiny-random")
    a("--random-weights", **flag, help="1: the encoder architectures with random weights (no "
      "download, the same cost); 0: the pretrained ones (default: 0 on a GPU without --gpu)")
    a("--disc-pretrained", **flag, default=0, help="1: SARA's discriminator with the ImageNet "
      "ResNet-18 trunk (download); 0: random trunk, the same cost")
    a("--presets", help=f"comma-separated alignment presets (default: all; --gpu: {GPU_PRESETS})")
    a("--threads", type=count, default=torch.get_num_threads(),
      help="CPU threads; on a shared machine use 1: OpenMP threads spin-wait whenever another job "
      "holds a core, so step times swing tenfold")
    a("--warmup", type=at_least(0), help="untimed steps before the timed ones")
    a("--steps", type=count, help="timed steps; the median is reported")
    a("--sample-steps", type=count, help="Euler-Maruyama steps of the sampler")
    a("--sample-batch", type=count, help="samples per sampler call")
    a("--cfg", type=float, default=1.8,
      help="guidance scale of the CFG sampler row (guided at every step)")
    a("--encoder-costs", default="", help="also time each encoder's forward (REPA names, "
      "comma-separated, or 'all': DINOv2 B/L/g and every other family's largest) on --batch-size "
      "random images with random weights, beside the vanilla SiT step")
    a("--mmdit-model", default="MMDiT", choices=list(mmdit.MMDIT_SIZES),
      help="the text-to-image rows' MMDiT size (FLOPs counted on the meta device; --gpu: "
      "also timed at --batch-size, align none/repa/sra2)")
    a("--peak-tflops", type=cluster.positive(), default=PEAK_TFLOPS, help="the chip's dense bf16 "
      "peak TFLOP/s, for MFU (H200 as issue 22 gives it: 790; A100: 312)")
    a("--gpu", metavar="OUT_DIR", help="the prepared GPU benchmark: every preset x --precisions x "
      "--compile-modes at --batch-size and at the largest batch that fits, the per-part split, "
      "the sampler and fid.py's Inception; writes OUT_DIR/table.md and results.json")
    a("--budget", type=at_least(0.0, float), default=390.0, help="--gpu: seconds of measuring; a "
      "job whose kind took longer so far than what is left is skipped and recorded as skipped")
    a("--precisions", type=comma_list(["bf16", "fp16", "fp32"]), default=["bf16", "fp16"],
      help="--gpu: the precisions measured, comma-separated")
    a("--compile-modes", type=comma_list([0, 1], int), default=[0, 1],
      help="--gpu: train.py --compile values measured, comma-separated")
    a("--max-batch", type=count, help="--gpu: the largest batch the doubling search tries")
    a("--init-on-device", **flag, default=1, help="1: build the networks directly on the "
      "device (seconds instead of a minute for SiT-XL/2); 0: on the CPU, then moved, as train.py")
    a("--cknna-only", action="store_true",
      help="time only analysis.py's CKNNA (no training or sampler tables)")
    a("--cknna-samples", type=int, default=10000,
      help="CKNNA timing: images (rows of each feature matrix)")
    a("--cknna-blocks", type=int, default=28,
      help="CKNNA timing: SiT blocks compared with the encoder (XL: 28)")
    a("--cknna-dim", type=int, default=1152, help="CKNNA timing: SiT hidden size (XL: 1152)")
    a("--cknna-enc-dim", type=int, default=768, help="CKNNA timing: encoder width (DINOv2-B: 768)")
    add_fid_args(p)
    p.set_defaults(enc_weights=None, **device_defaults(known.device == "cuda"))
    args = p.parse_args(argv)
    if args.random_weights is None:  # --gpu runs where there is no network
        args.random_weights = int(args.device == "cpu" or bool(args.gpu))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; use --device cpu")
    return args


# ----------------------------------------------------------------------------------------------
# Measurements


def timed(fn, *args, **kwargs):
    """(wall, process CPU) seconds of fn(*args); CUDA synchronised on both sides so the work counts,
    not its launch."""
    if GPU:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    if GPU:
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def proc_status_bytes(key):
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def memory_now():
    """Bytes in use: allocated by torch on GPU; the resident set on CPU (torch's CPU allocations
    bypass tracemalloc)."""
    return torch.cuda.memory_allocated() if GPU else proc_status_bytes("VmRSS")


def reset_peak_memory():
    """Restart the high-water mark from the current use (on CPU, Linux's VmHWM
    reset through clear_refs)."""
    gc.collect()
    if GPU:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory():
    """Bytes at the high-water mark since reset_peak_memory."""
    return torch.cuda.max_memory_allocated() if GPU else proc_status_bytes("VmHWM")


def free_memory():
    """Return what the last measurement held (an OOM's leftovers, a compiled model's graphs too)
    to the device."""
    torch._dynamo.reset()
    gc.collect()
    if GPU:
        torch.cuda.empty_cache()


def memory_note():
    """What the peak memory column counts on this device."""
    return ("torch.cuda.max_memory_allocated less what was allocated before building (weights, "
            "EMA, AdamW state, encoders and activations)" if GPU else "peak resident set (VmHWM) "
            "less the RSS before building, first-use library pages included")


def device_name(args):
    """The GPU's name, or the CPU threads in use."""
    return torch.cuda.get_device_name() if GPU else f"CPU, {args.threads} of {os.cpu_count()} cores"


def setup(args, align, **overrides):
    """Set this process up as train.main does (seed, TF32) with --threads; train.py's config of one
    preset, overrides (batch_size=64, compile=1, ...) replacing bench's flags."""
    model = overrides.pop("model", args.model)
    flags = dict(preset="coco256" if runs.is_text_model(model) else "imagenet256", align=align,
                 model=model, resolution=args.resolution,
                 batch_size=args.batch_size, precision=args.precision, enc_type=args.encoder,
                 enc_weights=args.enc_weights or None, disc_pretrained=args.disc_pretrained)
    flags.update(overrides)
    config = train.resolve_config(train.parse_args(
        [s for k, v in flags.items() if v is not None for s in (f"--{k.replace('_', '-')}", str(v))]
    ))
    # TF32 as train.main sets it
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(config["tf32"])
    torch.manual_seed(config["seed"])
    torch.set_num_threads(args.threads)
    return config


def build(args, align, **overrides):
    """setup, then train.py's build_run, its SiT in train mode."""
    config = setup(args, align, **overrides)
    if config["compile"]:
        torch._dynamo.reset()  # a fresh compile: no cache limit reached, no earlier graphs reused
    # On the device: random init of SiT-XL/2 on the CPU takes longer than most measurements
    on_device = torch.device(DEVICE) if args.init_on_device else None
    with on_device or contextlib.nullcontext():
        run = train.build_run(config, random_captions() if runs.is_text_model(config["model"])
                              else NUM_CLASSES, DEVICE, world=1)
    run.model.train()
    return config, run


def random_captions():
    """What build_network reads of COCO caption data: CLIP's width and random null-caption
    features (the cost is the same)."""
    return argparse.Namespace(text_encoder=CLIP_TEXT, text_dim=768,
                              null_context=torch.randn(1, TEXT_TOKENS, 768))  # (1, 77, 768)


def random_batch(config):
    """train_step's batch of config's size: uint8 images, latent moments (mean, std), labels (an
    MMDiT: random CLIP caption features)."""
    b, r = config["batch_size"], config["resolution"]
    condition = (torch.randn(b, TEXT_TOKENS, 768, device=DEVICE)  # (B, 77, 768)
                 if runs.is_text_model(config["model"])
                 else torch.randint(0, NUM_CLASSES, (b,), device=DEVICE))
    return [torch.randint(0, 256, (b, 3, r, r), dtype=torch.uint8, device=DEVICE),
            torch.randn(b, 8, r // 8, r // 8, device=DEVICE), condition]  # (B, 8, r/8, r/8)


def measure_step(args, align, count_flops=True, **overrides):
    """One preset's train_step on random data: median seconds (wall, process CPU) and every timed
    step's, peak memory, the timed steps skipped as non-finite (fp16) and FLOPs of one step."""
    # before anything is built: the interpreter and torch's libraries are not counted
    base = memory_now()
    config, run = build(args, align, **overrides)
    b = config["batch_size"]
    step = functools.partial(train.train_step, run, config,
                             losses.AlignConfig(**config["align_config"]), random_batch(config))
    reset_peak_memory()  # after building: loading encoder weights peaks above what training holds
    counter = flop_counter.FlopCounterMode(display=False)
    with counter if count_flops else contextlib.nullcontext():
        step(1, slice(0, b))  # not a discriminator step, like the steps the median picks
    records, times = [], []  # train_step's logged values, (wall, CPU) seconds
    for i in range(args.warmup + args.steps):
        times.append(timed(lambda: records.append(step(i, slice(0, b)))))
    walls, cpus = zip(*times[args.warmup:])
    return dict(preset=align, batch=b, sec=statistics.median(walls), cpu=statistics.median(cpus),
                step_secs=list(walls), mem=peak_memory() - base,
                flops=counter.get_total_flops() if count_flops else None,
                bad_steps=int(sum(r["bad_steps"] for r in records[args.warmup:])))


def mmdit_cost(name, align, resolution=256):
    """Params and FLOPs per image of an MMDiT (REPA's T2I model) with an alignment preset, built and
    run on the meta device (no memory, no weights): forward alone and forward + backward. The
    network alone: the alignment targets (REPA's DINOv2, SRA's EMA teacher to block 16) are not in
    it."""
    with torch.device("meta"):
        model = mmdit.build_mmdit(name, input_size=resolution // 8, **MMDIT_ALIGN[align])
        x = torch.randn(1, 4, resolution // 8, resolution // 8)  # (1, 4, r/8, r/8) latent
        context = torch.randn(1, TEXT_TOKENS, 768)  # (1, 77, 768) CLIP features
    counts = []
    for backward in (False, True):
        with flop_counter.FlopCounterMode(display=False) as counter:
            out = model(x, torch.rand(1, device="meta"), context, align=align != "none")
            if backward:
                heads = [*out.h_dens] + [h for h in (out.x0_hat, out.h_self) if h is not None]
                sum(o.sum() for o in [out.v, *heads]).backward()  # every head's gradient
        counts.append(counter.get_total_flops())
    return dict(preset=align, params=sum(p.numel() for p in model.parameters()),
                forward=counts[0], step=counts[1])


def mmdit_table(args):
    """The text-to-image rows: MMDiT per image with each alignment preset, and the text encoder."""
    header = ["MMDiT preset", "M params", "GFLOP fwd/img", "GFLOP step/img", "x none"]
    results = [mmdit_cost(args.mmdit_model, a, args.resolution) for a in MMDIT_ALIGN]
    rows = [[r["preset"], f"{r['params'] / 1e6:.1f}", f"{r['forward'] / 1e9:.4g}",
             f"{r['step'] / 1e9:.4g}", f"{r['step'] / results[0]['step']:.3f}"] for r in results]
    rows.append(["CLIP ViT-L/14 text (per caption)", f"{CLIP_TEXT_PARAMS / 1e6:.1f}",
                 f"{CLIP_TEXT_GFLOPS:g}", "-", "-"])
    return header, rows, results


def measure_sampler(args, **overrides):
    """Samples/s of sample.py's sampler (Euler-Maruyama + guided_velocity) without and with CFG."""
    ema = build(args, "none", **overrides)[1].ema
    indices = list(range(args.sample_batch))

    d = sample.parse_args([])  # sample.py's defaults: mode, guidance interval, seed
    sampling = dict(seed=d.seed, mode=d.mode, guidance_low=d.guidance_low,
                    guidance_high=d.guidance_high, device=DEVICE)
    rows = []
    for scale in (1.0, args.cfg):
        sample.sample_latents(ema, indices, num_steps=2, cfg=scale, **sampling)  # warmup
        sec, _ = timed(sample.sample_latents, ema, indices, num_steps=args.sample_steps, cfg=scale,
                       **sampling)
        rows.append(dict(cfg=scale, samples_per_sec=args.sample_batch / sec))
    return rows


def measure_parts(args, **overrides):
    """Median seconds and FLOPs of each part of a SARA step (one D update included), and the
    median seconds of the whole train_step (no D update)."""
    config, run = build(args, "sara", **overrides)
    align = losses.AlignConfig(**config["align_config"])
    b = config["batch_size"]
    batch = images, moments, labels = random_batch(config)
    x0 = moments[:, :4]  # (B, 4, r/8, r/8): the latent means stand in for a drawn x0
    noise = losses.draw_noise(b, x0.shape[1:], align, config["class_dropout"], DEVICE, run.gen)
    amp = train.autocast_args(config["precision"], DEVICE)
    z_encs, h_dens = [], []

    def encoder():
        with torch.no_grad(), torch.autocast(**amp):
            z_encs[:] = [enc(images) for enc in run.encoders]  # per encoder (B, N, D)

    def sit_forward_backward():
        with torch.autocast(**amp):
            out = losses.training_losses(run.model, x0, labels, z_encs, align, noise, run.disc)
        run.scaler.scale(out.total).backward()
        h_dens[:] = out.h_dens

    def discriminator_step():
        with torch.autocast(**amp):
            d_loss, _ = losses.discriminator_step_loss(run.disc, z_encs[0], h_dens[0],
                                                       align.disc_bn)
        run.disc_scaler.scale(d_loss).backward()
        run.disc_scaler.step(run.disc_opt)
        run.disc_scaler.update()
        run.disc_opt.zero_grad(set_to_none=True)

    parts = {"encoder": encoder, "SiT forward+backward": sit_forward_backward,
             # on the gradients left in place
             "discriminator step": discriminator_step, "AdamW step": run.opt.step,
             "EMA": functools.partial(train.update_ema, run.ema, run.model, config["ema_decay"])}
    rows = []
    for name, part in parts.items():
        with flop_counter.FlopCounterMode(display=False) as counter:
            part()  # also the warmup
        walls = [timed(part)[0] for _ in range(args.warmup + args.steps)][args.warmup:]
        rows.append(dict(part=name, sec=statistics.median(walls), flops=counter.get_total_flops()))
    # step 1: no D update
    step = [timed(train.train_step, run, config, align, batch, 1, slice(0, b))[0]
            for _ in range(args.warmup + args.steps)]
    return dict(rows=rows, step_sec=statistics.median(step[args.warmup:]))


def parts_table(args, rows, step_sec):
    """The per-part table: ms, share of a whole train_step, GFLOP, TFLOP/s and (GPU) MFU."""
    header = ["part", "ms", "x step", "GFLOP", "TFLOP/s"] + (["MFU"] if GPU else [])
    return header, [
        [r["part"], f"{r['sec'] * 1e3:.2f}", f"{r['sec'] / step_sec:.2f}",
         f"{r['flops'] * 1e-9:.3g}", f"{r['flops'] / r['sec'] / 1e12:.3g}"]
        + ([f"{r['flops'] / r['sec'] / 1e12 / args.peak_tflops:.1%}"] if GPU else [])
        for r in rows]


def sampler_table(rows):
    """The sampler table: samples/s without and with guidance."""
    return ["guidance", "samples/s", "x no CFG"], [
        [f"cfg {s['cfg']:g}" + (" (2x batch)" if s["cfg"] > 1 else ""),
         f"{s['samples_per_sec']:.3f}", f"{s['samples_per_sec'] / rows[0]['samples_per_sec']:.2f}"]
        for s in rows]


def save_random_encoders(spec, resolution, folder):
    """Seeded random weights for each ViT encoder in spec, as the comma-separated files train.py's
    --enc-weights takes."""
    paths = []
    for i, name in enumerate(spec.split(",")):
        path = "" if canonical_name(name) == TINY_RANDOM else os.path.join(folder, f"encoder{i}.pt")
        if path:
            torch.manual_seed(i)
            torch.save(build_encoder(name, resolution, pretrained=False).model.state_dict(), path)
        paths.append(path)
    return ",".join(paths)


def on_device(device, fn, *args):
    """fn(*args) measured on device (a child process starts on the default one)."""
    use_device(device)
    return fn(*args)


def isolated(fn, *args):
    """fn(*args) in a fresh child process, so its peak memory and allocator state are its own."""
    # CUDA does not survive fork. On CPU a fork server that imported bench (and torch) once forks
    # every child: a plain fork of a process that has run OpenMP work (an earlier test, say) hangs
    # in the child's first parallel op.
    if GPU:
        context = multiprocessing.get_context("spawn")
    else:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["bench"])
    with context.Pool(1) as pool:
        return pool.apply(on_device, (DEVICE.type, fn, *args))


def encoder_cost_names(spec):
    """--encoder-costs -> REPA names; 'all' is DINOv2 B/L/g and the largest of every other family
    (SARA Table 5's)."""
    if spec == "all":
        return ["dinov2-vit-b", "dinov2-vit-l", "dinov2-vit-g"] + [
            f"{f}-vit-{list(fam.timm_names)[-1]}"
            for f, fam in FAMILIES.items()
            if not f.startswith("dinov2")
        ]
    return [canonical_name(n) for n in spec.split(",") if n.strip()]


def measure_encoder(args, name):
    """Forward FLOPs, median wall and CPU time of one frozen encoder on a batch of raw images
    (in a fresh process)."""
    enc = build_encoder(name, args.resolution, pretrained=False).to(DEVICE)
    images = torch.randint(0, 256, (args.batch_size, 3, args.resolution, args.resolution),
                           dtype=torch.uint8, device=DEVICE)
    dtype = torch.float16 if args.precision == "fp16" else torch.bfloat16
    # as train.py's step runs it
    with torch.autocast(DEVICE.type, dtype, enabled=args.precision != "fp32"):
        with flop_counter.FlopCounterMode(display=False) as counter:
            enc(images)  # also the warmup
        walls, cpus = zip(*[timed(enc, images) for _ in range(args.steps)])
    return dict(
        name=name,
        params=sum(p.numel() for p in enc.parameters()),
        sec=statistics.median(walls), cpu=statistics.median(cpus), flops=counter.get_total_flops(),
    )


def encoder_cost_rows(args, step):
    """One row per encoder: its forward cost and the ratio to step, the vanilla SiT training step's
    result dict."""
    rows = []
    for name in encoder_cost_names(args.encoder_costs):
        r = isolated(measure_encoder, args, name)
        rows.append(
            [
                name, f"{r['params'] / 1e6:.0f}", f"{r['flops'] / 1e9:.3g}",
                f"{r['flops'] / step['flops']:.2f}", f"{r['sec'] * 1e3:.1f}",
                f"{r['sec'] / step['sec']:.2f}",
            ]
            + ([] if GPU else [f"{r['cpu'] * 1e3:.1f}", f"{r['cpu'] / step['cpu']:.2f}"])
        )
    return rows


def print_encoder_costs(args, step):
    """The encoder-cost table of --encoder-costs; returns its rows."""
    rows = encoder_cost_rows(args, step)
    print(f"\nencoder forward (random weights, batch {args.batch_size}, {args.resolution} px; "
          f"x step: against the {step['preset']} SiT training step above)")
    print_table(
        ["encoder", "M params", "GFLOP", "x step", "ms", "x step"]
        + ([] if GPU else ["cpu ms", "x step"]),
        rows,
    )
    return rows


# ----------------------------------------------------------------------------------------------
# Report


def random_parts(args):
    """What in the benchmark is a random stand-in (none of it changes the cost)."""
    names = args.encoder.split(",")
    dinov2 = [n for n in names if canonical_name(n) != TINY_RANDOM]
    parts = ["SiT weights (fresh init)", "data (random uint8 images, latent moments, labels)"]
    parts += ([f"encoder {TINY_RANDOM} (a 16x16 conv, far cheaper than a ViT)"]
              if len(dinov2) < len(names) else [])
    random_dinov2 = f"encoder weights ({', '.join(dinov2)}: real architecture, random init)"
    parts += [random_dinov2] if dinov2 and args.random_weights else []
    return parts + ([] if args.disc_pretrained else ["discriminator trunk (random ResNet-18)"])


def print_table(header, rows):
    """A plain right-aligned text table; the first column left-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)
                        for i, (x, w) in enumerate(zip(row, widths))))


def main(args):
    """Measure every preset and the sampler, each in its own process, print the tables; returns
    header and rows."""
    use_device(args.device)
    print(f"bench.py: {device_name(args)}, torch {torch.__version__}; {args.model} at "
          f"{args.resolution} px, batch {args.batch_size}, {args.precision}; median of "
          f"{args.steps} steps after {args.warmup} warmup")
    print(f"encoder: {args.encoder}; RANDOM: {'; '.join(random_parts(args))}")
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other jobs "
          "slow every row; read the ratios)")
    with tempfile.TemporaryDirectory() as folder:
        args.enc_weights = (isolated(save_random_encoders, args.encoder, args.resolution, folder)
                            if args.random_weights else None)
        presets = (args.presets or ",".join(losses.ALIGN_PRESETS)).split(",")
        results = [isolated(measure_step, args, p) for p in presets]
        sampler = isolated(measure_sampler, args)
        parts = isolated(measure_parts, args)
    ref = next((r for r in results if r["preset"] == "none"), results[0])
    # (column, result key, unit scale, format), each followed by its ratio to none; CPU time only
    # means something on CPU, where it is what a step costs even while other jobs keep it waiting
    # for a core
    columns = ([("ms/step", "sec", 1e3, ".1f")]
               + ([] if GPU else [("cpu ms/step", "cpu", 1e3, ".1f")])
               + [("peak MiB", "mem", 2**-20, ".0f"), ("GFLOP/step", "flops", 1e-9, ".3g")])
    header = (["preset"] + [h for c in columns for h in (c[0], "x none")] + ["TFLOP/s"]
              + (["MFU"] if GPU else []))
    rows = []
    for r in results:
        tflops = r["flops"] / r["sec"] / 1e12
        rows.append([r["preset"]]
                    + [cell for _, key, scale, fmt in columns
                       for cell in (format(r[key] * scale, fmt), f"{r[key] / ref[key]:.2f}")]
                    + [f"{tflops:.3g}"] + ([f"{tflops / args.peak_tflops:.1%}"] if GPU else []))
    note = (f"MFU against {args.peak_tflops:g} TFLOP/s" if GPU
            else "cpu ms: the process's CPU time, all threads")
    print(f"\ntraining step (peak memory: {memory_note()}; FLOPs: FlopCounterMode over one "
          f"forward + backward, encoders included; {note})")
    print_table(header, rows)
    print(f"\nsampler: sample.py's Euler-Maruyama SDE, {args.sample_steps} steps, batch "
          f"{args.sample_batch}, EMA model")
    print_table(*sampler_table(sampler))
    if args.encoder_costs:
        print_encoder_costs(args, ref)
    print(f"\nparts of a SARA step (median of {args.steps}; the discriminator step runs once per "
          f"--disc-every 5 steps; whole train_step, D update excluded: "
          f"{parts['step_sec'] * 1e3:.1f} ms)")
    print_table(*parts_table(args, parts["rows"], parts["step_sec"]))
    mmdit_header, mmdit_rows, _ = mmdit_table(args)
    print(f"\ntext-to-image: {args.mmdit_model} at {args.resolution} px, per image, meta device "
          "(FlopCounterMode, the network and its heads: REPA's projector, SRA's and SRA^2's "
          "heads; not SRA's EMA-teacher forward to block 16; step = forward + backward). The "
          "text encoder is not in a step: it runs once per caption in data preparation and once "
          "per prompt when sampling")
    print_table(mmdit_header, mmdit_rows)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    return header, rows, sampler


# ----------------------------------------------------------------------------------------------
# The prepared GPU run (python bench.py --gpu OUT_DIR): every configuration in this one process,
# most important first, within --budget seconds; OUT_DIR/table.md and results.json after every job,
# so a run stopped from outside still leaves what it measured


class Budget:
    """--budget seconds from now; a job starts only while the longest job of its kind so far (a
    first compile: FIRST_COMPILE_S) still fits in what is left."""

    def __init__(self, seconds):
        self.start = time.monotonic()
        self.end, self.longest = self.start + seconds, {"compile": FIRST_COMPILE_S}

    def run(self, kind, fn, *args, **kwargs):
        """fn's result, or why there is none: 'skipped (time budget)', 'oom' or 'error: ...'."""
        now = time.monotonic()
        if now + self.longest.get(kind, 0.0) > self.end:
            return "skipped (time budget)"
        try:
            result = fn(*args, **kwargs)
        except torch.OutOfMemoryError:
            result = "oom"
        except Exception as e:  # one failing configuration must not cost the rest of a GPU run
            traceback.print_exc()
            result = f"error: {type(e).__name__}: {runs.first_line(e)}"
        free_memory()  # after the handler: the traceback's tensors are gone
        self.longest[kind] = max(self.longest.get(kind, 0.0), time.monotonic() - now)
        return result


def fits(fn):
    """Whether fn() ran without running out of device memory; what it held is freed either way."""
    try:
        fn()
        ok = True
    except torch.OutOfMemoryError:
        ok = False
    free_memory()
    return ok


def largest_batch(args, align, precision):
    """The largest batch, doubling from --batch-size up to --max-batch, whose train steps (the first
    with D's update, the second with AdamW's state) fit in device memory; None if none does."""
    config, run = build(args, align, precision=precision)
    align_config = losses.AlignConfig(**config["align_config"])
    largest, b = None, args.batch_size
    while b <= args.max_batch:
        sized = {**config, "batch_size": b}

        def two_steps():
            batch = random_batch(sized)
            for step in (0, 1):
                train.train_step(run, sized, align_config, batch, step, slice(0, b))

        if not fits(two_steps):
            break
        largest, b = b, 2 * b
    return largest


def training_row(budget, args, preset, precision, compile, kind, batch, flops_per_image,
                 model=None):
    """One training configuration of results.json, measured or with the reason it is not; batch is
    a status instead when the search for the largest one ended without a batch. model: --model's
    SiT, or an MMDiT size (random caption features)."""
    model = model or args.model
    row = dict(model=model, preset=preset, precision=precision, compile=compile, batch_kind=kind)
    if not isinstance(batch, int):
        return {**row, "batch": None, "status": batch or "oom"}
    key = model, preset
    count = not compile and key not in flops_per_image  # an eager step's FLOPs, once per preset
    result = budget.run("compile" if compile else "eager", measure_step, args, preset,
                        count_flops=count, precision=precision, compile=compile, batch_size=batch,
                        model=model)
    if isinstance(result, str):
        return {**row, "batch": batch, "status": result}
    if count:
        flops_per_image[key] = result["flops"] / batch  # every term is per image
    flops = flops_per_image[key] * batch if key in flops_per_image else None
    tflops = flops / result["sec"] / 1e12 if flops else None
    return {**row, "batch": batch, "status": "ok", "sec": result["sec"],
            "step_secs": result["step_secs"], "img_per_sec": batch / result["sec"],
            "peak_mem_bytes": result["mem"], "flops": flops, "tflops": tflops,
            "mfu": tflops / args.peak_tflops if tflops else None, "bad_steps": result["bad_steps"]}


def add_ratios(rows, paper):
    """x_none: each row's time per image over none's at the same precision, compile and batch kind;
    paper_x_none: the paper's ratio for the preset (paper: preset -> ratio)."""
    def key(r):
        return r["precision"], r["compile"], r["batch_kind"]

    ref = {key(r): r["sec"] / r["batch"] for r in rows if r["preset"] == "none" and "sec" in r}
    for r in rows:
        r["x_none"] = r["sec"] / r["batch"] / ref[key(r)] if "sec" in r and key(r) in ref else None
        r["paper_x_none"] = paper.get(r["preset"])


def environment(args):
    """Date, device, driver and library versions of this run."""
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=device_name(args), driver=nvidia_driver() if GPU else None,
                torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(), python=platform.python_version(),
                cpus=os.cpu_count())


def nvidia_driver():
    """The NVIDIA driver version as nvidia-smi reports it, or why it did not."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return out.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        return f"unknown (nvidia-smi: {type(e).__name__})"


def cell(value, spec):
    """A table cell: value formatted, '-' for none."""
    return "-" if value is None else format(value, spec)


def markdown_table(header, rows):
    """A GitHub markdown table."""
    return [f"| {' | '.join(header)} |", f"|{' --- |' * len(header)}"] + [
        f"| {' | '.join(map(str, row))} |" for row in rows]


def training_table(rows):
    """The training rows of results.json as table cells."""
    header = ["preset", "precision", "compile", "batch", "ms/step", "img/s", "peak GiB", "TFLOP/s",
              "MFU", "x none", "paper x none", "skipped steps", "status"]
    return header, [
        [r["preset"], r["precision"], r["compile"],
         cell(r["batch"], "d") + (" (largest)" if r["batch_kind"] == "largest" else ""),
         cell(r.get("sec") and r["sec"] * 1e3, ".1f"), cell(r.get("img_per_sec"), ".1f"),
         cell(r.get("peak_mem_bytes") and r["peak_mem_bytes"] / 2**30, ".2f"),
         cell(r.get("tflops"), ".3g"), cell(r.get("mfu"), ".1%"), cell(r.get("x_none"), ".2f"),
         cell(r["paper_x_none"], ".2f"), cell(r.get("bad_steps"), "d"), r["status"]]
        for r in rows]


def markdown(args, report):
    """table.md: what was measured, how, and every table."""
    s, env, parts = report["settings"], report["environment"], report["parts"]
    sampler, inception = report["sampler"], report["inception"]
    lines = [
        f"# bench.py --gpu: {s['model']} at {s['resolution']} px on {env['device']}", "",
        f"Measured {env['date']}: driver {env['driver']}, torch {env['torch']}, CUDA {env['cuda']},"
        f" cuDNN {env['cudnn']}, Python {env['python']}; {report['elapsed_s']:.0f} s of measuring"
        f" (budget {s['budget_s']:g} s).", "",
        f"RANDOM (the cost is the same): {'; '.join(s['random'])}. Encoder: {s['encoder']}.", "",
        f"- step time: median of {s['steps']} timed train.py `train_step`s after {s['warmup']} "
        "warm-up steps and one FLOP-counted (or compiling) step, CUDA-synchronised on a GPU; "
        "SARA's discriminator update (one step in 5) falls out of the median; img/s: "
        "batch / step time",
        f"- peak: {s['memory']}, reset per configuration",
        "- FLOPs: FlopCounterMode over one eager step, encoders included, per image times the "
        f"batch; MFU: those FLOPs per second over {s['peak_tflops']:g} TFLOP/s, the chip's dense "
        "bf16 peak (--peak-tflops), for fp16 rows too",
        "- x none: time per image over none's at the same precision, compile and batch kind; "
        "paper: SRA^2 Table 5 (H100, batch 256 on 8 GPUs, per-batch time over SiT-XL/2's)",
        "- compile 1: train.py --compile 1, the SiT under torch.compile (encoder and "
        f"discriminator eager); largest: the largest batch found by doubling from "
        f"{s['batch_size']} (up to {s['max_batch']}) whose steps fit, eager, {s['precisions'][0]}",
        "- skipped steps: timed steps that fp16's GradScaler skipped as non-finite (no AdamW or "
        "EMA update: faster than a real step)", "",
        "## Training step", "", *markdown_table(*training_table(report["training"]))]
    lines += ["", f"## Text-to-image: {s['mmdit_model']} (batch {s['batch_size']}, "
              f"{s['precisions'][0]}, eager, random CLIP caption features (B, 77, 768))", "",
              *markdown_table(*training_table(report["mmdit"])), "",
              "The CLIP ViT-L/14 text model (123M params, 13.3 GFLOPs per caption) is in no step: "
              "it runs once per caption in data preparation and once per prompt when sampling.",
              "", f"## Parts of a SARA step (batch {parts['batch']}, {parts['precision']}, eager)",
              ""]
    lines += (markdown_table(*parts_table(args, parts["rows"], parts["step_sec"])) + [
        "", f"Whole train_step, D update excluded: {parts['step_sec'] * 1e3:.1f} ms; the "
        "discriminator step runs once per 5 steps."] if parts["status"] == "ok"
        else [parts["status"]])
    lines += ["", f"## Sampler (sample.py's Euler-Maruyama SDE, {sampler['steps']} steps, batch "
              f"{sampler['batch']}, fp32 with TF32 matmuls as sample.py)", ""]
    lines += (markdown_table(*sampler_table(sampler["rows"])) if sampler["status"] == "ok"
              else [sampler["status"]])
    lines += ["", f"## fid.py Inception ({inception['images']} random 256 px images, batch "
              f"{inception['batch']}, random weights)", ""]
    lines += ([f"{inception['img_per_sec']:.1f} images/s"] if inception["status"] == "ok"
              else [inception["status"]])
    return "\n".join(lines) + "\n"


def write_report(args, report):
    """OUT_DIR/results.json and table.md, each written atomically."""
    add_ratios(report["training"], PAPER_X_NONE)
    add_ratios(report["mmdit"], {})  # SRA^2 Table 4 gives no MMDiT timing
    for name, text in (("results.json", json.dumps(report, indent=1) + "\n"),
                       ("table.md", markdown(args, report))):
        write_atomic(os.path.join(args.gpu, name), lambda f, text=text: f.write(text.encode()))


def section(result, field=None, **info):
    """A results.json section: info, then the result's fields (or the result as field), or the
    reason there is no result."""
    if isinstance(result, str):
        return {**info, "status": result}
    return {**info, "status": "ok", **(result if field is None else {field: result})}


def gpu_bench(args):
    """The prepared GPU benchmark (--gpu OUT_DIR); returns the report in results.json."""
    cluster.check_writable(args.gpu)  # before minutes of measuring
    use_device(args.device)
    torch.set_num_threads(args.threads)
    budget, flops_per_image, largest = Budget(args.budget), {}, {}
    presets, first = (args.presets or GPU_PRESETS).split(","), args.precisions[0]
    report = dict(
        environment=environment(args), elapsed_s=0.0, training=[], mmdit=[],
        settings=dict(model=args.model, resolution=args.resolution, batch_size=args.batch_size,
                      max_batch=args.max_batch, warmup=args.warmup, steps=args.steps,
                      budget_s=args.budget, peak_tflops=args.peak_tflops, encoder=args.encoder,
                      memory=memory_note(), random=random_parts(args), presets=presets,
                      precisions=args.precisions, compile_modes=args.compile_modes,
                      mmdit_model=args.mmdit_model),
        parts=dict(status="not run", batch=args.batch_size, precision=first),
        sampler=dict(status="not run", steps=args.sample_steps, batch=args.sample_batch),
        inception=dict(status="not run", images=args.fid_images, batch=args.fid_batch))
    print(f"bench.py --gpu {args.gpu}: {report['environment']}")

    def record(key, value):
        """Keep a job's result, say it, write both files."""
        if key in ("training", "mmdit"):
            report[key].append(value)
        else:
            report[key] = value
        report["elapsed_s"] = time.monotonic() - budget.start
        said = {k: v for k, v in value.items() if k not in ("rows", "step_secs")}
        print(f"[{report['elapsed_s']:4.0f} s] {key}: {said}", flush=True)
        write_report(args, report)

    def train_rows(compile, kind, precisions):
        for precision in precisions if compile in args.compile_modes else []:
            for preset in presets:
                batch = args.batch_size if kind == "paper" else largest[preset]
                record("training", training_row(budget, args, preset, precision, compile, kind,
                                                batch, flops_per_image))

    with tempfile.TemporaryDirectory() as folder:
        args.enc_weights = (save_random_encoders(args.encoder, args.resolution, folder)
                            if args.random_weights else None)
        train_rows(0, "paper", args.precisions)  # the papers' per-GPU batch, eager: the reference
        for preset in MMDIT_ALIGN:  # text-to-image (SRA^2 Table 4), after the SiT's eager rows
            record("mmdit", training_row(budget, args, preset, first, 0, "paper", args.batch_size,
                                         flops_per_image, model=args.mmdit_model))
        record("parts", section(budget.run("parts", measure_parts, args, precision=first),
                                batch=args.batch_size, precision=first))
        record("sampler", section(budget.run("sampler", measure_sampler, args), "rows",
                                  steps=args.sample_steps, batch=args.sample_batch))
        record("inception", section(budget.run("inception", inception_images_per_sec, args),
                                    "img_per_sec", images=args.fid_images, batch=args.fid_batch))
        train_rows(1, "paper", [first])  # does torch.compile help?
        for preset in presets:
            largest[preset] = budget.run("search", largest_batch, args, preset, first)
        train_rows(0, "largest", args.precisions)
        train_rows(1, "paper", args.precisions[1:])
        train_rows(1, "largest", args.precisions)
    print("\n" + markdown(args, report))
    return report


# ----------------------------------------------------------------------------------------------
# analysis.py's CKNNA: time per SiT block at REPA's scale (random features: the cost does not
# depend on them)


def cknna_table(args):
    """Seconds of analysis.py's CKNNA, --cknna-samples images x --cknna-blocks blocks vs one
    encoder; returns rows."""
    torch.set_num_threads(args.threads)
    n, blocks = args.cknna_samples, args.cknna_blocks
    use_device(args.device)
    print(
        f"bench.py: {device_name(args)}, torch {torch.__version__}; CKNNA (k={analysis.TOPK}) of "
        f"{blocks} blocks ({n} x {args.cknna_dim}) vs an encoder ({n} x {args.cknna_enc_dim}), fp32"
    )
    print("RANDOM: Gaussian features stand in for pooled SiT and encoder features (the cost is "
          "the same)")
    gen = torch.Generator(DEVICE).manual_seed(0)
    encoder = torch.randn(n, args.cknna_enc_dim, generator=gen, device=DEVICE)  # (N, D_enc)
    result = {}
    sec_enc, _ = timed(
        lambda: result.update(enc=analysis.neighbours(analysis.clamp_outliers(encoder)[0]))
    )
    prep, score = [], []
    for _ in range(blocks):  # one block's features at a time, as analysis.py holds them
        block = torch.randn(n, args.cknna_dim, generator=gen, device=DEVICE)  # (N, H)
        prep.append(timed(
            lambda: result.update(blk=analysis.neighbours(analysis.clamp_outliers(block)[0])))[0])
        score.append(timed(analysis.cknna_from_neighbours, result["blk"], result["enc"])[0])
    rows = [["neighbours (encoder, once)", f"{sec_enc:.3f}"],
            ["clamp + neighbours per block", f"{statistics.median(prep):.3f}"],
            ["score per block", f"{statistics.median(score):.4f}"],
            [f"all {blocks} blocks", f"{sec_enc + sum(prep) + sum(score):.1f}"]]
    print_table(["stage", "seconds"], rows)
    return rows


# fid.py (python bench.py --fid): FID from statistics beside torch-fidelity,
# and whole-evaluation time

# samples scored against ADM's 10k-image reference batch
FID_EVAL_SIZES, FID_REF_IMAGES = (10_000, 50_000), 10_000


def add_fid_args(p):
    a = p.add_argument
    a("--fid", action="store_true",
      help="time fid.py instead of training: FID from statistics and a whole evaluation")
    a("--fid-dim", type=int, default=fid.POOL_DIM,
      help="feature dimension of the FID statistics (pool3: 2048)")
    a("--fid-stats-rows", type=int, default=10_000,
      help="feature rows behind each set's statistics")
    a("--fid-repeats", type=int, default=3,
      help="timings per FID route, interleaved across routes; median shown")
    a("--fid-images", type=int, help="256 px images timed through Inception")
    a("--fid-batch", type=int, help="images per Inception forward (ADM: 64)")
    a("--fid-pr-rows", type=int, help="rows per set of the timed precision/recall; larger sets "
      "are extrapolated by pair count")


def fid_features(rows, dim, seed, shift):
    """(rows,dim) float64 nonnegative features with shared low-rank structure, like pool3
    (a realistic spectrum)."""
    gen = torch.Generator().manual_seed(seed)
    basis = (
        torch.randn(dim // 8, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        / 8
    )
    x = torch.randn(rows, dim // 8, generator=gen, dtype=torch.float64) @ basis + shift  # rows,dim
    return (x + 0.3 * torch.randn(rows, dim, generator=gen, dtype=torch.float64)).relu()


def fid_routes(args):
    """Name -> FID-from-statistics function of (samples, reference) stats: fid.py's routes,
    torch-fidelity's if any."""
    routes = {
        "fid.py eigh, reference factor cached": lambda s, r, factor: fid.fid_from_stats(
            *s, *r, factor2=factor
        ),
        "fid.py eigh (default)": lambda s, r, factor: fid.fid_from_stats(*s, *r),
        "fid.py sqrtm (ADM's exact route)": lambda s, r, factor: fid.fid_from_stats(
            *s, *r, route="sqrtm"
        ),
    }
    try:
        from torch_fidelity.metric_fid import fid_statistics_to_metric
        from torch_fidelity.version import __version__ as version
    except ImportError:
        print("torch-fidelity is not installed (pip install torch-fidelity): its row is skipped")
        return routes

    def fidelity(s, r, factor):
        """torch-fidelity's FID: the square roots of np.linalg.eigvals of the product."""
        stats = [dict(mu=mu, sigma=sigma) for mu, sigma in (s, r)]
        return fid_statistics_to_metric(*stats, False)["frechet_inception_distance"]

    return {**routes, f"torch-fidelity {version}": fidelity}


def time_fid_routes(args):
    """Median seconds and value of each FID route on the same realistic statistics, repeats
    interleaved."""
    stats = [
        (x.mean(0).numpy(), x.T.cov().numpy())
        for x in (
            fid_features(args.fid_stats_rows, args.fid_dim, s, shift)
            for s, shift in ((1, 0.35), (2, 0.3))
        )
    ]
    factor = fid.covariance_factor(stats[1][1])  # what a run computes once for its reference
    routes = fid_routes(args)
    times, values = {name: [] for name in routes}, {}
    # round-robin: a load spike on a shared machine hits every route alike
    for _ in range(args.fid_repeats):
        for name, route in routes.items():
            sec, _ = timed(lambda: values.__setitem__(name, route(*stats, factor)))
            times[name].append(sec)
    return {name: (statistics.median(times[name]), values[name]) for name in routes}


def inception_images_per_sec(args):
    """Images/s of fid.py's Inception (feature extraction, random weights) on --fid-images random
    256 px images in batches of --fid-batch."""
    model = fid.FIDInception().eval().requires_grad_(False).to(DEVICE)  # random init: same cost
    images = torch.randint(0, 256, (args.fid_images, 256, 256, 3), dtype=torch.uint8).numpy()
    batches = [images[i : i + args.fid_batch] for i in range(0, len(images), args.fid_batch)]
    fid.extract_features(model, batches[:1], DEVICE)  # warm-up: allocator, cuDNN autotuning
    return args.fid_images / timed(fid.extract_features, model, batches, DEVICE)[0]


def time_evaluation(args):
    """Inception images/s, precision/recall seconds at --fid-pr-rows per set, Inception Score
    seconds per image."""
    pool = [fid_features(args.fid_pr_rows, fid.POOL_DIM, s, 0.3).float().to(DEVICE) for s in (3, 4)]
    pr_sec, _ = timed(fid.precision_recall, *pool)
    probs = torch.softmax(
        torch.randn(FID_REF_IMAGES, fid.LOGITS_DIM, dtype=torch.float64), 1
    ).numpy()
    is_sec, _ = timed(fid.inception_score, probs)
    return dict(img_per_sec=inception_images_per_sec(args), pr_sec=pr_sec,
                is_per_image=is_sec / FID_REF_IMAGES)


def fid_bench(args):
    """Print the FID-from-statistics table and the whole-evaluation table; returns both tables'
    rows."""
    use_device(args.device)
    torch.set_num_threads(args.threads)
    print(
        f"bench.py --fid: {device_name(args)}, torch {torch.__version__}; load average at start: "
        f"{os.getloadavg()[0]:.1f}"
    )
    print("RANDOM: Inception weights (seeded; the same cost as the real ones), features and images")
    routes = time_fid_routes(args)
    ref_sec = next(
        (sec for route, (sec, _) in routes.items() if route.startswith("torch-fidelity")), None
    )
    adm = routes["fid.py sqrtm (ADM's exact route)"][1]
    stats_rows = [[route, f"{sec:.3f}", "-" if ref_sec is None else f"{ref_sec / sec:.2f}",
                   f"{value:.9g}", f"{abs(value - adm) / adm:.1e}"]
                  for route, (sec, value) in routes.items()]
    print(f"\nFID from statistics, {args.fid_dim}-d, {args.fid_stats_rows} rows per set, median of "
          f"{args.fid_repeats} interleaved runs (numpy/scipy on the CPU)")
    print_table(["route", "seconds", "x torch-fidelity", "FID", "rel. diff vs sqrtm"], stats_rows)

    cost = time_evaluation(args)
    fid_sec = routes["fid.py eigh (default)"][0]
    pr_pairs = 3 * args.fid_pr_rows**2  # ref-ref, sample-sample and ref-sample distances
    eval_rows = []
    for n in FID_EVAL_SIZES:
        # samples and the (then cached) reference
        inception = (n + FID_REF_IMAGES) / cost["img_per_sec"]
        pr = cost["pr_sec"] * (n * n + FID_REF_IMAGES**2 + n * FID_REF_IMAGES) / pr_pairs
        # sFID (2023-d) costs what FID (2048-d) does
        metrics = 2 * fid_sec + cost["is_per_image"] * n + pr
        eval_rows.append([f"{n} samples", f"{inception:.0f}", f"{pr:.1f}", f"{metrics - pr:.1f}",
                          f"{inception + metrics:.0f}"])
    print(
        f"\nwhole evaluation of 256 px samples against a {FID_REF_IMAGES}-image reference "
        "(Inception counts the reference too: the first evaluation computes its features, later "
        f"ones read the cache). EXTRAPOLATED from {args.fid_images} images at "
        f"{cost['img_per_sec']:.2f} img/s (batch {args.fid_batch}), precision/recall timed at "
        f"{args.fid_pr_rows} rows per set and scaled by pair count, sFID taken as FID's time"
    )
    print_table(["samples", "Inception s", "prec/recall s", "FID+sFID+IS s", "total s"], eval_rows)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    return stats_rows, eval_rows


if __name__ == "__main__":
    cli_args = parse_args()
    mode = gpu_bench if cli_args.gpu else cknna_table if cli_args.cknna_only else fid_bench if (
        cli_args.fid) else main
    with cluster.main_errors("bench.py"):
        mode(cli_args)
