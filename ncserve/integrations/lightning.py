"""PyTorch Lightning callback: Neural Collapse metrics of a LightningModule through ncserve.

Install with ``pip install 'ncserve[lightning]'``::

    from ncserve.integrations.lightning import NCTrackerCallback

    callback = NCTrackerCallback(measure_loader, every_n_epochs=1, run_id="my-run")
    lightning.Trainer(callbacks=[callback], log_every_n_steps=10).fit(module, train_loader)

A thin adapter over ``ncserve.track.Tracker``: the hook on the last ``nn.Linear``, both
rounds with the service and the fallback when it is unreachable are the Tracker's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ncserve.integrations.measurement import ScheduledTracking, service_scalars

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as err:
        raise ImportError(
            "ncserve.integrations.lightning needs PyTorch Lightning: "
            "pip install 'ncserve[lightning]'"
        ) from err


class NCTrackerCallback(ScheduledTracking, pl.Callback):
    """Measure NC0-NC4 at fit start, every ``every_n_epochs`` epochs and at the end of fit.

    Every rank measures (a collective, like the Tracker's ``measure``); the metrics come
    back on rank 0 as ``latest_metrics`` and go to the trainer's loggers as ``nc/<metric>``.
    At every logged step (``Trainer(log_every_n_steps=...)``) nc0 of the classifier is
    recorded with the training loss and learning rate.

    Args:
        measure_dataloader: the measurement split, batches of (inputs, labels) or mappings
            with a ``labels`` key; moved to the module's device batch by batch.
        every_n_epochs: measure after every n-th training epoch.
        shard_across_ranks: each rank keeps every world_size-th batch of the loader, so the
            ranks measure the split once between them; pass False when the loader already
            yields this rank's shard (a DistributedSampler).
        **tracker_kwargs: ``Tracker`` arguments other than the model: ``classifier``,
            ``num_classes``, ``target``, ``run_id``, ``metadata``, ``run_dir`` (default
            ``<default_root_dir>/ncserve``), ``token``, ``tls``, ``deadline_s``, ``csv``,
            ``tensorboard``.
    """

    _MODEL_IS = "the LightningModule being fit"

    # -- Lightning hooks ---------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in __init__: the process group, the device and any FSDP wrapping exist.
        self._start_tracker(
            _tracked_model(trainer, pl_module),
            Path(trainer.default_root_dir) / "ncserve",
            _default_metadata(trainer, pl_module),
        )
        self._measure(trainer, pl_module, epoch=trainer.current_epoch)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: torch.Tensor | Mapping[str, Any] | None,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        # An attribute Lightning sets at run time (its logger connector), not a declared one.
        every = int(getattr(trainer, "log_every_n_steps", 50))
        # With gradient accumulation several batches end on one optimizer step.
        if self.tracker is None or step in self._nc0_steps or step % every:
            return
        self._nc0_steps.add(step)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self.tracker.record_nc0(step, scalars=service_scalars({"train_loss": loss, **_lr(trainer)}))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs_done = trainer.current_epoch + 1
        if epochs_done % self.every_n_epochs == 0:
            self._measure(trainer, pl_module, epoch=epochs_done)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The final weights, unless the last epoch's measurement already saw them.
        self._measure(trainer, pl_module, epoch=trainer.current_epoch)
        self._close_tracker()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # close() ends with a barrier the other ranks may never reach; with several ranks
        # the client's exit handler keeps undelivered pushes in the spool instead.
        if trainer.world_size == 1:
            self._close_tracker()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size == 1:
            self._close_tracker()

    # -- the work ----------------------------------------------------------------------------

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        step = trainer.global_step
        scalars = service_scalars({**trainer.callback_metrics, **_lr(trainer)})
        metrics = self._measure_step(step, epoch, pl_module.device, scalars)
        if metrics is None:
            return
        logged = {f"nc/{k}": v for k, v in metrics.items() if math.isfinite(v)}
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=step)


def _tracked_model(trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
    """The module to run: the FSDP1 wrapper when Lightning's FSDP strategy made one.

    The Tracker summons the classifier's parameters through it. Any other wrapper (DDP)
    is skipped: the LightningModule's own forward is what a measurement needs.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = trainer.strategy.model
    return wrapped if isinstance(wrapped, FullyShardedDataParallel) else pl_module


def _lr(trainer: pl.Trainer) -> dict[str, float]:
    if not trainer.optimizers:
        return {}
    return {"lr": float(trainer.optimizers[0].param_groups[0]["lr"])}


def _default_metadata(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, str]:
    metadata = {"model": type(pl_module).__name__, "world_size": str(trainer.world_size)}
    if trainer.optimizers:
        optimizer = trainer.optimizers[0]
        group = optimizer.param_groups[0]
        metadata["optimizer"] = type(optimizer).__name__.lower()
        metadata["lr"] = str(group["lr"])
        metadata["weight_decay"] = str(group.get("weight_decay", 0.0))
    return metadata
