"""The client and the client CLI against the real ncserve service (in-process, loopback).

Covers: a service that is down and then comes up (buffer, replay, same metrics as computing
directly), a service that goes away between round 1 and round 2 (the tracker's fallback),
watch, and N = 4 concurrent ``ncserve push`` processes matching ``ncserve compute``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pydantic import SecretStr

from ncserve.cli import cli
from ncserve.client import NCClient, RetryPolicy
from ncserve.metrics import METRIC_KEYS, compute_metrics, round1_stats, round2_stats
from ncserve.service import ServerConfig, ServerHandle, start_server
from tests.client_certs import make_certs
from tests.reliability_support import free_port

K, P = 4, 6
FAST = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.2)
REPO = Path(__file__).resolve().parents[1]


def serve(db: Path, port: int = 0) -> ServerHandle:
    return start_server(ServerConfig(listen=f"127.0.0.1:{port}", db_path=db, grace_s=0.5))


def dataset(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % K)
    h = rng.normal(size=(n, P)) + 2.0 * np.eye(K, P)[y]
    return h, y, rng.normal(size=(K, P)), rng.normal(size=K)


def assert_metrics_match(got: dict, want: dict, rtol: float = 1e-9) -> None:
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(want[key], rel=rtol, abs=1e-12), key
    assert got["num_samples"] == want["num_samples"]


def test_service_down_then_up_replays_and_measures(tmp_path: Path) -> None:
    port = free_port()
    h, y, w, b = dataset()
    r1 = round1_stats(h, y, K)
    client = NCClient(f"127.0.0.1:{port}", deadline_s=0.3, spill_dir=tmp_path / "spool", retry=FAST)
    try:
        # Down: nothing raises, everything is buffered in order.
        assert not client.register_run("run", K, P, 1, {"optimizer": "sgd"})
        assert not client.push_round1("run", 10, 0, r1, w, b, epoch=2)
        assert client.fetch_class_means("run", 10, timeout_s=0.2) is None
        # The caller computes the means itself and carries on (what the tracker does).
        r2 = round2_stats(h, y, r1.class_means(), w, b)
        assert not client.push_round2("run", 10, 0, r2, scalars={"lr": 0.05}, epoch=2)
        assert len(client.report().buffered) == 3

        handle = serve(tmp_path / "ncserve.db", port)
        try:
            report = client.flush(timeout_s=15.0)
            assert report.complete, report.summary()
            assert report.replayed == 3
            row = client.get_metrics("run", step=10)
            assert isinstance(row, dict)
            assert row["step"] == 10 and row["epoch"] == 2 and row["status"] == "complete"
            assert row["scalars"]["lr"] == pytest.approx(0.05)
            assert_metrics_match(row, compute_metrics(h, y, w, b))
            assert [r["run_id"] for r in client.list_runs()] == ["run"]
        finally:
            handle.stop(0)
    finally:
        client.close(timeout_s=0)


def test_service_lost_between_rounds_then_restarted(tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "ncserve.db"
    shards = [dataset(seed=s)[:2] for s in range(2)]
    w, b = dataset()[2:]
    r1s = [round1_stats(h, y, K) for h, y in shards]
    handle = serve(db, port)
    clients = [
        NCClient(f"127.0.0.1:{port}", deadline_s=0.5, spill_dir=tmp_path / f"r{r}", retry=FAST)
        for r in range(2)
    ]
    try:
        for rank, c in enumerate(clients):
            assert c.register_run("run", K, P, 2)
            assert c.push_round1(
                "run", 1, rank, r1s[rank], *((w, b) if rank == 0 else (None, None))
            )
        handle.stop(0)
        # The service is gone before the ranks fetch the means: they merge round 1 among
        # themselves (as torch.distributed would) and buffer round 2.
        means = r1s[0].merge(r1s[1]).class_means()
        for rank, c in enumerate(clients):
            assert c.fetch_class_means("run", 1, timeout_s=0.3, rank=rank) is None
            h, y = shards[rank]
            assert not c.push_round2("run", 1, rank, round2_stats(h, y, means, w, b))
        handle = serve(db, port)
        for c in clients:
            assert c.flush(timeout_s=15.0).complete
        row = clients[0].get_metrics("run", step=1)
        assert isinstance(row, dict)
        h_all = np.concatenate([s[0] for s in shards])
        y_all = np.concatenate([s[1] for s in shards])
        assert_metrics_match(row, compute_metrics(h_all, y_all, w, b))
    finally:
        for c in clients:
            c.close(timeout_s=0)
        handle.stop(0)


def test_watch_streams_new_measurements(server: ServerHandle) -> None:
    h, y, w, b = dataset()
    r1 = round1_stats(h, y, K)
    seen: list[dict] = []
    with NCClient(server.address, deadline_s=5.0) as c:
        assert c.register_run("run", K, P, 1)

        def watcher() -> None:
            for row in c.watch("run"):
                seen.append(row)
                if len(seen) == 2:
                    return

        thread = threading.Thread(target=watcher)
        thread.start()
        time.sleep(0.3)  # let the stream open: without after_step it only sees new steps
        for step in (5, 6):
            assert c.push_round1("run", step, 0, r1, w, b)
            means = c.fetch_class_means("run", step, timeout_s=5.0)
            assert means is not None
            assert c.push_round2("run", step, 0, round2_stats(h, y, means, w, b))
        thread.join(timeout=10.0)
        assert not thread.is_alive()
    assert [r["step"] for r in seen] == [5, 6]
    assert_metrics_match(seen[0], compute_metrics(h, y, w, b))


# -- CLI against the service -------------------------------------------------------------


def write_shards(directory: Path, n_shards: int) -> tuple[list[Path], Path]:
    h, y, w, b = dataset(n=203, seed=7)  # uneven shard sizes on purpose
    paths = []
    for rank, idx in enumerate(np.array_split(np.arange(len(y)), n_shards)):
        path = directory / f"shard{rank}.npz"
        np.savez(path, features=h[idx], labels=y[idx], weight=w, bias=b)
        paths.append(path)
    union = directory / "all.npz"
    np.savez(union, features=h, labels=y, weight=w, bias=b)
    return paths, union


def cli_json(*args: str) -> object:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_four_concurrent_pushes_equal_compute(server: ServerHandle, tmp_path: Path) -> None:
    paths, union = write_shards(tmp_path, 4)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def push_cmd(rank: int, path: Path) -> list[str]:
        return [
            sys.executable, "-m", "ncserve", "push", str(path), "--run", "cli-run", "--step", "3",
            "--rank", str(rank), "--world-size", "4", "--target", server.address,
            "--meta", "optimizer=sgd", "--format", "json",
        ]  # fmt: skip

    procs = [
        subprocess.Popen(
            push_cmd(rank, path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO
        )
        for rank, path in enumerate(paths)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
    # At least the rank whose round 2 completed the step printed the measurement.
    printed = [json.loads(out) for out, _ in outputs]
    assert any("nc1" in p for p in printed)

    want = cli_json("compute", str(union), "--format", "json")
    got = cli_json("query", "cli-run", "--step", "3", "--format", "json",
                   "--target", server.address)  # fmt: skip
    assert isinstance(got, dict) and isinstance(want, dict)
    assert got["step"] == 3
    assert set(want) <= set(got)
    assert_metrics_match(got, want)

    rows = cli_json("query", "cli-run", "--all", "--format", "json", "--target", server.address)
    assert isinstance(rows, list) and [r["step"] for r in rows] == [3]
    runs = cli_json("runs", "--format", "json", "--target", server.address)
    assert isinstance(runs, list)
    assert runs[0]["run_id"] == "cli-run" and runs[0]["world_size"] == 4
    assert runs[0]["metadata"]["optimizer"] == "sgd"


def test_cli_tables_and_watch(server: ServerHandle, tmp_path: Path) -> None:
    paths, _ = write_shards(tmp_path, 1)
    base = ["--target", server.address]
    for step in (1, 2):
        result = CliRunner().invoke(
            cli,
            ["push", str(paths[0]), "--run", "t", "--step", str(step), "--rank", "0",
             "--world-size", "1", *base],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "nc1" in result.output and f"step  {step}" in result.output

    runs = CliRunner().invoke(cli, ["runs", *base])
    assert runs.exit_code == 0 and "t " in runs.output and "measurements" in runs.output
    table = CliRunner().invoke(cli, ["query", "t", "--all", *base])
    assert table.exit_code == 0
    lines = table.output.strip().splitlines()
    assert lines[0].split()[:3] == ["step", "epoch", "status"] and len(lines) == 3
    latest = CliRunner().invoke(cli, ["query", "t", *base])
    assert latest.exit_code == 0 and "step  2" in latest.output

    # watch replays the stored steps after --after-step, then exits after --count.
    watched = CliRunner().invoke(
        cli, ["watch", "t", "--after-step", "-1", "--count", "2", "--format", "json", *base]
    )
    assert watched.exit_code == 0, watched.output
    assert [json.loads(line)["step"] for line in watched.output.splitlines()] == [1, 2]


@pytest.mark.parametrize(
    "args",
    [
        ("query", "nope"),
        ("query", "nope", "--all"),
        ("watch", "nope", "--wait", "0"),
        ("query", "t", "--step", "9"),
    ],
)
def test_cli_unknown_run_or_step(
    server: ServerHandle, tmp_path: Path, args: tuple[str, ...]
) -> None:
    with NCClient(server.address) as c:
        assert c.register_run("t", K, P, 1)
    result = CliRunner().invoke(cli, [*args, "--target", server.address])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: NOT_FOUND"), result.output


def test_cli_push_conflicting_run_is_one_line(server: ServerHandle, tmp_path: Path) -> None:
    with NCClient(server.address) as c:
        assert c.register_run("t", K + 1, P, 1)  # different K than the file
    paths, _ = write_shards(tmp_path, 1)
    result = CliRunner().invoke(
        cli,
        ["push", str(paths[0]), "--run", "t", "--step", "0", "--rank", "0", "--world-size", "1",
         "--target", server.address],
    )  # fmt: skip
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "ALREADY_EXISTS" in lines[0], result.output


def test_cli_token_and_mutual_tls(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    handle = start_server(
        ServerConfig(
            listen="127.0.0.1:0",
            db_path=tmp_path / "ncserve.db",
            token=SecretStr("tok-123"),
            tls_cert=certs["server_cert"],
            tls_key=certs["server_key"],
            client_ca=certs["ca"],
            grace_s=0.5,
        )
    )
    tls = [
        "--tls-ca", str(certs["ca"]), "--tls-cert", str(certs["client_cert"]),
        "--tls-key", str(certs["client_key"]), "--tls-server-name", "localhost",
    ]  # fmt: skip
    base = ["runs", "--target", handle.address, "--deadline", "3"]
    try:
        ok = CliRunner().invoke(cli, [*base, *tls, "--token-file", str(token), "--format", "json"])
        assert ok.exit_code == 0, ok.output
        assert json.loads(ok.output) == []

        no_token = CliRunner().invoke(cli, [*base, *tls])
        assert no_token.exit_code == 2
        assert no_token.output.startswith("Error: the service refused the credentials")
        assert len(no_token.output.strip().splitlines()) == 1

        wrong = tmp_path / "wrong"
        wrong.write_text("nope")
        bad = CliRunner().invoke(cli, [*base, *tls, "--token-file", str(wrong)])
        assert bad.exit_code == 2 and "refused the credentials" in bad.output
        assert "nope" not in bad.output  # a token is never echoed back
    finally:
        handle.stop(0)


def test_ranks_leave_buffer_mode_as_soon_as_the_service_is_back(tmp_path: Path) -> None:
    """Two ranks measure every 0.3 s. The service is down for three steps, so both buffer
    (and compute the means among themselves); once it is back, each rank's buffer drains in
    order, promptly, and the following steps get their means from the service again,
    instead of staying behind a replay that waits out its backoff on every step."""
    port = free_port()
    shards = [dataset(seed=s)[:2] for s in range(2)]
    w, b = dataset()[2:]
    r1s = [round1_stats(h, y, K) for h, y in shards]
    local_means = r1s[0].merge(r1s[1]).class_means()
    clients = [
        NCClient(f"127.0.0.1:{port}", deadline_s=1.0, spill_dir=tmp_path / f"r{r}")
        for r in range(2)
    ]
    barrier = threading.Barrier(2)
    served: dict[int, list[bool]] = {0: [], 1: []}
    handle = None

    def rank(r: int) -> None:
        c = clients[r]
        c.register_run("run", K, P, 2)
        h, y = shards[r]
        for step in range(12):
            barrier.wait()
            c.push_round1("run", step, r, r1s[r], *((w, b) if r == 0 else (None, None)))
            means = c.fetch_class_means("run", step, timeout_s=1.0, rank=r)
            served[r].append(means is not None)
            c.push_round2("run", step, r, round2_stats(h, y, means or local_means, w, b))
            time.sleep(0.3)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)  # about three steps without a service
        handle = serve(tmp_path / "ncserve.db", port)
        for t in threads:
            t.join(timeout=120)
        for c in clients:
            report = c.flush(timeout_s=20.0)
            assert report.complete, report.summary()
        rows = clients[0].get_metrics("run", all_steps=True)
        assert [r["step"] for r in rows] == list(range(12))
        for r in range(2):
            # Within a few steps of the service's return, its means reach the ranks again.
            assert all(served[r][-5:]), served
    finally:
        for c in clients:
            c.close(timeout_s=0)
        if handle is not None:
            handle.stop(0)
