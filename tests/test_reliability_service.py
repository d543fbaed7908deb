"""Faults at the service and in the client's buffer, on loopback, with the real service.

- A shard that never arrives: the step is marked incomplete after the step deadline (never
  half-counted), the next steps are measured, and the ranks end cleanly, each reporting
  exactly what the service refused.
- The client's buffer past its bound during an outage: exactly the calls reported as dropped
  are missing from the service after ``ncserve replay``; everything else is delivered once.
- Disk full under ``ncserve serve`` (a small tmpfs): writes get RESOURCE_EXHAUSTED naming the
  full store, queries and health keep answering, and writes work again once space returns;
  a database on a read-only filesystem is refused at start with one clear line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from click.testing import CliRunner

from ncserve.cli import cli
from ncserve.client import NCClient, RetryPolicy
from ncserve.metrics import Round1Stats, compute_metrics, round1_stats, round2_stats
from ncserve.v1 import ncserve_pb2 as pb
from ncserve.v1 import ncserve_pb2_grpc as pb_grpc
from tests.reliability_support import (
    SERVING,
    Sidecar,
    free_port,
    health_status,
    integrity,
    record_figure,
    stored,
)
from tests.service_support import (
    Dataset,
    make_dataset,
    push_round1,
    register,
    run_step_sequentially,
    start_test_server,
)

K, P, WORLD = 4, 8, 2
T = TypeVar("T")
FAST = RetryPolicy(initial_backoff_s=0.02, max_backoff_s=0.2)


def step_data(step: int) -> Dataset:
    return make_dataset(100 + step, K, P, WORLD, 24)


def reference_metrics(data: Dataset) -> dict[str, float]:
    h, y = data.union()
    return compute_metrics(h, y, data.weight_KP, data.bias_K)


def assert_close(got: dict[str, float], want: dict[str, float]) -> None:
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


class Rank:
    """One rank doing what the tracker does for each measurement, timing every call."""

    def __init__(self, client: NCClient, rank: int) -> None:
        self.client, self.rank = client, rank
        self.longest_call_s = 0.0

    def timed(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        started = time.monotonic()
        try:
            return call(*args, **kwargs)
        finally:
            self.longest_call_s = max(self.longest_call_s, time.monotonic() - started)

    def round1(self, step: int, data: Dataset) -> Round1Stats:
        h, y = data.shards[self.rank]
        r1 = round1_stats(h, y, K)
        weight = (data.weight_KP, data.bias_K) if self.rank == 0 else (None, None)
        self.timed(self.client.push_round1, "run", step, self.rank, r1, *weight, epoch=step)
        return r1

    def round2(self, step: int, data: Dataset, r1_all: list[Round1Stats]) -> None:
        means = self.timed(
            self.client.fetch_class_means, "run", step, timeout_s=1.0, rank=self.rank
        )
        if means is None:
            # The ranks merge round 1 among themselves (the tracker's all_gather), in rank order.
            merged = Round1Stats.zeros(K, P)
            for r1 in r1_all:
                merged = merged.merge(r1)
            means = merged.class_means()
        h, y = data.shards[self.rank]
        r2 = round2_stats(h, y, means, data.weight_KP, data.bias_K)
        self.timed(self.client.push_round2, "run", step, self.rank, r2, epoch=step)


def test_shard_that_never_arrives(tmp_path: Path) -> None:
    handle = start_test_server(tmp_path / "nc.db", step_deadline_s=2.0)
    deadline_s, lost_step = 1.0, 2
    ranks = [
        Rank(
            NCClient(handle.address, deadline_s=deadline_s, spill_dir=tmp_path / f"r{r}",
                     retry=FAST),
            r,
        )
        for r in range(WORLD)
    ]  # fmt: skip
    started = time.monotonic()
    try:
        for rank in ranks:
            assert rank.client.register_run("run", K, P, WORLD, {"optimizer": "sgd"})
        for step in range(5):
            data = step_data(step)
            # Rank 1's shard of this step is lost on its way: it never reaches the service.
            sending = [r for r in ranks if not (step == lost_step and r.rank == 1)]
            r1_all = [r.round1(step, data) for r in sending]
            if len(r1_all) < WORLD:
                h, y = data.shards[1]
                r1_all.append(round1_stats(h, y, K))
            threads = [
                threading.Thread(target=r.round2, args=(step, data, r1_all)) for r in sending
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        reports = [r.client.close(timeout_s=30) for r in ranks]
        elapsed = time.monotonic() - started
        scrape = handle.metrics.registry.get_sample_value
        incomplete_counter = scrape("ncserve_steps_incomplete_total", {"run_id": "run"})
    finally:
        for r in ranks:
            r.client.close(timeout_s=0)
        handle.stop(0.5)
    # The only loss is rank 0's round 2 of the step that could never complete, and the
    # client says so; nothing else is left behind or dropped.
    assert not reports[1].buffered and not reports[1].dropped and not reports[1].rejected
    assert not reports[0].buffered and not reports[0].dropped
    assert [(e.key.step, e.key.rank, e.key.round, e.code) for e in reports[0].rejected] == [
        (lost_step, 0, 2, "FAILED_PRECONDITION")
    ]
    assert "marked incomplete" in reports[0].rejected[0].details
    # No call held a rank up much longer than its deadline.
    assert max(r.longest_call_s for r in ranks) < 3 * deadline_s
    got = stored(tmp_path / "nc.db", "run")
    assert sorted(got.measurements) == [0, 1, 2, 3, 4]
    assert set(got.rows_per_step.values()) == {1}
    assert got.measurements[lost_step]["status"] == "incomplete"
    assert got.measurements[lost_step]["metrics"] is None
    for step in (0, 1, 3, 4):
        row = got.measurements[step]
        assert row["status"] == "complete", (step, row)
        assert_close(row["metrics"], reference_metrics(step_data(step)))
    assert got.open_steps == 0
    assert incomplete_counter == 1
    assert integrity(tmp_path / "nc.db") == "ok"
    record_figure(
        "shard never arrives",
        step_deadline_s=2.0,
        steps=5,
        complete=4,
        incomplete=1,
        rejected_calls=len(reports[0].rejected),
        longest_call_s=round(max(r.longest_call_s for r in ranks), 2),
        elapsed_s=round(elapsed, 1),
    )


def test_buffer_past_its_bound_reports_exactly_what_was_dropped(tmp_path: Path) -> None:
    port, steps = free_port(), 12
    limit = 20_000  # bytes: about half of the run's pushes fit
    clients = [
        NCClient(f"127.0.0.1:{port}", deadline_s=0.3, spill_dir=tmp_path / "spool" / f"rank{r}",
                 max_buffer_bytes=limit, max_memory_bytes=2_000, retry=FAST)
        for r in range(WORLD)
    ]  # fmt: skip
    ranks = [Rank(c, r) for r, c in enumerate(clients)]
    made: set[tuple[int, int, int]] = set()
    for rank in ranks:
        assert not rank.client.register_run("run", K, P, WORLD)
    for step in range(steps):
        data = step_data(step)
        r1_all = [r.round1(step, data) for r in ranks]
        for r in ranks:
            r.round2(step, data, r1_all)
            made |= {(step, r.rank, 1), (step, r.rank, 2)}
    # The service never came: each client keeps what fits, on disk, and names the rest.
    reports = [c.close(timeout_s=0) for c in clients]
    dropped = {(d.key.step, d.key.rank, d.key.round) for rep in reports for d in rep.dropped}
    kept = {
        (k.step, k.rank, k.round) for rep in reports for k in rep.buffered if k.round is not None
    }
    assert dropped and kept and dropped.isdisjoint(kept) and dropped | kept == made
    assert all(rep.persisted and rep.buffered_bytes <= limit for rep in reports)

    handle = start_test_server(tmp_path / "nc.db", listen=f"127.0.0.1:{port}", step_deadline_s=1.0)
    try:
        result = CliRunner().invoke(
            cli,
            ["replay", str(tmp_path), "--target", handle.address, "--format", "json",
             "--timeout", "30", "--deadline", "2"],
        )  # fmt: skip
    finally:
        handle.stop(0.5)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    replay = json.loads(lines[0])
    rejected = {(c["step"], c["rank"], c["round"]) for row in replay for c in row["rejected"]}
    got = stored(tmp_path / "nc.db", "run")
    accepted = _accepted_shards(tmp_path / "nc.db")
    # Every call is accounted for exactly once: accepted by the service, refused by it (its
    # step was incomplete), or dropped by the client, which said which.
    assert accepted | rejected | dropped == made
    assert len(accepted) + len(rejected) + len(dropped) == len(made)
    assert kept == accepted | rejected
    shards_of = {s: {(s, r, n) for r in range(WORLD) for n in (1, 2)} for s in range(steps)}
    complete = {s for s, shards in shards_of.items() if shards <= accepted}
    stored_complete = {s for s, m in got.measurements.items() if m["status"] == "complete"}
    assert complete and stored_complete == complete
    for step in complete:
        assert_close(got.measurements[step]["metrics"], reference_metrics(step_data(step)))
    # A step with some of its shards dropped is incomplete, never half-counted.
    for step in {s for s, _, _ in dropped if s is not None}:
        assert got.measurements.get(step, {"status": "incomplete"})["status"] == "incomplete"
    assert result.exit_code == (1 if rejected else 0), result.output
    record_figure(
        "client buffer past its bound",
        buffer_limit_bytes=limit,
        calls=len(made),
        dropped=len(dropped),
        delivered=len(accepted),
        refused_incomplete=len(rejected),
        steps_complete=len(complete),
        steps=steps,
    )


def _accepted_shards(db: Path) -> set[tuple[int, int, int]]:
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        return {(s, r, n) for s, r, n in conn.execute("SELECT step, rank, round FROM shards")}
    finally:
        conn.close()


# -- disk full ----------------------------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path`` (root only); the test is skipped where mounting is not
    allowed (tests/test_service_rpcs.py covers the full store with SQLite's max_page_count)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path, leave_bytes: int) -> Path:
    """A file taking all but ``leave_bytes`` of the filesystem's free space."""
    stats = os.statvfs(directory)
    filler = directory / "filler"
    with open(filler, "wb") as out:
        remaining = stats.f_bavail * stats.f_frsize - leave_bytes
        block = b"\0" * (1 << 20)
        while remaining > 0:
            out.write(block[: min(len(block), remaining)])
            remaining -= len(block)
    return filler


def test_disk_full_then_space_returns(tmp_path: Path) -> None:
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    with small_filesystem(tmp_path / "fs", "8m") as fs:
        db = fs / "nc.db"
        small, big = step_data(0), make_dataset(7, K, 3000, WORLD, 24)
        with Sidecar(db, tmp_path / "serve.log") as sidecar:
            with grpc.insecure_channel(sidecar.target) as channel:
                stub = pb_grpc.NCServiceStub(channel)
                register(stub, "run", small)
                run_step_sequentially(stub, "run", 1, small)
                register(stub, "big", big)
                filler = _fill(fs, leave_bytes=64 << 10)
                with pytest.raises(grpc.RpcError) as refused:
                    push_round1(stub, "big", 5, big, 0)
                status = refused.value.code()
                details = refused.value.details()
                assert status == grpc.StatusCode.RESOURCE_EXHAUSTED, details
                assert "full" in details and "\n" not in details
                # Queries and health are answered from what was stored.
                run = stub.GetRun(pb.GetRunRequest(run_id="run"), timeout=10)
                assert (run.num_measurements, run.latest_step) == (1, 1)
                got = stub.GetMetrics(pb.GetMetricsRequest(run_id="run", step=1), timeout=10)
                assert got.measurements[0].status == pb.STEP_COMPLETE
                assert health_status(sidecar.target) == SERVING
                filler.unlink()
                # Space is back: the refused shard goes in and its step completes.
                measured = run_step_sequentially(stub, "big", 5, big)
                assert measured.status == pb.STEP_COMPLETE
            assert sidecar.stop() == 0
        assert integrity(db) == "ok"
        record_figure(
            "disk full (8 MB tmpfs)",
            status=status.name,
            queries_answered=True,
            health="SERVING",
            recovered=True,
            integrity="ok",
        )
        # The same database on a filesystem remounted read-only: refused at start, one line.
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        try:
            refused_start = subprocess.run(
                [sys.executable, "-m", "ncserve", "serve", "--listen", "127.0.0.1:0",
                 "--db", str(db)],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(fs)], check=True)
        assert refused_start.returncode == 2, refused_start.stderr
        assert "Traceback" not in refused_start.stderr
        error = refused_start.stderr.strip().splitlines()[-1]
        assert error.startswith("Error: ") and str(db) in error, refused_start.stderr
        assert integrity(db) == "ok"
        record_figure("read-only database at start", exit_status=2, message=error)


def test_replay_reports_what_it_could_not_deliver(tmp_path: Path) -> None:
    # A spool left by a rank that never reached the service.
    client = NCClient(f"127.0.0.1:{free_port()}", deadline_s=0.2, retry=FAST,
                      spill_dir=tmp_path / "spool" / "rank0")  # fmt: skip
    data = step_data(0)
    h, y = data.shards[0]
    assert not client.register_run("run", K, P, 1)
    assert not client.push_round1("run", 0, 0, round1_stats(h, y, K), data.weight_KP)
    assert client.close(timeout_s=0).persisted
    runner = CliRunner()
    nowhere = ["--target", f"127.0.0.1:{free_port()}", "--deadline", "0.2", "--timeout", "1"]

    unreachable = runner.invoke(cli, ["replay", str(tmp_path), *nowhere])
    assert unreachable.exit_code == 1, unreachable.output
    lines = unreachable.output.strip().splitlines()
    assert lines[0].endswith("2 found, 0 delivered, 2 left, 0 rejected, 0 dropped")
    assert lines[1:3] == [
        "  left: register_run run=run",
        "  left: round1 run=run step=0 rank=0 round=1",
    ]
    assert lines[-1] == "Error: 2 of 2 calls were not delivered (left in the spool: 2)"
    assert len(list((tmp_path / "spool" / "rank0").glob("*.spool"))) == 2  # kept for later

    helped = runner.invoke(cli, ["replay", "--help"])
    assert helped.exit_code == 0
    for option in ("--timeout", "--format", "--target", "--token-file", "--deadline"):
        assert option in helped.output
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = runner.invoke(cli, ["replay", str(empty), *nowhere])
    assert refused.exit_code == 2 and refused.output.startswith("Error: ")
    assert "not a run directory" in refused.output and len(refused.output.splitlines()) == 1

    holder = NCClient(f"127.0.0.1:{free_port()}", spill_dir=tmp_path / "spool" / "rank0")
    try:
        busy = runner.invoke(cli, ["replay", str(tmp_path), *nowhere])
    finally:
        holder.close(timeout_s=0)
    assert busy.exit_code == 2 and "in use by another process" in busy.output
    assert len(busy.output.strip().splitlines()) == 1 and "Traceback" not in busy.output
