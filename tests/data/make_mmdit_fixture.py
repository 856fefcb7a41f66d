"""Regenerate tests/data/mmdit_reference.pt from an official REPA checkout (not part of this repo).

    git clone https://github.com/sihyun-yu/REPA /tmp/REPA
    pip install einops  # REPA's models/mmdit.py imports it (and transformers)
    python tests/data/make_mmdit_fixture.py --repa-dir /tmp/REPA

REPA's MMDiT at a tiny config (depth 2: 64 wide, 2 heads, 256 image tokens, 8 text tokens) built
with a fixed seed: its initial-weight statistics, its weights (stored one byte each, see quantize),
fixed inputs and its outputs; plus the key -> shape table of REPA's full-size model (depth 24) and
its parameter count. Only tensors and names are written (REPA's outputs); none of REPA's code is.
"""

import argparse
import os
import sys

import torch

TINY = dict(input_size=32, patch_size=2, in_channels=4, depth=2, mlp_ratio=1.0, encoder_depth=1,
            z_dims=[16, 8], projector_dim=24)
CONTEXT = (2, 8, 768)  # batch, text tokens (any number joins the attention; CLIP gives 77), width


def parse_args(argv=None):
    """Command line: where the REPA checkout is and where to write the tensors."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repa-dir", required=True, help="path of an official REPA checkout")
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "mmdit_reference.pt"),
        help="output file",
    )
    return p.parse_args(argv)


def quantize(state):
    """Each float tensor on a grid of 255 levels of its own range: int8 codes and one scale, so the
    fixture stays small; dequantize(quantize(s)) is the exact set of weights the outputs came from.
    """
    out = {}
    for k, v in state.items():
        scale = v.abs().max().clamp_min(1e-12) / 127
        out[k] = dict(codes=torch.round(v / scale).to(torch.int8), scale=scale.reshape(()))
    return out


def dequantize(packed):
    """int8 codes and scales -> the float32 state dict (the tests call this too)."""
    return {k: p["codes"].float() * p["scale"] for k, p in packed.items()}


def reference(repa_mmdit):
    """REPA's MMDiT, tiny: seeded init stats, its weights on the byte grid, inputs and outputs."""
    torch.manual_seed(0)
    net = repa_mmdit(**TINY)
    init = {
        k: torch.stack([v.double().sum(), v.double().square().sum()])
        for k, v in net.state_dict().items()
    }
    packed = quantize(net.state_dict())
    net.load_state_dict(dequantize(packed), strict=True)
    g = torch.Generator().manual_seed(1)
    # inputs stored in half precision (exact values: the forward runs on their float32 copies)
    x = torch.randn(CONTEXT[0], 4, 32, 32, generator=g).half()
    t, context = torch.rand(CONTEXT[0], generator=g), torch.randn(CONTEXT, generator=g).half()
    net.eval()
    with torch.no_grad():
        v, zs = net(x.float(), t, context=context.float())
    return dict(config=TINY, init_stats=init, state=packed, x=x, t=t, context=context, v=v, zs=zs)


def full_size(repa_mmdit):
    """The key -> shape table and parameter count of REPA's train_t2i.py model (depth 24, one
    768-wide encoder at block 8), built on the meta device (no memory)."""
    with torch.device("meta"):
        net = repa_mmdit(input_size=32, z_dims=[768], encoder_depth=8)
    shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
    return dict(shapes=shapes, params=sum(p.numel() for p in net.parameters()))


def main(args):
    """Import REPA's MMDiT from its checkout, compute the references, save them."""
    sys.path.insert(0, args.repa_dir)
    from models.mmdit import MMDiT as RepaMMDiT

    torch.save(dict(tiny=reference(RepaMMDiT), full=full_size(RepaMMDiT)), args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KB)")


if __name__ == "__main__":
    main(parse_args())
