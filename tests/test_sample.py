"""sample.py: REPA sampler parity, per-sample seeding, grid / npz outputs, resume, checkpoint
loading."""

import argparse
import datetime
import errno
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cluster
import runs
import sample
from cluster import UserError
from helpers import cli_error, disk_fills, disk_free, interrupted
from model import SiT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_PATH = os.path.join(REPO, "tests", "data", "repa_sampler_reference.pt")
REF = torch.load(REF_PATH, weights_only=True)
TINY = dict(
    input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
    encoder_depth=1,
    z_dims=[8],
    projector_dim=8,
)


def reference_model():
    """The tiny SiT whose REPA sampler outputs the fixture holds (built by
    tests/data/make_repa_reference.py)."""
    model = SiT(**REF["config"])
    model.load_state_dict(REF["state_dict"])
    return model.eval()


def perturbed(model, seed):
    """model with every weight (zero-initialised ones too) moved by seeded noise, so outputs are
    non-trivial."""
    g = torch.Generator().manual_seed(seed)
    model.load_state_dict(
        {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    )
    return model.eval()


def save_project_ckpt(path, config=TINY):
    """A train.py-style checkpoint with different raw and EMA weights; returns (raw, ema) models."""
    raw, ema = perturbed(SiT(**config), 1), perturbed(SiT(**config), 2)
    torch.save(dict(model=raw.state_dict(), ema=ema.state_dict(),
                    config=dict(model_config=raw.config), step=5), path)
    return raw, ema


def outputs(model):
    """A fixed probe of a model's velocity output."""
    g = torch.Generator().manual_seed(3)
    c, s = model.config["in_channels"], model.config["input_size"]
    x, t, y = torch.randn(2, c, s, s, generator=g), torch.tensor([0.3, 0.8]), torch.tensor([1, 2])
    with torch.no_grad():
        return model(x, t, y, align=False).v


def run(argv):
    """sample.py's main on a command line."""
    sample.main(sample.parse_args(argv))


@pytest.fixture
def ckpt(tmp_path):
    """Path of a tiny train.py-style checkpoint."""
    path = str(tmp_path / "tiny.pt")
    save_project_ckpt(path)
    return path


# ----------------------------------------------------------------------------------------------
# Samplers against REPA's samplers.py


def case_id(c):
    return f"{c['sampler']}{'-heun' * c['heun']}-cfg{c['cfg']}-{c['path_type']}"


@pytest.mark.parametrize("case", REF["cases"], ids=case_id)
def test_samplers_match_repa(case):
    """SDE (linear and cosine paths), Euler and Heun, CFG and guidance interval included, equal
    REPA's samplers."""
    model = reference_model()
    velocity = sample.guided_velocity(
        model, case["y"], case["cfg"], case["guidance_low"], case["guidance_high"]
    )
    # REPA drew x and y from the global RNG, then the SDE noise
    torch.manual_seed(case["global_seed"])
    torch.randn(case["x"].shape), torch.randint(0, 10, case["y"].shape)
    if case["sampler"] == "sde":
        out = sample.euler_maruyama(
            velocity, case["x"], case["num_steps"], path_type=case["path_type"]
        )  # global RNG
    else:
        out = sample.euler_ode(velocity, case["x"], case["num_steps"], heun=case["heun"])
    assert out.dtype == torch.float64 and case["out"].abs().max() > 1
    torch.testing.assert_close(out, case["out"], rtol=1e-5, atol=1e-5)


def test_guidance_interval_evaluations():
    """Outside the interval one conditional forward of B; inside one forward of 2B
    (cond, then null labels)."""
    calls = []

    class Recorder(torch.nn.Module):
        """A stand-in SiT that records (batch, t, labels) of every call."""

        def null_condition(self, y):
            return torch.full_like(y, 10)

        def forward(self, x, t, y, align):
            """Record the call; velocity 0."""
            calls.append((len(x), round(t[0].item(), 4), y.tolist()))
            return (torch.zeros_like(x),)

    velocity = sample.guided_velocity(
        Recorder(), torch.tensor([3, 4]), cfg=2.0, guidance_low=0.3, guidance_high=0.7
    )
    sample.euler_ode(velocity, torch.zeros(2, 4, 8, 8), num_steps=8, heun=True)
    sizes = [(t, b) for b, t, _ in calls]
    # Steps starting at t in [0.3, 0.7] are guided, Heun's second call (at t_next) included,
    # as REPA does.
    expected = [
        (1.0, 2),
        (0.875, 2),
        (0.875, 2),
        (0.75, 2),
        (0.75, 2),
        (0.625, 2),
        (0.625, 4),
        (0.5, 4),
        (0.5, 4),
        (0.375, 4),
        (0.375, 4),
        (0.25, 4),
        (0.25, 2),
        (0.125, 2),
        (0.125, 2),
    ]
    assert sizes == expected
    assert calls[6][2] == [3, 4, 10, 10]  # conditional half first, then the null class


def test_per_sample_noise_matches_repa_and_ignores_batching():
    """Sample i = REPA's SDE run alone with the global RNG seeded by sample_seed(seed, i), in any
    batch order."""
    ref = REF["per_index"]
    assert [sample.sample_seed(ref["seed"], i) for i in ref["indices"]] == ref["seeds"]
    model = reference_model()
    opts = dict(num_steps=ref["num_steps"], cfg=ref["cfg"], guidance_high=ref["guidance_high"])
    # REPA ran batches of 1
    out = sample.sample_latents(model, ref["indices"], seed=ref["seed"], **opts)
    torch.testing.assert_close(out, ref["out"], rtol=1e-5, atol=1e-5)
    shuffled = sample.sample_latents(model, [2, 0], seed=ref["seed"], **opts)
    torch.testing.assert_close(shuffled, ref["out"][[2, 0]], rtol=1e-5, atol=1e-5)
    assert (
        sample.sample_latents(model, [0], seed=ref["seed"] + 1, **opts) - ref["out"][:1]
    ).abs().max() > 0.1


def test_class_labels_replace_labels_and_keep_the_noise(monkeypatch):
    """--class-labels are used in turn by global index; the noise stays that of the random-label
    run."""
    model = reference_model()
    # labels now have no effect on the velocity
    model.y_embedder.embedding_table.weight.data.zero_()
    seen = []
    original = sample.guided_velocity
    monkeypatch.setattr(
        sample, "guided_velocity", lambda m, y, *a: seen.append(y.tolist()) or original(m, y, *a)
    )
    torch.testing.assert_close(
        sample.sample_latents(model, [0, 1, 2], num_steps=3),
        sample.sample_latents(model, [0, 1, 2], num_steps=3, class_labels=[7, 2]),
    )
    assert seen[1] == [7, 2, 7] and seen[0] != seen[1]


# ----------------------------------------------------------------------------------------------
# Outputs


@pytest.mark.slow
def test_grid_is_deterministic_and_holds_the_first_samples(ckpt, tmp_path):
    """The grid is written, the same seed gives the same PNG, and its tiles are samples 0..n-1 of an
    npz run."""
    common = [
        "--ckpt", ckpt, "--num-steps", "3", "--vae", "tiny-random", "--batch-size", "3", "--cfg",
        "1.5",
    ]
    for name in ("a", "b"):
        run(common + ["--grid-size", "4", "--out", str(tmp_path / f"{name}.png")])
    grid = np.asarray(Image.open(tmp_path / "a.png"))
    # 2 x 2 tiles of 64 px (tiny VAE: 8x upsampling)
    assert grid.shape == (128, 128, 3) and grid.std() > 1
    np.testing.assert_array_equal(grid, np.asarray(Image.open(tmp_path / "b.png")))
    run(common + ["--num-samples", "4", "--out", str(tmp_path / "s.npz")])
    samples = np.load(tmp_path / "s.npz")["arr_0"]
    np.testing.assert_array_equal(grid, sample.tile(samples))
    run(common + ["--grid-size", "4", "--seed", "1", "--out", str(tmp_path / "c.png")])
    assert np.abs(np.asarray(Image.open(tmp_path / "c.png")).astype(int) - grid).mean() > 1


def test_latent_output_without_vae(ckpt, tmp_path):
    """--vae none saves latents in [-4, 4] as 4-channel uint8 (h, w, 4): REPA's truncation by
    default, or rounded."""
    model = runs.load_model(ckpt)
    assert (
        sample.parse_args(["--ckpt", ckpt, "--num-steps", "3", "--vae", "none"]).quantize == "floor"
    )
    latents = sample.sample_latents(model, [0, 1], num_steps=3).float()
    images = sample.generate_images(model, None, [0, 1], num_steps=3)
    assert images.shape == (2, 8, 8, 4) and images.dtype == np.uint8
    repa = (255 * ((latents / 4 + 1) / 2)).clamp(0, 255).floor()  # REPA's generate.py, op for op
    np.testing.assert_array_equal(images, repa.permute(0, 2, 3, 1).numpy())
    rounded = (latents / 4 * 127.5 + 128).clamp(0, 255).floor()  # DiT's sample.py
    np.testing.assert_array_equal(
        sample.generate_images(model, None, [0, 1], num_steps=3, quantize="round"),
        rounded.permute(0, 2, 3, 1).numpy(),
    )
    assert (rounded != repa).float().mean() > 0.2


def test_resume_skips_written_samples(ckpt, tmp_path, monkeypatch):
    """A second run generates only the missing samples; the npz equals one uninterrupted run."""
    common = [
        "--ckpt", ckpt, "--num-steps", "3", "--vae", "none", "--batch-size", "2", "--mode", "ode",
    ]
    run(common + ["--num-samples", "3", "--out", str(tmp_path / "r.npz")])
    os.remove(tmp_path / "r" / "000001.png")  # as if the run had died before writing it
    done = []
    original = sample.generate_images
    monkeypatch.setattr(
        sample,
        "generate_images",
        lambda m, v, idx, **kw: done.extend(idx) or original(m, v, idx, **kw),
    )
    run(common + ["--num-samples", "5", "--out", str(tmp_path / "r.npz")])
    assert sorted(done) == [1, 3, 4]
    run(common + ["--num-samples", "5", "--batch-size", "5", "--out", str(tmp_path / "fresh.npz")])
    resumed, fresh = np.load(tmp_path / "r.npz")["arr_0"], np.load(tmp_path / "fresh.npz")["arr_0"]
    assert resumed.shape == (5, 8, 8, 4)
    # batch 2 vs 5: fp32 noise may flip a rounding
    np.testing.assert_allclose(resumed, fresh, atol=1)
    with pytest.raises(SystemExit, match="other settings.*cfg"):
        run(common + ["--num-samples", "5", "--cfg", "2", "--out", str(tmp_path / "r.npz")])


@pytest.mark.slow
def test_two_processes_write_the_same_npz_as_one(ckpt, tmp_path):
    """torchrun with 2 gloo processes writes the same samples.npz as a single process."""
    common = [
        "--ckpt", ckpt, "--num-steps", "4", "--vae", "none", "--batch-size", "1", "--num-samples",
        "5", "--cfg", "1.5", "--device", "cpu",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(REPO, "sample.py"), *common, "--out", str(tmp_path / "two.npz"),
        ],
        check=True, env=env, cwd=tmp_path, capture_output=True,
    )
    run(common + ["--out", str(tmp_path / "one.npz")])
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert (
        list(two.keys()) == ["arr_0"]
        and two["arr_0"].shape == (5, 8, 8, 4)
        and two["arr_0"].std() > 1
    )
    np.testing.assert_array_equal(two["arr_0"], one["arr_0"])  # batch 1 everywhere: bit-identical


# ----------------------------------------------------------------------------------------------
# Checkpoints


def test_project_checkpoint_ema_and_raw_weights(ckpt):
    """EMA weights by default, --weights model for the raw ones; config rebuilt from the checkpoint.
    """
    raw, ema = save_project_ckpt(ckpt)
    loaded = runs.load_model(ckpt)
    assert loaded.config == ema.config and not loaded.training
    torch.testing.assert_close(outputs(loaded), outputs(ema), rtol=0, atol=0)
    torch.testing.assert_close(
        outputs(runs.load_model(ckpt, "model")), outputs(raw), rtol=0, atol=0
    )


def test_repa_checkpoint_loads(tmp_path):
    """REPA's {model, ema, opt, args, steps} with an argparse.Namespace: heads from args.model,
    depths from args."""
    # 16 heads: SiT-XL's
    config = dict(TINY, num_heads=16, encoder_depth=2, z_dims=[8, 6], projector_dim=12)
    raw, ema = perturbed(SiT(**config), 4), perturbed(SiT(**config), 5)
    opt = torch.optim.AdamW(raw.parameters())
    args = argparse.Namespace(
        model="SiT-XL/2",
        num_classes=10, encoder_depth=2, qk_norm=False, path_type="linear", cfg_prob=0.1,
        enc_type="dinov2-vit-b",
    )
    path = tmp_path / "repa.pt"
    torch.save(dict(model=raw.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), args=args,
                    steps=400000), path)
    loaded = runs.load_model(str(path))
    assert loaded.config == ema.config
    torch.testing.assert_close(outputs(loaded), outputs(ema), rtol=0, atol=0)
    torch.testing.assert_close(
        outputs(runs.load_model(str(path), "model")), outputs(raw), rtol=0, atol=0
    )


def test_sra_checkpoint_samples_without_its_training_head(tmp_path):
    """SRA's released checkpoints: REPA's layout, no projectors, its student head ap_head.* (only
    training uses it): the SiT samples as its EMA weights say."""
    # what a state dict without projectors reads as: REPA's tap 8, capped at the depth (2)
    config = dict(TINY, num_heads=16, z_dims=[], projector_dim=2048, encoder_depth=2)
    ema = perturbed(SiT(**config), 6)
    head = {"ap_head.linear1.weight": torch.randn(64, 32), "ap_head.linear1.bias": torch.zeros(64),
            "ap_head.linear2.weight": torch.randn(32, 64), "ap_head.linear2.bias": torch.zeros(32)}
    args = argparse.Namespace(model="SiT-XL/2", num_classes=10, qk_norm=False, path_type="linear",
                              block_out_s=8, block_out_t=20, t_max=0.2)
    path = tmp_path / "sra.pt"
    state = {**ema.state_dict(), **head}
    torch.save(dict(model=state, ema=state, args=args, steps=4_000_000, epoch=800), path)
    loaded = runs.load_model(str(path))
    assert loaded.config == ema.config and not hasattr(loaded, "self_head")
    torch.testing.assert_close(outputs(loaded), outputs(ema), rtol=0, atol=0)


@pytest.mark.parametrize("source", ["train.py", "REPA"])
def test_checkpoint_path_type_reaches_the_sampler(tmp_path, source):
    """A cosine run's checkpoint (train.py model_config, or REPA's args.path_type) is sampled on the
    cosine path."""
    net = perturbed(SiT(**dict(TINY, path_type="cosine")), 8)
    path = str(tmp_path / "cos.pt")
    if source == "train.py":
        torch.save(dict(model=net.state_dict(), ema=net.state_dict(),
                        config=dict(model_config=net.config)), path)
    else:
        args = argparse.Namespace(
            model="SiT-XL/2", num_classes=10, encoder_depth=1, path_type="cosine"
        )
        torch.save(dict(model=net.state_dict(), ema=net.state_dict(), args=args), path)
    model = runs.load_model(path)
    assert model.config["path_type"] == "cosine"
    out = sample.sample_latents(model, [0, 1], num_steps=4, seed=3)
    gens = [torch.Generator().manual_seed(sample.sample_seed(3, i)) for i in (0, 1)]
    x = torch.cat([torch.randn(1, 4, 8, 8, generator=g) for g in gens])
    y = torch.cat([torch.randint(0, 10, (1,), generator=g) for g in gens])

    def noise(like):
        """Each sample's SDE noise from its own generator, as sample_latents draws it."""
        return torch.cat([torch.randn(like[:1].shape, generator=g, dtype=like.dtype) for g in gens])

    velocity = sample.guided_velocity(model, y)
    torch.testing.assert_close(
        out, sample.euler_maruyama(velocity, x, 4, noise, path_type="cosine"), rtol=0, atol=0
    )
    for g, i in zip(gens, (0, 1)):
        g.manual_seed(sample.sample_seed(3, i))
    x = torch.cat([torch.randn(1, 4, 8, 8, generator=g) for g in gens])
    [torch.randint(0, 10, (1,), generator=g) for g in gens]
    # the linear path differs
    assert (sample.euler_maruyama(velocity, x, 4, noise) - out).abs().max() > 0.1


def test_bare_repa_state_dict_loads(tmp_path):
    """A bare state dict (REPA's released last.pt) loads: sizes inferred, 64-dim heads, encoder
    depth 8 capped."""
    config = dict(TINY, hidden_size=64, num_heads=1, depth=3, encoder_depth=3, z_dims=[8])
    net = perturbed(SiT(**config), 6)
    torch.save(net.state_dict(), tmp_path / "last.pt")
    loaded = runs.load_model(str(tmp_path / "last.pt"))
    assert loaded.config == net.config
    torch.testing.assert_close(outputs(loaded), outputs(net), rtol=0, atol=0)


def corrupt(kind, path):
    """Write a broken checkpoint of the given kind at path."""
    net = SiT(**TINY)
    good = dict(
        model=net.state_dict(), ema=net.state_dict(), config=dict(model_config=net.config), step=1
    )
    if kind == "truncated":
        torch.save(good, path)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif kind == "foreign":
        torch.save(dict(good, ema={**good["ema"], "head.weight": torch.zeros(3)}), path)
    elif kind == "shape":
        torch.save(dict(good, ema={**good["ema"], "pos_embed": torch.zeros(1, 16, 48)}), path)
    elif kind == "no-ema":
        torch.save(dict(model=good["model"], step=1), path)
    elif kind == "pickled":
        # weights_only allows only Namespace here
        torch.save(dict(good, args=datetime.date(2024, 1, 1)), path)
    elif kind == "not-sit":
        torch.save({"encoder.weight": torch.zeros(2, 2)}, path)


@pytest.mark.parametrize("kind, message", [
    ("truncated", "is not a readable checkpoint .RuntimeError: PytorchStreamReader"),
    ("foreign", "does not fit the model: unexpected key 'head.weight'"),
    ("shape", r"'pos_embed' has shape \(1, 16, 48\), the model wants \(1, 16, 32\)"),
    ("no-ema", "no 'ema' state dict in the checkpoint"),
    ("pickled", r"is not a checkpoint of tensors \(it pickles datetime.date, which"),
    ("not-sit", "not a SiT or MMDiT state dict"),
    ("missing", "no such checkpoint file"),
])
def test_bad_checkpoints_give_one_line_errors(tmp_path, kind, message):
    """Each broken checkpoint exits with a one-line message that names the problem."""
    path = str(tmp_path / "bad.pt")
    corrupt(kind, path)
    with pytest.raises(UserError, match=message) as e:
        runs.load_model(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(path)


def test_bad_options_exit_with_a_message(ckpt, tmp_path, capsys):
    """Bad command lines stop with a clear message before any sampling."""
    assert "--out x.png: must end in .npz with --num-samples" in cli_error(
        capsys, sample.parse_args, "--num-samples", "4", "--out", "x.png")
    with pytest.raises(SystemExit, match=r"--class-labels \[99\]: the model has classes 0..9"):
        run(["--ckpt", ckpt, "--vae", "none", "--out", str(tmp_path / "g.png"),
             "--class-labels", "3,99"])


def never_sample(monkeypatch):
    """generate_images that fails the test: an output fault must stop sample.py before it."""
    monkeypatch.setattr(sample, "generate_images", lambda *a, **k: pytest.fail("sampled"))


def test_unwritable_out_is_one_line_before_any_sampling(ckpt, tmp_path, monkeypatch):
    never_sample(monkeypatch)
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.npz").mkdir()
    common = ["--ckpt", ckpt, "--vae", "none"]
    for out, flags, message in [
        (tmp_path / "file" / "g.png", [], f"^sample.py: error: {tmp_path / 'file'} is not a fo"),
        (tmp_path / "dir.npz", ["--num-samples", "2"], f"--out {tmp_path / 'dir.npz'} is a folder"),
    ]:
        with pytest.raises(SystemExit, match=message):
            run(common + flags + ["--out", str(out)])

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cluster.tempfile, "mkstemp", read_only)
    with pytest.raises(SystemExit, match=f"{tmp_path / 'ro'} is on a read-only file system"):
        run(common + ["--num-samples", "2", "--out", str(tmp_path / "ro" / "s.npz")])


def test_full_disk_is_one_line_naming_folder_free_and_needed(ckpt, tmp_path, monkeypatch):
    """Too little room for the npz: refused before sampling; a disk that fills while the PNGs are
    written: one line, the PNGs so far kept."""
    disk_free(monkeypatch, 999)
    out = tmp_path / "s.npz"
    common = ["--ckpt", ckpt, "--vae", "none", "--num-steps", "2", "--batch-size", "2"]
    with pytest.raises(SystemExit) as e:
        run(common + ["--num-samples", "4", "--out", str(out)])
    # 4 samples of (8, 8, 4) uint8, twice (the .npy and its zip)
    assert str(e.value) == (f"sample.py: error: not enough space in {tmp_path / 's'} for the npz "
                            "of 4 samples: 999 B free, 2.0 kB needed; free space there or write "
                            "to another folder, then run the same command again")
    disk_free(monkeypatch, 10**9)
    # settings.json and two PNGs fit
    disk_fills(monkeypatch, sample, lambda path: len(os.listdir(tmp_path / "s")) > 2)
    with pytest.raises(SystemExit, match=f"^sample.py: error: the disk holding {tmp_path / 's'} "
                                         "is full"):
        run(common + ["--num-samples", "4", "--out", str(out)])
    assert sorted(os.listdir(tmp_path / "s")) == ["000000.png", "000001.png", "settings.json"]


def test_ctrl_c_keeps_the_samples_and_a_rerun_makes_the_rest(ckpt, tmp_path, monkeypatch):
    out, marker = tmp_path / "s.npz", tmp_path / "working"
    common = ["--ckpt", ckpt, "--vae", "none", "--num-steps", "2", "--batch-size", "2",
              "--num-samples", "6", "--out", str(out)]
    code = (
        "import time, sample\n"
        "real = sample.generate_images\n"
        "def stall(model, vae, indices, **kw):\n"
        "    if indices[0] >= 4:\n"
        f"        open({str(marker)!r}, 'w').close()\n"
        "        time.sleep(60)\n"
        "    return real(model, vae, indices, **kw)\n"
        "sample.generate_images = stall\n"
        f"sample.main(sample.parse_args({common!r}))\n"
    )
    status, err = interrupted(code, marker)
    assert status == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"sample.py: interrupted: 4 of 6 samples are in {tmp_path / 's'}; run the same command "
        "again to make the rest")
    done = []
    real = sample.generate_images
    monkeypatch.setattr(sample, "generate_images",
                        lambda m, v, idx, **kw: done.extend(idx) or real(m, v, idx, **kw))
    run(common)
    assert done == [4, 5] and np.load(out)["arr_0"].shape == (6, 8, 8, 4)


# Out-of-range values of every numeric flag, and one good value each.
NUMERIC = {
    "--num-steps": (["0", "-2"], "1"),
    "--cfg": (["0.99", "nan", "inf", "-1"], "1.35"),
    "--guidance-low": (["-0.1", "1.1", "nan"], "0.3"),
    "--guidance-high": (["-0.5", "2", "nan"], "0.7"),
    "--seed": (["-1"], "5"),
    "--num-samples": (["0", "-5"], "8"),
    "--grid-size": (["0"], "4"),
    "--batch-size": (["0"], "2"),
    "--class-labels": (["-1,3"], "0,7"),
}


def test_every_numeric_flag_is_range_checked(capsys):
    """Each numeric flag of the parser is in NUMERIC and has a range-checking type; each bad value
    is a one-line error naming its flag."""
    numeric = {a.option_strings[0] for a in sample.parser()._actions if a.choices is None
               and getattr(a.type, "__name__", None) in ("int", "float", "parse_labels")}
    assert numeric == set(NUMERIC)
    assert not [a for a in sample.parser()._actions if a.type in (int, float) and a.choices is None]
    for flag, (bad_values, good) in NUMERIC.items():
        assert (
            getattr(sample.parse_args(["--ckpt", "x.pt", flag, good]), flag[2:].replace("-", "_"))
            is not None
        )
        for bad in bad_values:
            assert f"error: argument {flag}: " in cli_error(
                capsys, sample.parse_args, "--ckpt", "x.pt", f"{flag}={bad}"
            )
    assert "--guidance-low 0.8 > --guidance-high 0.7: the interval is empty" in cli_error(
        capsys, sample.parse_args, "--guidance-low", "0.8", "--guidance-high", "0.7")


# ----------------------------------------------------------------------------------------------
# Which checkpoint: --ckpt file / run folder / repa-sit-xl-2, and the default


def make_run(root, name, steps, mtime):
    """runs/<name>/checkpoints/<step>.pt files (tiny train.py checkpoints) written at time mtime."""
    folder = root / "runs" / name / "checkpoints"
    folder.mkdir(parents=True)
    for step in steps:
        save_project_ckpt(str(folder / f"{step:07d}.pt"))
        os.utime(folder / f"{step:07d}.pt", (mtime, mtime))
    return folder


def test_default_checkpoint_is_the_newest_of_the_latest_run(tmp_path, monkeypatch):
    """No --ckpt: the highest step of the run written last; a run folder gives its newest; none:
    REPA's weights."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    repa = str(tmp_path / "hub" / "checkpoints" / "repa-sit-xl-2.pt")
    path, why = runs.resolve_ckpt(None)
    assert path == repa and "no run under runs/" in why
    assert runs.resolve_ckpt("repa-sit-xl-2")[0] == repa
    old = make_run(tmp_path, "old", [10, 20], mtime=1000)
    make_run(tmp_path, "new", [5], mtime=2000)
    path, why = runs.resolve_ckpt(None)
    assert path == "runs/new/checkpoints/0000005.pt" and "most recently written run" in why
    # an old step touched later does not make its run the newest
    os.utime(old / "0000010.pt", (3000, 3000))
    assert runs.resolve_ckpt(None)[0] == "runs/new/checkpoints/0000005.pt"
    os.utime(old / "0000020.pt", (3000, 3000))
    assert runs.resolve_ckpt(None)[0] == "runs/old/checkpoints/0000020.pt"
    assert runs.resolve_ckpt("runs/new")[0] == os.path.join("runs/new", "checkpoints", "0000005.pt")
    assert runs.resolve_ckpt(str(old / "0000010.pt"))[0] == str(old / "0000010.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--ckpt empty: no checkpoint"):
        runs.resolve_ckpt("empty")


def test_sample_with_no_flags_uses_the_run_and_its_vae(tmp_path, monkeypatch, capsys):
    """`sample.py --cfg 1.35` after a run: the first line names the checkpoint and why; the grid
    uses the run's VAE."""
    monkeypatch.chdir(tmp_path)
    folder = make_run(tmp_path, "smoke", [20], mtime=1000)
    ckpt = torch.load(folder / "0000020.pt", weights_only=True)
    torch.save(dict(ckpt, config=dict(ckpt["config"], vae="none")), folder / "0000020.pt")
    run(["--cfg", "1.35", "--num-steps", "2", "--grid-size", "2"])
    first, *_ = capsys.readouterr().out.splitlines()
    assert first == (
        "sample.py: checkpoint runs/smoke/checkpoints/0000020.pt "
        "(no --ckpt: the newest checkpoint of the most recently written run under runs/)"
    )
    assert os.listdir(tmp_path / "samples") == [
        "smoke-0000020-ema-sde2-cfg1.35-g0.0-1.0-vae-none-seed0.png"
    ]


def test_failed_repa_download_is_one_line(tmp_path, monkeypatch):
    """Offline: one line naming what, from where, and the local-file alternative; nothing left in
    the cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    urls = []

    def offline(url, dst, progress=True):
        """torch.hub.download_url_to_file without a network."""
        urls.append(url)
        raise OSError("<urlopen error [Errno -2] Name or service not known>\nsecond line")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(SystemExit) as e:
        run(["--cfg", "1.35"])
    message = str(e.value)
    assert urls == [runs.REPA_URL] and "dropboxusercontent.com" in runs.REPA_URL
    assert message.startswith(
        "sample.py: error: cannot download repa-sit-xl-2 (REPA's SiT-XL/2 weights) from https://"
    )
    assert (
        "Name or service not known" in message
        and message.endswith("pass --ckpt PATH")
        and "\n" not in message
    )
    assert not (tmp_path / "hub" / "checkpoints" / "repa-sit-xl-2.pt").exists()


def test_downloaded_repa_weights_are_loaded_from_the_cache(tmp_path, monkeypatch):
    """Once downloaded (here: a fake bare state dict), repa-sit-xl-2 loads from torch's hub cache,
    no second fetch."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    # heads as inferred
    net = perturbed(SiT(**dict(TINY, hidden_size=64, num_heads=1, encoder_depth=2)), 7)
    fetched = []
    monkeypatch.setattr(
        torch.hub,
        "download_url_to_file",
        lambda url, dst, progress=True: fetched.append(url) or torch.save(net.state_dict(), dst),
    )
    for _ in range(2):
        run(["--ckpt", "repa-sit-xl-2", "--vae", "none", "--num-steps", "2", "--grid-size", "1",
             "--out", str(tmp_path / "g.png")])
    assert fetched == [runs.REPA_URL]
    torch.testing.assert_close(
        outputs(runs.load_model(runs.repa_path())), outputs(net), rtol=0, atol=0
    )


def test_unloadable_vae_is_a_one_line_error(ckpt, tmp_path):
    """A VAE folder without a diffusers config stops with one line naming it
    (no download is attempted)."""
    (tmp_path / "vae").mkdir()
    with pytest.raises(
        SystemExit, match=r"cannot load the SD-VAE .*vae.*local diffusers folder"
    ) as e:
        run(["--ckpt", ckpt, "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "g.png")])
    assert "\n" not in str(e.value)
