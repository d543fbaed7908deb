"""Security of the service as deployed: what the other security tests leave out.

tests/test_service_security.py covers TLS, mTLS and the token at the gRPC level, and
tests/test_client_service.py the CLI with a token and mTLS. Here:

- the token is never logged (server at debug level, CLI, client library) nor exported
  (/metrics), nor stored, and neither is a wrong token a user typed;
- the comparison runs through ``hmac.compare_digest`` on equal-length digests, whatever the
  length of what the client sent;
- the client library against the real service under TLS + mTLS + token: authenticated
  pushes are stored, and every kind of bad credential stores nothing;
- the limits of ``ncserve serve`` (--max-runs, --max-open-steps, --max-message-bytes) answer
  RESOURCE_EXHAUSTED from the command line's own flags.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from pydantic import SecretStr

from ncserve.client import NCClient, RetryPolicy, ServiceError, TLSConfig
from ncserve.metrics import round1_stats, round2_stats
from ncserve.service import auth
from ncserve.v1 import ncserve_pb2 as pb
from ncserve.v1 import ncserve_pb2_grpc as pb_grpc
from tests.reliability_support import Sidecar, integrity, record_figure, stored
from tests.service_support import (
    header,
    make_dataset,
    make_pki,
    push_messages,
    push_round1,
    register,
    start_test_server,
    table_digest,
)

TOKEN = "s3cr3t-7f1c9a2e-never-in-a-log"
WRONG = "s3cr3t-7f1c9a2e-never-in-a-lag"  # one letter off: a typo is a secret too
K, P = 3, 5
FAST = RetryPolicy(initial_backoff_s=0.02, max_backoff_s=0.2)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ncserve", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def features_file(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    y = np.arange(30) % K
    np.savez(path, features=rng.normal(size=(30, P)) + y[:, None], labels=y,
             weight=np.eye(K, P), bias=np.zeros(K))  # fmt: skip
    return path


def test_token_is_never_logged_exported_or_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    good, wrong = tmp_path / "token", tmp_path / "wrong"
    good.write_text(TOKEN + "\n")
    wrong.write_text(WRONG + "\n")
    db = tmp_path / "nc.db"
    outputs: list[str] = []
    server_flags = ("--token-file", str(good), "--log-level", "debug")
    with Sidecar(db, tmp_path / "serve.log", *server_flags) as sidecar:
        common = ["--target", sidecar.target, "--deadline", "10"]
        shards = [features_file(tmp_path / f"shard{rank}.npz", rank) for rank in range(2)]

        def push(rank: int) -> list[str]:
            return [sys.executable, "-m", "ncserve", "push", str(shards[rank]), "--run", "r",
                    "--step", "0", "--rank", str(rank), "--world-size", "2", "--token-file",
                    str(good), *common]  # fmt: skip

        # Rank 0 waits for rank 1's round 1 before its round 2: run it in the background.
        first = subprocess.Popen(
            push(0), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        second = subprocess.run(push(1), capture_output=True, text=True, timeout=120, check=False)
        out, _ = first.communicate(timeout=120)
        assert first.returncode == 0 and second.returncode == 0, out + second.stderr
        outputs += [out, second.stdout, second.stderr]
        for args in (["runs"], ["query", "r", "--all"], ["watch", "r", "--after-step", "-1",
                                                          "--count", "1"]):  # fmt: skip
            ok = _cli(*args, "--token-file", str(good), *common)
            assert ok.returncode == 0, ok.stderr
            refused = _cli(*args, "--token-file", str(wrong), *common)
            assert refused.returncode == 2 and "refused the credentials" in refused.stderr
            outputs += [ok.stdout, ok.stderr, refused.stdout, refused.stderr]
        # The client library, logging at debug level into caplog.
        with NCClient(sidecar.target, token=TOKEN, deadline_s=5) as client:
            assert client.get_run("r")["num_measurements"] == 1
        with NCClient(sidecar.target, token=WRONG, deadline_s=5) as client:
            with pytest.raises(ServiceError) as info:
                client.list_runs()
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            outputs.append(str(info.value))
        scrape = sidecar.scrape()
        assert "ncserve_shards_rejected_total" in scrape
        assert sidecar.stop() == 0
    server_log = sidecar.log_path.read_text()
    assert "ncserve.service" in server_log  # debug logging was on
    stored_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("nc.db*"))
    places = {
        "server log": server_log,
        "CLI output": "\n".join(outputs),
        "client log": caplog.text,
        "/metrics": scrape,
        "database": stored_bytes.decode("latin1"),
    }
    for secret in (TOKEN, WRONG):
        for where, text in places.items():
            assert secret not in text, f"token found in {where}"
    assert integrity(db) == "ok"
    record_figure(
        "token never logged or exported",
        searched=sorted(places),
        token_found=0,
        wrong_token_found=0,
    )


def test_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    original = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    interceptor = auth.TokenAuthInterceptor(TOKEN)
    attempts = {
        f"Bearer {TOKEN}": True,
        f"Bearer {WRONG}": False,
        "Bearer x": False,  # far shorter: still hashed and compared, no early length check
        "Bearer " + "y" * 5000: False,
        TOKEN: False,
    }
    for value, expected in attempts.items():
        assert interceptor.authorized([("authorization", value)]) is expected
    assert len(calls) == len(attempts)
    # Digests of equal length whatever was sent: the comparison leaks nothing by its length.
    assert {(len(a), len(b)) for a, b in calls} == {(32, 32)}
    assert all(TOKEN.encode() not in a + b for a, b in calls)


def _round_trip(client: NCClient, run_id: str) -> bool:
    """One rank, both rounds; True when everything was delivered."""
    data = make_dataset(3, K, P, 1, 20)
    h, y = data.shards[0]
    r1 = round1_stats(h, y, K)
    if not client.register_run(run_id, K, P, 1) or not client.push_round1(
        run_id, 0, 0, r1, data.weight_KP, data.bias_K
    ):
        return False
    means = client.fetch_class_means(run_id, 0, timeout_s=5)
    if means is None:
        return False
    return client.push_round2(run_id, 0, 0, round2_stats(h, y, means, data.weight_KP))


def test_client_library_under_tls_mtls_and_token(tmp_path: Path) -> None:
    pki = make_pki()
    paths = pki.write(tmp_path)
    handle = start_test_server(
        tmp_path / "nc.db",
        tls_cert=paths["server_cert"],
        tls_key=paths["server_key"],
        client_ca=paths["ca_cert"],
        token=SecretStr(TOKEN),
    )
    good_tls = TLSConfig(paths["ca_cert"], paths["client_cert"], paths["client_key"])

    def client(tls: TLSConfig | None, token: str | None) -> NCClient:
        return NCClient(handle.address, token=token, tls=tls, deadline_s=1.0, retry=FAST,
                        replay_in_background=False)  # fmt: skip

    try:
        with client(good_tls, TOKEN) as ok:
            assert _round_trip(ok, "good")
        baseline = table_digest(tmp_path / "nc.db")
        # Each bad credential: a handshake that fails is an outage to the client (the call is
        # buffered, never delivered); a wrong token is a permanent error it raises at once.
        handshake_failures = {
            "no client certificate": TLSConfig(paths["ca_cert"]),
            "client certificate of another CA": TLSConfig(
                paths["ca_cert"], paths["other_client_cert"], paths["other_client_key"]
            ),
            "server not trusted": TLSConfig(
                paths["other_ca_cert"], paths["client_cert"], paths["client_key"]
            ),
        }
        for what, tls in handshake_failures.items():
            with client(tls, TOKEN) as bad:
                assert not _round_trip(bad, "bad"), what
                assert bad.report().buffered, what
        plaintext = client(None, TOKEN)
        try:
            assert not _round_trip(plaintext, "bad")
        finally:
            plaintext.close(timeout_s=0)
        for token in (None, WRONG):
            with client(good_tls, token) as bad, pytest.raises(ServiceError) as info:
                _round_trip(bad, "bad")
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED, token
        assert table_digest(tmp_path / "nc.db") == baseline
    finally:
        handle.stop(0.5)
    got = stored(tmp_path / "nc.db", "good")
    assert got.measurements[0]["status"] == "complete"
    assert not stored(tmp_path / "nc.db", "bad").measurements
    record_figure(
        "client under TLS + mTLS + token",
        accepted="valid cert + token",
        refused=[*handshake_failures, "plaintext", "no token", "wrong token"],
        stored_by_refused=0,
    )


def test_serve_limits_answer_resource_exhausted(tmp_path: Path) -> None:
    data = make_dataset(9, K, P, 2, 10)
    flags = ("--max-runs", "1", "--max-open-steps", "1", "--max-message-bytes", str(2 << 20))
    with Sidecar(tmp_path / "nc.db", tmp_path / "serve.log", *flags) as sidecar:
        with grpc.insecure_channel(sidecar.target) as channel:
            stub = pb_grpc.NCServiceStub(channel)
            register(stub, "run", data)
            push_round1(stub, "run", 1, data, 0)
            refused: dict[str, str] = {}

            def exhausted(what: str, call: Callable[[], object]) -> None:
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
                refused[what] = info.value.details()

            exhausted("second run", lambda: register(stub, "other", data))
            exhausted("second open step", lambda: push_round1(stub, "run", 2, data, 0))
            big = {"sums": np.zeros((K, (3 << 20) // 8 // K))}  # one 3 MiB message
            exhausted(
                "message over --max-message-bytes",
                lambda: stub.PushRound1(
                    iter([pb.ShardChunk(header=header("run", 1, 1, pb.ROUND_1, K, P)),
                          pb.ShardChunk(chunk=pb.TensorChunk(seq=0, piece=pb.TensorPiece(
                              name="sums", dtype=pb.DTYPE_FLOAT64,
                              shape=list(big["sums"].shape), data=big["sums"].tobytes())))]),
                    timeout=10,
                ),
            )  # fmt: skip
            declared = {"counts": np.zeros(K, dtype=np.int64), "sums": np.zeros((4096, 4096))}
            exhausted(
                "payload larger than the run's shards can be",
                lambda: stub.PushRound1(
                    push_messages(header("run", 1, 1, pb.ROUND_1, K, P), declared), timeout=10
                ),
            )
        assert "--max-runs" in refused["second run"]
        assert "--max-open-steps" in refused["second open step"]
        scrape = sidecar.scrape()
        assert 'ncserve_shards_rejected_total{reason="resource_exhausted"}' in scrape
        assert sidecar.stop() == 0
    assert integrity(tmp_path / "nc.db") == "ok"
    record_figure("limits", refused=sorted(refused), status="RESOURCE_EXHAUSTED")
