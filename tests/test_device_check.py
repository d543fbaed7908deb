"""scripts/device_check.py --device cpu: the checks a CPU can run, as CI runs them (the same
script runs on a GPU machine with --device cuda)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_device_check_on_the_cpu(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "device_check.py"), "--device", "cpu",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "device_check.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == {"nclaunch_ddp", "tracker_device_vs_host", "engine_timing"}
    assert all(c["ok"] for c in checks.values()), checks
    assert checks["nclaunch_ddp"]["measurements"] == 3
    assert checks["tracker_device_vs_host"]["max_relative_difference"] <= 1e-10
    assert len(checks["engine_timing"]["shapes"]) == 3
