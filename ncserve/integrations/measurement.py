"""What the framework callbacks share: feeding the measurement split to the Tracker and
turning a framework's logged values into scalars the service accepts."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from ncserve.service.aggregator import MAX_SCALARS, SCALAR_KEY_PATTERN

_NOT_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (nested in mappings, tuples, lists) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def measurement_batches(
    loader: Iterable[Any], device: torch.device, rank: int, world_size: int, shard: bool
) -> Iterator[Any]:
    """This rank's measurement batches on ``device``.

    With ``shard`` every rank walks the same loader and keeps every ``world_size``-th batch
    (rank r the batches r, r + world_size, ...), so the ranks together measure the whole split
    once. Without it the loader is taken to be this rank's shard already.
    """
    for index, batch in enumerate(loader):
        if not shard or index % world_size == rank:
            yield to_device(batch, device)


def service_scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric values of ``values`` under keys the service accepts.

    Frameworks log keys such as ``train/loss``; the service takes 1-64 characters of
    ``[A-Za-z0-9._-]``, so other characters become ``_``. Non-numeric, non-finite and
    multi-element values are left out, as are keys beyond the service's limit per record.
    """
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.detach().item()
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        name = _NOT_KEY_CHARS.sub("_", str(key))[:64]
        if math.isfinite(value) and SCALAR_KEY_PATTERN.fullmatch(name):
            out[name] = float(value)
        if len(out) == MAX_SCALARS:
            break
    return out
