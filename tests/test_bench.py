"""bench.py: a one-step run of every preset prints a row each, with vanilla SiT as the reference."""

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
