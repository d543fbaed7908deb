"""Exporters of measurements to where researchers already look: a CSV file, TensorBoard.

Both ``Tracker(..., csv=FILE, tensorboard=DIR)`` and nclaunch (``--csv``, ``--tensorboard``)
write through these classes, on rank 0 only. A row is a flat mapping of names to values
(``run_id``, ``step``, ``epoch``, scalars such as ``train_loss`` and the NC metrics); a
metric that is undefined (NaN) is an empty CSV cell and no TensorBoard point.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# What to install for TensorBoard event files; named in the error when it is missing.
TENSORBOARD_EXTRA = "ncserve[tensorboard]"

# Training scalars nclaunch's rows carry; TensorBoard shows them under ``train/``.
TRAIN_SCALAR_KEYS: tuple[str, ...] = ("train_loss", "train_acc", "holdout_acc", "lr")


class MissingExtraError(ImportError):
    """An exporter whose optional dependency is not installed; the message says what to install."""


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class CSVSink:
    """Appends rows to a CSV file, creating it (and its folder) when missing.

    The header is every key seen so far, in first-seen order. A row with a key the header
    lacks (a held-out split measured from some step on, a new scalar) rewrites the file once
    with the wider header, earlier rows getting empty cells, so no value is dropped. An
    existing file is continued: its header is read back first (a resumed run).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fields: list[str] | None = None
        if self.path.is_file() and self.path.stat().st_size > 0:
            with self.path.open(newline="") as stream:
                self._fields = next(csv.reader(stream), None)

    @property
    def fields(self) -> list[str]:
        """The header as it stands (empty before the first row)."""
        return list(self._fields or [])

    def write(self, row: Mapping[str, Any]) -> None:
        if self._fields is None:
            self._fields = list(row)
            with self.path.open("w", newline="") as stream:
                csv.DictWriter(stream, fieldnames=self._fields).writeheader()
        else:
            added = [key for key in row if key not in self._fields]
            if added:
                self._widen([*self._fields, *added])
        with self.path.open("a", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=self._fields)
            writer.writerow({k: _finite_or_none(row.get(k)) for k in self._fields})

    def _widen(self, fields: list[str]) -> None:
        with self.path.open(newline="") as stream:
            rows = list(csv.DictReader(stream))
        # Readers see the old or the new file, never a half-written one.
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self._fields = fields


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package (needed for event files) can be imported."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def require_tensorboard(log_dir: str | Path) -> Any:
    """torch's ``SummaryWriter`` class; MissingExtraError naming the extra when unavailable."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch's writer imports the optional tensorboard package
        raise MissingExtraError(
            f"TensorBoard export (tensorboard={str(log_dir)!r}) needs the tensorboard "
            f"package, which is not installed: pip install '{TENSORBOARD_EXTRA}'"
        ) from err
    return SummaryWriter


class TensorBoardSink:
    """Scalars to TensorBoard event files in ``log_dir``.

    ``nc/<metric>`` per measurement, ``train/<scalar>`` for the training scalars stored with
    it, ``step/<name>`` for the cheap per-logged-step values (nc0, loss, lr).
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer = require_tensorboard(log_dir)(log_dir=str(self.log_dir))

    def write_measurement(
        self,
        row: Mapping[str, Any],
        metric_keys: Iterable[str],
        scalar_keys: Iterable[str] = TRAIN_SCALAR_KEYS,
    ) -> None:
        step = int(row["step"])
        for prefix, keys in (("nc", metric_keys), ("train", scalar_keys)):
            for key in keys:
                value = row.get(key)
                if isinstance(value, int | float) and math.isfinite(value):
                    self._writer.add_scalar(f"{prefix}/{key}", value, step)
        self._writer.flush()

    def write_step(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            if math.isfinite(value):
                self._writer.add_scalar(f"step/{key}", value, step)

    def close(self) -> None:
        self._writer.close()
