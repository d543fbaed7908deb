"""Distributed engines: how a model, our optimizer and the process group train together.

Two engines share one interface so the trainer never branches on which one runs:

- ``DDPEngine``: torch ``DistributedDataParallel``; bf16/fp16 through autocast (fp16
  with a gradient scaler).
- ``DeepSpeedEngine``: ``deepspeed.initialize`` with *our* optimizer and lr schedule
  objects, so the optimizer code that defines the study is the same under both
  engines; ZeRO stages 0-3; under ZeRO-3 the classifier (and, for a consolidated
  checkpoint, the whole model) is gathered before it is read.

Both average gradients over ranks, which keeps the zero class-sum of the
cross-entropy gradient (the nc0 theory in docs/training.md holds under either).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler

from launcher.config import RunConfig
from launcher.optim import build_optimizer, build_scheduler

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Engine(Protocol):
    """What the trainer needs from a distributed engine."""

    module: nn.Module
    optimizer: torch.optim.Optimizer

    @property
    def input_dtype(self) -> torch.dtype: ...

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def current_lr(self) -> float: ...

    def gathered_classifier(self) -> contextlib.AbstractContextManager[nn.Linear]: ...

    def full_model_state(self) -> dict[str, torch.Tensor] | None: ...

    def save(self, directory: Path, rank: int) -> None: ...

    def load(self, directory: Path, model_state: dict[str, torch.Tensor]) -> None: ...


def classifier_of(module: nn.Module) -> nn.Linear:
    classifier = getattr(module, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        raise TypeError(f"{type(module).__name__} has no nn.Linear 'classifier' attribute")
    return classifier


def optimizer_from_config(params: Any, config: RunConfig) -> torch.optim.Optimizer:
    """The configured optimizer over ``params`` (one place maps the config to its arguments)."""
    optim = config.optim
    assert optim.lr is not None, "resolve() fills optim.lr before workers start"
    return build_optimizer(
        params,
        optim.name,
        lr=optim.lr,
        momentum=optim.momentum,
        beta2=optim.beta2,
        weight_decay=optim.weight_decay,
        coupled_fraction=optim.coupled_fraction,
        eps=optim.eps,
    )


def _accuracy_count(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.detach().argmax(dim=1) == y).sum()


class DDPEngine:
    """DistributedDataParallel over the model; our optimizer and schedule step it."""

    def __init__(
        self, model: nn.Module, config: RunConfig, device: torch.device, total_steps: int
    ) -> None:
        self.module = model.to(device)
        self.device = device
        device_ids = [device.index] if device.type == "cuda" else None
        self.wrapped = DistributedDataParallel(self.module, device_ids=device_ids)
        self.optimizer = optimizer_from_config(self.module.parameters(), config)
        self.scheduler: LRScheduler = build_scheduler(
            self.optimizer, config.optim.lr_schedule, total_steps
        )
        self.precision = config.engine.precision
        # fp16 needs loss scaling; bf16 has fp32's exponent range and does not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")

    @property
    def input_dtype(self) -> torch.dtype:
        # Parameters stay fp32; autocast lowers the matmuls.
        return torch.float32

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (mean loss, correct count) as detached tensors."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(
            self.device.type, dtype=_DTYPES[self.precision], enabled=self.precision != "fp32"
        ):
            logits = self.wrapped(x)
            loss = functional.cross_entropy(logits.float(), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach(), _accuracy_count(logits, y)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @contextlib.contextmanager
    def gathered_classifier(self) -> Iterator[nn.Linear]:
        yield classifier_of(self.module)

    def full_model_state(self) -> dict[str, torch.Tensor] | None:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def save(self, directory: Path, rank: int) -> None:
        # Every rank holds the same optimizer state under DDP: rank 0 writes it.
        if rank == 0:
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                },
                directory / "optimizer.pt",
            )

    def load(self, directory: Path, model_state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(model_state)
        state = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


class DeepSpeedEngine:
    """``deepspeed.initialize`` around the model with our optimizer and lr schedule."""

    _TAG = "engine"

    def __init__(
        self,
        model: nn.Module,
        config: RunConfig,
        device: torch.device,
        total_steps: int,
        world_size: int,
    ) -> None:
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            # Otherwise silent for a minute or two: DeepSpeed compiles a C++ op the first
            # time it runs on a machine (cached in TORCH_EXTENSIONS_DIR afterwards).
            print(
                "starting DeepSpeed (its first run on a machine builds a C++ op: about a "
                "minute, cached afterwards)...",
                flush=True,
            )
        import deepspeed

        self._deepspeed = deepspeed
        self.zero_stage = config.engine.zero_stage
        self.precision = config.engine.precision
        optimizer = optimizer_from_config(model.parameters(), config)
        scheduler = build_scheduler(optimizer, config.optim.lr_schedule, total_steps)
        per_rank = config.train.batch_size // world_size
        ds_config: dict[str, Any] = {
            "train_batch_size": per_rank * world_size,
            "train_micro_batch_size_per_gpu": per_rank,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": self.zero_stage},
            # Our optimizers are elementwise and keep state per tensor, which is what ZeRO's
            # flat fp32 partitions need; DeepSpeed only vouches for its own list.
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16"},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        engine, wrapped_optimizer, _, lr_scheduler = deepspeed.initialize(
            model=model.to(device),
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
            dist_init_required=False,
        )
        self.engine = engine
        self.module: nn.Module = engine.module
        # The base optimizer: ZeRO wraps it but steps it, and its param_groups carry the lr.
        self.optimizer = optimizer
        self._wrapped_optimizer = wrapped_optimizer
        self._scheduler = lr_scheduler

    @property
    def input_dtype(self) -> torch.dtype:
        # DeepSpeed casts the module's parameters to the training precision.
        return _DTYPES[self.precision]

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.engine(x)
        loss = functional.cross_entropy(logits.float(), y)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach(), _accuracy_count(logits, y)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @contextlib.contextmanager
    def gathered_classifier(self) -> Iterator[nn.Linear]:
        classifier = classifier_of(self.module)
        if self.zero_stage == 3:
            # Collective: every rank enters, so W is whole on all of them inside.
            with self._deepspeed.zero.GatheredParameters(list(classifier.parameters())):
                yield classifier
        else:
            yield classifier

    def full_model_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights as the module holds them (gathered under ZeRO-3)."""
        gather = (
            self._deepspeed.zero.GatheredParameters(list(self.module.parameters()))
            if self.zero_stage == 3
            else contextlib.nullcontext()
        )
        with gather:
            return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def save(self, directory: Path, rank: int) -> None:
        # Collective: each rank writes its ZeRO partition of the optimizer (and model).
        self.engine.save_checkpoint(str(directory), tag=self._TAG, save_latest=False)

    def load(self, directory: Path, model_state: dict[str, torch.Tensor]) -> None:
        # DeepSpeed's own files restore module, partitions, optimizer and lr schedule.
        load_path, _ = self.engine.load_checkpoint(
            str(directory),
            tag=self._TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")


def build_engine(
    model: nn.Module, config: RunConfig, device: torch.device, total_steps: int, world_size: int
) -> Engine:
    if config.engine.name == "deepspeed":
        return DeepSpeedEngine(model, config, device, total_steps, world_size)
    return DDPEngine(model, config, device, total_steps)


def deepspeed_accelerator(device_type: str) -> None:
    """Point DeepSpeed at the device we train on; it reads this once, at import."""
    os.environ["DS_ACCELERATOR"] = "cuda" if device_type == "cuda" else "cpu"
