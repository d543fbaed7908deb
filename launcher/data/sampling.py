"""Seeded, per-class balanced subsets: the measurement split and the held-out carve-out."""

from __future__ import annotations

import numpy as np
import torch


def _as_labels(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    array = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array, got dtype {array.dtype} and shape {array.shape}"
        )
    return array


def measurement_indices(
    labels: np.ndarray | torch.Tensor, per_class: int | None, seed: int
) -> np.ndarray:
    """Sorted int64 indices of ``per_class`` samples drawn from every class present.

    ``per_class=None`` selects every sample. The draw depends only on ``labels``
    and ``seed``, so every rank and every restart picks the same subset. A class
    with fewer than ``per_class`` samples is an error rather than a silently
    unbalanced subset: the global feature mean equals the mean of the class means
    only on balanced classes, and the measurement split is meant to be one.
    """
    array = _as_labels(labels)
    if per_class is None:
        return np.arange(len(array), dtype=np.int64)
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be a positive integer or None, got {per_class!r}")
    if len(array) == 0:
        raise ValueError("labels is empty: there is nothing to measure on")
    classes, counts = np.unique(array, return_counts=True)
    if counts.min() < per_class:
        smallest = int(np.argmin(counts))
        raise ValueError(
            f"per_class={per_class} but class {int(classes[smallest])} has only "
            f"{int(counts[smallest])} samples; use per_class <= {int(counts[smallest])} "
            "or None for all samples"
        )
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(array == label), size=per_class, replace=False)
        for label in classes
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def stratified_holdout(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices), each sorted; ``fraction`` of every class held out.

    Every class keeps at least one training sample.
    """
    array = _as_labels(labels)
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(array):
        members = rng.permutation(np.flatnonzero(array == label))
        count = min(round(len(members) * fraction), len(members) - 1)
        held.append(members[:count])
    holdout = np.sort(np.concatenate(held)).astype(np.int64)
    if len(holdout) == 0:
        raise ValueError(
            f"holdout_fraction={fraction} of {len(array)} samples holds out no sample; "
            "use a larger fraction"
        )
    train = np.setdiff1d(np.arange(len(array), dtype=np.int64), holdout)
    return train, holdout
