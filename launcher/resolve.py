"""From settings to a RunConfig: YAML files and their layering, ``resolve`` (every "decide
later" value filled in, once, in the launcher), the run id, and one-line validation errors.
The model itself is launcher/config.py."""

from __future__ import annotations

import datetime as dt
import os
import secrets
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from launcher.config import DEFAULT_LRS, RunConfig, parse_nnodes


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
