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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ncserve.integrations.measurement import ScheduledTracking, service_scalars

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as err:
    raise ImportError(
        "ncserve.integrations.hf needs transformers: pip install 'ncserve[hf]'"
    ) from err

# Trainer log keys sent with each nc0 record, under the names nclaunch uses.
_LOG_SCALARS = {"loss": "train_loss", "learning_rate": "lr", "grad_norm": "grad_norm"}


class NCTrackerCallback(ScheduledTracking, TrainerCallback):
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

    _MODEL_IS = "the Trainer's model"
    _logs: dict[str, float]

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
        self._logs = {}  # the Trainer's latest logged values, sent with each record
        self._start_tracker(
            model,
            Path(args.output_dir or ".") / "ncserve",
            _default_metadata(args, model, optimizer),
        )
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
        self._close_tracker()

    # -- the work ----------------------------------------------------------------------------

    def _measure(self, args: TrainingArguments, state: TrainerState, epoch: int) -> None:
        self._measure_step(state.global_step, epoch, args.device, self._logs)


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
