"""Runs as the report sees them: measurement rows, the settings that matter, the theory's nc0.

A run directory is what nclaunch leaves: ``metrics.jsonl`` (one JSON object per
measurement) and ``config.yaml`` (the resolved settings). A sweep directory holds run
directories. The report reads these files (or the service: ``ncserve.report.service``);
it needs neither torch nor the launcher.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ncserve import theory
from ncserve.report.settings import lookup

# A sweep directory holds runs one level down; accept one more (a folder of sweeps).
_SEARCH_DEPTH = 3


class RunInputError(ValueError):
    """An input that is not a run directory, a sweep directory or a metrics.jsonl file."""


@dataclass
class RunRecord:
    """One run: its name, folder (None for a run read from the service), settings
    (config.yaml as a dict) and measurement rows."""

    name: str
    path: Path | None
    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def setting(self, dotted: str, default: Any = None) -> Any:
        """A setting by dotted path (one of ncserve.report.settings.REPORT_SETTINGS)."""
        return lookup(self.config, dotted, default)

    @property
    def optimizer(self) -> str:
        return str(self.setting("optim.name", "unknown"))

    @property
    def coupled_fraction(self) -> float | None:
        value = self.setting("optim.coupled_fraction")
        return None if value is None else float(value)

    @property
    def label(self) -> str:
        """The optimizer as the study varies it: an Adam split by its coupled fraction F."""
        fraction = self.coupled_fraction
        return self.optimizer if fraction is None else f"{self.optimizer} F={fraction:g}"

    @property
    def lr(self) -> float | None:
        return _float_or_none(self.setting("optim.lr"))

    @property
    def momentum(self) -> float | None:
        return _float_or_none(self.setting("optim.momentum"))

    @property
    def weight_decay(self) -> float | None:
        return _float_or_none(self.setting("optim.weight_decay"))

    @property
    def epochs(self) -> int | None:
        value = self.setting("train.epochs")
        return None if value is None else int(value)

    @property
    def first(self) -> dict[str, Any]:
        return self.rows[0]

    @property
    def last(self) -> dict[str, Any]:
        return self.rows[-1]

    @property
    def steps_per_epoch(self) -> int | None:
        """Optimizer steps per epoch, from a measurement taken at the end of an epoch."""
        for row in self.rows:
            epoch, step = row.get("epoch"), row.get("step")
            if isinstance(epoch, int) and epoch > 0 and isinstance(step, int) and step % epoch == 0:
                return step // epoch
        return None

    def values(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(epochs, values) of the rows where ``key`` is a finite number."""
        points = [
            (float(row["epoch"]) if _finite(row.get("epoch")) else 0.0, float(row[key]))
            for row in self.rows
            if _finite(row.get(key))
        ]
        if not points:
            return np.empty(0), np.empty(0)
        epochs, values = zip(*points, strict=True)
        return np.asarray(epochs), np.asarray(values)


@dataclass(frozen=True)
class NC0Prediction:
    """The theory's nc0 at every step of a run, anchored at its measured nc0 at step 0."""

    steps: np.ndarray  # 0..T
    epochs: np.ndarray  # steps / steps_per_epoch
    nc0: np.ndarray  # |c_t| * nc0_0

    def at(self, step: int) -> float:
        return float(self.nc0[step])


def nc0_prediction(record: RunRecord) -> NC0Prediction | None:
    """Exact nc0 of an sgd/sgdw run from its settings (None for other optimizers).

    Uses the run's lr schedule over its planned length (steps per epoch x epochs), its
    momentum and weight decay; the measured nc0 at step 0 is the anchor.
    """
    if record.optimizer not in theory.NC0_OPTIMIZERS or record.coupled_fraction is not None:
        return None
    lr, momentum, wd = record.lr, record.momentum, record.weight_decay
    per_epoch, epochs = record.steps_per_epoch, record.epochs
    schedule = str(record.setting("optim.lr_schedule", "constant"))
    if None in (lr, momentum, wd, per_epoch, epochs) or not record.rows:
        return None
    assert lr is not None and momentum is not None and wd is not None
    assert per_epoch is not None and epochs is not None
    start = record.first
    if start.get("step") != 0 or not _finite(start.get("nc0")):
        return None
    last_step = max(int(row["step"]) for row in record.rows)
    if last_step < 1:
        return None
    total = per_epoch * epochs
    try:
        lrs = theory.lr_schedule(lr, schedule, last_step, max(total, last_step))
        factors = theory.nc0_factors(record.optimizer, lrs, momentum, wd)
    except ValueError:
        return None
    steps = np.arange(len(factors))
    return NC0Prediction(steps, steps / per_epoch, np.abs(factors) * float(start["nc0"]))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _float_or_none(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def find_run_dirs(path: Path) -> list[Path]:
    """The run directories ``path`` names: itself, or those below it (a sweep)."""
    path = Path(path)
    if path.is_file():
        if path.name == "metrics.jsonl":
            return [path.parent]
        raise RunInputError(
            f"{path}: not a run; give an nclaunch run directory, a sweep directory or a "
            "metrics.jsonl file"
        )
    if not path.is_dir():
        raise RunInputError(f"{path}: no such file or directory")
    if (path / "metrics.jsonl").is_file():
        return [path]
    found: list[Path] = []
    frontier = [path]
    for _ in range(_SEARCH_DEPTH):
        children = sorted(
            child for folder in frontier for child in folder.iterdir() if child.is_dir()
        )
        found += [child for child in children if (child / "metrics.jsonl").is_file()]
        frontier = [child for child in children if not (child / "metrics.jsonl").is_file()]
    if not found:
        raise RunInputError(
            f"{path}: no metrics.jsonl in it or in its subfolders; give nclaunch run "
            "directories or a sweep directory"
        )
    return found


def read_rows(metrics_path: Path) -> list[dict[str, Any]]:
    """Measurement rows in step order; a torn last line is skipped, a repeated step keeps
    its last row."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in metrics_path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    return [by_step[step] for step in sorted(by_step)]


def load_run(run_dir: Path) -> RunRecord:
    """A run directory as a RunRecord (config.yaml is optional; metrics.jsonl is not)."""
    run_dir = Path(run_dir)
    config: dict[str, Any] = {}
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        try:
            loaded = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as err:
            raise RunInputError(f"{config_path}: not valid YAML ({err})") from err
        if isinstance(loaded, dict):
            config = loaded
    rows = read_rows(run_dir / "metrics.jsonl")
    return RunRecord(name=run_dir.name, path=run_dir, config=config, rows=rows)


def load_runs(paths: list[Path]) -> list[RunRecord]:
    """Every run under ``paths``, once each, in the order given; runs without rows dropped."""
    seen: set[Path] = set()
    records: list[RunRecord] = []
    for path in paths:
        for run_dir in find_run_dirs(path):
            key = run_dir.resolve()
            if key in seen:
                continue
            seen.add(key)
            record = load_run(run_dir)
            if record.rows:
                records.append(record)
    if not records:
        names = ", ".join(str(p) for p in paths)
        raise RunInputError(f"{names}: the runs hold no measurements yet")
    _disambiguate(records)
    return records


def _disambiguate(records: list[RunRecord]) -> None:
    # Runs of different sweeps may share a directory name; prefix the parent folder then.
    counts: dict[str, int] = {}
    for record in records:
        counts[record.name] = counts.get(record.name, 0) + 1
    for record in records:
        if counts[record.name] > 1 and record.path is not None:
            record.name = f"{record.path.parent.name}/{record.name}"
