"""The progress of a sweep: runs done, running and left, as a live bar and a table of the
running runs on a terminal, one line per event otherwise (a CI log, a pipe, a batch job)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from launcher.sweep.grid import PlannedRun, SweepPlan
from launcher.sweep.process import LOG_FILE
from launcher.sweep.state import last_row


class Running(Protocol):
    """A run a backend has started: a local process or a cluster job."""

    @property
    def run(self) -> PlannedRun: ...

    @property
    def started(self) -> float: ...

    @property
    def gpu(self) -> str | None: ...

    @property
    def resumed(self) -> bool: ...


class SweepProgress:
    """Runs done, running and left: a live bar and a table of the running runs on a
    terminal, one line per event otherwise (a CI log, a pipe)."""

    def __init__(self, plan: SweepPlan, console: Console, total: int, done: int) -> None:
        self.plan = plan
        self.console = console
        self.total = total
        self.done = done
        self.failed = 0
        self.running: dict[str, Running] = {}
        self.started = time.monotonic()
        self.live: Live | None = None

    def __enter__(self) -> SweepProgress:
        if self.console.is_terminal:
            self.live = Live(
                self._render(), console=self.console, refresh_per_second=2, transient=False
            )
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.stop()

    @property
    def left(self) -> int:
        return self.total - self.done - self.failed - len(self.running)

    def _counts(self) -> str:
        return f"{self.done}/{self.total} done, {len(self.running)} running, {self.left} left" + (
            f", {self.failed} failed" if self.failed else ""
        )

    def _render(self) -> Group:
        width = 30
        filled = 0 if self.total == 0 else round(width * self.done / self.total)
        elapsed = _clock(time.monotonic() - self.started)
        head = Text.assemble(
            ("sweep ", "bold"),
            ("█" * filled, "green"),
            ("░" * (width - filled), "dim"),
            f"  {self._counts()}  {elapsed}",
        )
        if not self.running:
            return Group(head)
        table = Table(box=None, pad_edge=False, show_header=True, header_style="dim")
        for column in ("running", "epoch", "train acc", "nc0", "time"):
            table.add_column(column, justify="left" if column == "running" else "right")
        for name, active in self.running.items():
            row = last_row(self.plan.run_dir(active.run))
            acc = row.get("train_acc")
            nc0 = row.get("nc0")
            table.add_row(
                name + (" (resumed)" if active.resumed else ""),
                f"{row.get('epoch', 0)}/{active.run.epochs}",
                "-" if acc is None else f"{100 * acc:.1f}%",
                "-" if nc0 is None else f"{nc0:.4g}",
                _clock(time.monotonic() - active.started),
            )
        return Group(head, table)

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._render(), refresh=True)

    def _say(self, message: str) -> None:
        if self.live is not None:
            self.live.console.print(message, highlight=False)
        else:
            self.console.print(f"[{self._counts()}] {message}", highlight=False, soft_wrap=True)

    def started_run(self, active: Running) -> None:
        self.running[active.run.name] = active
        verb = "resuming" if active.resumed else "starting"
        where = f" on GPU {active.gpu}" if active.gpu is not None else ""
        self._say(f"{verb} {active.run.name}{where}")
        self.refresh()

    def ended_run(self, active: Running, status: int, log: Path | None = None) -> None:
        """``log``: where to look when it failed (default: the run's nclaunch.log)."""
        del self.running[active.run.name]
        seconds = _clock(time.monotonic() - active.started)
        if status == 0:
            self.done += 1
            row = last_row(self.plan.run_dir(active.run))
            acc, nc0 = row.get("train_acc"), row.get("nc0")
            detail = ", ".join(
                part
                for part in (
                    None if acc is None else f"train acc {100 * acc:.1f}%",
                    None if nc0 is None else f"nc0 {nc0:.4g}",
                )
                if part
            )
            self._say(
                f"finished {active.run.name} in {seconds}" + (f" ({detail})" if detail else "")
            )
        else:
            self.failed += 1
            log = self.plan.run_dir(active.run) / LOG_FILE if log is None else log
            self._say(
                f"[red]failed[/red] {active.run.name} (exit {status}) after {seconds}; see {log}"
            )
        self.refresh()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
