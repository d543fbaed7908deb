"""`ncserve compute`: metrics for saved features, shards, and one-line errors for bad files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from ncserve.cli import cli
from ncserve.metrics import METRIC_KEYS, compute_metrics

EXPECTED_KEYS = {*METRIC_KEYS, "num_samples", "num_classes", "feature_dim"}


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture
def dataset():
    rng = np.random.default_rng(0)
    K, P, N = 5, 12, 300
    y = rng.integers(0, K, N)
    h = rng.normal(size=(K, P))[y] + 0.3 * rng.normal(size=(N, P))
    return h.astype(np.float32), y, rng.normal(size=(K, P)), rng.normal(size=K)


def run(args):
    return CliRunner().invoke(cli, args)


def test_json_has_exactly_the_documented_keys(tmp_path, dataset):
    h, y, W, b = dataset
    path = write_npz(tmp_path / "all.npz", features=h, labels=y, weight=W, bias=b)
    result = run(["compute", path, "--format", "json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert set(metrics) == EXPECTED_KEYS
    want = compute_metrics(h, y, W, b)
    for key in METRIC_KEYS:
        assert metrics[key] == pytest.approx(want[key], rel=1e-12)


def test_shards_give_the_same_result_as_one_file(tmp_path, dataset):
    h, y, W, b = dataset
    whole = write_npz(tmp_path / "all.npz", features=h, labels=y, weight=W, bias=b)
    parts = []
    for i, idx in enumerate(np.array_split(np.random.default_rng(1).permutation(y.size), 3)):
        parts.append(
            write_npz(tmp_path / f"s{i}.npz", features=h[idx], labels=y[idx], weight=W, bias=b)
        )
    one = json.loads(run(["compute", whole, "--format", "json"]).output)
    many = json.loads(run(["compute", *parts, "--format", "json"]).output)
    for key in METRIC_KEYS:
        assert many[key] == pytest.approx(one[key], rel=1e-10, abs=1e-14)


def test_table_format_lists_every_metric(tmp_path, dataset):
    h, y, W, _ = dataset
    path = write_npz(tmp_path / "nobias.npz", features=h, labels=y, weight=W)
    result = run(["compute", path])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.strip().splitlines()] == [
        *METRIC_KEYS,
        "num_samples",
        "num_classes",
        "feature_dim",
    ]


def _bad_cases(h, y, W, b):
    nan_h = h.copy()
    nan_h[3, 2] = np.nan
    return {
        "missing key": (dict(features=h, labels=y), "missing key(s) 'weight'"),
        "wrong weight shape": (
            dict(features=h, labels=y, weight=W[:, :4]),
            "'weight' has 4 columns but 'features' has feature dim 12",
        ),
        "1-D features": (dict(features=h[:, 0], labels=y, weight=W), "'features' must be 2-D"),
        "label count": (dict(features=h, labels=y[:10], weight=W), "'labels' must be 1-D with 300"),
        "NaN": (dict(features=nan_h, labels=y, weight=W), "'features' contains NaN or Inf"),
        "label out of range": (
            dict(features=h, labels=np.where(y == 0, 7, y), weight=W),
            "label 7 out of range [0, 4]",
        ),
        "empty class": (
            dict(features=h[y != 3], labels=y[y != 3], weight=W),
            "1 of 5 classes have no samples at all (classes 3)",
        ),
        "bias shape": (dict(features=h, labels=y, weight=W, bias=b[:2]), "'bias' must have shape"),
        "num_classes mismatch": (
            dict(features=h, labels=y, weight=W, num_classes=np.int64(9)),
            "'num_classes' is 9 but 'weight' has 5 rows",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing key",
        "wrong weight shape",
        "1-D features",
        "label count",
        "NaN",
        "label out of range",
        "empty class",
        "bias shape",
        "num_classes mismatch",
    ],
)
def test_bad_files_exit_2_with_one_line_naming_file(tmp_path, dataset, case):
    arrays, message = _bad_cases(*dataset)[case]
    path = write_npz(tmp_path / "bad.npz", **arrays)
    result = run(["compute", path])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert path in lines[0] and message in lines[0], lines[0]


def test_unreadable_archive_and_missing_file(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip archive at all")
    result = run(["compute", str(garbage)])
    assert result.exit_code == 2 and "not a .npz archive" in result.output
    truncated = tmp_path / "truncated.npz"
    np.savez(truncated, features=np.zeros((4, 2)), labels=np.arange(4) % 2, weight=np.ones((2, 2)))
    truncated.write_bytes(truncated.read_bytes()[:-40])
    result = run(["compute", str(truncated)])
    assert result.exit_code == 2 and str(truncated) in result.output
    result = run(["compute", str(tmp_path / "absent.npz")])
    assert result.exit_code == 2 and "no such file" in result.output
    # A member that claims a zip version zipfile does not implement (found by fuzzing).
    future = tmp_path / "future.npz"
    np.savez(future, features=np.zeros((4, 2)), labels=np.arange(4) % 2, weight=np.ones((2, 2)))
    data = bytearray(future.read_bytes())
    data[data.find(b"PK\x01\x02") + 6] = 109  # central directory: version needed 10.9
    future.write_bytes(bytes(data))
    result = run(["compute", str(future)])
    assert result.exit_code == 2 and "zip file version 10.9" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_shards_with_different_weights_are_refused(tmp_path, dataset):
    h, y, W, _ = dataset
    a = write_npz(tmp_path / "a.npz", features=h[:150], labels=y[:150], weight=W)
    b = write_npz(tmp_path / "b.npz", features=h[150:], labels=y[150:], weight=W + 1)
    result = run(["compute", a, b])
    assert result.exit_code == 2 and "'weight' differs" in result.output


def test_real_process_prints_no_traceback(tmp_path):
    bad = write_npz(tmp_path / "bad.npz", features=np.zeros((3, 2)))
    proc = subprocess.run(
        [sys.executable, "-m", "ncserve", "compute", bad], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "missing key(s)" in proc.stderr
