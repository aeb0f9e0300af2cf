"""Parameter shapes of the models the benchmarks use (so benchmarks need no model code)."""

from __future__ import annotations


def resnet18_shapes(num_classes: int = 10) -> list[tuple[int, ...]]:
    """The 62 parameter tensors (11.17M weights) of ResNet-18 for CIFAR (3x3 stem), BatchNorm/GroupNorm affine
    parameters included."""
    shapes: list[tuple[int, ...]] = [(64, 3, 3, 3), (64,), (64,)]
    in_channels = 64
    for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            shapes += [(out_channels, in_channels, 3, 3), (out_channels,), (out_channels,),
                       (out_channels, out_channels, 3, 3), (out_channels,), (out_channels,)]
            if block == 0 and (stride != 1 or in_channels != out_channels):
                shapes += [(out_channels, in_channels, 1, 1), (out_channels,), (out_channels,)]
            in_channels = out_channels
    shapes += [(num_classes, 512), (num_classes,)]
    return shapes
