"""``ncserve serve`` as a process: kill -9 at awkward moments loses nothing once clients
retry; SIGTERM drains and exits; the bound port is discoverable."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from ncserve.v1 import ncserve_pb2 as pb
from ncserve.v1 import ncserve_pb2_grpc as pb_grpc
from tests.service_support import (
    fetch_means,
    make_dataset,
    metrics_dict,
    push_round1,
    push_round2,
    register,
    run_step_sequentially,
    start_test_server,
)

DATA = make_dataset(31, 5, 9, 3, 30)
STEP = 40


def _spawn(db: Path, port_file: Path, *extra: str) -> subprocess.Popen:
    port_file.unlink(missing_ok=True)
    command = [
        sys.executable, "-c", "from ncserve.cli import main; main()", "serve",
        "--listen", "127.0.0.1:0", "--db", str(db), "--port-file", str(port_file),
        "--log-level", "warning", *extra,
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_port(process: subprocess.Popen, port_file: Path) -> int:
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if process.poll() is not None:
            raise AssertionError(f"ncserve serve exited early: {process.stderr.read()}")
        assert time.monotonic() < deadline, "ncserve serve never wrote its port file"
        time.sleep(0.05)
    return int(port_file.read_text())


@contextmanager
def served(db: Path, tmp: Path) -> Iterator[tuple[subprocess.Popen, pb_grpc.NCServiceStub]]:
    process = _spawn(db, tmp / "port")
    try:
        port = _wait_for_port(process, tmp / "port")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield process, pb_grpc.NCServiceStub(channel)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        process.stdout.close()
        process.stderr.close()


@pytest.fixture(scope="module")
def expected(tmp_path_factory) -> dict[str, float]:
    """Metrics of the step on a server that is never interrupted."""
    handle = start_test_server(tmp_path_factory.mktemp("reference") / "nc.db")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = pb_grpc.NCServiceStub(channel)
            register(stub, "run", DATA)
            return metrics_dict(run_step_sequentially(stub, "run", STEP, DATA).metrics)
    finally:
        handle.stop(0.5)


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


# (round-1 shards acknowledged, round-2 shards acknowledged) when the server is killed.
KILL_POINTS = {
    "between round 1 and round 2": (3, 0),
    "inside round 1": (1, 0),
    "inside round 2": (3, 2),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_then_restart_gives_the_uninterrupted_metrics(
    tmp_path: Path, point: str, expected: dict[str, float]
) -> None:
    round1_done, round2_done = KILL_POINTS[point]
    db = tmp_path / "nc.db"
    with served(db, tmp_path) as (process, stub):
        register(stub, "run", DATA)
        for rank in range(round1_done):
            push_round1(stub, "run", STEP, DATA, rank)
        if round2_done:
            means = fetch_means(stub, "run", STEP, 0, DATA.num_classes, DATA.feature_dim)
            for rank in range(round2_done):
                push_round2(stub, "run", STEP, DATA, rank, means)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    assert _integrity(db) == "ok"

    with served(db, tmp_path) as (_, stub):
        # Clients retry everything they cannot confirm; the server recognises what it has.
        register(stub, "run", DATA)
        for rank in range(len(DATA.shards)):
            push_round1(stub, "run", STEP, DATA, rank)
        means = fetch_means(stub, "run", STEP, 0, DATA.num_classes, DATA.feature_dim)
        for rank in range(len(DATA.shards)):
            push_round2(stub, "run", STEP, DATA, rank, means)
        got = stub.GetMetrics(pb.GetMetricsRequest(run_id="run", step=STEP), timeout=5)
        assert [m.step for m in got.measurements] == [STEP]
        assert metrics_dict(got.measurements[0].metrics) == expected  # bit for bit
        run = stub.GetRun(pb.GetRunRequest(run_id="run"), timeout=5)
        assert (run.num_measurements, run.num_open_steps, run.num_incomplete) == (1, 0, 0)
    assert _integrity(db) == "ok"


def _retry_everything(stub: pb_grpc.NCServiceStub) -> pb.Measurement:
    """What clients do after an outage: re-push all they cannot confirm, in order."""
    register(stub, "run", DATA)
    for rank in range(len(DATA.shards)):
        push_round1(stub, "run", STEP, DATA, rank)
    try:
        means = fetch_means(stub, "run", STEP, 0, DATA.num_classes, DATA.feature_dim)
    except grpc.RpcError as exc:
        # FAILED_PRECONDITION: the step was finalized before the kill, nothing left to
        # push. Anything else is an error (and, while the server is being killed, ends
        # the pushing thread).
        if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
            raise
    else:
        for rank in range(len(DATA.shards)):
            push_round2(stub, "run", STEP, DATA, rank, means)
    got = stub.GetMetrics(pb.GetMetricsRequest(run_id="run", step=STEP), timeout=5)
    return got.measurements[0]


@pytest.mark.parametrize("delay_s", [0.02, 0.06, 0.12])
def test_kill_9_at_an_arbitrary_moment_loses_nothing(
    tmp_path: Path, delay_s: float, expected: dict[str, float]
) -> None:
    db = tmp_path / "nc.db"
    with served(db, tmp_path) as (process, stub):
        pushing = threading.Thread(target=_push_until_killed, args=(stub,))
        pushing.start()
        time.sleep(delay_s)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        pushing.join(10)
    assert _integrity(db) == "ok"
    with served(db, tmp_path) as (_, stub):
        assert metrics_dict(_retry_everything(stub).metrics) == expected
    assert _integrity(db) == "ok"


def _push_until_killed(stub: pb_grpc.NCServiceStub) -> None:
    with contextlib.suppress(grpc.RpcError):
        _retry_everything(stub)


def test_sigterm_drains_in_flight_calls_and_exits(tmp_path: Path) -> None:
    db = tmp_path / "nc.db"
    with served(db, tmp_path) as (process, stub):
        register(stub, "run", DATA)
        push_round1(stub, "run", 1, DATA, 0)
        # A rank waiting for class means is in flight when SIGTERM arrives: it is answered
        # (UNAVAILABLE, so its client retries elsewhere) rather than left hanging.
        stream = stub.FetchClassMeans(
            pb.ClassMeansRequest(run_id="run", step=1, rank=0), timeout=20
        )
        time.sleep(0.3)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert process.wait(15) == 0
        assert time.monotonic() - started < 10
        assert "Traceback" not in process.stderr.read()
    assert _integrity(db) == "ok"


def test_bad_serve_options_are_one_line_errors(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    for args, message in (
        (["--token-file", str(empty)], "is empty"),
        (["--listen", "nonsense"], "HOST:PORT"),
        (["--tls-cert", str(empty)], "tls_cert and tls_key"),
    ):
        result = subprocess.run(
            [sys.executable, "-c", "from ncserve.cli import main; main()", "serve",
             "--db", str(tmp_path / "x.db"), *args],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
