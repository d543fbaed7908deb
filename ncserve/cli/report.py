"""``ncserve report``: compare runs (or whole sweeps) in one PNG or self-contained HTML file,
from run directories or from the ncserve service (or its database file) alone."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from ncserve.cli.connection import DB_OPTION, client_options, connection_command, reading
from ncserve.errors import UserError

if TYPE_CHECKING:
    from ncserve.report import RunRecord


@click.command("report")
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path), metavar="[DIR_OR_RUN]...")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="report.png (one image, sections stacked) or report.html (one file, images "
    "embedded, opens offline).",
)
@click.option("--title", default="", help="Title of the report.  [default: how many runs]")
@click.option(
    "--min-train-acc",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Leave out runs whose final train accuracy is below this (the paper keeps "
    "runs at 0.99 or more).",
)
@click.option(
    "--sweep",
    metavar="ID",
    help="With --target or --db: only the runs of this sweep (the --sweep-id they were "
    "launched with).  [default: every run there]",
)
@DB_OPTION
@client_options
@connection_command
def report(
    opts: dict[str, Any],
    inputs: tuple[Path, ...],
    out: Path,
    title: str,
    min_train_acc: float,
    sweep: str | None,
    db: Path | None,
) -> None:
    """Compare the runs in DIR_OR_RUN... (nclaunch run directories or sweep directories),
    or, without them, the runs the service at --target (or the store file --db) holds.

    Draws every NC metric against epoch per run (log scale, one colour per optimizer) with
    the exact nc0 of sgd/sgdw runs overlaid, the final metrics as in the paper's Table 2
    with their change relative to initialization, final nc0 against nc3, and a momentum x
    weight decay heatmap of nc0 when the runs span both.

    A sweep whose points trained on machines sharing no filesystem is reported from the
    service alone: --sweep ID picks its runs by the sweep id nclaunch sent.

    \b
    Examples:
      ncserve report sweeps/cpu --out report.html
      ncserve report --target metrics.lab:50051 --sweep lr-grid --out report.html
      ncserve report --db service/ncserve.db --sweep lr-grid --out report.png
    """
    from ncserve.report import REPORT_SUFFIXES, RunInputError, build_report, write_report

    if out.suffix.lower() not in REPORT_SUFFIXES:
        raise UserError(
            f"--out: {str(out)!r} must end in .png or .html (got {out.suffix or 'no suffix'!r})"
        )
    target_given = (
        click.get_current_context().get_parameter_source("target") == ParameterSource.COMMANDLINE
    )
    if inputs and (target_given or db is not None):
        raise UserError(
            "give run or sweep directories, or --target/--db to read the service's runs, not both"
        )
    if target_given and db is not None:
        raise UserError("give either --target (a running service) or --db (its store file)")
    if inputs and sweep is not None:
        raise UserError(
            "--sweep picks runs at --target or in --db; for directories, give the sweep's "
            "directory instead"
        )
    try:
        records = _records(opts, inputs, db, sweep)
    except (RunInputError, OSError) as err:
        raise UserError(str(err)) from None
    built = build_report(records, title=title, min_train_acc=min_train_acc)
    if not built.records:
        raise UserError(
            f"--min-train-acc {min_train_acc:g}: none of the {len(records)} run(s) reaches it"
        )
    try:
        write_report(built, out)
    except OSError as err:
        raise UserError(f"--out: cannot write {str(out)!r}: {err.strerror}") from None
    except ValueError as err:
        raise UserError(str(err)) from None
    left_out = f", {len(built.excluded)} left out below --min-train-acc" if built.excluded else ""
    click.echo(f"wrote {out}: {len(built.records)} run(s){left_out}")


def _records(
    opts: dict[str, Any], inputs: tuple[Path, ...], db: Path | None, sweep: str | None
) -> list[RunRecord]:
    """The runs of the directories given, or of the service (--target) or store (--db)."""
    from ncserve.report import load_runs, load_service_runs

    if inputs:
        return load_runs(list(inputs))
    where = f"the store {db}" if db is not None else f"ncserve at {opts['target']}"
    with reading(opts, db) as source:
        return load_service_runs(source, where, sweep)
