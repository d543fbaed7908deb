"""Hugging Face ``transformers`` callback: Neural Collapse metrics of a model in ``Trainer``.

Install with ``pip install 'ncserve[hf]'``::

    from ncserve.integrations.hf import NCTrackerCallback

    callback = NCTrackerCallback(measure_loader, every_n_epochs=1, run_id="my-run")
    Trainer(model, args, train_dataset=train, callbacks=[callback]).train()

A thin adapter over ``ncserve.track.Tracker``. Measurement batches are mappings as the
Trainer's own (``input_ids``, ``attention_mask``, ..., ``labels``): the model runs on
everything but ``labels``, and the Tracker captures the input of its last ``nn.Linear``
(``classifier`` in ``*ForSequenceClassification`` models).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ncserve.integrations.measurement import measurement_batches, service_scalars
from ncserve.track import Tracker

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as err:
    raise ImportError(
        "ncserve.integrations.hf needs transformers: pip install 'ncserve[hf]'"
    ) from err

# Trainer log keys sent with each nc0 record, under the names nclaunch uses.
_LOG_SCALARS = {"loss": "train_loss", "learning_rate": "lr", "grad_norm": "grad_norm"}


class NCTrackerCallback(TrainerCallback):
    """Measure NC0-NC4 at the start of training, every ``every_n_epochs`` epochs and at the end.

    Every process measures (a collective, like the Tracker's ``measure``); the metrics come
    back on the main process as ``latest_metrics``. At every logged step
    (``TrainingArguments(logging_steps=...)``) nc0 of the classifier is recorded with the
    logged loss, learning rate and gradient norm.

    Args:
        measure_dataloader: the measurement split, batches of mappings with a ``labels``
            key (or (inputs, labels) pairs); moved to ``args.device`` batch by batch.
        every_n_epochs: measure after every n-th training epoch.
        shard_across_ranks: each process keeps every world_size-th batch of the loader, so
            the processes measure the split once between them; pass False when the loader
            already yields this process's shard.
        **tracker_kwargs: ``Tracker`` arguments other than the model: ``classifier``,
            ``num_classes``, ``target``, ``run_id``, ``metadata``, ``run_dir`` (default
            ``<output_dir>/ncserve``), ``token``, ``tls``, ``deadline_s``, ``csv``,
            ``tensorboard``.
    """

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
            raise ValueError("model is the Trainer's model; do not pass model=")
        self.measure_dataloader = measure_dataloader
        self.every_n_epochs = int(every_n_epochs)
        self.shard_across_ranks = shard_across_ranks
        self.tracker_kwargs = tracker_kwargs
        self.tracker: Tracker | None = None
        self.latest_metrics: dict[str, float] | None = None
        self._logs: dict[str, float] = {}
        self._measured_steps: set[int] = set()
        self._nc0_steps: set[int] = set()

    # -- Trainer events ----------------------------------------------------------------------

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("the Trainer passed no model to on_train_begin")
        tracker_kwargs = dict(self.tracker_kwargs)
        tracker_kwargs.setdefault("run_dir", Path(args.output_dir or ".") / "ncserve")
        metadata = tracker_kwargs.get("metadata") or {}
        tracker_kwargs["metadata"] = {**_default_metadata(args, model, optimizer), **metadata}
        self.tracker = Tracker(model, **tracker_kwargs)
        self._measure(args, state, epoch=_epochs_done(state))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        self._logs |= service_scalars(
            {name: logs[key] for key, name in _LOG_SCALARS.items() if key in logs}
        )
        step = state.global_step
        # Training logs only: evaluation and the end-of-training summary carry no "loss".
        if self.tracker is None or "loss" not in logs or step in self._nc0_steps:
            return
        self._nc0_steps.add(step)
        self.tracker.record_nc0(step, scalars=dict(self._logs))

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        epochs_done = _epochs_done(state)
        if epochs_done > 0 and epochs_done % self.every_n_epochs == 0:
            self._measure(args, state, epoch=epochs_done)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # The final weights, unless the last epoch's measurement already saw them.
        self._measure(args, state, epoch=_epochs_done(state))
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            tracker.close()

    # -- the work ----------------------------------------------------------------------------

    def _measure(self, args: TrainingArguments, state: TrainerState, epoch: int) -> None:
        step = state.global_step
        if self.tracker is None or step in self._measured_steps:
            return
        self._measured_steps.add(step)
        batches = measurement_batches(
            self.measure_dataloader,
            args.device,
            self.tracker.rank,
            self.tracker.world_size,
            self.shard_across_ranks,
        )
        metrics = self.tracker.measure(batches, step=step, epoch=epoch, scalars=self._logs)
        if metrics is not None:
            self.latest_metrics = metrics


def _epochs_done(state: TrainerState) -> int:
    # state.epoch is fractional inside an epoch (and None before training starts).
    return math.floor((state.epoch or 0.0) + 1e-6)


def _default_metadata(args: TrainingArguments, model: nn.Module, optimizer: Any) -> dict[str, str]:
    metadata = {
        "model": type(model).__name__,
        "world_size": str(args.world_size),
        "lr": str(args.learning_rate),
        "weight_decay": str(args.weight_decay),
    }
    if optimizer is not None:
        # The Trainer hands over an accelerate wrapper; the optimizer's class is inside it.
        inner = getattr(optimizer, "optimizer", optimizer)
        metadata["optimizer"] = type(inner).__name__.lower()
    return metadata
