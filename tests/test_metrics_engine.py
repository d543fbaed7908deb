"""The metric engine against an independent p x p reference and the exact collapse geometry."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ncserve.metrics import (
    METRIC_KEYS,
    ClassMeans,
    MetricInputError,
    Round1Stats,
    Round2Stats,
    compute_metrics,
    finalize,
    round1_stats,
    round2_stats,
)
from tests.nc_reference import reference_metrics, reference_nc1


def make_features(K, P, n_per_class, *, imbalanced=False, seed=0, spread=1.0, offset=0.0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(K, P)) * 3.0 + offset
    counts = rng.integers(2, 2 * n_per_class, size=K) if imbalanced else np.full(K, n_per_class)
    y = np.repeat(np.arange(K), counts)
    rng.shuffle(y)
    h = means[y] + spread * rng.normal(size=(y.size, P))
    W = rng.normal(size=(K, P))
    b = rng.normal(size=K)
    return h, y, W, b


def assert_close(got: dict, want: dict, rtol: float) -> None:
    for key in METRIC_KEYS:
        g, w = got[key], want[key]
        assert np.isclose(g, w, rtol=rtol, atol=1e-12), f"{key}: engine {g!r} vs reference {w!r}"


CASES = [
    # (K, P, n_per_class, imbalanced)
    (2, 16, 40, False),
    (2, 16, 40, True),
    (10, 64, 30, False),
    (10, 64, 30, True),
    (10, 5, 30, False),  # K - 1 > P: rank of Sigma_B is P
    (10, 5, 30, True),
    (100, 150, 8, False),
    (100, 150, 8, True),
    (100, 40, 8, False),
    (100, 40, 8, True),
    (200, 260, 6, False),
    (200, 260, 6, True),
    (200, 60, 6, False),
    (200, 60, 6, True),
]


@pytest.mark.parametrize(("K", "P", "n", "imbalanced"), CASES)
def test_engine_matches_pxp_reference(K, P, n, imbalanced):
    h, y, W, b = make_features(K, P, n, imbalanced=imbalanced, seed=K * 1000 + P)
    got = compute_metrics(h, y, W, b)
    want = reference_metrics(h, y, W, b)
    assert_close(got, want, rtol=1e-8)
    assert got["num_samples"] == y.size and got["num_classes"] == K and got["feature_dim"] == P


def simplex_etf_features(K, P, n_per_class, seed=0, scale=2.0):
    """Features exactly at the vertices of a simplex ETF (centered means), no within-class spread."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(P, K)))  # P x K, orthonormal columns
    mubar = scale * (np.eye(K) - np.ones((K, K)) / K) @ Q.T  # K x P, rows sum to 0
    # A global mean orthogonal to every class direction keeps argmax W h at the true class.
    mu_G = np.zeros(P)
    if P > K:
        extra = rng.normal(size=P)
        extra -= Q @ (Q.T @ extra)
        mu_G = 5.0 * extra / np.linalg.norm(extra)
    y = np.repeat(np.arange(K), n_per_class)
    h = mu_G + mubar[y]
    return h, y, mubar


@pytest.mark.parametrize(("K", "P"), [(2, 4), (10, 10), (10, 64), (50, 80)])
def test_exact_simplex_etf_is_full_collapse(K, P):
    h, y, mubar = simplex_etf_features(K, P, n_per_class=7, seed=K)
    got = compute_metrics(h, y, mubar.copy(), np.zeros(K))
    for key in (
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
    ):
        assert abs(got[key]) < 1e-10, f"{key} = {got[key]!r} under exact collapse"
    assert got["nc4"] == 1.0
    assert got["accuracy"] == 1.0


def test_near_collapse_float32_at_offset_matches_float64_reference():
    """float32 features at offset 50, within-class spread 1e-3: centered float64 accumulation."""
    K, P, n = 10, 64, 50
    rng = np.random.default_rng(7)
    means = 50.0 + rng.normal(size=(K, P))
    y = np.repeat(np.arange(K), n)
    h32 = (means[y] + 1e-3 * rng.normal(size=(y.size, P))).astype(np.float32)
    W = (means - means.mean(axis=0)).astype(np.float32)
    got = compute_metrics(h32, y, W, None)
    want = reference_metrics(h32.astype(np.float64), y, W.astype(np.float64))
    assert_close(got, want, rtol=1e-6)
    assert got["nc1"] < 1e-5  # genuinely near collapse, not a trivially large value


def test_k1000_keeps_small_between_class_directions():
    """K = 1000: small singular values of M dominate NC1; float64 tolerance must keep them."""
    K, P, n = 1000, 1100, 3
    rng = np.random.default_rng(3)
    U, _ = np.linalg.qr(rng.normal(size=(P, K)))
    V, _ = np.linalg.qr(rng.normal(size=(K, K)))
    s = np.logspace(0, -5, K)  # spread of between-class scales over 5 decades
    means = (U * s) @ V.T  # P x K
    y = np.repeat(np.arange(K), n)
    h = means.T[y] + 1e-4 * rng.normal(size=(y.size, P))
    W = rng.normal(size=(K, P))
    got = compute_metrics(h, y, W)
    want = {"nc1": reference_nc1(h, y, K)}
    assert np.isclose(got["nc1"], want["nc1"], rtol=1e-8), (got["nc1"], want["nc1"])
    # The same data through a float32 pseudo-inverse drops those directions: the test has teeth.
    mu = np.stack([h[y == k].mean(axis=0) for k in range(K)])
    Mbar = (mu - h.mean(axis=0)).astype(np.float32)
    R = (h - mu[y]).astype(np.float32)
    sw32 = R.T @ R / y.size
    sb32 = Mbar.T @ Mbar / K
    nc1_32 = float(np.trace(sw32 @ np.linalg.pinv(sb32, hermitian=True))) / K
    assert not np.isclose(nc1_32, want["nc1"], rtol=0.01)


def test_large_k_beyond_feature_dim_uses_pxp_scatter():
    K, P = 1000, 50
    h, y, W, b = make_features(K, P, 3, seed=11)
    r1 = round1_stats(h, y, K)
    r2 = round2_stats(h, y, r1.class_means(), W, b)
    assert r2.scatter.shape == (P, P)
    got = finalize(r1, r2, W, b)
    assert_close(got, reference_metrics(h, y, W, b), rtol=1e-8)


@pytest.mark.parametrize(("K", "P"), [(12, 20), (12, 5)])  # projected scatter, and K > P
def test_sharded_residual_sums_equal_direct_residuals(K: int, P: int) -> None:
    """Merged round-2 sq_resid of any split equals sum ||h - mu_y||^2 around the global
    means, even for tight classes far from the origin (offset 50, spread 1e-2)."""
    h, y, W, b = make_features(K, P, 30, imbalanced=True, seed=5, offset=50.0, spread=1e-2)
    parts = np.array_split(np.random.default_rng(3).permutation(y.size), 7)
    r1 = Round1Stats.zeros(K, P)
    for idx in parts:
        r1 = r1.merge(round1_stats(h[idx], y[idx], K))
    means = r1.class_means()
    r2 = Round2Stats.zeros(K, P)
    for idx in parts:
        r2 = r2.merge(round2_stats(h[idx], y[idx], means, W, b))
    h64 = h.astype(np.float64)
    mu = np.stack([h64[y == k].mean(axis=0) for k in range(K)])
    direct = np.bincount(y, weights=((h64 - mu[y]) ** 2).sum(axis=1), minlength=K)
    np.testing.assert_allclose(r2.sq_resid_K, direct, rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    K=st.integers(2, 12),
    P=st.integers(2, 20),
    seed=st.integers(0, 2**31 - 1),
    num_shards=st.integers(1, 6),
)
def test_any_sharding_in_any_order_gives_the_same_metrics(K, P, seed, num_shards):
    rng = np.random.default_rng(seed)
    h, y, W, b = make_features(K, P, 6, imbalanced=bool(seed % 2), seed=seed)
    whole = compute_metrics(h, y, W, b)
    # Random assignment of samples to shards (some shards may miss classes, or be empty).
    shard_of = rng.integers(0, num_shards, size=y.size)
    shards = [np.flatnonzero(shard_of == s) for s in range(num_shards)]
    r1 = Round1Stats.zeros(K, P)
    for s in rng.permutation(num_shards):
        r1 = r1.merge(round1_stats(h[shards[s]], y[shards[s]], K))
    means = r1.class_means()
    r2 = Round2Stats.zeros(K, P)
    for s in rng.permutation(num_shards):
        r2 = r2.merge(round2_stats(h[shards[s]], y[shards[s]], means, W, b))
    got = finalize(r1, r2, W, b)
    for key in METRIC_KEYS:
        assert np.isclose(got[key], whole[key], rtol=1e-10, atol=1e-14), key


def test_wire_arrays_round_trip_and_validation():
    h, y, W, b = make_features(5, 7, 10, seed=1)
    r1 = round1_stats(h, y, 5)
    means = r1.class_means()
    r2 = round2_stats(h, y, means, W, b)
    assert np.array_equal(Round1Stats.from_arrays(r1.to_arrays(), 5, 7).sums_KP, r1.sums_KP)
    back = ClassMeans.from_arrays(means.to_arrays(), 5, 7)
    assert np.array_equal(back.means_KP, means.means_KP)
    back2 = Round2Stats.from_arrays(r2.to_arrays(), 5, 7)
    assert back2.ncc_agree == r2.ncc_agree
    assert np.array_equal(back2.sq_resid_K, r2.sq_resid_K)

    bad = r1.to_arrays() | {"sums": np.full((5, 7), np.nan)}
    with pytest.raises(MetricInputError, match="'sums' contains NaN"):
        Round1Stats.from_arrays(bad, 5, 7)
    with pytest.raises(MetricInputError, match=r"'counts' must have shape \(6,\)"):
        Round1Stats.from_arrays(r1.to_arrays(), 6, 7)
    with pytest.raises(MetricInputError, match="negative count"):
        Round1Stats.from_arrays(r1.to_arrays() | {"counts": -r1.counts_K}, 5, 7)
    with pytest.raises(MetricInputError, match="exceeds num_samples"):
        Round2Stats.from_arrays(r2.to_arrays() | {"correct": np.int64(10**6)}, 5, 7)
    negative = r2.sq_resid_K.copy()
    negative[3] = -1.5
    with pytest.raises(MetricInputError, match=r"'sq_resid' .*\(-1.5 for class 3\)"):
        Round2Stats.from_arrays(r2.to_arrays() | {"sq_resid": negative}, 5, 7)
    with pytest.raises(MetricInputError, match=r"'sq_resid' must have shape \(5,\)"):
        Round2Stats.from_arrays(r2.to_arrays() | {"sq_resid": np.zeros(4)}, 5, 7)


def test_bad_features_are_named():
    h, y, W, _ = make_features(3, 4, 5)
    with pytest.raises(MetricInputError, match=r"labels must lie in \[0, 2\].*found label 3"):
        round1_stats(h, np.where(y == 0, 3, y), 3)
    h_nan = h.copy()
    h_nan[4, 1] = np.nan
    with pytest.raises(MetricInputError, match="NaN or Inf \\(first at row 4\\)"):
        round1_stats(h_nan, y, 3)
    r1 = round1_stats(h[y != 2], y[y != 2], 3)
    with pytest.raises(MetricInputError, match=r"1 of 3 classes have no samples.*classes 2"):
        r1.class_means()
    with pytest.raises(MetricInputError, match="weight must have shape"):
        round2_stats(h, y, round1_stats(h, y, 3).class_means(), W[:, :2])


_LARGE_K_SCRIPT = """
import resource, numpy as np
from ncserve.metrics import Round1Stats, Round2Stats, finalize
K, P = 20000, 512
rng = np.random.default_rng(0)
counts = np.full(K, 5, dtype=np.int64)  # N = 100,000 samples
sums = rng.normal(size=(K, P)) * counts[:, None]
r1 = Round1Stats(counts, sums)
A = rng.normal(size=(P, P))
r2 = Round2Stats(int(counts.sum()), A @ A.T, np.full(K, 3.0), 1234, 567)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = finalize(r1, r2, rng.normal(size=(K, P)))
assert all(np.isfinite(v) for v in m.values()), m
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_k20000_finalizes_under_2gb():
    """K = 20,000, P = 512, N = 100,000: tiled pairwise metrics keep the peak bounded."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _LARGE_K_SCRIPT], capture_output=True, text=True, check=True
    )
    peak_bytes = int(proc.stdout.strip())
    assert peak_bytes < 2 * 1024**3, f"peak RSS {peak_bytes / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    ("K", "P", "n_per_class"),
    [(3, 40, 200), (50, 8, 3), (30, 60, 40)],  # long class runs, short runs (K > P), mixed
)
def test_threaded_accumulation_equals_one_thread(monkeypatch, K, P, n_per_class):
    """Parts accumulated in threads and merged give the single-thread statistics."""
    import ncserve.metrics.stats as stats_module

    h, y, W, b = make_features(K, P, n_per_class, imbalanced=True, seed=11, offset=20.0)
    h = h.astype(np.float32)
    monkeypatch.setenv("NCSERVE_ENGINE_THREADS", "1")
    r1_one = round1_stats(h, y, K)
    r2_one = round2_stats(h, y, r1_one.class_means(), W, b)
    monkeypatch.setattr(stats_module, "_MIN_ELEMENTS_PER_THREAD", 64)
    monkeypatch.setenv("NCSERVE_ENGINE_THREADS", "3")
    assert stats_module.engine_threads(h.size) == 3
    r1 = round1_stats(h, y, K)
    r2 = round2_stats(h, y, r1.class_means(), W, b)
    np.testing.assert_array_equal(r1.counts_K, r1_one.counts_K)
    np.testing.assert_allclose(r1.sums_KP, r1_one.sums_KP, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(r2.sq_resid_K, r2_one.sq_resid_K, rtol=1e-10)
    np.testing.assert_allclose(r2.scatter, r2_one.scatter, rtol=1e-10, atol=1e-9)
    assert (r2.num_samples, r2.ncc_agree, r2.correct) == (
        r2_one.num_samples,
        r2_one.ncc_agree,
        r2_one.correct,
    )
    assert_close(finalize(r1, r2, W, b), finalize(r1_one, r2_one, W, b), rtol=1e-9)


def test_engine_threads_setting_is_validated(monkeypatch):
    from ncserve.metrics.stats import engine_threads

    monkeypatch.setenv("NCSERVE_ENGINE_THREADS", "two")
    with pytest.raises(MetricInputError, match="NCSERVE_ENGINE_THREADS"):
        engine_threads(1 << 30)
    monkeypatch.setenv("NCSERVE_ENGINE_THREADS", "2")
    assert engine_threads(1 << 30) == 2
    assert engine_threads(100) == 1  # too little work to split


def test_prepared_finalize_equals_finalize():
    """The service's split (round-1 part early, round-2 part at the end) changes nothing."""
    from ncserve.metrics import complete_finalize, prepare_finalize

    h, y, W, b = make_features(7, 5, 20, imbalanced=True, seed=21)
    r1 = round1_stats(h, y, 7)
    r2 = round2_stats(h, y, r1.class_means(), W, b)
    prepared = prepare_finalize(r1, W, b)
    assert complete_finalize(prepared, r2) == finalize(r1, r2, W, b)
    with pytest.raises(MetricInputError, match="round 2 covers"):
        complete_finalize(prepared, Round2Stats.zeros(7, 5))


def test_two_shards_merge_to_the_same_bits_in_either_order():
    """The service merges shards in arrival order; with two ranks that order must not show in
    the bits (the deterministic restart tests compare runs bit for bit)."""
    rng = np.random.default_rng(12)
    for _ in range(50):
        h = rng.normal(size=(40, 7)) * 10 + 50
        y = rng.integers(0, 5, 40)
        y[:5] = np.arange(5)
        W = rng.normal(size=(5, 7))
        a, b = round1_stats(h[:20], y[:20], 5), round1_stats(h[20:], y[20:], 5)
        zero = Round1Stats.zeros(5, 7)
        ab, ba = zero.merge(a).merge(b), zero.merge(b).merge(a)
        np.testing.assert_array_equal(ab.sums_KP, ba.sums_KP)
        means = ab.class_means()
        a2, b2 = (round2_stats(h[s], y[s], means, W) for s in (slice(0, 20), slice(20, 40)))
        zero2 = Round2Stats.zeros(5, 7)
        ab2, ba2 = zero2.merge(a2).merge(b2), zero2.merge(b2).merge(a2)
        np.testing.assert_array_equal(ab2.scatter, ba2.scatter)
        np.testing.assert_array_equal(ab2.sq_resid_K, ba2.sq_resid_K)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_one_bad_value_and_tolerates_huge_ones(bad: float) -> None:
    from ncserve.metrics.stats import all_finite

    values = np.random.default_rng(0).normal(size=(100, 2048))
    assert all_finite(values)
    values[57, 1000] = bad
    assert not all_finite(values)
    huge = np.full(10, 1e300)  # its dot product overflows; every value is still finite
    assert all_finite(huge)
    huge[3] = bad
    assert not all_finite(huge)
    assert all_finite(np.zeros((0, 3)))
