"""Benchmark fid.py beside torch-fidelity: feature extraction and each metric, same inputs, same device.

    python bench_fid.py --n 64 --metric-n 5000 [--weights pt_inception-2015-12-05-6726825d.pth]

Without --weights both extractors get the same seeded random weights (no download needed); the
timings do not depend on the weight values. torch-fidelity is optional (pip install torch-fidelity):
without it only fid.py's timings are shown.
"""

import argparse
import os
import tempfile
import time

import numpy as np
import torch

import fid

try:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import calculate_precision_recall_part
except ImportError:
    FeatureExtractorInceptionV3 = None


def parse_args(argv=None):
    """Command-line arguments (argv=None reads sys.argv)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=64, help="images pushed through each Inception")
    p.add_argument("--size", type=int, default=256, help="image side (ADM ImageNet samples are 256)")
    p.add_argument("--metric-n", type=int, help="feature rows per set for the metric timings (default: --n)")
    p.add_argument("--batch-size", type=int, default=32, help="images per Inception forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--weights", help="real Inception weights file; default: the same random weights for both")
    p.add_argument("--seed", type=int, default=0, help="seed of the images, features and random weights")
    return p.parse_args(argv)


def timed(fn):
    """(result, seconds) of fn(), synchronising CUDA so queued kernels are counted."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


@torch.inference_mode()
def fidelity_features(extractor, images, batch_size, device):
    """torch-fidelity's pool3 and unbiased logits for uint8 (N,H,W,3) images."""
    pools, logits = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device).permute(0, 3, 1, 2)  # N,3,H,W
        pool, logit = extractor(batch)
        pools.append(pool.cpu())
        logits.append(logit.cpu())
    return torch.cat(pools), torch.cat(logits)


def synthetic_sets(n, seed):
    """Two (n,2048) nonnegative feature sets shaped like pool3, and (n,1008) logits."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(64, fid.POOL_DIM, generator=gen) / 8  # shared low-rank structure, as real features have

    def features(shift):
        """(n,2048) ReLU'd rows around `shift`."""
        noise = 0.3 * torch.randn(n, fid.POOL_DIM, generator=gen)
        return (torch.randn(n, 64, generator=gen) @ basis + shift + noise).relu()  # n,2048

    return features(0.3), features(0.35), torch.randn(n, fid.LOGITS_DIM, generator=gen) * 3


def running_stats(feats):
    """(mu, sigma) of (N,D) features via fid.py's streaming float64 accumulator, fed 64 rows at a time."""
    stats = fid.RunningGaussian()
    for batch in feats.split(64):
        stats.update(batch)
    return stats.finalize()



def versus(ours, theirs):
    """'ours vs theirs' for the notes column, or just ours without torch-fidelity."""
    return f"{ours}" if theirs is None else f"{ours} vs {theirs}"


def main(args):
    """Run the benchmark and print a table of seconds and torch-fidelity / fid.py ratios."""
    rows = []  # (stage, ours seconds, theirs seconds or None, note)
    images = np.random.default_rng(args.seed).integers(0, 256, (args.n, args.size, args.size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        weights, sha = args.weights, fid.WEIGHTS_SHA256 if args.weights else ""
        if not weights:  # one random state dict, saved so torch-fidelity loads exactly the same weights
            weights = os.path.join(tmp, "random-inception.pth")
            torch.save(fid.randomize_weights(fid.FIDInception(), args.seed).state_dict(), weights)
        model, _ = fid.load_inception(weights, sha, args.device)
        batches = [images[i : i + args.batch_size] for i in range(0, args.n, args.batch_size)]
        fid.extract_features(model, batches[:1], args.device)  # warm-up: allocator, cuDNN autotuning
        ours, seconds = timed(lambda: fid.extract_features(model, batches, args.device))
        note = f"{args.n} images {args.size}px, {args.n / seconds:.1f} img/s"
        theirs_seconds = None
        if FeatureExtractorInceptionV3 is not None:
            extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], weights)
            extractor = extractor.to(args.device)
            fidelity_features(extractor, images[: args.batch_size], args.batch_size, args.device)  # warm-up
            (pool, logits), theirs_seconds = timed(
                lambda: fidelity_features(extractor, images, args.batch_size, args.device)
            )
            note += (
                f"; max |diff| pool3 {(pool - ours.pool).abs().max():.2e},"
                f" logits {(logits - ours.logits).abs().max():.2e}"
            )
        rows.append(("feature extraction", seconds, theirs_seconds, note))

    n = args.metric_n or args.n
    ref, samples, logits = synthetic_sets(n, args.seed)
    stats, seconds = timed(lambda: (running_stats(ref), running_stats(samples)))
    value, fid_seconds = timed(lambda: fid.fid_from_stats(*stats[1], *stats[0]))
    probs = torch.softmax(logits.double(), 1).numpy()
    isc, is_seconds = timed(lambda: fid.inception_score(probs, split_size=n))  # one split, comparable below
    dev_ref, dev_samples = ref.to(args.device), samples.to(args.device)
    pr16, pr16_seconds = timed(lambda: fid.precision_recall(dev_ref, dev_samples, fp16=True))
    pr32, pr32_seconds = timed(lambda: fid.precision_recall(dev_ref, dev_samples, fp16=False))
    theirs = dict.fromkeys(["stats", "fid", "is", "pr"], (None, None))
    if FeatureExtractorInceptionV3 is not None:
        theirs["stats"] = timed(lambda: (fid_features_to_statistics(ref), fid_features_to_statistics(samples)))
        their_stats = theirs["stats"][0]
        theirs["fid"] = timed(lambda: fid_statistics_to_metric(their_stats[1], their_stats[0], False))
        theirs["is"] = timed(lambda: isc_features_to_metric(logits, splits=1, shuffle=False))
        # torch-fidelity's convention: features_1 are the generated samples, features_2 the real ones
        theirs["pr"] = timed(lambda: calculate_precision_recall_part(dev_samples, dev_ref, 3, 10000))
    fid_theirs, is_theirs, pr_theirs = (theirs[k][0] for k in ("fid", "is", "pr"))
    rows += [
        (f"Gaussian statistics x2 ({n} rows)", seconds, theirs["stats"][1], "streamed float64 vs np.cov"),
        ("FID from statistics", fid_seconds, theirs["fid"][1],
         versus(f"{value:.6f}", fid_theirs and f"{fid_theirs['frechet_inception_distance']:.6f}")),
        ("Inception Score (1 split)", is_seconds, theirs["is"][1],
         versus(f"{isc:.6f}", is_theirs and f"{is_theirs['inception_score_mean']:.6f}")),
        ("precision/recall fp16 (ADM)", pr16_seconds, theirs["pr"][1], versus(pr16, pr_theirs)),
        ("precision/recall fp32", pr32_seconds, theirs["pr"][1], versus(pr32, pr_theirs)),
    ]
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if FeatureExtractorInceptionV3 is None:
        print("torch-fidelity is not installed (pip install torch-fidelity): fid.py timings only")
    print(f"| {'stage':<36} | {'fid.py s':>9} | {'torch-fidelity s':>16} | {'ratio':>6} | values / notes")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 18}|{'-' * 8}|---")
    for stage, ours_s, theirs_s, note in rows:
        theirs_text = "-" if theirs_s is None else f"{theirs_s:.3f}"
        ratio = "-" if theirs_s is None else f"{theirs_s / ours_s:.2f}x"
        print(f"| {stage:<36} | {ours_s:>9.3f} | {theirs_text:>16} | {ratio:>6} | {note}")
    print("ratio = torch-fidelity seconds / fid.py seconds (above 1: fid.py is faster)")
    return rows


if __name__ == "__main__":
    main(parse_args())
