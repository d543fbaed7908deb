"""Multi-layer perceptron on the flattened input."""

from __future__ import annotations

import math

import torch
from torch import nn

from launcher.models.layers import scaled


class MLP(nn.Module):
    """Flatten -> depth x (Linear -> ReLU) -> classifier. Hidden width 512 x width."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        width: float = 1.0,
        depth: int = 3,
        hidden: int = 512,
    ) -> None:
        super().__init__()
        hidden = scaled(hidden, width)
        layers: list[nn.Module] = [nn.Flatten()]
        in_features = math.prod(input_shape)
        for _ in range(depth):
            layers += [nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
            in_features = hidden
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
