"""Checkpoints of a run: ``checkpoints/step_<step>/`` directories and a ``latest`` pointer.

A checkpoint directory holds ``trainer.pt`` (written by rank 0: the whole model's
weights as the module holds them, step, epoch, per-rank RNG states, the steps
already measured) and the engine's own files (``optimizer.pt`` for DDP,
DeepSpeed's partitioned files under ``engine/``). It is assembled under a hidden
staging name and renamed into place once every rank has written its part, and
``latest`` is updated after the rename, so a crash at any moment leaves the
previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

TRAINER_FILE = "trainer.pt"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """No usable checkpoint where one was asked for."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointStore:
    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = keep

    def completed(self) -> list[Path]:
        """Committed checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / TRAINER_FILE).is_file():
                found.append((int(match.group(1)), child))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, else the newest committed one, else None."""
        pointer = self.root / LATEST_FILE
        if pointer.is_file():
            candidate = self.root / pointer.read_text().strip()
            if (candidate / TRAINER_FILE).is_file():
                return candidate
        completed = self.completed()
        return completed[-1] if completed else None

    def staging(self, step: int) -> Path:
        return self.root / f".{step_dir_name(step)}.partial"

    def prepare_staging(self, step: int) -> Path:
        """A fresh, empty staging directory (rank 0 calls this before the others write)."""
        path = self.staging(step)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def commit(self, step: int) -> Path:
        """Move the staging directory of ``step`` into place, point ``latest`` at it, prune."""
        final = self.root / step_dir_name(step)
        if final.exists():
            # A restart re-ran an epoch whose checkpoint was already committed.
            shutil.rmtree(final)
        os.replace(self.staging(step), final)
        tmp = self.root / f".{LATEST_FILE}.tmp"
        tmp.write_text(final.name + "\n")
        os.replace(tmp, self.root / LATEST_FILE)
        self.prune()
        return final

    def prune(self) -> None:
        completed = self.completed()
        for path in completed[: max(0, len(completed) - self.keep)]:
            shutil.rmtree(path, ignore_errors=True)

    def resolve(self, name: str | Path | None) -> Path:
        """A checkpoint given by path, by directory name, or None for the latest one."""
        if name is None or str(name) == LATEST_FILE:
            latest = self.latest()
            if latest is None:
                raise CheckpointError(f"no checkpoint in {self.root}")
            return latest
        for candidate in (Path(name), self.root / str(name)):
            if (candidate / TRAINER_FILE).is_file():
                return candidate
        available = ", ".join(p.name for p in self.completed()) or "none"
        raise CheckpointError(
            f"checkpoint {str(name)!r} not found (a directory holding {TRAINER_FILE}); "
            f"available in {self.root}: {available}"
        )


def save_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    torch.save(state, Path(directory) / TRAINER_FILE)


def load_trainer_state(directory: Path) -> dict[str, Any]:
    # Only tensors and plain Python values are stored, so the safe loader suffices.
    state = torch.load(Path(directory) / TRAINER_FILE, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{directory / TRAINER_FILE} is not an nclaunch checkpoint")
    return state
