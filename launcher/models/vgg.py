"""VGG9: eight 3-wide conv layers with batch norm, then one linear classifier."""

from __future__ import annotations

import torch
from torch import nn

from launcher.models.layers import (
    channels_first,
    conv_bn_relu,
    global_avg_pool,
    max_pool,
    scaled,
)

# Channel counts; "M" halves the spatial size.
VGG9_LAYOUT: tuple[int | str, ...] = (
    64,
    "M",
    128,
    "M",
    256,
    256,
    "M",
    512,
    512,
    "M",
    512,
    512,
    "M",
)


class VGG9(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        in_channels, spatial, to_channels_first = channels_first(input_shape)
        rank = len(spatial)
        layers: list[nn.Module] = [to_channels_first]
        size = min(spatial)
        for item in VGG9_LAYOUT:
            if item == "M":
                # Small inputs (8x8 digits) run out of resolution before the last pool.
                if size >= 2:
                    layers.append(max_pool(rank))
                    size //= 2
                continue
            out_channels = scaled(int(item), width)
            layers.append(conv_bn_relu(rank, in_channels, out_channels))
            in_channels = out_channels
        layers += [global_avg_pool(rank), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
