"""nclaunch's options, generated from RunConfig's fields: a field annotated with ``Cli``
(launcher/config.py) becomes an option with its names, type and environment variable; its
help is the field's description and its default the field's default, so each is written
once, in launcher/config.py. ``add_flags`` builds the click options; ``preflight``
checks what needs the filesystem or torch before any process starts. The CLI
(launcher/cli.py) and the sweep (launcher/sweep/) both import from here, so neither imports
the other to learn the options.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel

from launcher.config import RunConfig
from ncserve.errors import UserError
from ncserve.options import Cli, cli_fields, click_option


@dataclass(frozen=True)
class Flag:
    """One command-line option: the RunConfig field it sets (its dotted path), the field's
    description as help, and its ``Cli`` metadata."""

    path: str
    help: str
    cli: Cli

    @property
    def name(self) -> str:
        return self.path.replace(".", "__")

    @property
    def decls(self) -> tuple[str, ...]:
        return self.cli.decls


# --help's order: the launch sections first, the run's identity last.
_SECTIONS = ("launch", "model", "data", "optim", "engine", "train", "tracking", "")


def _flags() -> tuple[Flag, ...]:
    """Every RunConfig field with a ``Cli`` annotation, as an option."""
    flags = []
    for section in _SECTIONS:
        model = RunConfig if not section else RunConfig.model_fields[section].annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for name, field, cli in cli_fields(model):
            path = f"{section}.{name}" if section else name
            flags.append(Flag(path, str(field.description), cli))
    return tuple(flags)


FLAGS: tuple[Flag, ...] = _flags()
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
        command = click_option(flag.name, default, flag.help, flag.cli)(command)
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
