"""Where a point stands: its run directory, its run at the service, and the locks that keep
two processes off one point (or a whole-grid invocation off a sweep whose points run).

Nothing here writes state shared by the points of a sweep: a point owns its run directory
(``OUT/<name>``) and its run id at the service; ``OUT/sweep.yaml`` is written only by the
one process that runs the whole grid (the local backend, or the submitit backend's driver).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click
import grpc
import yaml
from rich.console import Console

from launcher.resolve import load_yaml, to_yaml
from launcher.rundir import RunDir, write_atomic
from launcher.sweep.grid import RUN_LOCAL, PlannedRun, SweepPlan, settings_tree
from ncserve.errors import UserError
from ncserve.report.settings import lookup

NEW, UNFINISHED, DONE = "new", "unfinished", "done"
# How long a point waits for the service to answer whether it is done (the service may
# still be starting, as when a chart's service and its sweep's pods start together).
SERVICE_WAIT_S = 60.0
SWEEP_LOCK = ".sweep.lock"
DRIVER_LOCK = ".sweep-driver.lock"
POINT_LOCK = ".point.lock"
# A filesystem without file locks (some parallel filesystems) answers with one of these.
_NO_LOCKS = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


def run_state(plan: SweepPlan, run: PlannedRun) -> str:
    """new (nothing there), unfinished (config.yaml, no final measurement) or done."""
    folder = RunDir(plan.run_dir(run))
    if not folder.config_path.is_file():
        return NEW
    rows = folder.read_metrics()
    if any(int(row.get("epoch") or 0) >= run.epochs for row in rows):
        return DONE
    return UNFINISHED


def check_same_settings(plan: SweepPlan, run: PlannedRun) -> None:
    """An existing run directory must hold the run this grid describes."""
    saved_path = plan.run_dir(run) / "config.yaml"
    try:
        saved = load_yaml(saved_path)
    except ValueError as err:
        raise UserError(f"{saved_path}: {err}") from None
    planned = yaml.safe_load(to_yaml(run.config))
    for path in run.settings:
        if path in RUN_LOCAL:
            continue
        have, want = lookup(saved, path), lookup(planned, path)
        if have != want:
            raise UserError(
                f"{plan.run_dir(run)} holds a run with {path} = {have!r}, but the grid now "
                f"gives {want!r}; choose another --out for a changed grid"
            )


def last_row(run_dir: Path) -> dict[str, Any]:
    rows = RunDir(run_dir).read_metrics()
    return rows[-1] if rows else {}


def write_plan(plan: SweepPlan) -> None:
    """OUT/sweep.yaml: the grid as given and its points (by the whole-grid process only)."""
    document = {
        "grid_file": str(plan.grid_path),
        "grid": yaml.safe_load(plan.grid_path.read_text()),
        "sweep_id": plan.sweep_id,
        "axes": plan.axis_paths,
        "runs": [
            {"index": run.index, "name": run.name, "settings": settings_tree(run.settings)}
            for run in plan.runs
        ],
    }
    write_atomic(plan.out_dir / "sweep.yaml", yaml.safe_dump(document, sort_keys=False))


# -- the run at the service ------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceRun:
    """What the service holds of a point's run id."""

    exists: bool
    measurements: int  # complete ones
    done: bool  # the final epoch's measurement is stored


def _client(run: PlannedRun, target: str) -> Any:
    from ncserve.client import NCClient

    token, tls = run.config.tracking.credentials()
    return NCClient(
        target, token=token, tls=tls, deadline_s=SERVICE_WAIT_S, replay_in_background=False
    )


def service_run(plan: SweepPlan, run: PlannedRun) -> ServiceRun | None:
    """The point's run at its external service (None: the run names none)."""
    from ncserve.client import ServiceError

    target = run.service
    if target is None:
        return None
    run_id = plan.run_id(run)
    client = _client(run, target)
    try:
        try:
            info = client.get_run(run_id)
        except ServiceError as err:
            if err.code == grpc.StatusCode.NOT_FOUND:
                return ServiceRun(exists=False, measurements=0, done=False)
            raise UserError(
                f"cannot ask the service at {target} whether run {run_id} is done: {err.details}"
            ) from None
        count = int(info["num_measurements"])
        if not count:
            return ServiceRun(exists=True, measurements=0, done=False)
        try:
            latest = client.get_metrics(run_id)
        except ServiceError as err:
            if err.code == grpc.StatusCode.NOT_FOUND:
                return ServiceRun(exists=True, measurements=count, done=False)
            raise UserError(f"service at {target}: run {run_id}: {err.details}") from None
        done = int(latest.get("epoch") or 0) >= run.epochs
        return ServiceRun(exists=True, measurements=count, done=done)
    finally:
        client.close(timeout_s=0)


def delete_service_run(plan: SweepPlan, run: PlannedRun) -> None:
    """Remove what the service holds of the point's run id (before a fresh start)."""
    from ncserve.client import ServiceError

    target = run.service
    if target is None:
        return
    client = _client(run, target)
    try:
        client.delete_run(plan.run_id(run))
    except ServiceError as err:
        if err.code != grpc.StatusCode.NOT_FOUND:
            raise UserError(
                f"service at {target}: cannot delete run {plan.run_id(run)}: {err.details}"
            ) from None
    finally:
        client.close(timeout_s=0)


# -- locks ------------------------------------------------------------------------------------


def _lock(handle: IO[str], exclusive: bool) -> bool:
    """Take the lock without waiting: True when held, False when the filesystem has no file
    locks (the caller goes on without one); BlockingIOError when another process holds it."""
    try:
        fcntl.flock(handle, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError as err:
        if err.errno not in _NO_LOCKS:
            raise
        click.echo(f"note: {handle.name}: this filesystem has no file locks; going on", err=True)
        return False
    return True


@contextlib.contextmanager
def _held(path: Path, exclusive: bool, busy: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            locked = _lock(handle, exclusive)
        except BlockingIOError:
            raise UserError(busy) from None
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def sweep_lock(out_dir: Path) -> Iterator[None]:
    """The local backend: one process runs the whole grid, and no point runs beside it."""
    with _held(
        out_dir / SWEEP_LOCK,
        exclusive=True,
        busy=f"another nclaunch sweep (or a --point of it) is running in {out_dir}",
    ):
        yield


@contextlib.contextmanager
def driver_lock(out_dir: Path) -> Iterator[None]:
    """The submitit backend's driver: one per sweep directory; its points run beside it."""
    with (
        _held(
            out_dir / SWEEP_LOCK,
            exclusive=False,
            busy=f"an nclaunch sweep with the local backend is running in {out_dir}",
        ),
        _held(
            out_dir / DRIVER_LOCK,
            exclusive=True,
            busy=f"another nclaunch sweep --backend submitit is running in {out_dir}",
        ),
    ):
        yield


@contextlib.contextmanager
def point_lock(plan: SweepPlan, run: PlannedRun) -> Iterator[None]:
    """One point: any number of points of a sweep at once, but each point in one process,
    and none beside the local backend."""
    with (
        _held(
            plan.out_dir / SWEEP_LOCK,
            exclusive=False,
            busy=f"an nclaunch sweep with the local backend is running in {plan.out_dir}",
        ),
        _held(
            plan.run_dir(run) / POINT_LOCK,
            exclusive=True,
            busy=f"point {run.index} ({run.name}) is running in another process "
            f"({plan.run_dir(run)} is locked)",
        ),
    ):
        yield


# -- what a whole-grid invocation finds and leaves ---------------------------------------------


@dataclass(frozen=True)
class FailedRun:
    name: str
    detail: str  # "exit 1", "job failed: ..."
    logs: tuple[Path, ...]


@dataclass
class SweepOutcome:
    done: list[str] = field(default_factory=list)  # finished before this invocation
    finished: list[str] = field(default_factory=list)  # finished now
    failed: list[FailedRun] = field(default_factory=list)


def survey(plan: SweepPlan, console: Console) -> tuple[SweepOutcome, list[tuple[PlannedRun, bool]]]:
    """The runs already done (in the outcome) and those to run, each with whether it resumes;
    says so in one line."""
    outcome = SweepOutcome()
    todo: list[tuple[PlannedRun, bool]] = []
    for run in plan.runs:
        state = run_state(plan, run)
        if state != NEW:
            check_same_settings(plan, run)
        if state == DONE:
            outcome.done.append(run.name)
        else:
            todo.append((run, state == UNFINISHED))
    resumed = sum(1 for _, resume in todo if resume)
    console.print(
        f"[bold]nclaunch sweep[/bold] {plan.grid_path} -> {plan.out_dir}: {len(plan.runs)} "
        f"run(s); {len(outcome.done)} done, {resumed} to resume, {len(todo) - resumed} new",
        highlight=False,
        soft_wrap=True,
    )
    return outcome, todo
