"""The aggregator: per (run, step) barrier over world_size shards, merged as they arrive.

Legend: K classes, P feature dimension, d = min(K, P) (the round-2 scatter is d x d).

Memory per open step is O(K·P + d²) whatever the world size: one merged
Round1Stats, W and b, the class means once round 1 is complete, and one merged
Round2Stats (plus the held-out split's). A shard is merged the moment it is
validated, and every accepted shard updates the stored merge in the same
transaction that records it (see store.py), so nothing acknowledged is lost to a
crash and nothing is counted twice: (run, step, rank, round) identifies a push,
and a repeat is answered from the record instead of merged again.

Floating-point sums depend on merge order; shards merged in the same order give
bit-identical metrics (a restart continues the stored merge in arrival order).

The data (pushes, open steps, decoding) is in shards.py, the merges and finalize in
merges.py, the runs in runs.py, the queries in queries.py. This module knows nothing of gRPC: it raises ``ncserve.service.errors`` and the
servicer maps them to status codes.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from ncserve.metrics import (
    ClassMeans,
    MetricInputError,
    Round1Stats,
    Round2Stats,
    prepare_finalize,
)
from ncserve.protocol import (
    MAX_SCALARS,
    ROUND_1,
    ROUND_2,
    SCALAR_KEY_PATTERN,
)
from ncserve.service.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from ncserve.service.exporter import ServiceMetrics
from ncserve.service.merges import StepMerges
from ncserve.service.queries import RunQueries
from ncserve.service.records import RunRecord, ShardRecord
from ncserve.service.runs import AggregatorLimits, RunRegistry
from ncserve.service.shards import (
    DeadlineExceeded,
    OpenStep,
    Pending,
    PushResult,
    RunView,
    ShardPush,
    decode_round1,
    decode_round2,
    r2_from_stored,
)
from ncserve.service.store import Store

log = logging.getLogger(__name__)

# Re-exported: what callers of the aggregator build and get back.
__all__ = ["Aggregator", "AggregatorLimits", "PushResult", "RunView", "ShardPush"]


class Aggregator(RunQueries, StepMerges):
    """Runs, open steps and their merges; finalizes through the metric engine."""

    def __init__(
        self,
        store: Store,
        metrics: ServiceMetrics,
        limits: AggregatorLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self.limits = limits or AggregatorLimits()
        self._clock = clock
        self._lock = threading.Lock()
        # Notified on every change waiters care about: round 1 complete, step closed, shutdown.
        self._changed = threading.Condition(self._lock)
        self._event_seq = 0
        self.runs = RunRegistry(store, self.limits, wall_clock)
        self._open: dict[tuple[str, int], OpenStep] = {}
        self._shutting_down = False
        # Everything of a finalize that needs only round 1 runs here while round 2 arrives,
        # so the last round-2 shard pays only for the round-2 part.
        self._prepare_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ncserve-prep")
        self._restore()

    # -- startup -----------------------------------------------------------------------------

    def _restore(self) -> None:
        now = self._clock()
        for record in self._store.open_steps():
            run = self.runs.get(record.run_id)
            K, P = run.num_classes, run.feature_dim
            # The step deadline restarts with the server so clients get time to retry.
            state = OpenStep(run, record.step, time.time(), now, epoch=record.epoch)
            t = record.tensors
            if "r1.counts" in t:
                state.r1 = Round1Stats(t["r1.counts"], t["r1.sums"])
            state.weight = t.get("weight")
            state.bias = t.get("bias")
            state.r2 = r2_from_stored(t, "r2.") or Round2Stats.zeros(K, P)
            state.holdout = r2_from_stored(t, "holdout.")
            state.scalar_sums = {k: list(v) for k, v in record.state.get("scalar_sums", {}).items()}
            tally = record.state.get("tally")
            state.tally = None if tally is None else list(tally)
            for shard in record.shards:
                (state.r1_shards if shard.round == ROUND_1 else state.r2_shards)[shard.rank] = shard
            if state.round1_complete and state.r1 is not None:
                try:
                    state.means = state.r1.class_means()
                except MetricInputError as exc:
                    self._close_incomplete(state, f"round 1 cannot give class means: {exc}")
                    continue
                self._start_prepare(state)
            self._open[(run.run_id, record.step)] = state
        log.info("restored %d runs and %d open steps", len(self.runs.all()), len(self._open))

    # -- runs --------------------------------------------------------------------------------

    def register_run(
        self,
        run_id: str,
        num_classes: int,
        feature_dim: int,
        world_size: int,
        metadata: Mapping[str, str],
    ) -> tuple[bool, RunRecord]:
        return self.runs.register(run_id, num_classes, feature_dim, world_size, metadata)

    def run(self, run_id: str) -> RunRecord:
        return self.runs.get(run_id)

    def _views(self, runs: list[RunRecord]) -> list[RunView]:
        counts = self._store.run_counts([r.run_id for r in runs])
        with self._lock:
            open_steps = collections.Counter(key[0] for key in self._open)
        return [RunView(r, counts[r.run_id], open_steps[r.run_id]) for r in runs]

    def run_view(self, run_id: str) -> RunView:
        return self._views([self.runs.get(run_id)])[0]

    def list_runs_page(
        self, page_size: int, page_token: str, states: list[str]
    ) -> tuple[list[RunView], bool]:
        """A page of runs (oldest first) and whether more follow (see RunRegistry.page)."""
        runs, more = self.runs.page(page_size, page_token, states)
        return self._views(runs), more

    def open_step_count(self) -> int:
        with self._lock:
            return len(self._open)

    # -- the life of a run -------------------------------------------------------------------

    def finish_run(self, run_id: str, state: str, reason: str) -> RunView:
        self.runs.finish(run_id, state, reason)
        with self._lock:
            self._bump()  # watchers of the run end their streams
        return self.run_view(run_id)

    def heartbeat(self, run_id: str) -> RunRecord:
        return self.runs.touch(run_id, store=True)

    def delete_run(self, run_id: str) -> tuple[int, int]:
        """Remove a run, its open steps and everything stored of it."""
        self.runs.get(run_id)
        with self._lock:
            states = [s for key, s in self._open.items() if key[0] == run_id]
        for state in states:
            with state.lock:
                state.closed = True
            with self._lock:
                self._open.pop((run_id, state.step), None)
                self._bump()
        return self.runs.remove(run_id)

    def maintain(self) -> int:
        """One reaper pass: steps past their deadline become incomplete, run activity is
        saved, silent runs are abandoned and ended runs past retention deleted. Returns the
        number of steps expired."""
        expired = self.expire_overdue()
        _, past_retention = self.runs.sweep()
        for run_id in past_retention:
            try:
                self.delete_run(run_id)
            except NotFound:
                continue  # deleted meanwhile
            log.info("run %r deleted: ended more than %gs ago (--retention)", run_id,
                     self.limits.retention_s)  # fmt: skip
        return expired

    # -- pushes ------------------------------------------------------------------------------

    def check_header(self, push: ShardPush) -> RunRecord:
        """Reject a push on its header alone, before its payload is read."""
        run = self.run(push.run_id)
        if push.step < 0:
            raise InvalidArgument(f"step must be >= 0, got step={push.step}")
        if not 0 <= push.rank < run.world_size:
            raise InvalidArgument(
                f"rank={push.rank} is outside [0, {run.world_size}) for run {run.run_id!r} "
                f"(world_size={run.world_size})"
            )
        if push.num_classes != run.num_classes:
            raise InvalidArgument(
                f"num_classes={push.num_classes} does not match run {run.run_id!r} "
                f"(num_classes={run.num_classes})"
            )
        if push.feature_dim != run.feature_dim:
            raise InvalidArgument(
                f"feature_dim={push.feature_dim} does not match run {run.run_id!r} "
                f"(feature_dim={run.feature_dim})"
            )
        if push.epoch is not None and push.epoch < 0:
            raise InvalidArgument(f"epoch must be >= 0, got epoch={push.epoch}")
        if push.round == ROUND_1 and (push.scalars or push.train_tally is not None):
            raise InvalidArgument("scalars and train_tally belong in the round-2 header")
        if len(push.scalars) > MAX_SCALARS:
            raise InvalidArgument(
                f"the header carries {len(push.scalars)} scalars; at most {MAX_SCALARS}"
            )
        for key, value in push.scalars.items():
            if not SCALAR_KEY_PATTERN.fullmatch(key):
                raise InvalidArgument(
                    f"scalar key {key!r} is not 1-64 characters of [A-Za-z0-9._-]"
                )
            if not math.isfinite(value):
                raise InvalidArgument(f"scalars[{key!r}]={value} is not finite")
        if push.train_tally is not None:
            loss_sum, correct, n = push.train_tally
            if not math.isfinite(loss_sum):
                raise InvalidArgument(f"train_tally.loss_sum={loss_sum} is not finite")
            if n < 0 or not 0 <= correct <= n:
                raise InvalidArgument(
                    f"train_tally needs 0 <= num_correct <= num_samples, got num_correct="
                    f"{correct}, num_samples={n}"
                )
        return run

    def push(self, push: ShardPush) -> PushResult:
        """Validate, merge and persist one shard; finalize the step if it was the last."""
        run = self.check_header(push)
        if push.round == ROUND_1:
            stats1, weight, bias = decode_round1(run, push.arrays)
            num_samples = stats1.num_samples
        elif push.round == ROUND_2:
            stats2, holdout = decode_round2(run, push.arrays)
            num_samples = stats2.num_samples
        else:
            raise InvalidArgument(f"round={push.round} is not 1 or 2")
        shard = ShardRecord(
            run.run_id,
            push.step,
            push.rank,
            push.round,
            push.payload_sha256,
            push.payload_bytes,
            num_samples,
        )
        # A step closed while the shard queued (finalized, expired) is looked up again.
        for _ in range(3):
            state, answer = self._step_for(run, shard)
            if state is None:
                assert answer is not None
                return answer
            item = Pending(shard, push)
            if push.round == ROUND_1:
                item.stats1, item.weight, item.bias = stats1, weight, bias
            else:
                item.stats2, item.holdout = stats2, holdout
            self._submit(state, item)
            if item.step_closed:
                continue
            if item.error is not None:
                raise item.error
            assert item.result is not None
            self.runs.touch(run.run_id)
            return item.result
        raise Unavailable(f"step {push.step} of run {run.run_id!r} is changing state; retry")

    def _submit(self, state: OpenStep, item: Pending) -> None:
        """Queue ``item``; lead the commit of the queue unless another thread already does."""
        with state.lock:
            if state.closed:
                item.step_closed = item.done = True
                return
            state.pending.append(item)
            lead = not state.committing
            state.committing = True
        if not lead:
            item.wake.wait()
            if item.done:
                return
            # Handed the lead: `committing` stayed set, the queue (this item first) is ours.
        with state.lock:
            batch, state.pending = state.pending, []
        try:
            self._commit(state, batch)
        except ServiceError as exc:
            for waiting in batch:
                if not waiting.done:
                    waiting.fail(exc)
        except BaseException as exc:
            for waiting in batch:
                if not waiting.done:
                    waiting.fail(Unavailable(f"internal error while merging: {exc!r}"))
            raise
        finally:
            for waiting in batch:
                waiting.wake.set()
            self._pass_lead(state)

    @staticmethod
    def _pass_lead(state: OpenStep) -> None:
        """End a commit: the first shard queued meanwhile leads the next, or nobody does."""
        with state.lock:
            if state.pending:
                state.pending[0].wake.set()
            else:
                state.committing = False

    def _commit(self, state: OpenStep, batch: list[Pending]) -> None:
        """Merge and persist a queue of shards (called by the one leader of the step)."""
        if state.closed:
            for item in batch:
                item.step_closed = item.done = True
            return
        round1 = [i for i in batch if i.push.round == ROUND_1]
        round2 = [i for i in batch if i.push.round == ROUND_2]
        if round1:
            self._commit_round1(state, round1)
        if round2 and not state.closed:
            self._commit_round2(state, round2)
        for item in batch:
            if not item.done:  # the step closed under round 1 (no class means possible)
                item.step_closed = item.done = True

    def _step_for(
        self, run: RunRecord, shard: ShardRecord
    ) -> tuple[OpenStep | None, PushResult | None]:
        """The open step a shard merges into, or the answer when the step is closed."""
        key = (run.run_id, shard.step)
        with self._lock:
            state = self._open.get(key)
            if state is not None:
                if shard.round == ROUND_2 and not state.round1_complete:
                    raise FailedPrecondition(
                        f"round 2 of step {shard.step} of run {run.run_id!r} before round 1 is "
                        f"complete ({len(state.r1_shards)} of {run.world_size} round-1 shards "
                        f"in, missing ranks {state.missing(state.r1_shards)}); retry later"
                    )
                return state, None
        closed = self._store.step_status(run.run_id, shard.step)
        if closed is not None:
            if closed.status == "incomplete":
                raise FailedPrecondition(
                    f"step {shard.step} of run {run.run_id!r} was marked incomplete "
                    f"({closed.reason}); its shards are no longer accepted"
                )
            previous = self._store.shard(run.run_id, shard.step, shard.rank, shard.round)
            if previous is None:
                raise FailedPrecondition(
                    f"step {shard.step} of run {run.run_id!r} is already finalized"
                )
            return None, self._repeat(previous, shard)
        if shard.round == ROUND_2:
            raise FailedPrecondition(
                f"round 2 of step {shard.step} of run {run.run_id!r} before round 1 is complete "
                f"(0 of {run.world_size} round-1 shards in); retry later"
            )
        with self._lock:
            state = self._open.get(key)
            if state is None:
                if self._shutting_down:
                    raise Unavailable("server is shutting down; retry against its successor")
                if len(self._open) >= self.limits.max_open_steps:
                    raise ResourceExhausted(
                        f"cannot open step {shard.step} of run {run.run_id!r}: "
                        f"{len(self._open)} steps are open, the limit (--max-open-steps)"
                    )
                of_run = sum(1 for open_key in self._open if open_key[0] == run.run_id)
                if of_run >= self.limits.max_open_steps_per_run:
                    raise ResourceExhausted(
                        f"cannot open step {shard.step} of run {run.run_id!r}: the run has "
                        f"{of_run} steps open, its limit (--max-open-steps-per-run); they "
                        "close when every rank's shards arrive or at the step deadline"
                    )
                state = OpenStep(run, shard.step, time.time(), self._clock())
                self._open[key] = state
            return state, None

    def _start_prepare(self, state: OpenStep) -> None:
        """Start the round-1 part of the step's finalize (round 1 complete, W known)."""
        if state.r1 is not None and state.weight is not None:
            state.prepared = self._prepare_pool.submit(
                prepare_finalize, state.r1, state.weight, state.bias
            )

    def _close(self, state: OpenStep) -> None:
        """Caller leads the step's commits (or holds its lock)."""
        state.closed = True
        with self._lock:
            self._open.pop((state.run.run_id, state.step), None)
            self._bump()

    def _bump(self) -> None:
        """Wake every waiter. Caller holds ``self._lock``."""
        self._event_seq += 1
        self._changed.notify_all()

    # -- deadlines ---------------------------------------------------------------------------

    def expire_overdue(self) -> int:
        """Mark every step open longer than the step deadline incomplete; return how many."""
        now = self._clock()
        with self._lock:
            overdue = [
                s
                for s in self._open.values()
                if now - s.opened_monotonic > self.limits.step_deadline_s
            ]
        expired = 0
        for state in overdue:
            with state.lock:
                # A commit in progress is left alone; the next pass looks again.
                if state.closed or state.committing:
                    continue
                state.committing = True
            try:
                run = state.run
                if not state.round1_complete:
                    missing = f"round 1 missing ranks {state.missing(state.r1_shards)}"
                else:
                    missing = f"round 2 missing ranks {state.missing(state.r2_shards)}"
                reason = (
                    f"step deadline of {self.limits.step_deadline_s:g}s passed with {missing} "
                    f"of world_size {run.world_size}"
                )
                if self._close_incomplete(state, reason) is not None:
                    expired += 1
            finally:
                self._pass_lead(state)
        return expired

    # -- class means -------------------------------------------------------------------------

    def class_means(
        self, run_id: str, step: int, rank: int, wait_s: float, is_active: Callable[[], bool]
    ) -> ClassMeans:
        """The global class means of a step, waiting up to ``wait_s`` for round 1 to complete."""
        run = self.run(run_id)
        if step < 0:
            raise InvalidArgument(f"step must be >= 0, got step={step}")
        if not 0 <= rank < run.world_size:
            raise InvalidArgument(
                f"rank={rank} is outside [0, {run.world_size}) for run {run_id!r}"
            )
        deadline = self._clock() + wait_s
        while True:
            with self._lock:
                seq = self._event_seq
                if self._shutting_down:
                    raise Unavailable("server is shutting down; retry against its successor")
                state = self._open.get((run_id, step))
                if state is not None and state.means is not None:
                    return state.means
            if state is None:
                closed = self._store.step_status(run_id, step)
                if closed is not None and closed.status == "incomplete":
                    raise FailedPrecondition(
                        f"step {step} of run {run_id!r} was marked incomplete ({closed.reason})"
                    )
                if closed is not None:
                    raise FailedPrecondition(
                        f"step {step} of run {run_id!r} is already finalized; its class means "
                        "are no longer held"
                    )
            remaining = deadline - self._clock()
            if remaining <= 0:
                have = 0 if state is None else len(state.r1_shards)
                raise DeadlineExceeded(
                    f"round 1 of step {step} of run {run_id!r} is not complete "
                    f"({have} of {run.world_size} shards in)"
                )
            if not is_active():
                raise Unavailable("call cancelled")
            with self._lock:
                # Waits only if nothing changed since the checks above (no lost wake-up).
                self._changed.wait_for(partial(self._changed_since, seq), min(remaining, 1.0))

    def _changed_since(self, seq: int) -> bool:
        return self._event_seq != seq

    # -- watchers ----------------------------------------------------------------------------

    def wait_for_change(self, seq: int, timeout_s: float) -> int:
        """Block until something is finalized or closed after ``seq`` (or timeout)."""
        with self._lock:
            self._changed.wait_for(lambda: self._event_seq != seq or self._shutting_down, timeout_s)
            return self._event_seq

    @property
    def event_seq(self) -> int:
        with self._lock:
            return self._event_seq

    @property
    def shutting_down(self) -> bool:
        with self._lock:
            return self._shutting_down

    def begin_shutdown(self) -> None:
        with self._lock:
            self._shutting_down = True
            self._bump()
