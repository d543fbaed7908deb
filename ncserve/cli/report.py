"""``ncserve report``: compare runs (or whole sweeps) in one PNG or self-contained HTML file."""

from __future__ import annotations

from pathlib import Path

import click

from ncserve.errors import UserError


@click.command("report")
@click.argument(
    "inputs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="DIR_OR_RUN..."
)
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
def report(inputs: tuple[Path, ...], out: Path, title: str, min_train_acc: float) -> None:
    """Compare the runs in DIR_OR_RUN... (nclaunch run directories or sweep directories).

    Draws every NC metric against epoch per run (log scale, one colour per optimizer) with
    the exact nc0 of sgd/sgdw runs overlaid, the final metrics as in the paper's Table 2
    with their change relative to initialization, final nc0 against nc3, and a momentum x
    weight decay heatmap of nc0 when the runs span both.

    \b
    Example:  ncserve report sweeps/cpu --out report.html
    """
    from ncserve.report import REPORT_SUFFIXES, RunInputError, build_report, load_runs
    from ncserve.report import write_report as write

    if out.suffix.lower() not in REPORT_SUFFIXES:
        raise UserError(
            f"--out: {str(out)!r} must end in .png or .html (got {out.suffix or 'no suffix'!r})"
        )
    try:
        records = load_runs(list(inputs))
    except (RunInputError, OSError) as err:
        raise UserError(str(err)) from None
    built = build_report(records, title=title, min_train_acc=min_train_acc)
    if not built.records:
        raise UserError(
            f"--min-train-acc {min_train_acc:g}: none of the {len(records)} run(s) reaches it"
        )
    try:
        write(built, out)
    except OSError as err:
        raise UserError(f"--out: cannot write {str(out)!r}: {err.strerror}") from None
    except ValueError as err:
        raise UserError(str(err)) from None
    left_out = f", {len(built.excluded)} left out below --min-train-acc" if built.excluded else ""
    click.echo(f"wrote {out}: {len(built.records)} run(s){left_out}")
