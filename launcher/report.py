"""What a person sees: the live progress bar, the end-of-run table and report.png."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ncserve.metrics import METRIC_KEYS

# The NC metrics drawn on a log scale (accuracy and NC4 go to 1, not 0: linear panel).
LOG_METRICS: tuple[str, ...] = tuple(k for k in METRIC_KEYS if k not in ("nc4", "accuracy"))
SUMMARY_METRICS: tuple[str, ...] = (
    "train_loss",
    "train_acc",
    "holdout_acc",
    "holdout_nc4",
    *METRIC_KEYS,
)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def make_console() -> Console:
    """A console whose lines do not wrap at 80 columns when stdout is a pipe or a file (a CI
    log, ``| tee``): long lines stay whole there, and tables get room."""
    if sys.stdout.isatty():
        return Console(soft_wrap=True)
    return Console(soft_wrap=True, width=160)


class TrainingProgress:
    """Rank 0's progress bar: epoch, step, running loss and accuracy, latest nc0 and nc1.

    When stdout is not a terminal (a CI log, a pipe) it prints one line per
    measurement instead of redrawing a bar.
    """

    def __init__(
        self, epochs: int, steps_per_epoch: int, *, enabled: bool, start_epoch: int = 0
    ) -> None:
        self.enabled = enabled
        self.epochs = epochs
        self.console = make_console()
        self.live = enabled and self.console.is_terminal
        self._fields: dict[str, Any] = {"loss": "-", "acc": "-", "nc0": "-", "nc1": "-"}
        self._progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]}  acc {task.fields[acc]}  "
                "nc0 {task.fields[nc0]}  nc1 {task.fields[nc1]}"
            ),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.live,
        )
        self._task: TaskID | None = None
        self._total = epochs * steps_per_epoch
        self._completed = start_epoch * steps_per_epoch
        self._epoch = start_epoch

    def __enter__(self) -> TrainingProgress:
        if self.live:
            self._progress.start()
            self._task = self._progress.add_task(
                "train",
                total=self._total,
                completed=self._completed,
                epoch=self._epoch,
                epochs=self.epochs,
                **self._fields,
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.live:
            self._progress.stop()

    def _refresh(self, **kwargs: Any) -> None:
        if self._task is not None:
            self._progress.update(self._task, **kwargs, **self._fields)

    def start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._refresh(epoch=epoch)

    def advance(self, step: int) -> None:
        self._refresh(completed=step)

    def set_running(self, loss: float, acc: float, nc0: float) -> None:
        self._fields |= {"loss": f"{loss:.4f}", "acc": f"{100 * acc:.1f}%", "nc0": _fmt(nc0)}
        self._refresh()

    def epoch_done(self, epoch: int, scalars: dict[str, float], row: dict[str, Any]) -> None:
        if "train_loss" in scalars:
            self._fields["loss"] = f"{scalars['train_loss']:.4f}"
            self._fields["acc"] = f"{100 * scalars['train_acc']:.1f}%"
        for key in ("nc0", "nc1"):
            if row.get(key) is not None:
                self._fields[key] = _fmt(row[key])
        self._refresh()
        if self.enabled and not self.live and row:
            # The line is the measurement's own: its step's training loss and accuracy
            # (none at step 0), not the running values of a later step it settled at.
            loss, acc = row.get("train_loss"), row.get("train_acc")
            self.console.print(
                f"epoch {epoch}/{self.epochs} step {row.get('step')}: "
                f"loss {'-' if loss is None else f'{loss:.4f}'} "
                f"acc {'-' if acc is None else f'{100 * acc:.1f}%'} "
                f"nc0 {self._fields['nc0']} nc1 {self._fields['nc1']}",
                highlight=False,
            )


def summary_table(rows: list[dict[str, Any]], run_dir: Path) -> Table:
    """First and last measurement of the run, side by side."""
    first, last = rows[0], rows[-1]
    table = Table(title=f"run {last.get('run_id', '')}  ({run_dir})", title_justify="left")
    table.add_column("metric")
    table.add_column(f"step {first.get('step')} (epoch {first.get('epoch')})", justify="right")
    table.add_column(f"step {last.get('step')} (epoch {last.get('epoch')})", justify="right")
    for key in SUMMARY_METRICS:
        if key in first or key in last:
            table.add_row(key, _fmt(first.get(key)), _fmt(last.get(key)))
    return table


# What each panel's y axis holds.
Y_LABELS: dict[str, str] = {
    "nc0": "‖Wᵀ1‖",
    "nc0_normalized": "‖Wᵀ1‖ / ‖W‖_F",
    "nc1": "Tr(Σ_W Σ_B⁺) / K",
    "nc1_trace_ratio": "Tr(Σ_W) / Tr(Σ_B)",
    "cdnv": "class-distance variance",
    "nc2_norm": "std / mean of norms",
    "nc2_angle": "mean |cos + 1/(K-1)|",
    "nc2": "distance to simplex ETF",
    "nc2w_norm": "std / mean of row norms",
    "nc2w_angle": "mean |cos + 1/(K-1)|",
    "nc2w": "distance to simplex ETF",
    "nc2m": "distance to simplex ETF",
    "nc3": "‖W/‖W‖ − Mᵀ/‖M‖‖",
}
# A panel whose values span less than this factor is drawn on a linear axis.
LOG_SPAN = 10.0


def write_report(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """report.png: every NC metric against epoch (log axes where the values span a decade
    or more, linear otherwise), the accuracies, and the run's verdict under the title."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    from ncserve.report.figures import log_ticks
    from ncserve.report.verdict import verdict

    present = [k for k in LOG_METRICS if any(_positive(r.get(k)) for r in rows)]
    panels = len(present) + 1
    cols = 4
    lines = math.ceil(panels / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4 * cols, 3 * lines + 0.4), squeeze=False)
    epochs = [float(r["epoch"]) if isinstance(r.get("epoch"), int | float) else 0.0 for r in rows]
    for ax, key in zip(axes.flat, present, strict=False):
        points = [(e, r[key]) for e, r in zip(epochs, rows, strict=True) if _positive(r.get(key))]
        values = [p[1] for p in points]
        ax.plot([p[0] for p in points], values, marker="o", markersize=3)
        if max(values) / min(values) >= LOG_SPAN:
            ax.set_yscale("log")
            log_ticks(ax)
        else:
            formatter = ScalarFormatter(useOffset=False)
            formatter.set_scientific(False)
            ax.yaxis.set_major_formatter(formatter)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(Y_LABELS.get(key, key))
        ax.grid(True, which="both", alpha=0.3)
    ax = axes.flat[len(present)]
    for key, label in (
        ("train_acc", "train accuracy"),
        ("accuracy", "accuracy (measurement split)"),
        ("nc4", "nc4 (NCC agreement)"),
        ("holdout_acc", "held-out accuracy"),
    ):
        points = [(e, r[key]) for e, r in zip(epochs, rows, strict=True) if r.get(key) is not None]
        if points:
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                markersize=3,
                label=label,
            )
    ax.set_ylim(0, 1.02)
    ax.set_title("accuracy")
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    for extra in axes.flat[panels:]:
        extra.set_visible(False)
    fig.suptitle(f"{title or rows[-1].get('run_id', '')}\n{verdict(rows)}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0
