"""Both rounds' statistics computed with torch on the features' own device (a GPU, where the
features of a measurement already are), accumulated in float64.

Legend: N samples, K classes, P feature dim, B rows of one block, d = min(K, P).

``ncserve.metrics.round1_stats`` and ``round2_stats`` dispatch here when given a torch
tensor; this module is imported only then, so the numpy engine never needs torch. The
features never become a numpy array: each block of rows is cast to float64 on the device,
and only the statistics (K x P sums, d x d scatter, K sums of squares, counts) come back to
the host, as the same ``Round1Stats`` / ``Round2Stats`` the numpy engine makes. Any float
dtype is accepted (bf16, fp16, fp32, fp64): the products and sums are float64, so the
result equals the numpy engine's on the same values to round-off.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ncserve.metrics.errors import MetricInputError
from ncserve.metrics.stats import (
    ClassMeans,
    Round1Stats,
    Round2Stats,
    check_label_range,
    check_shapes,
)

# Elements of one float64 block (rows x max(P, 2K)): 32 MB on the device.
BLOCK_ELEMENTS = 1 << 22


def _check(h_NP: torch.Tensor, y_N: torch.Tensor, num_classes: int) -> None:
    check_shapes(tuple(h_NP.shape), tuple(y_N.shape), num_classes)
    if h_NP.is_complex() or h_NP.dtype == torch.bool:
        raise MetricInputError(f"features must be real numbers, got dtype {h_NP.dtype}")
    if y_N.is_floating_point() or y_N.is_complex() or y_N.dtype == torch.bool:
        raise MetricInputError(f"labels must be integers, got dtype {y_N.dtype}")
    if y_N.numel():
        check_label_range(int(y_N.min()), int(y_N.max()), num_classes)


def _blocks(num_rows: int, width: int) -> Iterator[slice]:
    rows = max(1, BLOCK_ELEMENTS // max(1, width))
    for start in range(0, num_rows, rows):
        yield slice(start, min(num_rows, start + rows))


def _non_finite(h_NP: torch.Tensor) -> MetricInputError:
    bad = (~torch.isfinite(h_NP)).nonzero()
    where = f" (first at row {int(bad[0, 0])}, column {int(bad[0, 1])})" if len(bad) else ""
    return MetricInputError(f"features contain NaN or Inf{where}")


def _host(values: torch.Tensor) -> np.ndarray:
    return values.detach().to("cpu").numpy()


def round1_stats(
    h_NP: torch.Tensor, y_N: torch.Tensor | np.ndarray, num_classes: int
) -> Round1Stats:
    """Counts and class sums of a block of features, on their device, in float64."""
    y_N = torch.as_tensor(y_N, device=h_NP.device)
    _check(h_NP, y_N, num_classes)
    K, P = num_classes, h_NP.shape[1]
    y_N = y_N.long()
    sums_KP = torch.zeros(K, P, dtype=torch.float64, device=h_NP.device)
    for rows in _blocks(h_NP.shape[0], P):
        sums_KP.index_add_(0, y_N[rows], h_NP[rows].to(torch.float64))
    if not bool(torch.isfinite(sums_KP).all()):
        raise _non_finite(h_NP)
    counts_K = torch.bincount(y_N, minlength=K)
    return Round1Stats(_host(counts_K).astype(np.int64), _host(sums_KP))


def round2_stats(
    h_NP: torch.Tensor,
    y_N: torch.Tensor | np.ndarray,
    class_means: ClassMeans,
    w_KP: torch.Tensor | np.ndarray,
    b_K: torch.Tensor | np.ndarray | None = None,
) -> Round2Stats:
    """Round-2 statistics of a block of features given the global class means, on the
    features' device, in float64 (see ncserve.metrics.stats.round2_stats for the meaning)."""
    device = h_NP.device
    y_N = torch.as_tensor(y_N, device=device)
    K, P = class_means.num_classes, class_means.feature_dim
    _check(h_NP, y_N, K)
    if h_NP.shape[1] != P:
        raise MetricInputError(
            f"features have feature_dim {h_NP.shape[1]} but the class means have {P}"
        )

    def on_device(values: torch.Tensor | np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values).to(device=device, dtype=torch.float64)

    w = on_device(w_KP)
    if tuple(w.shape) != (K, P):
        raise MetricInputError(f"weight must have shape (K, P) = {(K, P)}, got {tuple(w.shape)}")
    b = torch.zeros(K, dtype=torch.float64, device=device) if b_K is None else on_device(b_K)
    if tuple(b.shape) != (K,):
        raise MetricInputError(f"bias must have shape (K,) = {(K,)}, got {tuple(b.shape)}")
    means_KP = on_device(class_means.means_KP)
    global_P = on_device(class_means.global_mean_P)
    mubar_KP = means_KP - global_P
    mean_sq_K = (mubar_KP * mubar_KP).sum(dim=1)
    projected = K <= P
    d = Round2Stats.scatter_dim(K, P)
    scatter = torch.zeros(d, d, dtype=torch.float64, device=device)
    sq_resid_K = torch.zeros(K, dtype=torch.float64, device=device)
    agree = torch.zeros((), dtype=torch.int64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    y_N = y_N.long()
    for rows in _blocks(h_NP.shape[0], max(P, 2 * K)):
        h = h_NP[rows].to(torch.float64)
        y = y_N[rows]
        r = h - means_KP[y]  # within-class residuals around the global class means
        sq_resid_K.index_add_(0, y, (r * r).sum(dim=1))
        if projected:
            q = r @ mubar_KP.T
            scatter += q.T @ q
        else:
            scatter += r.T @ r
        # argmin_k ||h - mu_k||^2 == argmin_k ||mubar_k||^2 - 2 (h - mu_G).mubar_k
        nearest = torch.argmin(mean_sq_K - 2.0 * ((h - global_P) @ mubar_KP.T), dim=1)
        predicted = torch.argmax(h @ w.T + b, dim=1)
        agree += (predicted == nearest).sum()
        correct += (predicted == y).sum()
    if not (bool(torch.isfinite(scatter).all()) and bool(torch.isfinite(sq_resid_K).all())):
        raise _non_finite(h_NP)
    return Round2Stats(
        int(h_NP.shape[0]), _host(scatter), _host(sq_resid_K), int(agree), int(correct)
    )
