"""Benchmark training and sampling cost: step time, peak memory and FLOPs per alignment preset vs
vanilla SiT.

    python bench.py                                        # GPU: SiT-XL/2, 256 px, batch 32
    (one GPU's share of 256)
    python bench.py --peak-tflops 989                      # H100 SXM bf16/fp16 dense peak, for
    the MFU column
    python bench.py --threads 1 --encoder dinov2-vit-b     # shared CPU: the real DINOv2-B
    architecture, random weights
    python bench.py --fid                                  # fid.py: FID from stats vs
    torch-fidelity, evaluation time

Each preset is one train.py train_step (build_run, the same flags as train.py) on random data;
each preset and the
sampler run in a fresh child process, so the peak memory is theirs alone. Step time is the median
over --steps
after --warmup steps, so SARA's discriminator update (one step in --disc-every) is left out of it
and of the FLOPs.
"""

import argparse
import functools
import gc
import multiprocessing
import os
import statistics
import tempfile
import time

import torch
from torch.utils import flop_counter

import analysis
import fid
import losses
import sample
import train
from encoders import FAMILIES, TINY_RANDOM, build_encoder, canonical_name

# Defaults by device: the paper's model on a GPU; on CPU a size whose whole bench takes a few
# minutes on 2 cores.
GPU = torch.cuda.is_available()
MODEL = "SiT-XL/2" if GPU else "SiT-S/2"
BATCH_SIZE = 32 if GPU else 2
ENCODER = "dinov2-vit-b" if GPU else TINY_RANDOM
# train.py's imagenet256 recipe on GPU; CPU autocast fp16 is not a real path
PRECISION = "fp16" if GPU else "fp32"
WARMUP, STEPS = (5, 20) if GPU else (1, 5)  # the FLOP-counted first step warms up too
SAMPLE_STEPS, SAMPLE_BATCH = (250, 64) if GPU else (10, 4)
PEAK_TFLOPS = 312.0  # A100 dense bf16/fp16; H100 SXM is 989
NUM_CLASSES = 1000  # ImageNet: the label table's size is part of the model
DEVICE = torch.device("cuda" if GPU else "cpu")

# torch counts CPU attention as 0 FLOPs (its CPU flash kernel has no formula): give it torch's own
# SDPA formulas.
aten = torch.ops.aten
flop_counter.flop_registry.setdefault(
    aten._scaled_dot_product_flash_attention_for_cpu, flop_counter.sdpa_flop
)
flop_counter.flop_registry.setdefault(aten._scaled_dot_product_flash_attention_for_cpu_backward,
                                      flop_counter.sdpa_backward_flop)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default (this machine's: they depend on the
    GPU)."""


def parse_args(argv=None):
    """Command line (argv=None reads sys.argv); defaults depend on whether a GPU is present."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--model", default=MODEL, help="SiT size, e.g. SiT-XL/2, SiT-B/2")
    a("--resolution", type=int, default=256, help="image resolution in pixels")
    a("--batch-size", type=int, default=BATCH_SIZE, help="images per training step")
    a(
        "--precision",
        choices=["fp16", "bf16", "fp32"],
        default=PRECISION,
        help="train.py --precision",
    )
    a(
        "--encoder", default=ENCODER,
        help="train.py --enc-type: dinov2-vit-b (-s, -l, -g; comma-separated), tiny-random",
    )
    a(
        "--random-weights",
        type=int,
        choices=[0, 1],
        default=int(not GPU),
        help="1: the encoder architectures with random weights (no download, the same cost); 0: "
             "the pretrained ones",
    )
    a(
        "--disc-pretrained",
        type=int,
        choices=[0, 1],
        default=0,
        help="1: SARA's discriminator with the ImageNet ResNet-18 trunk (download); 0: random "
             "trunk, the same cost",
    )
    a("--presets", default=",".join(losses.PRESETS), help="comma-separated alignment presets")
    a(
        "--threads", type=int, default=torch.get_num_threads(),
        help="CPU threads; on a shared machine use 1: OpenMP threads spin-wait whenever another "
             "job holds a core, "
        "so step times swing tenfold",
    )
    a("--warmup", type=int, default=WARMUP, help="untimed steps before the timed ones")
    a("--steps", type=int, default=STEPS, help="timed steps; the median is reported")
    a("--sample-steps", type=int, default=SAMPLE_STEPS, help="Euler-Maruyama steps of the sampler")
    a("--sample-batch", type=int, default=SAMPLE_BATCH, help="samples per sampler call")
    a(
        "--cfg", type=float, default=1.8,
        help="guidance scale of the CFG sampler row (guided at every step)",
    )
    a(
        "--encoder-costs",
        default="",
        help="also time each encoder's forward (REPA names, comma-separated, or 'all': DINOv2 "
             "B/L/g and every other "
        "family's largest) on "
        "--batch-size random images with random weights, beside the vanilla SiT step",
    )
    a(
        "--peak-tflops", type=float, default=PEAK_TFLOPS,
        help="the GPU's dense peak TFLOP/s at --precision, for MFU (A100 bf16/fp16: 312; H100 SXM: "
             "989)",
    )
    a(
        "--cknna-only", action="store_true",
        help="time only analysis.py's CKNNA (no training or sampler tables)",
    )
    a(
        "--cknna-samples", type=int, default=10000,
        help="CKNNA timing: images (rows of each feature matrix)",
    )
    a(
        "--cknna-blocks", type=int, default=28,
        help="CKNNA timing: SiT blocks compared with the encoder (XL: 28)",
    )
    a("--cknna-dim", type=int, default=1152, help="CKNNA timing: SiT hidden size (XL: 1152)")
    a("--cknna-enc-dim", type=int, default=768, help="CKNNA timing: encoder width (DINOv2-B: 768)")
    add_fid_args(p)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Measurements, each run in a fresh process


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
    """Restart the high-water mark from the current use (on CPU, Linux's VmHWM reset through
    clear_refs)."""
    gc.collect()
    if GPU:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory():
    """Bytes at the high-water mark since reset_peak_memory."""
    return torch.cuda.max_memory_allocated() if GPU else proc_status_bytes("VmHWM")


def setup(args, align):
    """Set this process up as train.main does (seed, TF32) with --threads; train.py's config of one
    preset."""
    flags = [
        "--preset", "imagenet256", "--align", align, "--model", args.model, "--resolution",
        str(args.resolution), "--batch-size", str(args.batch_size), "--precision", args.precision,
        "--enc-type", args.encoder, "--disc-pretrained", str(args.disc_pretrained),
    ]
    flags += ["--enc-weights", args.enc_weights] if args.enc_weights else []
    config = train.resolve_config(train.parse_args(flags))
    # as train.main
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(config["tf32"])
    torch.manual_seed(config["seed"])
    torch.set_num_threads(args.threads)
    return config


def measure_preset(args, align):
    """FLOPs of one step, median step time and peak memory of one alignment preset
    (in a fresh process)."""
    # before anything is built: the interpreter and torch's libraries are not counted
    base = memory_now()
    config = setup(args, align)
    run = train.build_run(config, NUM_CLASSES, DEVICE, world=1)
    run.model.train()
    b, r = config["batch_size"], config["resolution"]
    batch = [
        torch.randint(0, 256, (b, 3, r, r), dtype=torch.uint8, device=DEVICE),
        torch.randn(b, 8, r // 8, r // 8, device=DEVICE),
        torch.randint(0, NUM_CLASSES, (b,), device=DEVICE),
    ]
    step = functools.partial(
        train.train_step, run, config, losses.AlignConfig(**config["align_config"]), batch
    )  # step(index, rows)
    reset_peak_memory()  # after building: loading encoder weights peaks above what training holds
    with flop_counter.FlopCounterMode(display=False) as counter:
        step(1, slice(0, b))  # not a discriminator step, like the steps the median picks
    walls, cpus = zip(
        *[timed(step, i, slice(0, b)) for i in range(args.warmup + args.steps)][args.warmup :]
    )
    return dict(
        preset=align, sec=statistics.median(walls), cpu=statistics.median(cpus),
        mem=peak_memory() - base,
        flops=counter.get_total_flops(),
    )


def measure_sampler(args):
    """Samples/s of sample.py's sampler (Euler-Maruyama + guided_velocity) without and with CFG
    (fresh process)."""
    config = setup(args, "none")
    ema = train.build_run(config, NUM_CLASSES, DEVICE, world=1).ema
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


def measure_parts(args):
    """Median seconds and FLOPs of each part of a SARA step (one D update included), in a fresh
    process."""
    config = setup(args, "sara")
    run = train.build_run(config, NUM_CLASSES, DEVICE, world=1)
    run.model.train()
    align = losses.AlignConfig(**config["align_config"])
    b, r = config["batch_size"], config["resolution"]
    images = torch.randint(0, 256, (b, 3, r, r), dtype=torch.uint8, device=DEVICE)
    labels = torch.randint(0, NUM_CLASSES, (b,), device=DEVICE)
    latent_shape = (run.model.in_channels, r // 8, r // 8)
    noise = losses.draw_noise(b, latent_shape, align, config["class_dropout"], DEVICE, run.gen)
    x0 = torch.randn(b, *latent_shape, device=DEVICE)  # (B, 4, r/8, r/8)
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
            d_loss, _ = losses.discriminator_step_loss(run.disc, z_encs[0], h_dens[0])
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
    batch = [images, x0.repeat(1, 2, 1, 1), labels]  # (B, 8, r/8, r/8) moments: mean x0, std x0
    # step 1: no D update
    step = [timed(train.train_step, run, config, align, batch, 1, slice(0, b))[0]
            for _ in range(args.warmup + args.steps)]
    return rows, statistics.median(step[args.warmup:])


def print_parts(args, rows, step_sec):
    """The per-part table: ms, share of a whole train_step, GFLOP, TFLOP/s and (GPU) MFU."""
    print(
        f"\nparts of a SARA step (median of {args.steps}; the discriminator step runs once per "
        "--disc-every 5 "
        f"steps; whole train_step, D update excluded: {step_sec * 1e3:.1f} ms)"
    )
    header = ["part", "ms", "x step", "GFLOP", "TFLOP/s"] + (["MFU"] if GPU else [])
    table = [
        [
            r["part"], f"{r['sec'] * 1e3:.2f}", f"{r['sec'] / step_sec:.2f}",
            f"{r['flops'] * 1e-9:.3g}", f"{r['flops'] / r['sec'] / 1e12:.3g}",
        ]
        + ([f"{r['flops'] / r['sec'] / 1e12 / args.peak_tflops:.1%}"] if GPU else [])
        for r in rows
    ]
    print_table(header, table)
    return table


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


def isolated(fn, *args):
    """fn(*args) in a fresh child process, so its peak memory and allocator state are its own."""
    # CUDA does not survive fork. On CPU a fork server that imported bench (and torch) once forks
    # every child: a
    # plain fork of a process that has run OpenMP work (an earlier test, say) hangs in the child's
    # first parallel op.
    if GPU:
        context = multiprocessing.get_context("spawn")
    else:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["bench"])
    with context.Pool(1) as pool:
        return pool.apply(fn, args)


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
    images = torch.randint(
        0,
        256,
        (args.batch_size, 3, args.resolution, args.resolution),
        dtype=torch.uint8,
        device=DEVICE,
    )
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
    print(
        f"\nencoder forward (random weights, batch {args.batch_size}, {args.resolution} px; x "
        "step: against the "
        f"{step['preset']} SiT training step above)"
    )
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
    parts += (
        [f"encoder {TINY_RANDOM} (a 16x16 conv, far cheaper than a ViT)"]
        if len(dinov2) < len(names)
        else []
    )
    random_dinov2 = f"encoder weights ({', '.join(dinov2)}: real architecture, random init)"
    parts += [random_dinov2] if dinov2 and args.random_weights else []
    return parts + ([] if args.disc_pretrained else ["discriminator trunk (random ResNet-18)"])


def print_table(header, rows):
    """A plain right-aligned text table; the first column left-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        print(
            "  ".join(
                str(x).ljust(w) if i == 0 else str(x).rjust(w)
                for i, (x, w) in enumerate(zip(row, widths))
            )
        )


def main(args):
    """Measure every preset and the sampler, each in its own process, print the tables; returns
    header and rows."""
    name = torch.cuda.get_device_name() if GPU else f"CPU, {args.threads} of {os.cpu_count()} cores"
    print(
        f"bench.py: {name}, torch {torch.__version__}; {args.model} at {args.resolution} px, "
        f"batch {args.batch_size}, {args.precision}; median of {args.steps} steps after "
        f"{args.warmup} warmup"
    )
    print(f"encoder: {args.encoder}; RANDOM: {'; '.join(random_parts(args))}")
    print(
        f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other jobs "
        "slow every row; "
        "read the ratios)"
    )
    memory = (
        "torch.cuda.max_memory_allocated"
        if GPU
        else "peak resident set (VmHWM) minus the RSS before building, first-use library pages "
             "included"
    )
    with tempfile.TemporaryDirectory() as folder:
        args.enc_weights = (isolated(save_random_encoders, args.encoder, args.resolution, folder)
                            if args.random_weights else None)
        results = [isolated(measure_preset, args, p) for p in args.presets.split(",")]
        sampler = isolated(measure_sampler, args)
        parts = isolated(measure_parts, args)
    ref = next((r for r in results if r["preset"] == "none"), results[0])
    # (column, result key, unit scale, format), each followed by its ratio to none; CPU time only
    # means something
    # on CPU, where it is what a step costs even while other jobs keep it waiting for a core
    columns = (
        [("ms/step", "sec", 1e3, ".1f")]
        + ([] if GPU else [("cpu ms/step", "cpu", 1e3, ".1f")])
        + [("peak MiB", "mem", 2**-20, ".0f"), ("GFLOP/step", "flops", 1e-9, ".3g")]
    )
    header = (
        ["preset"]
        + [h for c in columns for h in (c[0], "x none")]
        + ["TFLOP/s"]
        + (["MFU"] if GPU else [])
    )
    rows = []
    for r in results:
        tflops = r["flops"] / r["sec"] / 1e12
        rows.append(
            [r["preset"]]
            + [
                cell
                for _, key, scale, fmt in columns
                for cell in (format(r[key] * scale, fmt), f"{r[key] / ref[key]:.2f}")
            ]
            + [f"{tflops:.3g}"]
            + ([f"{tflops / args.peak_tflops:.1%}"] if GPU else [])
        )
    note = (
        f"MFU against {args.peak_tflops:g} TFLOP/s"
        if GPU
        else "cpu ms: the process's CPU time, all threads"
    )
    print(
        f"\ntraining step (peak memory: {memory}; FLOPs: FlopCounterMode over one forward + "
        "backward, encoders "
        f"included; {note})"
    )
    print_table(header, rows)
    print(
        f"\nsampler: sample.py's Euler-Maruyama SDE, {args.sample_steps} steps, batch "
        f"{args.sample_batch}, EMA model"
    )
    print_table(
        ["guidance", "samples/s", "x no CFG"],
        [
            [
                f"cfg {s['cfg']:g}" + (" (2x batch)" if s["cfg"] > 1 else ""),
                f"{s['samples_per_sec']:.3f}",
                f"{s['samples_per_sec'] / sampler[0]['samples_per_sec']:.2f}",
            ]
            for s in sampler
        ],
    )
    if args.encoder_costs:
        print_encoder_costs(args, ref)
    print_parts(args, *parts)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    return header, rows, sampler


# ----------------------------------------------------------------------------------------------
# analysis.py's CKNNA: time per SiT block at REPA's scale (random features: the cost does not depend
# on them)


def cknna_table(args):
    """Seconds of analysis.py's CKNNA, --cknna-samples images x --cknna-blocks blocks vs one
    encoder; returns rows."""
    torch.set_num_threads(args.threads)
    n, blocks = args.cknna_samples, args.cknna_blocks
    name = torch.cuda.get_device_name() if GPU else f"CPU, {args.threads} of {os.cpu_count()} cores"
    print(
        f"bench.py: {name}, torch {torch.__version__}; CKNNA (k={analysis.TOPK}) of {blocks} "
        "blocks "
        f"({n} x {args.cknna_dim}) vs an encoder ({n} x {args.cknna_enc_dim}), fp32"
    )
    print(
        "RANDOM: Gaussian features stand in for pooled SiT and encoder features (the cost is the "
        "same)"
    )
    gen = torch.Generator(DEVICE).manual_seed(0)
    encoder = torch.randn(n, args.cknna_enc_dim, generator=gen, device=DEVICE)  # (N, D_enc)
    result = {}
    sec_enc, _ = timed(
        lambda: result.update(enc=analysis.neighbours(analysis.clamp_outliers(encoder)[0]))
    )
    prep, score = [], []
    for _ in range(blocks):  # one block's features at a time, as analysis.py holds them
        block = torch.randn(n, args.cknna_dim, generator=gen, device=DEVICE)  # (N, H)
        prep.append(
            timed(
                lambda: result.update(blk=analysis.neighbours(analysis.clamp_outliers(block)[0]))
            )[0]
        )
        score.append(timed(analysis.cknna_from_neighbours, result["blk"], result["enc"])[0])
    rows = [["neighbours (encoder, once)", f"{sec_enc:.3f}"],
            ["clamp + neighbours per block", f"{statistics.median(prep):.3f}"],
            ["score per block", f"{statistics.median(score):.4f}"],
            [f"all {blocks} blocks", f"{sec_enc + sum(prep) + sum(score):.1f}"]]
    print_table(["stage", "seconds"], rows)
    return rows


# fid.py (python bench.py --fid): FID from statistics beside torch-fidelity, and whole-evaluation
# time

# samples scored against ADM's 10k-image reference batch
FID_EVAL_SIZES, FID_REF_IMAGES = (10_000, 50_000), 10_000


def add_fid_args(p):
    a = p.add_argument
    a(
        "--fid", action="store_true",
        help="time fid.py instead of training: FID from statistics and a whole evaluation",
    )
    a(
        "--fid-dim", type=int, default=fid.POOL_DIM,
        help="feature dimension of the FID statistics (pool3: 2048)",
    )
    a(
        "--fid-stats-rows", type=int, default=10_000,
        help="feature rows behind each set's statistics",
    )
    a(
        "--fid-repeats", type=int, default=3,
        help="timings per FID route, interleaved across routes; median shown",
    )
    a(
        "--fid-images",
        type=int,
        default=1024 if GPU else 16,
        help="256 px images timed through Inception",
    )
    a(
        "--fid-batch",
        type=int,
        default=64 if GPU else 8,
        help="images per Inception forward (ADM: 64)",
    )
    a("--fid-pr-rows", type=int, default=10_000 if GPU else 2048,
      help="rows per set of the timed precision/recall; larger sets are extrapolated by pair count")


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


def time_evaluation(args):
    """Inception images/s, precision/recall seconds at --fid-pr-rows per set, Inception Score
    seconds per image."""
    model = fid.FIDInception().eval().requires_grad_(False).to(DEVICE)  # random init: same cost
    images = torch.randint(0, 256, (args.fid_images, 256, 256, 3), dtype=torch.uint8).numpy()
    batches = [images[i : i + args.fid_batch] for i in range(0, len(images), args.fid_batch)]
    fid.extract_features(model, batches[:1], DEVICE)  # warm-up: allocator, cuDNN autotuning
    inception_sec, _ = timed(fid.extract_features, model, batches, DEVICE)
    pool = [fid_features(args.fid_pr_rows, fid.POOL_DIM, s, 0.3).float().to(DEVICE) for s in (3, 4)]
    pr_sec, _ = timed(fid.precision_recall, *pool)
    probs = torch.softmax(
        torch.randn(FID_REF_IMAGES, fid.LOGITS_DIM, dtype=torch.float64), 1
    ).numpy()
    is_sec, _ = timed(fid.inception_score, probs)
    return dict(
        img_per_sec=args.fid_images / inception_sec,
        pr_sec=pr_sec,
        is_per_image=is_sec / FID_REF_IMAGES,
    )


def fid_bench(args):
    """Print the FID-from-statistics table and the whole-evaluation table; returns both tables'
    rows."""
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if GPU else f"CPU, {args.threads} of {os.cpu_count()} cores"
    print(
        f"bench.py --fid: {name}, torch {torch.__version__}; load average at start: "
        f"{os.getloadavg()[0]:.1f}"
    )
    print("RANDOM: Inception weights (seeded; the same cost as the real ones), features and images")
    routes = time_fid_routes(args)
    ref_sec = next(
        (sec for route, (sec, _) in routes.items() if route.startswith("torch-fidelity")), None
    )
    adm = routes["fid.py sqrtm (ADM's exact route)"][1]
    stats_rows = [
        [
            route,
            f"{sec:.3f}",
            "-" if ref_sec is None else f"{ref_sec / sec:.2f}",
            f"{value:.9g}",
            f"{abs(value - adm) / adm:.1e}",
        ]
        for route, (sec, value) in routes.items()
    ]
    print(
        f"\nFID from statistics, {args.fid_dim}-d, {args.fid_stats_rows} rows per set, median of "
        f"{args.fid_repeats} "
        "interleaved runs (numpy/scipy on the CPU)"
    )
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
        "(Inception counts the"
        " reference too: the first evaluation computes its features, later ones read the cache). "
        "EXTRAPOLATED from"
        f" {args.fid_images} images at {cost['img_per_sec']:.2f} img/s (batch {args.fid_batch}), "
        "precision/recall"
        f" timed at {args.fid_pr_rows} rows per set and scaled by pair count, sFID taken as FID's "
        "time"
    )
    print_table(["samples", "Inception s", "prec/recall s", "FID+sFID+IS s", "total s"], eval_rows)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    return stats_rows, eval_rows


if __name__ == "__main__":
    cli_args = parse_args()
    (cknna_table if cli_args.cknna_only else fid_bench if cli_args.fid else main)(cli_args)
