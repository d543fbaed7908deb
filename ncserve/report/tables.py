"""What the report tabulates (pure: records in, numbers out).

- ``final_rows``: the paper's Table 2 per run — final nc0..nc3 and each one's change
  relative to initialization (final / value at step 0).
- ``optimizer_summary``: the same per optimizer, medians over its runs.
- ``momentum_wd_grids``: final nc0 over momentum x weight decay, per optimizer, with the
  exact prediction for sgd/sgdw.
- ``spearman``: the rank correlation of the nc0-nc3 plot.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ncserve.report.runs import RunRecord, nc0_prediction
from ncserve.theory import OPTIMIZER_NAMES

TABLE_METRICS: tuple[str, ...] = ("nc0", "nc1", "nc2", "nc3")


@dataclass(frozen=True)
class MetricCell:
    """A final value and its change relative to initialization (final / initial)."""

    final: float | None
    ratio: float | None


@dataclass(frozen=True)
class FinalRow:
    name: str
    label: str
    lr: float | None
    momentum: float | None
    weight_decay: float | None
    coupled_fraction: float | None
    epoch: int | None
    train_acc: float | None
    holdout_acc: float | None
    cells: dict[str, MetricCell]
    predicted_nc0: float | None  # the exact theory at the last step (sgd/sgdw only)


@dataclass(frozen=True)
class SummaryRow:
    label: str
    runs: int
    train_acc: float | None
    cells: dict[str, MetricCell]  # medians over the runs


@dataclass(frozen=True)
class HeatmapGrid:
    """Median final nc0 per (momentum, weight decay) cell of one optimizer's runs."""

    label: str
    momenta: list[float]
    weight_decays: list[float]
    measured: np.ndarray  # momenta x weight_decays, NaN where no run
    predicted: np.ndarray | None  # the same cells from the exact recursion (sgd/sgdw)


def label_sort_key(label: str) -> tuple[int, str]:
    base = label.split(" ")[0]
    # The study's order: each coupled optimizer next to its decoupled twin.
    rank = OPTIMIZER_NAMES.index(base) if base in OPTIMIZER_NAMES else len(OPTIMIZER_NAMES)
    return rank, label


def ordered_labels(records: list[RunRecord]) -> list[str]:
    return sorted({r.label for r in records}, key=label_sort_key)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _cell(record: RunRecord, key: str) -> MetricCell:
    final, initial = record.last.get(key), record.first.get(key)
    if not _finite(final):
        return MetricCell(None, None)
    assert isinstance(final, int | float)
    ratio = None
    if _finite(initial) and initial != 0:
        assert isinstance(initial, int | float)
        ratio = float(final) / float(initial)
    return MetricCell(float(final), ratio)


def final_rows(records: list[RunRecord]) -> list[FinalRow]:
    """One row per run, grouped by optimizer in the study's order."""
    rows = []
    for record in records:
        prediction = nc0_prediction(record)
        last_step = int(record.last["step"])
        rows.append(
            FinalRow(
                name=record.name,
                label=record.label,
                lr=record.lr,
                momentum=record.momentum,
                weight_decay=record.weight_decay,
                coupled_fraction=record.coupled_fraction,
                epoch=record.last.get("epoch"),
                train_acc=_number(record.last.get("train_acc")),
                holdout_acc=_number(record.last.get("holdout_acc")),
                cells={key: _cell(record, key) for key in TABLE_METRICS},
                predicted_nc0=prediction.at(last_step) if prediction is not None else None,
            )
        )
    return sorted(rows, key=lambda row: (label_sort_key(row.label), row.name))


def _number(value: object) -> float | None:
    return float(value) if _finite(value) else None  # type: ignore[arg-type]


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.median(present)) if present else None


def optimizer_summary(rows: list[FinalRow]) -> list[SummaryRow]:
    """Medians per optimizer label over its runs (final values and per-run ratios)."""
    groups: dict[str, list[FinalRow]] = defaultdict(list)
    for row in rows:
        groups[row.label].append(row)
    summary = []
    for label in sorted(groups, key=label_sort_key):
        members = groups[label]
        cells = {
            key: MetricCell(
                _median([m.cells[key].final for m in members]),
                _median([m.cells[key].ratio for m in members]),
            )
            for key in TABLE_METRICS
        }
        summary.append(
            SummaryRow(label, len(members), _median([m.train_acc for m in members]), cells)
        )
    return summary


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None below 3 points or when
    one side is constant."""
    if len(x) < 3:
        return None
    rx, ry = _ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64))
    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def momentum_wd_grids(records: list[RunRecord]) -> list[HeatmapGrid]:
    """One grid per optimizer whose runs span at least two momenta and two weight decays."""
    by_label: dict[str, list[RunRecord]] = defaultdict(list)
    for record in records:
        if record.momentum is not None and record.weight_decay is not None:
            by_label[record.label].append(record)
    grids = []
    for label in sorted(by_label, key=label_sort_key):
        members = by_label[label]
        momenta = sorted({r.momentum for r in members if r.momentum is not None})
        decays = sorted({r.weight_decay for r in members if r.weight_decay is not None})
        if len(momenta) < 2 or len(decays) < 2:
            continue
        measured: dict[tuple[int, int], list[float]] = defaultdict(list)
        predicted: dict[tuple[int, int], list[float]] = defaultdict(list)
        for record in members:
            assert record.momentum is not None and record.weight_decay is not None
            cell = (momenta.index(record.momentum), decays.index(record.weight_decay))
            final = record.last.get("nc0")
            if _finite(final):
                measured[cell].append(float(final))  # type: ignore[arg-type]
            prediction = nc0_prediction(record)
            if prediction is not None:
                predicted[cell].append(prediction.at(int(record.last["step"])))
        grids.append(
            HeatmapGrid(
                label=label,
                momenta=momenta,
                weight_decays=decays,
                measured=_grid(measured, len(momenta), len(decays)),
                predicted=_grid(predicted, len(momenta), len(decays)) if predicted else None,
            )
        )
    return grids


def _grid(cells: dict[tuple[int, int], list[float]], rows: int, cols: int) -> np.ndarray:
    grid = np.full((rows, cols), np.nan)
    for (i, j), values in cells.items():
        grid[i, j] = float(np.median(values))
    return grid


def format_value(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    return f"{value:.2e}"


def format_ratio(ratio: float | None) -> str:
    """The change relative to initialization, as a factor: ×0.0012, ×35."""
    if ratio is None or not math.isfinite(ratio):
        return ""
    if 1e-2 <= abs(ratio) < 1e3:
        return f"×{ratio:.3g}"
    return f"×{ratio:.1e}"
