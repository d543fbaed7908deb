"""Runs read from the ncserve service (or its database file) as the report's RunRecords.

Sweep points may train on machines that share no filesystem, only the service. What a run
directory holds comes from the service instead: the settings from the run's metadata
(nclaunch sends the report's settings under their dotted config paths, see
``ncserve.report.settings``) and the rows from its complete measurements, with the keys a
``metrics.jsonl`` row has. Two keys of ``metrics.jsonl`` are never sent to the service and
are absent here: ``epoch_time_s`` and ``measure_time_s`` (the report draws neither), and
``wall_time`` is when the service finalized the measurement.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from ncserve.metrics import METRIC_KEYS
from ncserve.report.runs import RunInputError, RunRecord
from ncserve.report.settings import SWEEP_METADATA_KEY, config_from_metadata

# Measurement keys copied as they are, after the metric keys.
_COUNT_KEYS = ("num_samples", "num_classes", "feature_dim", "holdout_nc4")


class RunSource(Protocol):
    """Where runs come from: an ncserve.client.NCClient or a --db StoreReader."""

    def list_runs(self, states: Iterable[str] = ()) -> list[dict[str, Any]]: ...

    def get_metrics(
        self,
        run_id: str,
        step: int | None = None,
        all_steps: bool = False,
        *,
        include_incomplete: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]]: ...


def measurement_row(run: Mapping[str, Any], measurement: Mapping[str, Any]) -> dict[str, Any]:
    """A complete measurement of ``run`` (ListRuns / GetMetrics dicts) as a metrics.jsonl row."""
    scalars = measurement.get("scalars", {})
    row: dict[str, Any] = {
        "run_id": measurement["run_id"],
        "step": measurement["step"],
        "epoch": measurement.get("epoch"),
        "lr": scalars.get("lr"),
        "world_size": _training_world_size(run),
        "train_loss": scalars.get("train_loss"),
        # Training tallies summed by the service arrive as train_accuracy.
        "train_acc": scalars.get("train_acc", scalars.get("train_accuracy")),
    }
    if measurement.get("holdout_accuracy") is not None:
        row["holdout_acc"] = measurement["holdout_accuracy"]
    row["wall_time"] = measurement.get("finalized_unix")
    row |= {k: measurement[k] for k in (*METRIC_KEYS, *_COUNT_KEYS) if k in measurement}
    return row


def _training_world_size(run: Mapping[str, Any]) -> int:
    # The service's world size counts shards (one per node by default); nclaunch sends the
    # number of training ranks as metadata.
    try:
        return int(run["metadata"]["world_size"])
    except (KeyError, ValueError):
        return int(run["world_size"])


def sweep_ids(runs: Iterable[Mapping[str, Any]]) -> list[str]:
    """The sweep ids the runs carry, sorted."""
    return sorted(
        {r["metadata"][SWEEP_METADATA_KEY] for r in runs if SWEEP_METADATA_KEY in r["metadata"]}
    )


def load_service_runs(source: RunSource, where: str, sweep: str | None = None) -> list[RunRecord]:
    """Every run ``source`` holds (those of ``sweep`` only, when given) with at least one
    complete measurement, oldest first; ``where`` names the source in errors."""
    runs = source.list_runs()
    if sweep is not None:
        chosen = [r for r in runs if r["metadata"].get(SWEEP_METADATA_KEY) == sweep]
        if not chosen:
            known = sweep_ids(runs)
            raise RunInputError(
                f"--sweep {sweep!r}: {where} holds no run of that sweep (known sweeps: "
                f"{', '.join(known) if known else 'none, no run there names its sweep'})"
            )
    elif not runs:
        raise RunInputError(f"{where} holds no runs")
    else:
        chosen = runs
    records: list[RunRecord] = []
    for run in chosen:
        if not run["num_measurements"]:
            continue
        found = source.get_metrics(run["run_id"], all_steps=True)
        measurements = found if isinstance(found, list) else [found]
        rows = [measurement_row(run, m) for m in measurements if m["status"] == "complete"]
        if rows:
            config = config_from_metadata(run["metadata"])
            records.append(RunRecord(name=run["run_id"], path=None, config=config, rows=rows))
    if not records:
        what = (
            f"the {len(chosen)} run(s) of sweep {sweep!r}" if sweep else f"the {len(chosen)} run(s)"
        )
        raise RunInputError(f"{where}: {what} hold no complete measurements yet")
    return records
