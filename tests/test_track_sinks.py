"""CSV and TensorBoard exporters (ncserve.track.sinks), alone and through the Tracker."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ncserve.metrics import METRIC_KEYS
from ncserve.track import Tracker
from ncserve.track.sinks import CSVSink, MissingExtraError, TensorBoardSink
from tests.track_support import require


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as stream:
        reader = csv.DictReader(stream)
        return list(reader.fieldnames or []), list(reader)


def read_events(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every scalar in the event files under ``log_dir``."""
    accumulator = require("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_csv_rows_nan_and_a_header_that_widens(tmp_path):
    path = tmp_path / "out" / "metrics.csv"
    sink = CSVSink(path)
    sink.write({"step": 0, "nc1": 2.5, "nc2": math.nan})
    # A key first seen later (a held-out split, a new scalar) widens the header, no row lost.
    sink.write({"step": 5, "nc1": 1.25, "nc2": 0.5, "holdout_nc4": 0.75})
    fields, rows = read_csv(path)
    assert fields == ["step", "nc1", "nc2", "holdout_nc4"]
    assert rows == [
        {"step": "0", "nc1": "2.5", "nc2": "", "holdout_nc4": ""},
        {"step": "5", "nc1": "1.25", "nc2": "0.5", "holdout_nc4": "0.75"},
    ]
    # A resumed run continues the file under the header it finds there.
    resumed = CSVSink(path)
    assert resumed.fields == fields
    resumed.write({"step": 9, "nc2": 0.25})
    _, rows = read_csv(path)
    assert rows[-1] == {"step": "9", "nc1": "", "nc2": "0.25", "holdout_nc4": ""}
    assert len(rows) == 3


def test_tensorboard_event_files(tmp_path):
    require("tensorboard")
    sink = TensorBoardSink(tmp_path / "tb")
    sink.write_measurement({"step": 3, "nc1": 0.5, "nc2": math.nan, "lr": 0.1}, ["nc1", "nc2"])
    sink.write_step(4, {"nc0": 1.5, "train_loss": 0.25})
    sink.close()
    scalars = read_events(tmp_path / "tb")
    assert scalars == {
        "nc/nc1": [(3, 0.5)],
        "train/lr": [(3, pytest.approx(0.1))],
        "step/nc0": [(4, 1.5)],
        "step/train_loss": [(4, 0.25)],
    }


def test_missing_tensorboard_names_the_extra(tmp_path, monkeypatch):
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(MissingExtraError, match=r"pip install 'ncserve\[tensorboard\]'"):
        TensorBoardSink(tmp_path / "tb")
    # The Tracker fails the same way before it starts a service or touches its run dir.
    with pytest.raises(MissingExtraError, match=r"ncserve\[tensorboard\]"):
        Tracker(nn.Linear(3, 2), run_dir=tmp_path / "run", tensorboard=tmp_path / "tb")
    assert not (tmp_path / "run").exists()


def test_tracker_exports_each_measurement(tmp_path):
    require("tensorboard")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    y = torch.arange(60) % 3
    x = torch.randn(60, 5) + y[:, None].float()
    loader = [(x[:30], y[:30]), (x[30:], y[30:])]
    csv_path, tb_dir = tmp_path / "metrics.csv", tmp_path / "tb"
    with Tracker(
        model, run_id="sinks", run_dir=tmp_path / "run", csv=csv_path, tensorboard=tb_dir
    ) as tracker:
        first = tracker.measure(loader, step=0, epoch=0)
        nc0, _ = tracker.record_nc0(1, scalars={"train_loss": 0.5})
        with torch.no_grad():
            model[2].weight.mul_(2.0)
        second = tracker.measure(loader, step=2, epoch=1, scalars={"train_loss": 0.25})
    assert first is not None and second is not None
    fields, rows = read_csv(csv_path)
    assert fields[:3] == ["run_id", "step", "epoch"]
    assert set(METRIC_KEYS) <= set(fields) and "train_loss" in fields
    assert [(r["run_id"], r["step"], r["epoch"]) for r in rows] == [
        ("sinks", "0", "0"),
        ("sinks", "2", "1"),
    ]
    assert rows[0]["train_loss"] == "" and float(rows[1]["train_loss"]) == 0.25
    for row, metrics in zip(rows, (first, second), strict=True):
        for key in METRIC_KEYS:
            assert float(row[key]) == pytest.approx(metrics[key], rel=1e-12, nan_ok=True), key
    scalars = read_events(tb_dir)
    assert [step for step, _ in scalars["nc/nc1"]] == [0, 2]
    assert scalars["nc/nc0"][1][1] == pytest.approx(second["nc0"], rel=1e-6)
    assert scalars["train/train_loss"] == [(2, 0.25)]
    assert scalars["step/nc0"] == [(1, pytest.approx(nc0, rel=1e-6))]
