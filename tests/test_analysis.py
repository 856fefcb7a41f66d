"""analysis.py: CKNNA against closed forms and a brute-force reading of its definition, the linear
probe, the singular-value energy, and a smoke checkpoint producing every figure and the JSON."""

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import analysis
import bench
import runs
import train
from data import SyntheticDataset
from encoders import load_encoders
from helpers import cli_error
from runs import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def brute_force_cknna(x, y, k):
    """CKNNA written from its definition with Python loops: kernels of L2-normalised rows, each
    row's k nearest other rows, the shared-neighbour mask, unbiased HSIC (Song et al. 2012, eq. 5),
    the authors' 1e-6."""
    n = len(x)

    def kernel(f):
        f = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in f.tolist()]
        return [[sum(a * b for a, b in zip(f[i], f[j])) for j in range(n)] for i in range(n)]

    def knn_mask(kern):
        mask = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in sorted((j for j in range(n) if j != i), key=lambda j: -kern[i][j])[:k]:
                mask[i][j] = 1.0
        return mask

    def hsic(a, b):
        a = [[0.0 if i == j else a[i][j] for j in range(n)] for i in range(n)]
        b = [[0.0 if i == j else b[i][j] for j in range(n)] for i in range(n)]
        trace = sum(a[i][j] * b[j][i] for i in range(n) for j in range(n))
        sum_a, sum_b = sum(map(sum, a)), sum(map(sum, b))
        sum_ab = sum(a[i][k] * b[k][j] for i in range(n) for j in range(n) for k in range(n))
        return (trace + sum_a * sum_b / ((n - 1) * (n - 2)) - 2 * sum_ab / (n - 2)) / (n * (n - 3))

    def masked(mask, kern):
        return [[mask[i][j] * kern[i][j] for j in range(n)] for i in range(n)]

    def similarity(kk, ll):
        mk, ml = knn_mask(kk), knn_mask(ll)
        mask = [[mk[i][j] * ml[i][j] for j in range(n)] for i in range(n)]
        return hsic(masked(mask, kk), masked(mask, ll))

    kx, ky = kernel(x), kernel(y)
    return similarity(kx, ky) / (math.sqrt(similarity(kx, kx) * similarity(ky, ky)) + 1e-6)


def related(n, seed=0, dx=12, dy=9):
    """Two float64 feature sets that share part of their structure."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=g, dtype=torch.float64)
    y = torch.cat([x[:, :6] + 0.7 * torch.randn(n, 6, generator=g, dtype=torch.float64),
                   torch.randn(n, dy - 6, generator=g, dtype=torch.float64)], dim=1)
    return x, y


@pytest.mark.parametrize("n,k,block", [(16, 3, 5), (19, 5, 19), (12, 10, 4)])
def test_cknna_matches_brute_force(n, k, block):
    x, y = related(n, seed=n)
    fast = analysis.cknna_from_neighbours(
        analysis.neighbours(x, k, block), analysis.neighbours(y, k, block)
    )
    assert fast == pytest.approx(brute_force_cknna(x, y, k), abs=1e-12)
    assert 0.05 < abs(fast) < 0.999  # a real, non-trivial value was compared


def test_cknna_closed_forms():
    x, y = related(300)
    base = analysis.cknna(x, y)
    # identical: 1 up to the authors' 1e-6
    assert analysis.cknna(x, x) == pytest.approx(1, abs=1e-3)
    assert analysis.cknna(3.7 * x, 0.02 * y) == pytest.approx(base, abs=1e-12)  # isotropic scaling
    q, _ = torch.linalg.qr(
        torch.randn(12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )
    assert analysis.cknna(x @ q, y) == pytest.approx(base, abs=1e-10)  # orthogonal rotation
    noise = torch.randn(300, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    independent = analysis.cknna(x, noise)
    # independent features score near 0, related ones clearly above
    assert abs(independent) < 0.05 < base


def test_neighbours_blockwise_equal_full_topk():
    x, _ = related(50)
    idx, sim = analysis.neighbours(x, 7, block=8)
    full = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
    full.fill_diagonal_(-math.inf)
    ref_sim, ref_idx = full.topk(7, dim=1)
    assert torch.equal(idx, ref_idx) and torch.allclose(sim, ref_sim)
    with pytest.raises(ValueError, match="more than k=10"):
        analysis.neighbours(x[:10], 10)


def test_clamp_outliers_is_the_authors_quantile_clip():
    x = torch.randn(37, 20, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 5, 20)
    clamped, q_val = analysis.clamp_outliers(x, chunk=6)  # chunks of rows give the same value
    # mean over images of each image's quantile
    expected = np.quantile(np.abs(x.numpy()), 0.95, axis=1).mean()
    assert q_val == pytest.approx(expected, rel=1e-6)
    assert torch.equal(clamped, x.clamp(-q_val, q_val)) and (x.abs() > q_val).any()


def test_top_energy_share_from_streamed_gram():
    g = torch.Generator().manual_seed(0)
    # (B, N, D) each
    batches = [torch.randn(3, 5, 8, generator=g) * torch.linspace(3, 0.1, 8) for _ in range(4)]
    gram = sum(analysis.gram(b) for b in batches)  # streamed over batches
    # the stacked (B N, D) matrix
    s = torch.linalg.svdvals(torch.cat([b.flatten(0, 1) for b in batches]).double())
    assert analysis.top_energy_share(gram, top=3) == pytest.approx(
        ((s[:3] ** 2).sum() / (s**2).sum()).item(), rel=1e-6
    )  # fp32 per batch
    assert analysis.top_energy_share(gram, top=8) == pytest.approx(1.0)


def test_linear_probe_separable_vs_random_labels():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 4
    centres = torch.randn(4, 16, generator=g) * 3
    x = centres[labels] + torch.randn(400, 16, generator=g)
    assert analysis.linear_probe(x, labels, 4, epochs=20, batch_size=64) == 1.0
    shuffled = labels[torch.randperm(400, generator=g)]
    assert analysis.linear_probe(x, shuffled, 4, epochs=20, batch_size=64) < 0.5  # chance is 0.25


# ----------------------------------------------------------------------------------------------
# A smoke checkpoint through the whole script


@pytest.fixture(scope="module")
def smoke_ckpt(tmp_path_factory):
    """A 2-step SiT-T/2 + SARA checkpoint of train.py (32 px, tiny random encoder, synthetic data).
    """
    out = tmp_path_factory.mktemp("runs")
    run_dir = train.main(train.parse_args([
        "--preset", "smoke", "--align", "sara", "--max-steps", "2", "--batch-size", "4",
        "--resolution", "32", "--synthetic-images", "16", "--sample-every", "0",
        "--out", str(out)]))
    return runs.checkpoint_paths(run_dir)[-1]


def smoke_args(ckpt, out, *flags):
    return analysis.parse_args([
        "--ckpt", ckpt, "--data-dir", "synthetic", "--num-images", "24", "--t", "0.25", "0.75",
        "--batch-size", "5", "--num-workers", "0", "--probe-epochs", "3", "--figure-images", "2",
        "--out", str(out), *flags])


def test_hooks_capture_the_tap_the_projector_reads(smoke_ckpt):
    model = load_model(smoke_ckpt)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    pooled, kept, zs = analysis.sit_features(
        model, x0, eps, 0.5, torch.tensor([0, 1, 2]), keep={model.encoder_depth}
    )
    assert pooled.shape == (len(model.blocks), 3, model.config["hidden_size"])
    tap = kept[model.encoder_depth]
    # the hook saw the tensor the projector read
    assert torch.allclose(model.projectors[0](tap), zs[0], atol=1e-6)
    assert torch.allclose(pooled[model.encoder_depth - 1], tap.mean(dim=1))


@pytest.fixture(scope="module")
def smoke_run(smoke_ckpt, tmp_path_factory):
    """analysis.py on the smoke checkpoint in one process: (returned dict, output folder)."""
    out = tmp_path_factory.mktemp("analysis")
    return analysis.main(smoke_args(smoke_ckpt, out, "--keep-features", "1")), out


@pytest.mark.slow
def test_smoke_checkpoint_writes_every_figure_and_number(smoke_run):
    result, tmp_path = smoke_run
    for name in ("cknna", "linear_probe", "sara_fig2a", "sara_fig2b", "sra2_fig2"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved == json.loads(json.dumps(result))
    depth = saved["model_config"]["depth"]
    for t in ("0.25", "0.75"):
        scores = saved["cknna"][t]["blocks"] + [saved["cknna"][t]["projector"]]
        assert len(scores) == depth + 1 and all(-1 <= s <= 1 for s in scores)
        assert all(0 <= a <= 1 for a in saved["linear_probe"][t]["blocks"])
    assert saved["cknna_ceiling"] == pytest.approx(1, abs=1e-3)
    assert set(saved["svd_energy"]) == {
        "encoder", "tap_t0.25", "tap_t0.75", "projector_t0.25", "projector_t0.75",
    }
    assert {"data (synthetic)", "encoder (tiny-random)"} <= set(saved["random_components"])
    assert set(saved["pca_explained_variance"]) == {"vae", "0.25", "0.75"}
    # The stored rows are the images they claim to be: row i holds image i's
    # mean-pooled encoder tokens.
    encoder = load_encoders("tiny-random", "cpu", 32)[0]
    dataset = SyntheticDataset(24, 10, 32)
    stored = np.load(tmp_path / "features" / "encoder.npy")
    for i in (0, 7, 23):
        assert np.allclose(
            stored[i], encoder(dataset[i][0][None]).mean(dim=1)[0].numpy(), atol=1e-6
        )
    assert np.array_equal(np.load(tmp_path / "features" / "labels.npy"), np.arange(24) % 10)


def test_official_repa_checkpoint_names_its_encoder_and_path(smoke_ckpt, tmp_path):
    """REPA's {model, ema, opt, args, steps} file: encoder and interpolant come from its argparse
    args."""
    ema = torch.load(smoke_ckpt, weights_only=True)["ema"]
    repa_args = argparse.Namespace(
        model="SiT-T/2", enc_type="tiny-random", path_type="linear", encoder_depth=2
    )
    path = tmp_path / "repa.pt"
    torch.save({"model": ema, "ema": ema, "opt": {}, "args": repa_args, "steps": 2}, path)
    args = smoke_args(str(path), tmp_path)
    model, encoder, _, random_parts = analysis.setup(args, torch.device("cpu"))
    assert (args.enc_type, args.path_type, args.projector, model.encoder_depth) == (
        "tiny-random", "linear", 0, 2,
    )
    assert (
        encoder.embed_dim == model.config["z_dims"][0] and "encoder (tiny-random)" in random_parts
    )


def leaves(tree, prefix=""):
    """A nested dict / list of numbers as one flat {path: number} dict (for pytest.approx)."""
    if isinstance(tree, (dict, list)):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        return {k: v for key, sub in items for k, v in leaves(sub, f"{prefix}/{key}").items()}
    return {prefix: tree}


@pytest.mark.slow
def test_torchrun_shards_give_the_same_numbers(smoke_ckpt, smoke_run, tmp_path):
    """Two CPU ranks (gloo) write disjoint rows of the same features: every metric equals the
    one-process run."""
    single = smoke_run[0]
    flags = [
        str(a)
        for a in [
            "--ckpt", smoke_ckpt, "--data-dir", "synthetic", "--num-images", "24", "--t", "0.25",
            "0.75", "--batch-size", "5", "--num-workers", "0", "--probe-epochs", "3",
            "--figure-images", "2", "--out",
            tmp_path / "two",
        ]
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "analysis.py",
            *flags,
        ],
        cwd=ROOT, env=env, check=True, capture_output=True,
    )
    sharded = json.loads((tmp_path / "two" / "analysis.json").read_text())
    assert sharded["world_size"] == 2
    # A rank embeds its batches with fewer rows, and a matmul over another row count may round
    # differently in the last bits (seen on some CPUs: 1e-9 in the projector's CKNNA).
    for key in ("cknna", "linear_probe", "clamp_q_val", "cknna_ceiling"):
        assert leaves(sharded[key]) == pytest.approx(leaves(single[key]), rel=1e-6), key
    # fp32 Gram sums in another order: equal to rounding
    for name, energy in single["svd_energy"].items():
        assert sharded["svd_energy"][name]["spectrum"] == pytest.approx(
            energy["spectrum"], abs=1e-7
        )


@pytest.mark.parametrize("flags,message", [
    (["--t", "1.5"], "--t: 1.5 is out of range: it must be in [0, 1]"),
    (["--num-images", "8"], "--num-images: 8 is out of range: it must be at least 11"),
    (["--probe-holdout", "1"], "--probe-holdout: 1 is out of range: it must be in (0, 1)"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, flags, message):
    assert message in cli_error(capsys, lambda argv: smoke_args("x.pt", tmp_path, *argv), *flags)


def test_bad_checkpoint_and_encoder_are_one_line_errors(smoke_ckpt, tmp_path):
    with pytest.raises(SystemExit, match="analysis.py: error: .*no such checkpoint"):
        analysis.main(smoke_args(str(tmp_path / "missing.pt"), tmp_path))
    with pytest.raises(SystemExit, match="analysis.py: error: --enc-type bogus"):
        analysis.main(smoke_args(smoke_ckpt, tmp_path, "--enc-type", "bogus"))
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(SystemExit, match="analysis.py: error: .*file is not a folder"):
        analysis.main(smoke_args(smoke_ckpt, tmp_path / "file"))  # before any model is built


def test_bench_cknna_rows(capsys):
    rows = bench.cknna_table(bench.parse_args([
        "--cknna-only", "--cknna-samples", "40", "--cknna-blocks", "3", "--cknna-dim", "16",
        "--cknna-enc-dim", "8"]))
    assert [r[0] for r in rows] == [
        "neighbours (encoder, once)", "clamp + neighbours per block", "score per block",
        "all 3 blocks",
    ]
    assert "RANDOM" in capsys.readouterr().out


def test_a_run_folder_means_its_newest_checkpoint(smoke_ckpt, tmp_path):
    """--ckpt RUN_FOLDER, as sample.py takes it: the folder's newest checkpoint is analysed."""
    run_dir = os.path.dirname(os.path.dirname(smoke_ckpt))
    args = smoke_args(run_dir, tmp_path)
    analysis.setup(args, torch.device("cpu"))
    assert args.ckpt == smoke_ckpt
