"""Reading a store file directly (``--db``): the same answers as the service's ListRuns and
GetMetrics, with no server running. Read-only and safe beside a server writing the file."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ncserve.client.types import measurement_to_dict, run_to_dict
from ncserve.errors import UserError
from ncserve.service.servicer import measurement, run_info
from ncserve.service.shards import RunView
from ncserve.service.store import Store, StoreError


class StoreReader:
    """``list_runs`` and ``get_metrics`` of NCClient, answered from a database file."""

    def __init__(self, path: Path) -> None:
        try:
            self._store = Store(path, read_only=True)
        except StoreError as error:
            raise UserError(f"--db: {error}") from None
        self.path = path

    def close(self) -> None:
        self._store.close()

    def list_runs(self, states: Iterable[str] = ()) -> list[dict[str, Any]]:
        wanted = set(states)
        runs = [r for r in self._store.runs() if not wanted or r.state in wanted]
        counts = self._store.run_counts([r.run_id for r in runs])
        open_steps = self._store.open_step_counts()
        return [
            run_to_dict(run_info(RunView(r, counts[r.run_id], open_steps.get(r.run_id, 0))))
            for r in runs
        ]

    def get_metrics(
        self,
        run_id: str,
        step: int | None = None,
        all_steps: bool = False,
        *,
        include_incomplete: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        known = [r.run_id for r in self._store.runs()]
        if run_id not in known:
            shown = ", ".join(known[:5]) + (", ..." if len(known) > 5 else "")
            raise UserError(f"no run {run_id!r} in {self.path} (runs: {shown or 'none'})")
        if all_steps:
            records = self._store.measurements(run_id, include_incomplete=include_incomplete)
            return [measurement_to_dict(measurement(r)) for r in records]
        if step is not None:
            records = self._store.measurements(run_id, step, step, include_incomplete)
            if not records:
                raise UserError(f"run {run_id!r} has no measurement at step {step}")
            return measurement_to_dict(measurement(records[0]))
        latest = self._store.latest_measurement(run_id)
        if latest is None:
            raise UserError(f"run {run_id!r} has no finalized measurement yet")
        return measurement_to_dict(measurement(latest))
