"""One shard per node: the ranks of a node sum their statistics and one of them pushes.

Four gloo ranks, grouped into two nodes by the tracker's ``node`` argument (contiguous and
interleaved), measure the same split per node (foreground, background, two-pass) and per
rank: the service receives one round-1 and one round-2 shard per node, and the metrics equal
the per-rank ones to 1e-12 and the whole-dataset reference.
"""

from __future__ import annotations

import os
import sqlite3

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ncserve.metrics import METRIC_KEYS
from ncserve.service import ServerConfig, start_server
from ncserve.track import Tracker
from ncserve.track.nodes import NodeLayout
from tests.reliability_support import free_port
from tests.test_track import Net, assert_same_metrics, batches, make_data, reference

WORLD = 4
# run id -> (how a rank names its node, Tracker options)
MODES: dict[str, tuple[str, dict[str, object]]] = {
    "per-rank": ("contiguous", {"shard_per_rank": True}),
    "per-node": ("contiguous", {}),
    "interleaved": ("interleaved", {}),
    "background": ("contiguous", {"background": True}),
    "two-pass": ("contiguous", {"two_pass": True}),
    "two-pass-rank": ("contiguous", {"two_pass": True, "shard_per_rank": True}),
}


def test_node_layout_groups_ranks_by_key_in_leader_order() -> None:
    layout = NodeLayout.from_keys(["b", "a", "b", "c", "a"])
    assert layout.nodes == [[0, 2], [1, 4], [3]]
    assert [layout.node_of(r) for r in range(5)] == [0, 1, 0, 2, 1]
    assert not layout.trivial
    assert NodeLayout.from_keys(["x", "y"]).trivial
    with pytest.raises(ValueError, match="rank 7"):
        layout.node_of(7)


def _node_name(scheme: str, rank: int) -> str:
    return str(rank // 2) if scheme == "contiguous" else str(rank % 2)


def _worker(rank: int, port: int, target: str, dead: str, run_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    net = Net(p=8, k=4)
    x, y = make_data(n=200, seed=3)
    xh, yh = make_data(n=40, seed=9)
    mine, held = slice(rank, None, WORLD), slice(rank, None, WORLD)
    results: dict[str, object] = {}
    for run_id, (scheme, options) in MODES.items():
        tracker = Tracker(
            net,
            target=target,
            run_id=run_id,
            run_dir=f"{run_dir}/{run_id}",
            node=_node_name(scheme, rank),
            **options,  # type: ignore[arg-type]
        )
        got = tracker.measure(
            batches(x[mine], y[mine], 16),
            step=5,
            epoch=1,
            holdout_loader=batches(xh[held], yh[held], 8),
        )
        if options.get("background"):
            assert got is None
            [(step, got)] = tracker.settle() or [(5, None)]
            assert step == 5
        tracker.close()
        results[run_id] = (got, tracker.shard_rank, tracker.shard_count, tracker.local_fallbacks)
    # The service down: each node's leader waits one deadline, then the ranks finish the
    # measurement among themselves from the nodes' sums.
    down = Tracker(
        net,
        target=dead,
        run_id="down",
        run_dir=f"{run_dir}/down",
        node=_node_name("contiguous", rank),
        deadline_s=0.3,
    )
    got = down.measure(batches(x[mine], y[mine], 16), step=5)
    down.close(timeout_s=0.3)
    results["down"] = (got, down.shard_rank, down.shard_count, down.local_fallbacks)
    if rank == 0:
        torch.save({"results": results, "reference": reference(net, x, y)}, out)
    dist.destroy_process_group()


def test_four_ranks_on_two_nodes_push_one_shard_per_node(tmp_path) -> None:
    db = tmp_path / "db.sqlite"
    server = start_server(ServerConfig(listen="127.0.0.1:0", db_path=db))
    out = tmp_path / "out.pt"
    dead = f"127.0.0.1:{free_port()}"
    try:
        mp.spawn(
            _worker,
            args=(free_port(), server.address, dead, str(tmp_path), str(out)),
            nprocs=WORLD,
        )
    finally:
        server.stop(grace_s=1)
    saved = torch.load(out, weights_only=False)
    results, want = saved["results"], saved["reference"]
    per_rank = results["per-rank"][0]
    assert_same_metrics(per_rank, want)
    for run_id in ("per-node", "interleaved", "background", "two-pass", "two-pass-rank", "down"):
        got, shard_rank, shard_count, fallbacks = results[run_id]
        assert (shard_rank, shard_count) == (0, WORLD if "rank" in run_id else 2), run_id
        assert fallbacks == (1 if run_id == "down" else 0), run_id
        for key in METRIC_KEYS:
            assert got[key] == pytest.approx(per_rank[key], rel=1e-12, abs=1e-14), (run_id, key)
        if run_id != "down":
            for key in ("holdout_nc4", "holdout_accuracy"):
                assert got[key] == per_rank[key], (run_id, key)
    with sqlite3.connect(db) as conn:
        shards = conn.execute(
            "SELECT run_id, round, COUNT(*), MAX(rank) FROM shards GROUP BY run_id, round"
        ).fetchall()
        sizes = dict(conn.execute("SELECT run_id, world_size FROM runs").fetchall())
    counts = {(run_id, rnd): (n, top) for run_id, rnd, n, top in shards}
    for run_id in MODES:
        expected = WORLD if "rank" in run_id else 2
        assert sizes[run_id] == expected, run_id
        for rnd in (1, 2):
            assert counts[(run_id, rnd)] == (expected, expected - 1), (run_id, rnd)
