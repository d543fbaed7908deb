"""The ``ncserve`` command line. Each subcommand lives in its own module."""

from __future__ import annotations

import click

from ncserve import __version__
from ncserve.cli.client_cmds import delete, push, query, runs, watch
from ncserve.cli.compute import compute
from ncserve.cli.replay import replay
from ncserve.cli.report import report
from ncserve.cli.serve import serve
from ncserve.cli.theory import theory_group


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ncserve")
def cli() -> None:
    """ncserve: exact Neural Collapse metrics (NC0-NC4) for distributed training runs.

    Compute metrics from saved features, run the metrics service that training
    ranks report to, and query, watch or report on the runs it holds.
    """


cli.add_command(compute)
cli.add_command(serve)
cli.add_command(report)
cli.add_command(theory_group)
for _client_command in (runs, query, watch, push, replay, delete):
    cli.add_command(_client_command)


def main() -> None:
    cli()
