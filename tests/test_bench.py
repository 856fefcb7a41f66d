"""bench.py: a one-step run of every preset prints a row each, with vanilla SiT as the reference;
--gpu's prepared run on CPU at tiny sizes; --fid times fid.py."""

import itertools
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

import bench
from cluster import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --gpu at the smallest sizes on the CPU: doubling the batch from 2 stops at --max-batch 4
TINY = ["--device", "cpu", "--model", "SiT-T/2", "--resolution", "32", "--batch-size", "2",
        "--max-batch", "4", "--encoder", "tiny-random", "--warmup", "0", "--steps", "1",
        "--sample-steps", "1", "--sample-batch", "1", "--fid-images", "2", "--fid-batch", "2",
        "--threads", "1", "--mmdit-model", "MMDiT-T"]
PRESETS, PRECISIONS = bench.GPU_PRESETS.split(","), ["bf16", "fp16"]
CONFIGS = set(itertools.product(PRESETS, PRECISIONS, (0, 1), ("paper", "largest")))
# bench.py as a script with what the GPU machine's image lacks unimportable, and torch.compile on
# its eager backend: the --compile 1 path through dynamo without minutes of CPU inductor builds
SCRIPT = """import functools, runpy, sys, torch
for name in ("diffusers", "matplotlib", "tensorboard", "torch.utils.tensorboard", "transformers"):
    sys.modules[name] = None  # import name: ImportError
torch.compile = functools.partial(torch.compile, backend="eager")
sys.argv[0] = "bench.py"
runpy.run_path("bench.py", run_name="__main__")
"""


def table_rows(markdown, section):
    """The body rows of the markdown table under '## section' as lists of cells."""
    lines = markdown.split(f"## {section}", 1)[1].split("\n## ", 1)[0].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines
            if line.startswith("| ")][2:]  # header and rule dropped


@pytest.mark.slow
def test_one_step_table(capsys):
    """SiT-T/2 at 32 px, one timed step: a row per preset, none's ratios 1.00, FLOPs counted, both
    sampler rows."""
    args = bench.parse_args([
        "--model", "SiT-T/2", "--resolution", "32", "--batch-size", "2", "--encoder", "tiny-random",
        "--warmup", "0", "--steps", "1", "--sample-steps", "1", "--sample-batch", "1"])
    header, rows, sampler = bench.main(args)
    assert [r[0] for r in rows] == ["none", "repa", "sara", "sra", "sra2", "repa+sra2",
                                    "sara+sra2"]
    # none against itself, every column
    assert {c for h, c in zip(header, rows[0]) if h == "x none"} == {"1.00"}
    flops = {r[0]: float(r[header.index("GFLOP/step")]) for r in rows}
    assert (
        0 < flops["none"] < flops["sra2"] < flops["repa+sra2"]
        and flops["repa"] < flops["repa+sra2"]
        and flops["none"] < flops["sra"]  # its head and the EMA teacher's forward to block 3
    )  # heads cost
    assert [s["cfg"] for s in sampler] == [1.0, 1.8] and all(
        s["samples_per_sec"] > 0 for s in sampler
    )
    out = capsys.readouterr().out
    assert "RANDOM:" in out and "tiny-random" in out


def test_encoder_costs(capsys):
    """--encoder-costs: one row per encoder with FLOPs and time ratios against the SiT step it is
    given."""
    args = bench.parse_args(
        ["--batch-size", "1", "--steps", "1", "--encoder-costs", "tiny-random,dinov2-vit-s"]
    )
    step = dict(preset="none", flops=1e9, sec=0.5, cpu=0.5)
    rows = bench.print_encoder_costs(args, step)
    assert [r[0] for r in rows] == ["tiny-random", "dinov2-vit-s"]
    tiny, vit_s = rows
    # M params: a 16x16 conv + LayerNorm; DINOv2 ViT-S/14 (22M)
    assert tiny[1] == "0" and vit_s[1] == "22"
    # ViT-S/14 at 224 px, 2 FLOPs per multiply-add: 12 blocks of 12 D^2 weights x 257
    # tokens, QK^T and AV over 257^2 x D, the 14x14 patch embedding of 256 patches; the
    # heads are a no-op (num_classes=0)
    d, n = 384, 257
    gflop = 2 * (12 * (12 * d * d * n + 2 * n * n * d) + 256 * 3 * 14 * 14 * d) / 1e9  # 12.24
    # x step: against 1 GFLOP
    assert abs(float(vit_s[2]) - gflop) < 0.05 and abs(float(vit_s[3]) - gflop) < 0.05
    assert abs(float(vit_s[5]) - float(vit_s[4]) / 500) < 0.01  # ms against the 0.5 s step
    assert "encoder forward" in capsys.readouterr().out
    assert bench.encoder_cost_names("all")[:3] == ["dinov2-vit-b", "dinov2-vit-l", "dinov2-vit-g"]
    assert len(bench.encoder_cost_names("all")) == 8


@pytest.mark.slow
def test_fid_tables(capsys):
    """--fid on tiny statistics: every route gives the same FID, ratios against torch-fidelity, both
    eval sizes."""
    args = bench.parse_args([
        "--fid", "--fid-dim", "64", "--fid-stats-rows", "300", "--fid-repeats", "1",
        "--fid-images", "2", "--fid-batch", "2", "--fid-pr-rows", "16", "--threads", "1"])
    stats_rows, eval_rows = bench.fid_bench(args)
    names = [r[0] for r in stats_rows]
    assert names[:3] == ["fid.py eigh, reference factor cached", "fid.py eigh (default)",
                         "fid.py sqrtm (ADM's exact route)"]
    assert len({round(float(r[3]), 6) for r in stats_rows}) == 1 and all(
        float(r[4]) < 1e-9 for r in stats_rows
    )
    # torch-fidelity installed: the ratio column is its seconds over each route's
    if len(names) == 4:
        assert names[3].startswith("torch-fidelity") and stats_rows[3][2] == "1.00"
    assert [r[0] for r in eval_rows] == ["10000 samples", "50000 samples"]
    assert float(eval_rows[1][-1]) > float(eval_rows[0][-1]) > 0
    assert "EXTRAPOLATED" in capsys.readouterr().out


def test_gpu_mode_refuses_an_unwritable_out_dir_before_measuring(tmp_path):
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(UserError, match=r"file is not a folder \(a file is in the way\)"):
        bench.gpu_bench(bench.parse_args(["--gpu", str(tmp_path / "file")]))


@pytest.mark.slow
def test_gpu_mode_on_cpu(tmp_path):
    """--gpu forced to the CPU, without diffusers, matplotlib, tensorboard or transformers: every
    configuration measured with consistent numbers in results.json and table.md, none's ratio 1,
    the papers' ratios beside."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "--gpu", str(out), *TINY], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    rows = report["training"]
    assert len(rows) == len(CONFIGS) == 40
    assert {(r["preset"], r["precision"], r["compile"], r["batch_kind"]) for r in rows} == CONFIGS
    for r in rows:
        assert r["status"] == "ok" and r["batch"] == (2 if r["batch_kind"] == "paper" else 4)
        assert r["sec"] == statistics.median(r["step_secs"]) > 0
        assert r["img_per_sec"] == pytest.approx(r["batch"] / r["sec"])
        assert r["mfu"] == pytest.approx(r["flops"] / r["sec"] / 790e12) and r["flops"] > 0
        # bytes; on CPU an RSS difference in one process (freed pages are reused), of any sign
        assert isinstance(r["peak_mem_bytes"], int) and r["bad_steps"] == 0
        assert (r["x_none"] == 1.0) == (r["preset"] == "none") and r["x_none"] > 0
        assert r["paper_x_none"] == {"repa": 1.22, "sra": 1.37, "sra2": 1.11}.get(r["preset"])
    per_image = {r["preset"]: r["flops"] / r["batch"] for r in rows}  # the same at every batch
    assert len({round(r["flops"] / r["batch"] / per_image[r["preset"]], 9) for r in rows}) == 1
    assert per_image["none"] < per_image["sra2"] < per_image["repa+sra2"]
    assert per_image["repa"] < per_image["repa+sra2"]  # heads cost
    mmdit = report["mmdit"]  # text-to-image, bf16 eager at the paper batch
    assert [(r["model"], r["preset"], r["status"], r["batch"]) for r in mmdit] == [
        ("MMDiT-T", p, "ok", 2) for p in bench.MMDIT_ALIGN]
    mm_image = {r["preset"]: r["flops"] / r["batch"] for r in mmdit}
    assert mm_image["none"] < min(mm_image["sra2"], mm_image["repa"], mm_image["sra"])
    assert [r["x_none"] == 1.0 for r in mmdit] == [True] + [False] * (len(mmdit) - 1)
    assert all(r["paper_x_none"] is None for r in mmdit)
    parts = report["parts"]
    assert [p["part"] for p in parts["rows"]] == ["encoder", "SiT forward+backward",
                                                  "discriminator step", "AdamW step", "EMA"]
    assert parts["step_sec"] > 0 and all(p["sec"] > 0 for p in parts["rows"])
    assert [s["cfg"] for s in report["sampler"]["rows"]] == [1.0, 1.8]
    assert all(s["samples_per_sec"] > 0 for s in report["sampler"]["rows"])
    assert report["inception"]["img_per_sec"] > 0 and report["inception"]["images"] == 2
    env = report["environment"]
    assert env["device"].startswith("CPU") and env["torch"] == torch.__version__ and env["date"]

    markdown = (out / "table.md").read_text()
    assert "RANDOM" in markdown and "SRA^2 Table 5" in markdown
    table = table_rows(markdown, "Training step")
    assert len(table) == 40 and {tuple(r[:3]) for r in table} == {
        (p, q, str(c)) for p, q, c, _ in CONFIGS}
    for cells, r in zip(table, rows):  # in results.json's order
        assert cells[4] == f"{r['sec'] * 1e3:.1f}" and cells[9] == f"{r['x_none']:.2f}"
        assert cells[-1] == "ok"
        assert cells[3].endswith("(largest)") == (r["batch_kind"] == "largest")
    assert [r[0] for r in table_rows(markdown, "Parts")] == [p["part"] for p in parts["rows"]]
    assert len(table_rows(markdown, "Sampler")) == 2 and "images/s" in markdown
    assert [r[0] for r in table_rows(markdown, "Text-to-image")] == list(bench.MMDIT_ALIGN)


def test_gpu_mode_budget_spent(tmp_path):
    """--budget 0: every configuration and section is recorded as skipped, both files written."""
    report = bench.gpu_bench(bench.parse_args(["--gpu", str(tmp_path), *TINY, "--budget", "0"]))
    rows = report["training"]
    assert {(r["preset"], r["precision"], r["compile"], r["batch_kind"]) for r in rows} == CONFIGS
    assert {r["status"] for r in rows + report["mmdit"]} == {"skipped (time budget)"}
    assert all(r["x_none"] is None for r in rows)
    assert {report[k]["status"] for k in ("parts", "sampler", "inception")} == {
        "skipped (time budget)"}
    assert json.loads((tmp_path / "results.json").read_text())["training"] == rows
    table = table_rows((tmp_path / "table.md").read_text(), "Training step")
    assert len(table) == 40 and {r[-1] for r in table} == {"skipped (time budget)"}


def test_largest_batch_and_budget(monkeypatch):
    """The doubling search keeps the last batch before the first out-of-memory error, stops at
    --max-batch, gives None when the first fails; Budget turns failures into statuses."""
    real_step = bench.train.train_step
    limit = {}

    def step(run, config, align, batch, *rest):
        if len(batch[0]) > limit["fits"]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(run, config, align, batch, *rest)

    monkeypatch.setattr(bench.train, "train_step", step)
    args = bench.parse_args([*TINY, "--batch-size", "1", "--max-batch", "16"])
    for fits, largest in [(5, 4), (100, 16), (0, None)]:
        limit["fits"] = fits
        assert bench.largest_batch(args, "none", "bf16") == largest

    budget = bench.Budget(120)

    def fail(error):
        raise error

    assert budget.run("eager", fail, torch.OutOfMemoryError("out of memory")) == "oom"
    assert budget.run("eager", fail, ValueError("bad\nmore")) == "error: ValueError: bad"
    assert budget.run("eager", lambda: 7) == 7
    # a first compile is assumed to take FIRST_COMPILE_S (90 s): it fits in 120 s ...
    assert budget.run("compile", lambda: 7) == 7
    budget.longest["compile"] = 121  # ... one that took 121 s does not

    assert budget.run("compile", lambda: 7) == "skipped (time budget)"


def test_mmdit_costs():
    """MMDiT depth 24 on the meta device: REPA's T2I model's 512.4M params and 124.7 GFLOPs forward
    per image with the projector (the t2i-model count on REPA's own code), none < sra2 < repa's
    projector head cost ordering, and a step near 3 forwards; MMDiT-T far below."""
    rows = {a: bench.mmdit_cost("MMDiT", a) for a in bench.MMDIT_ALIGN}
    assert rows["repa"]["params"] == 512_415_504
    assert rows["repa"]["forward"] / 1e9 == pytest.approx(124.7, rel=0.02)
    assert rows["none"]["forward"] / 1e9 == pytest.approx(120.9, rel=0.02)
    assert rows["none"]["forward"] < min(rows[a]["forward"] for a in ("repa", "sra", "sra2"))
    for r in rows.values():
        assert 2.5 < r["step"] / r["forward"] < 3.5
    tiny = bench.mmdit_cost("MMDiT-T", "repa", resolution=64)
    assert 0 < tiny["forward"] < rows["repa"]["forward"] / 100
    header, table, _ = bench.mmdit_table(bench.parse_args(["--device", "cpu"]))
    n = len(bench.MMDIT_ALIGN)
    assert [r[0] for r in table][:n] == list(bench.MMDIT_ALIGN) and "CLIP" in table[n][0]
