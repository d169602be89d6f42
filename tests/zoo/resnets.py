"""Residual networks as published for CIFAR: option-A ResNet, pre-activation ResNet, ResNeXt, SENet."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.zoo import zoo_model


class PadShortcut(nn.Module):
    """Option A (He et al. 2015): subsample by a strided slice and zero-pad the channels, no parameters.

    The pad amount is a hard-coded channel count, as the public implementations write it.
    """

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)


class BasicBlockA(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = PadShortcut(planes) if stride != 1 or in_planes != planes else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetA(nn.Module):
    """ResNet-(6n+2) for CIFAR with 16/32/64 channels (the paper's widths) and option-A shortcuts."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        blocks = (depth - 2) // 6
        self.in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, blocks, 1)
        self.layer2 = self._stage(32, blocks, 2)
        self.layer3 = self._stage(64, blocks, 2)
        self.linear = nn.Linear(64, num_classes)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for index in range(blocks):
            layers.append(BasicBlockA(self.in_planes, planes, stride if index == 0 else 1))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


@zoo_model("He et al. 2015, Deep Residual Learning (CIFAR ResNet-20, option A)", "legacy-cuda-dataparallel")
def resnet20_a() -> nn.Module:
    return CifarResNetA(20)


def resnet56_a() -> nn.Module:
    """ResNet-56 option A: the depth the benchmark prunes (not in the corpus: too slow for the test budget)."""
    return CifarResNetA(56)


class PreActBlock(nn.Module):
    """He et al. 2016: BN-ReLU before each conv; a 1x1 projection only where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        layers, in_planes = [], widths[0]
        for index, planes in enumerate(widths):
            for block in range(blocks):
                layers.append(PreActBlock(in_planes, planes, 2 if index and not block else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@zoo_model("He et al. 2016, Identity Mappings in Deep Residual Networks (pre-activation ResNet)", "zip-cuda-compiled")
def preact_resnet() -> nn.Module:
    return PreActResNet()


class ResNeXtBlock(nn.Module):
    """Xie et al. 2017: 1x1 reduce, 3x3 grouped (cardinality groups), 1x1 expand, projection shortcut."""

    def __init__(self, in_planes: int, cardinality: int, group_width: int, stride: int, se: bool = False) -> None:
        super().__init__()
        inner, out_planes = cardinality * group_width, 2 * cardinality * group_width
        self.conv1 = nn.Conv2d(in_planes, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.se = SqueezeExcite(out_planes, 4) if se else nn.Identity()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return F.relu(out + self.shortcut(x))


class SqueezeExcite(nn.Module):
    """Hu et al. 2018: global pool, bottleneck of 1x1 convs, sigmoid gate multiplied onto the input."""

    def __init__(self, channels: int, reduction: int, gate: nn.Module | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, max(channels // reduction, 4), 1)
        self.fc2 = nn.Conv2d(max(channels // reduction, 4), channels, 1)
        self.gate = gate or nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(self.gate(self.fc1(weight))))


class ResNeXt(nn.Module):
    def __init__(self, cardinality: int = 4, group_width: int = 4, blocks: int = 1, se: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for stage in range(3):
            for block in range(blocks):
                layers.append(ResNeXtBlock(in_planes, cardinality, group_width, 2 if stage and not block else 1, se))
                in_planes = 2 * cardinality * group_width
            group_width *= 2
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(in_planes, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@zoo_model("Xie et al. 2017, Aggregated Residual Transformations (ResNeXt, cardinality 4)", "ema-wrapper")
def resnext() -> nn.Module:
    return ResNeXt(blocks=2)


class SEBasicBlock(nn.Module):
    """A basic block with squeeze-and-excitation on the residual branch before the add."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SqueezeExcite(planes, 8)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return F.relu(out + self.shortcut(x))


class SENet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for index, planes in enumerate(widths):
            for block in range(blocks):
                layers.append(SEBasicBlock(in_planes, planes, 2 if index and not block else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(in_planes, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        out = F.avg_pool2d(out, out.size(3))
        return self.linear(out.view(out.size(0), -1))


@zoo_model("Hu et al. 2018, Squeeze-and-Excitation Networks (SE-ResNet)", "model-state-dict")
def senet() -> nn.Module:
    return SENet()
