"""Regenerate tests/data/repa_reference.pt from an official REPA checkout (not part of this repo).

    git clone https://github.com/sihyun-yu/REPA /tmp/REPA
    python tests/data/make_repa_reference.py --repa-dir /tmp/REPA

Also writes repa_sampler_reference.pt (samplers.py on a tiny SiT) and repa_t2i_sampler_reference.pt
(samplers_t2i.py on tests/helpers.py's TextVelocity). Only tensors are written (REPA's outputs);
none of REPA's code is stored here.
"""

import argparse
import os
import sys

import torch

TINY = dict(
    input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, mlp_ratio=4.0,
    class_dropout_prob=0.1, num_classes=10, encoder_depth=2,
    z_dims=[16, 8],
    projector_dim=24,
)


def parse_args(argv=None):
    """Command line: where the REPA checkout is and where to write the tensors."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repa-dir", required=True, help="path of an official REPA checkout")
    p.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "repa_reference.pt"),
        help="output file",
    )
    p.add_argument(
        "--sampler-out",
        default=os.path.join(os.path.dirname(__file__), "repa_sampler_reference.pt"),
        help="output file of the sampler references (test_sample.py)",
    )
    p.add_argument(
        "--t2i-sampler-out",
        default=os.path.join(os.path.dirname(__file__), "repa_t2i_sampler_reference.pt"),
        help="output file of the text-to-image sampler references (test_t2i_sample.py)",
    )
    return p.parse_args(argv)


def model_reference(repa_sit):
    """REPA's SiT on a tiny config: seeded init stats, perturbed weights, eval and train outputs."""
    torch.manual_seed(0)
    net = repa_sit(
        path_type="linear", decoder_hidden_size=TINY["hidden_size"], qk_norm=False, **TINY
    )
    init = {
        k: torch.stack([v.double().sum(), v.double().square().sum()])
        for k, v in net.state_dict().items()
    }
    g = torch.Generator().manual_seed(1)
    # every weight perturbed, zero-inits too
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    x, t, y = (
        torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g), torch.tensor([1, 10, 3]),
    )
    net.eval()
    with torch.no_grad():
        v_eval, zs_eval = net(x, t, y)
        net.train()
        torch.manual_seed(2)  # label dropout draws from the global RNG
        v_train, _ = net(x, t, y)
    return dict(config=TINY, init_stats=init, state_dict=state, x=x, t=t, y=y,
                v_eval=v_eval, zs_eval=zs_eval, v_train=v_train)


SAMPLER_TINY = dict(
    input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2, mlp_ratio=4.0,
    class_dropout_prob=0.1, num_classes=10, encoder_depth=1,
    z_dims=[8],
    projector_dim=8,
)
# (sampler, num_steps, heun, cfg, guidance_low, guidance_high, path_type): 8 Euler steps put t at
# k/8, so [0.3, 0.7] starts and ends between steps, where deciding guidance at the wrong time would
# change the result. The path changes only the SDE (its score); the ODEs integrate the velocity
# whatever the path.
SAMPLER_CASES = [
    ("sde", 8, False, 1.0, 0.0, 1.0, "linear"),
    ("sde", 8, False, 1.5, 0.3, 0.7, "linear"),
    ("ode", 8, False, 1.0, 0.0, 1.0, "linear"),
    ("ode", 8, False, 2.0, 0.3, 0.7, "linear"),
    ("ode", 8, True, 1.0, 0.0, 1.0, "linear"),
    ("ode", 8, True, 2.0, 0.3, 0.7, "linear"),
    ("sde", 8, False, 1.0, 0.0, 1.0, "cosine"),
    ("sde", 8, False, 1.5, 0.3, 0.7, "cosine"),
]


def sampler_reference(repa_sit, samplers, sample_seed):
    """REPA's euler_maruyama_sampler / euler_sampler (Heun too) on a tiny SiT, with CFG
    and guidance interval.

    REPA hard-codes the null label 1000; the wrapper maps it to this tiny model's null class
    (num_classes). Batch cases draw everything from the global RNG seeded with 10 + case index; the
    per-sample case runs each global index alone with the global RNG seeded as sample.py seeds that
    index's own generator.
    """
    torch.manual_seed(0)
    net = repa_sit(
        path_type="linear",
        decoder_hidden_size=SAMPLER_TINY["hidden_size"],
        qk_norm=False,
        **SAMPLER_TINY,
    )
    g = torch.Generator().manual_seed(1)
    # every weight perturbed, zero-inits too
    state = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    net.eval()
    null = SAMPLER_TINY["num_classes"]
    model = lambda x, t, y: net(x, t, torch.where(y == 1000, null, y))  # noqa: E731
    cases = []
    for k, (name, steps, heun, cfg, low, high, path_type) in enumerate(SAMPLER_CASES):
        torch.manual_seed(10 + k)
        x, y = torch.randn(3, 4, 8, 8), torch.randint(0, null, (3,))
        sampler = samplers.euler_maruyama_sampler if name == "sde" else samplers.euler_sampler
        out = sampler(
            model, x, y, num_steps=steps, heun=heun, cfg_scale=cfg, guidance_low=low,
            guidance_high=high, path_type=path_type,
        )
        cases.append(
            dict(
                sampler=name, num_steps=steps, heun=heun, cfg=cfg, guidance_low=low,
                guidance_high=high, path_type=path_type,
                global_seed=10 + k,
                x=x, y=y, out=out,
            )
        )
    seed, indices, per_sample = 7, [0, 1, 2], []
    # generate.py's draws (noise, then label, then the SDE's), one sample at a time
    for i in indices:
        torch.manual_seed(sample_seed(seed, i))
        x, y = torch.randn(1, 4, 8, 8), torch.randint(0, null, (1,))
        per_sample.append(
            samplers.euler_maruyama_sampler(
                model, x, y, num_steps=6, cfg_scale=1.5, guidance_high=0.7
            )
        )
    per_index = dict(
        seed=seed,
        indices=indices,
        seeds=[sample_seed(seed, i) for i in indices],
        num_steps=6, cfg=1.5, guidance_low=0.0, guidance_high=0.7,
        out=torch.cat(per_sample),
    )
    return dict(config=SAMPLER_TINY, state_dict=state, cases=cases, per_index=per_index)


# (sampler, num_steps, heun, cfg, guidance_low, guidance_high, path_type): Table 4's ODE with 50
# steps, with and without guidance 2.0, Heun and SDE with the interval, the cosine path's score.
T2I_CASES = [
    ("ode", 50, False, 1.0, 0.0, 1.0, "linear"),
    ("ode", 50, False, 2.0, 0.0, 1.0, "linear"),
    ("ode", 8, True, 2.0, 0.3, 0.7, "linear"),
    ("sde", 20, False, 1.0, 0.0, 1.0, "linear"),
    ("sde", 20, False, 2.0, 0.0, 1.0, "linear"),
    ("sde", 8, False, 2.0, 0.3, 0.7, "cosine"),
]


def t2i_sampler_reference(text_velocity, samplers_t2i, sample_seed):
    """REPA's samplers_t2i.py (euler_sampler, euler_maruyama_sampler) with a text context and the
    null context repeated over the batch, as generate_t2i.py calls them, on a tiny TextVelocity.

    Batch cases draw x, the contexts and the SDE noise from the global RNG seeded with 20 + case
    index; the per-sample case runs each global index alone with the global RNG seeded as sample.py
    seeds that index's own generator (noise first, then the SDE's).
    """
    torch.manual_seed(0)
    net = text_velocity().eval()
    g = torch.Generator().manual_seed(1)
    null = torch.randn(1, 77, 16, generator=g)  # the empty caption's features
    cases = []
    for k, (name, steps, heun, cfg, low, high, path_type) in enumerate(T2I_CASES):
        torch.manual_seed(20 + k)
        x, context = torch.randn(3, 4, 8, 8), torch.randn(3, 77, 16)
        sampler = (samplers_t2i.euler_maruyama_sampler if name == "sde"
                   else samplers_t2i.euler_sampler)
        out = sampler(
            net, x, context, null.repeat(3, 1, 1), num_steps=steps, heun=heun, cfg_scale=cfg,
            guidance_low=low, guidance_high=high, path_type=path_type,
        )
        cases.append(dict(sampler=name, num_steps=steps, heun=heun, cfg=cfg, guidance_low=low,
                          guidance_high=high, path_type=path_type, global_seed=20 + k, x=x,
                          context=context, out=out))
    seed, indices = 7, [0, 1, 2]
    contexts = torch.randn(len(indices), 77, 16, generator=g)  # sample i's caption features
    per_sample = []
    for i in indices:
        torch.manual_seed(sample_seed(seed, i))
        x = torch.randn(1, 4, 8, 8)
        per_sample.append(samplers_t2i.euler_maruyama_sampler(
            net, x, contexts[i:i + 1], null, num_steps=6, cfg_scale=2.0, guidance_high=0.7
        ))
    per_index = dict(seed=seed, indices=indices, contexts=contexts, num_steps=6, cfg=2.0,
                     guidance_low=0.0, guidance_high=0.7, out=torch.cat(per_sample))
    return dict(state_dict=net.state_dict(), null=null, cases=cases, per_index=per_index)


def main(args):
    """Import REPA from its checkout, compute the references, save them."""
    sys.path.insert(0, args.repa_dir)
    from models.sit import SiT as RepaSiT

    torch.save(dict(model=model_reference(RepaSiT)), args.out)
    print(f"wrote {args.out}")

    import samplers  # REPA's samplers.py
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    from sample import sample_seed  # this repo: how sample.py seeds each sample's generator

    torch.save(sampler_reference(RepaSiT, samplers, sample_seed), args.sampler_out)
    print(f"wrote {args.sampler_out}")

    import samplers_t2i  # REPA's samplers_t2i.py
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from helpers import TextVelocity  # tests/helpers.py: the stand-in MMDiT

    torch.save(t2i_sampler_reference(TextVelocity, samplers_t2i, sample_seed), args.t2i_sampler_out)
    print(f"wrote {args.t2i_sampler_out}")


if __name__ == "__main__":
    main(parse_args())
