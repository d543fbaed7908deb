"""examples/: each script runs as a user would, briefly, and its measurements reach the service."""

from __future__ import annotations

import csv
import math
import re

import pytest

from ncserve.metrics import METRIC_KEYS
from tests.track_support import loopback_service, require, run_example, stored_measurements

pytestmark = pytest.mark.slow


def test_plain_torch(tmp_path):
    with loopback_service(tmp_path / "db.sqlite") as target:
        run_example(
            "plain_torch.py", "--epochs", "2", "--target", target, "--run-dir", "run", cwd=tmp_path
        )
        rows = stored_measurements(target, "plain-torch")
    # 1024 samples in batches of 64: 16 steps per epoch; the split is 512 samples.
    assert [(row["step"], row["epoch"]) for row in rows] == [(0, 0), (16, 1), (32, 2)]
    assert all(row["status"] == "complete" and row["num_samples"] == 512 for row in rows)
    with open(tmp_path / "run" / "metrics.csv", newline="") as stream:
        exported = list(csv.DictReader(stream))
    assert [float(row["nc1"]) for row in exported] == pytest.approx([r["nc1"] for r in rows])


def test_lightning_example_on_two_ddp_processes(tmp_path):
    require("lightning")
    with loopback_service(tmp_path / "db.sqlite") as target:
        output = run_example(
            "lightning_example.py",
            *("--epochs", "1", "--devices", "2", "--target", target, "--run-dir", "run"),
            cwd=tmp_path,
        )
        rows = stored_measurements(target, "lightning-example")
    # Each process measures its half of the 512-sample split; the service sees all of it.
    assert [(row["step"], row["epoch"]) for row in rows] == [(0, 0), (8, 1)]
    assert all(row["status"] == "complete" and row["num_samples"] == 512 for row in rows)
    assert f"final: nc0 {rows[-1]['nc0']:.4f}" in output


def test_hf_example(tmp_path):
    require("transformers")
    with loopback_service(tmp_path / "db.sqlite") as target:
        output = run_example(
            "hf_example.py", "--epochs", "1", "--target", target, "--run-dir", "run", cwd=tmp_path
        )
        rows = stored_measurements(target, "hf-example")
    # 512 samples in batches of 32: 16 steps; the measurement split is 256 samples.
    assert [(row["step"], row["epoch"]) for row in rows] == [(0, 0), (16, 1)]
    assert all(row["status"] == "complete" and row["num_samples"] == 256 for row in rows)
    assert f"final: nc0 {rows[-1]['nc0']:.4f}" in output


def test_tiny_lm_measures_a_vocabulary_sized_head(tmp_path):
    with loopback_service(tmp_path / "db.sqlite") as target:
        output = run_example(
            "tiny_lm.py", "--quick", "--target", target, "--run-dir", "run", cwd=tmp_path
        )
        rows = stored_measurements(target, "tiny-lm")
        # Two-pass mode (no features kept) measures the same model at step 0 alike.
        run_example(
            "tiny_lm.py", "--quick", "--two-pass", "--steps", "1", "--run-id", "two-pass",
            "--target", target, "--run-dir", "run2", cwd=tmp_path,
        )  # fmt: skip
        two_pass = stored_measurements(target, "two-pass")
    shape = re.search(r"text: ([\d,]+) tokens; vocabulary: K = (\d+) classes", output)
    assert shape, output
    tokens, vocab = int(shape[1].replace(",", "")), int(shape[2])
    # A word-level vocabulary: hundreds of next-token classes even in the --quick text.
    assert vocab > 500
    # --quick: 40 steps, measured at steps 0, 20 and 40, each over every token but the first.
    assert [row["step"] for row in rows] == [0, 20, 40]
    for row in rows:
        assert row["status"] == "complete"
        assert (row["num_classes"], row["feature_dim"]) == (vocab, 128)
        assert row["num_samples"] == tokens - 1
        assert all(math.isfinite(row[key]) for key in METRIC_KEYS), row
    # The printed table shows what the service stored, and training moved the head.
    printed = re.findall(r"^ *(\d+) +\S+ +(\d+) +(\S+)", output, flags=re.MULTILINE)
    assert [(int(step), int(n)) for step, n, _ in printed] == [
        (row["step"], row["num_samples"]) for row in rows
    ]
    assert [float(nc1) for *_, nc1 in printed] == pytest.approx(
        [row["nc1"] for row in rows], rel=1e-3
    )
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    assert rows[-1]["scalars"]["train_loss"] < math.log(vocab)
    assert [row["step"] for row in two_pass] == [0, 1]
    for key in METRIC_KEYS:
        assert two_pass[0][key] == pytest.approx(rows[0][key], rel=1e-9, abs=1e-12), key
