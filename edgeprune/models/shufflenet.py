"""``shufflenet_mini``: ShuffleNetV2 units with channel split and channel shuffle."""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.models.layers import classifier_head, conv_bn
from edgeprune.models.registry import register_model


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave the channels of ``groups`` equal groups.

    Sizes come from the tensor itself, not from constructor arguments, so a
    network whose branches were pruned evenly still reshapes correctly.
    """
    batch, channels, height, width = x.shape
    x = x.reshape(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


def branch(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """1×1 conv → 3×3 depthwise conv (stride) → 1×1 conv, the ShuffleNetV2 main branch."""
    return nn.Sequential(
        conv_bn(in_channels, out_channels, kernel_size=1),
        conv_bn(out_channels, out_channels, stride=stride, groups=out_channels, activation=None),
        conv_bn(out_channels, out_channels, kernel_size=1),
    )


class ShuffleUnit(nn.Module):
    """Stride 1: split channels in half, transform one half. Stride 2: two strided branches. Then concat + shuffle."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        half = out_channels // 2
        self.stride = stride
        if stride == 1:
            self.shortcut = nn.Identity()
            self.branch = branch(in_channels // 2, half, 1)
        else:
            self.shortcut = nn.Sequential(
                conv_bn(in_channels, in_channels, stride=2, groups=in_channels, activation=None),
                conv_bn(in_channels, half, kernel_size=1),
            )
            self.branch = branch(in_channels, half, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            # Explicit split sizes, not x.chunk(2): chunk's SplitBackward0 lacks ``_saved_split_sizes``,
            # so Torch-Pruning 1.6.1 falls back to guessing the offsets and gets them wrong.
            half = x.shape[1] // 2
            kept, transformed = torch.split(x, [half, x.shape[1] - half], dim=1)
        else:
            kept, transformed = x, x
        return channel_shuffle(torch.cat([self.shortcut(kept), self.branch(transformed)], dim=1))


class ShuffleNetMini(nn.Module):
    """Stem + max pool, two stages (a stride-2 unit + a stride-1 unit each), 1×1 feature conv, global pooling, linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (24, 48, 96), features: int = 128) -> None:
        super().__init__()
        units: list[nn.Module] = [conv_bn(in_channels, widths[0]), nn.MaxPool2d(2)]
        for previous, width in zip(widths, widths[1:], strict=False):
            units += [ShuffleUnit(previous, width, stride=2), ShuffleUnit(width, width, stride=1)]
        units.append(conv_bn(widths[-1], features, kernel_size=1))
        self.features = nn.Sequential(*units)
        self.head = classifier_head(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model(family="shufflenet")
def shufflenet_mini(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> ShuffleNetMini:
    """ShuffleNetV2 with channel split, runtime-sized channel shuffle and depthwise convs."""
    return ShuffleNetMini(num_classes, in_channels)
