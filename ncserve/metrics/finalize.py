"""Finalize NC0..NC4 (and variants) from merged round-1 and round-2 statistics, in float64.

Legend: K classes, P feature dim; ``mubar_KP`` rows are mu_k - mu_G (so M = mubar_KP.T),
``w_KP`` the last-layer weight, ``b_K`` its bias.

Nothing here forms a P x P within-class covariance when K <= P, and nothing forms a
K x K matrix when K > P: pairwise quantities are computed in row tiles and the ETF
distances through trace identities. Conventions are documented in docs/metrics.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ncserve.metrics.errors import MetricInputError
from ncserve.metrics.stats import Round1Stats, Round2Stats, block_rows

METRIC_KEYS: tuple[str, ...] = (
    "nc0",
    "nc0_normalized",
    "nc1",
    "nc1_trace_ratio",
    "cdnv",
    "nc2_norm",
    "nc2_angle",
    "nc2",
    "nc2w_norm",
    "nc2w_angle",
    "nc2w",
    "nc2m",
    "nc3",
    "nc4",
    "accuracy",
)

_EPS = float(np.finfo(np.float64).eps)


def rank_tolerance(singular_values: np.ndarray, shape: tuple[int, int]) -> float:
    """Singular values at or below this are treated as exact zeros.

    The float64 machine epsilon times the largest dimension, relative to the largest singular
    value of M itself (not of M^T M, whose eigenvalues square the condition number): small
    but real between-class directions, which dominate NC1 at K = 1000, are kept.
    """
    if singular_values.size == 0:
        return 0.0
    return float(singular_values.max()) * max(shape) * _EPS


def nc0_from_weight(w_KP: np.ndarray) -> tuple[float, float]:
    """(nc0, nc0_normalized): ||W^T 1_K||_2 and the same divided by ||W||_F."""
    w64 = np.asarray(w_KP, dtype=np.float64)
    if w64.ndim != 2:
        raise MetricInputError(f"weight must be 2-D (K x P), got shape {w64.shape}")
    if not np.isfinite(w64).all():
        raise MetricInputError("weight contains NaN or Inf")
    nc0 = float(np.linalg.norm(w64.sum(axis=0)))
    frob = float(np.linalg.norm(w64))
    return nc0, (nc0 / frob if frob > 0 else math.nan)


def _etf_distance_direct(gram_KK: np.ndarray) -> float:
    """|| G/||G||_F - Mstar ||_F with Mstar = (I - 11^T/K)/sqrt(K-1), formed explicitly."""
    K = gram_KK.shape[0]
    norm = np.linalg.norm(gram_KK)
    if norm == 0:
        return math.nan
    target = (np.eye(K) - np.full((K, K), 1.0 / K)) / math.sqrt(K - 1)
    return float(np.linalg.norm(gram_KK / norm - target))


def _etf_distance_identity(trace: float, total: float, frob: float, K: int) -> float:
    """The same distance from <G, Mstar> = (Tr G - 1^T G 1 / K) / sqrt(K-1) and ||Mstar||_F = 1.

    Used when K > P, where G has rank <= P < K-1 and so cannot be near the ETF: the
    cancellation in 2 - 2<.,.> that would hurt near collapse cannot occur there.
    """
    if frob == 0:
        return math.nan
    inner = (trace - total / K) / math.sqrt(K - 1)
    return math.sqrt(max(0.0, 2.0 - 2.0 * inner / frob))


def _upper_tiles(x_KP: np.ndarray) -> Iterator[tuple[slice, slice, np.ndarray, np.ndarray]]:
    """Row tiles of the Gram x x^T on and above the diagonal: (rows, cols, tile, mask of the
    tile's entries strictly above the diagonal, l > k, so each unordered pair counts once).

    Only these tiles are formed (half the work), and no K x K matrix is ever held whole, so
    K = 20,000 stays within a bounded working set.
    """
    K = x_KP.shape[0]
    rows = block_rows(K, K)
    for start in range(0, K, rows):
        sl = slice(start, min(K, start + rows))
        cols = slice(start, K)
        upper = np.arange(cols.start, cols.stop)[None, :] > np.arange(sl.start, sl.stop)[:, None]
        yield sl, cols, x_KP[sl] @ x_KP[cols].T, upper


def _equinorm(x_KP: np.ndarray) -> float:
    norms = np.linalg.norm(x_KP, axis=1)
    mean = float(norms.mean())
    return float(norms.std()) / mean if mean > 0 else math.nan


def _angles_and_inverse_distances(
    x_KP: np.ndarray, distances: bool
) -> tuple[float, np.ndarray | None]:
    """Equiangularity mean_{k!=l} |cos(x_k, x_l) + 1/(K-1)| and, when ``distances``, for each
    k the sum over l != k of 1 / ||x_k - x_l||^2 (what the CDNV needs of the means).

    Both come from the same Gram tiles. The CDNV, mean_{k!=l} (var_k + var_l) / (2 d_kl),
    equals sum_k var_k * (sum_{l!=k} 1 / d_kl) / (K (K-1)), so the variances, known only
    after round 2, enter through one dot product (see ``_cdnv``).
    """
    K = x_KP.shape[0]
    sq_K = np.einsum("kp,kp->k", x_KP, x_KP)
    norms_K = np.sqrt(sq_K)
    shift = 1.0 / (K - 1)
    angle_sum = 0.0
    inverse_K = np.zeros(K) if distances else None
    for rows, cols, gram, upper in _upper_tiles(x_KP):
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = gram / (norms_K[rows, None] * norms_K[None, cols])
            angle_sum += float(np.sum(np.abs(cos + shift), where=upper))
            if inverse_K is not None:
                dist_sq = sq_K[rows, None] + sq_K[None, cols] - 2.0 * gram
                inverse = np.where(upper, 1.0 / dist_sq, 0.0)
                inverse_K[rows] += inverse.sum(axis=1)
                inverse_K[cols] += inverse.sum(axis=0)
    angle = 2.0 * angle_sum / (K * (K - 1)) if (norms_K > 0).all() else math.nan
    return angle, inverse_K


def _cdnv(var_K: np.ndarray, inverse_K: np.ndarray) -> float:
    K = var_K.size
    with np.errstate(invalid="ignore"):
        return float(var_K @ inverse_K) / (K * (K - 1))


def _gram_etf_distance(x_KP: np.ndarray) -> float:
    """Distance of the Gram x x^T (K x K), scale-normalized, to the simplex ETF."""
    K, P = x_KP.shape
    if K <= P:
        return _etf_distance_direct(x_KP @ x_KP.T)
    colsum_P = x_KP.sum(axis=0)
    # ||x x^T||_F == ||x^T x||_F, a P x P product.
    frob = float(np.linalg.norm(x_KP.T @ x_KP))
    return _etf_distance_identity(float(np.sum(x_KP * x_KP)), float(colsum_P @ colsum_P), frob, K)


def _nc1_basis(mubar_KP: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """What NC1 needs of M alone: the kept singular vectors on the small side and the
    weight of each (None when M is numerically zero).

    NC1 = Tr(Sigma_W Sigma_B^+) / K = sum_i weight_i * basis_i^T (S/N) basis_i with S the
    shipped scatter. M = U S V^T (mubar_KP = V S U^T). K <= P: basis V, weight 1/s^4 (since
    (M M^T)^+ = M (M^T M)^+2 M^T and S is the K x K projected scatter); K > P: basis U,
    weight 1/s^2. Only the small side is needed: a QR of the tall orientation reduces M to
    its d x d triangle with the same singular values, whose SVD gives them (d = min(K, P)).
    """
    K, P = mubar_KP.shape
    tall = mubar_KP.T if K <= P else mubar_KP
    _, s_R, vt_RR = np.linalg.svd(np.linalg.qr(tall, mode="r"))
    keep = s_R > rank_tolerance(s_R, (K, P))
    if not keep.any():
        return None
    s = s_R[keep]
    return vt_RR[keep].T, (1.0 / s**4 if K <= P else 1.0 / s**2)


def _nc1(basis: tuple[np.ndarray, np.ndarray] | None, scatter: np.ndarray, n: int) -> float:
    if basis is None:
        return math.nan
    small, weight = basis
    # basis_i^T S basis_i for every i: one BLAS product (S @ basis) and a column-wise dot.
    # (A three-operand einsum here ran as an unblocked d^3 loop: 1.5 s at d = 1000.)
    quad = np.einsum("ai,ai->i", small, scatter @ small) / n
    return float(np.sum(quad * weight))


def _nc2m(w_KP: np.ndarray, mubar_KP: np.ndarray) -> float:
    """|| W M / ||W M||_F - Mstar ||_F (the product form of self-duality)."""
    K, P = w_KP.shape
    if K <= P:
        return _etf_distance_direct(w_KP @ mubar_KP.T)
    trace = float(np.sum(w_KP * mubar_KP))
    total = float(w_KP.sum(axis=0) @ mubar_KP.sum(axis=0))
    frob_sq = float(np.sum((w_KP.T @ w_KP) * (mubar_KP.T @ mubar_KP)))
    return _etf_distance_identity(trace, total, math.sqrt(max(frob_sq, 0.0)), K)


@dataclass(frozen=True)
class PreparedFinalize:
    """Everything of a finalize that depends on round 1 and W only: every metric except
    nc1, nc1_trace_ratio, cdnv, nc4 and accuracy, and what those need of M. Computed once
    round 1 is complete (while round 2 is in flight); ``complete_finalize`` then adds round 2
    cheaply (O(K^2) at most, no pass over K x P)."""

    num_classes: int
    feature_dim: int
    num_samples: int
    metrics: dict[str, float]
    nc1_basis: tuple[np.ndarray, np.ndarray] | None
    counts_K: np.ndarray
    between_trace: float
    inverse_distances_K: np.ndarray


def prepare_finalize(
    r1: Round1Stats, w_KP: np.ndarray, b_K: np.ndarray | None = None
) -> PreparedFinalize:
    """The round-1 part of ``finalize`` (``b_K`` only checked: NC4 used it in round 2)."""
    K, P = r1.num_classes, r1.feature_dim
    w64 = np.asarray(w_KP, dtype=np.float64)
    if w64.shape != (K, P):
        raise MetricInputError(f"weight must have shape (K, P) = {(K, P)}, got {w64.shape}")
    if b_K is not None and np.asarray(b_K).shape != (K,):
        raise MetricInputError(f"bias must have shape (K,) = {(K,)}, got {np.asarray(b_K).shape}")
    means = r1.class_means()
    N = means.num_samples
    nc0, nc0_normalized = nc0_from_weight(w64)
    mubar_KP = means.centered()
    between_trace = float(np.sum(mubar_KP * mubar_KP)) / K
    w_frob = float(np.linalg.norm(w64))
    m_frob = math.sqrt(between_trace * K)
    nc3 = (
        float(np.linalg.norm(w64 / w_frob - mubar_KP / m_frob))
        if w_frob > 0 and m_frob > 0
        else math.nan
    )
    nc2_angle, inverse_K = _angles_and_inverse_distances(mubar_KP, distances=True)
    assert inverse_K is not None
    nc2w_angle, _ = _angles_and_inverse_distances(w64, distances=False)
    metrics = {
        "nc0": nc0,
        "nc0_normalized": nc0_normalized,
        "nc2_norm": _equinorm(mubar_KP),
        "nc2_angle": nc2_angle,
        "nc2": _gram_etf_distance(mubar_KP),
        "nc2w_norm": _equinorm(w64),
        "nc2w_angle": nc2w_angle,
        "nc2w": _gram_etf_distance(w64),
        "nc2m": _nc2m(w64, mubar_KP),
        "nc3": nc3,
    }
    return PreparedFinalize(
        K, P, N, metrics, _nc1_basis(mubar_KP), means.counts_K, between_trace, inverse_K
    )


def complete_finalize(prepared: PreparedFinalize, r2: Round2Stats) -> dict[str, float]:
    """Every metric of METRIC_KEYS plus num_samples, num_classes and feature_dim."""
    K, P, N = prepared.num_classes, prepared.feature_dim, prepared.num_samples
    if r2.num_samples != N:
        raise MetricInputError(f"round 2 covers {r2.num_samples} samples but round 1 covered {N}")
    if r2.scatter.shape != (Round2Stats.scatter_dim(K, P),) * 2:
        raise MetricInputError(f"round-2 scatter has shape {r2.scatter.shape} for K={K}, P={P}")
    if r2.sq_resid_K.shape != (K,):
        raise MetricInputError(f"round-2 sq_resid has shape {r2.sq_resid_K.shape} for K={K}")
    within_trace = float(r2.sq_resid_K.sum()) / N
    between = prepared.between_trace
    computed = {
        **prepared.metrics,
        "nc1": _nc1(prepared.nc1_basis, r2.scatter, N),
        "nc1_trace_ratio": within_trace / between if between > 0 else math.nan,
        "cdnv": _cdnv(r2.sq_resid_K / prepared.counts_K, prepared.inverse_distances_K),
        "nc4": r2.ncc_agree / N,
        "accuracy": r2.correct / N,
    }
    out: dict[str, float] = {key: computed[key] for key in METRIC_KEYS}
    out.update(num_samples=N, num_classes=K, feature_dim=P)
    return out


def finalize(
    r1: Round1Stats,
    r2: Round2Stats,
    w_KP: np.ndarray,
    b_K: np.ndarray | None = None,
) -> dict[str, float]:
    """Every metric of METRIC_KEYS plus num_samples, num_classes and feature_dim.

    ``b_K`` is accepted for symmetry with round 2 (NC4 used it there); nothing here needs it.
    """
    return complete_finalize(prepare_finalize(r1, w_KP, b_K), r2)
