"""The training loop every nclaunch worker runs: ``Trainer(config).train()``.

Legend: N samples, K classes, P feature dim (input width of ``model.classifier``).

One worker = one global rank. The elastic agent starts ``run_worker`` in each
worker process with the resolved config; the trainer initialises the process
group, builds data, model, engine (DDP or DeepSpeed) and tracker, resumes from
the run directory's last checkpoint when asked to or when the agent restarted
the workers, and trains. Measurements (every ``measure_every`` epochs, at step 0
and at the last step) go through ``ncserve.track.Tracker``; every logged step
records nc0, which needs only W. The measuring side (tracker, sinks, rows, the run's
metadata at the service) is in launcher/tracking.py.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from launcher.checkpoint import CheckpointStore, load_trainer_state, save_trainer_state
from launcher.config import RunConfig
from launcher.data import DatasetSplits, load_dataset, measurement_indices
from launcher.engines import Engine, build_engine, classifier_of, deepspeed_accelerator
from launcher.models import build_model
from launcher.report import TrainingProgress
from launcher.rundir import RunDir
from launcher.tracking import Tracking
from ncserve.protocol import RUN_FAILED

# Fault injection for the restart tests: "RANK:STEP" makes that rank SIGKILL itself
# right after that optimizer step, on the first attempt only (elastic restarts skip it).
FAULT_ENV = "NCLAUNCH_FAULT_KILL"

log = logging.getLogger("nclaunch.trainer")


@dataclass(frozen=True)
class Runtime:
    """What the launcher decided at start-up and every worker needs besides the config."""

    service_target: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Runtime:
        return cls(**json.loads(text))


def run_worker(config_json: str, runtime_json: str) -> dict[str, Any] | None:
    """Entry point of one worker process (called by torch's elastic agent)."""
    config = RunConfig.model_validate_json(config_json)
    trainer = Trainer(config, Runtime.from_json(runtime_json))
    try:
        result = trainer.train()
    except BaseException:
        trainer.abort()
        raise
    trainer.close()
    return result


class DeviceBatches:
    """Batches of a fixed sample set, moved to the training device: a measurement loader."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.device, self.dtype = device, dtype

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.y), self.batch_size):
            end = start + self.batch_size
            yield (
                self.x[start:end].to(self.device, self.dtype, non_blocking=True),
                self.y[start:end].to(self.device, non_blocking=True),
            )


def measurement_split(
    labels: torch.Tensor, per_class: int | None, seed: int, world_size: int
) -> np.ndarray:
    """Indices of the whole measurement split, a multiple of ``world_size`` long.

    Every rank then takes ``split[rank::world_size]``: equal shares, so each rank runs
    the same number of batches (ZeRO-3 gathers parameters collectively in forward).
    The at most world_size - 1 samples left over are dropped at random (seeded), not
    from one class. export-features rebuilds the same split from the same inputs.
    """
    indices = measurement_indices(labels, per_class, seed)
    keep = (len(indices) // world_size) * world_size
    if keep == 0:
        raise ValueError(
            f"the measurement split has {len(indices)} samples, fewer than the world size "
            f"{world_size}"
        )
    if keep < len(indices):
        rng = np.random.default_rng(seed)
        dropped = rng.choice(len(indices), size=len(indices) - keep, replace=False)
        indices = np.delete(indices, dropped)
    return indices


def load_splits(config: RunConfig) -> DatasetSplits:
    data = config.data
    return load_dataset(
        data.dataset,
        data.data_dir,
        num_classes=data.num_classes,
        feature_dim=data.feature_dim,
        num_samples=data.num_samples,
        seed=config.train.seed,
        holdout_fraction=data.holdout,
    )


class Trainer(Tracking):
    """One worker's run: set-up, resume, the training loop, checkpoints and shutdown; the
    measurements are launcher.tracking.Tracking's."""

    def __init__(self, config: RunConfig, runtime: Runtime | None = None) -> None:
        assert config.run_dir is not None and config.optim.lr is not None, "resolve() first"
        self.config = config
        self.runtime = runtime or Runtime()
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.run_dir = RunDir(config.run_dir)
        self.checkpoints = CheckpointStore(
            self.run_dir.checkpoints_dir, keep=config.train.keep_checkpoints
        )
        self.step = 0
        self.epoch = 0
        self.measured_steps = set()
        self.latest_metrics = {}
        self._unsettled = {}
        self.tracker = None
        self.csv = None
        self.tensorboard = None
        self.progress = None
        self._fault = self._parse_fault()

    # -- set-up ------------------------------------------------------------------------------

    def init_distributed(self) -> None:
        config = self.config
        self._init_logging()
        # torch's own collectives called by DeepSpeed warn about their renamed successors on
        # every call; the worker's console is the user's terminal.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\..*` is deprecated")
        if config.train.deterministic:
            # Read by cuBLAS when the CUDA context is created, so set before set_device.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        if config.launch.device == "cuda":
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
            backend = "nccl"
        else:
            self.device = torch.device("cpu")
            backend = "gloo"
            # Workers share the machine's cores: more threads than cores per worker thrash.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.local_world_size))
        dist.init_process_group(
            backend,
            store=self._attempt_store(),
            rank=self.rank,
            world_size=self.world_size,
            device_id=self.device if self.device.type == "cuda" else None,
        )
        if config.engine.name == "deepspeed":
            deepspeed_accelerator(self.device.type)
            import deepspeed
            from deepspeed.utils import logger as deepspeed_logger

            # Its INFO/WARNING chatter (e.g. "untested optimizer": ours, on purpose) would
            # break rank 0's progress bar; errors still show.
            deepspeed_logger.setLevel(logging.ERROR)
            # Finds the process group above initialised and adopts it.
            deepspeed.init_distributed(dist_backend=backend)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        log.info(
            "rank %d of %d (local %d of %d, restart %d) on %s, backend %s",
            self.rank,
            self.world_size,
            self.local_rank,
            self.local_world_size,
            self.restart_count,
            self.device,
            backend,
        )

    def _attempt_store(self) -> dist.Store | None:
        """The agent's store under a per-attempt prefix, or None for torch's env:// default.

        The elastic agent's rendezvous store outlives a restart, and torch's env:// init
        uses it without a prefix: the restarted workers would find the dead workers' gloo
        addresses under the same keys and try to connect to them.
        """
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            return None
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world_size=self.world_size,
            is_master=False,
            timeout=dt.timedelta(minutes=10),
        )
        return dist.PrefixStore(f"nclaunch/attempt_{self.restart_count}", store)

    def _init_logging(self) -> None:
        self.run_dir.logs_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.run_dir.rank_log(self.rank))
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s rank{self.rank} %(levelname)s %(name)s: %(message)s")
        )
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        if self.rank == 0:
            # Warnings (e.g. the service not answering in time) also reach the terminal.
            console = logging.StreamHandler()
            console.setLevel(logging.WARNING)
            console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            root.addHandler(console)

    def build(self) -> None:
        config, train = self.config, self.config.train
        splits = load_splits(config)
        self.num_classes = splits.num_classes
        x_N, y_N = splits.train.tensors
        self.x_train, self.y_train = x_N, y_N
        self.per_rank_batch = train.batch_size // self.world_size
        if self.per_rank_batch < 1 or train.batch_size % self.world_size:
            raise ValueError(
                f"train.batch_size: {train.batch_size} is not a positive multiple of the world "
                f"size {self.world_size}"
            )
        self.sampler: DistributedSampler[Any] = DistributedSampler(
            splits.train,
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=True,
            seed=train.seed,
            drop_last=True,
        )
        # Every rank takes the same number of full batches, so DDP's collectives line up.
        self.steps_per_epoch = len(self.sampler) // self.per_rank_batch
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"train.batch_size: {train.batch_size} exceeds the {len(y_N)} training samples"
            )
        self.total_steps = self.steps_per_epoch * train.epochs

        # The same seed on every rank: identical initial weights, as DDP and ZeRO assume.
        torch.manual_seed(train.seed)
        model = build_model(
            config.model.name, splits.input_shape, splits.num_classes, config.model.width
        )
        self.engine: Engine = build_engine(
            model, config, self.device, self.total_steps, self.world_size
        )
        # Per-rank streams from here on (dropout differs across ranks, reproducibly).
        torch.manual_seed(train.seed + 1 + self.rank)

        split = measurement_split(
            y_N, config.data.measure_samples_per_class, train.seed, self.world_size
        )
        mine = torch.from_numpy(split[self.rank :: self.world_size])
        self.measure_batches = DeviceBatches(
            x_N[mine], y_N[mine], train.measure_batch_size, self.device, self.engine.input_dtype
        )
        self.holdout_batches: DeviceBatches | None = None
        if splits.holdout is not None:
            x_H, y_H = splits.holdout.tensors
            keep = (len(y_H) // self.world_size) * self.world_size
            if keep:
                ours = torch.arange(self.rank, keep, self.world_size)
                self.holdout_batches = DeviceBatches(
                    x_H[ours],
                    y_H[ours],
                    train.measure_batch_size,
                    self.device,
                    self.engine.input_dtype,
                )
        self.feature_dim = classifier_of(self.engine.module).in_features
        log.info(
            "data %s: %d training samples, K=%d, input %s; %d steps/epoch x %d epochs; "
            "measurement split %d samples (%d on this rank)",
            splits.name,
            len(y_N),
            splits.num_classes,
            splits.input_shape,
            self.steps_per_epoch,
            train.epochs,
            len(split),
            len(mine),
        )
        self.build_tracking()

    def maybe_resume(self) -> None:
        """Continue from the last checkpoint on ``--resume`` and after an elastic restart."""
        if self.rank == 0:
            rows = self.run_dir.repair_metrics()
            stored = sorted({int(row["step"]) for row in rows})
        else:
            stored = []
        path = None
        # A node of a multi-machine job may be a restarted pod: its run directory tells.
        if self.config.resume or self.restart_count > 0 or not self.config.launch.local_mode:
            path = self.checkpoints.latest()
        if path is not None:
            state = load_trainer_state(path)
            self.engine.load(path, state["model"])
            self.step, self.epoch = int(state["step"]), int(state["epoch"])
            stored = sorted(set(stored) | set(state.get("measured_steps", [])))
            rng = state.get("rng_states")
            if rng is not None and len(rng) == self.world_size:
                torch.set_rng_state(rng[self.rank])
            log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)
            if self.rank == 0:
                print(
                    f"resumed from checkpoint {path} at step {self.step} (epoch {self.epoch})",
                    flush=True,
                )
        elif self.config.resume:
            log.warning(
                "--resume: no checkpoint in %s, starting from step 0", self.checkpoints.root
            )
        # Rank 0 read metrics.jsonl; every rank must skip the same measurements.
        box: list[Any] = [stored]
        dist.broadcast_object_list(box, src=0)
        self.measured_steps = set(box[0])

    # -- the loop ----------------------------------------------------------------------------

    def batch_generator(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of ``epoch``: the seeded DistributedSampler's order, sliced."""
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.int64)
        dtype = self.engine.input_dtype
        for i in range(self.steps_per_epoch):
            idx = order[i * self.per_rank_batch : (i + 1) * self.per_rank_batch]
            yield (
                self.x_train[idx].to(self.device, dtype, non_blocking=True),
                self.y_train[idx].to(self.device, non_blocking=True),
            )

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, correct = self.engine.train_step(x, y)
        self.step += 1
        return loss, correct

    def train(self) -> dict[str, Any] | None:
        self.init_distributed()
        self.build()
        self.maybe_resume()
        config = self.config.train
        self.progress = TrainingProgress(
            epochs=config.epochs,
            steps_per_epoch=self.steps_per_epoch,
            enabled=self.rank == 0,
            start_epoch=self.epoch,
        )
        with self.progress:
            if self.step == 0:
                self.measure(step=0, epoch=0, train_scalars=None)
            for epoch in range(self.epoch, config.epochs):
                self.progress.start_epoch(epoch + 1)
                # Summed on the device and read only at logged steps: no sync per step.
                loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
                correct_sum = torch.zeros((), dtype=torch.int64, device=self.device)
                seen = 0
                epoch_started = time.perf_counter()
                for x, y in self.batch_generator(epoch):
                    loss, correct = self.train_step(x, y)
                    loss_sum += loss.double() * len(y)
                    correct_sum += correct
                    seen += len(y)
                    self._inject_fault()
                    if self.step % config.log_every == 0:
                        self.log_step(loss_sum.item() / seen, correct_sum.item() / seen)
                    self.progress.advance(self.step)
                self.epoch = epoch + 1
                epoch_time_s = time.perf_counter() - epoch_started
                seen_t = torch.tensor(float(seen), dtype=torch.float64, device=self.device)
                sums = torch.stack([loss_sum, correct_sum.double(), seen_t])
                dist.all_reduce(sums)  # on the device: nccl reduces only GPU tensors
                scalars = {
                    "train_loss": float(sums[0] / sums[2]),
                    "train_acc": float(sums[1] / sums[2]),
                }
                last = self.epoch == config.epochs
                if self.epoch % config.measure_every == 0 or last:
                    self.measure(self.step, self.epoch, scalars, epoch_time_s=epoch_time_s)
                else:
                    self.progress.epoch_done(self.epoch, scalars, {})
                every = config.checkpoint_every
                if last or (every and self.epoch % every == 0):
                    self.save_checkpoint()
            self.settle_measurements()
        log.info("finished: %d steps, %d epochs", self.step, self.epoch)
        return self.latest_metrics if self.rank == 0 else None

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Trainer state besides the engine's files: weights, position, RNG, measured steps."""
        model_state = self.engine.full_model_state()
        rng_states: list[Any] = [None] * self.world_size
        dist.all_gather_object(rng_states, torch.get_rng_state())
        return {
            "model": model_state,
            "step": self.step,
            "epoch": self.epoch,
            "world_size": self.world_size,
            "rng_states": rng_states,
            "measured_steps": sorted(self.measured_steps),
            "run_id": self.config.run_id,
            "engine": self.config.engine.name,
        }

    def save_checkpoint(self) -> Path:
        # The checkpoint lists the measured steps: their rows are written first.
        self.settle_measurements()
        if self.rank == 0:
            self.checkpoints.prepare_staging(self.step)
        dist.barrier()
        staging = self.checkpoints.staging(self.step)
        self.engine.save(staging, self.rank)
        state = self.state_dict()
        if self.rank == 0:
            save_trainer_state(staging, state)
        dist.barrier()
        final = self.checkpoints.root / staging.name.removeprefix(".").removesuffix(".partial")
        if self.rank == 0:
            final = self.checkpoints.commit(self.step)
            log.info("checkpoint %s", final)
        dist.barrier()
        return final

    # -- faults and shutdown -----------------------------------------------------------------

    def _parse_fault(self) -> tuple[int, int] | None:
        spec = os.environ.get(FAULT_ENV)
        if not spec:
            return None
        rank, _, step = spec.partition(":")
        return int(rank), int(step)

    def _inject_fault(self) -> None:
        if (
            self._fault is not None
            and self.restart_count == 0
            and self._fault == (self.rank, self.step)
        ):
            log.warning(
                "fault injection (%s): killing rank %d at step %d", FAULT_ENV, self.rank, self.step
            )
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    def abort(self) -> None:
        """Clean-up after a failure on this rank: nothing collective.

        The other ranks may be blocked in a collective this rank will never join; a
        barrier here would hang until the process-group timeout instead of letting the
        elastic agent see the failure and restart or stop the workers.
        """
        log.exception("rank %d failed at step %d", self.rank, self.step)
        if self.tracker is not None:
            if self.rank == 0:
                # Queued behind what the client still buffers, so the run's end comes last.
                error = sys.exc_info()[1]
                what = f"{type(error).__name__}: {str(error)[:200]}" if error else "unknown"
                self.tracker.client.finish_run(
                    self.tracker.run_id,
                    RUN_FAILED,
                    f"rank {self.rank} failed at step {self.step} ({what})",
                )
            # Whatever the client still buffers goes to its spool for a later replay.
            self.tracker.client.close(timeout_s=2.0)
            self.tracker = None
        if self.tensorboard is not None:
            self.tensorboard.close()
        logging.shutdown()

    def close(self) -> None:
        if self.tracker is not None:
            try:
                report = self.tracker.close()
                log.info("tracker delivery: %s", report)
            finally:
                self.tracker = None
        if self.tensorboard is not None:
            self.tensorboard.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        logging.shutdown()
