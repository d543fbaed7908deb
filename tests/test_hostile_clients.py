"""No client can take the service from the others: slow, abusive and hostile clients.

Each test abuses a server while another run (the victim) measures a step through it: the
victim's step must finish within VICTIM_DEADLINE_S, health must answer, and a third run's
stored rows (the bystander, finalized before the abuse) must be byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import resource
import socket
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from torch import nn

from ncserve import wire
from ncserve.client import NCClient
from ncserve.metrics import round1_stats, round2_stats
from ncserve.track import Tracker, TrackerError
from ncserve.v1 import ncserve_pb2 as pb
from tests.reliability_support import health_status
from tests.service_support import (
    fetch_means,
    header,
    insecure_stub,
    make_dataset,
    push_messages,
    push_round1,
    push_round2,
    register,
    round1_arrays,
    run_step_sequentially,
    start_test_server,
)

SERVING = 1
VICTIM_DEADLINE_S = 10.0
IDLE_S = 1.5
DATA = make_dataset(3, 3, 4, 2, 10)


def run_digest(db: Path, run_id: str) -> str:
    """Digest of every stored row of one run."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        digest = hashlib.sha256()
        for (table,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
        ):
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            if "run_id" not in columns:
                continue
            rows = conn.execute(f"SELECT * FROM {table} WHERE run_id = ?", (run_id,))
            for row in sorted(repr(r) for r in rows):
                digest.update(f"{table}:{row}".encode())
        return digest.hexdigest()
    finally:
        conn.close()


class Served:
    def __init__(self, tmp_path: Path, **overrides) -> None:
        self.db = tmp_path / "nc.db"
        settings = {"stream_idle_timeout_s": IDLE_S, **overrides}
        self.handle = start_test_server(self.db, **settings)
        self.channel, self.stub = insecure_stub(self.handle.port)
        register(self.stub, "bystander", DATA)
        run_step_sequentially(self.stub, "bystander", 0, DATA)
        register(self.stub, "victim", DATA)
        self.bystander = run_digest(self.db, "bystander")
        self.victim_steps = 0
        self._lock = threading.Lock()

    def victim_measures(self) -> float:
        """One step of the victim through a retrying client, as a trainer sends it;
        returns how long it took."""
        started = time.monotonic()
        with self._lock:
            step = self.victim_steps = self.victim_steps + 1
        client = NCClient(
            self.handle.address, deadline_s=VICTIM_DEADLINE_S, replay_in_background=False
        )
        try:
            for rank in range(2):
                h, y = DATA.shards[rank]
                stats = round1_stats(h, y, DATA.num_classes)
                weight = DATA.weight_KP if rank == 0 else None
                bias = DATA.bias_K if rank == 0 else None
                assert client.push_round1("victim", step, rank, stats, weight, bias)
            means = client.fetch_class_means("victim", step, VICTIM_DEADLINE_S)
            assert means is not None
            for rank in range(2):
                h, y = DATA.shards[rank]
                r2 = round2_stats(h, y, means, DATA.weight_KP, DATA.bias_K)
                assert client.push_round2("victim", step, rank, r2)
            got = client.get_metrics("victim", step=step)
            assert got["status"] == "complete"
        finally:
            client.close(timeout_s=0)
        elapsed = time.monotonic() - started
        assert elapsed < VICTIM_DEADLINE_S, elapsed
        return elapsed

    def check_intact(self) -> None:
        assert health_status(self.handle.address) == SERVING
        assert run_digest(self.db, "bystander") == self.bystander

    def close(self) -> None:
        self.channel.close()
        self.handle.stop(0.5)


@contextmanager
def served(tmp_path: Path, **overrides) -> Iterator[Served]:
    s = Served(tmp_path, **overrides)
    try:
        yield s
        s.check_intact()
    finally:
        s.close()


def stalled_push(stub, hdr: pb.ShardHeader, release: threading.Event, first_chunk=None):
    """A push that sends its header (and maybe one chunk), then nothing until released."""

    def messages():
        yield pb.ShardChunk(header=hdr)
        if first_chunk is not None:
            yield pb.ShardChunk(chunk=first_chunk)
        release.wait(60)

    return stub.PushRound1.future(messages(), timeout=60)


def wait_until(condition, what: str, timeout_s: float = 15.0) -> None:
    """Poll ``condition`` (a state another thread changes) until true, bounded."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.05)


def code(future) -> grpc.StatusCode:
    try:
        future.result(timeout=30)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


# -- 1. stalled streams ---------------------------------------------------------------------


def test_stalled_push_streams_do_not_freeze_the_service(tmp_path: Path) -> None:
    release = threading.Event()
    with served(tmp_path) as s:
        evil = make_dataset(4, 3, 4, 8, 10)
        register(s.stub, "evil", evil)
        calls = [
            stalled_push(s.stub, header("evil", 1 + i // 8, i % 8, pb.ROUND_1, 3, 4), release)
            for i in range(260)
        ]
        try:
            time.sleep(0.3)  # let them arrive
            s.victim_measures()
            assert health_status(s.handle.address) == SERVING
            refused = [c for c in calls if c.done()]
            assert len(refused) >= 260 - (3 * 8 + 4), "the run's stream limit did not hold"
            assert {code(c) for c in refused} == {grpc.StatusCode.UNAVAILABLE}
            # The stalled ones are cut by the idle timeout: their threads come back.
            outcomes = {code(c) for c in calls}
            assert outcomes <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
            wait_until(lambda: s.handle.guard.open_streams() == 0, "stream slots freed")
        finally:
            release.set()


def test_stalled_streams_of_many_runs_free_their_slots(tmp_path: Path) -> None:
    """Enough runs to fill every stream slot: the victim's client retries and gets through
    once the idle timeout frees them; health never waits."""
    release = threading.Event()
    with served(tmp_path) as s:
        slots = s.handle.config.max_streams
        for i in range(slots // 8 + 1):
            register(s.stub, f"evil-{i}", make_dataset(4, 3, 4, 8, 10))
        calls = [
            stalled_push(s.stub, header(f"evil-{i // 8}", 1, i % 8, pb.ROUND_1, 3, 4), release)
            for i in range(slots + 8)
        ]
        try:
            time.sleep(0.3)
            assert health_status(s.handle.address) == SERVING
            assert s.victim_measures() >= 0
        finally:
            release.set()
        assert {code(c) for c in calls} <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


# -- 2. a stalled stream and the byte budget ----------------------------------------------


def test_a_stalled_push_does_not_hold_the_budget(tmp_path: Path) -> None:
    release = threading.Event()
    with served(tmp_path, max_inflight_bytes=1 << 20) as s:
        s.stub.RegisterRun(
            pb.RegisterRunRequest(run_id="wide", num_classes=100, feature_dim=40_000,
                                  world_size=2),
            timeout=10,
        )  # fmt: skip
        first = next(iter(wire.encode_arrays({"sums": np.zeros((100, 40_000))})))
        hdr = header("wide", 1, 0, pb.ROUND_1, 100, 40_000, payload_bytes=100_000_000)
        hog = stalled_push(s.stub, hdr, release, first_chunk=first)
        try:
            time.sleep(0.3)  # it holds the whole budget now
            s.victim_measures()
            # Small pushes do not queue for the budget: the victim did not wait for the cut.
            assert not hog.done(), "the victim's step only went through once the hog was cut"
            assert code(hog) == grpc.StatusCode.CANCELLED
        finally:
            release.set()


# -- 3. and 4. quotas -----------------------------------------------------------------------


def test_scalars_per_push_and_per_step_are_bounded(tmp_path: Path) -> None:
    with served(tmp_path) as s:
        register(s.stub, "chatty", DATA)
        for rank in range(2):
            push_round1(s.stub, "chatty", 1, DATA, rank)
        means = fetch_means(s.stub, "chatty", 1, 0, 3, 4)
        with pytest.raises(grpc.RpcError) as too_many:
            push_round2(s.stub, "chatty", 1, DATA, 0, means,
                        scalars={f"k{i}": 1.0 for i in range(300)})  # fmt: skip
        assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 256" in too_many.value.details()
        push_round2(s.stub, "chatty", 1, DATA, 0, means, scalars={f"a{i}": 1.0 for i in range(200)})
        with pytest.raises(grpc.RpcError) as union:
            push_round2(s.stub, "chatty", 1, DATA, 1, means,
                        scalars={f"b{i}": 1.0 for i in range(200)})  # fmt: skip
        assert union.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        push_round2(s.stub, "chatty", 1, DATA, 1, means, scalars={"a1": 2.0})
        got = s.stub.GetMetrics(pb.GetMetricsRequest(run_id="chatty", step=1), timeout=10)
        assert got.measurements[0].scalars["a1"] == 1.5
        assert got.ByteSize() < 64 << 10
        s.victim_measures()


def test_one_run_cannot_take_every_open_step(tmp_path: Path) -> None:
    with served(tmp_path, max_open_steps=40) as s:
        register(s.stub, "hoarder", DATA)
        outcomes = []
        for step in range(30):
            try:
                push_round1(s.stub, "hoarder", step, DATA, 0)
                outcomes.append("ok")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "--max-open-steps-per-run" in error.details()
                outcomes.append("refused")
        limit = s.handle.config.max_open_steps_per_run
        assert outcomes == ["ok"] * limit + ["refused"] * (30 - limit)
        s.victim_measures()


# -- 5. the exporter --------------------------------------------------------------------------


def test_idle_connections_do_not_hold_the_exporter(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 4096)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    idle = min(1500, (wanted - 200) // 2)
    with served(tmp_path) as s, ExitStack() as stack:
        threads_before = threading.active_count()
        for _ in range(idle):
            sock = stack.enter_context(
                socket.create_connection(("127.0.0.1", s.handle.metrics_port))
            )
            sock.send(b"GET /metr")  # a request that never ends
        assert threading.active_count() - threads_before < 10
        started = time.monotonic()
        url = f"http://127.0.0.1:{s.handle.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert b"ncserve_runs" in response.read()
        assert time.monotonic() - started < 5
        s.victim_measures()


# -- 6. and 7. sizes and values -------------------------------------------------------------


def test_sizes_and_values_get_specific_statuses(tmp_path: Path) -> None:
    with served(tmp_path) as s:
        stub = s.stub

        def status_of(call) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.RpcError) as info:
                call()
            return info.value.code(), info.value.details() or ""

        huge = pb.RegisterRunRequest(run_id="huge", num_classes=2**31 - 1,
                                     feature_dim=2**31 - 1, world_size=1)  # fmt: skip
        assert status_of(lambda: stub.RegisterRun(huge, timeout=10))[0] == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        for bad_id in ("a/../../b", "..", "x" * 10_000):
            got, details = status_of(lambda r=bad_id: stub.RegisterRun(
                pb.RegisterRunRequest(run_id=r, num_classes=3, feature_dim=4, world_size=1),
                timeout=10))  # fmt: skip
            assert got == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 400, details
        # A tensor whose shape numpy cannot even describe.
        register(stub, "shapes", DATA)
        piece = pb.TensorChunk(
            seq=0,
            piece=pb.TensorPiece(name="sums", dtype=pb.DTYPE_FLOAT64, shape=[0, 2**63 - 1]),
        )
        hdr = header("shapes", 1, 0, pb.ROUND_1, 3, 4)
        msgs = [pb.ShardChunk(header=hdr), pb.ShardChunk(chunk=piece)]
        got, details = status_of(lambda: stub.PushRound1(iter(msgs), timeout=10))
        assert got == grpc.StatusCode.INVALID_ARGUMENT and "shape" in details
        # Watching from the largest step there is: no backlog, no error.
        watch = stub.WatchMetrics(
            pb.WatchMetricsRequest(run_id="bystander", after_step=2**63 - 1), timeout=1
        )
        assert status_of(lambda: list(watch))[0] == grpc.StatusCode.DEADLINE_EXCEEDED
        # Finite sums that overflow once merged.
        register(stub, "overflow", DATA)
        big = {k: v for k, v in round1_arrays(DATA, 0).items()}
        big["sums"] = np.full_like(big["sums"], 1.5e308)
        stub.PushRound1(push_messages(header("overflow", 1, 0, pb.ROUND_1, 3, 4), big),
                        timeout=10)  # fmt: skip
        big1 = dict(round1_arrays(DATA, 1))
        big1["sums"] = np.full_like(big1["sums"], 1.5e308)
        got, details = status_of(lambda: stub.PushRound1(
            push_messages(header("overflow", 1, 1, pb.ROUND_1, 3, 4), big1), timeout=10))  # fmt: skip
        assert got == grpc.StatusCode.INVALID_ARGUMENT and "float64" in details
        s.victim_measures()


def test_the_tracker_refuses_a_run_id_that_leaves_its_folder(tmp_path: Path) -> None:
    with pytest.raises(TrackerError, match="not valid"):
        Tracker(nn.Linear(4, 3), target="127.0.0.1:1", run_id="a/../../b", run_dir=tmp_path)


def test_concurrent_victims_all_finish_under_abuse(tmp_path: Path) -> None:
    """Stalled streams and legitimate steps at once, from several threads."""
    release = threading.Event()
    with served(tmp_path) as s:
        register(s.stub, "evil", make_dataset(4, 3, 4, 8, 10))
        calls = [
            stalled_push(s.stub, header("evil", 1, i % 8, pb.ROUND_1, 3, 4), release)
            for i in range(100)
        ]
        try:
            with futures.ThreadPoolExecutor(2) as pool:
                times = list(pool.map(lambda _: s.victim_measures(), range(2)))
            assert max(times) < VICTIM_DEADLINE_S
        finally:
            release.set()
        for call in calls:
            code(call)
