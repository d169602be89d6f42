"""``resnet_mini``: a three-stage ResNet with basic blocks."""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.models.layers import classifier_head, conv_bn
from edgeprune.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus a shortcut; a 1×1 conv-BN shortcut where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_channels, out_channels, stride=stride)
        self.conv2 = conv_bn(out_channels, out_channels, activation=None)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv_bn(in_channels, out_channels, kernel_size=1, stride=stride, activation=None)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetMini(nn.Module):
    """Stem, one basic block per stage (stride 1, 2, 2), global pooling, linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, widths[0])
        blocks, previous = [], widths[0]
        for index, width in enumerate(widths):
            blocks.append(BasicBlock(previous, width, stride=1 if index == 0 else 2))
            previous = width
        self.blocks = nn.Sequential(*blocks)
        self.head = classifier_head(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@register_model(family="resnet")
def resnet_mini(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> ResNetMini:
    """ResNet with basic blocks, residual adds and 1×1 downsampling shortcuts (16/32/64 channels)."""
    return ResNetMini(num_classes, in_channels)


@register_model(family="resnet")
def resnet_wide(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> ResNetMini:
    """ResNet with basic blocks at 32/64/128 channels: ~37 M MACs, a CIFAR ResNet-20's compute, for speed benchmarks."""
    return ResNetMini(num_classes, in_channels, widths=(32, 64, 128))
