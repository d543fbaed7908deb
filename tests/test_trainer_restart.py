"""Faults and continuation: an elastic restart after a killed worker, and ``--resume``.

In deterministic mode both must end with exactly the metrics of an uninterrupted run,
and no measurement step may be stored twice.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from launcher.trainer import FAULT_ENV
from tests.launcher_support import TINY, cli, metrics, nclaunch, run_ok
from tests.reliability_support import assert_service_stored_rows_once

pytestmark = pytest.mark.slow

COMMON = (
    *TINY,
    *cli("--nodes 2 --optimizer sgd --weight-decay 0.01 --deterministic --checkpoint-every 2"),
    *cli("--log-every 4"),
)
# 8 steps per epoch: measurements at steps 0, 8, 16, 24, 32; checkpoints at 16 and 32.
EPOCHS = 4
# Rank 1, in epoch 4: the run goes back to the checkpoint at step 16 and trains epoch 3
# again, whose measurement (step 24) is already stored.
KILL_AT = "1:28"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("restart") / "straight"
    run_ok(*COMMON, "--epochs", str(EPOCHS), "--run-dir", str(run_dir))
    return metrics(run_dir)


def _run_state(run_dir: Path) -> tuple[str, str]:
    """The run's state and reason in the embedded service's store."""
    (db,) = run_dir.glob("**/ncserve.db")
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        ((state, reason),) = conn.execute("SELECT state, state_reason FROM runs").fetchall()
    finally:
        conn.close()
    return state, reason


def _same_measurements(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    volatile = {"wall_time", "run_id", "epoch_time_s", "measure_time_s"}
    for g, w in zip(got, want, strict=True):
        assert {k: v for k, v in g.items() if k not in volatile} == {
            k: v for k, v in w.items() if k not in volatile
        }, f"step {g['step']}"


def test_killed_worker_restarts_from_checkpoint(
    tmp_path: Path, uninterrupted: list[dict[str, Any]]
) -> None:
    run_dir = tmp_path / "killed"
    run_ok(
        *COMMON,
        *f"--epochs {EPOCHS} --max-restarts 1 --run-dir {run_dir}".split(),
        env={FAULT_ENV: KILL_AT},
    )
    log0 = (run_dir / "logs" / "rank0.log").read_text()
    assert "restart 1" in log0, "the elastic agent did not restart the workers"
    assert "resumed from" in log0 and "at step 16" in log0
    # Step 24 was measured before the kill. Whether its row reached metrics.jsonl by then
    # (the trainer then skips it) or it was still settling in the background (the workers
    # push the identical shards again, which the service recognises as repeats), it is
    # stored once, with the uninterrupted run's values.
    _same_measurements(metrics(run_dir), uninterrupted)
    # The embedded service, which outlived the workers, stored no step twice.
    assert_service_stored_rows_once(
        run_dir, world_size=2, scenario="worker kill -9, elastic restart"
    )


def test_failed_run_continues_with_resume(
    tmp_path: Path, uninterrupted: list[dict[str, Any]]
) -> None:
    run_dir = tmp_path / "resumed"
    # In the foreground every measurement's row is written before training goes on, so the
    # trainer itself knows step 24 is stored and does not measure it again after --resume.
    failed = nclaunch(
        *COMMON, "--measure-in-foreground", "--epochs", str(EPOCHS), "--run-dir", str(run_dir),
        env={FAULT_ENV: KILL_AT},
    )  # fmt: skip
    assert failed.returncode == 1
    assert "training failed: rank 1" in failed.stdout
    # The launcher saw the failure and said so to the service: the run's alerts stop.
    state, reason = _run_state(run_dir)
    assert state == "failed" and "rank 1 exited" in reason, (state, reason)
    # A second launch on the same directory must not clobber it by accident.
    again = nclaunch(*COMMON, "--run-dir", str(run_dir))
    assert again.returncode == 2 and "--resume" in again.stderr
    run_ok("--resume", "--run-dir", str(run_dir))
    assert "step 24 already measured" in (run_dir / "logs" / "rank0.log").read_text()
    # Resumed, it ran again, and its end is its own: finished.
    assert _run_state(run_dir) == ("finished", "")
    _same_measurements(metrics(run_dir), uninterrupted)
    assert_service_stored_rows_once(run_dir, world_size=2, scenario="worker kill -9, --resume")
