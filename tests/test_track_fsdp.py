"""Tracker under FSDP on CPU with gloo: 2 ranks, sharded classifier, uneven measurement shards.

FSDP2 (``fully_shard``, the classifier a DTensor gathered with ``full_tensor()``) and FSDP1
(``FullyShardedDataParallel`` with the classifier in its own nested unit as a 1-D shard per
rank, and with it in the root unit's flat parameter): the tracker's metrics and nc0 must
equal those computed on the unsharded model over the whole data set. The ranks hold
different numbers of batches, which only works because the tracker runs the forwards of a
sharded model in lockstep. A DDP-wrapped model is measured through its inner module.
"""

from __future__ import annotations

import copy
import os
import socket
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ncserve.metrics import METRIC_KEYS, compute_metrics, nc0_from_weight
from ncserve.service import ServerConfig, start_server
from ncserve.track import Tracker

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6 ships FSDP2 under _composable only
    from torch.distributed._composable.fsdp import fully_shard

pytestmark = pytest.mark.slow

N, D_IN, P, K = 150, 6, 8, 5


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D_IN, P), nn.Tanh())
        self.head = nn.Linear(P, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % K
    return torch.randn(N, D_IN, generator=g) + y[:, None].float(), y


def reference(net: Net, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        h = net.body(x).double().numpy()
    w = net.head.weight.detach().double().numpy()
    b = net.head.bias.detach().double().numpy()
    return compute_metrics(h, y.numpy(), w, b)


def shard(net: Net, kind: str) -> nn.Module:
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(net)
    if kind == "fsdp2":
        fully_shard(net.head)
        fully_shard(net)
        return net
    from torch.distributed.fsdp import FullyShardedDataParallel

    # device_id=cpu: FSDP1 otherwise insists on an accelerator.
    cpu = torch.device("cpu")
    if kind == "fsdp1-nested":
        net.head = FullyShardedDataParallel(net.head, device_id=cpu, use_orig_params=True)
        return FullyShardedDataParallel(net, device_id=cpu, use_orig_params=True)
    return FullyShardedDataParallel(net, device_id=cpu, use_orig_params=False)


def _worker(rank: int, port: int, target: str, run_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x, y = make_data()
    # Uneven shards: rank 0 holds 6 batches, rank 1 holds 4.
    mine = slice(0, 90) if rank == 0 else slice(90, N)
    loader = [(x[mine][i : i + 16], y[mine][i : i + 16]) for i in range(0, len(y[mine]), 16)]
    results: dict[str, Any] = {}
    for kind in ("fsdp2", "fsdp1-nested", "fsdp1-root", "ddp"):
        torch.manual_seed(0)
        full = Net()
        model = shard(copy.deepcopy(full), kind)
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        tracker = Tracker(model, classifier=head, target=target, run_id=kind, run_dir=run_dir)
        # Before any forward: the gather must also work on a model FSDP has not run yet.
        nc0, _ = tracker.record_nc0(0)
        metrics = tracker.measure(loader, step=1, epoch=0)
        tracker.close()
        results[kind] = {
            "metrics": metrics,
            "nc0": nc0,
            "reference": reference(full, x, y),
            "reference_nc0": nc0_from_weight(full.head.weight.detach().double().numpy())[0],
        }
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_fsdp_metrics_equal_the_unsharded_model(tmp_path):
    server = start_server(ServerConfig(listen="127.0.0.1:0", db_path=tmp_path / "db.sqlite"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out.pt"
    try:
        mp.spawn(_worker, args=(port, server.address, str(tmp_path), str(out)), nprocs=2)
    finally:
        server.stop(grace_s=1)
    results = torch.load(out, weights_only=False)
    assert set(results) == {"fsdp2", "fsdp1-nested", "fsdp1-root", "ddp"}
    for kind, result in results.items():
        got, want = result["metrics"], result["reference"]
        assert np.isclose(got["num_samples"], N), kind
        for key in METRIC_KEYS:
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (kind, key)
        assert result["nc0"] == pytest.approx(result["reference_nc0"], rel=1e-12), kind
