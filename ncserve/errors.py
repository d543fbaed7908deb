"""User-facing errors: one clear line, no traceback, exit status 2."""

from __future__ import annotations

import click


class UserError(click.ClickException):
    """A mistake in what the user gave us (a file, a flag, a value).

    Click prints ``Error: <message>`` on one line and exits with ``exit_code``.
    """

    exit_code = 2
