"""Residual networks: ResNet9 (the fast CIFAR design) and CIFAR-style ResNet18/ResNet50.

All three start with a stride-1 3-wide stem instead of ImageNet's 7-wide stride-2
stem and max pool, because the inputs here are 8 to 32 pixels on a side.
"""

from __future__ import annotations

import torch
from torch import nn

from launcher.models.layers import (
    batch_norm,
    channels_first,
    conv,
    conv_bn_relu,
    global_avg_pool,
    global_max_pool,
    max_pool,
    scaled,
)


class Residual(nn.Module):
    """x + f(x) for a shape-preserving f."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """prep -> [conv, pool, residual] -> [conv, pool] -> [conv, pool, residual] -> global max pool.

    Channels 64, 128, 256, 512 (x width). A pool is left out once the signal or
    image is down to a single position, so inputs as small as 1 pixel work.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        in_channels, spatial, to_channels_first = channels_first(input_shape)
        rank = len(spatial)
        c1, c2, c3, c4 = (scaled(c, width) for c in (64, 128, 256, 512))
        size = min(spatial)

        def downsample() -> list[nn.Module]:
            nonlocal size
            if size < 2:
                return []
            size //= 2
            return [max_pool(rank)]

        def residual(channels: int) -> nn.Module:
            return Residual(
                nn.Sequential(
                    conv_bn_relu(rank, channels, channels), conv_bn_relu(rank, channels, channels)
                )
            )

        self.features = nn.Sequential(
            to_channels_first,
            conv_bn_relu(rank, in_channels, c1),
            conv_bn_relu(rank, c1, c2),
            *downsample(),
            residual(c2),
            conv_bn_relu(rank, c2, c3),
            *downsample(),
            conv_bn_relu(rank, c3, c4),
            *downsample(),
            residual(c4),
            global_max_pool(rank),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(c4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3-wide convs with an identity (or 1-wide projection) shortcut."""

    expansion = 1

    def __init__(self, rank: int, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.body = nn.Sequential(
            conv(rank, in_channels, channels, kernel_size=3, stride=stride, padding=1, bias=False),
            batch_norm(rank, channels),
            nn.ReLU(inplace=True),
            conv(rank, channels, out_channels, kernel_size=3, padding=1, bias=False),
            batch_norm(rank, out_channels),
        )
        self.shortcut = _shortcut(rank, in_channels, out_channels, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1-wide reduce, 3-wide (strided) conv, 1-wide expand by 4, plus shortcut."""

    expansion = 4

    def __init__(self, rank: int, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.body = nn.Sequential(
            conv(rank, in_channels, channels, kernel_size=1, bias=False),
            batch_norm(rank, channels),
            nn.ReLU(inplace=True),
            conv(rank, channels, channels, kernel_size=3, stride=stride, padding=1, bias=False),
            batch_norm(rank, channels),
            nn.ReLU(inplace=True),
            conv(rank, channels, out_channels, kernel_size=1, bias=False),
            batch_norm(rank, out_channels),
        )
        self.shortcut = _shortcut(rank, in_channels, out_channels, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def _shortcut(rank: int, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        conv(rank, in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        batch_norm(rank, out_channels),
    )


class ResNet(nn.Module):
    """Four stages of blocks (64, 128, 256, 512 base channels x width), strides 1, 2, 2, 2.

    A stride-2 3-wide conv with padding 1 maps size 1 to size 1, so no stage
    needs to be skipped for small inputs.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks_per_stage: tuple[int, int, int, int],
        input_shape: tuple[int, ...],
        num_classes: int,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        in_channels, spatial, to_channels_first = channels_first(input_shape)
        rank = len(spatial)
        stem_channels = scaled(64, width)
        layers: list[nn.Module] = [
            to_channels_first,
            conv_bn_relu(rank, in_channels, stem_channels),
        ]
        in_channels = stem_channels
        for stage, num_blocks in enumerate(blocks_per_stage):
            channels = scaled(64 * 2**stage, width)
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(block(rank, in_channels, channels, stride))
                in_channels = channels * block.expansion
        layers += [global_avg_pool(rank), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def resnet18(input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), input_shape, num_classes, width)


def resnet50(input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), input_shape, num_classes, width)
