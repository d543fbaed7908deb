"""The merges of a step's shards and its finalize: what the leader of a step's commit
queue does with a batch (aggregator.py holds the queue, the open steps and the waits).

Both rounds merge by addition into copies of the step's state, which change only once the
batch is stored, so a failed commit leaves the step as it was. Mixed into the Aggregator.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

import numpy as np

from ncserve.metrics import (
    MetricInputError,
    Round1Stats,
    Round2Stats,
    complete_finalize,
    prepare_finalize,
)
from ncserve.protocol import HOLDOUT_PREFIX, MAX_SCALARS, ROUND_1, ROUND_2
from ncserve.service.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    ServiceError,
)
from ncserve.service.exporter import ServiceMetrics
from ncserve.service.records import MeasurementRecord, ShardRecord
from ncserve.service.runs import RunRegistry
from ncserve.service.shards import (
    OpenStep,
    Pending,
    PushResult,
    max_epoch,
    overflow_error,
    prefixed,
    round1_sound,
    round2_finite,
)
from ncserve.service.store import Store

log = logging.getLogger(__name__)


class StepMerges:
    """Merging committed batches of shards into a step, and finalizing it."""

    _store: Store
    _metrics: ServiceMetrics
    _lock: threading.Lock
    runs: RunRegistry

    def _close(self, state: OpenStep) -> None:
        raise NotImplementedError  # the Aggregator's

    def _bump(self) -> None:
        raise NotImplementedError  # the Aggregator's

    def _start_prepare(self, state: OpenStep) -> None:
        raise NotImplementedError  # the Aggregator's

    def _answered_as_repeat(self, item: Pending, shards: Mapping[int, ShardRecord]) -> bool:
        """A push whose rank this round already has is answered from the record (or refused
        when its payload differs): True when ``item`` was so answered."""
        previous = shards.get(item.shard.rank)
        if previous is None:
            return False
        try:
            item.answer(self._repeat(previous, item.shard))
        except ServiceError as exc:
            item.fail(exc)
        return True

    @staticmethod
    def _repeat(previous: ShardRecord, shard: ShardRecord) -> PushResult:
        if previous.payload_sha256 != shard.payload_sha256:
            raise AlreadyExists(
                f"rank {shard.rank} already pushed a different round-{shard.round} shard for "
                f"step {shard.step} of run {shard.run_id!r} (payload_sha256 "
                f"{previous.payload_sha256[:16]}..., this one {shard.payload_sha256[:16]}...)"
            )
        return PushResult.of(previous)

    def _commit_round1(self, state: OpenStep, items: list[Pending]) -> None:
        run = state.run
        # One copy per batch: the step's state changes only once the batch is stored.
        merged = (
            state.r1.copy() if state.r1 else Round1Stats.zeros(run.num_classes, run.feature_dim)
        )
        shards = dict(state.r1_shards)
        weight, bias = state.weight, state.bias
        epoch = state.epoch
        accepted: list[Pending] = []
        for item in items:
            shard = item.shard
            if self._answered_as_repeat(item, shards):
                continue
            if len(shards) + 1 == run.world_size and weight is None and item.weight is None:
                item.fail(
                    FailedPrecondition(
                        f"the last round-1 shard of step {shard.step} of run {run.run_id!r} "
                        "arrived and no rank sent tensor 'weight'; the classifier W (and b) must "
                        "come with round 1"
                    )
                )
                continue
            assert item.stats1 is not None
            if weight is None and item.weight is not None:
                weight, bias = item.weight, item.bias
            epoch = max_epoch(epoch, item.push.epoch)
            shards[shard.rank] = shard
            accepted.append(item)
        if not accepted:
            return
        base = merged.copy()
        with np.errstate(over="ignore"):  # an overflow is refused below, by name
            for item in accepted:
                assert item.stats1 is not None
                merged.merge_in_place(item.stats1)
        if not round1_sound(merged):
            # Some shard takes the merged sums past float64 (or the counts past int64):
            # merge again one by one and refuse the shards that do.
            merged, kept = base, []
            for item in accepted:
                assert item.stats1 is not None
                with np.errstate(over="ignore"):
                    trial = merged.merge(item.stats1)
                if round1_sound(trial):
                    merged = trial
                    kept.append(item)
                else:
                    item.fail(overflow_error(item.shard))
                    del shards[item.shard.rank]
            accepted = kept
            if not accepted:
                return
            if state.weight is None:
                carrier = next((i for i in accepted if i.weight is not None), None)
                weight, bias = (carrier.weight, carrier.bias) if carrier else (None, None)
        tensors: dict[str, np.ndarray] = prefixed(merged.to_arrays(), "r1.")
        if state.weight is None and weight is not None:
            tensors["weight"] = weight
            if bias is not None:
                tensors["bias"] = bias
        self._store.accept_shards(
            [i.shard for i in accepted], epoch, state.state_json(), tensors, state.opened_unix
        )
        state.r1, state.r1_shards, state.epoch = merged, shards, epoch
        state.weight, state.bias = weight, bias
        for item in accepted:
            self._metrics.shard_received(ROUND_1, item.shard.payload_bytes)
            item.answer(PushResult.of(item.shard))
        if state.round1_complete:
            try:
                means = merged.class_means()
            except MetricInputError as exc:
                self._close_incomplete(state, f"round 1 cannot give class means: {exc}")
                return
            with self._lock:
                state.means = means
                self._start_prepare(state)
                if state.r2 is None:
                    state.r2 = Round2Stats.zeros(run.num_classes, run.feature_dim)
                self._bump()

    def _commit_round2(self, state: OpenStep, items: list[Pending]) -> None:
        run = state.run
        assert state.r2 is not None
        merged, holdout = state.r2, state.holdout
        shards = dict(state.r2_shards)
        scalar_sums = {k: list(v) for k, v in state.scalar_sums.items()}
        tally = None if state.tally is None else list(state.tally)
        epoch = state.epoch
        accepted: list[Pending] = []
        for item in items:
            shard = item.shard
            if self._answered_as_repeat(item, shards):
                continue
            stats = item.stats2
            assert stats is not None
            expected = state.r1_shards[shard.rank].num_samples
            if stats.num_samples != expected:
                item.fail(
                    InvalidArgument(
                        f"round-2 num_samples={stats.num_samples} of rank {shard.rank} does not "
                        f"match its round-1 shard ({expected} samples) for step {shard.step}"
                    )
                )
                continue
            new_keys = set(item.push.scalars) - set(scalar_sums)
            if len(scalar_sums) + len(new_keys) > MAX_SCALARS:
                item.fail(
                    InvalidArgument(
                        f"rank {shard.rank} adds {len(new_keys)} scalar keys to the "
                        f"{len(scalar_sums)} of step {shard.step}; a step holds at most "
                        f"{MAX_SCALARS}"
                    )
                )
                continue
            candidate = merged.merge(stats)
            candidate_holdout = holdout
            if item.holdout is not None:
                candidate_holdout = item.holdout if holdout is None else holdout.merge(item.holdout)
            if not round2_finite(candidate) or (
                candidate_holdout is not None and not round2_finite(candidate_holdout)
            ):
                item.fail(overflow_error(shard))
                continue
            merged, holdout = candidate, candidate_holdout
            for key, value in item.push.scalars.items():
                entry = scalar_sums.setdefault(key, [0.0, 0.0])
                entry[0] += float(value)
                entry[1] += 1.0
            if item.push.train_tally is not None:
                base = tally or [0.0, 0.0, 0.0]
                tally = [base[i] + float(item.push.train_tally[i]) for i in range(3)]
            epoch = max_epoch(epoch, item.push.epoch)
            shards[shard.rank] = shard
            accepted.append(item)
        if not accepted:
            return
        if len(shards) < run.world_size:
            tensors = prefixed(merged.to_arrays(), "r2.")
            if holdout is not None:
                tensors.update(prefixed(holdout.to_arrays(), HOLDOUT_PREFIX))
            json_state = {"scalar_sums": scalar_sums, "tally": tally}
            self._store.accept_shards(
                [i.shard for i in accepted], epoch, json_state, tensors, state.opened_unix
            )
            state.r2, state.holdout, state.r2_shards = merged, holdout, shards
            state.scalar_sums, state.tally, state.epoch = scalar_sums, tally, epoch
        elif not self._finalize(
            state, [i.shard for i in accepted], merged, holdout, scalar_sums, tally, epoch
        ):
            return  # marked incomplete: the queued shards learn it as a closed step
        for item in accepted:
            self._metrics.shard_received(ROUND_2, item.shard.payload_bytes)
            item.answer(PushResult.of(item.shard))

    def _finalize(
        self,
        state: OpenStep,
        last_shards: list[ShardRecord],
        r2: Round2Stats,
        holdout: Round2Stats | None,
        scalar_sums: Mapping[str, list[float]],
        tally: list[float] | None,
        epoch: int | None,
    ) -> bool:
        """Finalize and store the measurement; False when the step had to be marked incomplete."""
        run = state.run
        started = time.perf_counter()
        assert state.r1 is not None and state.weight is not None
        try:
            prepared = (
                state.prepared.result()
                if state.prepared is not None
                else prepare_finalize(state.r1, state.weight, state.bias)
            )
            metrics: dict[str, float] = dict(complete_finalize(prepared, r2))
        except MetricInputError as exc:
            self._close_incomplete(state, f"finalize failed: {exc}")
            return False
        if holdout is not None and holdout.num_samples > 0:
            metrics["holdout_nc4"] = holdout.ncc_agree / holdout.num_samples
            metrics["holdout_accuracy"] = holdout.correct / holdout.num_samples
            metrics["holdout_num_samples"] = holdout.num_samples
        scalars = {k: v[0] / v[1] for k, v in scalar_sums.items() if v[1] > 0}
        if tally is not None and tally[2] > 0:
            scalars["train_loss"] = tally[0] / tally[2]
            scalars["train_accuracy"] = tally[1] / tally[2]
        record = self._store.finalize_step(
            run.run_id, state.step, epoch, metrics, scalars, last_shards
        )
        self._metrics.observe_finalize(time.perf_counter() - started)
        self._close(state)
        self.runs.changed()
        log.debug("step %d of run %r finalized (row %d)", state.step, run.run_id, record.id)
        return True

    def _close_incomplete(self, state: OpenStep, reason: str) -> MeasurementRecord | None:
        """Mark a step incomplete (nothing of it counted). Caller leads the step's commits."""
        try:
            record = self._store.mark_incomplete(state.run.run_id, state.step, state.epoch, reason)
        except ServiceError as exc:
            log.error(
                "could not mark step %d of run %r incomplete: %s", state.step, state.run.run_id, exc
            )
            return None
        log.warning("step %d of run %r incomplete: %s", state.step, state.run.run_id, reason)
        self._close(state)
        self.runs.changed()
        return record
