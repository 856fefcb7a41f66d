"""Tests for fid.py: closed-form metrics, TF1 resize, Inception parity with pytorch-fid, CLI
and bad input.

Everything runs on CPU with seeded random Inception weights; nothing touches the network.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import types
import urllib.error
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
from PIL import Image

import fid
from helpers import cli_error, interrupted, random_inception

# ------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    """The Inception network with seeded random weights."""
    return random_inception(fid.FIDInception(), seed=0).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def weights_file(model, tmp_path_factory):
    """The random weights saved as a state-dict file, and its sha256."""
    path = tmp_path_factory.mktemp("weights") / "random-inception.pth"
    torch.save(model.state_dict(), path)
    return str(path), fid.sha256_of(path)


def images(n, seed, size=32):
    """n random uint8 (n,size,size,3) images."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def random_spd(dim, seed):
    """A random well-conditioned symmetric positive definite matrix."""
    a = np.random.default_rng(seed).standard_normal((dim, 2 * dim))
    return a @ a.T / (2 * dim) + 0.1 * np.eye(dim)


# ------------------------------------------------------------------------------------------
# FID
# ------------------------------------------------------------------------------------------


def test_fid_of_identical_stats_is_zero():
    sigma = random_spd(32, 0)
    mu = np.random.default_rng(1).standard_normal(32)
    assert abs(fid.fid_from_stats(mu, sigma, mu, sigma)) < 1e-9


def test_fid_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    var1, var2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    got = fid.fid_from_stats(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fid_of_scaled_full_covariance_matches_closed_form():
    # sigma2 = c^2 sigma1 gives tr(s1) + c^2 tr(s1) - 2c tr(s1) = (1 - c)^2 tr(s1)
    sigma, c = random_spd(24, 3), 1.7
    mu1, mu2 = np.zeros(24), np.full(24, 0.5)
    got = fid.fid_from_stats(mu1, sigma, mu2, c**2 * sigma)
    assert got == pytest.approx(24 * 0.25 + (1 - c) ** 2 * np.trace(sigma), rel=1e-9)


def test_fid_retries_with_eps_ridge_when_sqrtm_is_not_finite(monkeypatch):
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def flaky_sqrtm(a):
        """NaN on the first call, the real sqrtm after."""
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
    var = np.array([1.0, 4.0])
    with pytest.warns(UserWarning, match="singular"):
        got = fid.fid_from_stats(
            np.zeros(2), np.diag(var), np.zeros(2), np.diag(var), route="sqrtm"
        )
    np.testing.assert_allclose(calls[1], np.diag((var + 1e-6) ** 2))  # (s1 + eps I)(s2 + eps I)
    assert got == pytest.approx(2 * var.sum() - 2 * (var + 1e-6).sum(), abs=1e-12)


def test_fid_rejects_large_imaginary_part_nan_and_mismatched_shapes():
    # not PSD: the eigh route sees eigenvalue -1 and hands over to sqrtm, and
    # sqrtm(diag(-1, 1)) = diag(i, 1)
    with pytest.raises(ValueError, match="imaginary"), pytest.warns(UserWarning, match="sqrtm"):
        fid.fid_from_stats(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        fid.fid_from_stats(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="do not match"):
        fid.fid_from_stats(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def pool3_like(n, dim, seed, shift=0.3):
    """(n,dim) nonnegative float64 features with shared low-rank structure, as Inception's pool3
    rows."""
    rng = np.random.default_rng(seed)
    # the same structure for every set
    basis = np.random.default_rng(99).standard_normal((dim // 8, dim)) / 8
    return np.maximum(
        rng.standard_normal((n, dim // 8)) @ basis + shift + 0.3 * rng.standard_normal((n, dim)), 0
    )


def exact_fid(x1, x2):
    """FID of two feature sets' Gaussians with tr sqrt(sigma1 sigma2) as the nuclear norm of X1c
    X2c^T / sqrt((n1-1)(n2-1)): singular values carry no square-root-of-rounding error, so this is
    the reference both routes are held to."""
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    tr_sqrt = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt(
        (len(x1) - 1) * (len(x2) - 1)
    )
    diff = x1.mean(0) - x2.mean(0)
    return (
        diff @ diff
        + np.trace(np.cov(x1, rowvar=False))
        + np.trace(np.cov(x2, rowvar=False))
        - 2 * tr_sqrt
    )


@pytest.mark.parametrize("n_samples, n_ref", [(600, 1000), (100, 1000), (600, 150), (100, 150)])
def test_eigh_route_agrees_with_sqrtm_on_realistic_statistics(n_samples, n_ref):
    # 256-d pool3-like features; fewer rows than dimensions makes that side's covariance singular
    samples, ref = pool3_like(n_samples, 256, seed=1, shift=0.35), pool3_like(n_ref, 256, seed=2)
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (samples, ref)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither route may need its fallback here
        fast = fid.fid_from_stats(*stats[0], *stats[1])
        adm = fid.fid_from_stats(*stats[0], *stats[1], route="sqrtm")
    exact = exact_fid(samples, ref)
    assert 1 < exact < 1e3
    assert abs(fast - adm) <= 1e-6 * adm
    assert abs(fast - exact) <= 1e-8 * exact  # the symmetric route is the more accurate one


def test_covariance_factor_cholesky_and_singular_eigh():
    full = np.cov(pool3_like(500, 64, seed=3), rowvar=False)
    factor = fid.covariance_factor(full)
    assert np.array_equal(factor, np.tril(factor))  # positive definite: the Cholesky factor
    np.testing.assert_allclose(factor @ factor.T, full, rtol=0, atol=1e-13 * np.abs(full).max())
    singular = np.cov(pool3_like(20, 64, seed=4), rowvar=False)  # rank 19
    factor = fid.covariance_factor(singular)
    np.testing.assert_allclose(
        factor @ factor.T, singular, rtol=0, atol=1e-12 * np.abs(singular).max()
    )
    assert fid.covariance_factor(np.diag([1.0, -1.0, 2.0])) is None  # indefinite: no factor
    # a cached factor gives the same FID as one computed inside
    mu, sigma = np.zeros(64), np.cov(pool3_like(300, 64, seed=5), rowvar=False)
    assert fid.fid_from_stats(
        mu, sigma, mu + 1, full, factor2=fid.covariance_factor(full)
    ) == fid.fid_from_stats(mu, sigma, mu + 1, full)


@pytest.mark.parametrize("bad", [np.nan, -1e-3])
def test_eigh_route_falls_back_to_sqrtm_on_bad_eigenvalues(monkeypatch, bad):
    x1, x2 = pool3_like(300, 32, seed=6), pool3_like(400, 32, seed=7)
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (x1, x2)]
    adm = fid.fid_from_stats(*stats[0], *stats[1], route="sqrtm")
    real_eigh = scipy.linalg.eigh

    def broken_eigh(a, *args, **kwargs):
        """The real eigenvalues with the smallest replaced by `bad` (NaN, or negative far beyond
        rounding)."""
        values = real_eigh(a, *args, **kwargs)
        values[0] = bad
        return values

    monkeypatch.setattr(scipy.linalg, "eigh", broken_eigh)
    with pytest.warns(UserWarning, match="using ADM's sqrtm"):
        assert fid.fid_from_stats(*stats[0], *stats[1]) == adm
    # without the injection: no warning, the same value
    monkeypatch.setattr(scipy.linalg, "eigh", real_eigh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fid.fid_from_stats(*stats[0], *stats[1]) == pytest.approx(adm, rel=1e-10)
    with pytest.raises(ValueError, match="unknown FID route"):
        fid.fid_from_stats(*stats[0], *stats[1], route="svd")


def test_running_gaussian_matches_numpy_mean_and_cov():
    # a large offset tests the centring
    x = np.random.default_rng(7).standard_normal((37, 5)) * 3 + 100
    stats = fid.RunningGaussian()
    for part in np.array_split(x, 4):
        stats.update(torch.from_numpy(part).float())
    mu, sigma = stats.finalize()
    x32 = x.astype(np.float32).astype(np.float64)  # the same float32 inputs the accumulator saw
    np.testing.assert_allclose(mu, x32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x32, rowvar=False), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        fid.RunningGaussian().finalize()


# ------------------------------------------------------------------------------------------
# Inception Score
# ------------------------------------------------------------------------------------------


def test_inception_score_uniform_is_one_and_one_hot_is_class_count():
    assert fid.inception_score(np.full((12, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)
    one_hot = np.eye(10)[np.arange(20) % 10]  # every class predicted with certainty, equally often
    assert fid.inception_score(one_hot) == pytest.approx(10.0, rel=1e-12)


def test_inception_score_uses_sequential_splits():
    first = np.eye(6)[np.arange(8) % 4]  # 8 rows over 4 classes -> IS 4
    second = np.eye(6)[4 + np.arange(4) % 2]  # 4 rows over 2 classes -> IS 2
    assert fid.inception_score(np.concatenate([first, second]), split_size=8) == pytest.approx(
        3.0, rel=1e-12
    )
    with pytest.raises(ValueError):
        fid.inception_score(np.zeros((0, 3)))


def features(pool, logits):
    """fid.Features of given pool3 rows and logits (the spatial statistics from the pool rows)."""
    stats = fid.RunningGaussian()
    stats.update(pool)
    return fid.Features(pool, logits, stats.finalize(), stats.finalize())


def test_evaluation_during_training_scores_is_in_splits_of_5000(monkeypatch):
    """train.py's evaluation (train.evaluate -> sample.score -> fid.Evaluator) gives ADM's IS, the
    mean over sequential splits of 5000, on 6000 random logits (20 classes) whose first 5000 rows
    predict classes 0-9 and the last 1000 classes 10-19: one split would score 1.56 times higher."""
    import sample
    import train

    n, rng = 6000, np.random.default_rng(0)
    classes = np.where(np.arange(n) < 5000, 0, 10) + rng.integers(0, 10, n)  # (N,)
    logits = rng.standard_normal((n, 20)) + 10 * np.eye(20)[classes]  # (N, 20)
    samples = features(torch.randn(n, 4), torch.from_numpy(logits).float())

    def adm_is(rows):
        """ADM's IS of one split, written out: exp of the mean KL(p(y|x) || p(y))."""
        p = scipy.special.softmax(rows.astype(np.float32).astype(np.float64), axis=1)  # (S, C)
        return np.exp((p * (np.log(p) - np.log(p.mean(0)))).sum(1).mean())

    expected = (adm_is(logits[:5000]) + adm_is(logits[5000:])) / 2
    assert adm_is(logits) > 1.5 * expected  # the split matters on these rows: 15.4 vs 9.9

    made = []

    def given_features(model, batches, *args, **kwargs):
        """The samples' features, once every batch was asked for (no network)."""
        for indices in batches:
            made.extend(indices)
        return samples

    # no sampling and no Inception network: the logits are given
    monkeypatch.setattr(sample, "generate_images", lambda model, vae, indices, **kw: indices)
    monkeypatch.setattr(fid, "extract_features", given_features)
    evaluator = object.__new__(fid.Evaluator)
    evaluator.device, evaluator.rank, evaluator.factors, evaluator.model = "cpu", 0, None, None
    evaluator.digest, evaluator.ref = "0" * 64, features(torch.randn(50, 4), None)
    rows = []
    config = dict(eval_samples=n, batch_size=1000, seed=0, eval_cfg=1.0, eval_steps=1)
    train.evaluate(None, None, evaluator, config, 10, types.SimpleNamespace(write=rows.append), 0,
                   1, torch.device("cpu"), {})  # class-conditional: no text condition
    assert made == list(range(n)) and rows[0]["step"] == 10
    assert rows[0]["inception_score"] == pytest.approx(expected, rel=1e-9)


# ------------------------------------------------------------------------------------------
# Precision / recall
# ------------------------------------------------------------------------------------------


def column(values):
    """1-D points as an (N,1) float32 feature tensor."""
    return torch.tensor(values, dtype=torch.float32)[:, None]


@pytest.mark.parametrize("fp16", [True, False])
def test_precision_recall_of_set_with_itself_is_one_and_far_set_is_zero(fp16):
    feats = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    assert fid.precision_recall(feats, feats, fp16=fp16, block=16) == (1.0, 1.0)
    assert fid.precision_recall(feats, feats + 100, fp16=fp16, block=16) == (0.0, 0.0)


@pytest.mark.parametrize("fp16", [True, False])
def test_precision_recall_hand_checked(fp16):
    # k=3 radius = 4th smallest squared distance counting self.
    # ref {0,1,2,3,20}: radii 9, 4, 4, 9, 361.
    # samples {0.5,1,1.5,2,-5,-6}: radii 2.25, 1, 1, 2.25, 36, 49.
    # precision: -5 and -6 lie in no reference ball (25 > 9 from 0; 625 > 361 from 20) -> 4/6.
    # recall: 20 lies in no sample ball (625 > 36 from -5, 676 > 49 from -6); 3 is
    # within 2.25 of 2 -> 4/5.
    ref, samples = column([0, 1, 2, 3, 20]), column([0.5, 1, 1.5, 2, -5, -6])
    precision, recall = fid.precision_recall(ref, samples, fp16=fp16, block=2)
    assert (precision, recall) == (pytest.approx(4 / 6), pytest.approx(4 / 5))
    # "inside" is <=: a sample exactly on reference 3's radius (9 = (6 - 3)^2) counts, 6.5 does not
    assert fid.precision_recall(column([0, 1, 2, 3]), column([6] * 4), fp16=fp16)[0] == 1.0
    assert fid.precision_recall(column([0, 1, 2, 3]), column([6.5] * 4), fp16=fp16)[0] == 0.0


def test_precision_recall_blocked_equals_brute_force():
    gen = torch.Generator().manual_seed(1)
    ref, samples = torch.randn(40, 8, generator=gen), torch.randn(33, 8, generator=gen) * 1.3 + 0.4
    r, s = ref.double().numpy(), samples.double().numpy()
    d_rr, d_ss = ((r[:, None] - r[None]) ** 2).sum(-1), ((s[:, None] - s[None]) ** 2).sum(-1)
    d_rs = ((r[:, None] - s[None]) ** 2).sum(-1)
    r_rad, s_rad = np.sort(d_rr, 1)[:, 3], np.sort(d_ss, 1)[:, 3]
    precision = (d_rs <= r_rad[:, None]).any(0).mean()
    recall = (d_rs <= s_rad[None, :]).any(1).mean()
    assert 0 < precision < 1 and 0 < recall < 1  # a case that exercises both outcomes
    assert fid.precision_recall(ref, samples, fp16=False, block=7) == (
        pytest.approx(precision),
        pytest.approx(recall),
    )


def test_fp16_distances_round_like_adm_and_fall_back_to_fp32_on_overflow():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.rand(6, 2048, generator=gen), torch.rand(5, 2048, generator=gen)
    d16, d32 = fid.pairwise_sq_dists(a, b, fp16=True), fid.pairwise_sq_dists(a, b, fp16=False)
    assert torch.equal(d16, d16.half().float())  # values are fp16 numbers
    assert not torch.equal(d16, d32) and torch.allclose(d16, d32, rtol=2e-2)
    big = a * 100  # squared norms ~7e6 overflow fp16 (max 65504): the whole block is redone in fp32
    assert torch.equal(
        fid.pairwise_sq_dists(big, b, fp16=True), fid.pairwise_sq_dists(big, b, fp16=False)
    )


def test_manifold_radii_needs_more_than_k_points():
    with pytest.raises(ValueError, match="more than 3"):
        fid.manifold_radii(torch.zeros(3, 4))


# ------------------------------------------------------------------------------------------
# Preprocessing and the network
# ------------------------------------------------------------------------------------------


def test_tf1_legacy_resize_matches_hand_computed_values():
    # 2 -> 3 samples sources 0, 2/3, 4/3 (no half-pixel shift; the last clamps to the edge)
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    expected = torch.tensor([[0, 20 / 3, 10], [40 / 3, 20, 70 / 3], [20, 80 / 3, 30]])
    torch.testing.assert_close(fid.tf1_resize_bilinear(x, 3)[0, 0], expected)
    # 4 -> 2 picks sources 0 and 2 (no averaging); same size is the identity
    row = torch.tensor([[[[0.0, 1.0, 2.0, 3.0]] * 4]])
    torch.testing.assert_close(
        fid.tf1_resize_bilinear(row, 2)[0, 0], torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    )
    assert torch.equal(fid.tf1_resize_bilinear(row, 4), row)


def test_preprocess_scales_like_the_graph():
    imgs = torch.tensor([0, 128, 255], dtype=torch.uint8).repeat(1, 5, 5, 1)  # 1,5,5,3
    x = fid.preprocess(imgs)
    assert x.shape == (1, 3, 299, 299)
    torch.testing.assert_close(x[0, :, 100, 100], torch.tensor([-1.0, 0.0, 127 / 128]))


@pytest.mark.slow
def test_features_match_pytorch_fid_given_the_same_weights(model, monkeypatch):
    pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
    # pytorch-fid downloads its FID-variant weights; hand it ours instead (strict load
    # checks every name)
    monkeypatch.setattr(
        pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: model.state_dict()
    )
    other = pytorch_fid_inception.fid_inception_v3().eval()
    seen = {}
    other.avgpool.register_forward_hook(lambda m, i, out: seen.update(pool=out.flatten(1)))
    other.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: seen.update(spatial=out))

    x = fid.preprocess(torch.from_numpy(images(2, seed=0, size=48)))
    with torch.no_grad():
        pool, spatial, logits = model(x)
        # pytorch-fid's head adds the bias; ADM's logits do not
        logits_other = other(x) - other.fc.bias
    spatial_other = seen["spatial"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # N,H,W,C as TF
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023) and logits.shape == (2, 1008)
    # random weights still carry signal
    assert pool.std() > 0.3 and spatial.std() > 0.3 and logits.std() > 1
    torch.testing.assert_close(pool, seen["pool"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(spatial, spatial_other, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, logits_other, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------
# Weights, image sets, reference statistics
# ------------------------------------------------------------------------------------------


def test_load_inception_checks_sha256_and_uses_the_hub_cache(
    weights_file, model, tmp_path, monkeypatch
):
    path, digest = weights_file
    loaded, got = fid.load_inception(path, digest[:8])
    assert got == digest and torch.equal(loaded.fc.weight, model.fc.weight)
    with pytest.raises(ValueError, match="sha256"):
        fid.load_inception(path)  # the default expects the published file
    with pytest.raises(ValueError, match="not found"):
        fid.load_inception(str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load"):
        fid.load_inception(str(junk), "")
    # without --weights the torch.hub cache is used; a file already there is not downloaded again
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    os.symlink(path, tmp_path / "checkpoints" / os.path.basename(fid.WEIGHTS_URL))
    assert fid.load_inception(None, digest)[1] == digest


@pytest.mark.parametrize("failure, reason", [
    (urllib.error.URLError(OSError(-2, "Name or service not known")), "Name or service not known"),
    (urllib.error.HTTPError(fid.WEIGHTS_URL, 404, "Not Found", {}, None),
     "HTTP Error 404: Not Found"),
])
def test_failed_weights_download_is_one_line(tmp_path, monkeypatch, failure, reason):
    def download(url, dst, hash_prefix=None, progress=True):
        """torch.hub's downloader, offline or facing a moved file."""
        raise failure

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    monkeypatch.setattr(fid, "reachable", lambda url: True)  # the server answers, the fetch fails
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "set.npz", arr_0=images(4, 0))
    with pytest.raises(SystemExit) as exit_info:
        fid.main(fid.parse_args(
            [str(tmp_path / "set.npz")] * 2 + ["--min-images", "4", "--device", "cpu"]))
    text = str(exit_info.value.code)
    assert (
        text.startswith("fid.py: error: cannot download the Inception weights") and "\n" not in text
    )
    assert fid.WEIGHTS_URL in text and reason in text and "--weights PATH" in text


def test_offline_without_the_weights_file_fails_at_once(tmp_path, monkeypatch):
    """No network, no file: one line naming --weights, without trying the download."""
    monkeypatch.setattr(fid, "reachable", lambda url: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", None)  # calling it would fail
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^the Inception weights pt_inception-2015-12-05-6726825d"
                                         r".pth are neither .* github.com is unreachable .* pass "
                                         r"--weights PATH, or put it in either place$"):
        fid.load_inception()


def test_weights_file_in_the_current_folder_is_used_and_another_one_needs_the_flag(
    weights_file, tmp_path, monkeypatch
):
    """The README's offline machine: the file beside you, no --weights; a stand-in file is refused
    with the flag that takes it."""
    path, digest = weights_file
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(fid, "reachable", None)  # never asked: the file is here
    monkeypatch.chdir(tmp_path)
    os.symlink(path, tmp_path / os.path.basename(fid.WEIGHTS_URL))
    assert fid.load_inception(None, digest)[1] == digest
    with pytest.raises(ValueError, match=r"wrong or corrupt file; to evaluate with another file on "
                                         r"purpose pass --weights-sha256 ''"):
        fid.load_inception(None)
    assert fid.load_inception(None, "")[1] == digest


def test_full_disk_is_one_line_naming_folder_free_and_needed(tmp_path, monkeypatch):
    usage = shutil._ntuple_diskusage
    monkeypatch.setattr(fid.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2_000_000,
                                                                  2_000_000))
    out = tmp_path / "ref.npz"
    with pytest.raises(ValueError) as err:
        fid.save_checked(str(out), lambda f: f.write(b"x"), 3_500_000)
    assert str(err.value) == (f"not enough space in {tmp_path} for {out}: 2.0 MB free, 3.5 MB "
                              "needed; free space there or give another path, then run the same "
                              "command again")

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ValueError, match="2.0 MB free, 0.0 MB needed"):
        fid.save_checked(str(out), full, 10)  # the estimate was short: the disk filled anyway
    assert os.listdir(tmp_path) == []


def test_ctrl_c_says_how_to_continue_without_a_traceback(tmp_path):
    np.savez(tmp_path / "set.npz", arr_0=images(4, 0))
    marker = tmp_path / "working"
    code = (
        "import time, fid\n"
        "fid.load_inception = lambda *a: (None, '0' * 64)\n"
        f"fid.features_of = lambda *a, **k: open({str(marker)!r}, 'w') and time.sleep(60)\n"
        f"fid.main(fid.parse_args([{str(tmp_path / 'set.npz')!r}] * 2 + ['--min-images', '4', "
        "'--device', 'cpu']))\n"
    )
    status, err = interrupted(code, marker)
    assert status == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        "fid.py: interrupted before the results were written; run the same command again (the "
        "reference activations, if cached, are reused)")


def test_image_set_streams_npz_and_png_tree_identically_and_shards_by_batch(tmp_path):
    arr = images(7, seed=3, size=8)
    np.savez(tmp_path / "set.npz", arr_0=arr)
    # data.py's layout: one sub-folder per class, and a labels file beside them
    folder = tmp_path / "pngs"
    for i, im in enumerate(arr):
        (folder / f"{i // 3:05d}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(folder / f"{i // 3:05d}" / f"img{i:08d}.png")
    (folder / "dataset.json").write_text("{}")
    for path in (tmp_path / "set.npz", folder):
        image_set = fid.ImageSet(str(path))
        batches = list(image_set.batches(3))
        assert len(image_set) == 7 and [len(b) for b in batches] == [3, 3, 1]
        assert image_set.n_batches(3) == 3
        np.testing.assert_array_equal(np.concatenate(batches), arr)
        # rank r of 2 gets batches r, r + 2, ...: here [0:2], [4:6] and [2:4], [6:7]
        shards = [list(image_set.batches(2, rank=rank, world=2)) for rank in (0, 1)]
        assert [image_set.n_batches(2, rank, 2) for rank in (0, 1)] == [2, 2]
        np.testing.assert_array_equal(np.concatenate(shards[0]), arr[[0, 1, 4, 5]])
        np.testing.assert_array_equal(np.concatenate(shards[1]), arr[[2, 3, 6]])
    Image.fromarray(images(1, seed=4, size=9)[0]).save(folder / "00002" / "img00000999.png")
    with pytest.raises(ValueError, match="differ in size"):
        list(fid.ImageSet(str(folder)).batches(3))


def test_read_npz_stats_validates(tmp_path):
    mu, sigma = np.zeros(2048), np.eye(2048)
    np.savez(tmp_path / "ok.npz", arr_0=images(1, 0), mu=mu, sigma=sigma)
    pool, spatial = fid.read_npz_stats(str(tmp_path / "ok.npz"))
    assert spatial is None and np.array_equal(pool[1], sigma)
    bad = {
        "only one": dict(mu=mu),
        "expected": dict(mu=np.zeros(10), sigma=np.eye(10)),
        "NaN": dict(mu=np.full(2048, np.nan), sigma=sigma),
        "floating": dict(mu=mu.astype(np.int64), sigma=sigma),
    }
    for message, arrays in bad.items():
        np.savez(tmp_path / "bad.npz", arr_0=images(1, 0), **arrays)
        with pytest.raises(ValueError, match=message):
            fid.read_npz_stats(str(tmp_path / "bad.npz"))


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def cli(*argv, weights=None):
    """Run fid.main in-process with small-set flags (and the random weights when given)."""
    flags = ["--min-images", "4", "--is-split", "3", "--batch-size", "4", "--device", "cpu"]
    if weights:
        flags += ["--weights", weights[0], "--weights-sha256", weights[1]]
    return fid.main(fid.parse_args([*map(str, argv), *flags]))


def recording_fid(monkeypatch):
    """Replace fid_from_stats (a 2048-d sqrtm costs tens of seconds here; it is tested above) by a
    recorder."""
    calls = []

    def record(mu1, sigma1, mu2, sigma2, **options):
        """Keep the inputs; return the call's number."""
        calls.append((mu1, sigma1, mu2, sigma2))
        return float(len(calls))

    monkeypatch.setattr(fid, "fid_from_stats", record)
    return calls


def assert_same_stats(call, same=True):
    """Check that a recorded FID call compared equal (or clearly different) sample and reference
    stats."""
    mu1, sigma1, mu2, sigma2 = call
    close = np.allclose(mu1, mu2, rtol=1e-6, atol=1e-6) and np.allclose(
        sigma1, sigma2, rtol=1e-6, atol=1e-6
    )
    assert close == same


@pytest.mark.slow
def test_cli_end_to_end_on_tiny_npz_and_png_folder(tmp_path, weights_file, monkeypatch):
    calls = recording_fid(monkeypatch)
    arr = images(6, seed=5)
    np.savez(tmp_path / "ref.npz", arr_0=arr)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, im in enumerate(arr):
        Image.fromarray(im).save(folder / f"{i}.png")

    results = cli(tmp_path / "ref.npz", folder, weights=weights_file)
    # the same images as samples: FID and sFID compare equal statistics (sample first, as ADM), and
    # every point is inside the other set's manifold
    assert [c[0].shape for c in calls] == [(2048,), (2023,)] and (
        results["fid"],
        results["sfid"],
    ) == (1.0, 2.0)
    assert_same_stats(calls[0])
    assert_same_stats(calls[1])
    assert (results["precision"], results["recall"]) == (1.0, 1.0)
    assert 1.0 < results["inception_score"] <= 3.0  # IS cannot exceed the split size (3)
    on_disk = json.loads((tmp_path / "samples.eval.json").read_text())
    assert on_disk == results and on_disk["num_samples"] == 6

    cache = fid.cache_path(str(tmp_path / "ref.npz"), weights_file[1])
    stamp = os.stat(cache).st_mtime_ns
    with np.load(cache) as c:
        assert c["pool"].shape == (6, 2048)
        np.testing.assert_array_equal(c["mu"], calls[0][2])
    # different samples: the reference comes from the cache (not rewritten) and
    # the statistics differ
    np.savez(tmp_path / "other.npz", arr_0=images(6, seed=6))
    other = cli(tmp_path / "ref.npz", tmp_path / "other.npz", "--out", tmp_path / "o.json",
                weights=weights_file)
    assert os.stat(cache).st_mtime_ns == stamp and np.array_equal(calls[2][2], calls[0][2])
    assert_same_stats(calls[2], same=False)
    assert_same_stats(calls[3], same=False)
    assert json.loads((tmp_path / "o.json").read_text()) == other


@pytest.mark.slow
def test_cli_writes_reference_batch_that_evaluates(tmp_path, weights_file, monkeypatch, capsys):
    calls = recording_fid(monkeypatch)
    arr = images(6, seed=8)
    np.savez(tmp_path / "source.npz", arr_0=arr)
    out = tmp_path / "ref.npz"
    cli(tmp_path / "source.npz", "--write-ref", out, "--ref-images", "4", weights=weights_file)
    with np.load(out) as ref:
        assert ref["arr_0"].shape == (4, 32, 32, 3)
        assert all(any(np.array_equal(im, src) for src in arr) for im in ref["arr_0"])  # a subset
        stored = [ref[key] for key in ("mu", "sigma", "mu_s", "sigma_s")]
    assert [a.shape for a in stored] == [(2048,), (2048, 2048), (2023,), (2023, 2023)]
    # evaluating against it uses the stored statistics, which cover all 6 source images
    results = cli(out, tmp_path / "source.npz", weights=weights_file)
    for call, (mu, sigma) in zip(calls, (stored[:2], stored[2:])):
        assert (
            call[2] is not None and np.array_equal(call[2], mu) and np.array_equal(call[3], sigma)
        )
        assert_same_stats(call)  # the samples are the same 6 images
    assert results["recall"] == 1.0  # every arr_0 image is also a sample
    # the output says how many samples were scored against which reference's statistics
    assert (f"6 samples ({tmp_path / 'source.npz'}) against the reference {out} (FID statistics: "
            "its stored mu/sigma; 4 images for precision/recall)") in capsys.readouterr().out
    assert results["ref_stats"] == "npz mu/sigma" and results["num_samples"] == 6


def run_fid(nproc, *argv):
    """fid.py in fresh processes, one thread each: plain python for nproc 0, else torchrun with
    nproc gloo ranks."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc
        else []
    )
    # the same kernels in every process
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, *launcher, os.path.join(repo, "fid.py"), *map(str, argv)],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_two_gloo_ranks_give_exactly_the_single_process_results(tmp_path, weights_file):
    # odd counts and batch 2: the ranks' shards differ in length and the last batch is partial
    np.savez(tmp_path / "ref.npz", arr_0=images(5, seed=9))
    tree = tmp_path / "samples"
    for i, im in enumerate(images(7, seed=10)):
        (tree / f"{i % 2:05d}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(tree / f"{i % 2:05d}" / f"{i}.png")
    flags = ["--min-images", "4", "--is-split", "3", "--batch-size", "2", "--cache", "0"]
    flags += ["--weights", weights_file[0], "--weights-sha256", weights_file[1], "--device", "cpu"]
    for nproc in (0, 2):
        run_fid(nproc, tmp_path / "ref.npz", tree, "--out", tmp_path / f"eval{nproc}.json", *flags)
        run_fid(
            nproc, tree, "--write-ref", tmp_path / f"ref{nproc}.npz", "--ref-images", "5", *flags
        )
    single, sharded = (json.loads((tmp_path / f"eval{n}.json").read_text()) for n in (0, 2))
    assert single["num_samples"] == 7 and single["recall"] > 0
    assert sharded == single  # every number bit for bit
    with np.load(tmp_path / "ref0.npz") as one, np.load(tmp_path / "ref2.npz") as two:
        assert sorted(one.files) == sorted(two.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        assert len(one["arr_0"]) == 5
        for key in one.files:
            assert np.array_equal(one[key], two[key]), key


def bad_input_cases(tmp_path):
    """(argv, expected message) pairs, each a bad input that must fail before any Inception work."""
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=images(5, 0))
    cases = []

    def npz(name, **arrays):
        """Save arrays as tmp_path/name and return the path."""
        np.savez(tmp_path / name, **arrays)
        return tmp_path / name

    cases.append(([tmp_path / "nope.npz", good], "no such file"))
    cases.append(([npz("nokey.npz", images=images(5, 0)), good], "has no arr_0"))
    cases.append(
        ([npz("float.npz", arr_0=images(5, 0).astype(np.float32)), good], "must be C-ordered uint8")
    )
    cases.append(
        ([npz("rgba.npz", arr_0=np.zeros((5, 8, 8, 4), np.uint8)), good], "must be C-ordered uint8")
    )
    cases.append(([npz("few.npz", arr_0=images(3, 0)), good], "fewer than --min-images"))
    nan_stats = npz("nan.npz", arr_0=images(5, 0), mu=np.full(2048, np.nan), sigma=np.eye(2048))
    cases.append(([nan_stats, good], "NaN"))
    cases.append(([good], "expected REF.npz SAMPLES"))
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(images(5, 0)):
        Image.fromarray(im).save(folder / f"{i}.png")
    cases.append(([folder, good], "REF must be an ADM npz"))
    cases.append(([good, good, "--weights", tmp_path / "missing.pth"], "weights file not found"))
    wrong = tmp_path / "wrong.pth"
    wrong.write_bytes(b"\0" * 64)
    cases.append(([good, good, "--weights", wrong], "sha256"))
    cases.append(([good, good, "--weights", wrong], "pass --weights-sha256 ''"))
    # every output location before any work
    cases.append(([good, good, "--out", tmp_path], f"--out {tmp_path} is a folder"))
    cases.append(([good, good, "--out", good / "x.json"], "(a file is in the way): give a"))
    cases.append(([good, "--write-ref", good / "s" / "r.npz"], "cannot write --write-ref"))
    return cases


def test_bad_input_gives_one_line_error(tmp_path):
    for argv, message in bad_input_cases(tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            fid.main(fid.parse_args([*map(str, argv), "--min-images", "4", "--device", "cpu"]))
        text = str(exit_info.value.code)
        assert text.startswith("fid.py: error:") and message in text and "\n" not in text, (
            argv,
            text,
        )


MINIMUMS = {"--ref-images": 1, "--seed": 0, "--batch-size": 1, "--workers": 1, "--min-images": 4,
            "--is-split": 1, "--pr-block": 1}


def test_every_numeric_flag_is_range_checked(tmp_path, capsys):
    paths = [str(tmp_path / "set.npz")] * 2
    numeric = {k for k, v in vars(fid.parse_args(paths)).items() if type(v) is int}
    assert numeric == {f[2:].replace("-", "_") for f in MINIMUMS} | {"pr_fp16", "cache"}
    for flag, low in MINIMUMS.items():
        line = cli_error(capsys, fid.parse_args, *paths, flag, str(low - 1))
        assert line == f"fid.py: error: argument {flag}: must be >= {low}, got {low - 1}"
    for flag in ("--pr-fp16", "--cache"):
        assert f"argument {flag}: invalid choice: 2" in cli_error(
            capsys, fid.parse_args, *paths, flag, "2"
        )


def test_bad_input_exit_status_and_stderr_from_a_real_process(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.join(repo, "fid.py"), str(tmp_path / "a.npz"),
         str(tmp_path / "b.npz")], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"fid.py: error: no such file or folder: {tmp_path / 'a.npz'}"
    ]

