"""``mobilenetv2_mini``: MobileNetV2 inverted residuals at Fashion-MNIST scale."""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.models.layers import classifier_head, conv_bn
from edgeprune.models.registry import register_model

# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper's table 2.
# Every stage halves the resolution (28→14→7→4): expanded, depthwise layers at full 28×28 would
# dominate CPU training time (BatchNorm and depthwise backward scale with activation size).
MINI_SETTINGS = ((1, 16, 1, 2), (4, 24, 2, 2), (4, 48, 2, 2))
# The CIFAR MobileNetV2 (width 1.0; strides 1 where ImageNet's are 2 in the stem and the second stage), as in
# Torch-Pruning's CIFAR benchmarks: 17 inverted residuals, 10 of them with a residual add.
CIFAR_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """1×1 expansion → 3×3 depthwise → linear 1×1 projection; residual add when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn(in_channels, hidden, kernel_size=1, activation=nn.ReLU6))
        layers += [
            conv_bn(hidden, hidden, stride=stride, groups=hidden, activation=nn.ReLU6),
            conv_bn(hidden, out_channels, kernel_size=1, activation=None),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2Mini(nn.Module):
    """Stem, inverted residual stages from ``settings`` (t, c, n, s rows), 1×1 feature conv, global pooling, linear."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        stem: int = 16,
        features: int = 128,
        settings: tuple[tuple[int, int, int, int], ...] = MINI_SETTINGS,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(in_channels, stem, activation=nn.ReLU6)]
        previous = stem
        for expansion, width, repeats, stride in settings:
            for repeat in range(repeats):
                layers.append(InvertedResidual(previous, width, stride if repeat == 0 else 1, expansion))
                previous = width
        layers.append(conv_bn(previous, features, kernel_size=1, activation=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.head = classifier_head(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model(family="mobilenetv2")
def mobilenetv2_mini(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> MobileNetV2Mini:
    """MobileNetV2 with inverted residuals, depthwise convs, expansion 4 and residual adds."""
    return MobileNetV2Mini(num_classes, in_channels)


@register_model(family="mobilenetv2")
def mobilenetv2_cifar(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> MobileNetV2Mini:
    """MobileNetV2 at full width with CIFAR strides: ~77 M MACs at 28×28, the issue's reference network for speed benchmarks."""
    return MobileNetV2Mini(num_classes, in_channels, stem=32, features=1280, settings=CIFAR_SETTINGS)
