"""The run directory: what a run leaves for the researcher, and how it is written.

Layout (``--run-dir``, default ``runs/<run-id>``)::

    config.yaml        the resolved configuration (RunConfig)
    metrics.jsonl      one JSON object per measurement (rank 0 appends)
    logs/rank<R>.log   one log per global rank; logs/elastic/ holds the launcher's
                       captured stdout/stderr of ranks other than 0
    checkpoints/       step_<step>/ directories and the ``latest`` pointer
    report.png         NC metrics against epoch (written at the end)
    service/           the embedded ncserve database and its port file
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from launcher.config import RunConfig
from launcher.resolve import to_yaml

# CSVSink and TensorBoardSink live in ncserve.track.sinks (one implementation with the
# Tracker's exporters); launcher.cli asks this module whether TensorBoard is installed.
from ncserve.track.sinks import tensorboard_available as tensorboard_available

# The keys every measurement row carries besides the metric keys of `ncserve compute`.
ROW_KEYS: tuple[str, ...] = (
    "run_id",
    "step",
    "epoch",
    "lr",
    "world_size",
    "train_loss",
    "train_acc",
    "holdout_acc",
    "wall_time",
)


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (exists, missing, unreadable)."""


class RunDir:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def weights_dir(self) -> Path:
        """The model weights of each measured step (--keep-measured-weights)."""
        return self.root / "weights"

    def weights_path(self, step: int) -> Path:
        return self.weights_dir / f"step-{step:09d}.pt"

    def measured_weight_steps(self) -> list[int]:
        if not self.weights_dir.is_dir():
            return []
        steps = []
        for path in self.weights_dir.glob("step-*.pt"):
            digits = path.stem.removeprefix("step-")
            if digits.isdigit():
                steps.append(int(digits))
        return sorted(steps)

    @property
    def report_path(self) -> Path:
        return self.root / "report.png"

    @property
    def service_dir(self) -> Path:
        return self.root / "service"

    def rank_log(self, rank: int) -> Path:
        return self.logs_dir / f"rank{rank}.log"

    def create(self, config: RunConfig) -> None:
        """Make the directory for a new run, or check it for ``--resume``; write config.yaml.

        The nodes of a multi-machine run share one run directory (a shared volume) and a
        restarted pod finds its own earlier files there: neither is an error, and the
        first node to get there writes config.yaml.
        """
        if not config.launch.local_mode:
            for folder in (self.root, self.logs_dir, self.checkpoints_dir):
                folder.mkdir(parents=True, exist_ok=True)
            if not self.config_path.exists():
                write_atomic(self.config_path, to_yaml(config))
            return
        if config.resume:
            if not self.config_path.is_file():
                raise RunDirError(
                    f"--resume: {self.root} holds no run (no config.yaml); give the --run-dir "
                    "or --run-id of an earlier run"
                )
        elif self.config_path.exists():
            raise RunDirError(
                f"run directory {self.root} already holds a run; pass --resume to continue it, "
                "or choose another --run-id / --run-dir"
            )
        for folder in (self.root, self.logs_dir, self.checkpoints_dir):
            folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config_path, to_yaml(config))

    # -- metrics.jsonl ---------------------------------------------------------------------

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every complete measurement row, in file order.

        A line cut short by a crash in the middle of a write is skipped.
        """
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
        return rows

    def repair_metrics(self) -> list[dict[str, Any]]:
        """Rewrite metrics.jsonl without a torn last line, so appends start on a fresh line."""
        rows = self.read_metrics()
        if self.metrics_path.is_file():
            write_atomic(self.metrics_path, "".join(_json_line(row) for row in rows))
        return rows

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as stream:
            stream.write(_json_line(row))
            stream.flush()
            os.fsync(stream.fileno())


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_line(row: dict[str, Any]) -> str:
    # Strict JSON: an undefined metric (NaN) is null, as `ncserve compute --format json` writes.
    return json.dumps({k: _finite_or_none(v) for k, v in row.items()}) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
