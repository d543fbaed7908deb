"""Typed configuration of an nclaunch run.

One pydantic model, ``RunConfig``, holds everything a run needs; it is what
``config.yaml`` in the run directory contains and what every worker receives.
Sources, later ones winning: field defaults < ``--config run.yaml`` < ``PET_*``
environment variables (launch options only, as torchrun reads them) < flags.

Validation happens when the model is built, in the launcher, so an invalid
value fails before any process starts; ``describe_validation_error`` turns
pydantic's report into one line naming the field, its flag, the value received
and what is accepted.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from launcher.data import DATASET_NAMES
from launcher.data.datasets import FILE_DATASETS, SYNTHETIC_DEFAULTS
from launcher.models import MODEL_NAMES
from launcher.optim import OPTIMIZER_NAMES, SCHEDULE_NAMES

# Learning rate used when --lr is not given: the middle of the paper's grid for the
# sign-based and Adam-family optimizers, and a value at which the default MLP on
# mnist5k fits the training set in a few epochs for plain SGD.
DEFAULT_LRS: dict[str, float] = {
    "sgd": 0.05,
    "sgdw": 0.05,
    "adam": 1e-3,
    "adamw": 1e-3,
    "signum": 1e-3,
    "signumw": 1e-3,
    "signgd": 1e-3,
    "lion": 1e-4,
}

RDZV_BACKENDS: tuple[str, ...] = ("c10d", "static", "etcd", "etcd-v2")


def _one_of(value: str, allowed: tuple[str, ...] | list[str]) -> str:
    if value not in allowed:
        raise ValueError(f"must be one of {', '.join(allowed)}")
    return value


class _Section(BaseModel):
    # Unknown keys in a YAML file are mistakes (a typo silently ignored would run the
    # wrong experiment), and assignments after construction are validated too.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LaunchConfig(_Section):
    """Where the workers run: torchrun-compatible options."""

    nnodes: str = Field("1", description="number of nodes, N or MIN:MAX")
    nproc_per_node: str = Field("1", description="workers per node: an integer or auto")
    node_rank: int = Field(0, ge=0, description="rank of this node (static rendezvous)")
    rdzv_backend: str = Field("c10d", description="rendezvous backend")
    rdzv_endpoint: str = Field("", description="rendezvous HOST:PORT; empty = local mode")
    rdzv_id: str = Field("", description="rendezvous group id; empty = the run id")
    master_addr: str = Field("", description="static rendezvous: address of node 0")
    master_port: int = Field(29500, ge=1, le=65535, description="static rendezvous: port")
    max_restarts: int = Field(0, ge=0, description="elastic restarts before giving up")
    standalone: bool = Field(False, description="single-machine run on a local rendezvous")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if present")

    @field_validator("nnodes")
    @classmethod
    def _check_nnodes(cls, value: str) -> str:
        parse_nnodes(value)
        return value

    @field_validator("nproc_per_node")
    @classmethod
    def _check_nproc(cls, value: str) -> str:
        if value == "auto":
            return value
        if not value.isdigit() or int(value) < 1:
            raise ValueError("must be a positive integer or auto")
        return value

    @field_validator("rdzv_backend")
    @classmethod
    def _check_backend(cls, value: str) -> str:
        return _one_of(value, RDZV_BACKENDS)

    @property
    def local_mode(self) -> bool:
        """All workers on this machine: no endpoint or master address to meet at."""
        return self.standalone or (not self.rdzv_endpoint and not self.master_addr)


class ModelConfig(_Section):
    name: str = Field("mlp", description="architecture")
    width: float = Field(1.0, gt=0, description="channel / hidden-unit multiplier")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _one_of(value, MODEL_NAMES)


class DataConfig(_Section):
    dataset: str = Field("mnist5k", description="dataset")
    data_dir: Path | None = Field(
        None, description="folder of mnist/fashionmnist/cifar/imagefolder"
    )
    # The synthetic dataset's shape; None for every other dataset (theirs is the data's),
    # and for synthetic until resolve() fills in SYNTHETIC_DEFAULTS.
    num_classes: int | None = Field(None, ge=2, description="synthetic: number of classes K")
    feature_dim: int | None = Field(None, ge=1, description="synthetic: input dimension")
    num_samples: int | None = Field(None, ge=2, description="synthetic: number of samples")
    holdout: float = Field(0.0, ge=0.0, lt=1.0, description="fraction held out for NC4/accuracy")
    measure_samples_per_class: int | None = Field(
        None, ge=1, description="measurement split per class; default all training samples"
    )

    @field_validator("dataset")
    @classmethod
    def _check_dataset(cls, value: str) -> str:
        return _one_of(value, DATASET_NAMES)

    @model_validator(mode="after")
    def _check_data_dir(self) -> DataConfig:
        if self.dataset in FILE_DATASETS and self.data_dir is None:
            raise ValueError(f"dataset {self.dataset!r} reads files: give --data-dir")
        return self

    def resolve_synthetic(self) -> None:
        """Fill the synthetic shape's defaults (synthetic only: other datasets keep None,
        so config.yaml records no setting that did not apply)."""
        if self.dataset == "synthetic":
            for name, value in SYNTHETIC_DEFAULTS.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)


class OptimConfig(_Section):
    name: str = Field("sgd", description="optimizer")
    lr: float | None = Field(None, gt=0, description="learning rate; default per optimizer")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="momentum (beta1 for Adam/Lion)")
    beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Adam/Lion second coefficient")
    weight_decay: float = Field(5e-4, ge=0.0, description="weight decay lambda")
    coupled_fraction: float | None = Field(
        None, ge=0.0, le=1.0, description="Adam family: coupled share of the weight decay"
    )
    eps: float = Field(1e-8, gt=0, description="Adam epsilon")
    lr_schedule: str = Field("constant", description="lr schedule, stepped per optimizer step")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _one_of(value, OPTIMIZER_NAMES)

    @field_validator("lr_schedule")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        return _one_of(value, SCHEDULE_NAMES)

    @model_validator(mode="after")
    def _check_coupled_fraction(self) -> OptimConfig:
        if self.coupled_fraction is not None and self.name not in ("adam", "adamw"):
            raise ValueError(f"coupled_fraction applies to adam and adamw only, not {self.name!r}")
        return self

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LRS[self.name]


class EngineConfig(_Section):
    name: Literal["ddp", "deepspeed"] = Field("ddp", description="distributed engine")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="bf16/fp16: GPU only")


class TrainConfig(_Section):
    batch_size: int = Field(128, ge=1, description="global batch size (all ranks)")
    epochs: int = Field(8, ge=1, description="training epochs")
    seed: int = Field(0, ge=0, description="seed of data split, init and sampler")
    deterministic: bool = Field(False, description="deterministic kernels (bitwise reruns)")
    log_every: int = Field(10, ge=1, description="steps between logged steps (nc0 recorded)")
    measure_every: int = Field(1, ge=1, description="epochs between NC measurements")
    checkpoint_every: int = Field(1, ge=0, description="epochs between checkpoints; 0: final only")
    keep_checkpoints: int = Field(3, ge=1, description="checkpoints kept (newest)")
    measure_batch_size: int = Field(1024, ge=1, description="batch size of measurement passes")
    keep_measured_weights: bool = Field(
        True,
        description="keep the model weights of every measured step in RUN_DIR/weights, so "
        "export-features can recompute any measurement",
    )


class TrackingConfig(_Section):
    enabled: bool = Field(True, description="NC tracking through the service")
    sidecar: str | None = Field(None, description="external service HOST:PORT")
    token_file: Path | None = Field(None, description="file holding the service token")
    tls_ca: Path | None = Field(None, description="CA bundle to verify the service")
    tls_cert: Path | None = Field(None, description="client certificate (mTLS)")
    tls_key: Path | None = Field(None, description="client key (mTLS)")
    deadline_s: float = Field(5.0, gt=0, description="per-call deadline towards the service")
    background: bool = Field(
        True,
        description="measurements hold training only for their forward pass; the rounds "
        "with the service run in a background thread",
    )
    buffer_mb: float = Field(
        256.0,
        gt=0,
        description="most MiB of undelivered pushes a rank keeps (memory, then spool on disk)",
    )
    tensorboard: Path | None = Field(None, description="also write TensorBoard events here")
    csv: Path | None = Field(None, description="also append measurements to this CSV")

    @field_validator("sidecar")
    @classmethod
    def _check_sidecar(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be HOST:PORT")
        return value

    def credentials(self) -> tuple[str | None, Any]:
        """(bearer token, ncserve.client.TLSConfig or None) towards the service."""
        from ncserve.client import TLSConfig

        token = self.token_file.read_text().strip() if self.token_file else None
        tls = None
        if self.tls_ca or self.tls_cert:
            tls = TLSConfig(ca_cert=self.tls_ca, client_cert=self.tls_cert, client_key=self.tls_key)
        return token, tls

    @model_validator(mode="after")
    def _check_tls(self) -> TrackingConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (mutual TLS)")
        for name in ("token_file", "tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no such file {str(path)!r}")
        return self


class RunConfig(_Section):
    """Everything one run needs; ``config.yaml`` of a run directory holds one."""

    run_id: str = Field("", description="run id; default optimizer-model-dataset-time-random")
    run_dir: Path | None = Field(None, description="run directory; default runs/<run-id>")
    resume: bool = Field(False, description="continue from the run directory's last checkpoint")
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("run_id")
    @classmethod
    def _check_run_id(cls, value: str) -> str:
        if value and not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError("may hold letters, digits, '-', '_' and '.' only")
        return value

    # Everything derived below is computed by ``resolve`` in the launcher, once, so that
    # every worker and config.yaml see the same values.

    @property
    def world_size_local(self) -> int:
        """Workers of a local-mode run: every simulated node's workers on this machine."""
        _, max_nodes = parse_nnodes(self.launch.nnodes)
        return max_nodes * int(self.launch.nproc_per_node)


def parse_nnodes(value: str) -> tuple[int, int]:
    """``"N"`` or ``"MIN:MAX"`` -> (min, max), the form torchrun accepts."""
    parts = value.split(":")
    if len(parts) > 2 or not all(p.isdigit() for p in parts):
        raise ValueError("must be N or MIN:MAX with positive integers")
    low, high = int(parts[0]), int(parts[-1])
    if not 0 < low <= high:
        raise ValueError("must be N or MIN:MAX with 0 < MIN <= MAX")
    return low, high


def generate_run_id(config: RunConfig, now: dt.datetime | None = None) -> str:
    """A readable, unique-enough id: what ran, when, and 4 random hex digits."""
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"{config.optim.name}-{config.model.name}-{config.data.dataset}-{stamp}-{secrets.token_hex(2)}"


def resolve(config: RunConfig, *, cuda_available: bool, cpu_count: int | None = None) -> RunConfig:
    """Fill every "decide later" value so the config is complete and reproducible.

    Raises ValueError naming the field when the combination cannot run here.
    """
    resolved = config.model_copy(deep=True)
    launch = resolved.launch
    if launch.device == "auto":
        launch.device = "cuda" if cuda_available else "cpu"
    elif launch.device == "cuda" and not cuda_available:
        raise ValueError("launch.device: 'cuda' requested but no GPU is visible; use cpu or auto")
    if resolved.engine.precision != "fp32" and launch.device != "cuda":
        raise ValueError(
            f"engine.precision: {resolved.engine.precision!r} needs a GPU; allowed on cpu: fp32"
        )
    if launch.nproc_per_node == "auto":
        if launch.device == "cuda":
            import torch

            launch.nproc_per_node = str(torch.cuda.device_count())
        else:
            launch.nproc_per_node = str(cpu_count or os.cpu_count() or 1)
    if resolved.optim.lr is None:
        resolved.optim.lr = DEFAULT_LRS[resolved.optim.name]
    resolved.data.resolve_synthetic()
    if not resolved.run_id:
        # Every node of a multi-machine job must name the run alike: the rendezvous id is
        # the one value they already share.
        resolved.run_id = launch.rdzv_id if launch.rdzv_id and not launch.local_mode else ""
        resolved.run_id = resolved.run_id or generate_run_id(resolved)
    if not launch.rdzv_id:
        launch.rdzv_id = resolved.run_id
    if resolved.run_dir is None:
        resolved.run_dir = Path("runs") / resolved.run_id
    if launch.local_mode:
        world_size = resolved.world_size_local
        if launch.device == "cuda":
            import torch

            gpus = torch.cuda.device_count()
            if world_size > gpus:
                raise ValueError(
                    f"launch: {world_size} local workers (nodes x nproc-per-node) need one GPU "
                    f"each, and {gpus} are visible; lower --nodes/--nproc-per-node or use cpu"
                )
        per_rank, rest = divmod(resolved.train.batch_size, world_size)
        if rest or per_rank < 1:
            raise ValueError(
                f"train.batch_size: {resolved.train.batch_size} is not a positive multiple of "
                f"the world size {world_size} (nodes x nproc-per-node); use e.g. "
                f"{max(1, resolved.train.batch_size // world_size) * world_size}"
            )
    elif (
        resolved.tracking.enabled
        and resolved.tracking.sidecar is None
        and parse_nnodes(launch.nnodes)[1] > 1
    ):
        raise ValueError(
            "tracking.sidecar: a run spanning several machines needs the address of the "
            "ncserve service every node reaches (--sidecar HOST:PORT), or --no-tracking"
        )
    return resolved


def load_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML config file (ValueError with the file name otherwise)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"--config: cannot read {str(path)!r}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ValueError(f"--config: {str(path)!r} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config: {str(path)!r} must hold a mapping, not {type(data).__name__}")
    return data


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied section by section (nested dicts merge)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def describe_validation_error(err: ValidationError, flags: dict[str, str]) -> str:
    """One line: each failing field (and its flag), the value received, what is accepted."""
    parts = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"])
        flag = flags.get(loc)
        where = f"{loc} ({flag})" if flag else (loc or "config")
        message = item["msg"].removeprefix("Value error, ")
        received = item.get("input")
        if item["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown setting")
        elif isinstance(received, dict) or (item["type"] == "value_error" and not loc):
            parts.append(f"{where}: {message}")
        else:
            parts.append(f"{where}: got {received!r}; {message}")
    return "invalid configuration: " + "; ".join(parts)
