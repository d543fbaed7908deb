"""An independent, deliberately plain p x p reference for the NC metrics (tests only).

Papyan et al. (2020) style: the full within-class covariance, the pseudo-inverse of the
between-class covariance, explicit Gram matrices and explicit distances. No code is shared
with ncserve.metrics.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist


def _etf(K: int) -> np.ndarray:
    return (np.eye(K) - np.ones((K, K)) / K) / np.sqrt(K - 1)


def _gram_metrics(X: np.ndarray) -> tuple[float, float, float]:
    K = X.shape[0]
    norms = np.sqrt((X**2).sum(axis=1))
    equinorm = norms.std() / norms.mean()
    cos = (X @ X.T) / np.outer(norms, norms)
    off = ~np.eye(K, dtype=bool)
    equiangular = np.abs(cos[off] + 1.0 / (K - 1)).mean()
    G = X @ X.T
    etf = np.linalg.norm(G / np.linalg.norm(G) - _etf(K))
    return float(equinorm), float(equiangular), float(etf)


def reference_nc1(h, y, K) -> float:
    """Tr(Sigma_W Sigma_B^+) / K with P x P covariances and a float64 pseudo-inverse."""
    h = np.asarray(h, dtype=np.float64)
    mu = np.stack([h[y == k].mean(axis=0) for k in range(K)])
    Mbar = mu - h.mean(axis=0)
    R = h - mu[y]
    Sigma_W = R.T @ R / h.shape[0]
    Sigma_B = Mbar.T @ Mbar / K
    return float(np.trace(Sigma_W @ np.linalg.pinv(Sigma_B, hermitian=True)) / K)


def reference_metrics(h, y, W, b=None, num_classes=None) -> dict[str, float]:
    h = np.asarray(h, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    K = W.shape[0] if num_classes is None else num_classes
    N, _P = h.shape
    mu = np.stack([h[y == k].mean(axis=0) for k in range(K)])
    mu_G = h.mean(axis=0)
    Mbar = mu - mu_G  # K x P
    R = h - mu[y]
    Sigma_W = R.T @ R / N  # P x P
    Sigma_B = Mbar.T @ Mbar / K  # P x P
    nc1 = np.trace(Sigma_W @ np.linalg.pinv(Sigma_B, hermitian=True)) / K
    var = np.array([(R[y == k] ** 2).sum(axis=1).mean() for k in range(K)])
    dist_sq = cdist(mu, mu, "sqeuclidean")
    off_diag = ~np.eye(K, dtype=bool)
    ratios = ((var[:, None] + var[None, :]) / (2 * np.where(off_diag, dist_sq, 1.0)))[off_diag]
    n2n, n2a, n2 = _gram_metrics(Mbar)
    w2n, w2a, w2 = _gram_metrics(W)
    WM = W @ Mbar.T
    logits = h @ W.T + (0 if b is None else b)
    dists = np.stack([((h - mu[k]) ** 2).sum(axis=1) for k in range(K)], axis=1)
    pred = logits.argmax(axis=1)
    nc0 = np.linalg.norm(W.T @ np.ones(K))
    return {
        "nc0": float(nc0),
        "nc0_normalized": float(nc0 / np.linalg.norm(W)),
        "nc1": float(nc1),
        "nc1_trace_ratio": float(np.trace(Sigma_W) / np.trace(Sigma_B)),
        "cdnv": float(np.mean(ratios)),
        "nc2_norm": n2n,
        "nc2_angle": n2a,
        "nc2": n2,
        "nc2w_norm": w2n,
        "nc2w_angle": w2a,
        "nc2w": w2,
        "nc2m": float(np.linalg.norm(WM / np.linalg.norm(WM) - _etf(K))),
        "nc3": float(np.linalg.norm(W / np.linalg.norm(W) - Mbar / np.linalg.norm(Mbar))),
        "nc4": float(np.mean(pred == dists.argmin(axis=1))),
        "accuracy": float(np.mean(pred == y)),
    }
