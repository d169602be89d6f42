"""ShuffleNetV2 written the way public CIFAR implementations write it: ``--model tests.shufflenet_public:shufflenet_v2_w05``.

The channel split slices ``x[:, :c]``, the branches are concatenated and the channels shuffled by a
reshape (``view → transpose → reshape`` or ``view → transpose → contiguous → view``), with the sizes
read from the tensor. Torch-Pruning 1.6.1's group construction never finishes on it unaided.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# width → (stage output channels, last conv channels); three stages of (1 down + 3/7/3) units each.
WIDTHS = {0.5: ((48, 96, 192), 1024), 1.0: ((116, 232, 464), 1024)}
UNITS = (3, 7, 3)


class ShuffleBlock(nn.Module):
    """Channel shuffle of ``groups`` groups: view → transpose → reshape (or → contiguous → view)."""

    def __init__(self, groups: int = 2, contiguous_view: bool = False) -> None:
        super().__init__()
        self.groups, self.contiguous_view = groups, contiguous_view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.size()
        x = x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2)
        return x.contiguous().view(n, c, h, w) if self.contiguous_view else x.reshape(n, c, h, w)


class SplitBlock(nn.Module):
    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = int(x.size(1) * self.ratio)
        return x[:, :c, :, :], x[:, c:, :, :]


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, contiguous_view: bool, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = SplitBlock(split_ratio)
        c = int(in_channels * split_ratio)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock(contiguous_view=contiguous_view)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([x1, out], 1))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, contiguous_view: bool) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2, self.bn2 = nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = nn.Conv2d(mid, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock(contiguous_view=contiguous_view)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        out2 = F.relu(self.bn3(self.conv3(x)))
        out2 = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(out2)))))
        return self.shuffle(torch.cat([out1, out2], 1))


class ShuffleNetV2(nn.Module):
    def __init__(self, width: float, num_classes: int = 10, in_channels: int = 1, contiguous_view: bool = False) -> None:
        super().__init__()
        stages, last = WIDTHS[width]
        self.conv1, self.bn1 = nn.Conv2d(in_channels, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24)
        layers, channels = [], 24
        for out_channels, count in zip(stages, UNITS, strict=True):
            blocks = [DownBlock(channels, out_channels, contiguous_view)]
            blocks += [BasicBlock(out_channels, contiguous_view) for _ in range(count)]
            layers.append(nn.Sequential(*blocks))
            channels = out_channels
        self.layer1, self.layer2, self.layer3 = layers
        self.conv2, self.bn2 = nn.Conv2d(channels, last, 1, bias=False), nn.BatchNorm2d(last)
        self.linear = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(out.view(out.size(0), -1))


def shufflenet_v2_w05() -> nn.Module:
    """Width 0.5, shuffle as view → transpose → reshape, for 1×28×28 images."""
    torch.manual_seed(0)
    return ShuffleNetV2(0.5)


def shufflenet_v2_w10() -> nn.Module:
    """Width 1.0, shuffle as view → transpose → contiguous → view, for 1×28×28 images."""
    torch.manual_seed(0)
    return ShuffleNetV2(1.0, contiguous_view=True)
