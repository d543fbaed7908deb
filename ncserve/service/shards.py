"""What a push is and how its tensors are checked and decoded, and the in-progress state
of an open step: the data of the aggregator, apart from its commit queue and merges.

Legend: K classes, P feature dimension, d = min(K, P) (the round-2 scatter is d x d).
No gRPC here: errors are ``ncserve.service.errors``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ncserve.metrics import (
    ClassMeans,
    MetricInputError,
    PreparedFinalize,
    Round1Stats,
    Round2Stats,
)
from ncserve.metrics.stats import all_finite
from ncserve.protocol import (
    CLASSIFIER_NAMES,
    HOLDOUT_PREFIX,
    ROUND1_NAMES,
    ROUND2_NAMES,
    ROUND_1,
)
from ncserve.service.errors import InvalidArgument, ServiceError
from ncserve.service.records import RunCounts, RunRecord, ShardRecord


class DeadlineExceeded(ServiceError):
    status = "DEADLINE_EXCEEDED"
    reason = "failed_precondition"


@dataclass(frozen=True)
class ShardPush:
    """One validated-on-the-wire push: header fields and the decoded tensors."""

    run_id: str
    step: int
    rank: int
    round: int
    num_classes: int
    feature_dim: int
    epoch: int | None
    scalars: Mapping[str, float]
    train_tally: tuple[float, int, int] | None
    arrays: Mapping[str, np.ndarray]
    payload_sha256: str
    payload_bytes: int


@dataclass(frozen=True)
class PushResult:
    """What a push is answered with; depends only on the push, so a retry gets the same."""

    run_id: str
    step: int
    rank: int
    round: int
    payload_bytes: int
    payload_sha256: str

    @classmethod
    def of(cls, shard: ShardRecord) -> PushResult:
        return cls(
            shard.run_id,
            shard.step,
            shard.rank,
            shard.round,
            shard.payload_bytes,
            shard.payload_sha256,
        )


@dataclass(frozen=True)
class RunView:
    """A run with its counts, for queries."""

    run: RunRecord
    counts: RunCounts
    num_open_steps: int


@dataclass
class OpenStep:
    """In-progress state of one (run, step). Guarded by ``lock``."""

    run: RunRecord
    step: int
    opened_unix: float
    opened_monotonic: float
    epoch: int | None = None
    r1: Round1Stats | None = None
    r1_shards: dict[int, ShardRecord] = field(default_factory=dict)
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    means: ClassMeans | None = None
    # The round-1 part of finalize, computed in the background once round 1 is complete.
    prepared: Future[PreparedFinalize] | None = None
    r2: Round2Stats | None = None
    r2_shards: dict[int, ShardRecord] = field(default_factory=dict)
    holdout: Round2Stats | None = None
    scalar_sums: dict[str, list[float]] = field(default_factory=dict)
    tally: list[float] | None = None
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Group commit: shards queue in `pending`; whoever finds no commit in progress becomes
    # the leader, merges the whole queue and persists it in one transaction, then hands the
    # lead to the first shard queued meanwhile (waking that one thread, not every waiter).
    pending: list[Pending] = field(default_factory=list)
    committing: bool = False

    @property
    def round1_complete(self) -> bool:
        return len(self.r1_shards) == self.run.world_size

    def state_json(self) -> dict[str, Any]:
        return {"scalar_sums": self.scalar_sums, "tally": self.tally}

    def missing(self, shards: Mapping[int, ShardRecord]) -> list[int]:
        return [r for r in range(self.run.world_size) if r not in shards]


@dataclass
class Pending:
    """One decoded shard waiting to be merged, and its outcome once a commit handled it."""

    shard: ShardRecord
    push: ShardPush
    stats1: Round1Stats | None = None
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    stats2: Round2Stats | None = None
    holdout: Round2Stats | None = None
    done: bool = False
    # Set when the item is done or its thread is to lead the next commit.
    wake: threading.Event = field(default_factory=threading.Event)
    result: PushResult | None = None
    error: ServiceError | None = None
    step_closed: bool = False

    def answer(self, result: PushResult) -> None:
        self.result, self.done = result, True

    def fail(self, error: ServiceError) -> None:
        self.error, self.done = error, True


def arrays_with_prefix(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def prefixed(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {prefix + k: np.asarray(v) for k, v in arrays.items()}


def r2_from_stored(arrays: Mapping[str, np.ndarray], prefix: str) -> Round2Stats | None:
    found = arrays_with_prefix(arrays, prefix)
    if not found:
        return None
    return Round2Stats(
        int(found["num_samples"]),
        found["scatter"],
        found["sq_resid"],
        int(found["ncc_agree"]),
        int(found["correct"]),
    )


def shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def expected_payload_bytes(run: RunRecord, round_: int) -> int:
    """The most a well-formed push of the round carries: round 1 with W and b, round 2
    with its held-out copy (a bound for the wire assembler and the in-flight budget)."""
    K, P = run.num_classes, run.feature_dim
    if round_ == ROUND_1:
        return 8 * (K + K * P) + 8 * (K * P + K)
    d = Round2Stats.scatter_dim(K, P)
    return 2 * 8 * (3 + d * d + K)


def decode_round1(
    run: RunRecord, arrays: Mapping[str, np.ndarray]
) -> tuple[Round1Stats, np.ndarray | None, np.ndarray | None]:
    K, P = run.num_classes, run.feature_dim
    unknown = sorted(set(arrays) - set(ROUND1_NAMES) - set(CLASSIFIER_NAMES))
    if unknown:
        older = (
            " (sent by an older ncserve client: per-class sums of squares now travel in "
            "round 2, as 'sq_resid'; upgrade the client)"
            if unknown[0] == "sq_dev"
            else ""
        )
        raise InvalidArgument(
            f"unknown tensor {unknown[0]!r} in a round-1 push; expected "
            f"{', '.join(ROUND1_NAMES + CLASSIFIER_NAMES)}{older}"
        )
    try:
        stats = Round1Stats.from_arrays(
            {k: v for k, v in arrays.items() if k in ROUND1_NAMES}, K, P
        )
    except MetricInputError as exc:
        raise InvalidArgument(f"round-1 push: {exc}") from exc
    weight = classifier_tensor(arrays, "weight", (K, P))
    bias = classifier_tensor(arrays, "bias", (K,))
    if bias is not None and weight is None:
        raise InvalidArgument("tensor 'bias' sent without 'weight'; send both from one rank")
    return stats, weight, bias


def classifier_tensor(
    arrays: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]
) -> np.ndarray | None:
    if name not in arrays:
        return None
    array = np.asarray(arrays[name])
    if array.shape != shape:
        raise InvalidArgument(
            f"tensor {name!r} has shape {shape_str(array.shape)}; expected {shape_str(shape)}"
        )
    if array.dtype.kind != "f":
        raise InvalidArgument(f"tensor {name!r} must be float64, got {array.dtype}")
    values = np.asarray(array, dtype=np.float64)
    if not all_finite(values):
        bad = int(np.flatnonzero(~np.isfinite(values.reshape(-1)))[0])
        raise InvalidArgument(
            f"tensor {name!r} contains NaN or Inf (first at flat index {bad}: "
            f"{values.reshape(-1)[bad]})"
        )
    return values


def decode_round2(
    run: RunRecord, arrays: Mapping[str, np.ndarray]
) -> tuple[Round2Stats, Round2Stats | None]:
    K, P = run.num_classes, run.feature_dim
    allowed = set(ROUND2_NAMES) | {HOLDOUT_PREFIX + n for n in ROUND2_NAMES}
    unknown = sorted(set(arrays) - allowed)
    if unknown:
        raise InvalidArgument(
            f"unknown tensor {unknown[0]!r} in a round-2 push; expected "
            f"{', '.join(ROUND2_NAMES)} and optionally the same prefixed {HOLDOUT_PREFIX!r}"
        )
    try:
        stats = Round2Stats.from_arrays(
            {k: v for k, v in arrays.items() if k in ROUND2_NAMES}, K, P
        )
    except MetricInputError as exc:
        raise InvalidArgument(f"round-2 push: {exc}") from exc
    held = arrays_with_prefix(arrays, HOLDOUT_PREFIX)
    holdout = None
    if held:
        try:
            holdout = Round2Stats.from_arrays(held, K, P)
        except MetricInputError as exc:
            raise InvalidArgument(f"round-2 push, held-out split: {exc}") from exc
    return stats, holdout


def round1_sound(stats: Round1Stats) -> bool:
    """Merged round-1 sums still finite and counts still non-negative (no wrap-around)."""
    return all_finite(stats.sums_KP) and bool((stats.counts_K >= 0).all())


def round2_finite(stats: Round2Stats) -> bool:
    return all_finite(stats.scatter) and all_finite(stats.sq_resid_K) and stats.num_samples >= 0


def overflow_error(shard: ShardRecord) -> InvalidArgument:
    return InvalidArgument(
        f"round-{shard.round} shard of rank {shard.rank} for step {shard.step} would take the "
        "merged sums of the step past float64 (or its counts past int64); its values are "
        "not the statistics of real features"
    )


def max_epoch(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)
