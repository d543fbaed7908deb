"""One line per run that says what its measurements mean for Neural Collapse, by the same
reading the alerts use: fitted (the measurement split's accuracy reached 99 %), then whether
NC0 kept falling from the fit to the end, as only coupled weight decay makes it fall."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# The paper's cut for runs in the terminal phase of training, and the fall of NC0 that
# counts as decaying between the fit and the last measurement (the Onset alert's 5 %).
FITTED_ACCURACY = 0.99
DECAYING_RATIO = 0.95


def _value(row: Mapping[str, Any], key: str) -> float | None:
    value = row.get(key)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def verdict(rows: Sequence[Mapping[str, Any]]) -> str:
    """What the run's NC0 says, in one line (rows: measurements by step)."""
    accuracies = [_value(r, "accuracy") for r in rows]
    best = max((a for a in accuracies if a is not None), default=None)
    if best is None:
        return "no measurement accuracy yet: nothing to judge"
    if best < FITTED_ACCURACY:
        return (
            f"not fitted yet (best measurement accuracy {best:.3f} < {FITTED_ACCURACY}): "
            "too early to judge collapse"
        )
    fit = next(i for i, a in enumerate(accuracies) if a is not None and a >= FITTED_ACCURACY)
    start, end = _value(rows[fit], "nc0"), _value(rows[-1], "nc0")
    where = f"epoch {rows[fit].get('epoch')}"
    if start is None or end is None or fit == len(rows) - 1:
        return f"fitted at {where}, the last measurement: too early to judge collapse"
    ratio = end / start if start > 0 else math.nan
    if ratio < DECAYING_RATIO:
        return (
            f"NC0 decaying: x{1 / ratio:.3g} smaller since the fit at {where}, as coupled "
            "weight decay makes it; collapse under way"
        )
    return (
        f"NC0 not decaying: x{ratio:.3g} since the fit at {where}; collapse blocked "
        "(decoupled weight decay, or none)"
    )
