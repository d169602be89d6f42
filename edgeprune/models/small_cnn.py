"""``small_cnn``: the bundled example, a compact VGG-style CNN."""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.models.layers import conv_bn
from edgeprune.models.registry import register_model


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages (32, 64, 128 channels), each followed by 2×2 max pooling, then a linear layer.

    The classifier sees the flattened 3×3 (28 px input) or 4×4 (32 px) feature
    map rather than a global average: on the 6,000-image Fashion-MNIST subset
    it reaches ~89 % in 4 epochs where global pooling stays near 82 %.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        for width in widths:
            stages += [conv_bn(in_channels, width), nn.MaxPool2d(2)]
            in_channels = width
        self.features = nn.Sequential(*stages)
        side = image_size // 2 ** len(widths)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * side * side, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model(family="cnn")
def small_cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> SmallCNN:
    """Compact CNN (conv 32/64/128 + BN + ReLU + max pooling, linear); the default example model."""
    return SmallCNN(num_classes, in_channels, image_size)
