"""What the framework callbacks share: their schedule and Tracker, feeding the measurement
split to it, and turning a framework's logged values into scalars the service accepts."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ncserve.protocol import MAX_SCALARS, SCALAR_KEY_PATTERN
from ncserve.track import Tracker

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


class ScheduledTracking:
    """The state and the work both framework callbacks share: the measurement split, how
    often to measure, and the Tracker, which is made when training starts (the process
    group, the device and any FSDP wrapping exist by then)."""

    # What the measured model is, for the error when a caller passes model= as well.
    _MODEL_IS = "the model being trained"

    def __init__(
        self,
        measure_dataloader: Iterable[Any],
        every_n_epochs: int = 1,
        shard_across_ranks: bool = True,
        **tracker_kwargs: Any,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if "model" in tracker_kwargs:
            raise ValueError(f"model is {self._MODEL_IS}; do not pass model=")
        self.measure_dataloader = measure_dataloader
        self.every_n_epochs = int(every_n_epochs)
        self.shard_across_ranks = shard_across_ranks
        self.tracker_kwargs = tracker_kwargs
        self.tracker: Tracker | None = None
        self.latest_metrics: dict[str, float] | None = None
        self._measured_steps: set[int] = set()
        self._nc0_steps: set[int] = set()

    def _start_tracker(self, model: nn.Module, run_dir: Path, metadata: Mapping[str, str]) -> None:
        """The Tracker, with ``run_dir`` and ``metadata`` as defaults under the caller's own."""
        kwargs = dict(self.tracker_kwargs)
        kwargs.setdefault("run_dir", run_dir)
        kwargs["metadata"] = {**metadata, **(kwargs.get("metadata") or {})}
        self.tracker = Tracker(model, **kwargs)

    def _measure_step(
        self, step: int, epoch: int, device: torch.device, scalars: Mapping[str, float]
    ) -> dict[str, float] | None:
        """Measure once per step (a collective: every rank calls it); the metrics on rank 0."""
        if self.tracker is None or step in self._measured_steps:
            return None
        self._measured_steps.add(step)
        batches = measurement_batches(
            self.measure_dataloader,
            device,
            self.tracker.rank,
            self.tracker.world_size,
            self.shard_across_ranks,
        )
        metrics = self.tracker.measure(batches, step=step, epoch=epoch, scalars=scalars)
        if metrics is not None:
            self.latest_metrics = metrics
        return metrics

    def _close_tracker(self) -> None:
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            tracker.close()
