"""NCClient against a scripted in-process service: retries, buffering, ordered replay,
permanent errors, token, TLS/mTLS, and the delivery report."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from ncserve.client import (
    BufferKey,
    NCClient,
    RetryPolicy,
    ServiceError,
    TLSConfig,
)
from ncserve.metrics import Round1Stats, Round2Stats, round1_stats, round2_stats
from ncserve.v1 import ncserve_pb2_grpc as pb_grpc
from tests.client_certs import make_certs
from tests.client_fake_service import FakeServer, FakeService, FakeState
from tests.reliability_support import free_port

K, P = 3, 5
FAST = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.1)


def shard(rank: int, n: int = 12) -> tuple[np.ndarray, np.ndarray, Round1Stats]:
    rng = np.random.default_rng(rank)
    y = np.arange(n) % K
    h = rng.normal(size=(n, P)) + y[:, None]
    return h, y, round1_stats(h, y, K)


def round2_of(rank: int, r1_all: Round1Stats) -> Round2Stats:
    h, y, _ = shard(rank)
    w = np.eye(K, P)
    return round2_stats(h, y, r1_all.class_means(), w, None)


@pytest.fixture
def state() -> FakeState:
    return FakeState()


@pytest.fixture
def server(state: FakeState) -> Iterator[FakeServer]:
    srv = FakeServer(state).start()
    yield srv
    srv.stop()


def client(target: str, **kw: object) -> NCClient:
    kw.setdefault("deadline_s", 0.5)
    kw.setdefault("retry", FAST)
    return NCClient(target, **kw)  # type: ignore[arg-type]


def test_happy_path_two_ranks(server: FakeServer, state: FakeState) -> None:
    clients = [client(server.target), client(server.target)]
    try:
        stats = [shard(r)[2] for r in range(2)]
        for rank, c in enumerate(clients):
            assert c.register_run("run", K, P, 2, {"optimizer": "sgd"})
            assert c.push_round1("run", 7, rank, stats[rank], np.eye(K, P) if rank == 0 else None)
        means = clients[1].fetch_class_means("run", 7, timeout_s=2.0, rank=1)
        assert means is not None
        merged = stats[0].merge(stats[1])
        np.testing.assert_allclose(means.means_KP, merged.class_means().means_KP, rtol=1e-15)
        for rank, c in enumerate(clients):
            assert c.push_round2("run", 7, rank, round2_of(rank, merged), scalars={"lr": 0.1})
        assert clients[0].record_scalars("run", 7, {"nc0": 1.5})
        assert [r["run_id"] for r in clients[0].list_runs()] == ["run"]
        report = clients[0].close()
        assert report.complete and report.delivered == 4 and report.replayed == 0
        assert state.round2[("run", 7)][0].scalars["lr"] == 0.1
        assert state.scalars[("run", 7)] == {"nc0": 1.5}
    finally:
        for c in clients:
            c.close()


def test_transient_failures_are_retried_within_the_deadline(
    server: FakeServer, state: FakeState
) -> None:
    state.inject = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED]
    with client(server.target, deadline_s=2.0) as c:
        assert c.register_run("run", K, P, 1)
        assert c.report().delivered == 1 and state.inject == []


def test_permanent_error_raises_with_code_and_message(server: FakeServer) -> None:
    with client(server.target) as c:
        with pytest.raises(ServiceError) as info:
            c.push_round1("nope", 0, 0, shard(0)[2])
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert "unknown run_id 'nope'" in str(info.value)
        # Nothing was buffered for a call the service refused for good.
        assert c.report().buffered == ()


def test_token_is_sent_and_checked(state: FakeState) -> None:
    state.token = "s3cret"
    srv = FakeServer(state).start()
    try:
        with client(srv.target, token="s3cret") as good:
            assert good.register_run("run", K, P, 1)
        with client(srv.target, token="wrong") as bad:
            with pytest.raises(ServiceError) as info:
                bad.register_run("run", K, P, 1)
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        srv.stop()


def test_outage_buffers_without_blocking_then_replays_in_order(
    state: FakeState, tmp_path: Path
) -> None:
    srv = FakeServer(state, port=free_port())  # not started: the service is down
    c = client(srv.target, spill_dir=tmp_path / "spool", max_memory_bytes=300)
    try:
        start = time.monotonic()
        assert not c.register_run("run", K, P, 1)
        first_call = time.monotonic() - start
        assert first_call < 2.0  # bounded by the 0.5 s deadline
        r1 = shard(0)[2]
        start = time.monotonic()
        calls = []
        for step in (1, 2):
            assert not c.push_round1("run", step, 0, r1, np.eye(K, P))
            assert not c.push_round2("run", step, 0, round2_of(0, r1))
            assert not c.record_scalars("run", step, {"loss": 1.0 / step})
            calls += [("round1", step), ("round2", step), ("scalars", step)]
        # During a known outage a call does not wait out its own deadline again.
        assert time.monotonic() - start < 0.5
        assert c.fetch_class_means("run", 1, timeout_s=0.2) is None
        report = c.report()
        assert report.delivered == 0
        assert report.buffered[0] == BufferKey("register_run", "run")
        assert len(report.buffered) == 7
        assert list((tmp_path / "spool").glob("*.spool"))  # past 300 B it spilled

        srv.start()
        report = c.flush(timeout_s=10.0)
        assert report.complete, report.summary()
        assert report.delivered == report.replayed == 7
        assert [(m, s) for m, _, s, _ in state.log] == [("register", None), *calls]
        # Back to direct delivery once the buffer is empty.
        assert c.record_scalars("run", 3, {"loss": 0.1})
    finally:
        c.close()
        srv.stop()


def test_background_thread_replays_and_round2_waits_for_other_ranks(
    state: FakeState, tmp_path: Path
) -> None:
    srv = FakeServer(state, port=free_port())
    stats = [shard(r)[2] for r in range(2)]
    merged = stats[0].merge(stats[1])
    # Rank 1 replays only when asked, so the test controls who comes back first.
    clients = [
        client(srv.target, spill_dir=tmp_path / f"rank{r}", replay_in_background=r == 0)
        for r in range(2)
    ]
    try:
        for rank, c in enumerate(clients):
            assert not c.register_run("run", K, P, 2)
            assert not c.push_round1("run", 4, rank, stats[rank])
            assert not c.push_round2("run", 4, rank, round2_of(rank, merged))
        # Rank 0 comes back first: its round 2 meets FAILED_PRECONDITION (rank 1's round 1
        # is missing) and must wait, not be rejected.
        srv.start()
        waiting = (BufferKey("round2", "run", 4, 0, 2),)
        deadline = time.monotonic() + 10.0
        while clients[0].report().buffered != waiting and time.monotonic() < deadline:
            clients[0].flush(timeout_s=0.2)
        report0 = clients[0].flush(timeout_s=0.5)
        assert report0.buffered == waiting
        assert report0.rejected == ()
        # Rank 1 replays; rank 0's background thread then delivers its round 2 by itself.
        assert clients[1].flush(timeout_s=10.0).complete
        deadline = time.monotonic() + 10.0
        while clients[0].report().buffered and time.monotonic() < deadline:
            time.sleep(0.05)
        assert clients[0].report().complete
        assert set(state.round2[("run", 4)]) == {0, 1}
    finally:
        for c in clients:
            c.close()
        srv.stop()


def test_close_keeps_the_spool_and_next_client_replays(state: FakeState, tmp_path: Path) -> None:
    srv = FakeServer(state, port=free_port())
    spool = tmp_path / "spool"
    first = client(srv.target, spill_dir=spool, replay_in_background=False)
    assert not first.register_run("run", K, P, 1)
    for step in range(3):
        assert not first.record_scalars("run", step, {"nc0": float(step)})
    report = first.close(timeout_s=0.2)
    assert len(report.buffered) == 4 and report.persisted
    assert len(list(spool.glob("*.spool"))) == 4

    srv.start()
    second = client(srv.target, spill_dir=spool)
    try:
        report = second.flush(timeout_s=10.0)
        assert report.complete and report.replayed == 4
        assert [s for _, _, s, _ in state.log] == [None, 0, 1, 2]
        assert list(spool.glob("*.spool")) == []
    finally:
        second.close()
        srv.stop()


def test_hard_limit_drops_are_reported(tmp_path: Path) -> None:
    c = client(f"127.0.0.1:{free_port()}", spill_dir=tmp_path, max_buffer_bytes=4000)
    try:
        r1 = shard(0)[2]
        results = [c.push_round1("run", step, 0, r1) for step in range(20)]
        assert not any(results)
        report = c.close(timeout_s=0.1)
        kept = {k.step for k in report.buffered}
        dropped = {d.key.step for d in report.dropped}
        assert kept and dropped and kept.isdisjoint(dropped)
        assert kept | dropped == set(range(20))
        assert all(d.key.kind == "round1" and "buffer full" in d.reason for d in report.dropped)
        assert report.buffered_bytes <= 4000
        assert "dropped" in report.summary()
    finally:
        c.close()


def test_refused_replay_is_reported_not_raised(state: FakeState, tmp_path: Path) -> None:
    srv = FakeServer(state, port=free_port())
    c = client(srv.target, spill_dir=tmp_path, round1_patience_s=60.0)
    try:
        r1 = shard(0)[2]
        # Never registered: on replay the service answers NOT_FOUND.
        assert not c.push_round1("ghost", 1, 0, r1)
        assert not c.push_round2("ghost", 1, 0, round2_of(0, r1))
        srv.start()
        report = c.flush(timeout_s=10.0)
        assert report.buffered == ()
        assert [(r.key.kind, r.code) for r in report.rejected] == [
            ("round1", "NOT_FOUND"),
            ("round2", "CLIENT"),
        ]
        assert "unknown run_id 'ghost'" in report.rejected[0].details
        assert not report.complete
    finally:
        c.close()
        srv.stop()


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="deadline_s"):
        NCClient("127.0.0.1:1", deadline_s=0)
    with pytest.raises(ValueError, match="HOST:PORT"):
        NCClient("localhost")
    with pytest.raises(ValueError, match="client_key"):
        TLSConfig(client_cert=Path("c.pem"))


# -- TLS and mutual TLS -------------------------------------------------------------------


def test_tls_and_mutual_tls(state: FakeState, tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_NCServiceServicer_to_server(FakeService(state), server)
    creds = grpc.ssl_server_credentials(
        [(certs["server_key"].read_bytes(), certs["server_cert"].read_bytes())],
        root_certificates=certs["ca"].read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    target = f"127.0.0.1:{port}"
    try:
        mtls = TLSConfig(
            ca_cert=certs["ca"],
            client_cert=certs["client_cert"],
            client_key=certs["client_key"],
            server_name="localhost",
        )
        with client(target, tls=mtls, deadline_s=3.0) as c:
            assert c.register_run("run", K, P, 1)
            assert [r["run_id"] for r in c.list_runs()] == ["run"]
        # Without a client certificate the handshake fails: a query reports it, a push
        # would buffer it.
        no_cert = TLSConfig(ca_cert=certs["ca"], server_name="localhost")
        with client(target, tls=no_cert) as c, pytest.raises(ServiceError) as info:
            c.list_runs()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        # A server certificate from an unknown CA is not trusted either.
        with (
            client(target, tls=TLSConfig(server_name="localhost")) as c,
            pytest.raises(ServiceError),
        ):
            c.list_runs()
    finally:
        server.stop(grace=None).wait()


def test_exit_without_close_keeps_buffered_calls(state: FakeState, tmp_path: Path) -> None:
    srv = FakeServer(state, port=free_port())
    spool = tmp_path / "spool"
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from ncserve.client import NCClient
        c = NCClient({srv.target!r}, deadline_s=0.2, spill_dir=Path({str(spool)!r}))
        assert not c.register_run("run", 3, 5, 1)
        assert not c.record_scalars("run", 0, {{"nc0": 2.0}})
        # No close(): the interpreter exits with both calls only in memory.
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(list(spool.glob("*.spool"))) == 2
    srv.start()
    try:
        with client(srv.target, spill_dir=spool) as c:
            assert c.flush(timeout_s=10.0).replayed == 2
        assert state.scalars[("run", 0)] == {"nc0": 2.0}
    finally:
        srv.stop()
