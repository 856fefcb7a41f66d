"""bench.py: a one-step run of every preset prints a row each, with vanilla SiT as the reference;
--fid times fid.py."""

import pytest

import bench


def test_one_step_table(capsys):
    """SiT-T/2 at 32 px, one timed step: six rows, none's ratios 1.00, FLOPs counted, both sampler
    rows."""
    args = bench.parse_args(
        [
            "--model", "SiT-T/2", "--resolution", "32", "--batch-size", "2", "--encoder",
            "tiny-random", "--warmup", "0", "--steps", "1", "--sample-steps", "1", "--sample-batch",
            "1",
        ]
    )
    header, rows, sampler = bench.main(args)
    assert [r[0] for r in rows] == ["none", "repa", "sara", "sra2", "repa+sra2", "sara+sra2"]
    # none against itself, every column
    assert {c for h, c in zip(header, rows[0]) if h == "x none"} == {"1.00"}
    flops = {r[0]: float(r[header.index("GFLOP/step")]) for r in rows}
    assert (
        0 < flops["none"] < flops["sra2"] < flops["repa+sra2"]
        and flops["repa"] < flops["repa+sra2"]
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
    # ViT-S/14 at 224 px, 2 FLOPs per multiply-add: 12 blocks of 12 D^2 weights x 257 tokens, QK^T
    # and AV over
    # 257^2 x D, the 14x14 patch embedding of 256 patches; the heads are a no-op (num_classes=0)
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
    args = bench.parse_args(
        [
            "--fid", "--fid-dim", "64", "--fid-stats-rows", "300", "--fid-repeats", "1",
            "--fid-images", "2", "--fid-batch", "2", "--fid-pr-rows", "16", "--threads", "1",
        ]
    )
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
