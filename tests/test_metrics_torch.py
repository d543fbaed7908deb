"""The torch engine (ncserve.metrics.torch_stats) against the numpy engine: every metric to
1e-10 on CPU tensors, for K < P, K > P, imbalanced classes, near-collapse float32 and bf16
features; the features never leave the tensor; the numpy engine never imports torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from ncserve.metrics import METRIC_KEYS, MetricInputError, finalize, round1_stats, round2_stats
from ncserve.metrics.stats import Round1Stats, Round2Stats


def dataset(n: int, K: int, P: int, seed: int, *, imbalanced: bool = False, spread: float = 1.0):
    rng = np.random.default_rng(seed)
    if imbalanced:
        weights = np.arange(1, K + 1, dtype=float) ** 2
        y = rng.choice(K, size=n, p=weights / weights.sum())
        y[:K] = np.arange(K)  # every class present
    else:
        y = np.arange(n) % K
    centers = rng.normal(size=(K, P)) * 3
    h = centers[y] + spread * rng.normal(size=(n, P))
    return h, y, rng.normal(size=(K, P)), rng.normal(size=K)


def both_engines(h_np, y, w, b, h_torch):
    """(numpy metrics, torch metrics), each engine doing both rounds on its own input."""
    K = w.shape[0]
    r1_np = round1_stats(h_np, y, K)
    r1_t = round1_stats(h_torch, torch.as_tensor(y), K)
    np.testing.assert_array_equal(r1_t.counts_K, r1_np.counts_K)
    np.testing.assert_allclose(r1_t.sums_KP, r1_np.sums_KP, rtol=1e-12, atol=1e-9)
    means = r1_np.class_means()
    r2_np = round2_stats(h_np, y, means, w, b)
    r2_t = round2_stats(h_torch, torch.as_tensor(y), means, torch.as_tensor(w), b)
    assert (r2_t.num_samples, r2_t.ncc_agree, r2_t.correct) == (
        r2_np.num_samples, r2_np.ncc_agree, r2_np.correct,
    )  # fmt: skip
    return finalize(r1_np, r2_np, w, b), finalize(r1_t, r2_t, w, b)


@pytest.mark.parametrize(
    ("n", "K", "P", "kwargs"),
    [
        (600, 5, 40, {}),  # K < P: the projected scatter
        (500, 30, 8, {}),  # K > P: the full P x P scatter
        (700, 7, 20, {"imbalanced": True}),
        (400, 6, 16, {"spread": 1e-3}),  # near collapse
    ],
)
def test_every_metric_equals_the_numpy_engine(n, K, P, kwargs) -> None:
    h, y, w, b = dataset(n, K, P, seed=K + P, **kwargs)
    want, got = both_engines(h, y, w, b, torch.as_tensor(h))
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-10, abs=1e-12), key


def test_low_precision_features_are_accumulated_in_float64() -> None:
    h, y, w, b = dataset(800, 6, 24, seed=3, spread=1e-2)
    for dtype in (torch.float32, torch.bfloat16):
        h_t = torch.as_tensor(h).to(dtype)
        # The numpy engine on exactly the same (rounded) values.
        want, got = both_engines(h_t.double().numpy(), y, w, b, h_t)
        for key in METRIC_KEYS:
            assert got[key] == pytest.approx(want[key], rel=1e-10, abs=1e-12), (dtype, key)


def test_blocks_and_a_small_block_size_give_the_same_statistics(monkeypatch) -> None:
    from ncserve.metrics import torch_stats

    h, y, w, b = dataset(300, 4, 12, seed=9)
    whole = round1_stats(torch.as_tensor(h), y, 4)
    monkeypatch.setattr(torch_stats, "BLOCK_ELEMENTS", 12 * 7)  # 7-row blocks
    blocked = round1_stats(torch.as_tensor(h), y, 4)
    np.testing.assert_allclose(blocked.sums_KP, whole.sums_KP, rtol=1e-13)
    means = whole.class_means()
    a = round2_stats(torch.as_tensor(h), y, means, w, b)
    monkeypatch.setattr(torch_stats, "BLOCK_ELEMENTS", 1 << 22)
    c = round2_stats(torch.as_tensor(h), y, means, w, b)
    np.testing.assert_allclose(a.scatter, c.scatter, rtol=1e-12)
    assert (a.ncc_agree, a.correct) == (c.ncc_agree, c.correct)


def test_bad_input_names_what_is_wrong() -> None:
    h, y, w, b = dataset(50, 3, 4, seed=1)
    h_t = torch.as_tensor(h)
    with pytest.raises(MetricInputError, match="found label 7"):
        round1_stats(h_t, torch.as_tensor(np.where(y == 0, 7, y)), 3)
    bad = h_t.clone()
    bad[5, 2] = float("nan")
    with pytest.raises(MetricInputError, match="row 5, column 2"):
        round1_stats(bad, y, 3)
    with pytest.raises(MetricInputError, match="2-D"):
        round1_stats(h_t[0], y[:1], 3)
    means = round1_stats(h, y, 3).class_means()
    with pytest.raises(MetricInputError, match="weight must have shape"):
        round2_stats(h_t, y, means, w[:2], b)


def test_the_statistics_are_the_engines_types() -> None:
    h, y, w, b = dataset(60, 3, 5, seed=2)
    r1 = round1_stats(torch.as_tensor(h), y, 3)
    r2 = round2_stats(torch.as_tensor(h), y, r1.class_means(), w, b)
    assert isinstance(r1, Round1Stats) and isinstance(r2, Round2Stats)
    assert r1.sums_KP.dtype == np.float64 and r1.counts_K.dtype == np.int64
    assert Round1Stats.from_arrays(r1.to_arrays(), 3, 5).num_samples == 60


def test_the_numpy_engine_never_imports_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from ncserve.metrics import compute_metrics\n"
        "rng = np.random.default_rng(0); y = np.arange(40) % 4\n"
        "h = rng.normal(size=(40, 6)) + y[:, None]\n"
        "print(compute_metrics(h, y, rng.normal(size=(4, 6)))['nc1'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) > 0
