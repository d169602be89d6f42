"""``densenet_mini``: two DenseNet dense blocks joined by a transition layer."""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.models.layers import conv_bn
from edgeprune.models.registry import register_model


def bn_relu_conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """DenseNet's pre-activation order: BatchNorm → ReLU → conv."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(),
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
    )


class DenseBlock(nn.Module):
    """Each layer sees the concatenation of the block input and every earlier layer's output."""

    def __init__(self, in_channels: int, num_layers: int, growth_rate: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(bn_relu_conv(in_channels + i * growth_rate, growth_rate, 3) for i in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class DenseNetMini(nn.Module):
    """Stem + max pool (28→14), dense block, transition (halve channels, 14→7), dense block, BN-ReLU, pool, linear."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, stem: int = 16, growth_rate: int = 16, layers_per_block: int = 3
    ) -> None:
        super().__init__()
        block1_out = stem + layers_per_block * growth_rate
        transition_out = block1_out // 2
        block2_out = transition_out + layers_per_block * growth_rate
        self.stem = nn.Sequential(conv_bn(in_channels, stem), nn.MaxPool2d(2))
        self.block1 = DenseBlock(stem, layers_per_block, growth_rate)
        self.transition = nn.Sequential(bn_relu_conv(block1_out, transition_out, 1), nn.AvgPool2d(2))
        self.block2 = DenseBlock(transition_out, layers_per_block, growth_rate)
        self.head = nn.Sequential(
            nn.BatchNorm2d(block2_out), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(block2_out, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.transition(self.block1(self.stem(x)))))


@register_model(family="densenet")
def densenet_mini(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> DenseNetMini:
    """DenseNet with torch.cat dense blocks (growth 16) and a 1×1 conv + avg-pool transition."""
    return DenseNetMini(num_classes, in_channels)
