"""Models as a user would bring them: ``--model tests.user_models:tiny_cnn``."""

import torch
from torch import nn


class TinyCnn(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCnn()


def tiny_cnn_rgb() -> nn.Module:
    torch.manual_seed(0)
    return TinyCnn(in_channels=3)


def not_a_module():
    return "hello"
