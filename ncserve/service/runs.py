"""The runs a service holds and their life: registration, limits, activity, ending,
abandonment, retention and deletion, and paged listing.

A run is ``running`` from registration until ``FinishRun`` says ``finished`` or ``failed``,
or until nothing (shard, scalars, heartbeat) arrives for ``abandon_after_s``, when it is
``abandoned``; activity brings an abandoned run back to ``running`` (abandonment is the
service's guess, an end is the trainer's word). Ended runs keep accepting the shards and
scalars a spool replays, so nothing measured is lost.

Activity is kept in memory for the abandon timeout; the store records it in the same
transaction as what was accepted (shards, scalars), a heartbeat on its own, so a restart
knows it and a rejected request changes nothing stored.

This module knows nothing of gRPC: it raises ``ncserve.service.errors``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ncserve.protocol import (
    DEFAULT_PAGE_SIZE,
    MAX_METADATA_ENTRIES,
    MAX_METADATA_KEY,
    MAX_METADATA_VALUE,
    MAX_PAGE_SIZE,
    MAX_REASON_CHARS,
    RUN_ABANDONED,
    RUN_END_STATES,
    RUN_FAILED,
    RUN_ID_PATTERN,
    RUN_ID_RULE,
    RUN_RUNNING,
    RUN_STATES,
)
from ncserve.service.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from ncserve.service.records import RunRecord
from ncserve.service.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AggregatorLimits:
    """Bounds on what clients can make the server hold, and how long runs are kept."""

    max_runs: int = 1000
    max_open_steps: int = 256
    # One run may hold at most this many of them (a run's ranks keep one or two open).
    max_open_steps_per_run: int = 16
    max_world_size: int = 200
    # The largest push payload the server reads; a run whose pushes cannot fit is refused.
    max_shard_bytes: int = 2 << 30
    step_deadline_s: float = 900.0
    # A running run with no activity for this long is marked abandoned.
    abandon_after_s: float = 3600.0
    # Ended runs (finished, failed, abandoned) are deleted this long after they ended;
    # None keeps them.
    retention_s: float | None = None


@dataclass(frozen=True)
class PagePosition:
    """Where a ListRuns page token continues: after this run, with this filter."""

    created_unix: float
    run_id: str
    states: tuple[str, ...]

    def token(self) -> str:
        raw = json.dumps([self.created_unix, self.run_id, list(self.states)])
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def parse(cls, token: str, states: tuple[str, ...]) -> PagePosition:
        try:
            padded = token + "=" * (-len(token) % 4)
            created, run_id, token_states = json.loads(base64.urlsafe_b64decode(padded))
            position = cls(float(created), str(run_id), tuple(str(s) for s in token_states))
        except (ValueError, TypeError, binascii.Error) as exc:
            raise InvalidArgument(
                f"page_token={token[:64]!r} is not a token this server issued"
            ) from exc
        if position.states != states:
            raise InvalidArgument(
                f"page_token was issued for states={list(position.states)}, not "
                f"states={list(states)}: keep the filter while paging"
            )
        return position


def _shown_id(run_id: str) -> str:
    """A run id as an error message shows it: a long one is cut (messages stay small)."""
    if len(run_id) <= 80:
        return repr(run_id)
    return f"{run_id[:64]!r}... ({len(run_id)} characters)"


def check_run_id(run_id: str) -> None:
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise InvalidArgument(f"run_id={_shown_id(run_id)} is not valid: {RUN_ID_RULE}")


def _joined_reasons(first: str, then: str) -> str:
    """Two reasons of one end in at most MAX_REASON_CHARS characters (the first cut)."""
    if not first:
        return then
    room = MAX_REASON_CHARS - len(then) - 2
    if len(first) > room:
        first = first[: max(0, room - 3)] + "..."
    return f"{first}; {then}"[:MAX_REASON_CHARS]


def check_metadata(metadata: Mapping[str, str]) -> None:
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(
            f"metadata has {len(metadata)} entries; at most {MAX_METADATA_ENTRIES} allowed"
        )
    for key, value in metadata.items():
        if not 1 <= len(key) <= MAX_METADATA_KEY:
            raise InvalidArgument(
                f"metadata key {key[:MAX_METADATA_KEY]!r} must have 1-{MAX_METADATA_KEY} characters"
            )
        if len(value) > MAX_METADATA_VALUE:
            raise InvalidArgument(
                f"metadata[{key!r}] has {len(value)} characters; at most "
                f"{MAX_METADATA_VALUE} allowed"
            )


class RunRegistry:
    """Every run of the service, in memory and in the store; thread-safe."""

    def __init__(
        self,
        store: Store,
        limits: AggregatorLimits,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.limits = limits
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._runs: dict[str, RunRecord] = {run.run_id: run for run in store.runs()}
        # Bumped whenever something the exporter shows changes (state, runs, measurements).
        self._version = 0

    # -- reading ---------------------------------------------------------------------------

    def get(self, run_id: str) -> RunRecord:
        with self._lock:
            return self._get_locked(run_id)

    def _get_locked(self, run_id: str) -> RunRecord:
        run = self._runs.get(run_id)
        if run is None:
            raise NotFound(f"unknown run_id={_shown_id(run_id)}: no run with this id is registered")
        return run

    def all(self) -> list[RunRecord]:
        with self._lock:
            return sorted(self._runs.values(), key=lambda r: (r.created_unix, r.run_id))

    def count_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(RUN_STATES, 0)
        with self._lock:
            for run in self._runs.values():
                counts[run.state] += 1
        return counts

    @property
    def version(self) -> int:
        with self._lock:
            return self._version

    def changed(self) -> None:
        """Something the exporter shows changed (a measurement, scalars)."""
        with self._lock:
            self._version += 1

    def page(
        self, page_size: int, page_token: str, states: Sequence[str]
    ) -> tuple[list[RunRecord], bool]:
        """Up to ``page_size`` runs (oldest first) after the token's position, and whether
        more follow. ``page_size`` 0 is the default; more than the maximum is lowered to it."""
        for state in states:
            if state not in RUN_STATES:
                raise InvalidArgument(f"states has {state!r}; allowed: {', '.join(RUN_STATES)}")
        if page_size < 0:
            raise InvalidArgument(f"page_size must be >= 0, got {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        wanted = tuple(sorted(set(states)))
        selected = [r for r in self.all() if not wanted or r.state in wanted]
        if page_token:
            position = PagePosition.parse(page_token, wanted)
            after = (position.created_unix, position.run_id)
            selected = [r for r in selected if (r.created_unix, r.run_id) > after]
        return selected[:size], len(selected) > size

    @staticmethod
    def next_token(last: RunRecord, states: Sequence[str]) -> str:
        return PagePosition(last.created_unix, last.run_id, tuple(sorted(set(states)))).token()

    # -- registration ----------------------------------------------------------------------

    def register(
        self,
        run_id: str,
        num_classes: int,
        feature_dim: int,
        world_size: int,
        metadata: Mapping[str, str],
    ) -> tuple[bool, RunRecord]:
        check_run_id(run_id)
        if num_classes < 2:
            raise InvalidArgument(f"num_classes must be >= 2, got {num_classes}")
        if feature_dim < 1:
            raise InvalidArgument(f"feature_dim must be >= 1, got {feature_dim}")
        if world_size < 1:
            raise InvalidArgument(f"world_size must be >= 1, got {world_size}")
        if world_size > self.limits.max_world_size:
            raise ResourceExhausted(
                f"world_size={world_size} exceeds this server's limit of "
                f"{self.limits.max_world_size} ranks per run (each waiting rank holds a "
                "worker thread; raise --max-workers)"
            )
        check_metadata(metadata)
        now = self._wall_clock()
        with self._lock:
            existing = self._runs.get(run_id)
            if existing is not None:
                got = (num_classes, feature_dim, world_size)
                have = (existing.num_classes, existing.feature_dim, existing.world_size)
                if got != have:
                    raise AlreadyExists(
                        f"run {run_id!r} exists with num_classes={have[0]}, feature_dim="
                        f"{have[1]}, world_size={have[2]}; got num_classes={got[0]}, "
                        f"feature_dim={got[1]}, world_size={got[2]}"
                    )
                if existing.state in (RUN_FAILED, RUN_ABANDONED):
                    # The trainer came back (--resume, an elastic restart): running again.
                    existing = self._revive_locked(existing, now)
                self._touch_locked(existing, now)
                existing = self._runs[run_id]
                added = {k: v for k, v in metadata.items() if k not in existing.metadata}
                if not added:
                    return False, existing
                merged = {**existing.metadata, **added}
                self._store.update_run_metadata(run_id, merged)
                updated = dataclasses.replace(existing, metadata=merged)
                self._runs[run_id] = updated
                self._version += 1
                return False, updated
            # A round-1 push carries the class sums and W (K x P each); a round-2 push a
            # min(K, P)-square scatter: a run none of whose pushes could fit is refused now.
            largest = max(
                16 * num_classes * (feature_dim + 1), 8 * min(num_classes, feature_dim) ** 2
            )
            if largest > self.limits.max_shard_bytes:
                raise ResourceExhausted(
                    f"num_classes={num_classes} x feature_dim={feature_dim} needs pushes of "
                    f"{largest} bytes; this server reads at most {self.limits.max_shard_bytes} "
                    "(--max-shard-bytes)"
                )
            if len(self._runs) >= self.limits.max_runs:
                raise ResourceExhausted(
                    f"cannot register run {run_id!r}: this server holds its limit of "
                    f"{self.limits.max_runs} runs (--max-runs; delete ended runs with "
                    "`ncserve delete RUN` or set --retention)"
                )
            run = RunRecord(
                run_id,
                num_classes,
                feature_dim,
                world_size,
                dict(metadata),
                now,
                last_activity_unix=now,
            )
            self._store.insert_run(run)
            self._runs[run_id] = run
            self._version += 1
        return True, run

    # -- life ------------------------------------------------------------------------------

    def touch(self, run_id: str, *, store: bool = False) -> RunRecord:
        """The run was heard from: a shard or scalars (whose transaction stored the time),
        or a heartbeat (``store=True``: stored here)."""
        now = self._wall_clock()
        with self._lock:
            run = self._get_locked(run_id)
            run = self._touch_locked(run, now)
            if store:
                self._store.touch_run(run_id, now)
            return run

    def _revive_locked(self, run: RunRecord, now: float) -> RunRecord:
        log.info("run %r is running again (it was %s)", run.run_id, run.state)
        run = dataclasses.replace(
            run, state=RUN_RUNNING, state_reason="", ended_unix=None, last_activity_unix=now
        )
        self._set_state_locked(run)
        return run

    def _set_state_locked(self, run: RunRecord) -> None:
        """A run's new state, in the store and in memory; the exporter's view changed."""
        self._store.set_run_state(run)
        self._runs[run.run_id] = run
        self._version += 1

    def _touch_locked(self, run: RunRecord, now: float) -> RunRecord:
        if run.state == RUN_ABANDONED:
            run = self._revive_locked(run, now)
        elif now > run.last_activity_unix:
            run = dataclasses.replace(run, last_activity_unix=now)
        self._runs[run.run_id] = run
        return run

    def finish(self, run_id: str, state: str, reason: str) -> RunRecord:
        if state not in RUN_END_STATES:
            raise InvalidArgument(
                f"state={state!r} cannot end a run; allowed: {', '.join(RUN_END_STATES)}"
            )
        if len(reason) > MAX_REASON_CHARS:
            raise InvalidArgument(
                f"reason has {len(reason)} characters; at most {MAX_REASON_CHARS} allowed"
            )
        now = self._wall_clock()
        with self._lock:
            run = self._get_locked(run_id)
            if run.state == state:
                if not reason or reason in run.state_reason:
                    return run
                # Several witnesses of one end (rank 0 and the launcher, say): every reason
                # is kept, the first end time too.
                run = dataclasses.replace(
                    run, state_reason=_joined_reasons(run.state_reason, reason)
                )
                self._store.set_run_state(run)
                self._runs[run_id] = run
                return run
            if run.state in RUN_END_STATES:
                raise FailedPrecondition(
                    f"run {run_id!r} already ended as {run.state}; it cannot become {state}"
                )
            run = dataclasses.replace(
                run,
                state=state,
                state_reason=reason,
                ended_unix=now,
                last_activity_unix=max(now, run.last_activity_unix),
            )
            self._set_state_locked(run)
        log.info("run %r %s%s", run_id, state, f": {reason}" if reason else "")
        return run

    def remove(self, run_id: str) -> tuple[int, int]:
        """Delete a run from the store and from memory; (measurements, scalar steps)."""
        self.get(run_id)
        removed = self._store.delete_run(run_id)
        with self._lock:
            self._runs.pop(run_id, None)
            self._version += 1
        log.info("run %r deleted (%d measurements)", run_id, removed[0])
        return removed

    def sweep(self) -> tuple[list[str], list[str]]:
        """Abandon silent runs, and list the ended runs past retention (the caller deletes
        them, with their open steps). Returns (abandoned, expired) run ids."""
        now = self._wall_clock()
        abandoned: list[str] = []
        limit = self.limits.abandon_after_s
        with self._lock:
            silent = [
                r for r in self._runs.values() if r.live and now - r.last_activity_unix > limit
            ]
            for run in silent:
                ended = dataclasses.replace(
                    run,
                    state=RUN_ABANDONED,
                    state_reason=f"no shard, scalars or heartbeat for {limit:g}s",
                    ended_unix=now,
                )
                self._set_state_locked(ended)
                abandoned.append(run.run_id)
            retention = self.limits.retention_s
            expired = (
                []
                if retention is None
                else [
                    r.run_id
                    for r in self._runs.values()
                    if r.ended_unix is not None and now - r.ended_unix > retention
                ]
            )
        for run_id in abandoned:
            log.warning("run %r abandoned: nothing arrived for %gs", run_id, limit)
        return abandoned, expired
