"""``ncserve replay``: deliver what a run's clients left in their spools.

A rank whose service was unreachable until the end of training leaves its undelivered calls
in ``RUN_DIR/spool/rank<R>/`` (the client's ``close()`` writes them there). This command opens
one client per spool and replays them all at once: a rank's round 2 is only accepted once
every rank's round 1 is in, so replaying the spools one after the other would stall on the
first. It then says exactly what was delivered, and what was not (still waiting, refused by
the service, or lost to the buffer's limit or a damaged spool file).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

from ncserve.cli.client_cmds import FORMAT_OPTION
from ncserve.cli.connection import client_options, connection_command, make_client
from ncserve.client import DeliveryReport, NCClient
from ncserve.client.buffer import BufferKey, SpoolInUseError
from ncserve.errors import UserError


class UndeliveredError(click.ClickException):
    """Some calls were not delivered: exit status 1 (not a usage error), after the report."""

    exit_code = 1


def find_spools(paths: tuple[Path, ...]) -> list[Path]:
    """The spool folders under each path: ``PATH/spool/*/`` of a run directory, or PATH itself
    when it is a spool (holds ``*.spool`` files or the client's ``spool.lock``)."""
    spools: list[Path] = []
    for path in paths:
        if (path / "spool").is_dir():
            found = sorted(d for d in (path / "spool").iterdir() if d.is_dir())
            if not found:
                raise UserError(f"{path}: its spool/ folder holds no per-rank spool")
            spools.extend(found)
        elif (path / "spool.lock").exists() or any(path.glob("*.spool")):
            spools.append(path)
        else:
            raise UserError(
                f"{path}: not a run directory with spool/<rank>/ folders, nor a spool "
                "(a folder of *.spool files)"
            )
    duplicates = {str(s) for s in spools if spools.count(s) > 1}
    if duplicates:
        raise UserError(f"spool given twice: {', '.join(sorted(duplicates))}")
    return spools


def _open(opts: dict[str, Any], spool: Path) -> NCClient:
    try:
        return make_client(opts, spill_dir=spool)
    except SpoolInUseError:
        raise UserError(f"{spool}: in use by another process (is the run still going?)") from None


def _spool_json(spool: Path, found: int, report: DeliveryReport) -> dict[str, Any]:
    """One spool's outcome; every call is its key (kind, run_id, step, rank, round)."""
    return {
        "spool": str(spool),
        "found": found,
        "delivered": report.delivered,
        "left": [key.to_json() for key in report.buffered],
        "rejected": [
            {**r.key.to_json(), "code": r.code, "details": r.details} for r in report.rejected
        ],
        "dropped": [
            {**d.key.to_json(), "bytes": d.nbytes, "reason": d.reason} for d in report.dropped
        ],
    }


def _call(item: dict[str, Any]) -> str:
    return str(BufferKey.from_json(item))


@click.command("replay")
@click.argument(
    "paths",
    nargs=-1,
    required=True,
    metavar="RUN_DIR_OR_SPOOL...",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=120.0,
    show_default=True,
    metavar="SECONDS",
    help="Stop replaying after this long; what is left stays in the spool for a later replay.",
)
@FORMAT_OPTION
@client_options
@connection_command
def replay(opts: dict[str, Any], paths: tuple[Path, ...], timeout: float, fmt: str) -> None:
    """Deliver the calls left in the spools of a run (RUN_DIR/spool/<rank>/) to the service.

    Use it when the service was unreachable until a run ended: the ranks finished training,
    and their clients kept every measurement on disk. All spools are replayed at once, in
    each spool's original order; a call the service has already is recognised, not counted
    twice. Exit status 0 when everything was delivered, 1 when some calls were not (each is
    listed: still waiting, refused by the service, or dropped by the client).
    """
    spools = find_spools(paths)
    clients: list[NCClient] = []
    try:
        for spool in spools:
            clients.append(_open(opts, spool))
        # Damaged spool files are reported as dropped when the spool is opened.
        found = [len(r.buffered) + len(r.dropped) for r in (c.report() for c in clients)]
        with ThreadPoolExecutor(max_workers=len(clients)) as pool:
            list(pool.map(lambda c: c.flush(timeout_s=timeout), clients))
    finally:
        # Whatever is left is written back to its spool for the next replay.
        reports = [c.close(timeout_s=0) for c in clients]
    rows = [_spool_json(s, n, r) for s, n, r in zip(spools, found, reports, strict=True)]
    if fmt == "json":
        click.echo(json.dumps(rows))
    else:
        for row in rows:
            click.echo(
                f"{row['spool']}: {row['found']} found, {row['delivered']} delivered, "
                f"{len(row['left'])} left, {len(row['rejected'])} rejected, "
                f"{len(row['dropped'])} dropped"
            )
            for item in row["left"]:
                click.echo(f"  left: {_call(item)}")
            for item in row["rejected"]:
                click.echo(f"  rejected: {_call(item)}: {item['code']}: {item['details']}")
            for item in row["dropped"]:
                click.echo(f"  dropped: {_call(item)} ({item['bytes']} bytes): {item['reason']}")
    missing = sum(len(r["left"]) + len(r["rejected"]) + len(r["dropped"]) for r in rows)
    if missing:
        raise UndeliveredError(
            f"{missing} of {sum(found)} calls were not delivered "
            f"(left in the spool: {sum(len(r['left']) for r in rows)})"
        )
