"""The ``nclaunch`` command: checks the training extra is installed, then runs the CLI.

The base ``ncserve`` install (service, client, reports) has no torch; without the extra,
nclaunch says in one line what to install instead of a traceback.
"""

from __future__ import annotations

import importlib.util
import sys

# Import names of the `train` extra's packages (pyproject.toml).
TRAIN_MODULES = ("torch", "deepspeed", "mlxtend", "sklearn", "mnist1d")


def missing_train_modules() -> list[str]:
    return [name for name in TRAIN_MODULES if importlib.util.find_spec(name) is None]


def main() -> None:
    missing = missing_train_modules()
    if missing:
        print(
            f"Error: nclaunch needs the training extra ({', '.join(missing)} not installed): "
            "pip install 'ncserve[train]' (on a GPU machine, install the CUDA build of "
            "torch first)",
            file=sys.stderr,
        )
        sys.exit(2)
    from launcher.cli import main as cli_main

    cli_main()
