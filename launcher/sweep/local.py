"""The local backend: every point of the grid as an nclaunch process on this machine,
``parallel`` at a time, all reporting to one service (the sweep's own, its database in
``OUT/service``, unless the runs name an external one)."""

from __future__ import annotations

import time

from rich.console import Console

from launcher.launch import EmbeddedService, LaunchError
from launcher.sweep.grid import PlannedRun, SweepPlan
from launcher.sweep.process import LOG_FILE, ActiveRun, sigterm_as_interrupt, start_run, stop_runs
from launcher.sweep.progress import SweepProgress
from launcher.sweep.state import FailedRun, SweepOutcome, survey, write_plan
from ncserve.errors import UserError

_POLL_S = 0.5


def _start_service(plan: SweepPlan, console: Console) -> tuple[EmbeddedService, str]:
    service = EmbeddedService(
        plan.out_dir / "service",
        max_runs=max(1000, len(plan.runs) + 16),
        name="the sweep's ncserve service",
    )
    try:
        target = service.start()
    except LaunchError as exc:
        raise UserError(str(exc)) from None
    console.print(
        f"[dim]sweep service ncserve on {target} (database {service.db_path})[/dim]",
        highlight=False,
        soft_wrap=True,
    )
    return service, target


def run_sweep(
    plan: SweepPlan,
    *,
    parallel: int,
    gpus: list[str] | None = None,
    console: Console | None = None,
) -> SweepOutcome:
    """Run every run of ``plan`` that is not done, ``parallel`` at a time."""
    console = console or Console()
    outcome, todo = survey(plan, console)
    write_plan(plan)
    if not todo:
        return outcome
    service: EmbeddedService | None = None
    target: str | None = None
    if plan.needs_service:
        service, target = _start_service(plan, console)
    free_gpus = list(gpus or [])
    active: list[ActiveRun] = []
    try:
        with (
            sigterm_as_interrupt(),
            SweepProgress(plan, console, len(plan.runs), len(outcome.done)) as progress,
        ):
            pending: list[tuple[PlannedRun, bool]] = list(todo)
            while pending or active:
                while pending and len(active) < parallel:
                    run, resume = pending.pop(0)
                    gpu = free_gpus.pop(0) if gpus else None
                    item = start_run(plan, run, target, resume, gpu)
                    active.append(item)
                    progress.started_run(item)
                time.sleep(_POLL_S)
                for item in list(active):
                    status = item.process.poll()
                    if status is None:
                        continue
                    active.remove(item)
                    item.log.close()
                    if item.gpu is not None:
                        free_gpus.append(item.gpu)
                    if status == 0:
                        outcome.finished.append(item.run.name)
                    else:
                        log = plan.run_dir(item.run) / LOG_FILE
                        outcome.failed.append(FailedRun(item.run.name, f"exit {status}", (log,)))
                    progress.ended_run(item, status)
                progress.refresh()
    except KeyboardInterrupt:
        stop_runs(active)
        raise
    finally:
        if service is not None:
            service.stop()
    return outcome
