"""Client commands of the ``ncserve`` CLI: ``runs``, ``query``, ``watch`` and ``push``.

They talk to a running ``ncserve serve`` through ``NCClient``. Every failure a user can cause
or meet (a bad file, an unknown run, an unreachable server, a wrong token) ends as one
``Error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import click
import grpc

from ncserve.cli.compute import format_metrics_table, metrics_json
from ncserve.cli.connection import (
    DB_OPTION,
    client_options,
    connected,
    connection_command,
    reading,
)
from ncserve.client import NCClient, ServiceError
from ncserve.errors import UserError
from ncserve.features import FeaturesFileError, load_features
from ncserve.metrics import METRIC_KEYS, MetricInputError, round1_stats, round2_stats
from ncserve.protocol import RUN_END_STATES, RUN_STATES

# -- output -------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]], min_width: int = 0) -> str:
    cells = [header, *[[_fmt(v) for v in row] for row in rows]]
    widths = [max(min_width, *(len(r[i]) for r in cells)) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


# Streamed rows cannot be measured in advance: every column is at least this wide, enough
# for the 4 significant digits of _fmt ("-1.234e-05") and the status.
_STREAM_WIDTH = 10


def _measurement_table(row: dict[str, Any]) -> str:
    lines = [f"run   {row['run_id']}", f"step  {row['step']}"]
    if row.get("epoch") is not None:
        lines.append(f"epoch {row['epoch']}")
    if row["status"] != "complete":
        lines.append(f"incomplete: {row.get('incomplete_reason', '')}")
        return "\n".join(lines)
    lines.append(format_metrics_table(row))
    extras = {k: row[k] for k in ("holdout_nc4", "holdout_accuracy") if k in row}
    extras.update(row.get("scalars", {}))
    lines.extend(f"{k}  {_fmt(v)}" for k, v in extras.items())
    return "\n".join(lines)


_ROW_KEYS = ["step", "epoch", "status", *METRIC_KEYS]


def _row_cells(row: dict[str, Any]) -> list[Any]:
    return [row.get(k) for k in _ROW_KEYS]


def _json(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(metrics_json(v) for v in value) + "]"
    return metrics_json(value)


FORMAT_OPTION = click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "table"]),
    default="table",
    show_default=True,
    help="json: machine-readable (NaN as null); table: aligned text.",
)


# -- commands ------------------------------------------------------------------------------


@click.command("runs")
@click.option(
    "--state",
    "states",
    type=click.Choice(RUN_STATES),
    multiple=True,
    help="Only runs in this state (repeat for several): running, finished, failed, or "
    "abandoned (nothing arrived for the server's --abandon-after).",
)
@FORMAT_OPTION
@DB_OPTION
@client_options
@connection_command
def runs(opts: dict[str, Any], states: tuple[str, ...], fmt: str, db: Path | None) -> None:
    """List the runs the service (or a --db store) holds, oldest first, with where each is
    in its life."""
    with reading(opts, db) as source:
        found = source.list_runs(states)
    if fmt == "json":
        click.echo(json.dumps(found))
        return
    if not found:
        click.echo("no runs" + (f" in state {', '.join(states)}" if states else ""))
        return
    now = time.time()
    header = ["run_id", "state", "optimizer", "K", "P", "world_size", "measurements",
              "incomplete", "first_step", "latest_step", "last_activity"]  # fmt: skip
    rows = [
        [
            r["run_id"],
            r["state"],
            r["metadata"].get("optimizer"),
            r["num_classes"],
            r["feature_dim"],
            r["world_size"],
            r["num_measurements"],
            r["num_incomplete"],
            r["first_step"],
            r["latest_step"],
            _ago(now - r["last_activity_unix"]),
        ]
        for r in found
    ]
    click.echo(_table(header, rows))


def _ago(seconds: float) -> str:
    """How long ago, in the largest unit that keeps it short."""
    seconds = max(0.0, seconds)
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= scale:
            return f"{seconds / scale:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


@click.command("delete")
@click.argument("run_id", metavar="RUN")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@client_options
@connection_command
def delete(opts: dict[str, Any], run_id: str, yes: bool) -> None:
    """Delete RUN and everything stored of it: measurements, scalars, open steps, and its
    Prometheus series. Needs the same token as every write."""
    if not yes and not click.confirm(f"delete run {run_id!r} and all its data?", default=False):
        raise UserError("not deleted")
    with connected(opts) as client:
        removed = client.delete_run(run_id)
    click.echo(
        f"deleted run {run_id!r}: {removed['num_measurements']} measurements, "
        f"{removed['num_scalar_steps']} steps of scalars"
    )


@click.command("query")
@click.argument("run_id", metavar="RUN")
@click.option("--step", type=click.IntRange(min=0), help="The measurement of this step.")
@click.option("--all", "all_steps", is_flag=True, help="Every measurement of the run, by step.")
@click.option(
    "--include-incomplete",
    is_flag=True,
    help="Also list steps marked incomplete (a rank's shard never arrived).",
)
@FORMAT_OPTION
@DB_OPTION
@client_options
@connection_command
def query(
    opts: dict[str, Any],
    run_id: str,
    step: int | None,
    all_steps: bool,
    include_incomplete: bool,
    fmt: str,
    db: Path | None,
) -> None:
    """Measurements of RUN: the latest (default), one --step, or --all.

    json prints an object for one step and a list of objects with --all; each carries `step`
    and the metric keys `ncserve compute` prints, plus epoch, status and scalars.
    """
    if step is not None and all_steps:
        raise UserError("give either --step S or --all, not both")
    with reading(opts, db) as source:
        result = source.get_metrics(
            run_id, step=step, all_steps=all_steps, include_incomplete=include_incomplete
        )
    if fmt == "json":
        click.echo(_json(result))
    elif isinstance(result, list):
        click.echo(
            _table(_ROW_KEYS, [_row_cells(r) for r in result])
            if result
            else f"run {run_id!r} has no measurements yet"
        )
    else:
        click.echo(_measurement_table(result))


@click.command("watch")
@click.argument("run_id", metavar="RUN")
@click.option(
    "--after-step",
    type=int,
    metavar="S",
    help="First print the stored measurements after step S (-1: all of them).",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    metavar="N",
    help="Exit after N measurements (default: run until interrupted).",
)
@click.option("--include-incomplete", is_flag=True, help="Also print steps marked incomplete.")
@click.option(
    "--reconnect",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to keep reconnecting when the service goes away (e.g. restarts).",
)
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for RUN to be registered when it has not started yet (0: fail at once).",
)
@FORMAT_OPTION
@client_options
@connection_command
def watch(
    opts: dict[str, Any],
    run_id: str,
    after_step: int | None,
    count: int | None,
    include_incomplete: bool,
    reconnect: float,
    wait: float,
    fmt: str,
) -> None:
    """Stream measurements of RUN as they are finalized (one line each; Ctrl-C stops). Waits
    for a run that has not started yet, and exits when the run finishes or fails.

    json prints one JSON object per line; table one row per step.
    """
    with connected(opts) as client:
        # Surface an unreachable service at once, not on the first event.
        _wait_for_run(client, run_id, wait)
        seen = 0
        if fmt == "table":
            click.echo(_table(_ROW_KEYS, [], _STREAM_WIDTH))
        try:
            for row in client.watch(
                run_id,
                after_step=after_step,
                include_incomplete=include_incomplete,
                reconnect_s=reconnect,
            ):
                if fmt == "json":
                    click.echo(metrics_json(row))
                else:
                    line = _table(_ROW_KEYS, [_row_cells(row)], _STREAM_WIDTH).splitlines()[-1]
                    click.echo(line)
                sys.stdout.flush()
                seen += 1
                if count is not None and seen >= count:
                    return
        except KeyboardInterrupt:
            return
        run = client.get_run(run_id)
        if run["state"] in RUN_END_STATES:
            why = f": {run['state_reason']}" if run["state_reason"] else ""
            click.echo(f"run {run_id} {run['state']}{why}", err=True)


def _wait_for_run(client: NCClient, run_id: str, wait_s: float) -> None:
    """Return once RUN is registered; UserError after ``wait_s`` without it."""
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            client.get_run(run_id)
            return
        except ServiceError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:
                raise
            if time.monotonic() >= deadline:
                raise UserError(
                    f"NOT_FOUND: run {run_id!r} did not start within {wait_s:g} s (--wait)"
                ) from None
        if not said:
            click.echo(f"waiting up to {wait_s:g} s for run {run_id} to start...", err=True)
            said = True
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


@click.command("push")
@click.argument(
    "features_file", metavar="FILE.npz", type=click.Path(path_type=Path, dir_okay=False)
)
@click.option("--run", "run_id", required=True, metavar="RUN", help="Run to push to.")
@click.option(
    "--step",
    type=click.IntRange(min=0),
    required=True,
    metavar="S",
    help="Training step of the measurement.",
)
@click.option(
    "--rank",
    type=click.IntRange(min=0),
    required=True,
    metavar="R",
    help="This shard's rank, in [0, world-size).",
)
@click.option(
    "--world-size",
    type=click.IntRange(min=1),
    required=True,
    metavar="N",
    help="Number of shards (ranks) that push this step.",
)
@click.option(
    "--epoch", type=click.IntRange(min=0), metavar="E", help="Training epoch at this step."
)
@click.option(
    "--meta",
    "metadata",
    multiple=True,
    metavar="KEY=VALUE",
    help="Run metadata for the registration (repeatable), e.g. optimizer=sgd.",
)
@click.option(
    "--wait",
    type=click.FloatRange(min=0, min_open=True),
    default=120.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for every rank's round 1 before giving up.",
)
@FORMAT_OPTION
@client_options
@connection_command
def push(
    opts: dict[str, Any],
    features_file: Path,
    run_id: str,
    step: int,
    rank: int,
    world_size: int,
    epoch: int | None,
    metadata: tuple[str, ...],
    wait: float,
    fmt: str,
) -> None:
    """Push one rank's features FILE.npz through both measurement rounds.

    FILE.npz is what `ncserve compute` reads: `features` (N x P), `labels` (N), `weight`
    (K x P), optional `bias` (K) and `num_classes`. The run is registered if needed; round 1
    goes up, the global class means come back once all N ranks have pushed, and round 2
    follows. N concurrent pushes of the shards of a dataset give exactly what
    `ncserve compute` gives on all of them. Prints the measurement once this push
    completes it, otherwise what was pushed.
    """
    if rank >= world_size:
        raise UserError(f"--rank {rank} is outside [0, {world_size}) for --world-size {world_size}")
    meta = {}
    for item in metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--meta must be KEY=VALUE, got {item!r}")
        meta[key] = value
    try:
        shard = load_features(features_file)
    except FeaturesFileError as error:
        raise UserError(str(error)) from None
    K, P = shard.num_classes, shard.feature_dim
    try:
        r1 = round1_stats(shard.features_NP, shard.labels_N, K)
    except MetricInputError as error:
        raise UserError(f"{features_file}: {error}") from None
    with connected(opts) as client:
        unreachable = UserError(
            f"ncserve at {opts['target']} is unreachable "
            f"(no answer within --deadline {opts['deadline']:g} s)"
        )
        if not client.register_run(run_id, K, P, world_size, meta):
            raise unreachable
        if not client.push_round1(
            run_id, step, rank, r1, shard.weight_KP, shard.bias_K, epoch=epoch
        ):
            raise unreachable
        means = client.fetch_class_means(run_id, step, timeout_s=wait, rank=rank)
        if means is None:
            raise UserError(
                f"round 1 of step {step} of run {run_id!r} did not complete within "
                f"--wait {wait:g} s: are all {world_size} ranks pushing?"
            )
        try:
            r2 = round2_stats(
                shard.features_NP, shard.labels_N, means, shard.weight_KP, shard.bias_K
            )
        except MetricInputError as error:
            raise UserError(f"{features_file}: {error}") from None
        if not client.push_round2(
            run_id, step, rank, r2, epoch=epoch, num_classes=K, feature_dim=P
        ):
            raise UserError(
                f"round 2 of step {step} was not delivered within --deadline "
                f"{opts['deadline']:g} s (service unreachable, or round 1 "
                "incomplete)"
            )
        try:
            row: dict[str, Any] | None = client.get_metrics(run_id, step=step)  # type: ignore[assignment]
        except ServiceError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:
                raise
            row = None  # other ranks' round 2 is still on its way
    if row is not None and fmt == "json":
        click.echo(metrics_json(row))
    elif row is not None:
        click.echo(_measurement_table(row))
    elif fmt == "json":
        click.echo(
            json.dumps(
                {
                    "run_id": run_id,
                    "step": step,
                    "rank": rank,
                    "num_samples": int(shard.labels_N.shape[0]),
                    "pushed": True,
                }
            )
        )
    else:
        click.echo(
            f"pushed rank {rank} of step {step} of run {run_id!r} "
            f"({shard.labels_N.shape[0]} samples); waiting for other ranks' round 2"
        )
