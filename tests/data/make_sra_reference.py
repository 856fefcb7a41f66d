"""Regenerate tests/data/sra_reference.pt from an official SRA checkout (not part of this repo).

    git clone https://github.com/vvvvvjdy/SRA /tmp/SRA
    python tests/data/make_sra_reference.py --sra-dir /tmp/SRA

SRA's SiT (SiT-SRA/models/sit.py) and SRALoss (SiT-SRA/loss.py, the paper's smooth-L1) on a tiny
config: a student in training mode and a different EMA teacher in eval mode, every random draw of
the loss (time, teacher offset, noise, label dropout) fixed and recorded. Only tensors are written
(SRA's inputs and outputs, its weights under this repo's key names); none of SRA's code is stored.
"""

import argparse
import copy
import os
import sys

import torch

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=4, num_heads=2,
            mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10)
STUDENT_DEPTH, TEACHER_DEPTH, T_MAX, BATCH = 1, 3, 0.2, 6
HEAD_KEYS = {"ap_head.linear1.": "self_head.0.", "ap_head.linear2.": "self_head.2."}


def parse_args(argv=None):
    """Command line: where the SRA checkout is and where to write the tensors."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sra-dir", required=True, help="path of an official SRA checkout")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "sra_reference.pt"),
                   help="output file")
    return p.parse_args(argv)


def renamed(state):
    """SRA's state dict under model.py's keys: its SimpleHead ap_head is our self_head."""
    out = {}
    for k, v in state.items():
        for old, new in HEAD_KEYS.items():
            k = k.replace(old, new) if k.startswith(old) else k
        out[k] = v.clone()
    return out


def perturb(net, seed, scale):
    """Move every trained weight off its (often zero) initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name != "pos_embed":  # the frozen sin-cos table stays as built
                p.add_(scale * torch.randn(p.shape, generator=g))


def main(args):
    sys.path.insert(0, os.path.join(args.sra_dir, "SiT-SRA"))
    from loss import SRALoss
    from models.sit import SiT

    torch.manual_seed(0)
    student = SiT(path_type="linear", decoder_hidden_size=TINY["hidden_size"], qk_norm=False,
                  fused_attn=True, **TINY)
    perturb(student, 1, 0.1)
    teacher = copy.deepcopy(student)
    perturb(teacher, 2, 0.02)  # an EMA that lags the student
    student.train()
    teacher.eval()

    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(BATCH, 4, 8, 8, generator=g)
    labels = torch.randint(0, TINY["num_classes"], (BATCH,), generator=g)
    t = torch.rand(BATCH, 1, 1, 1, generator=g)
    t[0] = 0.05  # with dt = 0.9 the teacher's time 0.05 - 0.18 clamps to 0
    dt = torch.rand(BATCH, 1, 1, 1, generator=g)
    dt[0] = 0.9
    eps = torch.randn(BATCH, 4, 8, 8, generator=g)
    drop_u = torch.tensor([0.5, 0.05, 0.9, 0.02, 0.3, 0.7])  # labels 1 and 3 dropped (p = 0.1)

    # SRALoss draws with torch.rand / rand_like / randn_like and the label embedder with torch.rand:
    # hand them the recorded draws, in the order the code asks for them.
    queues = {"rand": [t, drop_u], "rand_like": [dt], "randn_like": [eps]}
    real = {name: getattr(torch, name) for name in queues}
    outputs = {}
    student.register_forward_hook(lambda m, i, o: outputs.setdefault("student", o))
    teacher.register_forward_hook(lambda m, i, o: outputs.setdefault("teacher", o))
    try:
        for name, queue in queues.items():
            setattr(torch, name, lambda *a, _q=queue, **k: _q.pop(0).clone())
        loss_fn = SRALoss(prediction="v", path_type="linear", weighting="uniform",
                          block_out_s=STUDENT_DEPTH, block_out_t=TEACHER_DEPTH, t_max=T_MAX,
                          loss_type="sml1")
        velocity, align = loss_fn(student, x0, teacher, labels)
    finally:
        for name, fn in real.items():
            setattr(torch, name, fn)
    assert not any(queues.values()), "SRA's code drew fewer numbers than recorded"
    ref = dict(
        student=renamed(student.state_dict()), teacher=renamed(teacher.state_dict()),
        x0=x0, labels=labels, t=t.flatten(), dt=dt.flatten(), eps=eps, drop=drop_u < 0.1,
        v=outputs["student"][0].detach(), h_self=outputs["student"][1].detach(),
        h_teacher=outputs["teacher"][1].detach(), velocity=velocity.mean().detach(),
        self_loss=align.detach(), student_depth=torch.tensor(STUDENT_DEPTH),
        teacher_depth=torch.tensor(TEACHER_DEPTH), t_max=torch.tensor(T_MAX),
    )
    torch.save(ref, args.out)
    print(f"wrote {args.out}: velocity {ref['velocity']:.6f}, L_SRA {ref['self_loss']:.6f}")


if __name__ == "__main__":
    main(parse_args())
