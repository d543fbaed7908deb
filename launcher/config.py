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

from pathlib import Path
from typing import Annotated, Any, Literal

import click
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from launcher.data import DATASET_NAMES
from launcher.data.datasets import FILE_DATASETS, SYNTHETIC_DEFAULTS
from launcher.models import MODEL_NAMES
from launcher.optim import OPTIMIZER_NAMES, SCHEDULE_NAMES
from ncserve.options import Cli
from ncserve.protocol import RUN_ID_PATTERN, RUN_ID_RULE

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


_PATH = click.Path(path_type=Path)
FILE_PATH = click.Path(path_type=Path, dir_okay=False)
_LR_DEFAULTS = ", ".join(
    f"{'/'.join(n for n in OPTIMIZER_NAMES if DEFAULT_LRS[n] == lr)} {lr:g}"
    for lr in sorted(set(DEFAULT_LRS.values()), reverse=True)
)


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

    nnodes: Annotated[str, Cli(("--nodes", "--nnodes"), envvar="PET_NNODES")] = Field(
        "1", description="Nodes, N or MIN:MAX. Local mode runs all nodes' workers on this machine."
    )
    nproc_per_node: Annotated[
        str, Cli(("--nproc-per-node", "--nproc_per_node"), envvar="PET_NPROC_PER_NODE")
    ] = Field(
        "1",
        description="Workers per node: an integer, or auto (one per GPU, else one per CPU core).",
    )
    node_rank: Annotated[
        int, Cli(("--node-rank", "--node_rank"), type=click.IntRange(min=0), envvar="PET_NODE_RANK")
    ] = Field(0, ge=0, description="Rank of this node (static rendezvous).")
    rdzv_backend: Annotated[
        str, Cli(("--rdzv-backend", "--rdzv_backend"), envvar="PET_RDZV_BACKEND")
    ] = Field("c10d", description="Rendezvous backend (c10d, static, etcd, etcd-v2).")
    rdzv_endpoint: Annotated[
        str, Cli(("--rdzv-endpoint", "--rdzv_endpoint"), envvar="PET_RDZV_ENDPOINT")
    ] = Field("", description="Rendezvous HOST:PORT shared by all nodes; empty: local mode.")
    rdzv_id: Annotated[
        str, Cli(("--rdzv-id", "--rdzv_id"), envvar="PET_RDZV_ID", default_text="the run id")
    ] = Field(
        "",
        description="Rendezvous group id (also the run id of a multi-node run when --run-id is not given).",
    )
    master_addr: Annotated[
        str, Cli(("--master-addr", "--master_addr"), envvar="PET_MASTER_ADDR")
    ] = Field(
        "",
        description="Static rendezvous: address of node 0 (used when no --rdzv-endpoint is given).",
    )
    master_port: Annotated[
        int,
        Cli(
            ("--master-port", "--master_port"),
            type=click.IntRange(1, 65535),
            envvar="PET_MASTER_PORT",
        ),
    ] = Field(29500, ge=1, le=65535, description="Static rendezvous: port on node 0.")
    max_restarts: Annotated[
        int,
        Cli(
            ("--max-restarts", "--max_restarts"),
            type=click.IntRange(min=0),
            envvar="PET_MAX_RESTARTS",
        ),
    ] = Field(
        0,
        ge=0,
        description="Elastic restarts of the workers after a failure; each resumes from the last checkpoint.",
    )
    standalone: Annotated[bool, Cli(("--standalone",), envvar="PET_STANDALONE", is_flag=True)] = (
        Field(
            False, description="Single machine with a local rendezvous (as torchrun --standalone)."
        )
    )
    device: Annotated[
        Literal["auto", "cpu", "cuda"],
        Cli(("--device",), type=click.Choice(["auto", "cpu", "cuda"])),
    ] = Field("auto", description="Where to train: cuda if available for auto.")

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
    name: Annotated[str, Cli(("--model",), type=click.Choice(MODEL_NAMES))] = Field(
        "mlp", description="Architecture; its last layer is model.classifier."
    )
    width: Annotated[float, Cli(("--width",), type=click.FloatRange(min=0, min_open=True))] = Field(
        1.0, gt=0, description="Width multiplier of every hidden layer."
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _one_of(value, MODEL_NAMES)


class DataConfig(_Section):
    dataset: Annotated[str, Cli(("--dataset",), type=click.Choice(DATASET_NAMES))] = Field(
        "mnist5k", description="Dataset."
    )
    data_dir: Annotated[Path | None, Cli(("--data-dir",), type=_PATH)] = Field(
        None,
        description="Folder holding mnist/fashionmnist (IDX), cifar10/cifar100 (python pickles) or an "
        "imagefolder.",
    )
    # The synthetic dataset's shape; None for every other dataset (theirs is the data's),
    # and for synthetic until resolve() fills in SYNTHETIC_DEFAULTS.
    num_classes: Annotated[
        int | None,
        Cli(
            ("--num-classes",),
            type=click.IntRange(min=2),
            default_text=f"{SYNTHETIC_DEFAULTS['num_classes']} (synthetic only)",
        ),
    ] = Field(None, ge=2, description="synthetic: number of classes K.")
    feature_dim: Annotated[
        int | None,
        Cli(
            ("--feature-dim",),
            type=click.IntRange(min=1),
            default_text=f"{SYNTHETIC_DEFAULTS['feature_dim']} (synthetic only)",
        ),
    ] = Field(None, ge=1, description="synthetic: input dimension.")
    num_samples: Annotated[
        int | None,
        Cli(
            ("--num-samples",),
            type=click.IntRange(min=2),
            default_text=f"{SYNTHETIC_DEFAULTS['num_samples']} (synthetic only)",
        ),
    ] = Field(None, ge=2, description="synthetic: number of samples.")
    holdout: Annotated[float, Cli(("--holdout",), type=click.FloatRange(0, 1, max_open=True))] = (
        Field(
            0.0,
            ge=0.0,
            lt=1.0,
            description="Fraction of each class held out for held-out accuracy and NC4 (0: the dataset's own "
            "test split when it has one).",
        )
    )
    measure_samples_per_class: Annotated[
        int | None,
        Cli(
            ("--measure-samples-per-class",),
            type=click.IntRange(min=1),
            default_text="all training samples",
        ),
    ] = Field(
        None, ge=1, description="Measurement split: this many training samples per class (seeded)."
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
    name: Annotated[str, Cli(("--optimizer",), type=click.Choice(OPTIMIZER_NAMES))] = Field(
        "sgd", description="Optimizer, as defined in docs/training.md."
    )
    lr: Annotated[
        float | None,
        Cli(
            ("--lr",),
            type=click.FloatRange(min=0, min_open=True),
            default_text=f"per optimizer: {_LR_DEFAULTS}",
        ),
    ] = Field(None, gt=0, description="Learning rate.")
    momentum: Annotated[float, Cli(("--momentum",), type=click.FloatRange(0, 1, max_open=True))] = (
        Field(0.9, ge=0.0, lt=1.0, description="Momentum; beta1 for adam/adamw/lion.")
    )
    beta2: Annotated[float, Cli(("--beta2",), type=click.FloatRange(0, 1, max_open=True))] = Field(
        0.999, ge=0.0, lt=1.0, description="Second coefficient of adam/adamw/lion."
    )
    weight_decay: Annotated[float, Cli(("--weight-decay",), type=click.FloatRange(min=0))] = Field(
        5e-4,
        ge=0.0,
        description="Weight decay lambda (coupled or decoupled as the optimizer defines it).",
    )
    coupled_fraction: Annotated[
        float | None,
        Cli(
            ("--coupled-fraction",), type=click.FloatRange(0, 1), default_text="the optimizer's own"
        ),
    ] = Field(
        None,
        ge=0.0,
        le=1.0,
        description="adam/adamw: share of the weight decay that is coupled (1: Adam, 0: AdamW).",
    )
    eps: Annotated[float, Cli(("--eps",), type=click.FloatRange(min=0, min_open=True))] = Field(
        1e-8, gt=0, description="Adam epsilon."
    )
    lr_schedule: Annotated[str, Cli(("--lr-schedule",), type=click.Choice(SCHEDULE_NAMES))] = Field(
        "constant",
        description="constant; step (lr / 10 at 1/3 and 2/3 of training); cosine (to 0).",
    )

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
    name: Annotated[
        Literal["ddp", "deepspeed"], Cli(("--engine",), type=click.Choice(["ddp", "deepspeed"]))
    ] = Field("ddp", description="Distributed engine.")
    zero_stage: Annotated[
        Literal[0, 1, 2, 3], Cli(("--zero-stage",), type=click.IntRange(0, 3))
    ] = Field(2, description="DeepSpeed ZeRO stage.")
    precision: Annotated[
        Literal["fp32", "bf16", "fp16"],
        Cli(("--precision",), type=click.Choice(["fp32", "bf16", "fp16"])),
    ] = Field("fp32", description="Training precision (bf16/fp16 on GPU only).")


class TrainConfig(_Section):
    batch_size: Annotated[int, Cli(("--batch-size",), type=click.IntRange(min=1))] = Field(
        128, ge=1, description="Global batch size (split over the ranks)."
    )
    epochs: Annotated[int, Cli(("--epochs",), type=click.IntRange(min=1))] = Field(
        8, ge=1, description="Training epochs."
    )
    seed: Annotated[int, Cli(("--seed",), type=click.IntRange(min=0))] = Field(
        0, ge=0, description="Seed of initialisation, data split and sampler."
    )
    deterministic: Annotated[bool, Cli(("--deterministic",), is_flag=True)] = Field(
        False,
        description="Deterministic kernels: a rerun (or a resumed run) reproduces the metrics bitwise.",
    )
    log_every: Annotated[int, Cli(("--log-every",), type=click.IntRange(min=1))] = Field(
        10, ge=1, description="Steps between logged steps (nc0 recorded)."
    )
    measure_every: Annotated[int, Cli(("--measure-every",), type=click.IntRange(min=1))] = Field(
        1, ge=1, description="Epochs between NC measurements (also at step 0 and at the last step)."
    )
    checkpoint_every: Annotated[int, Cli(("--checkpoint-every",), type=click.IntRange(min=0))] = (
        Field(1, ge=0, description="Epochs between checkpoints (0: only the final one).")
    )
    keep_checkpoints: Annotated[int, Cli(("--keep-checkpoints",), type=click.IntRange(min=1))] = (
        Field(3, ge=1, description="Checkpoints kept (newest).")
    )
    measure_batch_size: Annotated[
        int, Cli(("--measure-batch-size",), type=click.IntRange(min=1))
    ] = Field(1024, ge=1, description="Batch size of measurement passes.")
    keep_measured_weights: Annotated[
        bool, Cli(("--keep-measured-weights/--no-keep-measured-weights",), is_flag=True)
    ] = Field(
        True,
        description="Keep the model weights of every measured step (step 0 included) in RUN_DIR/weights, "
        "so `nclaunch export-features --step S` can recompute any measurement; the model's "
        "size per measurement on disk.",
    )


class TrackingConfig(_Section):
    enabled: Annotated[bool, Cli(("--tracking/--no-tracking",), is_flag=True)] = Field(
        True,
        description="NC tracking through the ncserve service (off: only nc0, from W, is recorded).",
    )
    sidecar: Annotated[
        str | None, Cli(("--sidecar",), default_text="embedded service on 127.0.0.1")
    ] = Field(None, description="External ncserve service HOST:PORT instead of the embedded one.")
    token_file: Annotated[Path | None, Cli(("--sidecar-token-file",), type=FILE_PATH)] = Field(
        None, description="File holding the service token."
    )
    tls_ca: Annotated[Path | None, Cli(("--sidecar-tls-ca",), type=FILE_PATH)] = Field(
        None, description="CA bundle that signed the service's cert."
    )
    tls_cert: Annotated[Path | None, Cli(("--sidecar-tls-cert",), type=FILE_PATH)] = Field(
        None, description="Client certificate for mutual TLS."
    )
    tls_key: Annotated[Path | None, Cli(("--sidecar-tls-key",), type=FILE_PATH)] = Field(
        None, description="Client key for mutual TLS."
    )
    deadline_s: Annotated[
        float, Cli(("--deadline",), type=click.FloatRange(min=0, min_open=True))
    ] = Field(
        5.0,
        gt=0,
        description="Seconds a call to the service may take before the client buffers it.",
    )
    background: Annotated[
        bool, Cli(("--measure-in-background/--measure-in-foreground",), is_flag=True)
    ] = Field(
        True,
        description="In the background, a measurement holds training only for its forward pass: the "
        "statistics and the rounds with the service run in a thread while training goes on "
        "(settled at the next measurement, checkpoint and the end). In the foreground, "
        "training waits for the metrics.",
    )
    buffer_mb: Annotated[
        float, Cli(("--buffer-mb",), type=click.FloatRange(min=0, min_open=True))
    ] = Field(
        256.0,
        gt=0,
        description="MiB of undelivered measurements each rank keeps while the service is unreachable "
        "(in memory, then spilled to RUN_DIR/spool); past it later ones are dropped and "
        "reported by step and rank.",
    )
    tensorboard: Annotated[Path | None, Cli(("--tensorboard",), type=_PATH)] = Field(
        None, description="Also write TensorBoard event files to this folder."
    )
    shard_per_rank: Annotated[bool, Cli(("--shard-per-rank/--shard-per-node",), is_flag=True)] = (
        Field(
            False,
            description="Each rank pushes its own shard of statistics to the service. Per node (the "
            "default), the ranks of a node sum their statistics in float64 with a collective on the "
            "training device and one rank per node pushes: the service sees one shard per node, with "
            "the same metrics.",
        )
    )
    sweep_id: Annotated[str | None, Cli(("--sweep-id",))] = Field(
        None,
        description="The sweep this run is a point of (nclaunch sweep sets it); sent to the "
        "service as the run's `sweep` metadata, by which `ncserve report` groups the runs it "
        "reads from a service or database.",
    )
    csv: Annotated[Path | None, Cli(("--csv",), type=FILE_PATH)] = Field(
        None, description="Also append every measurement to this CSV file."
    )

    @field_validator("sweep_id")
    @classmethod
    def _check_sweep_id(cls, value: str | None) -> str | None:
        if value is not None and not RUN_ID_PATTERN.fullmatch(value):
            raise ValueError(RUN_ID_RULE)
        return value

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

    run_id: Annotated[
        str, Cli(("--run-id",), default_text="<optimizer>-<model>-<dataset>-<time>-<4 hex>")
    ] = Field("", description="Run id (letters, digits, - _ .).")
    run_dir: Annotated[
        Path | None, Cli(("--run-dir",), type=_PATH, default_text="runs/<run-id>")
    ] = Field(None, description="Run directory.")
    resume: Annotated[bool, Cli(("--resume",), is_flag=True)] = Field(
        False,
        description="Continue the run in --run-dir (or runs/<--run-id>) from its last checkpoint; its "
        "config.yaml is the base that other options override.",
    )
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
