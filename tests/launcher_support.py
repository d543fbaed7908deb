"""Helpers for the nclaunch tests: run the real command line in a subprocess, read a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


# Small enough that a 2-worker run takes seconds on a shared 2-core machine, big enough
# that every class is in every shard of the measurement split.
def cli(text: str) -> tuple[str, ...]:
    """Command-line words of ``text`` (no quoting: test arguments have no spaces)."""
    return tuple(text.split())


TINY_SETTINGS: dict[str, Any] = {
    "dataset": "synthetic",
    "num-classes": 4,
    "feature-dim": 8,
    "num-samples": 256,
    "width": 0.0625,
    "batch-size": 32,
}
TINY = tuple(word for key, value in TINY_SETTINGS.items() for word in (f"--{key}", str(value)))
# The base of a sweep grid of such runs: two epochs on one node.
TINY_GRID_BASE: dict[str, Any] = {**TINY_SETTINGS, "epochs": 2, "nodes": 1}


def nclaunch(
    *args: str, timeout: float = 480, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``nclaunch ARGS`` from the repository root; output captured as text."""
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", "from launcher.cli import main; main()", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_ok(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = nclaunch(*args, **kwargs)
    assert result.returncode == 0, (
        f"nclaunch failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
