"""Mobile networks as published for CIFAR: MobileNetV1, EfficientNet-B0-style, ShuffleNetV1 and V2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.zoo import zoo_model
from tests.zoo.resnets import SqueezeExcite


def conv_bn(in_planes: int, planes: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_planes, planes, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(planes)]


class MobileNetV1(nn.Module):
    """Howard et al. 2017: depthwise 3x3 + pointwise 1x1 pairs, strides (1, 2) per the paper's CIFAR variants."""

    plan = (32, (64, 2), 64, (128, 2), 128)

    def __init__(self) -> None:
        super().__init__()
        layers, in_planes = [*conv_bn(1, 16, 3), nn.ReLU(inplace=True)], 16
        for item in self.plan:
            planes, stride = item if isinstance(item, tuple) else (item, 1)
            layers += [*conv_bn(in_planes, in_planes, 3, stride, groups=in_planes), nn.ReLU(inplace=True)]
            layers += [*conv_bn(in_planes, planes, 1), nn.ReLU(inplace=True)]
            in_planes = planes
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(in_planes, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.avg_pool2d(self.features(x), 7)
        return self.linear(out.view(out.size(0), -1))


@zoo_model("Howard et al. 2017, MobileNets (depthwise separable)", "net-legacy")
def mobilenet_v1() -> nn.Module:
    return MobileNetV1()


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swish(x)


def drop_connect(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Tan & Le 2019: drop the whole residual branch per sample during training, rescaling the rest."""
    if not training or rate == 0:
        return x
    keep = torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device) >= rate
    return x * keep / (1 - rate)


class MBConv(nn.Module):
    """Expand 1x1, depthwise kxk, squeeze-and-excitation (swish gate), project 1x1; a residual add with drop-connect."""

    def __init__(self, in_planes: int, planes: int, expansion: int, kernel: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        inner = in_planes * expansion
        self.expand = nn.Sequential(*conv_bn(in_planes, inner, 1)) if expansion != 1 else nn.Identity()
        self.depthwise = nn.Sequential(*conv_bn(inner, inner, kernel, stride, groups=inner))
        self.se = SqueezeExcite(inner, 4 * expansion, gate=Swish())
        self.project = nn.Sequential(*conv_bn(inner, planes, 1))
        self.residual = stride == 1 and in_planes == planes
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = swish(self.expand(x)) if not isinstance(self.expand, nn.Identity) else x
        out = self.project(self.se(swish(self.depthwise(out))))
        if self.residual:
            out = drop_connect(out, self.drop_rate, self.training) + x
        return out


class EfficientNet(nn.Module):
    """Tan & Le 2019, B0's stage pattern (expansion, kernel, stride) at a fraction of its widths."""

    stages = ((1, 8, 1, 3, 1), (6, 16, 2, 3, 2), (6, 24, 2, 5, 2), (6, 32, 2, 3, 1))  # expansion, planes, blocks, kernel, stride

    def __init__(self, drop_rate: float = 0.2) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 16, 3))
        layers, in_planes = [], 16
        total = sum(stage[2] for stage in self.stages)
        for expansion, planes, blocks, kernel, stride in self.stages:
            for block in range(blocks):
                rate = drop_rate * len(layers) / total
                layers.append(MBConv(in_planes, planes, expansion, kernel, stride if block == 0 else 1, rate))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(*conv_bn(in_planes, 64, 1))
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = swish(self.head(self.layers(swish(self.stem(x)))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@zoo_model("Tan & Le 2019, EfficientNet (B0-style: SE, swish, drop-connect)", "safetensors")
def efficientnet_b0() -> nn.Module:
    return EfficientNet()


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Zhang et al. 2018: reshape to (groups, channels/groups), transpose, flatten back."""
    batch, channels, height, width = x.size()
    return x.view(batch, groups, channels // groups, height, width).permute(0, 2, 1, 3, 4).reshape(batch, channels, height, width)


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; stride 2 concatenates an average-pooled shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride, self.groups = stride, groups
        inner = planes // 4
        first_groups = 1 if in_planes == 24 else groups  # the paper: no grouping on the first 1x1 of stage 2
        branch = planes - in_planes if stride == 2 else planes
        self.conv1 = nn.Conv2d(in_planes, inner, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride, 1, groups=inner, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, branch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(channel_shuffle(out, self.groups)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    def __init__(self, groups: int = 2, widths: tuple[int, ...] = (48, 96), blocks: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 24, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        layers, in_planes = [], 24
        for planes in widths:
            for block in range(blocks):
                layers.append(ShuffleV1Unit(in_planes, planes, 2 if block == 0 else 1, groups))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(in_planes, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@zoo_model("Zhang et al. 2018, ShuffleNet (grouped 1x1 + channel shuffle, g=2)", "legacy-cuda-dataparallel")
def shufflenet_v1() -> nn.Module:
    return ShuffleNetV1()


class ShuffleV2Unit(nn.Module):
    """Ma et al. 2018: split channels in half, transform one half, concatenate, shuffle; stride 2 transforms both."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch_in = in_planes if stride == 2 else in_planes // 2
        half = planes // 2
        self.branch = nn.Sequential(
            *conv_bn(branch_in, half, 1), nn.ReLU(inplace=True), *conv_bn(half, half, 3, stride, groups=half), *conv_bn(half, half, 1)
        )
        self.branch.append(nn.ReLU(inplace=True))
        if stride == 2:
            self.shortcut = nn.Sequential(*conv_bn(in_planes, in_planes, 3, 2, groups=in_planes), *conv_bn(in_planes, half, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            out = torch.cat([self.shortcut(x), self.branch(x)], 1)
        else:
            left, right = x.chunk(2, dim=1)
            out = torch.cat([left, self.branch(right)], 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 64), blocks: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(*conv_bn(1, 16, 3), nn.ReLU(inplace=True))
        layers, in_planes = [], 16
        for planes in widths:
            for block in range(blocks):
                layers.append(ShuffleV2Unit(in_planes, planes, 2 if block == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.conv_last = nn.Sequential(*conv_bn(in_planes, 96, 1), nn.ReLU(inplace=True))
        self.linear = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_last(self.layers(self.conv1(x)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@zoo_model("Ma et al. 2018, ShuffleNet V2 (channel split + shuffle)", "zip-cuda-compiled")
def shufflenet_v2() -> nn.Module:
    return ShuffleNetV2()
