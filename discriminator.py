"""SARA's representation discriminator and the schedule of its own optimizer.

A ResNet-18 trunk (ImageNet weights) cut after its second stage, with a randomly initialised
1x1 conv in place of conv1 so it reads D_enc-channel token maps (SARA section 3 and appendix A).
It sees encoder tokens (positives) and projected SiT tokens (negatives) as sqrt(N) x sqrt(N) maps.
"""

import torch
import torch.nn as nn
import torchvision

RESNET18_WEIGHTS = "IMAGENET1K_V1"  # torchvision's ImageNet ResNet-18, checksummed by torchvision


class Discriminator(nn.Module):
    """1x1 conv D_enc->64, bn1, relu, layer1, layer2, global average pool, Linear(128, 1)."""

    def __init__(self, in_channels, pretrained=False):
        super().__init__()
        weights = torchvision.models.ResNet18_Weights[RESNET18_WEIGHTS] if pretrained else None
        trunk = torchvision.models.resnet18(weights=weights)
        self.pretrained = pretrained
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=1, bias=False)  # replaces the 7x7 RGB stem
        # No maxpool (our reading, see the README): a 16x16 token map stays 16x16 through layer1, 8x8 after layer2.
        self.bn1, self.relu, self.layer1, self.layer2 = trunk.bn1, trunk.relu, trunk.layer1, trunk.layer2
        self.head = nn.Linear(128, 1)

    def forward(self, x):
        """Token map (B, D_enc, s, s) -> real/fake logit (B,)."""
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))  # (B, 128, s/2, s/2)
        return self.head(x.mean(dim=(2, 3))).squeeze(1)  # (B,)


def build_discriminator(in_channels, pretrained=False, lr=2e-4, betas=(0.5, 0.999)):
    """The discriminator and its own Adam (lr 2e-4, betas (0.5, 0.999): the usual GAN setting; SARA gives none)."""
    disc = Discriminator(in_channels, pretrained)
    return disc, torch.optim.Adam(disc.parameters(), lr=lr, betas=betas)


def is_disc_step(step, every=5):
    """SARA appendix A: one discriminator update per `every` generator updates (steps 0, 5, 10, ...)."""
    return step % every == 0
