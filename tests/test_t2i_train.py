"""train.py on the COCO layout: an MMDiT trains on caption features with the ImageNet code path
(Table 4's rows, caption dropout, exact resume, preemption, DDP, online evaluation), its checkpoint
samples with sample.py --prompt, and bad input is one line. Tiny MMDiT, tiny random text encoder."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_coco import write_coco
from test_train import ROOT, assert_same_state, newest

import data
import encoders
import fid
import losses
import mmdit
import runs
import sample
import train
from cluster import UserError
from helpers import random_inception

TEXT = encoders.TINY_RANDOM  # the data's text encoder (32-wide features)
# 8 train images (a global batch of 4 fits twice), 2 val images, 2 to 3 captions each
TRAIN = {100 + i: ((40 + 3 * i, 36 + 2 * i), [f"train {i} caption {k}" for k in range(2 + i % 2)])
         for i in range(8)}
VAL = {200 + i: ((48, 40), [f"a val photo {i}", f"val image {i}"]) for i in range(2)}
FLAGS = ["--preset", "smoke", "--model", "MMDiT-T", "--resolution", "32", "--batch-size", "4",
         "--projector-dim", "32", "--sample-every", "0", "--log-every", "2", "--ckpt-every", "2",
         "--align", "none"]  # later flags override


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A tiny COCO layout made by data.py (32 px, tiny random VAE and text encoder)."""
    root = tmp_path_factory.mktemp("coco")
    source = write_coco(root / "src", (("train", TRAIN), ("val", VAL)))
    data.main(data.parse_args(["--dataset", "coco", "--source", source, "--dest",
                               str(root / "data"), "--resolution", "32", "--vae", TEXT,
                               "--text-encoder", TEXT, "--workers", "0", "--batch-size", "4"]))
    return str(root / "data")


def run(out, coco, *flags):
    """train.py in this process on the COCO folder; returns the run folder."""
    return train.main(train.parse_args([*FLAGS, "--data-dir", coco, "--out", str(out), *flags]))


def rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


# ----------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("align", ["none", "repa", "sra", "sra2"])
def test_table4_rows_train_an_mmdit_on_caption_features(tmp_path, coco, align):
    """MMDiT / +REPA / +SRA / +SRA^2: the same loss terms as on ImageNet; the checkpoint says it
    is text-to-image (its text encoder, MMDiT's config); only +REPA loads an encoder."""
    run_dir = run(tmp_path, coco, "--align", align, "--max-steps", "2")
    ckpt = newest(run_dir)
    config = ckpt["config"]
    assert runs.text_encoder_of(ckpt) == TEXT and config["model"] == "MMDiT-T"
    assert config["model_config"]["context_dim"] == 32  # the tiny text encoder's width
    assert any(k.startswith("joint_blocks.") for k in ckpt["ema"])  # REPA's MMDiT keys
    expected = {"none": {"velocity"}, "repa": {"velocity", "patch"}, "sra": {"velocity", "self"},
                "sra2": {"velocity", "sra"}}
    terms = {"velocity", "patch", "struc", "adv", "sra", "self"}
    assert terms & set(rows(run_dir)[0]) == expected[align]
    assert ("encoder (tiny-random)" in config["random_components"]) == (align == "repa")
    assert "text features (tiny-random text encoder)" in config["random_components"]
    assert np.isfinite(rows(run_dir)[-1]["velocity"])


def test_the_training_forward_sees_the_null_caption_at_the_dropout_rate(tmp_path, coco,
                                                                        monkeypatch):
    """Through train.py: the model's null context is the data's empty caption, the drop mask is
    the step's draw_noise one (a function of the seed: all at 0.99 here, none at 0), and the
    training forward swaps exactly the dropped rows."""
    seen = []
    real = mmdit.MMDiT.forward

    def recording(self, x, t, context, align=True, drop=None):
        seen.append((context, drop, self.null_condition(context)))
        return real(self, x, t, context, align, drop)

    monkeypatch.setattr(mmdit.MMDiT, "forward", recording)
    run(tmp_path / "a", coco, "--max-steps", "1", "--class-dropout", "0.99")
    run(tmp_path / "b", coco, "--max-steps", "1", "--class-dropout", "0")
    null = torch.from_numpy(np.load(os.path.join(coco, "empty_context.npy")))
    (context, drop, nulls), (kept, none, _) = seen
    assert torch.equal(nulls[0], null) and drop.all() and not none.any()
    assert not torch.equal(kept[0], null)  # real captions when nothing is dropped
    align = losses.align_config("none")
    draws = [losses.draw_noise(1000, (4, 2, 2), align, 0.1, generator=torch.Generator()
                               .manual_seed(0)).drop for _ in range(2)]
    assert torch.equal(*draws) and 70 < int(draws[0].sum()) < 130  # 10% of 1000, seeded


@pytest.mark.slow
def test_text_run_resumes_exactly_and_after_a_preemption(tmp_path, coco, monkeypatch):
    """2 + 2 steps (a checkpoint between) and a SIGTERM after step 1 equal 4 steps straight."""
    flags = ["--align", "repa+sra2", "--max-steps", "4", "--precision", "bf16"]
    straight = newest(run(tmp_path / "a", coco, *flags))
    run(tmp_path / "b", coco, *flags[:-4], "--max-steps", "2", "--precision", "bf16")
    assert_same_state(straight, newest(run(tmp_path / "b", coco, *flags)))
    real, calls = train.train_step, []

    def signalled(*args):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 1
        return real(*args)

    monkeypatch.setattr(train, "train_step", signalled)
    preempted = run(tmp_path / "c", coco, *flags)
    assert newest(preempted)["step"] == 1
    preempted_config = newest(preempted)["config"]
    monkeypatch.setattr(train, "train_step", real)
    resumed = newest(run(tmp_path / "c", coco, *flags))
    assert_same_state(straight, resumed)
    # the unset sampler flags resolve to the preset's on resume as at the start
    assert {k: resumed["config"][k] for k in ("sample_steps", "eval_steps", "eval_cfg")} == dict(
        sample_steps=10, eval_steps=250, eval_cfg=1.0) == {
            k: preempted_config[k] for k in ("sample_steps", "eval_steps", "eval_cfg")}


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path, coco):
    flags = [*FLAGS, "--data-dir", coco, "--align", "repa", "--max-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29531", os.path.join(ROOT, "train.py"), *flags, "--out",
                           str(tmp_path / "ddp")], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    one = run(tmp_path / "one", coco, "--align", "repa", "--max-steps", "2")
    a, b = newest(one), newest(os.path.join(tmp_path / "ddp", os.path.basename(one)))
    assert b["config"]["world_size"] == 2 and a["step"] == b["step"] == 2
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=1e-5, rtol=1e-4), k


@pytest.mark.slow
def test_online_eval_samples_the_val_captions_with_the_ode(tmp_path, coco, monkeypatch):
    """--eval-every on a text run: fid.py's numbers of the EMA's ODE samples of the val split's
    captions (each val image's fixed caption), as one metrics row."""
    weights = str(tmp_path / "inception.pth")
    torch.save(random_inception(fid.FIDInception(), seed=0).state_dict(), weights)
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), np.uint8))
    seen, real = [], sample.generate_images

    def recording(model, vae, indices, **sampling):
        seen.append((list(indices), sampling))
        return real(model, vae, indices, **sampling)

    monkeypatch.setattr(sample, "generate_images", recording)
    run_dir = run(tmp_path, coco, "--align", "none", "--max-steps", "2", "--eval-every", "2",
                  "--eval-ref", ref, "--eval-samples", "4", "--eval-steps", "2", "--eval-cfg",
                  "2", "--eval-weights", weights)
    evals = [r for r in rows(run_dir) if "fid" in r]
    assert [r["step"] for r in evals] == [2] and np.isfinite(evals[0]["fid"])
    (indices, sampling), = seen
    assert indices == [0, 1, 2, 3] and sampling["mode"] == "ode" and sampling["cfg"] == 2
    val = data.CocoDataset(coco, "val", seed=0)
    y, null = sampling["prompts"].context([0, 3], "cpu")
    assert torch.equal(y[1], val[1][2]) and torch.equal(null[0], val.null_context)


# ----------------------------------------------------------------------------------------------
# Sampling the run, bad input


def test_sample_py_prompt_on_the_smoke_checkpoint(tmp_path, coco):
    """python sample.py --ckpt RUN --prompt 'a red bus': the grid of the run's EMA, the run's text
    encoder and VAE, Table 4's ODE with guidance 2.0."""
    run_dir = run(tmp_path, coco, "--align", "sra2", "--max-steps", "2", "--lr", "0.01",
                  "--sample-every", "2", "--sample-steps", "2")
    assert Image.open(os.path.join(run_dir, "samples", "0000002.png")).size == (4 * 32, 4 * 32)
    out = str(tmp_path / "bus.png")
    sample.main(sample.parse_args(["--ckpt", run_dir, "--prompt", "a red bus", "--prompt",
                                   "two dogs", "--out", out]))
    grid = np.asarray(Image.open(out))
    model = runs.load_model(runs.checkpoint_paths(run_dir)[-1])
    prompts = sample.Prompts(encoders.load_text_encoder(name=TEXT), ["a red bus", "two dogs"])
    expected = sample.generate_images(model, encoders.load_vae("tiny-random"), [0, 1],
                                      prompts=prompts, mode="ode", num_steps=50, cfg=2.0)
    assert np.array_equal(grid, sample.tile(expected))
    assert not np.array_equal(expected[0], expected[1])  # the caption conditions


def test_coco256_is_repas_train_t2i_protocol():
    """--preset coco256: REPA's train_t2i.py (MMDiT depth 24, batch 256, AdamW 1e-4, fp16, DINOv2-B
    at block 8 with weight 0.5, 10% caption dropout, ckpt every 50K) for SRA^2's 150K steps."""
    config = train.resolve_config(train.parse_args(["--preset", "coco256", "--align", "repa"]))
    assert {k: config[k] for k in ("model", "batch_size", "max_steps", "lr", "precision",
                                   "enc_type", "encoder_depth", "class_dropout", "ckpt_every",
                                   "text_encoder", "weight_decay", "max_grad_norm")} == dict(
        model="MMDiT", batch_size=256, max_steps=150_000, lr=1e-4, precision="fp16",
        enc_type="dinov2-vit-b", encoder_depth=8, class_dropout=0.1, ckpt_every=50_000,
        text_encoder=encoders.CLIP_TEXT, weight_decay=0.0, max_grad_norm=1.0)
    assert runs.model_size("MMDiT")["depth"] == 24 and config["align_config"]["patch_weight"] == 0.5
    assert config["run_name"] == "coco256-repa-MMDiT"
    sra2 = train.resolve_config(train.parse_args(["--preset", "coco256", "--align", "sra2"]))
    assert sra2["sra_depth"] == 8 and sra2["align_config"]["sra_weight"] == 1.0


def test_sampler_defaults_follow_the_preset():
    """Unset, --eval-steps / --eval-cfg / --sample-steps are the preset's: coco256 Table 4's 50
    steps and guidance 2.0 (SRA^2 Table 4), imagenet256 SARA's 250 steps unguided; a typed value
    wins, stays out of the run name, and a resume without the flags changes nothing."""
    def config(*argv):
        return train.resolve_config(train.parse_args(["--align", "repa", *argv]))

    def sampler(c):
        return c["sample_steps"], c["eval_steps"], c["eval_cfg"]

    coco = config("--preset", "coco256")
    assert sampler(coco) == (50, 50, 2.0)
    assert sampler(config("--preset", "imagenet256")) == (250, 250, 1.0)
    typed = config("--preset", "coco256", "--eval-steps", "7", "--eval-cfg", "1.5")
    assert sampler(typed) == (50, 7, 1.5) and typed["run_name"] == coco["run_name"]
    again = config("--preset", "coco256", "--max-steps", "9")
    assert runs.changed_flag(coco, again, ()) == (None, 0) and sampler(again) == sampler(coco)


def test_bad_input_is_one_line(tmp_path, coco):
    """Data of another text encoder than the run expects, a model of the other kind, resuming a
    checkpoint of the other kind, --text-encoder on class data, resuming on another encoder's
    features, --eval-every without a val split."""
    with pytest.raises(SystemExit, match=f"made with text_encoder '{TEXT}' but the run expects "
                                         "'openai/clip-vit-large-patch14'"):
        run(tmp_path, coco, "--text-encoder", "openai/clip-vit-large-patch14")
    with pytest.raises(SystemExit, match="holds COCO captions: train an MMDiT"):
        run(tmp_path, coco, "--model", "SiT-T/2")
    with pytest.raises(SystemExit, match="holds class labels: train a SiT"):
        run(tmp_path, "synthetic", "--synthetic-images", "8")
    with pytest.raises(SystemExit, match="needs COCO caption features"):
        run(tmp_path, "synthetic", "--model", "SiT-T/2", "--text-encoder", TEXT)
    run(tmp_path, "synthetic", "--model", "SiT-T/2", "--max-steps", "2", "--run-name", "x")
    with pytest.raises(SystemExit, match="is a class-conditional checkpoint but this run trains "
                                         "text-to-image"):
        run(tmp_path, coco, "--run-name", "x", "--max-steps", "2")
    run(tmp_path, coco, "--max-steps", "2", "--run-name", "y")
    other = shutil.copytree(coco, tmp_path / "other")  # the same data said to be another encoder's
    meta = json.loads((other / "dataset.json").read_text())
    (other / "dataset.json").write_text(json.dumps({**meta, "text_encoder": "another"}))
    with pytest.raises(SystemExit, match="trained on 'tiny-random' text features but .* holds "
                                         "'another' ones"):
        run(tmp_path, str(other), "--max-steps", "4", "--run-name", "y")
    with pytest.raises(SystemExit, match="is a text-to-image checkpoint but this run trains "
                                         "class-conditional"):
        run(tmp_path, "synthetic", "--model", "SiT-T/2", "--run-name", "y", "--max-steps", "2")
    shutil.rmtree(other / "val")
    config = dict(data_dir=str(other), eval_every=2, seed=0)
    with pytest.raises(UserError, match="--eval-every scores val captions, but .* has no val"):
        data.sampling_condition(config, data.CocoDataset(str(other)))
    grid = data.sampling_condition({**config, "eval_every": 0}, data.CocoDataset(str(other)))
    assert grid["prompts"].dataset.folder.endswith("train")  # grids fall back to train captions
