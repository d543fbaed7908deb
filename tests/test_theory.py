"""The theory as code: exact nc0 factors, lr schedules, the UFM closed form, the CLI.

The end-to-end check runs a real nclaunch SGD run and compares every measured nc0 with
the factors `ncserve theory nc0` prints.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from launcher.optim import SGDW, build_scheduler
from ncserve import theory
from ncserve.cli import cli
from tests.launcher_support import TINY, metrics, run_ok


def three_term_recursion(lr: float, momentum: float, wd: float, steps: int) -> list[float]:
    """The three-term form of docs/theory.md, valid for a constant lr."""
    c = [1.0, 1.0 - lr * wd]
    while len(c) <= steps:
        c.append((1 + momentum - lr * wd) * c[-1] - momentum * c[-2])
    return c[: steps + 1]


@pytest.mark.parametrize("schedule", theory.SCHEDULE_NAMES)
@pytest.mark.parametrize("total", [1, 2, 3, 10, 99])
def test_lr_schedule_equals_the_trainers_scheduler(schedule: str, total: int) -> None:
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=0.0679)
    scheduler = build_scheduler(optimizer, schedule, total)
    used = []
    for _ in range(total + 4):  # past the end too: cosine turns back up as torch's does
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    np.testing.assert_array_equal(theory.lr_schedule(0.0679, schedule, total + 4, total), used)


@pytest.mark.parametrize(("momentum", "wd"), [(0.0, 0.1), (0.9, 0.05), (0.98, 0.5), (0.5, 0.0)])
def test_constant_lr_factors_equal_the_three_term_recursion(momentum: float, wd: float) -> None:
    lrs = theory.lr_schedule(0.05, "constant", 400)
    factors = theory.sgd_nc0_factors(lrs, momentum, wd)
    np.testing.assert_allclose(
        factors, three_term_recursion(0.05, momentum, wd, 400), rtol=1e-9, atol=1e-12
    )


def _torch_nc0_trajectory(optimizer_name: str, schedule: str, steps: int) -> list[float]:
    """nc0 of a float64 linear classifier trained on random data with the real optimizers."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, dtype=torch.float64, generator=generator)
    y = torch.randint(0, 5, (64,), generator=generator)
    model = torch.nn.Linear(6, 5, dtype=torch.float64)
    if optimizer_name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=0.3, momentum=0.9, weight_decay=0.05
        )
    else:
        optimizer = SGDW(model.parameters(), lr=0.3, momentum=0.9, weight_decay=0.05)
    scheduler = build_scheduler(optimizer, schedule, steps)
    trajectory = [float(model.weight.detach().sum(0).norm())]
    for step in range(steps):
        batch = slice(16 * (step % 4), 16 * (step % 4) + 16)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
        scheduler.step()
        trajectory.append(float(model.weight.detach().sum(0).norm()))
    return trajectory


@pytest.mark.parametrize("optimizer_name", ["sgd", "sgdw"])
@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_factors_follow_torch_training_under_a_schedule(optimizer_name: str, schedule: str) -> None:
    # With a schedule the momentum buffer holds unscaled gradients: the two-state recursion
    # is exact where the constant-lr three-term form is not.
    steps = 60
    measured = _torch_nc0_trajectory(optimizer_name, schedule, steps)
    lrs = theory.lr_schedule(0.3, schedule, steps)
    factors = theory.nc0_factors(optimizer_name, lrs, 0.9, 0.05)
    np.testing.assert_allclose(measured, np.abs(factors) * measured[0], rtol=1e-9)
    assert abs(factors[-1]) < 0.8  # it did decay: a constant would not test anything


def test_sgd_decay_condition() -> None:
    assert theory.sgd_decays(0.1, 0.9, 0.5)
    assert not theory.sgd_decays(0.1, 0.9, 0.0)
    assert not theory.sgd_decays(1.0, 0.0, 2.5)  # ηλ = 2.5 >= 2(1 + β): grows
    factors = theory.sgd_nc0_factors(theory.lr_schedule(1.0, "constant", 50), 0.0, 2.5)
    assert abs(factors[-1]) > 1


@pytest.mark.parametrize(
    ("K", "lr", "wd", "steps"),
    [(10, 0.01, 0.05, 3000), (5, 0.1, 0.5, 500), (100, 0.002, 0.02, 2000)],
)
def test_ufm_decoupled_matches_the_closed_form(K: int, lr: float, wd: float, steps: int) -> None:
    lrs = theory.lr_schedule(lr, "constant", steps)
    result = theory.simulate_ufm_signgd(K, lrs, wd, coupled=False)
    closed = theory.ufm_decoupled_closed_form(K, lr, wd, steps)
    assert result.saturated_step is None
    np.testing.assert_allclose(result.nc0[1:], closed[1:], rtol=1e-9)
    assert result.nc0[0] == 0 and closed[0] == 0
    # W_T = −(1 − (1 − ηλ)^T)/λ · (J − 2I), and nc0 rises monotonically toward √K(K−2)/λ.
    J_minus_2I = np.ones((K, K)) - 2 * np.eye(K)
    scale = (1 - (1 - lr * wd) ** steps) / wd
    np.testing.assert_allclose(result.weight_KP, -scale * J_minus_2I, rtol=1e-9)
    assert np.all(np.diff(result.nc0) > 0)
    assert result.nc0[-1] < math.sqrt(K) * (K - 2) / wd


def test_ufm_sign_of_the_gradient_stays_j_minus_2i() -> None:
    K = 6
    features_PK = theory.simplex_etf_features(K, feature_norm=2.5)
    np.testing.assert_allclose(np.linalg.norm(features_PK, axis=0), 2.5)
    weight_KP = np.zeros((K, K))
    expected = np.ones((K, K)) - 2 * np.eye(K)
    for _ in range(200):
        grad_KP = theory.ufm_loss_gradient(weight_KP, features_PK)
        np.testing.assert_array_equal(np.sign(grad_KP), expected)
        weight_KP = (1 - 0.05 * 0.1) * weight_KP - 0.05 * np.sign(grad_KP)


def test_ufm_coupled_rises_then_falls() -> None:
    K, lr, wd, steps = 10, 0.01, 0.05, 2000
    constant = theory.simulate_ufm_signgd(
        K, theory.lr_schedule(lr, "constant", steps), wd, coupled=True
    ).nc0
    peak = int(np.argmax(constant))
    assert 1 < peak < steps // 10
    assert np.all(np.diff(constant[: peak + 1]) > 0)  # rises ...
    assert constant[-1] < 0.1 * constant[peak]  # ... then falls, oscillating at O(lr)
    # The decoupled twin keeps rising far above it.
    assert theory.ufm_decoupled_closed_form(K, lr, wd, steps)[-1] > 50 * constant[peak]
    decaying = theory.simulate_ufm_signgd(
        K, theory.lr_schedule(lr, "cosine", steps), wd, coupled=True
    ).nc0
    assert decaying[-1] < 1e-6 * decaying.max()  # a decaying lr takes it to 0


def test_ufm_reports_softmax_underflow() -> None:
    # λ = 5e-4 lets the logit gap grow to ~4,000: the off-class softmax underflows.
    lrs = theory.lr_schedule(0.1, "constant", 6_000)
    result = theory.simulate_ufm_signgd(10, lrs, 5e-4, coupled=False)
    assert result.saturated_step is not None
    closed = theory.ufm_decoupled_closed_form(10, 0.1, 5e-4, 6_000)
    assert result.nc0[-1] < 0.9 * closed[-1]  # from there on the closed form no longer holds


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_cli_ufm_prints_the_closed_form_next_to_the_simulation() -> None:
    text = _invoke(
        "theory",
        "ufm",
        "--optimizer",
        "signgd-decoupled",
        "--num-classes",
        "10",
        "--lr",
        "0.01",
        "--weight-decay",
        "0.05",
        "--steps",
        "1000",
        "--every",
        "250",
    )
    rows = [line.split() for line in text.splitlines() if line and line[0] != "#"][1:]
    assert [int(r[0]) for r in rows] == [0, 250, 500, 750, 1000]
    for row in rows[1:]:
        t = int(row[0])
        want = math.sqrt(10) * 8 * (1 - (1 - 0.01 * 0.05) ** t) / 0.05
        assert float(row[2]) == pytest.approx(want, rel=1e-9)
        assert float(row[3]) == pytest.approx(want, rel=1e-9)
    payload = json.loads(
        _invoke(
            "theory",
            "ufm",
            "--optimizer",
            "signgd-coupled",
            "--num-classes",
            "10",
            "--lr",
            "0.01",
            "--weight-decay",
            "0.05",
            "--steps",
            "2000",
            "--every",
            "2000",
            "--format",
            "json",
        )
    )
    assert 0 < payload["peak_step"] < 2000
    assert payload["nc0"][-1] < 0.1 * payload["peak_nc0"]


def test_cli_nc0_grid_and_plots(tmp_path: Path) -> None:
    payload = json.loads(
        _invoke(
            "theory",
            "nc0-grid",
            "--optimizer",
            "sgd",
            "--lr",
            "0.05",
            "--steps",
            "300",
            "--momentum",
            "0,0.9",
            "--weight-decay",
            "0,0.05",
            "--format",
            "json",
            "--plot",
            str(tmp_path / "grid.png"),
        )
    )
    values = np.array(payload["values"])
    assert values[:, 0].tolist() == [1.0, 1.0]  # no weight decay: nc0 is constant
    assert values[1, 1] < values[0, 1] < 1  # momentum speeds the decay up
    assert (tmp_path / "grid.png").stat().st_size > 0
    _invoke(
        "theory",
        "nc0",
        "--optimizer",
        "sgdw",
        "--lr",
        "0.1",
        "--steps",
        "30",
        "--weight-decay",
        "0.1",
        "--plot",
        str(tmp_path / "nc0.png"),
    )
    _invoke(
        "theory",
        "ufm",
        "--optimizer",
        "signgd-coupled",
        "--lr",
        "0.01",
        "--weight-decay",
        "0.05",
        "--steps",
        "300",
        "--plot",
        str(tmp_path / "ufm.png"),
    )
    assert (tmp_path / "nc0.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "ufm.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["nc0", "--optimizer", "sgd", "--lr", "0.1", "--steps", "5", "--plot", "x.txt"],
            "--plot: 'x.txt' must end in .png",
        ),
        (["nc0", "--optimizer", "adam", "--lr", "0.1", "--steps", "5"], "'adam' is not one of"),
        (
            ["nc0-grid", "--optimizer", "sgd", "--lr", "0.1", "--steps", "5", "--momentum", "a"],
            "comma-separated numbers",
        ),
        (
            ["nc0", "--optimizer", "sgd", "--lr", "0.1", "--steps", "5", "--momentum", "1.2"],
            "--momentum",
        ),
    ],
)
def test_cli_user_errors_are_one_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["theory", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_cli_nc0_agrees_with_a_measured_sgd_run(tmp_path: Path) -> None:
    lr, momentum, wd = 0.05, 0.9, 0.05
    run_dir = tmp_path / "sgd"
    # Tracking on: nc0 at each measurement comes back from the service (TINY turns it off).
    tiny = tuple(arg for arg in TINY if arg != "--no-tracking")
    run_ok(
        "--nodes",
        "1",
        *tiny,
        "--optimizer",
        "sgd",
        "--lr",
        str(lr),
        "--momentum",
        str(momentum),
        "--weight-decay",
        str(wd),
        "--lr-schedule",
        "constant",
        "--epochs",
        "3",
        "--run-dir",
        str(run_dir),
    )
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 8, 16, 24]
    assert "nc1" in rows[-1]  # the row was finalized by the service
    steps = rows[-1]["step"]
    payload = json.loads(
        _invoke(
            "theory",
            "nc0",
            "--optimizer",
            "sgd",
            "--lr",
            str(lr),
            "--momentum",
            str(momentum),
            "--weight-decay",
            str(wd),
            "--steps",
            str(steps),
            "--format",
            "json",
        )
    )
    factor = dict(zip(payload["steps"], payload["factor"], strict=True))
    for row in rows:
        predicted = abs(factor[row["step"]]) * rows[0]["nc0"]
        assert row["nc0"] == pytest.approx(predicted, rel=1e-4), f"step {row['step']}"
    assert factor[steps] < 0.7  # the decay is visible, not a constant matched by luck
