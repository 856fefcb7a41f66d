"""Regenerate tests/data/encoder_reference.pt: the tokens REPA's own code computes for
every encoder family.

    git clone https://github.com/sihyun-yu/REPA /tmp/REPA
    git clone https://github.com/openai/CLIP /tmp/CLIP
    git clone https://github.com/facebookresearch/dino /tmp/dino
    git clone https://github.com/facebookresearch/dinov2 /tmp/dinov2
    pip install ftfy
    python tests/data/make_encoder_reference.py --repa-dir /tmp/REPA --clip-dir /tmp/CLIP \\
        --dino-dir /tmp/dino --dinov2-dir /tmp/dinov2

REPA gives utils.load_encoders, models/ and train.py; CLIP the model REPA wraps; dino the DINOv1
ViT (REPA's models/dinov1.py is not published); dinov2 what REPA's torch.hub.load fetches;
openai/CLIP imports ftfy.

Per family, a reduced-width (and reduced-depth) model of the official code is given seeded random
weights saved in the official checkpoint layout (e.g. MoCo v3's
{'state_dict': {'module.base_encoder.*'}} with its blocks.13 naming bug, MAE's {'model': ...},
I-JEPA's {'encoder': {'module.*'}}, CLIP's fp16 TorchScript archive, all at their 224 px
pos-embed); REPA's utils.load_encoders loads that file (its model constructors swapped for the
reduced ones, the checkpoint read from ./ckpts as REPA does), train.py's preprocess_raw_image feeds
it, and REPA's token slicing picks the tokens. Only the layout (key, shape, dtype, value mean/std),
the seeds and the tokens are written: the test re-derives the same weights with official_state().
None of the reference code is stored here.
"""

import argparse
import ast
import os
import sys
import tempfile
import types
from functools import partial

import torch
import torch.nn as nn

IMAGE_SEED, WEIGHT_SEED = 0, 1
# reduced width and heads of every family except CLIP (openai/CLIP: heads = width // 64)
W, HEADS = 32, 2
VIT = dict(
    embed_dim=W, depth=2, num_heads=HEADS, mlp_ratio=4, qkv_bias=True,
    norm_layer=partial(nn.LayerNorm, eps=1e-6),
)


def parse_args(argv=None):
    """Command line: where the reference checkouts are and where to write the tensors."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repa-dir", required=True, help="path of an official REPA checkout")
    p.add_argument("--clip-dir", required=True, help="path of an openai/CLIP checkout")
    p.add_argument("--dino-dir", required=True, help="path of a facebookresearch/dino checkout")
    p.add_argument("--dinov2-dir", required=True, help="path of a facebookresearch/dinov2 checkout")
    p.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "encoder_reference.pt"),
        help="output",
    )
    return p.parse_args(argv)


def images():
    """The test batch: one uint8 image (1, 3, 256, 256), re-derived from its seed by the test."""
    return torch.randint(0, 256, (1, 3, 256, 256),
                         generator=torch.Generator().manual_seed(IMAGE_SEED), dtype=torch.uint8)


def value_stats(key, shape):
    """(mean, std) of a key's random values: norm scales near 1, biases small, weights ~
    1/sqrt(fan_in)."""
    leaf = key.rsplit("/", 1)[-1]
    if any(
        s in leaf for s in ("pos", "cls_token", "class_embedding", "register_tokens", "mask_token")
    ):
        return 0.0, 0.5
    if len(shape) == 1:
        return (1.0, 0.1) if leaf.endswith(("weight", "gamma")) else (0.0, 0.1)
    fan_in = 1
    for n in shape[1:]:
        fan_in *= n
    return 0.0, fan_in ** -0.5


def official_state(layout, seed=WEIGHT_SEED):
    """layout [(path 'a/b/key', shape, dtype, mean, std)] -> the nested checkpoint dict with seeded
    random values."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for path, shape, dtype, mean, std in layout:
        *outer, key = path.split("/")
        d = state
        for o in outer:
            d = d.setdefault(o, {})
        d[key] = (mean + std * torch.randn(shape, generator=g)).to(dtype)
    return state


class Archive(nn.Module):
    """Root of a TorchScript archive that only carries parameters, as openai/CLIP's released
    ViT-L-14.pt does."""

    def forward(self):
        """TorchScript needs one method to compile."""
        return 0


def save_torchscript(state, path):
    """A flat state dict ('visual.conv1.weight', ...) -> a TorchScript archive whose state_dict() is
    that dict."""
    root = Archive()
    for key, value in state.items():
        *path_, leaf = key.split(".")
        module = root
        for name in path_:
            if not hasattr(module, name):
                module.add_module(name, nn.Module())
            module = getattr(module, name)
        module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    torch.jit.script(root).save(path)


def layout_of(nested, dtype=None, prefix=""):
    """A nested checkpoint dict of tensors -> its layout (see official_state), values' dtype forced
    if given."""
    out = []
    for k, v in nested.items():
        if isinstance(v, dict):
            out += layout_of(v, dtype, f"{prefix}{k}/")
        else:
            out.append((prefix + k, tuple(v.shape), dtype or v.dtype,
                        *value_stats(prefix + k, tuple(v.shape))))
    return out


def repa_preprocess(repa_dir):
    """REPA train.py's preprocess_raw_image and its CLIP constants, taken from the file without
    importing train.py."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision.transforms import Normalize

    tree = ast.parse(open(os.path.join(repa_dir, "train.py")).read())
    keep = [
        n
        for n in tree.body
        if (isinstance(n, ast.FunctionDef) and n.name == "preprocess_raw_image")
        or (
            isinstance(n, ast.Assign)
            and any(getattr(t, "id", "").startswith("CLIP_DEFAULT") for t in n.targets)
        )
    ]
    scope = dict(torch=torch, Normalize=Normalize, IMAGENET_DEFAULT_MEAN=IMAGENET_DEFAULT_MEAN,
                 IMAGENET_DEFAULT_STD=IMAGENET_DEFAULT_STD)
    exec(compile(ast.Module(body=keep, type_ignores=[]), "train.py", "exec"), scope)
    return scope["preprocess_raw_image"]


def dinov2_model(args, name):
    """A reduced DINOv2 hub model: hubconf's _make_dinov2_model arguments, reduced width and depth.
    """
    sys.path.insert(0, args.dinov2_dir)
    from dinov2.models.vision_transformer import DinoVisionTransformer

    return DinoVisionTransformer(
        img_size=518, patch_size=14, init_values=1.0, ffn_layer="mlp", block_chunks=0,
        num_register_tokens=4 if "reg" in name else 0,
        interpolate_antialias=False, interpolate_offset=0.1, embed_dim=W, depth=2, num_heads=HEADS,
        mlp_ratio=4,
    )


def official_files(args):
    """Per REPA name: (our test's timm overrides, ckpts/ file name, official-layout checkpoint of a
    reduced model)."""
    from models import jepa, mae_vit, mocov3_vit

    sys.path.insert(0, args.dino_dir)
    import vision_transformer as dino_vit

    sys.path.insert(0, args.clip_dir)
    from clip.model import CLIP

    vit, small = VIT, dict(embed_dim=W, depth=2, num_heads=HEADS)
    files = {}
    for name in ("dinov2-vit-s", "dinov2reg-vit-s"):
        files[name] = (small, None, dinov2_model(args, name).state_dict())
    files["dinov1-vit-b"] = (
        small,
        "dinov1_vitb.pth",
        dino_vit.VisionTransformer(patch_size=16, **vit).state_dict(),
    )
    moco = mocov3_vit.VisionTransformerMoCo(
        img_size=224, patch_size=16, **dict(vit, depth=15)
    ).state_dict()
    bug = {"blocks.13.norm1": "blocks.13.norm13", "blocks.13.mlp.fc1": "blocks.13.mlp.fc13",
           "blocks.14.norm2": "blocks.14.norm14", "blocks.14.mlp.fc2": "blocks.14.mlp.fc14"}
    moco = {
        "module.base_encoder."
        + next((k.replace(a, b) for a, b in bug.items() if k.startswith(a)), k): v
        for k, v in moco.items()
        if not k.startswith("head")
    }
    moco.update(
        {
            "module.base_encoder.head.0.weight": torch.zeros(8, W),
            "module.predictor.0.weight": torch.zeros(8, 8),
            "module.momentum_encoder.cls_token": torch.zeros(1, 1, W),
        }
    )
    files["mocov3-vit-s"] = (dict(small, depth=15), "mocov3_vits.pth", {"state_dict": moco})
    # 224 px, as released
    mae = mae_vit.VisionTransformer(num_classes=0, patch_size=16, **vit).state_dict()
    files["mae-vit-l"] = (small, "mae_vitl.pth", {"model": mae})
    enc = jepa.VisionTransformer(img_size=[224], patch_size=14, **vit).state_dict()
    files["jepa-vit-h"] = (
        small,
        "ijepa_vith.pth",
        {
            "encoder": {"module." + k: v for k, v in enc.items()},
            "target_encoder": {"module." + k: v for k, v in enc.items()},
        },
    )
    clip = CLIP(
        embed_dim=16, image_resolution=224, vision_layers=2, vision_width=64, vision_patch_size=14,
        context_length=4, vocab_size=8, transformer_width=64, transformer_heads=1,
        transformer_layers=1,
    )
    files["clip-vit-l"] = (
        dict(embed_dim=64, depth=2, num_heads=1), "ViT-L-14.pt", clip.state_dict(),
    )
    return files


def main(args):
    """Run REPA's load_encoders + preprocess_raw_image + token slicing per family on the reduced
    official files."""
    sys.path.insert(0, args.repa_dir)
    # REPA's utils.py (dino's vision_transformer imports its trunc_normal_ from it too)
    import utils as repa_utils
    from models import jepa, mae_vit, mocov3_vit

    preprocess = repa_preprocess(args.repa_dir)
    files = official_files(args)
    sys.path.insert(0, args.clip_dir)
    import clip
    import vision_transformer as dino_vit

    vit = VIT
    out_path, workdir = os.path.abspath(args.out), tempfile.mkdtemp()
    clip_load = clip.load
    # REPA's constructors, reduced; the checkpoint file, the resampling and the forward are REPA's
    mocov3_vit.vit_small = lambda: mocov3_vit.VisionTransformerMoCo(
        img_size=256, patch_size=16, **dict(vit, depth=15)
    )
    mae_vit.vit_large_patch16 = lambda **kw: mae_vit.VisionTransformer(
        num_classes=0, patch_size=16, **vit, **kw
    )
    jepa.vit_huge = lambda **kw: jepa.VisionTransformer(**vit, **kw)
    # REPA's dinov1 module is not published: the DINO repo's ViT built for the 16x16 grid
    # REPA resamples to
    sys.modules["models.dinov1"] = types.SimpleNamespace(
        vit_base=lambda: dino_vit.VisionTransformer(img_size=[256], patch_size=16, **vit))
    clip.load = lambda name, device: clip_load(
        os.path.join(workdir, "ckpts", "ViT-L-14.pt"), device=device
    )
    x = images()
    out = dict(
        image_seed=IMAGE_SEED, weight_seed=WEIGHT_SEED, image_sum=int(x.long().sum()), families={}
    )
    os.chdir(workdir)
    os.makedirs("ckpts")
    for name, (arch, fname, state) in files.items():
        # CLIP releases fp16 weights
        dtype = torch.float16 if name.startswith("clip") else torch.float32
        layout = layout_of(state, dtype)
        state = official_state(layout)
        # DINOv2: REPA's torch.hub.load returns the hub model with its official weights
        if fname is None:
            hub = dinov2_model(args, name)
            hub.load_state_dict(state, strict=True)
            torch.hub.load = lambda repo, model: hub
        # CLIP's release is a TorchScript archive; clip.load reads its state_dict()
        elif name.startswith("clip"):
            save_torchscript(state, os.path.join("ckpts", fname))
        else:
            torch.save(state, os.path.join("ckpts", fname))
        (encoder,), (enc_type,), _ = repa_utils.load_encoders(name, "cpu", 256)
        encoder.eval()
        with torch.no_grad():
            # the DINO repo's final-norm tokens; REPA's unpublished module is not known
            if enc_type == "dinov1":
                z = encoder.get_intermediate_layers(preprocess(x, enc_type))[0][:, 1:]
            else:  # REPA train.py's lines after forward_features
                z = encoder.forward_features(preprocess(x, enc_type))
                if "mocov3" in enc_type:
                    z = z[:, 1:]
                if "dinov2" in enc_type:
                    z = z["x_norm_patchtokens"]
        out["families"][name] = dict(
            arch=arch, file=fname or f"{name}.pth", layout=layout, tokens=z.float().clone()
        )
        print(f"{name}: tokens {tuple(z.shape)}, {len(layout)} checkpoint tensors")
    torch.save(out, out_path)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main(parse_args())
