"""Models: an MLP and a small CNN for fast CPU runs, ResNet-18 (CIFAR variant, GroupNorm) for the paper's setting."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig


class MLP(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> None:
        super().__init__()
        features = 1
        for d in input_shape:
            features *= d
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(features, 8 * width), nn.ReLU(),
                                 nn.Linear(8 * width, 4 * width), nn.ReLU(), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """conv5x5(w) - pool - conv5x5(2w) - pool - fc(16w) - fc(classes), as in FedAvg's MNIST CNN (w = 32)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> None:
        super().__init__()
        channels, height, width_px = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 2 * width * (height // 4) * (width_px // 4)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, 16 * width), nn.ReLU(),
                                        nn.Linear(16 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.GroupNorm(groups, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), GroupNorm instead of BatchNorm (no running
    statistics to federate), as DisPFL/FedSpa's line of work uses."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, groups: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, 64)
        layers, in_channels = [], 64
        for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(in_channels, out_channels, stride, groups), BasicBlock(out_channels, out_channels, 1, groups)]
            in_channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(self.layers(out)), 1))


def build_model(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model named in the config, for inputs of `input_shape` (C, H, W) or (features,)."""
    if config.name == "custom":
        raise ValueError("model.name=custom: the run was given its own model; pass model_fn= to fedspa.train.run")
    if config.name == "mlp":
        return MLP(input_shape, num_classes, config.width)
    if len(input_shape) != 3:
        raise ValueError(f"model {config.name} needs image inputs (C, H, W), got input shape {input_shape}")
    if config.name == "cnn":
        if input_shape[1] < 4 or input_shape[2] < 4:
            raise ValueError(f"model cnn needs images of at least 4x4, got {input_shape}")
        return CNN(input_shape, num_classes, config.width)
    if config.name == "resnet18":
        return ResNet18(input_shape, num_classes)
    raise ValueError(f"unknown model {config.name!r}")
