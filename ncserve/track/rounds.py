"""The two rounds of a measurement with the ncserve service, as one rank (or one node's
leader) does them: round 1 (counts, class sums) -> the global class means -> round 2
(projected scatter, NCC counts), from the features a measurement kept or, in two-pass mode,
from a fresh forward pass per round. Mixed into the Tracker (tracker.py), which decides when
they run and finishes a measurement the service did not answer in time.

Legend: N samples on this rank, K classes, P feature dim; ``h_NP`` the classifier's inputs,
``w_KP`` / ``b_K`` its weight and bias.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ncserve.client import NCClient, ServiceError
from ncserve.metrics import (
    METRIC_KEYS,
    ClassMeans,
    Round1Stats,
    Round2Stats,
    round1_stats,
    round2_stats,
)
from ncserve.track.capture import ModelCapture
from ncserve.track.nodes import NodeGroup

log = logging.getLogger(__name__)

RESULT_KEYS = (*METRIC_KEYS, "num_samples", "num_classes", "feature_dim")
HOLDOUT_KEYS = ("holdout_nc4", "holdout_accuracy")
_POLL_S = 0.005
# Two-pass mode forwards the split in chunks of whole batches of about this many bytes of
# features (the engine's own working memory is bounded separately, by its row blocks).
TWO_PASS_CHUNK_BYTES = 256 << 20


def _is_finalized(error: ServiceError) -> bool:
    """The service refused a push because the step is already finalized (or taken)."""
    return error.code.name == "ALREADY_EXISTS" or (
        error.code.name == "FAILED_PRECONDITION" and "already finalized" in error.details
    )


_EngineArray = torch.Tensor | np.ndarray


def _engine_input(h_NP: torch.Tensor, y_N: torch.Tensor) -> tuple[_EngineArray, _EngineArray]:
    """Features for the metric engine: on a GPU the tensors themselves (both rounds run there,
    ncserve.metrics.torch_stats); on the CPU numpy views of them (no copy for float32 or
    float64) for the numpy engine, level with torch there (benchmarks/torch_engine.py) and
    holding its BLAS threads."""
    if h_NP.device.type != "cpu":
        return h_NP, y_N
    if h_NP.dtype not in (torch.float32, torch.float64):
        h_NP = h_NP.float()
    return h_NP.numpy(), y_N.numpy()


@dataclass
class Capture:
    """What a measurement takes from the model at its step (the only part that must run
    in the training loop): features and labels, already in the metric engine's form
    (``_engine_input``), and the classifier, plus the step's context. In two-pass mode
    the loaders instead of the features: each round forwards them again, chunk by chunk."""

    step: int
    epoch: int | None
    scalars: dict[str, float]
    features: tuple[_EngineArray, _EngineArray] | None
    holdout: tuple[_EngineArray, _EngineArray] | None
    w_KP: np.ndarray
    b_K: np.ndarray | None
    loader: Iterable[Any] | None = None
    holdout_loader: Iterable[Any] | None = None

    @property
    def has_holdout(self) -> bool:
        return self.holdout is not None or self.holdout_loader is not None


@dataclass
class Outcome:
    """How this rank's two rounds with the service went (no collectives were involved)."""

    r1: Round1Stats
    stored: bool = False
    means: ClassMeans | None = None
    r2: Round2Stats | None = None
    holdout: Round2Stats | None = None
    metrics: dict[str, float] | None = None


Finisher = Callable[[Capture, Outcome], Outcome]


class ServiceRounds(ModelCapture):
    """The rounds with the service (mixed into the Tracker)."""

    client: NCClient
    run_id: str
    rank: int
    deadline_s: float
    nodes: NodeGroup | None
    shard_rank: int
    _pushes: bool

    def _capture(
        self,
        loader: Iterable[Any],
        step: int,
        epoch: int | None,
        holdout_loader: Iterable[Any] | None,
        scalars: Mapping[str, float] | None,
    ) -> Capture:
        features = _engine_input(*self.features(loader))
        holdout = None
        if holdout_loader is not None:
            holdout = _engine_input(*self.features(holdout_loader))
        w_KP, b_K = self.classifier_arrays()
        return Capture(step, epoch, dict(scalars or {}), features, holdout, w_KP, b_K)

    def _chunks(
        self, c: Capture, holdout: bool = False
    ) -> Iterator[tuple[_EngineArray, _EngineArray]]:
        """The split's (or the held-out split's) features: the ones kept, or in two-pass
        mode a fresh forward pass over its loader, chunk by chunk."""
        loader = c.holdout_loader if holdout else c.loader
        if loader is None:
            kept = c.holdout if holdout else c.features
            if kept is not None:
                yield kept
            return
        for h, y in self.feature_chunks(loader, TWO_PASS_CHUNK_BYTES):
            yield _engine_input(h, y)

    def _local_round1(self, c: Capture) -> Round1Stats:
        r1 = Round1Stats.zeros(self.num_classes, self.feature_dim)
        for h, y in self._chunks(c):
            r1.merge_in_place(round1_stats(h, y, self.num_classes))
        return r1

    def _local_round2(self, c: Capture, means: ClassMeans, holdout: bool) -> Round2Stats:
        r2 = Round2Stats.zeros(self.num_classes, self.feature_dim)
        for h, y in self._chunks(c, holdout):
            r2 = r2.merge(round2_stats(h, y, means, c.w_KP, c.b_K))
        return r2

    def _service_rounds(self, c: Capture) -> Outcome:
        """Both rounds with the service for this rank, without any collective (so it can run
        in a background thread); the outcome says how far it got."""
        out = Outcome(self._local_round1(c))
        if self._exchange_round1(c, out):
            self._finish_rounds(c, out)
        return out

    def _finish_rounds(self, c: Capture, out: Outcome) -> None:
        """Round 2 around the service's means, then (rank 0) the service's metrics."""
        assert out.means is not None
        self._round2(c, out, out.means)
        if self.rank == 0:
            out.metrics = self._await_service_metrics(c.step)

    def _exchange_round1(self, c: Capture, out: Outcome) -> bool:
        """Push this shard's round 1 and fetch the global means (no collective); True when
        they came. Only ranks that push take part (all, or each node's leader)."""
        if not self._pushes:
            return False
        first = self.shard_rank == 0
        try:
            self.client.push_round1(
                self.run_id,
                c.step,
                self.shard_rank,
                out.r1,
                weight_KP=c.w_KP if first else None,
                bias_K=c.b_K if first else None,
                epoch=c.epoch,
            )
            # The service holds the answer until every shard's round 1 is in, so no barrier
            # is needed; waiting for slower ranks is bounded by the deadline like any call.
            out.means = self.client.fetch_class_means(
                self.run_id, c.step, timeout_s=self.deadline_s, rank=self.shard_rank
            )
        except ServiceError as error:
            # A run resumed after a crash between the service's finalize and its own record
            # of the step: the service keeps the measurement it has; it is not taken twice.
            if not _is_finalized(error):
                raise
            out.stored = True
            return False
        return out.means is not None

    def _round1_outcome(self, c: Capture) -> Outcome:
        """This rank's round 1, summed over its node in node mode (held by the leader; a
        collective)."""
        r1 = self._local_round1(c)
        return Outcome(self.nodes.sum_round1(r1) if self.nodes is not None else r1)

    def _share_answer(self, out: Outcome) -> None:
        """In node mode, the leader's answer from the service on every rank of the node."""
        if self.nodes is not None:
            out.stored, out.means = self.nodes.from_leader((out.stored, out.means))

    def _node_exchange(self, c: Capture, out: Outcome) -> Outcome:
        self._exchange_round1(c, out)
        return out

    def _node_round2(self, c: Capture, out: Outcome) -> Outcome:
        """The leader's answer from the service, shared with its node, then the node's round
        2 (collectives, in the training thread)."""
        self._share_answer(out)
        if not out.stored and out.means is not None:
            self._finish_rounds(c, out)
        return out

    def _round2(self, c: Capture, out: Outcome, means: ClassMeans) -> None:
        """Round-2 statistics with ``means`` (and the held-out split's), summed over the node
        in node mode, pushed by the ranks that push."""
        out.r2 = self._local_round2(c, means, holdout=False)
        if c.has_holdout:
            out.holdout = self._local_round2(c, means, holdout=True)
        if self.nodes is not None:
            out.r2 = self.nodes.sum_round2(out.r2, self.num_classes, self.feature_dim)
            if out.holdout is not None:
                out.holdout = self.nodes.sum_round2(out.holdout, self.num_classes, self.feature_dim)
        if not self._pushes:
            return
        self.client.push_round2(
            self.run_id,
            c.step,
            self.shard_rank,
            out.r2,
            holdout=out.holdout,
            scalars=c.scalars if self.shard_rank == 0 else None,
            epoch=c.epoch,
            num_classes=self.num_classes,
            feature_dim=self.feature_dim,
        )

    def _await_service_metrics(self, step: int) -> dict[str, float] | None:
        deadline = time.monotonic() + self.deadline_s
        while True:
            try:
                found = self.client.get_metrics(self.run_id, step=step, include_incomplete=True)
                row = found if isinstance(found, dict) else None
            except ServiceError as error:
                if error.code.name not in ("NOT_FOUND", "UNAVAILABLE", "DEADLINE_EXCEEDED"):
                    raise
                row = None
            if row is not None:
                if row.get("status") != "complete":
                    log.warning("step %d marked incomplete by the service: %s", step, row)
                    return None
                keys = (*RESULT_KEYS, *HOLDOUT_KEYS)
                return {k: row[k] for k in keys if k in row and row[k] is not None}
            if time.monotonic() >= deadline:
                return None
            time.sleep(_POLL_S)
