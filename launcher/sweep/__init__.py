"""``nclaunch sweep GRID.yaml --out DIR``: a grid of nclaunch runs sharing one service.

Every point of the grid (``grid``) becomes one nclaunch run in ``DIR/<name>``, run by a
backend: ``local`` (processes on this machine, ``local``), ``submitit`` (a Slurm job array,
``submitit_backend``) or anything that runs ``nclaunch sweep GRID --point I`` once per
point (``point``; a Kubernetes Indexed Job does). All runs report to one ncserve service:
the local backend's own (database in ``DIR/service``) or an external one (``--sidecar``, or
the grid's ``sidecar``). Each run is a separate ``nclaunch`` process, so a run that fails
leaves the others running. Running the sweep (or a point) again skips finished runs (a
measurement at the last epoch is in their metrics.jsonl, or at the service) and continues
unfinished ones from their last checkpoint with ``nclaunch --resume`` (``state``).

Layout of DIR::

    sweep.yaml              the grid as given and the planned points (names and settings),
                            written by the local backend and the submitit driver
    service/                the local backend's ncserve database, log and port file
    submitit/               the submitit backend's task files and logs
    <name>/                 an nclaunch run directory, plus
      sweep-settings.yaml   the settings the sweep passes (nclaunch --config)
      nclaunch.log          the run's console output, appended on every attempt
"""

from launcher.sweep.command import sweep_command
from launcher.sweep.grid import (
    GridPoints,
    PlannedRun,
    SweepPlan,
    load_grid,
    plan_points,
    plan_sweep,
)
from launcher.sweep.local import run_sweep
from launcher.sweep.process import ActiveRun, nclaunch_command
from launcher.sweep.progress import SweepProgress
from launcher.sweep.state import DONE, NEW, UNFINISHED, SweepOutcome, run_state

__all__ = [
    "DONE",
    "NEW",
    "UNFINISHED",
    "ActiveRun",
    "GridPoints",
    "PlannedRun",
    "SweepOutcome",
    "SweepPlan",
    "SweepProgress",
    "load_grid",
    "nclaunch_command",
    "plan_points",
    "plan_sweep",
    "run_state",
    "run_sweep",
    "sweep_command",
]
