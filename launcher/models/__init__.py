"""Model factory: ``build_model(name, input_shape, num_classes, width)``.

Every model ends in one ``nn.Linear`` stored as ``model.classifier``; its input
is the penultimate feature h that Neural Collapse is measured on, and
``forward`` returns its output, the logits.

Supported input shapes (per sample, without the batch axis):

- ``mlp``: any shape; the input is flattened.
- ``resnet9``, ``vgg9``, ``resnet18``, ``resnet50``, ``vit``: ``(C, H, W)`` images
  of any size from 1x1 up (2-D layers), and signals ``(L,)`` (one channel) or
  ``(C, L)`` (1-D layers: Conv1d, BatchNorm1d, ...), e.g. mnist1d's ``(40,)``.
  Global pooling makes the feature width independent of the input size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from launcher.models.mlp import MLP
from launcher.models.resnet import ResNet9, resnet18, resnet50
from launcher.models.vgg import VGG9
from launcher.models.vit import ViT

MODEL_NAMES: tuple[str, ...] = ("mlp", "resnet9", "vgg9", "resnet18", "resnet50", "vit")

_BUILDERS: dict[str, Callable[[tuple[int, ...], int, float], nn.Module]] = {
    "mlp": MLP,
    "resnet9": ResNet9,
    "vgg9": VGG9,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vit": ViT,
}


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0
) -> nn.Module:
    """The model ``name`` for samples of ``input_shape``, with ``num_classes`` logits.

    ``width`` multiplies every channel and hidden count (rounded, at least 1).
    Raises ValueError naming the argument, the value and what is accepted.
    """
    if name not in _BUILDERS:
        raise ValueError(f"model must be one of {', '.join(MODEL_NAMES)}; got {name!r}")
    shape = tuple(input_shape)
    if not shape or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise ValueError(
            f"model {name!r}: input_shape must be a non-empty tuple of positive integers, "
            f"got {input_shape!r}"
        )
    if name != "mlp" and len(shape) > 3:
        raise ValueError(
            f"model {name!r} takes inputs of shape (L,), (C, L) or (C, H, W); got input shape "
            f"{shape} (use 'mlp' for other shapes)"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not (isinstance(width, int | float) and math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a positive finite number, got {width!r}")
    return _BUILDERS[name](shape, num_classes, float(width))


__all__ = ["MODEL_NAMES", "build_model"]
