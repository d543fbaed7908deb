"""Comparison reports over nclaunch runs and sweeps: ``ncserve report``.

``load_runs`` reads run directories (``metrics.jsonl`` + ``config.yaml``) or sweep
directories; ``load_service_runs`` reads the runs (of a sweep) from the ncserve service or
its database file; ``build_report`` computes the final-metrics tables, the momentum x
weight decay grids and the exact nc0 of sgd/sgdw runs, and draws the figures;
``write_report`` writes them as one PNG or one self-contained HTML file.

Names are imported on first use: training workers import ``ncserve.report.settings``
without pulling in matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers (re-exported)
    from ncserve.report.render import REPORT_SUFFIXES as REPORT_SUFFIXES
    from ncserve.report.render import Report as Report
    from ncserve.report.render import build_report as build_report
    from ncserve.report.render import write_report as write_report
    from ncserve.report.runs import NC0Prediction as NC0Prediction
    from ncserve.report.runs import RunInputError as RunInputError
    from ncserve.report.runs import RunRecord as RunRecord
    from ncserve.report.runs import find_run_dirs as find_run_dirs
    from ncserve.report.runs import load_run as load_run
    from ncserve.report.runs import load_runs as load_runs
    from ncserve.report.runs import nc0_prediction as nc0_prediction
    from ncserve.report.service import load_service_runs as load_service_runs

_HOMES = {
    "REPORT_SUFFIXES": "render",
    "Report": "render",
    "build_report": "render",
    "write_report": "render",
    "NC0Prediction": "runs",
    "RunInputError": "runs",
    "RunRecord": "runs",
    "find_run_dirs": "runs",
    "load_run": "runs",
    "load_runs": "runs",
    "nc0_prediction": "runs",
    "load_service_runs": "service",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
