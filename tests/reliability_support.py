"""Helpers of the reliability tests and of ``benchmarks/reliability_report.py``.

- ``Sidecar``: ``ncserve serve`` as a child process on loopback, which the tests kill -9,
  restart on the same port and database, or starve of disk.
- ``start_nclaunch``: an nclaunch run in the background (the fault is injected while it runs).
- ``stored``: what the service's SQLite database holds for a run, read directly, so a check
  does not depend on the service being up.
- ``record_figure``: when ``NCSERVE_RELIABILITY_FIGURES`` names a file, tests append the
  numbers they observed to it (JSON lines); the report script turns them into the table of
  docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.launcher_support import REPO

FIGURES_ENV = "NCSERVE_RELIABILITY_FIGURES"


def record_figure(scenario: str, **values: Any) -> None:
    """Append what a test observed to the figures file, if the report script asked for one."""
    path = os.environ.get(FIGURES_ENV)
    if not path:
        return
    with open(path, "a") as out:
        out.write(json.dumps({"scenario": scenario, **values}, sort_keys=True) + "\n")


def free_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_METRICS_AT = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")


class Sidecar:
    """``ncserve serve`` in a child process; stdout and stderr go to ``log_path``."""

    def __init__(self, db: Path, log_path: Path, *extra: str, port: int = 0) -> None:
        self.db = db
        self.log_path = log_path
        self.extra = extra
        self.port = port
        self.metrics_port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._starts = 0  # "serving on" lines seen in the log: one per start

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> Sidecar:
        """Start on ``self.port`` (0 the first time: the OS picks, and restarts reuse it)."""
        port_file = self.log_path.with_suffix(".port")
        port_file.unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "ncserve", "serve",
            "--listen", f"127.0.0.1:{self.port}", "--port-file", str(port_file),
            "--db", str(self.db), "--metrics-port", "0", "--log-level", "info", *self.extra,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout_s
        while True:
            # The port file comes first, the "serving on" line with the exporter port after.
            found = _METRICS_AT.findall(self.log_path.read_text(errors="replace"))
            if port_file.exists() and len(found) > self._starts:
                self.port = int(port_file.read_text())
                self.metrics_port = int(found[-1])
                self._starts += 1
                return self
            if self.process.poll() is not None:
                raise AssertionError(f"ncserve serve exited early:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                self.kill9()
                raise AssertionError(f"ncserve serve did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def kill9(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(30)

    def stop(self) -> int:
        """SIGTERM (drain, close the store) and wait; the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()
        return int(self.process.returncode)

    def peak_rss_bytes(self) -> int:
        """The server's peak resident memory so far (VmHWM)."""
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc status")

    def scrape(self) -> str:
        import urllib.request

        assert self.metrics_port is not None
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            return str(answer.read().decode())

    def __enter__(self) -> Sidecar:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill9()


def health_status(target: str, credentials: grpc.ChannelCredentials | None = None) -> int:
    """grpc.health.v1 status of the whole server (needs no token)."""
    channel = (
        grpc.insecure_channel(target)
        if credentials is None
        else grpc.secure_channel(target, credentials)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status)


SERVING = health_pb2.HealthCheckResponse.SERVING


def nclaunch_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from launcher.cli import main; main()", *args]


def nclaunch_env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def start_nclaunch(log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """nclaunch ARGS in the background, output to ``log_path`` (a pipe could fill and block)."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            nclaunch_command(*args),
            cwd=REPO,
            env=nclaunch_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


@dataclass(frozen=True)
class Stored:
    """What the service's database holds for one run."""

    measurements: dict[int, dict[str, Any]]  # step -> status, metrics, scalars
    rows_per_step: dict[int, int]
    shards_per_step_round: dict[tuple[int, int], int]
    scalars: dict[tuple[int, str], float]  # (step, key) -> value of RecordScalars
    open_steps: int


def stored(db: Path, run_id: str) -> Stored:
    """Read the run straight from the database file (works with the service down)."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        measurements: dict[int, dict[str, Any]] = {}
        rows_per_step: dict[int, int] = {}
        for step, status, metrics_json, scalars_json in conn.execute(
            "SELECT step, status, metrics_json, scalars_json FROM measurements WHERE run_id = ?",
            (run_id,),
        ):
            rows_per_step[step] = rows_per_step.get(step, 0) + 1
            measurements[step] = {
                "status": status,
                "metrics": None if metrics_json is None else json.loads(metrics_json),
                "scalars": json.loads(scalars_json),
            }
        shards = {
            (step, round_): count
            for step, round_, count in conn.execute(
                "SELECT step, round, COUNT(*) FROM shards WHERE run_id = ? GROUP BY step, round",
                (run_id,),
            )
        }
        scalars = {
            (step, key): value
            for step, key, value in conn.execute(
                "SELECT step, key, value FROM scalars WHERE run_id = ?", (run_id,)
            )
        }
        (open_steps,) = conn.execute(
            "SELECT COUNT(*) FROM open_steps WHERE run_id = ?", (run_id,)
        ).fetchone()
        return Stored(measurements, rows_per_step, shards, scalars, int(open_steps))
    finally:
        conn.close()


def integrity(db: Path) -> str:
    """``PRAGMA integrity_check`` of the database file ("ok" when sound)."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def assert_stored_once(got: Stored, want: Stored, world_size: int) -> None:
    """Every measurement step of ``want`` is in ``got`` exactly once, complete, with the same
    values (bit for bit), and every shard of it was counted once."""
    assert sorted(got.measurements) == sorted(want.measurements)
    assert set(got.rows_per_step.values()) == {1}
    for step, expected in want.measurements.items():
        assert expected["status"] == "complete", (step, expected)
        assert got.measurements[step] == expected, f"step {step}"
        for round_ in (1, 2):
            assert got.shards_per_step_round[(step, round_)] == world_size, (step, round_)
    assert got.scalars == want.scalars
    assert got.open_steps == 0


def assert_service_stored_rows_once(
    run_dir: Path, world_size: int, scenario: str | None = None
) -> Stored:
    """The run's service (embedded: ``RUN_DIR/service/ncserve.db``) stored every measured step
    of metrics.jsonl exactly once, complete, with the values rank 0 wrote there, and counted
    every rank's shard of it once; its database passes ``PRAGMA integrity_check``."""
    import math

    from ncserve.metrics import METRIC_KEYS

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    db = run_dir / "service" / "ncserve.db"
    got = stored(db, rows[0]["run_id"])
    assert sorted(got.measurements) == [row["step"] for row in rows]
    assert set(got.rows_per_step.values()) == {1}
    for row in rows:
        measurement = got.measurements[row["step"]]
        assert measurement["status"] == "complete", row["step"]
        for key in METRIC_KEYS:
            want, have = row[key], measurement["metrics"][key]
            assert have == want or (math.isnan(have) and math.isnan(want)), (row["step"], key)
        for round_ in (1, 2):
            assert got.shards_per_step_round[(row["step"], round_)] == world_size
    assert got.open_steps == 0
    assert integrity(db) == "ok"
    if scenario is not None:
        record_figure(
            scenario, steps_measured=len(rows), steps_stored=len(got.measurements),
            stored_twice=0, integrity="ok",
        )  # fmt: skip
    return got
