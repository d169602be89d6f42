"""Networks with several branches or plain stacks: RegNetX/Y, GoogLeNet, DLA, DenseNet-BC, VGG."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.zoo import zoo_model
from tests.zoo.mobile import conv_bn
from tests.zoo.resnets import SqueezeExcite


class RegNetBlock(nn.Module):
    """Radosavovic et al. 2020: X block = 1x1, 3x3 group conv (fixed group width), 1x1, residual; Y adds SE."""

    def __init__(self, in_planes: int, planes: int, group_width: int, stride: int, se_ratio: float) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(*conv_bn(in_planes, planes, 1))
        self.conv2 = nn.Sequential(*conv_bn(planes, planes, 3, stride, groups=planes // group_width))
        self.se = SqueezeExcite(planes, round(1 / se_ratio)) if se_ratio else None
        self.conv3 = nn.Sequential(*conv_bn(planes, planes, 1))
        self.shortcut = nn.Sequential(*conv_bn(in_planes, planes, 1, stride)) if stride != 1 or in_planes != planes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv2(F.relu(self.conv1(x))))
        if self.se is not None:
            out = self.se(out)
        out = self.conv3(out)
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class RegNet(nn.Module):
    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...], group_width: int, se_ratio: float) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 16, 3), nn.ReLU(inplace=True))
        layers, in_planes = [], 16
        for planes, depth in zip(widths, depths, strict=True):
            for block in range(depth):
                layers.append(RegNetBlock(in_planes, planes, group_width, 2 if block == 0 else 1, se_ratio))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(in_planes, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


@zoo_model("Radosavovic et al. 2020, Designing Network Design Spaces (RegNetX, group width 8)", "bare")
def regnet_x() -> nn.Module:
    return RegNet((24, 48), (1, 2), group_width=8, se_ratio=0)


@zoo_model("Radosavovic et al. 2020, Designing Network Design Spaces (RegNetY: X + SE)", "ema-wrapper")
def regnet_y() -> nn.Module:
    return RegNet((24, 48), (1, 2), group_width=8, se_ratio=0.25)


class Inception(nn.Module):
    """Szegedy et al. 2015: 1x1, 1x1→3x3, 1x1→3x3→3x3 (the 5x5 as two 3x3), pool→1x1, concatenated."""

    def __init__(self, in_planes: int, n1: int, n3_reduce: int, n3: int, n5_reduce: int, n5: int, pool_planes: int) -> None:
        super().__init__()
        relu = nn.ReLU(inplace=True)
        self.b1 = nn.Sequential(*conv_bn(in_planes, n1, 1), relu)
        self.b2 = nn.Sequential(*conv_bn(in_planes, n3_reduce, 1), relu, *conv_bn(n3_reduce, n3, 3), relu)
        self.b3 = nn.Sequential(*conv_bn(in_planes, n5_reduce, 1), relu, *conv_bn(n5_reduce, n5, 3), relu, *conv_bn(n5, n5, 3), relu)
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), *conv_bn(in_planes, pool_planes, 1), relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Sequential(*conv_bn(1, 32, 3), nn.ReLU(inplace=True))
        self.a3 = Inception(32, 16, 16, 24, 8, 8, 8)
        self.b3 = Inception(56, 24, 24, 32, 8, 16, 16)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.a4 = Inception(88, 32, 16, 32, 8, 16, 16)
        self.linear = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.b3(self.a3(self.pool(self.pre(x)))))
        out = F.avg_pool2d(self.a4(out), 7)
        return self.linear(out.view(out.size(0), -1))


@zoo_model("Szegedy et al. 2015, Going Deeper with Convolutions (GoogLeNet inception)", "net-legacy")
def googlenet() -> nn.Module:
    return GoogLeNet()


class DlaBasic(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(*conv_bn(in_planes, planes, 3, stride))
        self.conv2 = nn.Sequential(*conv_bn(planes, planes, 3))
        self.shortcut = nn.Sequential(*conv_bn(in_planes, planes, 1, stride)) if stride != 1 or in_planes != planes else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class DlaRoot(nn.Module):
    """Yu et al. 2018: an aggregation node concatenates its children's outputs and fuses them with a 1x1 conv."""

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(*conv_bn(in_planes, planes, 1))

    def forward(self, children: list[torch.Tensor]) -> torch.Tensor:
        return F.relu(self.conv(torch.cat(children, 1)))


class DlaTree(nn.Module):
    """A tree of depth ``level``: its left subtree, its right subtree, and a root aggregating both (and the left's input at level 1)."""

    def __init__(self, in_planes: int, planes: int, level: int, stride: int) -> None:
        super().__init__()
        self.level = level
        if level == 1:
            self.root = DlaRoot(2 * planes, planes)
            self.left = DlaBasic(in_planes, planes, stride)
            self.right = DlaBasic(planes, planes, 1)
        else:
            self.root = DlaRoot((level + 1) * planes, planes)
            self.prev_root = DlaBasic(in_planes, planes, stride)
            subtrees = reversed(range(1, level))
            self.levels = nn.ModuleList(DlaTree(in_planes if i == level - 1 else planes, planes, i, stride) for i in subtrees)
            self.node = DlaBasic(planes, planes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.level == 1:
            left = self.left(x)
            return self.root([left, self.right(left)])
        children = [self.prev_root(x)]
        for tree in self.levels:
            x = tree(x)
            children.append(x)
        children.append(self.node(x))
        return self.root(children)


class DLA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Sequential(*conv_bn(1, 16, 3), nn.ReLU(inplace=True))
        self.layer1 = DlaTree(16, 16, 1, 1)
        self.layer2 = DlaTree(16, 32, 2, 2)
        self.layer3 = DlaTree(32, 64, 1, 2)
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.base(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@zoo_model("Yu et al. 2018, Deep Layer Aggregation (DLA trees)", "model-state-dict")
def dla() -> nn.Module:
    return DLA()


class DenseLayer(nn.Module):
    """Huang et al. 2017, DenseNet-BC: BN-ReLU-1x1 (4k) then BN-ReLU-3x3 (k), concatenated onto the input."""

    def __init__(self, in_planes: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """Compression (theta = 0.5) by a 1x1 conv and a 2x2 average pool."""

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetBC(nn.Module):
    def __init__(self, growth: int = 8, layers: tuple[int, ...] = (3, 3, 3)) -> None:
        super().__init__()
        planes = 2 * growth
        self.conv1 = nn.Conv2d(1, planes, 3, padding=1, bias=False)
        stages = []
        for index, count in enumerate(layers):
            for _ in range(count):
                stages.append(DenseLayer(planes, growth))
                planes += growth
            if index < len(layers) - 1:
                stages.append(Transition(planes, planes // 2))
                planes //= 2
        self.dense = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.avg_pool2d(F.relu(self.bn(self.dense(self.conv1(x)))), 7)
        return self.linear(out.view(out.size(0), -1))


@zoo_model("Huang et al. 2017, Densely Connected Convolutional Networks (DenseNet-BC, k=8)", "safetensors")
def densenet_bc() -> nn.Module:
    return DenseNetBC()


class VGG(nn.Module):
    """Simonyan & Zisserman 2015, as CIFAR ports write it: conv-BN-ReLU stacks, max pools, a flatten of a hard-coded size."""

    plan = (16, "M", 32, "M", 64, 64, "M")

    def __init__(self) -> None:
        super().__init__()
        layers, in_planes = [], 1
        for item in self.plan:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [*conv_bn(in_planes, item, 3), nn.ReLU(inplace=True)]
                in_planes = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(64 * 3 * 3, 64), nn.ReLU(inplace=True), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return self.classifier(out.view(out.size(0), 64 * 3 * 3))


@zoo_model("Simonyan & Zisserman 2015, Very Deep Convolutional Networks (VGG, hard-coded flatten)", "legacy-cuda-dataparallel")
def vgg() -> nn.Module:
    return VGG()
