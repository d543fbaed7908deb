"""One shard per node: the ranks of a node sum their statistics on the training device and
one of them (the node's lowest rank, its *leader*) talks to the service for the node.

With 8 GPUs per node the service then receives one copy of the K x P class sums per node per
round instead of eight, and sees world size = nodes. The sums are float64 (counts too: exact
below 2^53), so the node's shard is the same statistic the per-rank shards would merge to, up
to the order of the additions (round-off, ~1e-16 relative).

A node is the set of ranks that share the torch elastic ``GROUP_RANK`` (torchrun, nclaunch),
else the host name (srun, mpirun): no assumption that a node's ranks are contiguous or that
nodes are the same size. Nodes are numbered in the order of their leaders' ranks, so the
first node's leader is rank 0.

Every collective here runs in the thread that trains (the Tracker calls them from
``measure`` and ``settle`` only): with NCCL, collectives on two communicators issued in
different orders on different ranks can deadlock, and the training loop's own collectives
run on the default group.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ncserve.metrics import Round1Stats, Round2Stats


def node_key() -> str:
    """What the ranks of one node share: the elastic agent's group rank, else the host."""
    group_rank = os.environ.get("GROUP_RANK")
    return f"group:{group_rank}" if group_rank is not None else f"host:{socket.gethostname()}"


@dataclass(frozen=True)
class NodeLayout:
    """Which ranks form which node (pure: computed from every rank's node key)."""

    nodes: list[list[int]]  # global ranks of each node, ascending; nodes by their first rank

    @classmethod
    def from_keys(cls, keys: Sequence[str]) -> NodeLayout:
        by_key: dict[str, list[int]] = {}
        for rank, key in enumerate(keys):
            by_key.setdefault(key, []).append(rank)
        return cls(sorted(by_key.values(), key=lambda ranks: ranks[0]))

    def node_of(self, rank: int) -> int:
        for index, ranks in enumerate(self.nodes):
            if rank in ranks:
                return index
        raise ValueError(f"rank {rank} is in no node")

    @property
    def trivial(self) -> bool:
        """One rank per node: a node's shard is its rank's own."""
        return all(len(ranks) == 1 for ranks in self.nodes)


class NodeGroup:
    """This rank's node: its process group, its leader, and the sums to the leader."""

    def __init__(self, layout: NodeLayout, rank: int, group: Any) -> None:
        self.layout = layout
        self.index = layout.node_of(rank)
        self.ranks = layout.nodes[self.index]
        self.leader_rank = self.ranks[0]
        self.is_leader = rank == self.leader_rank
        self._group = group

    @classmethod
    def create(cls, rank: int, world_size: int, key: str | None = None) -> NodeGroup:
        """Collective on the default group: every rank calls it once, at the same point.
        ``key`` names this rank's node (default: ``node_key()``)."""
        keys: list[Any] = [None] * world_size
        dist.all_gather_object(keys, key if key is not None else node_key())
        layout = NodeLayout.from_keys([str(k) for k in keys])
        group = None
        if not layout.trivial:
            # Every rank creates every node's group (new_group is collective over the world),
            # in the same order, and keeps its own.
            group, _ = dist.new_subgroups_by_enumeration(layout.nodes)
        return cls(layout, rank, group)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def _device(self) -> torch.device:
        if dist.get_backend(self._group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _sum_to_leader(self, parts: list[np.ndarray]) -> list[np.ndarray] | None:
        """The node's sum of each array (float64), on the leader; None on the others."""
        flat = np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in parts])
        packed = torch.from_numpy(flat).to(self._device())
        dist.reduce(packed, dst=self.leader_rank, op=dist.ReduceOp.SUM, group=self._group)
        if not self.is_leader:
            return None
        total = packed.cpu().numpy()
        out: list[np.ndarray] = []
        start = 0
        for p in parts:
            size = int(np.asarray(p).size)
            out.append(total[start : start + size].reshape(np.shape(p)))
            start += size
        return out

    def sum_round1(self, r1: Round1Stats) -> Round1Stats:
        """The node's round 1 on the leader; empty statistics elsewhere (so that merging what
        every rank holds gives the global statistics once)."""
        if self.size == 1:
            return r1
        summed = self._sum_to_leader([r1.counts_K, r1.sums_KP])
        if summed is None:
            return Round1Stats.zeros(r1.num_classes, r1.feature_dim)
        counts, sums = summed
        return Round1Stats(np.rint(counts).astype(np.int64), sums)

    def sum_round2(self, r2: Round2Stats, num_classes: int, feature_dim: int) -> Round2Stats:
        """As ``sum_round1`` for round 2 (or the held-out split's round 2)."""
        if self.size == 1:
            return r2
        counts = np.array([r2.num_samples, r2.ncc_agree, r2.correct], dtype=np.float64)
        summed = self._sum_to_leader([counts, r2.scatter, r2.sq_resid_K])
        if summed is None:
            return Round2Stats.zeros(num_classes, feature_dim)
        counts, scatter, sq_resid = summed
        n, agree, correct = (round(float(v)) for v in counts)
        return Round2Stats(n, scatter, sq_resid, agree, correct)

    def from_leader(self, obj: Any) -> Any:
        """The leader's ``obj`` on every rank of the node."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.leader_rank, group=self._group)
        return box[0]
