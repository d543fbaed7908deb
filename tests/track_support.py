"""Shared by the tracking tests (sinks, framework callbacks, examples).

Optional packages (tensorboard, lightning, transformers) skip a test on a developer machine
that lacks them but FAIL it when the CI environment variable is set: the dev extra installs
them, and CI must never pass by skipping.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from ncserve.client import NCClient
from ncserve.service import ServerConfig, start_server
from ncserve.v1 import ncserve_pb2 as pb
from ncserve.v1 import ncserve_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def require(module: str) -> ModuleType:
    """Import ``module``; skip (the whole test module, at import time) when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        message = f"{module} is not installed ({err}); pip install -e '.[dev]'"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and {message}", pytrace=False)
        pytest.skip(message, allow_module_level=True)


@contextlib.contextmanager
def loopback_service(db_path: Path) -> Iterator[str]:
    """An ncserve service on an OS-picked loopback port; yields its HOST:PORT."""
    server = start_server(ServerConfig(listen="127.0.0.1:0", db_path=db_path))
    try:
        yield str(server.address)
    finally:
        server.stop(grace_s=1)


def stored_measurements(target: str, run_id: str) -> list[dict[str, Any]]:
    """Every finalized measurement of ``run_id``, by step."""
    with NCClient(target) as client:
        rows = client.get_metrics(run_id, all_steps=True)
    assert isinstance(rows, list)
    return sorted(rows, key=lambda row: row["step"])


def stored_scalars(target: str, run_id: str) -> dict[int, dict[str, float]]:
    """The RecordScalars series of ``run_id``: step -> values."""
    with grpc.insecure_channel(target) as channel:
        reply = pb_grpc.NCServiceStub(channel).GetScalars(
            pb.GetScalarsRequest(run_id=run_id), timeout=10
        )
    return {record.step: dict(record.values) for record in reply.records}


def run_example(name: str, *args: str, cwd: Path, timeout_s: float = 180) -> str:
    """Run ``examples/<name>`` as a user would; its output, or a failure showing it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{output[-4000:]}"
    return output
