"""Command-line options generated from pydantic models: a field annotated with ``Cli`` is an
option, with the field's description as its help and the field's default as its default,
so each setting is written once, in its model (``ncserve serve``: ServerConfig; ``nclaunch``:
launcher's RunConfig)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

F = TypeVar("F", bound=Callable[..., Any])

_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class Cli:
    """How a field appears on the command line: its option names (aliases after the first),
    click type, environment variable, whether it is a flag, a metavar, and the text --help
    shows for the default when the field's own value would not say it well."""

    decls: tuple[str, ...]
    type: Any = None
    envvar: str | None = None
    is_flag: bool = False
    default_text: str | None = None
    metavar: str | None = None


def cli_of(field: FieldInfo) -> Cli | None:
    return next((m for m in field.metadata if isinstance(m, Cli)), None)


def cli_fields(model: type[BaseModel]) -> Iterator[tuple[str, FieldInfo, Cli]]:
    """The fields of ``model`` that are options, in field order."""
    for name, field in model.model_fields.items():
        cli = cli_of(field)
        if cli is not None:
            assert field.description, f"{model.__name__}.{name} has no description for --help"
            yield name, field, cli


def click_option(param_name: str, default: Any, help_text: str, cli: Cli) -> Callable[[F], F]:
    """The click option of one field; a duration's default is shown in its largest unit."""
    shown: str | bool = cli.default_text or True
    if cli.default_text is None and isinstance(cli.type, Duration) and default is not None:
        shown = shown_duration(default)
    return click.option(
        *cli.decls,
        param_name,
        type=cli.type,
        envvar=cli.envvar,
        is_flag=cli.is_flag or None,
        default=default,
        show_default=shown,
        show_envvar=cli.envvar is not None,
        metavar=cli.metavar,
        help=help_text,
    )


def model_options(model: type[BaseModel]) -> Callable[[F], F]:
    """Decorate a click command with an option per ``Cli`` field of ``model`` (parameter
    named as the field), in field order."""

    def decorate(command: F) -> F:
        for name, field, cli in reversed(list(cli_fields(model))):
            command = click_option(name, field.default, str(field.description), cli)(command)
        return command

    return decorate


class Duration(click.ParamType):
    """Seconds, or a number with a unit: 90, 45s, 30m, 2h, 7d."""

    name = "DURATION"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        text = str(value).strip()
        scale = _DURATION_UNITS.get(text[-1:])
        number = text[:-1] if scale is not None else text
        try:
            seconds = float(number) * (scale or 1.0)
        except ValueError:
            self.fail(f"{value!r} is not a duration (e.g. 90, 45s, 30m, 2h, 7d)", param, ctx)
        if not seconds > 0:
            self.fail(f"{value!r} must be longer than 0", param, ctx)
        return seconds


def shown_duration(seconds: float) -> str:
    """A duration as --help shows it (the largest unit that divides it)."""
    for unit, scale in sorted(_DURATION_UNITS.items(), key=lambda item: -item[1]):
        if seconds % scale == 0:
            return f"{seconds / scale:g}{unit}"
    return f"{seconds:g}s"
