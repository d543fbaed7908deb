"""Reading what the service stored: measurements, the watch backlog, scalars (and recording
scalars, which touch no open step). Mixed into the Aggregator, which owns the store."""

from __future__ import annotations

import math
from collections.abc import Mapping

from ncserve.protocol import MAX_SCALARS, SCALAR_KEY_PATTERN
from ncserve.service.errors import InvalidArgument, NotFound
from ncserve.service.records import MeasurementRecord, ScalarRecord
from ncserve.service.runs import RunRegistry
from ncserve.service.store import Store

# Steps are SQLite INTEGERs (int64).
_MAX_STEP = (1 << 63) - 1


class RunQueries:
    """Queries over the store for runs of ``runs``."""

    _store: Store
    runs: RunRegistry

    def measurements(
        self,
        run_id: str,
        step: int | None = None,
        first: int | None = None,
        last: int | None = None,
        latest: bool = False,
        include_incomplete: bool = False,
    ) -> list[MeasurementRecord]:
        self.runs.get(run_id)
        if latest:
            record = self._store.latest_measurement(run_id)
            if record is None:
                raise NotFound(f"run {run_id!r} has no finalized measurement yet")
            return [record]
        if step is not None:
            found = self._store.measurements(run_id, step, step, include_incomplete)
            if not found:
                raise NotFound(f"run {run_id!r} has no measurement at step={step}")
            return found
        if first is not None and last is not None and first > last:
            raise InvalidArgument(f"range first={first} is after last={last}")
        return self._store.measurements(run_id, first, last, include_incomplete)

    def watch_backlog(
        self, run_id: str, after_step: int | None, include_incomplete: bool
    ) -> tuple[list[MeasurementRecord], int]:
        """Stored measurements a new watcher replays, and the row id to stream after."""
        self.runs.get(run_id)
        upto = self._store.max_measurement_id()
        if after_step is None or after_step >= _MAX_STEP:
            return [], upto
        backlog = self._store.measurements(
            run_id, first=after_step + 1, include_incomplete=include_incomplete, max_id=upto
        )
        return backlog, upto

    def measurements_after(
        self, run_id: str, after_id: int, include_incomplete: bool
    ) -> list[MeasurementRecord]:
        return self._store.measurements(
            run_id, include_incomplete=include_incomplete, after_id=after_id, order_by="id"
        )

    def record_scalars(
        self, run_id: str, step: int, epoch: int | None, values: Mapping[str, float]
    ) -> int:
        run = self.runs.get(run_id)
        if step < 0:
            raise InvalidArgument(f"step must be >= 0, got step={step}")
        if epoch is not None and epoch < 0:
            raise InvalidArgument(f"epoch must be >= 0, got epoch={epoch}")
        if not values:
            raise InvalidArgument("values is empty; send at least one scalar")
        if len(values) > MAX_SCALARS:
            raise InvalidArgument(f"values has {len(values)} entries; at most {MAX_SCALARS}")
        for key, value in values.items():
            if not SCALAR_KEY_PATTERN.fullmatch(key):
                raise InvalidArgument(
                    f"values key {key!r} is not 1-64 characters of [A-Za-z0-9._-]"
                )
            if not math.isfinite(value):
                raise InvalidArgument(f"values[{key!r}]={value} is not finite")
        self._store.record_scalars(run_id, step, epoch, values)
        self.runs.touch(run.run_id)
        self.runs.changed()
        return len(values)

    def scalars(
        self, run_id: str, first: int | None, last: int | None, keys: list[str]
    ) -> list[ScalarRecord]:
        self.runs.get(run_id)
        return self._store.scalars(run_id, first, last, keys)
