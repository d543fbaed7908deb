"""examples/: each script runs as a user would, briefly, and its measurements reach the service."""

from __future__ import annotations

import csv

import pytest

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
