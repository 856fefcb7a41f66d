"""Regenerate tests/data/repa_reference.pt from an official REPA checkout (not part of this repo).

    git clone https://github.com/sihyun-yu/REPA /tmp/REPA
    python tests/data/make_repa_reference.py --repa-dir /tmp/REPA

Only tensors are written (REPA's outputs on a tiny SiT); none of REPA's code is stored here.
"""

import argparse
import os
import sys

import torch

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, mlp_ratio=4.0,
            class_dropout_prob=0.1, num_classes=10, encoder_depth=2, z_dims=[16, 8], projector_dim=24)


def parse_args(argv=None):
    """Command line: where the REPA checkout is and where to write the tensors."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repa-dir", required=True, help="path of an official REPA checkout")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "repa_reference.pt"), help="output file")
    return p.parse_args(argv)


def model_reference(repa_sit):
    """REPA's SiT on a tiny config: seeded init stats, perturbed weights, eval and train outputs."""
    torch.manual_seed(0)
    net = repa_sit(path_type="linear", decoder_hidden_size=TINY["hidden_size"], qk_norm=False, **TINY)
    init = {k: torch.stack([v.double().sum(), v.double().square().sum()]) for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in net.state_dict().items()}  # zero-inits too
    net.load_state_dict(state)
    x, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g), torch.tensor([1, 10, 3])
    net.eval()
    with torch.no_grad():
        v_eval, zs_eval = net(x, t, y)
        net.train()
        torch.manual_seed(2)  # label dropout draws from the global RNG
        v_train, _ = net(x, t, y)
    return dict(config=TINY, init_stats=init, state_dict=state, x=x, t=t, y=y,
                v_eval=v_eval, zs_eval=zs_eval, v_train=v_train)


def main(args):
    """Import REPA from its checkout, compute the references, save them."""
    sys.path.insert(0, args.repa_dir)
    from models.sit import SiT as RepaSiT

    torch.save(dict(model=model_reference(RepaSiT)), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(parse_args())
