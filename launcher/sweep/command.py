"""``nclaunch sweep``: the command line of the sweep and its backends."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from launcher.config import TrackingConfig
from launcher.sweep.grid import (
    SIDECAR_PATH,
    GridPoints,
    SweepPlan,
    parse_sets,
    plan_points,
    plan_sweep,
)
from launcher.sweep.state import SweepOutcome, run_state
from launcher.sweep.submitit_backend import (
    CLUSTERS,
    DEFAULT_TIMEOUT_MIN,
    SubmititOptions,
)
from ncserve.errors import UserError

BACKENDS = ("local", "submitit")
LIST_FORMATS = ("text", "json")
# Options of one backend (or mode) only, by the mode they belong to.
_LOCAL_ONLY = ("parallel", "gpus")
_SUBMITIT_ONLY = ("cluster", "partition", "gpus_per_run", "max_parallel", "timeout_min")


def _parse_gpus(value: str | None) -> list[str] | None:
    if value is None:
        return None
    ids = [part.strip() for part in value.split(",") if part.strip()]
    if not ids or not all(part.isdigit() for part in ids):
        raise UserError(
            f"--gpus: expected comma-separated GPU indices such as 0,1,2,3; got {value!r}"
        )
    return ids


def _check_sidecar(value: str) -> str:
    try:
        TrackingConfig.model_validate({"sidecar": value})
    except ValidationError:
        raise UserError(f"--sidecar: expected HOST:PORT, got {value!r}") from None
    return value


def _given(ctx: click.Context, names: tuple[str, ...]) -> list[str]:
    """The options among ``names`` given on the command line, as --option-name."""
    return [
        "--" + name.replace("_", "-")
        for name in names
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    ]


def _refuse(ctx: click.Context, names: tuple[str, ...], why: str) -> None:
    given = _given(ctx, names)
    if given:
        raise UserError(f"{', '.join(given)}: {why}")


def _print_points(points: GridPoints, fmt: str) -> None:
    if fmt == "json":
        document = [
            {"index": run.index, "name": run.name, "settings": run.settings} for run in points.runs
        ]
        click.echo(json.dumps(document, indent=2, default=str))
        return
    for run in points.runs:
        varying = " ".join(
            f"{path}={run.settings[path]}" for path in points.axis_paths if path in run.settings
        )
        click.echo(f"{run.index}\t{run.name}\t{varying}".rstrip())


def _print_outcome(console: Console, plan: SweepPlan, outcome: SweepOutcome) -> None:
    total = len(plan.runs)
    finished = len(outcome.done) + len(outcome.finished)
    out_dir = plan.out_dir
    console.print(
        f"{finished}/{total} run(s) done ({len(outcome.finished)} now, {len(outcome.done)} "
        f"before)"
        + (f", {len(outcome.failed)} failed" if outcome.failed else "")
        + f"; compare them: ncserve report {out_dir} --out {out_dir}/report.html",
        highlight=False,
        soft_wrap=True,
    )
    for failed in outcome.failed:
        logs = ", ".join(str(path) for path in failed.logs)
        console.print(
            f"  failed: {failed.name} ({failed.detail}), log {logs}",
            highlight=False,
            soft_wrap=True,
        )


@click.command("sweep")
@click.argument(
    "grid", type=click.Path(path_type=Path, dir_okay=False, exists=True), metavar="GRID.yaml"
)
@click.option(
    "--out",
    "out_dir",
    default=None,
    type=click.Path(path_type=Path, file_okay=False),
    help="Sweep directory: one run directory per point, the service database "
    "and sweep.yaml. Re-running with the same --out skips finished runs and resumes "
    "unfinished ones. Required except with --list.",
)
@click.option(
    "--list",
    "list_points",
    is_flag=True,
    help="Print the points (index, name, the settings that vary; with --format json every "
    "setting) in the order every backend runs them, and exit.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(LIST_FORMATS),
    default=LIST_FORMATS[0],
    show_default=True,
    help="Output of --list: text (one line per point) or json (a list of {index, name, settings}).",
)
@click.option(
    "--point",
    type=click.IntRange(min=0),
    default=None,
    metavar="I",
    help="Run only point I (0-based, as --list numbers them): skipped when its final "
    "measurement is stored (in OUT/<name> or at the service), resumed from its last "
    "checkpoint when unfinished. Points of one sweep run at once on any machines that "
    "share the service (and optionally OUT); this is what the Slurm and Kubernetes "
    "backends run.",
)
@click.option(
    "--sidecar",
    default=None,
    metavar="HOST:PORT",
    help="The ncserve service every run reports to, instead of the one the local backend "
    "starts (or the grid's sidecar). Needed by --point and --backend submitit unless the "
    "grid sets sidecar.",
)
@click.option(
    "--sweep-id",
    default=None,
    metavar="ID",
    help="The sweep's id, sent with every run (nclaunch --sweep-id) and prefixed to run ids "
    "at an external service so sweeps sharing one do not collide.  [default: the --out "
    "folder's name]",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default=BACKENDS[0],
    show_default=True,
    help="local: the runs as processes on this machine. submitit: a job array, one task "
    "per point, through submitit (Slurm, or local processes with --cluster local).",
)
@click.option(
    "--parallel",
    type=click.IntRange(min=1),
    default=None,
    help="Local backend: runs at a time.  [default: the number of --gpus, else 1]",
)
@click.option(
    "--gpus",
    default=None,
    metavar="LIST",
    help="Local backend: comma-separated CUDA device indices; each concurrent run gets one "
    "of them as CUDA_VISIBLE_DEVICES.",
)
@click.option(
    "--cluster",
    type=click.Choice(CLUSTERS),
    default=CLUSTERS[0],
    show_default=True,
    help="Submitit backend: where the tasks run: slurm (sbatch), or local (processes on "
    "this machine, submitit's LocalExecutor).",
)
@click.option(
    "--partition",
    default=None,
    help="Submitit backend, Slurm: the partition the array goes to (required).",
)
@click.option(
    "--gpus-per-run",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Submitit backend: GPUs of each task (Slurm --gpus-per-node); 0: CPU only.",
)
@click.option(
    "--max-parallel",
    type=click.IntRange(min=1),
    default=None,
    help="Submitit backend: tasks running at once (Slurm: the array's %N).  "
    "[default: every point at once]",
)
@click.option(
    "--timeout-min",
    type=click.IntRange(min=1),
    default=DEFAULT_TIMEOUT_MIN,
    show_default=True,
    help="Submitit backend: wall-clock limit of each task in minutes (Slurm --time); a "
    "point stopped by it resumes from its checkpoint when the sweep is run again.",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Set a value for every run, over the grid's base and axes (an axis set this way "
    "has that one value), e.g. --set data-dir=/data --set dataset=cifar10 (repeatable; "
    "VALUE is read as YAML).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the runs and their state (new, unfinished, done) and run nothing.",
)
@click.pass_context
def sweep_command(
    ctx: click.Context,
    grid: Path,
    out_dir: Path | None,
    list_points: bool,
    fmt: str,
    point: int | None,
    sidecar: str | None,
    sweep_id: str | None,
    backend: str,
    parallel: int | None,
    gpus: str | None,
    cluster: str,
    partition: str | None,
    gpus_per_run: int,
    max_parallel: int | None,
    timeout_min: int,
    sets: tuple[str, ...],
    dry_run: bool,
) -> None:
    """Run the cartesian product of GRID.yaml's axes over its base settings.

    Any nclaunch option can be an axis. Every run reports to one ncserve service (started
    for the sweep, database in OUT/service, unless --sidecar or the grid names one) and
    lives in OUT/<name>, named after its values. A rerun skips finished runs and resumes
    the others. Compare the results with: ncserve report OUT --out report.html

    \b
    Examples:
      nclaunch sweep examples/cpu_grid.yaml --out sweeps/cpu --parallel 2
      nclaunch sweep examples/cpu_grid.yaml --list
      nclaunch sweep GRID.yaml --point 3 --out /shared/sweep --sidecar ncserve:50051
      nclaunch sweep GRID.yaml --backend submitit --partition gpu --gpus-per-run 1 \\
          --out /shared/sweep --sidecar login1:50051
    """
    overrides = parse_sets(sets)
    if sidecar is not None:
        overrides[SIDECAR_PATH] = _check_sidecar(sidecar)
    if list_points:
        _refuse(
            ctx,
            ("point", "dry_run", "backend", *_LOCAL_ONLY, *_SUBMITIT_ONLY),
            "not with --list, which runs nothing",
        )
        _print_points(plan_points(grid, overrides), fmt)
        return
    if ctx.get_parameter_source("fmt") is ParameterSource.COMMANDLINE:
        raise UserError("--format: goes with --list")
    if out_dir is None:
        raise UserError("--out: required (the sweep directory), except with --list")
    if point is not None:
        _refuse(
            ctx,
            ("dry_run", "backend", *_LOCAL_ONLY, *_SUBMITIT_ONLY),
            "not with --point, which runs one point here",
        )
        plan = plan_sweep(grid, out_dir, overrides, sweep_id=sweep_id, preflight_all=False)
        from launcher.sweep.point import run_point

        status = run_point(plan, point, console=Console(), output=sys.stdout.buffer)
        if status:
            raise click.exceptions.Exit(status)
        return
    options: SubmititOptions | None = None
    if backend == "submitit":
        _refuse(ctx, _LOCAL_ONLY, "local backend only; with submitit use --max-parallel")
        options = SubmititOptions(
            cluster=cluster,
            partition=partition,
            gpus_per_run=gpus_per_run,
            max_parallel=max_parallel,
            timeout_min=timeout_min,
        )
        options.check()
    else:
        _refuse(ctx, _SUBMITIT_ONLY, "these go with --backend submitit")
    gpu_ids = _parse_gpus(gpus)
    if parallel is None:
        parallel = len(gpu_ids) if gpu_ids else 1
    if gpu_ids is not None and parallel > len(gpu_ids):
        raise UserError(
            f"--parallel {parallel}: more concurrent runs than --gpus "
            f"({len(gpu_ids)}); each run needs its own GPU"
        )
    plan = plan_sweep(grid, out_dir, overrides, sweep_id=sweep_id)
    console = Console()
    if dry_run:
        _dry_run(console, plan)
        return
    try:
        outcome = _run(plan, overrides, options, parallel, gpu_ids, console)
    except KeyboardInterrupt:
        console.print(f"interrupted; rerun the same command to resume the sweep in {out_dir}")
        raise click.exceptions.Exit(130) from None
    _print_outcome(console, plan, outcome)
    if outcome.failed:
        raise click.exceptions.Exit(1)


def _dry_run(console: Console, plan: SweepPlan) -> None:
    console.print(f"{len(plan.runs)} run(s) in {plan.out_dir}", highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("run")
    table.add_column("state")
    for run in plan.runs:
        table.add_row(run.name, run_state(plan, run))
    console.print(table)


def _run(
    plan: SweepPlan,
    overrides: dict[str, Any],
    options: SubmititOptions | None,
    parallel: int,
    gpu_ids: list[str] | None,
    console: Console,
) -> SweepOutcome:
    from launcher.sweep.state import driver_lock, sweep_lock

    if options is not None:
        from launcher.sweep.submitit_backend import run_submitit

        with driver_lock(plan.out_dir):
            return run_submitit(plan, overrides, options, console=console)
    from launcher.sweep.local import run_sweep

    with sweep_lock(plan.out_dir):
        return run_sweep(plan, parallel=parallel, gpus=gpu_ids, console=console)
