"""The nc0 theory of docs/training.md, end to end through nclaunch on 2 nodes.

The class-sum of the classifier, m_t = W_t^T 1, is moved only by weight decay and
momentum (the cross-entropy gradient has zero class-sum, and averaging it over
ranks keeps that), so nc0 = |m_t| follows a scalar recursion exactly. A wiring
bug in the optimizer, the gradient averaging, the engine or the metric breaks it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.launcher_support import TINY, metrics, run_ok

pytestmark = pytest.mark.slow

LR = 0.05


def coupled_factors(steps: int, lr: float, wd: float, momentum: float) -> list[float]:
    """c_t for SGD with coupled weight decay and heavy-ball momentum (c_0 = 1)."""
    c = [1.0, 1.0 - lr * wd]
    while len(c) <= steps:
        c.append((1 + momentum - lr * wd) * c[-1] - momentum * c[-2])
    return c


def check_nc0(run_dir: Path, expected: list[float]) -> None:
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows}), "a step stored twice"
    assert rows[0]["step"] == 0 and len(rows) >= 3
    nc0_0 = rows[0]["nc0"]
    for row in rows:
        want = abs(expected[row["step"]]) * nc0_0
        assert row["nc0"] == pytest.approx(want, rel=1e-4), f"step {row['step']}"
    # The run really trained and the decay is visible, not a constant that matches by luck.
    assert rows[-1]["train_acc"] > 0.3


def test_sgd_coupled_weight_decay_with_momentum(tmp_path: Path) -> None:
    wd, momentum = 0.05, 0.9
    run_dir = tmp_path / "sgd"
    run_ok(
        *TINY,
        *f"--nodes 2 --optimizer sgd --lr {LR} --momentum {momentum} --weight-decay {wd}".split(),
        *f"--epochs 3 --run-dir {run_dir}".split(),
    )
    rows = metrics(run_dir)
    expected = coupled_factors(rows[-1]["step"], LR, wd, momentum)
    check_nc0(run_dir, expected)
    assert expected[rows[-1]["step"]] < 0.7


def test_sgdw_decoupled_decay_under_deepspeed_zero2(tmp_path: Path) -> None:
    wd = 0.5
    run_dir = tmp_path / "sgdw"
    run_ok(
        *TINY,
        *f"--nodes 2 --optimizer sgdw --lr {LR} --momentum 0.9 --weight-decay {wd}".split(),
        *f"--epochs 3 --engine deepspeed --zero-stage 2 --run-dir {run_dir}".split(),
        # The first DeepSpeed run on a machine JIT-builds a C++ op (a minute or two).
        timeout=570,
    )
    steps = metrics(run_dir)[-1]["step"]
    expected = [(1 - LR * wd) ** t for t in range(steps + 1)]
    check_nc0(run_dir, expected)
    assert expected[steps] < 0.7


def test_no_weight_decay_keeps_nc0_constant(tmp_path: Path) -> None:
    run_dir = tmp_path / "wd0"
    run_ok(
        *TINY,
        *f"--nodes 2 --optimizer sgd --lr {LR} --momentum 0.9 --weight-decay 0".split(),
        *f"--epochs 3 --run-dir {run_dir}".split(),
    )
    steps = metrics(run_dir)[-1]["step"]
    check_nc0(run_dir, [1.0] * (steps + 1))
