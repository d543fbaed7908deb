"""One point's nclaunch process: its command line, its start and its stop.

Every backend runs a point the same way: ``OUT/<name>/sweep-settings.yaml`` holds the
settings the grid gives it (nclaunch --config), and the run's console output is appended
to ``OUT/<name>/nclaunch.log`` on every attempt.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

import yaml

from launcher.rundir import write_atomic
from launcher.sweep.grid import PlannedRun, SweepPlan, settings_tree

SETTINGS_FILE = "sweep-settings.yaml"
LOG_FILE = "nclaunch.log"


def nclaunch_command(
    plan: SweepPlan, run: PlannedRun, *, target: str | None, resume: bool
) -> list[str]:
    """The nclaunch command line of one run (its settings file written beside it)."""
    run_dir = plan.run_dir(run)
    command = [
        sys.executable,
        "-c",
        "from launcher.cli import main; main()",
        "--config",
        str(run_dir / SETTINGS_FILE),
        "--run-dir",
        str(run_dir),
        "--run-id",
        plan.run_id(run),
        "--sweep-id",
        plan.sweep_id,
    ]
    # A run that names its own service keeps it; the others report to the sweep's.
    tracking = run.config.tracking
    if target is not None and tracking.enabled and tracking.sidecar is None:
        command += ["--sidecar", target]
    if resume:
        command.append("--resume")
    return command


@dataclass
class ActiveRun:
    run: PlannedRun
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    started: float
    gpu: str | None
    resumed: bool


def start_run(
    plan: SweepPlan,
    run: PlannedRun,
    target: str | None,
    resume: bool,
    gpu: str | None,
    *,
    pipe: bool = False,
    preexec: Callable[[], None] | None = None,
) -> ActiveRun:
    """Start the run's nclaunch, its output appended to its log (``pipe``: to a pipe the
    caller copies to the log and its own output, ``process.stdout``); ``preexec`` runs in
    the child before nclaunch starts."""
    run_dir = plan.run_dir(run)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(
        run_dir / SETTINGS_FILE, yaml.safe_dump(settings_tree(run.settings), sort_keys=False)
    )
    command = nclaunch_command(plan, run, target=target, resume=resume)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    log = (run_dir / LOG_FILE).open("ab")
    log.write(f"\n$ {shlex.join(command)}\n".encode())
    log.flush()
    # Its own session: an interrupt reaches the run's whole process group (agent and
    # workers) through us, in order, rather than through the terminal at once.
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE if pipe else log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
        preexec_fn=preexec,
    )
    return ActiveRun(run, process, log, time.monotonic(), gpu, resume)


def signal_run(item: ActiveRun, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(item.process.pid, signum)


def stop_runs(active: list[ActiveRun], grace_s: float = 30.0) -> None:
    """SIGTERM to each run's process group; SIGKILL to those still there after ``grace_s``."""
    for item in active:
        signal_run(item, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for item in active:
        try:
            item.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_run(item, signal.SIGKILL)
            item.process.wait()
        item.log.close()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While a whole-grid driver waits: SIGTERM (a scheduler, kill) stops it as Ctrl-C does,
    so it stops its runs in order before it exits."""

    def _terminate(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
