"""The run settings ``ncserve report`` reads, one list for both ends of the service.

A run directory's ``config.yaml`` holds every setting; a run read from the service has only
its metadata (string values). nclaunch therefore sends each setting listed here as metadata
under its dotted config path (``optim.lr`` = ``"0.1"``), and the report rebuilds the nested
config from those keys with each setting's type. This module imports nothing heavy: the
training workers import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The metadata key naming the sweep a run belongs to (nclaunch --sweep-id).
SWEEP_METADATA_KEY = "sweep"


@dataclass(frozen=True)
class ReportSetting:
    """A config value the report uses: dotted path, type, and its short name in a legend
    when a sweep varies it (None: never named in a legend)."""

    path: str
    kind: type[str] | type[float] | type[int]
    legend: str | None = None


# In the order a legend names the settings that vary among the runs.
REPORT_SETTINGS: tuple[ReportSetting, ...] = (
    ReportSetting("optim.name", str),
    ReportSetting("optim.coupled_fraction", float),
    ReportSetting("optim.lr", float, "lr"),
    ReportSetting("optim.momentum", float, "momentum"),
    ReportSetting("optim.weight_decay", float, "wd"),
    ReportSetting("optim.beta2", float, "beta2"),
    ReportSetting("optim.lr_schedule", str, "schedule"),
    ReportSetting("model.name", str, "model"),
    ReportSetting("data.dataset", str, "data"),
    ReportSetting("train.batch_size", int, "batch"),
    ReportSetting("train.seed", int, "seed"),
    ReportSetting("train.epochs", int),
)

REPORT_SETTING_PATHS: frozenset[str] = frozenset(s.path for s in REPORT_SETTINGS)


def lookup(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """``config["optim"]["lr"]`` for ``"optim.lr"``; ``default`` where a level is missing."""
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return default
        value = value[part]
    return value


def assign(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``tree["optim"]["lr"] = value`` for ``"optim.lr"``, creating the levels missing."""
    *sections, leaf = dotted.split(".")
    for section in sections:
        tree = tree.setdefault(section, {})
    tree[leaf] = value


def settings_metadata(config: Mapping[str, Any]) -> dict[str, str]:
    """Run metadata carrying the report's settings of a nested ``config`` (None: left out)."""
    metadata: dict[str, str] = {}
    for setting in REPORT_SETTINGS:
        value = lookup(config, setting.path)
        if value is not None:
            metadata[setting.path] = str(value)
    return metadata


def config_from_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The nested config of the report's settings found in ``metadata``, typed as in
    config.yaml. A value that does not parse as its type is left out (the report then shows
    the setting as unknown), as are keys the report does not read."""
    config: dict[str, Any] = {}
    for setting in REPORT_SETTINGS:
        text = metadata.get(setting.path)
        if text is None:
            continue
        try:
            value = setting.kind(text)
        except ValueError:
            continue
        assign(config, setting.path, value)
    return config
