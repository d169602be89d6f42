"""``padded_shortcut_net``: a ResNet whose shortcuts couple channels invisibly to a dependency graph.

The widening shortcuts zero-pad the channel dimension with ``F.pad`` (the
CIFAR ResNet "option A") and the narrowing shortcut keeps ``x[:, :k]``; both
amounts are ints fixed at construction. Pruning either side changes one
operand of the residual add but not the other, so a pruner that trusts its
graph produces a network that no longer runs. The model trains normally; it
exists to test that such damage is detected rather than shipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeprune.models.layers import classifier_head, conv_bn
from edgeprune.models.registry import register_model


class PaddedShortcutBlock(nn.Module):
    """Two 3×3 conv-BN layers; the shortcut subsamples, then zero-pads or truncates channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_channels, out_channels, stride=stride)
        self.conv2 = conv_bn(out_channels, out_channels, activation=None)
        self.stride = stride
        self.pad_channels = max(out_channels - in_channels, 0)
        self.keep_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x[:, : self.keep_channels, :: self.stride, :: self.stride]
        if self.pad_channels:
            # (W left, W right, H top, H bottom, C front, C back)
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad_channels))
        return F.relu(self.conv2(self.conv1(x)) + shortcut)


class PaddedShortcutNet(nn.Module):
    """Stem, four parameter-free-shortcut blocks (16, 32 ↓, 64 ↓, 48), global pooling, linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64, 48)) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, widths[0])
        strides = (1, 2, 2, 1)
        blocks, previous = [], widths[0]
        for width, stride in zip(widths, strides, strict=True):
            blocks.append(PaddedShortcutBlock(previous, width, stride))
            previous = width
        self.blocks = nn.Sequential(*blocks)
        self.head = classifier_head(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@register_model(family="resnet", untracked_coupling=True)
def padded_shortcut_net(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> PaddedShortcutNet:
    """ResNet with F.pad channel-padding and x[:, :k] slicing shortcuts (coupling a graph cannot see)."""
    return PaddedShortcutNet(num_classes, in_channels)
