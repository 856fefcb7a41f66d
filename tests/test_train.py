"""train.py: smoke runs per alignment preset, exact resume, DDP equivalence, bad input."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import fid
import losses
import runs
import sample
import train
from cluster import UserError
from helpers import cli_error, random_inception

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "smoke", "--batch-size", "4", "--resolution", "32", "--synthetic-images", "16",
        "--sample-every", "0", "--log-every", "2", "--ckpt-every", "2"]


def run(tmp_path, *flags):
    """Train in-process with the tiny smoke flags plus flags; returns the run folder."""
    return train.main(train.parse_args([*TINY, "--out", str(tmp_path), *flags]))


def run_folder(out, *flags):
    """The folder train.py gives a run of the tiny smoke flags plus flags (its default run name)
    under out."""
    return os.path.join(out, train.resolve_config(train.parse_args([*TINY, *flags]))["run_name"])


def newest(run_dir):
    """The newest checkpoint of a run, loaded."""
    return torch.load(runs.checkpoint_paths(run_dir)[-1], weights_only=True)


def assert_same_state(
    a, b, keys=("model", "ema", "opt", "scaler", "disc", "disc_opt", "disc_scaler")
):
    """Bitwise equality of every tensor under the given checkpoint keys."""
    def flat(x, prefix=""):
        if isinstance(x, dict):
            return {k2: v2 for k, v in x.items() for k2, v2 in flat(v, f"{prefix}{k}.").items()}
        if isinstance(x, (list, tuple)):
            return {k2: v2 for i, v in enumerate(x) for k2, v2 in flat(v, f"{prefix}{i}.").items()}
        return {prefix: x}
    for key in keys:
        fa, fb = flat(a.get(key)), flat(b.get(key))
        assert fa.keys() == fb.keys(), key
        for name in fa:
            va, vb = fa[name], fb[name]
            assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb, name


@pytest.mark.slow
@pytest.mark.parametrize("align", ["none", "repa", "sara", "sra", "sra2", "repa+sra2"])
def test_smoke_each_alignment_preset(tmp_path, align):
    run_dir = run(tmp_path, "--align", align, "--max-steps", "4")
    ckpt = newest(run_dir)
    assert ckpt["step"] == 4 and ckpt["config"]["align"] == align
    assert ("disc" in ckpt) == (align == "sara")  # no discriminator without the adversarial term
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [2, 4]
    expected = {
        "none": {"velocity"},
        "repa": {"velocity", "patch"},
        "sara": {"velocity", "patch", "struc", "adv"},
        "sra": {"velocity", "self"},
        "sra2": {"velocity", "sra"},
        "repa+sra2": {"velocity", "patch", "sra"},
    }[align]
    aligned = {"patch", "struc", "adv", "sra", "self"}
    assert expected <= set(rows[0]) and not aligned - expected & set(rows[0])
    assert all(torch.isfinite(torch.tensor(r["velocity"])) for r in rows)
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert "data (synthetic)" in config["random_components"]  # stand-ins are recorded, never silent
    assert config["model_config"]["sra_depth"] == (1 if "sra2" in align else 0)
    # SRA: the student head at block 1 of SiT-T's 4, the EMA teacher tapped at block 3
    assert config["model_config"]["self_depth"] == (1 if align == "sra" else 0)
    assert config["align_config"]["self_teacher_depth"] == 3


@pytest.mark.slow
def test_exact_resume_with_the_sra_teacher(tmp_path, monkeypatch):
    """SRA's teacher is the EMA: a run stopped at step 2 and resumed equals a straight run; the
    weight schedule reads the epoch of the data (8 images, batch 4: two steps per epoch)."""
    epochs = []
    real = losses.at_epoch
    monkeypatch.setattr(losses, "at_epoch", lambda align, e: epochs.append(e) or real(align, e))
    flags = ["--align", "sra", "--synthetic-images", "8"]
    straight = run(tmp_path / "a", *flags, "--max-steps", "4")
    assert epochs == [0, 0, 1, 1]
    run(tmp_path / "b", *flags, "--max-steps", "2", "--ckpt-every", "2")
    resumed = run(tmp_path / "b", *flags, "--max-steps", "4", "--ckpt-every", "2")
    a, b = newest(straight), newest(resumed)
    assert a["step"] == b["step"] == 4
    assert_same_state(a, b)
    assert epochs[4:] == [0, 0, 1, 1]  # the resumed run starts at epoch 1 after its two steps


def test_sample_grid_written(tmp_path):
    run_dir = run(
        tmp_path, "--align", "none", "--max-steps", "2", "--sample-every", "2", "--sample-steps",
        "3",
    )
    path = os.path.join(run_dir, "samples", "0000002.png")
    from PIL import Image
    assert Image.open(path).size == (4 * 32, 4 * 32)  # 16 samples, 4x4 grid of 32 px images


@pytest.mark.slow
@pytest.mark.parametrize("precision,disc_bn", [("fp16", "joint"), ("bf16", "separate"),
                                               ("bf16", "eval")])
def test_exact_resume_with_discriminator(tmp_path, precision, disc_bn):
    flags = ["--align", "sara", "--precision", precision, "--disc-every", "2", "--disc-bn", disc_bn]
    straight = run(tmp_path / "a", *flags, "--max-steps", "6")
    run(tmp_path / "b", *flags, "--max-steps", "3", "--ckpt-every", "3")  # stops at step 3 ...
    # ... and continues
    resumed = run(tmp_path / "b", *flags, "--max-steps", "6", "--ckpt-every", "3")
    a, b = newest(straight), newest(resumed)
    assert a["step"] == b["step"] == 6
    assert_same_state(a, b)
    steps = [json.loads(line)["step"] for line in open(os.path.join(resumed, "metrics.jsonl"))]
    assert steps == sorted(set(steps))  # no duplicated rows after the resume


@pytest.mark.slow
def test_align_until_holds_across_a_resume_and_is_part_of_the_run(tmp_path):
    """HASTE's switch-off at step 3: a run stopped at 2 and resumed past it equals a straight run;
    the step is recorded, so a resume with another --align-until is refused."""
    flags = ["--align", "sara+sra2", "--disc-every", "1", "--align-until", "3"]
    straight = run(tmp_path / "a", *flags, "--max-steps", "6")
    run(tmp_path / "b", *flags, "--max-steps", "2")  # stops before the switch ...
    resumed = run(tmp_path / "b", *flags, "--max-steps", "6")  # ... and goes on past it
    a, b = newest(straight), newest(resumed)
    assert a["step"] == b["step"] == 6 and b["config"]["align_until"] == 3
    assert_same_state(a, b)
    rows = {r["step"]: r for r in map(json.loads, open(os.path.join(resumed, "metrics.jsonl")))}
    aligned = {"patch", "struc", "adv", "sra", "disc_loss"}
    assert aligned <= set(rows[2]) and not aligned & set(rows[6]), rows
    with pytest.raises(SystemExit, match="align-until: 3 there, 5 now"):
        run(tmp_path / "b", *flags[:-1], "5", "--max-steps", "8", "--run-name",
            os.path.basename(resumed))


def test_resume_with_an_alignment_flag_typed_at_its_preset_value(tmp_path):
    """--patch-weight 0.5 is repa's own value: the same experiment, which resumes (and keeps its
    folder); another value is another experiment, refused naming the flag."""
    run_dir = run(tmp_path, "--align", "repa", "--max-steps", "2")
    again = run(tmp_path, "--align", "repa", "--patch-weight", "0.5", "--max-steps", "4")
    assert again == run_dir and newest(run_dir)["step"] == 4
    with pytest.raises(SystemExit, match="patch-weight: 0.5 there, 0.25 now"):
        run(tmp_path, "--align", "repa", "--patch-weight", "0.25", "--max-steps", "6",
            "--run-name", os.path.basename(run_dir))


def test_resume_rejects_truncated_and_foreign_checkpoints(tmp_path):
    run_dir = run(tmp_path, "--align", "none", "--max-steps", "2")
    with pytest.raises(SystemExit, match="another config .*align: 'none' there, 'repa' now"):
        run(
            tmp_path, "--align", "repa", "--max-steps", "4", "--run-name", os.path.basename(run_dir)
        )
    path = runs.checkpoint_paths(run_dir)[-1]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="0000002.pt is not a readable checkpoint"):
        run(tmp_path, "--align", "none", "--max-steps", "4")
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(SystemExit, match="not a train.py checkpoint"):
        run(tmp_path, "--align", "none", "--max-steps", "4")


def test_bad_input_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="does not exist: run data.py"):
        run(tmp_path, "--data-dir", str(tmp_path / "nowhere"))
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "vae-sd").mkdir()
    from PIL import Image
    for i in range(2):
        Image.new("RGB", (32, 32)).save(tmp_path / "d" / "images" / f"img{i:08d}.png")
    import numpy as np
    np.save(
        tmp_path / "d" / "vae-sd" / "img-mean-std-00000000.npy", np.zeros((8, 4, 4), np.float32)
    )
    json.dump(
        {"labels": [["img-mean-std-00000000.npy", 0]]},
        open(tmp_path / "d" / "vae-sd" / "dataset.json", "w"),
    )
    with pytest.raises(SystemExit, match="2 images .* but 1 latent files"):
        run(tmp_path, "--data-dir", str(tmp_path / "d"))
    with pytest.raises(UserError, match="--batch-size 4 does not divide by the 3 ranks"):
        train.resolve_config(train.parse_args(TINY), world=3)
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "tiny"])
    assert "invalid choice: 'tiny'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="fewer than one global batch"):
        run(tmp_path, "--synthetic-images", "2")


def test_global_batches_do_not_depend_on_world_size():
    one = iter(data.GlobalBatchSampler(10, 4, 0, 1, seed=0, start_step=0))
    halves = [iter(data.GlobalBatchSampler(10, 4, r, 2, seed=0, start_step=0)) for r in range(2)]
    for _ in range(5):  # crosses epochs (2 batches per epoch, the last 2 images dropped)
        assert next(one) == next(halves[0]) + next(halves[1])
    later = iter(data.GlobalBatchSampler(10, 4, 0, 1, seed=0, start_step=3))
    again = iter(data.GlobalBatchSampler(10, 4, 0, 1, seed=0, start_step=0))
    assert next(later) == [next(again) for _ in range(4)][-1]


@pytest.mark.slow
@pytest.mark.parametrize("align,until", [("repa+sra2", []), ("repa+sra2", ["--align-until", "2"]),
                                         ("sra", [])])  # until: the heads leave DDP's graph
def test_ddp_two_processes_equal_one(tmp_path, align, until):
    flags = [*TINY, "--align", align, "--max-steps", "3", "--ckpt-every", "3", *until]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_port=29517", os.path.join(ROOT, "train.py"), *flags, "--out",
            str(tmp_path / "ddp"),
        ],
        check=True, cwd=ROOT, env=env, capture_output=True,
    )
    one = run(tmp_path / "one", *flags[len(TINY):])
    a, b = newest(one), newest(os.path.join(tmp_path / "ddp", os.path.basename(one)))
    assert b["config"]["world_size"] == 2
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=1e-5, rtol=1e-4), k


@pytest.mark.slow
def test_train_on_prepared_data(tmp_path):
    """data.py on a few generated class folders (tiny random VAE), then training on its output."""
    import numpy as np
    from PIL import Image

    import data

    rng = np.random.default_rng(0)
    for c, cls in enumerate(["n01", "n02"]):
        (tmp_path / "raw" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "raw" / cls / f"{c}_{i}.JPEG")
    data.main(data.parse_args([
        "--source", str(tmp_path / "raw"), "--dest", str(tmp_path / "data"), "--resolution", "32",
        "--vae", "tiny-random", "--workers", "0"]))
    run_dir = run(
        tmp_path, "--data-dir", str(tmp_path / "data"), "--align", "repa", "--max-steps", "2"
    )
    ckpt = newest(run_dir)
    assert ckpt["step"] == 2 and ckpt["config"]["model_config"]["num_classes"] == 2
    assert not any(part.startswith("data") for part in ckpt["config"]["random_components"])


def test_sample_py_loads_a_train_checkpoint(tmp_path):
    run_dir = run(tmp_path, "--align", "repa+sra2", "--max-steps", "2")
    path = runs.checkpoint_paths(run_dir)[-1]
    ckpt = torch.load(path, weights_only=True)
    for weights in ("ema", "model"):
        model = runs.load_model(path, weights)
        assert all(torch.equal(v, ckpt[weights][k]) for k, v in model.state_dict().items())


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    import losses

    real = losses.velocity_loss
    monkeypatch.setattr(losses, "velocity_loss", lambda v, target: real(v, target) * float("nan"))
    with pytest.raises(SystemExit, match="3 non-finite steps in a row at step 3"):
        run(tmp_path, "--align", "repa", "--max-steps", "10", "--max-bad-steps", "3")
    run_dir = run_folder(tmp_path, "--align", "repa", "--max-bad-steps", "3")
    # written at step 2, before the stop: skipped steps left the weights untouched
    ckpt = newest(run_dir)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert ckpt["opt"]["state"] == {}  # AdamW never stepped
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert rows[0]["bad_steps"] == 2 and "grad_norm" not in rows[0]


def spy_on_clipping(monkeypatch):
    """Per optimizer step, (norm of the true gradient, norm of the gradient the step sees, their
    cosine). The true gradient is taken as backward leaves it, divided by the GradScaler's scale,
    independently of train_step's unscale and clip."""
    steps, real_build = [], train.build_run

    def build_run(*args, **kwargs):
        run = real_build(*args, **kwargs)
        true, real_step = {}, run.opt.step

        def keep(p):  # after backward filled p.grad, before anything else touches it
            true[p] = p.grad.detach().clone() / run.scaler.get_scale()

        for p in run.model.parameters():
            if p.requires_grad:  # not the fixed sin-cos position table
                p.register_post_accumulate_grad_hook(keep)

        def step(*a, **k):
            # float64: a float32 sum over the model's millions of squares is off by ~1e-4
            raw = torch.cat([true[p].flatten() for p in true]).double()
            seen = torch.cat([p.grad.flatten() for p in true]).double()
            steps.append((raw.norm().item(), seen.norm().item(),
                          (raw @ seen / raw.norm() / seen.norm()).item()))
            true.clear()
            return real_step(*a, **k)

        run.opt.step = step
        return run

    monkeypatch.setattr(train, "build_run", build_run)
    return steps


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_optimizer_sees_the_clipped_gradient_and_the_log_the_raw_norm(
    tmp_path, monkeypatch, precision
):
    """--max-grad-norm M: the step sees the true gradient scaled to norm M when it is longer (as is,
    else); metrics.jsonl's grad_norm is the true norm before clipping (fp16: unscaled)."""
    steps = spy_on_clipping(monkeypatch)
    limit = 3.0  # inside the true norms of these steps (2.2 to 3.9): both cases occur
    run_dir = run(tmp_path, "--align", "repa", "--precision", precision, "--max-grad-norm",
                  str(limit), "--max-steps", "6", "--log-every", "1", "--ckpt-every", "6")
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    logged = [r["grad_norm"] for r in rows if "grad_norm" in r]  # the steps that were finite
    assert len(steps) == len(logged) >= 4
    clipped = [raw > limit for raw, _, _ in steps]
    assert any(clipped) and not all(clipped), steps  # else pick another limit
    for (raw, seen, cosine), norm in zip(steps, logged):
        assert cosine == pytest.approx(1, abs=1e-9)  # scaled as a whole, direction kept
        # clip_grad_norm_'s float32 norm is ~1e-4 off
        assert seen == pytest.approx(min(raw, limit), rel=1e-3)
        assert norm == pytest.approx(raw, rel=1e-3)


def test_bad_components_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="--enc-type foo: ValueError: unknown encoder 'foo'"):
        run(tmp_path, "--align", "repa", "--enc-type", "foo")
    with pytest.raises(SystemExit, match="encoder weights file .*nope.pth does not exist"):
        run(
            tmp_path, "--align", "repa", "--enc-type", "dinov2-vit-s", "--enc-weights",
            str(tmp_path / "nope.pth"), "--resolution", "256",
        )
    with pytest.raises(
        SystemExit, match="SiT-T/4 has 1 tokens but the encoder gives 4: .*patch size 2"
    ):
        run(tmp_path, "--align", "repa", "--model", "SiT-T/4")


def test_default_run_name_names_what_differs_from_the_preset():
    def name(*flags):
        return train.resolve_config(train.parse_args(list(flags)))["run_name"]

    assert name("--align", "sara") == "imagenet256-sara-SiT-XL2"
    assert (
        name("--align", "sara", "--adv-weight", "0.05", "--max-steps", "9")
        == "imagenet256-sara-SiT-XL2"
    )  # preset value; resumable
    # SARA Table 2 row
    assert name("--align", "sara", "--adv-weight", "0") == "imagenet256-sara-SiT-XL2-adv0"
    assert name("--model", "SiT-L/2", "--align", "repa", "--enc-type", "dinov2-vit-l") == \
        "imagenet256-repa-SiT-L2-enctypedinov2-vit-l"  # no longer collides with the DINOv2-B run
    assert (
        name("--model", "SiT-B/2", "--align", "sra2", "--sra-t-range", "0", "0.5")
        == "imagenet256-sra2-SiT-B2-sratrange0-0.5"
    )
    assert name("--align", "sara", "--run-name", "mine") == "mine"


# ----------------------------------------------------------------------------------------------
# Long runs on clusters: flags, damaged checkpoints, NaN rollback, preemption, multi-node, logging

REAL_PLOT = runs.plot_metrics


@pytest.fixture(autouse=True)
def no_loss_plots(monkeypatch):
    """Skip drawing losses.png at each log step (about a second each on a busy CPU); test_logging
    draws it."""
    monkeypatch.setattr(runs, "plot_metrics", lambda *paths: None)


def train_parser(monkeypatch):
    """train.py's ArgumentParser, as parse_args builds it."""
    parsers = []
    monkeypatch.setattr(
        argparse.ArgumentParser, "parse_args", lambda self, argv=None: parsers.append(self)
    )
    train.parse_args([])
    monkeypatch.undo()
    return parsers[0]


OUT_OF_RANGE = {"at least 1": "0", "at least 0": "-1", "at least 0.0": "-1", "at least 1.0": "0.5",
                "at least 4": "3", "greater than 0": "0", "in [0, 1]": "1.5", "in [0, 1)": "1",
                "a positive multiple of 8": "12"}


def test_every_numeric_flag_is_range_checked(tmp_path, monkeypatch, capsys):
    """Each numeric flag's type refuses values out of its range (and nan) with one line naming the
    flag; the checks across flags name theirs too; nothing is written."""
    parser = train_parser(monkeypatch)
    numeric = [a for a in parser._actions if getattr(a.type, "__name__", None) in ("int", "float")
               and a.choices is None]
    # all checked: no numeric flag is a bare int or float
    assert len(numeric) > 30 and not [a.dest for a in numeric if a.type in (int, float)]
    for action in numeric:
        flag, nargs = action.option_strings[0], action.nargs or 1
        must, bad = next((m, v) for m, v in OUT_OF_RANGE.items() if _refuses(action.type, v, m))
        line = cli_error(capsys, train.parse_args, *TINY, flag, *[bad] * nargs)
        assert f"train.py: error: argument {flag}: {bad} is out of range: it must be {must}" in line
        if action.type.__name__ == "float":
            assert _refuses(action.type, "nan", "out of range"), flag
    # the examples, as a new user types them: each a one-line error naming the flag
    # and its range
    for flags, message in [
        (["--batch-size", "0"], "--batch-size: 0 is out of range: it must be at least 1"),
        (["--lr", "-1"], "--lr: -1 is out of range: it must be greater than 0"),
        (["--max-steps", "-5"], "--max-steps: -5 is out of range: it must be at least 1"),
        (["--ema-decay", "2"], "--ema-decay: 2 is out of range: it must be in [0, 1]"),
    ]:
        assert message in cli_error(capsys, train.parse_args, *TINY, *flags)
    for flags, message in [
        (["--encoder-depth", "5", "--align", "repa"], "--encoder-depth 5 .*SiT-T/2 has 4 blocks"),
        (["--sra-t-range", "0.6", "0.2", "--align", "sra2"], "--sra-t-range 0.6 0.2 is empty"),
    ]:
        with pytest.raises(SystemExit, match=message):
            train.main(train.parse_args([*TINY, "--out", str(tmp_path), *flags]))
    assert not os.listdir(tmp_path)  # refused before anything was built or written


def _refuses(parse, text, must):
    """Whether parse refuses text with the message naming the range `must`."""
    try:
        parse(text)
    except argparse.ArgumentTypeError as e:
        return must in str(e)
    except ValueError:  # not even of the flag's type
        return False
    return False


def test_preempt_signals_flag():
    assert train.parse_args([]).preempt_signals == ("TERM", "USR1")
    assert train.parse_args(["--preempt-signals", "sigusr1, term"]).preempt_signals == (
        "USR1",
        "TERM",
    )
    assert train.parse_args(["--preempt-signals", "none"]).preempt_signals == ()
    with pytest.raises(SystemExit):
        train.parse_args(["--preempt-signals", "KILL"])


def test_resume_falls_back_past_an_unreadable_newest_checkpoint(tmp_path):
    straight = run(tmp_path / "a", "--align", "none", "--max-steps", "6")
    damaged = run(tmp_path / "b", "--align", "none", "--max-steps", "4")  # checkpoints 2 and 4
    newest_path = runs.checkpoint_paths(damaged)[-1]
    data = open(newest_path, "rb").read()
    open(newest_path, "wb").write(data[: len(data) // 3])  # a file cut short by a crash
    run(tmp_path / "b", "--align", "none", "--max-steps", "6")
    log = open(os.path.join(damaged, "log.txt")).read()
    assert (
        "WARNING train: " in log and "0000004.pt is not a readable checkpoint (RuntimeError" in log
    )
    assert "falling back to the previous checkpoint" in log and "0000002.pt at step 2" in log
    # resumed from step 2 and continued exactly
    assert_same_state(newest(straight), newest(damaged))


def inject_non_finite(monkeypatch, bad_batches):
    """Make the loss NaN on the given global batches (indices of GlobalBatchSampler's stream)."""
    import losses

    current = {}
    real_iter, real_loss = data.GlobalBatchSampler.__iter__, losses.velocity_loss

    def tracked(self):
        for index, rows in enumerate(real_iter(self), start=self.start_step):
            current["batch"] = index  # num_workers 0: the batch being trained on
            yield rows

    monkeypatch.setattr(data.GlobalBatchSampler, "__iter__", tracked)
    monkeypatch.setattr(losses, "velocity_loss", lambda v, target: real_loss(v, target) * (
        float("nan") if bad_batches(current["batch"]) else 1.0))


ROLLBACK = ["--align", "none", "--max-bad-steps", "2", "--log-every", "2", "--keep-ckpts", "10"]


def test_nan_burst_rolls_back_and_a_resume_reproduces_it(tmp_path, monkeypatch):
    """Batches 5 and 6 are non-finite: back to checkpoint 4, batches 4..6 skipped, 10 real steps in
    the end."""
    inject_non_finite(monkeypatch, lambda b: b in (5, 6))
    straight = run(tmp_path / "a", *ROLLBACK, "--max-steps", "10")
    ckpt = newest(straight)
    assert ckpt["step"] == 10 and ckpt["batch"] == 13
    assert ckpt["rollbacks"] == [dict(step=4, first_batch=4, last_batch=6)]
    # the skipped updates were undone too
    assert all(s["step"] == 10 for s in ckpt["opt"]["state"].values())
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    rows = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [2, 4, 4, 6, 8, 10]  # the abandoned step-6 row is gone
    assert rows[2] == dict(step=4, rollbacks=1, skipped_from_batch=4, skipped_to_batch=6)
    assert all(r.get("bad_steps", 0) == 0 for r in rows)
    plain = newest(run(tmp_path / "plain", *ROLLBACK, "--max-steps", "4"))
    assert_same_state(
        plain, torch.load(os.path.join(straight, "checkpoints", "0000004.pt"), weights_only=True)
    )


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [5, 6, 7])
def test_nan_rollback_survives_a_stop_before_during_and_after_the_burst(
    tmp_path, monkeypatch, stop_at
):
    """Stopped with an end-of-run checkpoint at 5 (not a rollback target), inside the burst, after
    the rollback."""
    inject_non_finite(monkeypatch, lambda b: b in (5, 6))
    straight = run(tmp_path / "a", *ROLLBACK, "--max-steps", "10")
    run(tmp_path / "b", *ROLLBACK, "--max-steps", str(stop_at))
    resumed = run(tmp_path / "b", *ROLLBACK, "--max-steps", "10")
    a, b = newest(straight), newest(resumed)
    assert a["rollbacks"] == b["rollbacks"] and a["batch"] == b["batch"] == 13
    assert_same_state(a, b)


def test_resume_right_after_a_rollback_continues_exactly(tmp_path, monkeypatch):
    """Killed just after the rollback re-saved checkpoint 4: the resume starts at batch 7 (the
    first after the skipped 4..6) and ends as the uninterrupted run, weights and next batch."""
    inject_non_finite(monkeypatch, lambda b: b in (5, 6))
    straight = run(tmp_path / "a", *ROLLBACK, "--max-steps", "10")
    real_roll_back = runs.roll_back

    def killed_after(*args, **kwargs):
        """The rollback writes its checkpoint, then the process dies."""
        real_roll_back(*args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(runs, "roll_back", killed_after)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "b", *ROLLBACK, "--max-steps", "10")
    cut = run_folder(tmp_path / "b", *ROLLBACK)
    resaved = newest(cut)
    assert [runs.checkpoint_step(p) for p in runs.checkpoint_paths(cut)] == [2, 4]
    skipped = dict(step=4, first_batch=4, last_batch=6)
    assert resaved["step"] == 4 and resaved["rollbacks"] == [skipped]
    assert resaved["batch"] == skipped["last_batch"] + 1 == 7 and resaved["bad_in_a_row"] == 0
    resumed = run(tmp_path / "b", *ROLLBACK, "--max-steps", "10")
    a, b = newest(straight), newest(resumed)
    assert a["step"] == b["step"] == 10 and a["batch"] == b["batch"] == 13
    assert a["rollbacks"] == b["rollbacks"] == [skipped]
    assert_same_state(a, b)
    rows = [json.loads(line) for line in open(os.path.join(resumed, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [2, 4, 4, 6, 8, 10]


def test_nan_bursts_stop_after_max_rollbacks(tmp_path, monkeypatch):
    inject_non_finite(monkeypatch, lambda b: b >= 5)
    with pytest.raises(
        SystemExit,
        match="2 non-finite steps in a row at step 6 after 1 rollbacks .--max-rollbacks.",
    ):
        run(tmp_path, *ROLLBACK, "--max-steps", "10", "--max-rollbacks", "1")
    run_dir = run_folder(tmp_path, *ROLLBACK, "--max-rollbacks", "1")
    # the rollback point, re-saved with the skipped range; nothing newer, nothing NaN
    ckpt = newest(run_dir)
    assert ckpt["step"] == 4 and ckpt["rollbacks"] == [dict(step=4, first_batch=4, last_batch=6)]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


class FakeWriter:
    """torch.utils.tensorboard.SummaryWriter stand-in that records add_scalar calls."""

    scalars = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir = log_dir

    def add_scalar(self, tag, value, step):
        FakeWriter.scalars.append((tag, value, step))

    def flush(self):
        pass

    close = flush


def test_logging_mirrors_every_metric_and_draws_the_loss_curves(tmp_path, monkeypatch):
    import types

    import PIL.Image

    logged = []
    wandb = types.SimpleNamespace(init=lambda **kw: types.SimpleNamespace(
        log=logged.append, finish=lambda: logged.append("finished"), init_kwargs=kw))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter)
    )
    monkeypatch.setattr(FakeWriter, "scalars", [])
    drawn = []
    monkeypatch.setattr(
        runs, "plot_metrics", lambda *paths: drawn.append(paths) or REAL_PLOT(*paths)
    )
    run_dir = run(
        tmp_path, "--align", "sara", "--disc-every", "2", "--max-steps", "4", "--wandb", "proj",
        "--tensorboard", "1",
    )
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert logged == [*rows, "finished"]  # every row, every key, in order
    assert FakeWriter.scalars == [
        (k, v, r["step"]) for r in rows for k, v in r.items() if k != "step"
    ]
    assert {"velocity", "patch", "struc", "adv", "disc_loss", "grad_norm"} <= {
        k for k, _, _ in FakeWriter.scalars
    }
    assert len(drawn) == len(rows) == 2  # redrawn at each log step
    image = PIL.Image.open(os.path.join(run_dir, "losses.png"))
    assert image.size == (1024, 192 * 3)  # 4 x 3 panels: 11 keys at 80 dpi
    # asked for and missing: a one-line error, before anything is built
    for flag, module in (
        (["--wandb", "proj"], "wandb"),
        (["--tensorboard", "1"], "torch.utils.tensorboard"),
    ):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
        with pytest.raises(
            SystemExit,
            match=f"{flag[0]} .*needs the .* package, which is not installed: pip install",
        ):
            run(tmp_path / "missing", *flag)


def free_port():
    """A TCP port nobody listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out, ranks, *flags, launcher=()):
    """train.py under torchrun (gloo, CPU) with the tiny smoke flags, as a background process
    logging to out."""
    os.makedirs(out, exist_ok=True)
    launcher = launcher or (f"--nproc_per_node={ranks}", f"--master_port={free_port()}")
    with open(os.path.join(out, "torchrun.log"), "ab") as log:
        return subprocess.Popen(
            [
                sys.executable, "-m", "torch.distributed.run", *launcher,
                os.path.join(ROOT, "train.py"), *TINY, *flags, "--out", str(out),
            ],
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=log,
            stderr=log,
        )


def finished(process, out):
    """Wait for a torchrun process; its exit code must be 0 (else show its log)."""
    if process.wait(timeout=900):
        raise AssertionError(open(os.path.join(out, "torchrun.log")).read()[-3000:])


def workers(process):
    """The pids of torchrun's worker processes, rank order not guaranteed."""
    with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:
        return [int(pid) for pid in f.read().split()]


PREEMPT = [
    "--align", "sara", "--disc-every", "2", "--max-steps", "12", "--ckpt-every", "2", "--log-every",
    "100",
]


@pytest.mark.slow
@pytest.mark.parametrize("ranks,sig", [(1, signal.SIGTERM), (2, signal.SIGUSR1)])
def test_preemption_checkpoints_the_current_step_and_resumes_exactly(tmp_path, ranks, sig):
    """Signal one worker mid-run: every rank stops after the same step, rank 0 checkpoints it, all
    exit 0."""
    out = tmp_path / "preempted"
    run_dir = run_folder(out, *PREEMPT)
    process = torchrun(out, ranks, *PREEMPT)
    # mid-run: past step 2
    while not os.path.exists(os.path.join(run_dir, "checkpoints", "0000002.pt")):
        assert process.poll() is None, open(os.path.join(out, "torchrun.log")).read()[-3000:]
        time.sleep(0.2)
    # one rank only (with 2, most likely rank 1): the ranks must agree
    os.kill(max(workers(process)), sig)
    finished(process, out)
    stopped = newest(run_dir)
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert (
        2 <= stopped["step"] < 12
        and f"stopped after step {stopped['step']} with a checkpoint" in log
    )
    finished(torchrun(out, ranks, *PREEMPT), out)  # the same command again continues
    # same threads: exact
    finished(torchrun(tmp_path / "straight", ranks, *PREEMPT), tmp_path / "straight")
    straight = run_folder(tmp_path / "straight", *PREEMPT)
    a, b = newest(straight), newest(run_dir)
    assert a["step"] == b["step"] == 12 and b["config"]["world_size"] == ranks
    assert_same_state(a, b)


@pytest.mark.slow
def test_two_nodes_equal_one_process(tmp_path):
    """Two single-process torchrun 'nodes' meeting at a c10d rendezvous on this machine train as one
    process."""
    flags = ["--align", "repa+sra2", "--max-steps", "3", "--ckpt-every", "3"]
    endpoint = f"127.0.0.1:{free_port()}"
    launcher = (
        "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
        endpoint, "--rdzv-id", "two-nodes",
    )
    nodes = [torchrun(tmp_path / "nodes", 2, *flags, launcher=launcher) for _ in range(2)]
    for node in nodes:
        finished(node, tmp_path / "nodes")
    one = run(tmp_path / "one", *flags)
    a, b = newest(one), newest(os.path.join(tmp_path / "nodes", os.path.basename(one)))
    assert b["config"]["world_size"] == 2
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=1e-5, rtol=1e-4), k


def sync_bn_worker(rank, world, port, x, upstream, result_queue):
    """One gloo rank: SyncBatchNorm2d on its half of x; returns output, input grad, param grads,
    statistics."""
    import torch.distributed as dist

    from discriminator import SyncBatchNorm2d

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.manual_seed(0)
    bn = SyncBatchNorm2d(x.shape[1])
    bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-1, 1)
    rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    xr = x[rows].clone().requires_grad_(True)
    (bn(xr) * upstream[rows]).sum().backward()
    tensors = (
        bn(xr).detach(),
        xr.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var,
    )
    # by value: this process may exit before the read
    result_queue.put((rank, *[t.numpy() for t in tensors]))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_sync_batchnorm_on_two_gloo_ranks_equals_batchnorm_on_the_whole_batch():
    """Forward, input gradients and summed parameter gradients match nn.BatchNorm2d on the global
    batch."""
    import torch.multiprocessing as mp

    x, upstream = torch.randn(8, 3, 4, 4) * 3 + 1, torch.randn(8, 3, 4, 4)  # (B, C, H, W)
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-1, 1)
    xg = x.clone().requires_grad_(True)
    (bn(xg) * upstream).sum().backward()
    out = bn(xg).detach()  # second forward: the statistics moved twice, as in the workers
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [
        ctx.Process(target=sync_bn_worker, args=(r, 2, port, x, upstream, queue)) for r in range(2)
    ]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=300) for _ in procs), key=lambda r: r[0])
    results = [[rank, *map(torch.from_numpy, arrays)] for rank, *arrays in results]
    for p in procs:
        p.join()
    atol = dict(atol=1e-5, rtol=1e-5)
    assert torch.allclose(torch.cat([r[1] for r in results]), out, **atol)
    assert torch.allclose(torch.cat([r[2] for r in results]), xg.grad, **atol)
    # DDP sums (then averages) these
    assert torch.allclose(sum(r[3] for r in results), bn.weight.grad, **atol)
    assert torch.allclose(sum(r[4] for r in results), bn.bias.grad, **atol)
    for r in results:
        assert torch.allclose(r[5], bn.running_mean, **atol) and torch.allclose(
            r[6], bn.running_var, **atol
        )


@pytest.mark.slow
@pytest.mark.parametrize("disc_bn", ["joint", "separate", "eval"])
def test_sara_with_disc_sync_bn_two_ranks_equal_one_process(tmp_path, disc_bn):
    """D's running statistics after a step match one process (per-rank BatchNorm: 0.85 apart after
    two steps); so do its weights, to the last Adam step.

    Adam's first step moves each weight by about +-lr, the sign of its gradient: a D step whose
    gradients were not all-reduced (one that bypasses D's DDP wrapper) shows as many weights 2 lr
    apart (58k of D's 676k here); rounding flips the sign of only the few gradients that BatchNorm
    makes sum to ~0 (0 to 5).
    """
    flags = [
        "--align", "sara", "--disc-every", "1", "--max-steps", "1", "--ckpt-every", "1",
        "--disc-sync-bn", "1", "--disc-bn", disc_bn,
    ]
    finished(torchrun(tmp_path / "ddp", 2, *flags), tmp_path / "ddp")
    one = run(tmp_path / "one", *flags)
    a, b = newest(one), newest(os.path.join(tmp_path / "ddp", os.path.basename(one)))
    for k, v in a["disc"].items():
        if "running" in k:
            assert torch.allclose(v, b["disc"][k], atol=1e-5, rtol=1e-5), k
    for key, lr in (("model", 1e-4), ("disc", 2e-4)):
        weights = [k for k, v in a[key].items() if v.is_floating_point() and "running" not in k]
        apart = {k: int(((a[key][k].float() - b[key][k].float()).abs() > lr).sum())
                 for k in weights}
        total = sum(a[key][k].numel() for k in weights)
        assert sum(apart.values()) <= 1e-3 * total, (key, {k: n for k, n in apart.items() if n})
        for k in weights:
            assert torch.allclose(a[key][k].float(), b[key][k].float(), atol=2 * lr, rtol=0), k


# ----------------------------------------------------------------------------------------------
# Evaluation during training equals sample.py + fid.py; --keep-every

TRAIN = ["--preset", "smoke", "--batch-size", "4", "--resolution", "32", "--synthetic-images", "16",
         "--sample-every", "0", "--log-every", "2", "--ckpt-every", "2", "--max-steps", "2"]


@pytest.mark.slow
def test_online_fid_equals_sample_py_plus_fid_py(tmp_path, monkeypatch):
    """A killed evaluation repeats on resume, once; its five numbers equal sample.py + fid.py on the
    same seeds."""
    # random weights: no download, same network in both routes
    weights = str(tmp_path / "inception.pth")
    torch.save(random_inception(fid.FIDInception(), seed=0).state_dict(), weights)
    ref = str(tmp_path / "ref.npz")
    noise = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.savez(ref, arr_0=noise)
    flags = [
        *TRAIN, "--out", str(tmp_path / "runs"), "--eval-every", "2", "--eval-ref", ref,
        "--eval-samples", "4", "--eval-steps", "3", "--eval-cfg", "1.5", "--eval-weights", weights,
    ]
    calls, real_fid = [], fid.fid_from_stats

    def recording_fid(mu1, sigma1, mu2, sigma2, **options):
        """fid_from_stats, its statistics recorded (online the reference factor comes cached,
        offline not)."""
        calls.append((mu1, sigma1, mu2, sigma2))
        return real_fid(mu1, sigma1, mu2, sigma2, **options)

    def killed(*args, **kwargs):
        """The process dies in the middle of an evaluation."""
        raise KeyboardInterrupt

    monkeypatch.setattr(fid, "fid_from_stats", recording_fid)
    with monkeypatch.context() as m:
        m.setattr(sample, "generate_images", killed)
        with pytest.raises(KeyboardInterrupt):
            train.main(train.parse_args(flags))
    assert not calls

    # Offline: the same seeds, guidance, steps and batch size, through the command lines.
    npz = str(tmp_path / "samples.npz")
    # no --ckpt: the newest checkpoint of runs/'s newest run, with its VAE (tiny-random)
    monkeypatch.chdir(tmp_path)
    sample.main(sample.parse_args([
        "--num-samples", "4", "--num-steps", "3", "--cfg", "1.5", "--batch-size", "4",
        "--out", npz]))
    samples = np.load(npz)["arr_0"]
    # shared images: precision and recall > 0
    np.savez(ref, arr_0=np.concatenate([samples[:2], noise[:3]]))

    # resumes at step 2 and evaluates it (new ref: features redone)
    run_dir = train.main(train.parse_args(flags))
    train.main(train.parse_args(flags))  # done: nothing is evaluated twice
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    evals = [r for r in rows if "fid" in r]
    assert [r["step"] for r in evals] == [2] and evals[0]["eval_samples"] == 4
    offline = fid.main(fid.parse_args([
        ref, npz, "--weights", weights, "--weights-sha256", "", "--min-images", "4", "--device",
        "cpu", "--cache", "0", "--out", str(tmp_path / "eval.json")]))
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert evals[0][key] == pytest.approx(offline[key], rel=1e-6, abs=1e-12), key
    # precision and recall are 1.0 and 0.4 here
    assert offline["inception_score"] > 1 and offline["precision"] > 0 and 0 < offline["recall"] < 1
    # FID and sFID: every input of fid_from_stats (sample and reference mean and covariance) is
    # the same too.
    assert len(calls) == 4
    for online_args, offline_args in zip(calls[:2], calls[2:]):
        assert np.abs(online_args[1]).max() > 1e-3  # real covariances
        for a, b in zip(online_args, offline_args):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * np.abs(b).max())


def test_keep_every_keeps_multiples_for_good(tmp_path):
    """--keep-ckpts 1 --keep-every 4: step 4 survives beside the newest; 2 and 6 are rolled away in
    turn."""
    run_dir = train.main(train.parse_args([
        *TRAIN, "--out", str(tmp_path), "--align", "none", "--max-steps", "8", "--keep-ckpts", "1",
        "--keep-every", "4"]))
    assert [os.path.basename(p) for p in runs.checkpoint_paths(run_dir)] == [
        "0000004.pt",
        "0000008.pt",
    ]


@pytest.mark.parametrize("flags, message", [
    (["--keep-every", "-1"], "argument --keep-every: -1 is out of range: it must be at least 0"),
    (["--eval-samples", "3"], "argument --eval-samples: 3 is out of range: it must be at least 4"),
    (["--eval-steps", "0"], "argument --eval-steps: 0 is out of range: it must be at least 1"),
    (["--eval-cfg", "nan"], "argument --eval-cfg: nan is out of range: it must be at least 1"),
])
def test_bad_eval_flag_values_are_one_line_errors(capsys, flags, message):
    assert message in cli_error(capsys, train.parse_args, *TRAIN, *flags)


@pytest.mark.parametrize("flags, message", [
    (["--eval-every", "5"], "--eval-every needs --eval-ref REF.npz"),
    (["--eval-every", "5", "--eval-ref", "REF", "--eval-cfg", "2", "--class-dropout", "0"],
     "needs a null class"),
    (["--eval-every", "5", "--eval-ref", "REF", "--vae", "none"], "give a --vae, not none"),
])
def test_bad_eval_flags_are_one_line_errors(tmp_path, flags, message):
    """train.py's --eval-* flags are checked before anything is built."""
    (tmp_path / "ref.npz").write_bytes(b"")
    flags = [str(tmp_path / "ref.npz") if f == "REF" else f for f in flags]
    with pytest.raises(SystemExit, match=message) as e:
        train.main(train.parse_args([*TRAIN, "--out", str(tmp_path / "runs"), *flags]))
    assert str(e.value).startswith("train.py: error: ") and "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()  # refused before anything was written


@pytest.mark.slow
def test_online_eval_on_two_processes_equals_one(tmp_path):
    """torchrun with 2 gloo ranks (each samples and embeds half) scores as one process does
    (--ema-decay 1: the same EMA, the initial weights)."""
    weights = str(tmp_path / "inception.pth")
    torch.save(random_inception(fid.FIDInception(), seed=0).state_dict(), weights)
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    flags = [
        *TRAIN, "--align", "none", "--ema-decay", "1", "--eval-every", "2", "--eval-ref", ref,
        "--eval-samples", "5", "--eval-steps", "3", "--eval-weights", weights,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(ROOT, "train.py"), *flags, "--out", str(tmp_path / "two"),
        ],
        check=True, env=env, capture_output=True,
    )
    one = train.main(train.parse_args([*flags, "--out", str(tmp_path / "one")]))
    rows = {}
    for name, run_dir in (
        ("one", one),
        ("two", one.replace(str(tmp_path / "one"), str(tmp_path / "two"))),
    ):
        rows[name] = [
            json.loads(line)
            for line in open(os.path.join(run_dir, "metrics.jsonl"))
            if '"fid"' in line
        ]
    assert len(rows["one"]) == len(rows["two"]) == 1 and rows["one"][0]["fid"] > 1
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert rows["two"][0][key] == pytest.approx(rows["one"][0][key], rel=1e-6), key
