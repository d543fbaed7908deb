"""Two machines, simulated by two nclaunch processes, configured only by PET_* variables.

This is what the Helm chart's Indexed Job and Kubeflow's PyTorchJob do: every node runs
the same command, torch's c10d rendezvous joins them, and all report to one service.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ncserve.metrics import METRIC_KEYS
from tests.launcher_support import REPO, TINY, metrics, run_ok

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_two_nodes_from_pet_environment(tmp_path: Path) -> None:
    port_file = tmp_path / "service.port"
    serve = [sys.executable, "-m", "ncserve", "serve", "--listen", "127.0.0.1:0"]
    serve += ["--port-file", str(port_file), "--db", str(tmp_path / "ncserve.db")]
    service = subprocess.Popen(
        serve, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.is_file():
            assert time.monotonic() < deadline and service.poll() is None, "service did not start"
            time.sleep(0.1)
        sidecar = f"127.0.0.1:{port_file.read_text().strip()}"
        env = {
            **os.environ,
            "PET_NNODES": "2",
            "PET_NPROC_PER_NODE": "1",
            "PET_RDZV_BACKEND": "c10d",
            "PET_RDZV_ENDPOINT": f"127.0.0.1:{_free_port()}",
            "PET_RDZV_ID": "two-nodes",
        }
        run_dir = tmp_path / "run"  # one shared volume, as on a cluster
        command = [sys.executable, "-c", "from launcher.cli import main; main()", *TINY]
        command += ["--epochs", "1", "--sidecar", sidecar, "--run-dir", str(run_dir)]
        nodes = [
            subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
        for node, output in zip(nodes, outputs, strict=True):
            assert node.returncode == 0, output
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)

    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 8]
    assert all(r["run_id"] == "two-nodes" and r["world_size"] == 2 for r in rows)
    assert rows[-1]["nc1"] is not None
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert f"rank {rank} of 2 (local 0 of 1" in log


def _shards(db: Path) -> dict[tuple[int, int], int]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT step, round, COUNT(*) FROM shards GROUP BY step, round")
        return {(step, rnd): n for step, rnd, n in rows}


def test_one_shard_per_node_equals_one_shard_per_rank(tmp_path: Path) -> None:
    """--nodes 2 --nproc-per-node 2: the service gets 2 shards per round per step (one per
    node) and the metrics equal --shard-per-rank's (4 shards) to 1e-12."""
    results = {}
    for mode in ("--shard-per-node", "--shard-per-rank"):
        run_dir = tmp_path / mode.strip("-")
        args = [*TINY, "--nodes", "2", "--nproc-per-node", "2", "--epochs", "1"]
        run_ok(*args, mode, "--run-dir", str(run_dir), "--measure-in-foreground")
        results[mode] = (metrics(run_dir), _shards(run_dir / "service" / "ncserve.db"))
    (per_node, node_shards), (per_rank, rank_shards) = results.values()
    steps = [r["step"] for r in per_node]
    assert steps == [r["step"] for r in per_rank] and len(steps) == 2
    assert node_shards == {(step, rnd): 2 for step in steps for rnd in (1, 2)}
    assert rank_shards == {(step, rnd): 4 for step in steps for rnd in (1, 2)}
    for node_row, rank_row in zip(per_node, per_rank, strict=True):
        assert node_row["train_loss"] == rank_row["train_loss"]  # the same training
        for key in METRIC_KEYS:
            assert node_row[key] == pytest.approx(rank_row[key], rel=1e-12, abs=1e-15), key
