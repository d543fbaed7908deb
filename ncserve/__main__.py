"""``python -m ncserve`` runs the ``ncserve`` command line."""

from ncserve.cli import main

main()
