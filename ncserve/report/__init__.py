"""Comparison reports over nclaunch runs and sweeps: ``ncserve report``.

``load_runs`` reads run directories (``metrics.jsonl`` + ``config.yaml``) or sweep
directories; ``build_report`` computes the final-metrics tables, the momentum x weight
decay grids and the exact nc0 of sgd/sgdw runs, and draws the figures; ``write_report``
writes them as one PNG or one self-contained HTML file.
"""

from ncserve.report.render import REPORT_SUFFIXES, Report, build_report, write_report
from ncserve.report.runs import (
    NC0Prediction,
    RunInputError,
    RunRecord,
    find_run_dirs,
    load_run,
    load_runs,
    nc0_prediction,
)

__all__ = [
    "REPORT_SUFFIXES",
    "NC0Prediction",
    "Report",
    "RunInputError",
    "RunRecord",
    "build_report",
    "find_run_dirs",
    "load_run",
    "load_runs",
    "nc0_prediction",
    "write_report",
]
