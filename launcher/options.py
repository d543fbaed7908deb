"""nclaunch's options: one ``Flag`` per RunConfig field it sets, with the decls, help,
type and environment variable of its command-line option; the default is always the field's
own (``RunConfig()``), so a default is written once, in launcher/config.py. ``add_flags``
builds the click options; ``preflight`` checks what needs the filesystem or torch before any
process starts. The CLI (launcher/cli.py) and the sweep (launcher/sweep.py) both import from
here, so neither imports the other to learn the options.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from launcher.config import DEFAULT_LRS, RunConfig
from launcher.data import DATASET_NAMES
from launcher.data.datasets import SYNTHETIC_DEFAULTS
from launcher.models import MODEL_NAMES
from launcher.optim import OPTIMIZER_NAMES, SCHEDULE_NAMES
from ncserve.errors import UserError

_PATH = click.Path(path_type=Path)
FILE_PATH = click.Path(path_type=Path, dir_okay=False)


@dataclass(frozen=True)
class Flag:
    """One command-line option and the RunConfig field it sets."""

    decls: tuple[str, ...]
    path: str
    help: str
    type: Any = None
    envvar: str | None = None
    is_flag: bool = False
    default_text: str | None = None

    @property
    def name(self) -> str:
        return self.path.replace(".", "__")


_LR_DEFAULTS = ", ".join(
    f"{'/'.join(n for n in OPTIMIZER_NAMES if DEFAULT_LRS[n] == lr)} {lr:g}"
    for lr in sorted(set(DEFAULT_LRS.values()), reverse=True)
)

FLAGS: tuple[Flag, ...] = (
    # -- launch (torchrun-compatible) --
    Flag(
        ("--nodes", "--nnodes"),
        "launch.nnodes",
        "Nodes, N or MIN:MAX. Local mode runs all nodes' workers on this machine.",
        envvar="PET_NNODES",
    ),
    Flag(
        ("--nproc-per-node", "--nproc_per_node"),
        "launch.nproc_per_node",
        "Workers per node: an integer, or auto (one per GPU, else one per CPU core).",
        envvar="PET_NPROC_PER_NODE",
    ),
    Flag(
        ("--node-rank", "--node_rank"),
        "launch.node_rank",
        "Rank of this node (static rendezvous).",
        click.IntRange(min=0),
        envvar="PET_NODE_RANK",
    ),
    Flag(
        ("--rdzv-backend", "--rdzv_backend"),
        "launch.rdzv_backend",
        "Rendezvous backend (c10d, static, etcd, etcd-v2).",
        envvar="PET_RDZV_BACKEND",
    ),
    Flag(
        ("--rdzv-endpoint", "--rdzv_endpoint"),
        "launch.rdzv_endpoint",
        "Rendezvous HOST:PORT shared by all nodes; empty: local mode.",
        envvar="PET_RDZV_ENDPOINT",
    ),
    Flag(
        ("--rdzv-id", "--rdzv_id"),
        "launch.rdzv_id",
        "Rendezvous group id (also the run id of a multi-node run when --run-id is not given).",
        envvar="PET_RDZV_ID",
        default_text="the run id",
    ),
    Flag(
        ("--master-addr", "--master_addr"),
        "launch.master_addr",
        "Static rendezvous: address of node 0 (used when no --rdzv-endpoint is given).",
        envvar="PET_MASTER_ADDR",
    ),
    Flag(
        ("--master-port", "--master_port"),
        "launch.master_port",
        "Static rendezvous: port on node 0.",
        click.IntRange(1, 65535),
        envvar="PET_MASTER_PORT",
    ),
    Flag(
        ("--max-restarts", "--max_restarts"),
        "launch.max_restarts",
        "Elastic restarts of the workers after a failure; each resumes from the last checkpoint.",
        click.IntRange(min=0),
        envvar="PET_MAX_RESTARTS",
    ),
    Flag(
        ("--standalone",),
        "launch.standalone",
        "Single machine with a local rendezvous (as torchrun --standalone).",
        envvar="PET_STANDALONE",
        is_flag=True,
    ),
    Flag(
        ("--device",),
        "launch.device",
        "Where to train: cuda if available for auto.",
        click.Choice(["auto", "cpu", "cuda"]),
    ),
    # -- model and data --
    Flag(
        ("--model",),
        "model.name",
        "Architecture; its last layer is model.classifier.",
        click.Choice(MODEL_NAMES),
    ),
    Flag(
        ("--width",),
        "model.width",
        "Width multiplier of every hidden layer.",
        click.FloatRange(min=0, min_open=True),
    ),
    Flag(("--dataset",), "data.dataset", "Dataset.", click.Choice(DATASET_NAMES)),
    Flag(
        ("--data-dir",),
        "data.data_dir",
        "Folder holding mnist/fashionmnist (IDX), cifar10/cifar100 (python pickles) or an "
        "imagefolder.",
        _PATH,
    ),
    Flag(
        ("--num-classes",),
        "data.num_classes",
        "synthetic: number of classes K.",
        click.IntRange(min=2),
        default_text=f"{SYNTHETIC_DEFAULTS['num_classes']} (synthetic only)",
    ),
    Flag(
        ("--feature-dim",),
        "data.feature_dim",
        "synthetic: input dimension.",
        click.IntRange(min=1),
        default_text=f"{SYNTHETIC_DEFAULTS['feature_dim']} (synthetic only)",
    ),
    Flag(
        ("--num-samples",),
        "data.num_samples",
        "synthetic: number of samples.",
        click.IntRange(min=2),
        default_text=f"{SYNTHETIC_DEFAULTS['num_samples']} (synthetic only)",
    ),
    Flag(
        ("--holdout",),
        "data.holdout",
        "Fraction of each class held out for held-out accuracy and NC4 (0: the dataset's own "
        "test split when it has one).",
        click.FloatRange(0, 1, max_open=True),
    ),
    Flag(
        ("--measure-samples-per-class",),
        "data.measure_samples_per_class",
        "Measurement split: this many training samples per class (seeded).",
        click.IntRange(min=1),
        default_text="all training samples",
    ),
    # -- optimizer --
    Flag(
        ("--optimizer",),
        "optim.name",
        "Optimizer, as defined in docs/training.md.",
        click.Choice(OPTIMIZER_NAMES),
    ),
    Flag(
        ("--lr",),
        "optim.lr",
        "Learning rate.",
        click.FloatRange(min=0, min_open=True),
        default_text=f"per optimizer: {_LR_DEFAULTS}",
    ),
    Flag(
        ("--momentum",),
        "optim.momentum",
        "Momentum; beta1 for adam/adamw/lion.",
        click.FloatRange(0, 1, max_open=True),
    ),
    Flag(
        ("--beta2",),
        "optim.beta2",
        "Second coefficient of adam/adamw/lion.",
        click.FloatRange(0, 1, max_open=True),
    ),
    Flag(
        ("--weight-decay",),
        "optim.weight_decay",
        "Weight decay lambda (coupled or decoupled as the optimizer defines it).",
        click.FloatRange(min=0),
    ),
    Flag(
        ("--coupled-fraction",),
        "optim.coupled_fraction",
        "adam/adamw: share of the weight decay that is coupled (1: Adam, 0: AdamW).",
        click.FloatRange(0, 1),
        default_text="the optimizer's own",
    ),
    Flag(("--eps",), "optim.eps", "Adam epsilon.", click.FloatRange(min=0, min_open=True)),
    Flag(
        ("--lr-schedule",),
        "optim.lr_schedule",
        "constant; step (lr / 10 at 1/3 and 2/3 of training); cosine (to 0).",
        click.Choice(SCHEDULE_NAMES),
    ),
    # -- engine --
    Flag(("--engine",), "engine.name", "Distributed engine.", click.Choice(["ddp", "deepspeed"])),
    Flag(("--zero-stage",), "engine.zero_stage", "DeepSpeed ZeRO stage.", click.IntRange(0, 3)),
    Flag(
        ("--precision",),
        "engine.precision",
        "Training precision (bf16/fp16 on GPU only).",
        click.Choice(["fp32", "bf16", "fp16"]),
    ),
    # -- training --
    Flag(
        ("--batch-size",),
        "train.batch_size",
        "Global batch size (split over the ranks).",
        click.IntRange(min=1),
    ),
    Flag(("--epochs",), "train.epochs", "Training epochs.", click.IntRange(min=1)),
    Flag(
        ("--seed",),
        "train.seed",
        "Seed of initialisation, data split and sampler.",
        click.IntRange(min=0),
    ),
    Flag(
        ("--keep-measured-weights/--no-keep-measured-weights",),
        "train.keep_measured_weights",
        "Keep the model weights of every measured step (step 0 included) in RUN_DIR/weights, "
        "so `nclaunch export-features --step S` can recompute any measurement; the model's "
        "size per measurement on disk.",
        is_flag=True,
    ),
    Flag(
        ("--deterministic",),
        "train.deterministic",
        "Deterministic kernels: a rerun (or a resumed run) reproduces the metrics bitwise.",
        is_flag=True,
    ),
    Flag(
        ("--log-every",),
        "train.log_every",
        "Steps between logged steps (nc0 recorded).",
        click.IntRange(min=1),
    ),
    Flag(
        ("--measure-every",),
        "train.measure_every",
        "Epochs between NC measurements (also at step 0 and at the last step).",
        click.IntRange(min=1),
    ),
    Flag(
        ("--measure-batch-size",),
        "train.measure_batch_size",
        "Batch size of measurement passes.",
        click.IntRange(min=1),
    ),
    Flag(
        ("--checkpoint-every",),
        "train.checkpoint_every",
        "Epochs between checkpoints (0: only the final one).",
        click.IntRange(min=0),
    ),
    Flag(
        ("--keep-checkpoints",),
        "train.keep_checkpoints",
        "Checkpoints kept (newest).",
        click.IntRange(min=1),
    ),
    # -- tracking --
    Flag(
        ("--tracking/--no-tracking",),
        "tracking.enabled",
        "NC tracking through the ncserve service (off: only nc0, from W, is recorded).",
        is_flag=True,
    ),
    Flag(
        ("--sidecar",),
        "tracking.sidecar",
        "External ncserve service HOST:PORT instead of the embedded one.",
        default_text="embedded service on 127.0.0.1",
    ),
    Flag(
        ("--sidecar-token-file",),
        "tracking.token_file",
        "File holding the service token.",
        FILE_PATH,
    ),
    Flag(
        ("--sidecar-tls-ca",),
        "tracking.tls_ca",
        "CA bundle that signed the service's cert.",
        FILE_PATH,
    ),
    Flag(
        ("--sidecar-tls-cert",),
        "tracking.tls_cert",
        "Client certificate for mutual TLS.",
        FILE_PATH,
    ),
    Flag(("--sidecar-tls-key",), "tracking.tls_key", "Client key for mutual TLS.", FILE_PATH),
    Flag(
        ("--deadline",),
        "tracking.deadline_s",
        "Seconds a call to the service may take before the client buffers it.",
        click.FloatRange(min=0, min_open=True),
    ),
    Flag(
        ("--measure-in-background/--measure-in-foreground",),
        "tracking.background",
        "In the background, a measurement holds training only for its forward pass: the "
        "statistics and the rounds with the service run in a thread while training goes on "
        "(settled at the next measurement, checkpoint and the end). In the foreground, "
        "training waits for the metrics.",
        is_flag=True,
    ),
    Flag(
        ("--buffer-mb",),
        "tracking.buffer_mb",
        "MiB of undelivered measurements each rank keeps while the service is unreachable "
        "(in memory, then spilled to RUN_DIR/spool); past it later ones are dropped and "
        "reported by step and rank.",
        click.FloatRange(min=0, min_open=True),
    ),
    Flag(
        ("--tensorboard",),
        "tracking.tensorboard",
        "Also write TensorBoard event files to this folder.",
        _PATH,
    ),
    Flag(("--csv",), "tracking.csv", "Also append every measurement to this CSV file.", FILE_PATH),
    # -- run --
    Flag(
        ("--run-id",),
        "run_id",
        "Run id (letters, digits, - _ .).",
        default_text="<optimizer>-<model>-<dataset>-<time>-<4 hex>",
    ),
    Flag(("--run-dir",), "run_dir", "Run directory.", _PATH, default_text="runs/<run-id>"),
    Flag(
        ("--resume",),
        "resume",
        "Continue the run in --run-dir (or runs/<--run-id>) from its last checkpoint; its "
        "config.yaml is the base that other options override.",
        is_flag=True,
    ),
)
FLAG_BY_PATH: dict[str, str] = {flag.path: flag.decls[0].split("/")[0] for flag in FLAGS}


def _field_default(path: str) -> Any:
    value: Any = RunConfig()
    for part in path.split("."):
        value = getattr(value, part)
    return value


def add_flags(command: click.Command) -> click.Command:
    # Applied to a built command, click appends each option: FLAGS order is --help's order.
    for flag in FLAGS:
        default = _field_default(flag.path)
        if isinstance(default, Path):
            default = str(default)
        option = click.option(
            *flag.decls,
            flag.name,
            type=flag.type,
            envvar=flag.envvar,
            is_flag=flag.is_flag or None,
            default=default,
            show_default=flag.default_text or True,
            show_envvar=flag.envvar is not None,
            help=flag.help,
        )
        command = option(command)
    return command


def preflight(config: RunConfig) -> None:
    """Checks that need the filesystem or torch, still before any process starts."""
    import torch

    from launcher.engines import optimizer_from_config
    from launcher.rundir import tensorboard_available
    from ncserve.track.sinks import TENSORBOARD_EXTRA

    data_dir = config.data.data_dir
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"data.data_dir (--data-dir): {str(data_dir)!r} is not a directory")
    if config.tracking.tensorboard is not None and not tensorboard_available():
        raise UserError(
            "tracking.tensorboard (--tensorboard): needs the tensorboard package "
            f"(pip install '{TENSORBOARD_EXTRA}')"
        )
    try:
        # The optimizer's own checks (ranges, combinations) on a throwaway parameter.
        optimizer_from_config([torch.zeros(1, requires_grad=True)], config)
    except ValueError as err:
        raise UserError(f"optim (--optimizer {config.optim.name}): {err}") from None
