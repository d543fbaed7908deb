"""The store's reads of measurements and scalars (the writes and the connections are in
store.py). Mixed into Store; each read takes a pooled reader connection, so queries keep
working when writes cannot."""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from ncserve.service.records import MeasurementRecord, ScalarRecord


class StoreReads:
    """Reads of measurements and scalars (Store's)."""

    def _reader(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError  # Store's

    # -- measurements ------------------------------------------------------------------------

    _MEASUREMENT_COLUMNS = (
        "id, run_id, step, epoch, status, metrics_json, scalars_json, reason, finalized_unix"
    )

    @staticmethod
    def _measurement(row: Sequence[Any]) -> MeasurementRecord:
        return MeasurementRecord(
            id=row[0],
            run_id=row[1],
            step=row[2],
            epoch=row[3],
            status=row[4],
            metrics=None if row[5] is None else json.loads(row[5]),
            scalars=json.loads(row[6]),
            reason=row[7],
            finalized_unix=row[8],
        )

    def step_status(self, run_id: str, step: int) -> MeasurementRecord | None:
        with self._reader() as conn:
            row = conn.execute(
                f"SELECT {self._MEASUREMENT_COLUMNS} FROM measurements"
                " WHERE run_id = ? AND step = ?",
                (run_id, step),
            ).fetchone()
        return None if row is None else self._measurement(row)

    def measurements(
        self,
        run_id: str,
        first: int | None = None,
        last: int | None = None,
        include_incomplete: bool = False,
        after_id: int | None = None,
        max_id: int | None = None,
        order_by: str = "step",
    ) -> list[MeasurementRecord]:
        clauses = ["run_id = ?"]
        params: list[Any] = [run_id]
        for clause, value in (
            ("step >= ?", first),
            ("step <= ?", last),
            ("id > ?", after_id),
            ("id <= ?", max_id),
        ):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        if not include_incomplete:
            clauses.append("status = 'complete'")
        order = "step" if order_by == "step" else "id"
        with self._reader() as conn:
            rows = conn.execute(
                f"SELECT {self._MEASUREMENT_COLUMNS} FROM measurements"
                f" WHERE {' AND '.join(clauses)} ORDER BY {order}",
                params,
            ).fetchall()
        return [self._measurement(r) for r in rows]

    def latest_measurements(self, run_ids: Sequence[str]) -> dict[str, MeasurementRecord]:
        """The latest complete measurement of each run that has one (one query)."""
        if not run_ids:
            return {}
        marks = ", ".join("?" * len(run_ids))
        with self._reader() as conn:
            rows = conn.execute(
                f"SELECT {self._MEASUREMENT_COLUMNS} FROM measurements m"
                f" WHERE run_id IN ({marks}) AND status = 'complete' AND step = (SELECT"
                " MAX(step) FROM measurements WHERE run_id = m.run_id AND status = 'complete')",
                list(run_ids),
            ).fetchall()
        return {row[1]: self._measurement(row) for row in rows}

    def latest_measurement(self, run_id: str) -> MeasurementRecord | None:
        with self._reader() as conn:
            row = conn.execute(
                f"SELECT {self._MEASUREMENT_COLUMNS} FROM measurements"
                " WHERE run_id = ? AND status = 'complete' ORDER BY step DESC LIMIT 1",
                (run_id,),
            ).fetchone()
        return None if row is None else self._measurement(row)

    def max_measurement_id(self) -> int:
        with self._reader() as conn:
            row = conn.execute("SELECT MAX(id) FROM measurements").fetchone()
        return int(row[0] or 0)

    # -- scalars -----------------------------------------------------------------------------

    def scalars(
        self,
        run_id: str,
        first: int | None = None,
        last: int | None = None,
        keys: Iterable[str] = (),
    ) -> list[ScalarRecord]:
        clauses = ["run_id = ?"]
        params: list[Any] = [run_id]
        if first is not None:
            clauses.append("step >= ?")
            params.append(first)
        if last is not None:
            clauses.append("step <= ?")
            params.append(last)
        wanted = list(keys)
        if wanted:
            clauses.append(f"key IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
        with self._reader() as conn:
            rows = conn.execute(
                f"SELECT step, epoch, key, value FROM scalars WHERE {' AND '.join(clauses)}"
                " ORDER BY step, key",
                params,
            ).fetchall()
        records: dict[int, ScalarRecord] = {}
        for step, epoch, key, value in rows:
            record = records.setdefault(step, ScalarRecord(step, epoch, {}))
            record.values[key] = value
        return list(records.values())

    def latest_scalars(
        self, run_ids: Sequence[str], keys: Iterable[str]
    ) -> dict[str, dict[str, tuple[int, float]]]:
        """Per run, for each key, the (step, value) of its latest record (one query)."""
        wanted = list(keys)
        if not wanted or not run_ids:
            return {}
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT run_id, key, step, value FROM scalars s WHERE run_id IN"
                f" ({', '.join('?' * len(run_ids))}) AND key IN ({', '.join('?' * len(wanted))})"
                " AND step = (SELECT MAX(step) FROM scalars WHERE run_id = s.run_id"
                " AND key = s.key)",
                [*run_ids, *wanted],
            ).fetchall()
        latest: dict[str, dict[str, tuple[int, float]]] = {}
        for run_id, key, step, value in rows:
            if math.isfinite(value):
                latest.setdefault(run_id, {})[key] = (step, value)
        return latest
