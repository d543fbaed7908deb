"""The metric engine: exact, sharded Neural Collapse metrics in float64 (pure numpy, no I/O).

See docs/metrics.md for the definitions and conventions, and docs/CONTRACTS.md for the API.
"""

import numpy as np

from ncserve.metrics.errors import MetricInputError
from ncserve.metrics.finalize import (
    METRIC_KEYS,
    PreparedFinalize,
    complete_finalize,
    finalize,
    nc0_from_weight,
    prepare_finalize,
    rank_tolerance,
)
from ncserve.metrics.stats import (
    ClassMeans,
    Round1Stats,
    Round2Stats,
    round1_stats,
    round2_stats,
)

__all__ = [
    "METRIC_KEYS",
    "ClassMeans",
    "MetricInputError",
    "PreparedFinalize",
    "Round1Stats",
    "Round2Stats",
    "complete_finalize",
    "compute_metrics",
    "finalize",
    "nc0_from_weight",
    "prepare_finalize",
    "rank_tolerance",
    "round1_stats",
    "round2_stats",
]


def compute_metrics(
    h_NP: np.ndarray,
    y_N: np.ndarray,
    w_KP: np.ndarray,
    b_K: np.ndarray | None = None,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Both rounds and the finalizer on one in-memory block of features (a convenience)."""
    K = int(w_KP.shape[0]) if num_classes is None else int(num_classes)
    r1 = round1_stats(h_NP, y_N, K)
    r2 = round2_stats(h_NP, y_N, r1.class_means(), w_KP, b_K)
    return finalize(r1, r2, w_KP, b_K)
