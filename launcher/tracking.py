"""The measuring side of the nclaunch trainer: the tracker and sinks, logged steps (nc0),
measurements and their rows in metrics.jsonl, and the run's metadata at the service.

``Tracking`` is mixed into ``launcher.trainer.Trainer``, which owns the attributes declared
here and sets them up.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from launcher.config import RunConfig
from launcher.engines import Engine, classifier_of
from launcher.report import TrainingProgress
from launcher.rundir import RunDir
from ncserve.metrics import METRIC_KEYS, nc0_from_weight
from ncserve.report.settings import SWEEP_METADATA_KEY, settings_metadata
from ncserve.track.sinks import CSVSink, TensorBoardSink

if TYPE_CHECKING:
    from launcher.trainer import DeviceBatches, Runtime
    from ncserve.track import Tracker

log = logging.getLogger("nclaunch.trainer")


def run_metadata(config: RunConfig, world_size: int) -> dict[str, str]:
    """What the service keeps of a run besides its measurements.

    The short keys name the run in ``ncserve runs`` and on the dashboards; the report's
    settings go under their dotted config paths (``optim.lr``), so that ``ncserve report
    --target/--db`` rebuilds them without the run directory; ``sweep`` groups a sweep's
    runs.
    """
    metadata = {
        "optimizer": config.optim.name,
        "model": config.model.name,
        "dataset": config.data.dataset,
        "engine": config.engine.name,
        "lr": str(config.optim.lr),
        "weight_decay": str(config.optim.weight_decay),
        "momentum": str(config.optim.momentum),
        "world_size": str(world_size),
    }
    metadata |= settings_metadata(config.model_dump(mode="json"))
    if config.tracking.sweep_id is not None:
        metadata[SWEEP_METADATA_KEY] = config.tracking.sweep_id
    return metadata


class Tracking:
    """Measurements of a Trainer (see launcher/trainer.py for the loop that calls these)."""

    config: RunConfig
    runtime: Runtime
    rank: int
    world_size: int
    step: int
    epoch: int
    engine: Engine
    num_classes: int
    run_dir: RunDir
    measure_batches: DeviceBatches
    holdout_batches: DeviceBatches | None
    measured_steps: set[int]
    latest_metrics: dict[str, Any]
    # Rows of measurements still running in the tracker's background thread, by step.
    _unsettled: dict[int, dict[str, Any]]
    tracker: Tracker | None
    csv: CSVSink | None
    tensorboard: TensorBoardSink | None
    progress: TrainingProgress | None

    def build_tracking(self) -> None:
        """The sinks (rank 0) and the tracker that sends measurements to the service."""
        config, tracking = self.config, self.config.tracking
        if self.rank == 0:
            if tracking.csv is not None:
                self.csv = CSVSink(tracking.csv)
            if tracking.tensorboard is not None:
                self.tensorboard = TensorBoardSink(tracking.tensorboard)
        if not tracking.enabled:
            return
        from ncserve.track import Tracker

        token, tls = tracking.credentials()
        self.tracker = Tracker(
            self.engine.module,
            classifier=classifier_of(self.engine.module),
            num_classes=self.num_classes,
            target=self.runtime.service_target or tracking.sidecar,
            run_id=config.run_id,
            metadata=run_metadata(config, self.world_size),
            run_dir=self.run_dir.root,
            token=token,
            tls=tls,
            deadline_s=tracking.deadline_s,
            max_buffer_bytes=int(tracking.buffer_mb * (1 << 20)),
            background=tracking.background,
            shard_per_rank=tracking.shard_per_rank,
            node=self._node_name(),
        )

    def _node_name(self) -> str | None:
        """This rank's node for the tracker's one-shard-per-node sums: in local mode the
        simulated node (``--nodes`` x ``--nproc-per-node`` workers run as one elastic node
        here); otherwise None, the elastic agent's GROUP_RANK."""
        launch = self.config.launch
        if not launch.local_mode or not launch.nproc_per_node.isdigit():
            return None
        return f"local-node-{self.rank // int(launch.nproc_per_node)}"

    def log_step(self, running_loss: float, running_acc: float) -> None:
        """A logged step: nc0 from W (gathered first under ZeRO-3), recorded by rank 0."""
        lr = self.engine.current_lr()
        if self.tracker is not None:
            nc0, nc0_normalized = self.tracker.record_nc0(
                self.step,
                scalars={"train_loss": running_loss, "train_acc": running_acc, "lr": lr},
                epoch=self.epoch,
            )
        else:
            nc0, nc0_normalized = self.classifier_nc0()
        values = {"nc0": nc0, "nc0_normalized": nc0_normalized, "lr": lr}
        values |= {"train_loss": running_loss, "train_acc": running_acc}
        if self.rank == 0:
            log.info(
                "step %d epoch %d loss %.4f acc %.4f nc0 %.6g lr %.3g",
                self.step,
                self.epoch + 1,
                running_loss,
                running_acc,
                nc0,
                lr,
            )
            if self.tensorboard is not None:
                self.tensorboard.write_step(self.step, values)
            if self.progress is not None:
                self.progress.set_running(running_loss, running_acc, nc0)

    def classifier_nc0(self) -> tuple[float, float]:
        """(nc0, nc0_normalized) of the classifier weight; collective under ZeRO-3."""
        with self.engine.gathered_classifier() as classifier:
            w_KP = classifier.weight.detach().to(torch.float64).cpu().numpy()
        nc0, nc0_normalized = nc0_from_weight(w_KP)
        return float(nc0), float(nc0_normalized)

    def measure(
        self,
        step: int,
        epoch: int,
        train_scalars: dict[str, float] | None,
        epoch_time_s: float | None = None,
    ) -> dict[str, Any] | None:
        """All NC metrics on the measurement split, on every rank; rank 0 stores the row."""
        if step in self.measured_steps:
            # Stored before a restart: measuring again could store different values.
            log.info("step %d already measured; not measuring it again", step)
            return None
        scalars = {"lr": self.engine.current_lr(), **(train_scalars or {})}
        module = self.engine.module
        started = time.perf_counter()
        self.settle_measurements()
        if self.config.train.keep_measured_weights:
            self.keep_measured_weights(step, epoch)
        module.eval()
        try:
            if self.tracker is not None:
                metrics = self.tracker.measure(
                    self.measure_batches,
                    step=step,
                    epoch=epoch,
                    holdout_loader=self.holdout_batches,
                    scalars=scalars,
                )
            else:
                nc0, nc0_normalized = self.classifier_nc0()
                metrics = {"nc0": nc0, "nc0_normalized": nc0_normalized}
        finally:
            module.train()
        self.measured_steps.add(step)
        # Rank 0's seconds in the last epoch's training steps and the seconds this held the
        # training loop (with a background measurement: its forward pass).
        pending: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "scalars": scalars,
            "epoch_time_s": epoch_time_s,
            "measure_time_s": time.perf_counter() - started,
        }
        if self.tracker is not None and self.tracker.background:
            self._unsettled[step] = pending
            if self.progress is not None and train_scalars:
                self.progress.epoch_done(epoch, train_scalars, {})  # the metrics follow
            return None
        return self._record_measurement(pending, metrics, late=False)

    def settle_measurements(self) -> None:
        """Record every measurement the tracker finished in the background (a collective)."""
        if self.tracker is None:
            return
        for step, metrics in self.tracker.settle():
            self._record_measurement(self._unsettled.pop(step), metrics, late=True)
        self._unsettled.clear()  # ranks other than 0 get no metrics

    def _record_measurement(
        self, pending: dict[str, Any], metrics: dict[str, Any] | None, late: bool
    ) -> dict[str, Any] | None:
        """Rank 0 stores the row of a measurement: metrics.jsonl, sinks, progress, log."""
        if self.rank != 0:
            return None
        step, epoch, scalars = pending["step"], pending["epoch"], pending["scalars"]
        row: dict[str, Any] = {
            "run_id": self.config.run_id,
            "step": step,
            "epoch": epoch,
            "lr": scalars["lr"],
            "world_size": self.world_size,
            "train_loss": scalars.get("train_loss"),
            "train_acc": scalars.get("train_acc"),
        }
        metrics = dict(metrics or {})
        holdout = metrics.pop("holdout_accuracy", None)
        if holdout is not None:
            row["holdout_acc"] = holdout
        row["wall_time"] = time.time()
        if pending["epoch_time_s"] is not None:
            row["epoch_time_s"] = pending["epoch_time_s"]
        row["measure_time_s"] = pending["measure_time_s"]
        row |= {k: v for k, v in metrics.items() if k not in row}
        self.run_dir.append_metrics(row)
        if self.csv is not None:
            self.csv.write(row)
        if self.tensorboard is not None:
            self.tensorboard.write_measurement(row, (*METRIC_KEYS, "holdout_nc4"))
        self.latest_metrics = row
        if self.progress is not None:
            # A measurement settled late shows its metrics, not its (older) training loss.
            train = {} if late else {k: v for k, v in scalars.items() if k != "lr"}
            self.progress.epoch_done(epoch, train, row)
        log.info(
            "measured step %d epoch %d: %s",
            step,
            epoch,
            ", ".join(f"{k}={row[k]:.6g}" for k in ("nc0", "nc1", "nc2", "nc3") if k in row),
        )
        return row

    def keep_measured_weights(self, step: int, epoch: int) -> None:
        """The model's weights at a measured step, for export-features (a collective under
        ZeRO-3, which gathers them; rank 0 writes)."""
        model_state = self.engine.full_model_state()
        if self.rank != 0 or model_state is None:
            return
        path = self.run_dir.weights_path(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        state = {"model": model_state, "step": step, "epoch": epoch, "world_size": self.world_size}
        torch.save(state, partial)
        partial.replace(path)
