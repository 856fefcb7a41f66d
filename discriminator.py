"""SARA's representation discriminator and the schedule of its own optimizer.

A ResNet-18 trunk (ImageNet weights) cut after its second stage, with a randomly initialised
1x1 conv in place of conv1 so it reads D_enc-channel token maps (SARA section 3 and appendix A).
It sees encoder tokens (positives) and projected SiT tokens (negatives) as sqrt(N) x sqrt(N) maps.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision

import encoders

RESNET18_WEIGHTS = "IMAGENET1K_V1"  # torchvision's ImageNet ResNet-18, checksummed by torchvision


class Discriminator(nn.Module):
    """1x1 conv D_enc->64, bn1, relu, layer1, layer2, global average pool, Linear(128, 1)."""

    def __init__(self, in_channels, pretrained=False, weights=None):
        """pretrained: torchvision's ImageNet weights (downloaded once), or the same file given as
        weights."""
        super().__init__()
        hub = torchvision.models.ResNet18_Weights[RESNET18_WEIGHTS]
        download = hub if pretrained and weights is None else None
        if download:  # offline, torch.hub's download would fail only after a while
            encoders.check_download(
                download.url, "the ResNet-18 trunk",
                f"download {download.url} elsewhere and pass --disc-weights FILE")
        trunk = torchvision.models.resnet18(weights=download)
        # torchvision's resnet18-f37072fd.pth, for machines without network access
        if weights is not None:
            trunk.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.pretrained = pretrained or weights is not None
        # replaces the 7x7 RGB stem
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=1, bias=False)
        # No maxpool (our reading, see the README): a 16x16 token map stays 16x16 through layer1,
        # 8x8 after layer2.
        self.bn1, self.relu, self.layer1, self.layer2 = (
            trunk.bn1, trunk.relu, trunk.layer1, trunk.layer2,
        )
        self.head = nn.Linear(128, 1)

    def forward(self, x):
        """Token map (B, D_enc, s, s) -> real/fake logit (B,)."""
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))  # (B, 128, s/2, s/2)
        return self.head(x.mean(dim=(2, 3))).squeeze(1)  # (B,)


class AllReduceSum(torch.autograd.Function):
    """Sum over the ranks whose backward sums the gradients over the ranks too (each rank gets d
    sum_r L_r)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, summed over the ranks.

    torch.nn.SyncBatchNorm runs on CUDA only; this one all-reduces per-channel sums (gloo or NCCL)
    with a backward that all-reduces their gradients, so every rank's gradient is its share of the
    one-process gradient, as DDP expects. Outside a process group it is a plain BatchNorm2d.
    """

    def forward(self, x):
        """(B, C, H, W) -> (B, C, H, W), normalised with the mean and variance over every rank's B x
        H x W."""
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.float()
        count = x.numel() // x.shape[1] * dist.get_world_size()  # equal shares on every rank
        mean = AllReduceSum.apply(xf.sum(dim=(0, 2, 3))) / count  # (C,)
        # (B, C, H, W); two passes: no E[x^2] - E[x]^2 cancellation
        centred = xf - mean[:, None, None]
        # (C,) biased, as BatchNorm2d
        var = AllReduceSum.apply(centred.square().sum(dim=(0, 2, 3))) / count
        # running statistics as BatchNorm2d keeps them: unbiased variance, momentum (none while
        # losses.frozen holds them)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1), self.momentum)
                self.num_batches_tracked += 1
        y = (
            centred * torch.rsqrt(var + self.eps)[:, None, None] * self.weight[:, None, None]
            + self.bias[:, None, None]
        )
        return y.to(x.dtype)


def sync_batchnorm(module):
    """module with every BatchNorm2d replaced by a SyncBatchNorm2d holding the same parameters and
    statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SyncBatchNorm2d):
            synced = SyncBatchNorm2d(child.num_features, child.eps, child.momentum).to(
                child.weight.device
            )
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced)
        else:
            sync_batchnorm(child)
    return module


def build_discriminator(
    in_channels, pretrained=False, lr=2e-4, betas=(0.5, 0.999), sync_bn=False, weights=None
):
    """The discriminator and its own Adam (lr 2e-4, betas (0.5, 0.999): the usual GAN setting; SARA
    gives none).

    sync_bn: batch statistics over the global batch under DDP (SyncBatchNorm2d) instead of per rank;
    weights: a local file of the ImageNet ResNet-18 instead of the download.
    """
    disc = Discriminator(in_channels, pretrained, weights)
    disc = sync_batchnorm(disc) if sync_bn else disc
    return disc, torch.optim.Adam(disc.parameters(), lr=lr, betas=betas)


def is_disc_step(step, every=5):
    """SARA appendix A: one discriminator update per `every` generator updates
    (steps 0, 5, 10, ...)."""
    return step % every == 0
