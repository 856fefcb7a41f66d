"""bench.py: a one-step run of every preset prints a row each, with vanilla SiT as the reference; --fid times fid.py."""

import pytest

import bench


def test_one_step_table(capsys):
    """SiT-T/2 at 32 px, one timed step: six rows, none's ratios 1.00, FLOPs counted, both sampler rows."""
    args = bench.parse_args(["--model", "SiT-T/2", "--resolution", "32", "--batch-size", "2", "--encoder", "tiny-random",
                             "--warmup", "0", "--steps", "1", "--sample-steps", "1", "--sample-batch", "1"])
    header, rows, sampler = bench.main(args)
    assert [r[0] for r in rows] == ["none", "repa", "sara", "sra2", "repa+sra2", "sara+sra2"]
    assert {c for h, c in zip(header, rows[0]) if h == "x none"} == {"1.00"}  # none against itself, every column
    flops = {r[0]: float(r[header.index("GFLOP/step")]) for r in rows}
    assert 0 < flops["none"] < flops["sra2"] < flops["repa+sra2"] and flops["repa"] < flops["repa+sra2"]  # heads cost
    assert [s["cfg"] for s in sampler] == [1.0, 1.8] and all(s["samples_per_sec"] > 0 for s in sampler)
    out = capsys.readouterr().out
    assert "RANDOM:" in out and "tiny-random" in out


@pytest.mark.slow
def test_fid_tables(capsys):
    """--fid on tiny statistics: every route gives the same FID, ratios against torch-fidelity, both eval sizes."""
    args = bench.parse_args(["--fid", "--fid-dim", "64", "--fid-stats-rows", "300", "--fid-repeats", "1",
                             "--fid-images", "2", "--fid-batch", "2", "--fid-pr-rows", "16", "--threads", "1"])
    stats_rows, eval_rows = bench.fid_bench(args)
    names = [r[0] for r in stats_rows]
    assert names[:3] == ["fid.py eigh, reference factor cached", "fid.py eigh (default)",
                         "fid.py sqrtm (ADM's exact route)"]
    assert len({round(float(r[3]), 6) for r in stats_rows}) == 1 and all(float(r[4]) < 1e-9 for r in stats_rows)
    if len(names) == 4:  # torch-fidelity installed: the ratio column is its seconds over each route's
        assert names[3].startswith("torch-fidelity") and stats_rows[3][2] == "1.00"
    assert [r[0] for r in eval_rows] == ["10000 samples", "50000 samples"]
    assert float(eval_rows[1][-1]) > float(eval_rows[0][-1]) > 0
    assert "EXTRAPOLATED" in capsys.readouterr().out
