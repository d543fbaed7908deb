"""The submitit backend: the points of a grid as a job array, one task per point.

Every task runs the ``--point`` entry (``run_point``), so a task skips a finished point,
resumes an unfinished one and reports to the sweep's service like a Kubernetes pod does.
``--cluster slurm`` submits one Slurm array (``%N`` = --max-parallel); ``--cluster local``
runs the tasks as processes on this machine through submitit's LocalExecutor, at most
--max-parallel at a time. The driver waits for the tasks, shows their progress and lists
the failed points with their logs; submitit keeps its own files in ``OUT/submitit``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from launcher.sweep.grid import PlannedRun, SweepPlan, plan_sweep
from launcher.sweep.process import LOG_FILE, sigterm_as_interrupt
from launcher.sweep.progress import SweepProgress
from launcher.sweep.state import FailedRun, SweepOutcome, survey, write_plan
from ncserve.errors import UserError

CLUSTERS = ("slurm", "local")
DEFAULT_TIMEOUT_MIN = 24 * 60
SUBMITIT_DIR = "submitit"
_POLL_S = 1.0
# Task states after which a result file is still worth waiting for (Slurm, local).
_ENDED_WELL = frozenset({"COMPLETED", "FINISHED"})
# The exit status of a task whose point could not start (a UserError, as the CLI's).
_USER_ERROR_STATUS = 2


@dataclass(frozen=True)
class SubmititOptions:
    cluster: str
    partition: str | None
    gpus_per_run: int
    max_parallel: int | None
    timeout_min: int

    def check(self) -> None:
        if self.cluster == "slurm" and not self.partition:
            raise UserError(
                "--partition: required with --cluster slurm (the partition the job array goes to)"
            )
        if self.cluster != "slurm" and self.partition:
            raise UserError(f"--partition: only with --cluster slurm, not {self.cluster}")


def run_point_job(
    grid_path: str, out_dir: str, index: int, overrides: dict[str, Any], sweep_id: str
) -> int:
    """What each task runs: ``nclaunch sweep GRID --point INDEX --out OUT``; its exit status.
    The point's output goes to the task's stdout (submitit's log of the task)."""
    from launcher.sweep.point import run_point

    console = Console()
    try:
        plan = plan_sweep(
            Path(grid_path), Path(out_dir), overrides, sweep_id=sweep_id, preflight_all=False
        )
        return run_point(plan, index, console=console, output=sys.stdout.buffer)
    except UserError as err:
        click.echo(f"Error: {err.message}", err=True)
        return _USER_ERROR_STATUS


@dataclass
class SubmittedRun:
    """A point's task: satisfies progress.Running once it runs."""

    run: PlannedRun
    job: Any  # submitit.Job[int]
    resumed: bool
    started: float = 0.0
    running: bool = False
    gpu: str | None = None


def _executor(plan: SweepPlan, options: SubmititOptions) -> Any:
    import submitit

    try:
        executor = submitit.AutoExecutor(
            folder=plan.out_dir.resolve() / SUBMITIT_DIR / "%j", cluster=options.cluster
        )
    except RuntimeError as err:  # no srun here
        raise UserError(
            f"--cluster {options.cluster}: {err} (run the sweep on a machine that submits to "
            "it, or try the array here with --cluster local)"
        ) from None
    parameters: dict[str, Any] = {
        "name": f"nclaunch-sweep-{plan.sweep_id}",
        "timeout_min": options.timeout_min,
        "nodes": 1,
        "tasks_per_node": 1,
    }
    if options.gpus_per_run:
        parameters["gpus_per_node"] = options.gpus_per_run
    if options.cluster == "slurm":
        parameters["slurm_partition"] = options.partition
    executor.update_parameters(**parameters)
    return executor


def _outcome_of(item: SubmittedRun) -> tuple[int, str]:
    """(exit status, detail) of a finished task."""
    job = item.job
    if not job.paths.result_pickle.exists():
        state = str(job.state)
        if state.upper() not in _ENDED_WELL:  # the scheduler says why: TIMEOUT, FAILED, ...
            return 1, f"task {state}"
    if job.exception() is not None:  # waits a little for a result still on its way
        return 1, "its task ended without finishing the point (see the task's log)"
    status = int(job.result())
    return status, f"exit {status}"


def run_submitit(
    plan: SweepPlan,
    overrides: dict[str, Any],
    options: SubmititOptions,
    *,
    console: Console | None = None,
) -> SweepOutcome:
    """Every point of ``plan`` not done, as submitit tasks; waits for them."""
    console = console or Console()
    if plan.needs_service:
        raise UserError(
            "--backend submitit: the points report to one service that every node reaches; "
            "give --sidecar HOST:PORT (or set sidecar in the grid's base); see docs/sweeps.md"
        )
    executor = _executor(plan, options)
    outcome, todo = survey(plan, console)
    write_plan(plan)
    if not todo:
        return outcome
    if options.cluster == "slurm":
        executor.update_parameters(slurm_array_parallelism=options.max_parallel or len(todo))
    grid, out = str(plan.grid_path.resolve()), str(plan.out_dir.resolve())

    def submit(batch: list[tuple[PlannedRun, bool]]) -> list[SubmittedRun]:
        n = len(batch)
        try:
            jobs = executor.map_array(
                run_point_job,
                [grid] * n,
                [out] * n,
                [run.index for run, _ in batch],
                [overrides] * n,
                [plan.sweep_id] * n,
            )
        except (OSError, subprocess.CalledProcessError) as err:
            raise UserError(f"--cluster {options.cluster}: submitting failed: {err}") from None
        return [
            SubmittedRun(run, job, resume) for (run, resume), job in zip(batch, jobs, strict=True)
        ]

    pending = list(todo)
    active: list[SubmittedRun] = []
    limit = options.max_parallel or len(todo)
    if options.cluster == "slurm":
        active, pending = submit(pending), []  # one array; Slurm keeps %N of it running
        array = active[0].job.job_id.split("_")[0]
        where = f"submitted to Slurm partition {options.partition} as job array {array}"
    else:
        where = "running on this machine through submitit's LocalExecutor"
    console.print(
        f"{len(todo)} point(s) {where}, at most {limit} at a time; task logs in "
        f"{plan.out_dir / SUBMITIT_DIR}",
        highlight=False,
        soft_wrap=True,
    )
    try:
        with (
            sigterm_as_interrupt(),
            SweepProgress(plan, console, len(plan.runs), len(outcome.done)) as progress,
        ):
            while pending or active:
                if pending and len(active) < limit:
                    take = limit - len(active)
                    active += submit(pending[:take])
                    pending = pending[take:]
                time.sleep(_POLL_S)
                for item in list(active):
                    done = item.job.done()
                    if not item.running and (done or item.job.state == "RUNNING"):
                        item.running, item.started = True, time.monotonic()
                        progress.started_run(item)
                    if not done:
                        continue
                    active.remove(item)
                    status, detail = _outcome_of(item)
                    logs = (plan.run_dir(item.run) / LOG_FILE, item.job.paths.stdout)
                    if status == 0:
                        outcome.finished.append(item.run.name)
                    else:
                        outcome.failed.append(FailedRun(item.run.name, detail, logs))
                    progress.ended_run(item, status, log=item.job.paths.stdout)
                progress.refresh()
    except KeyboardInterrupt:
        for item in active:
            item.job.cancel(check=False)
        raise
    return outcome
