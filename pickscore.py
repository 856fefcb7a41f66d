"""PickScore (Kirstain et al., 2023): the text-to-image papers' second number next to FID (SRA^2
Table 4, 20.92 for SRA^2's MMDiT on MS-COCO).

    python pickscore.py samples/x.npz samples/x/captions.json    # mean PickScore of sample.py's
    python pickscore.py SAMPLES CAPTIONS --weights DIR --processor DIR    # offline: local copies

The score of image i for caption i is logit_scale.exp() * cos(text embedding, image embedding) of
PickScore_v1 (a CLIP ViT-H/14) with the CLIP-ViT-H-14 processor, as PickScore's README computes it;
the papers report the mean over the samples. SAMPLES is an npz (arr_0) or a folder of images read
in name order (sample.py's 000000.png, ...); CAPTIONS the captions.json sample.py writes beside its
PNGs or a text file with one caption per line, one per sample.
"""

import argparse
import json
import logging
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import cluster
from cluster import UserError, at_least, write_atomic
from encoders import hub_reachable, tiny_tokenizer

WEIGHTS = "yuvalkirstain/PickScore_v1"
PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

log = logging.getLogger(__name__)


def from_pretrained(cls, name, flag, what):
    """cls.from_pretrained(name) from a folder, the hub cache or the hub; offline and uncached, a
    UserError naming the flag that points at a local copy, at once."""
    todo = f"without network access download it elsewhere and pass {flag} DIR"
    if not os.path.isdir(name):
        try:
            return cls.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError):  # not cached yet
            if not hub_reachable():
                raise UserError(f"cannot load {what} {name!r}: not in the hub cache and the hub "
                                f"is unreachable; {todo}") from None
    try:
        return cls.from_pretrained(name)
    except (OSError, ValueError) as e:  # a missing repo, a folder without the files
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"cannot load {what} {name!r} ({type(e).__name__}: {first}); {todo}") from e


def load(weights=WEIGHTS, processor=PROCESSOR, device="cpu"):
    """(model, processor) of PickScore, each from the hub or a local folder; the small processor
    first, so an offline machine fails before anything large is fetched."""
    from transformers import AutoModel, AutoProcessor

    proc = from_pretrained(AutoProcessor, processor, "--processor", "PickScore's processor")
    model = from_pretrained(AutoModel, weights, "--weights", "PickScore's weights")
    return model.to(device).eval().requires_grad_(False), proc


def tiny_random(seed=0):
    """Tests and smoke runs only: (model, processor) of a seeded tiny random CLIP, built offline:
    the byte-level encoders.tiny_tokenizer and a 32 px processor; its scores mean nothing."""
    import transformers as tf

    log.warning("PickScore: a TINY RANDOMLY INITIALISED CLIP, NOT PickScore_v1; its scores are "
                "meaningless outside smoke runs and tests")
    tokenizer = tiny_tokenizer()
    images = tf.CLIPImageProcessor(size={"shortest_edge": 32},
                                   crop_size={"height": 32, "width": 32})
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    config = tf.CLIPConfig(
        text_config=dict(small, vocab_size=len(tokenizer), max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    with torch.random.fork_rng(devices=[]):  # the same weights every time, global RNG untouched
        torch.manual_seed(seed)
        model = tf.CLIPModel(config)
    return model.eval().requires_grad_(False), tf.CLIPProcessor(images, tokenizer)


@torch.no_grad()
def score(model, processor, images, captions):
    """uint8 images (B, H, W, 3) and B captions -> (B,) float32 PickScores: image i for caption i
    (captions over 77 tokens truncated, as PickScore's README)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    inputs = processor(text=list(captions), images=[Image.fromarray(im) for im in images],
                       padding=True, truncation=True, max_length=77, return_tensors="pt")
    device = next(model.parameters()).device
    out = model(**inputs.to(device))
    return out.logits_per_image.diagonal().float().cpu()  # logit scale * cosine, (B,)


def check_counts(image_set, captions):
    """One caption per image, or UserError."""
    if len(captions) != len(image_set):
        raise UserError(f"{image_set.path} holds {len(image_set)} images but the captions are "
                        f"{len(captions)}; give the captions the samples were made from")


def mean_score(model, processor, image_set, captions, batch_size=64):
    """(mean, per-image scores) over an fid.ImageSet with one caption per image, in batches."""
    check_counts(image_set, captions)
    scores = []
    batches = image_set.batches(batch_size, workers=4)
    for k, batch in enumerate(tqdm(batches, "PickScore", total=image_set.n_batches(batch_size))):
        scores.append(score(model, processor, batch, captions[k * batch_size:][:len(batch)]))
    scores = torch.cat(scores).double()
    return scores.mean().item(), scores.numpy()


# ----------------------------------------------------------------------------------------------
# Command line


def parser():
    """The command line's options."""
    p = argparse.ArgumentParser(prog="pickscore.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("samples", help="sample.py's .npz or a folder of images (read in name order)")
    a("captions", help="captions.json (sample.py's, beside the PNGs) or a text file, one caption "
                       "per line, one per sample")
    a("--weights", default=WEIGHTS, help=f"PickScore's model: hub id or local folder ({WEIGHTS})")
    a("--processor", default=PROCESSOR,
      help=f"PickScore's processor: hub id or local folder ({PROCESSOR})")
    a("--tiny-random", type=int, choices=[0, 1], default=0,
      help="1: a tiny random CLIP instead of PickScore (smoke runs and tests; scores meaningless)")
    a("--batch-size", type=at_least(1), default=64, help="images per forward")
    a("--device", default=None, help="cpu or cuda (default: cuda if available)")
    a("--out", default=None, help="JSON of the mean and per-image scores; default: "
                                  "SAMPLES' stem + .pickscore.json")
    return p


def main(args):
    """Score the samples with their captions, print the mean and write the JSON."""
    from fid import ImageSet
    from sample import read_captions

    with cluster.main_errors("pickscore.py"):
        try:
            images = ImageSet(args.samples)
        except ValueError as e:
            raise UserError(str(e)) from e
        captions = read_captions(args.captions)
        check_counts(images, captions)  # before any weights load
        path = args.samples
        out = args.out or (os.path.splitext(path)[0] if images.is_npz else os.path.normpath(path)
                           ) + ".pickscore.json"
        cluster.check_writable(os.path.dirname(os.path.abspath(out)))
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, processor = (tiny_random() if args.tiny_random
                            else load(args.weights, args.processor, device))
        model = model.to(device)
        mean, scores = mean_score(model, processor, images, captions, args.batch_size)
        weights, proc = (("tiny-random",) * 2 if args.tiny_random
                         else (args.weights, args.processor))
        print(f"PickScore: {mean:.4f} (mean over {len(scores)} samples of {args.samples}, "
              f"captions {args.captions}, weights {weights})")
        result = dict(pickscore=mean, num_samples=len(scores), samples=args.samples,
                      captions=args.captions, weights=weights, processor=proc,
                      scores=np.round(scores, 4).tolist())
        write_atomic(out, lambda f: f.write(json.dumps(result, indent=1).encode() + b"\n"))
        return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(parser().parse_args())
