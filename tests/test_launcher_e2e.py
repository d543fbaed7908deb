"""The product path end to end: the default 4-node local run with the embedded service.

Its last measurement (trainer -> tracker -> service -> metrics.jsonl) must equal
``ncserve compute`` on features recomputed in one process from the final checkpoint
(``nclaunch export-features``), which ties trainer, tracker and service together.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from launcher.rundir import ROW_KEYS, tensorboard_available
from ncserve.metrics import METRIC_KEYS
from tests.launcher_support import REPO, cli, metrics, run_ok

pytestmark = pytest.mark.slow


def test_default_four_node_run_matches_ncserve_compute(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    table = tmp_path / "measurements.csv"
    events = tmp_path / "tensorboard"
    # The exporters ride along when their optional package is there (the dev extra has it).
    exporters = cli(f"--csv {table}")
    if tensorboard_available():
        exporters += cli(f"--tensorboard {events}")
    # The defaults (mnist5k, mlp, ddp, embedded service) on 4 simulated nodes; fewer epochs
    # and a held-out split keep it short and cover held-out accuracy.
    result = run_ok(
        *cli(f"--nodes 4 --optimizer adamw --epochs 2 --holdout 0.1 --run-dir {run_dir}"),
        *exporters,
        timeout=400,
    )
    assert "embedded ncserve on 127.0.0.1:" in result.stdout
    assert "nc1" in result.stdout and "step 70 (epoch 2)" in result.stdout  # summary table

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["launch"]["nnodes"] == "4" and config["optim"]["lr"] == 0.001
    assert config["data"]["dataset"] == "mnist5k" and config["model"]["name"] == "mlp"
    for rank in range(4):
        assert (run_dir / "logs" / f"rank{rank}.log").is_file()
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "service" / "ncserve.db").is_file()
    # The closing lines say how to read the run's store with no server, and that works.
    run_id = config["run_id"]
    db = run_dir / "service" / "ncserve.db"
    assert f"ncserve query {run_id} --db {db} --all" in result.stdout
    stored = subprocess.run(
        [sys.executable, "-m", "ncserve", "query", run_id, "--db", str(db), "--all",
         "--format", "json"],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert [r["step"] for r in json.loads(stored.stdout)] == [0, 35, 70]
    listed = subprocess.run(
        [sys.executable, "-m", "ncserve", "runs", "--db", str(db), "--format", "json"],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    (stored_run,) = json.loads(listed.stdout)
    assert stored_run["state"] == "finished" and stored_run["num_measurements"] == 3

    rows = metrics(run_dir)
    # 4,500 training samples / 128 per step = 35 steps per epoch; step 0 and every epoch.
    assert [r["step"] for r in rows] == [0, 35, 70]
    last = rows[-1]
    for key in (*ROW_KEYS, *METRIC_KEYS, "num_samples", "num_classes", "feature_dim"):
        assert last.get(key) is not None, key
    assert last["world_size"] == 4 and last["epoch"] == 2 and last["train_acc"] > 0.8
    assert last["num_samples"] == 4500 and last["feature_dim"] == 512
    with table.open() as stream:
        assert [int(r["step"]) for r in csv.DictReader(stream)] == [0, 35, 70]
    if tensorboard_available():
        assert list(events.glob("events.out.tfevents.*")), "no TensorBoard event file"

    features = tmp_path / "features.npz"
    run_ok("export-features", str(run_dir), "--out", str(features))
    with np.load(features) as saved:
        assert saved["features"].shape == (4500, 512) and saved["weight"].shape == (10, 512)
    computed = subprocess.run(
        [sys.executable, "-m", "ncserve", "compute", str(features), "--format", "json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    reference = json.loads(computed.stdout)
    for key in METRIC_KEYS:
        assert last[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-12), key

    # Any measured step can be recomputed (step 0: the initial weights), and the held-out
    # split too: the run kept the weights of every measurement.
    assert sorted(int(p.stem.split("-")[1]) for p in (run_dir / "weights").glob("*.pt")) == [
        0, 35, 70,
    ]  # fmt: skip
    for step, split, row in ((0, "measurement", rows[0]), (70, "holdout", last)):
        exported = tmp_path / f"step{step}-{split}.npz"
        run_ok("export-features", str(run_dir), "--step", str(step), "--split", split,
               "--out", str(exported))  # fmt: skip
        recomputed = json.loads(
            subprocess.run(
                [sys.executable, "-m", "ncserve", "compute", str(exported), "--format", "json"],
                cwd=REPO, capture_output=True, text=True, check=True, timeout=120,
            ).stdout
        )  # fmt: skip
        if split == "measurement":
            for key in METRIC_KEYS:
                assert row[key] == pytest.approx(recomputed[key], rel=1e-6, abs=1e-12), key
        else:
            assert row["holdout_acc"] == pytest.approx(recomputed["accuracy"], rel=1e-9)
    assert last["num_samples"] == reference["num_samples"]
