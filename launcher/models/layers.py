"""Layer choices shared by the convolutional models, for 1-D signals and 2-D images.

The same architecture is built with Conv1d/BatchNorm1d/... for a signal
(channels x length) and with the 2-D layers for an image (channels x H x W),
so 1-D datasets such as mnist1d run through every model.
"""

from __future__ import annotations

from torch import nn


def channels_first(input_shape: tuple[int, ...]) -> tuple[int, tuple[int, ...], nn.Module]:
    """(in_channels, spatial size, module that adds a channel axis when the input has none).

    (L,) is a one-channel signal, (C, L) a C-channel signal, (C, H, W) an image.
    """
    if len(input_shape) == 1:
        return 1, input_shape, nn.Unflatten(1, (1, input_shape[0]))
    return input_shape[0], input_shape[1:], nn.Identity()


def conv(
    rank: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    bias: bool = True,
) -> nn.Module:
    layer = nn.Conv1d if rank == 1 else nn.Conv2d
    return layer(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)


def batch_norm(rank: int, channels: int) -> nn.Module:
    return (nn.BatchNorm1d if rank == 1 else nn.BatchNorm2d)(channels)


def max_pool(rank: int) -> nn.Module:
    return (nn.MaxPool1d if rank == 1 else nn.MaxPool2d)(2)


def global_avg_pool(rank: int) -> nn.Module:
    return (nn.AdaptiveAvgPool1d if rank == 1 else nn.AdaptiveAvgPool2d)(1)


def global_max_pool(rank: int) -> nn.Module:
    return (nn.AdaptiveMaxPool1d if rank == 1 else nn.AdaptiveMaxPool2d)(1)


def conv_bn_relu(rank: int, in_channels: int, out_channels: int) -> nn.Sequential:
    """3-wide convolution that keeps the spatial size, then batch norm and ReLU."""
    return nn.Sequential(
        conv(rank, in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        batch_norm(rank, out_channels),
        nn.ReLU(inplace=True),
    )


def scaled(channels: int, width: float) -> int:
    """A channel or hidden count multiplied by the model's width factor, at least 1."""
    return max(1, round(channels * width))
