"""MAST encoder: a ResNet-18 variant with output stride 4 (MAST_NOTES "Encoder").

conv1 7x7/2 + BN + ReLU (no max-pool), layer1 (w, /1), layer2 (2w, /2), layer3 (4w, /1),
layer4 (4w, /1), no dilation. With w = 64 this is the reference code's `ResNet18(3)`; the
attribute names follow it (`conv1`, `bn1`, `layer1`..`layer4`) since they are checkpoint API.

Shapes: x (B, 3, H, W) -> (B, 4w, ceil(H/4), ceil(W/4)).
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convolutions and an identity (or 1x1) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet18(nn.Module):
    """Stride-4 ResNet-18 trunk.

    Args:
        in_channels: input channels (3 Lab channels).
        width: base width w; stages have (w, 2w, 4w, 4w) channels.
    """

    def __init__(self, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(width, width, stride=1)
        self.layer2 = self._stage(width, 2 * width, stride=2)
        self.layer3 = self._stage(2 * width, 4 * width, stride=1)
        self.layer4 = self._stage(4 * width, 4 * width, stride=1)
        self.out_channels = 4 * width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, w, H/2, W/2)
        x = self.layer1(x)
        x = self.layer2(x)  # (B, 2w, H/4, W/4)
        x = self.layer3(x)
        return self.layer4(x)  # (B, 4w, H/4, W/4)
