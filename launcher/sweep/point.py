"""``nclaunch sweep GRID --point I --out DIR``: one point of a grid, the unit every
distributed backend runs (a Slurm array task, a Kubernetes Indexed Job pod).

A point skips itself when its final measurement is stored (in its run directory, or at the
service under its run id), resumes its run from the last checkpoint when the run directory
holds an unfinished one, and starts afresh otherwise. Points of one sweep share nothing but
the service and, optionally, the filesystem: each writes only its own run directory and run
id, so any number of them run at once, on any machines.
"""

from __future__ import annotations

import ctypes
import signal
import sys
from typing import IO

from rich.console import Console

from launcher.sweep.grid import SweepPlan, preflight_run
from launcher.sweep.process import LOG_FILE, ActiveRun, signal_run, start_run
from launcher.sweep.state import (
    DONE,
    NEW,
    UNFINISHED,
    check_same_settings,
    delete_service_run,
    point_lock,
    run_state,
    service_run,
)
from ncserve.errors import UserError

_PR_SET_PDEATHSIG = 1


def _end_with_parent() -> None:
    """In the run's process: SIGTERM when the point's process dies, even by SIGKILL, so a
    run never goes on without the process that answers for it."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _follow(item: ActiveRun, output: IO[bytes] | None) -> int:
    """Copy the run's output to its log and ``output`` until it ends; an interrupt of this
    process (SIGTERM from a scheduler, Ctrl-C) is passed on to the run, which stops in
    order and can be resumed."""

    def _forward(_signum: int, _frame: object) -> None:
        signal_run(item, signal.SIGTERM)

    previous = {sig: signal.signal(sig, _forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    stream = item.process.stdout
    assert stream is not None
    try:
        while chunk := stream.read1(1 << 16):  # type: ignore[attr-defined]
            item.log.write(chunk)
            item.log.flush()
            if output is not None:
                output.write(chunk)
                output.flush()
        return item.process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stream.close()
        item.log.close()


def run_point(
    plan: SweepPlan, index: int, *, console: Console, output: IO[bytes] | None = None
) -> int:
    """Run point ``index`` of ``plan`` (0-based) unless it is done; nclaunch's exit status
    (0 when skipped). The run's output goes to its nclaunch.log and to ``output``."""
    run = plan.point(index)
    label = f"point {index} ({run.name})"
    if run.config.tracking.enabled and run.service is None:
        raise UserError(
            f"--point {index}: the points of a sweep report to one service that every machine "
            "reaches; give --sidecar HOST:PORT (or set sidecar in the grid's base)"
        )
    preflight_run(plan.grid_path, run)
    run_dir = plan.run_dir(run)

    def say(message: str) -> None:
        console.print(f"{label}: {message}", highlight=False, soft_wrap=True)

    with point_lock(plan, run):
        state = run_state(plan, run)
        if state != NEW:
            check_same_settings(plan, run)
        at_service = service_run(plan, run)
        if state == DONE:
            say(f"skipped: its final measurement is in {run_dir}")
            return 0
        if at_service is not None and at_service.done:
            say(
                f"skipped: its final measurement is stored at {run.service} (run {plan.run_id(run)})"
            )
            return 0
        if state == NEW and at_service is not None and at_service.exists:
            # An earlier attempt elsewhere (its run directory not on this filesystem): its
            # partial measurements would clash with those of a fresh start.
            say(
                f"the service holds {at_service.measurements} measurement(s) of run "
                f"{plan.run_id(run)} from an earlier attempt whose run directory is not here; "
                "deleting them to start afresh"
            )
            delete_service_run(plan, run)
        resume = state == UNFINISHED
        say(f"{'resuming' if resume else 'starting'} run {plan.run_id(run)} in {run_dir}")
        item = start_run(plan, run, None, resume, None, pipe=True, preexec=_end_with_parent)
        status = _follow(item, output)
    if status == 0:
        say("finished")
    else:
        say(f"failed (exit {status}); see {run_dir / LOG_FILE}")
    return status
