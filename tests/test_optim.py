"""Optimizers against their defining formulas (docs/theory.md) and the nc0 theory.

Expected trajectories are computed here in plain numpy from the update rules,
never by calling the optimizer under test. Legend: W weights, g gradient,
η lr, λ weight decay, β momentum.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from launcher.optim import (
    OPTIMIZER_NAMES,
    AdamCoupledDecoupled,
    build_optimizer,
    build_scheduler,
    is_decoupled,
)

W0 = np.array([0.5, -1.25, 2.0, -0.75])
# Gradients with mixed signs and magnitudes, so that momentum flips some signs.
GRADS = [
    np.array([0.3, -0.2, 0.1, 0.4]),
    np.array([-0.9, 0.1, -0.2, 0.05]),
    np.array([0.2, 0.6, -0.7, -0.3]),
    np.array([-0.1, -0.4, 0.9, 0.2]),
    np.array([0.5, -0.05, 0.3, -0.6]),
]
LR, WD, BETA, BETA2 = 0.1, 0.05, 0.8, 0.95


def run_optimizer(name: str, **kwargs: float) -> np.ndarray:
    """Apply GRADS with the optimizer under test; returns W after each step."""
    param = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    opt = build_optimizer([param], name, **kwargs)
    history = []
    for grad in GRADS:
        param.grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
        history.append(param.detach().numpy().copy())
    return np.stack(history)


def expected_sgdw(lr: float, wd: float, beta: float) -> np.ndarray:
    w, v, out = W0.copy(), np.zeros_like(W0), []
    for g in GRADS:
        v = beta * v + g
        w = (1 - lr * wd) * w - lr * v
        out.append(w)
    return np.stack(out)


def expected_signum(lr: float, wd: float, beta: float, decoupled: bool) -> np.ndarray:
    w, m, out = W0.copy(), np.zeros_like(W0), []
    for g in GRADS:
        if decoupled:
            m = beta * m + (1 - beta) * g
            w = w - lr * (np.sign(m) + wd * w)
        else:
            m = beta * m + (1 - beta) * (g + wd * w)
            w = w - lr * np.sign(m)
        out.append(w)
    return np.stack(out)


def expected_lion(lr: float, wd: float, beta1: float, beta2: float) -> np.ndarray:
    w, m, out = W0.copy(), np.zeros_like(W0), []
    for g in GRADS:
        c = beta1 * m + (1 - beta1) * g
        w = w - lr * (np.sign(c) + wd * w)
        m = beta2 * m + (1 - beta2) * g
        out.append(w)
    return np.stack(out)


def expected_adam_split(
    lr: float, wd: float, beta1: float, beta2: float, eps: float, fraction: float
) -> np.ndarray:
    w, m, v, out = W0.copy(), np.zeros_like(W0), np.zeros_like(W0), []
    for t, g in enumerate(GRADS, start=1):
        g = g + fraction * wd * w
        w = w - lr * wd * (1 - fraction) * w
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        w = w - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(w)
    return np.stack(out)


def test_sgdw_matches_formula() -> None:
    got = run_optimizer("sgdw", lr=LR, momentum=BETA, weight_decay=WD)
    np.testing.assert_allclose(got, expected_sgdw(LR, WD, BETA), rtol=1e-13, atol=1e-15)


def test_sgdw_without_momentum_is_plain_decoupled_sgd() -> None:
    got = run_optimizer("sgdw", lr=LR, momentum=0.0, weight_decay=WD)
    np.testing.assert_allclose(got, expected_sgdw(LR, WD, 0.0), rtol=1e-13, atol=1e-15)


def test_signum_matches_formula() -> None:
    got = run_optimizer("signum", lr=LR, momentum=BETA, weight_decay=WD)
    want = expected_signum(LR, WD, BETA, decoupled=False)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


def test_signumw_matches_formula() -> None:
    got = run_optimizer("signumw", lr=LR, momentum=BETA, weight_decay=WD)
    want = expected_signum(LR, WD, BETA, decoupled=True)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


def test_signgd_is_signum_without_momentum_whatever_momentum_is_passed() -> None:
    got = run_optimizer("signgd", lr=LR, momentum=0.9, weight_decay=WD)
    want = expected_signum(LR, WD, 0.0, decoupled=False)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


def test_lion_matches_formula() -> None:
    got = run_optimizer("lion", lr=LR, momentum=BETA, beta2=BETA2, weight_decay=WD)
    np.testing.assert_allclose(got, expected_lion(LR, WD, BETA, BETA2), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_adam_split_matches_formula(fraction: float) -> None:
    got = run_optimizer(
        "adam", lr=LR, momentum=BETA, beta2=BETA2, weight_decay=WD, coupled_fraction=fraction
    )
    want = expected_adam_split(LR, WD, BETA, BETA2, 1e-8, fraction)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("fraction", "reference"), [(1.0, torch.optim.Adam), (0.0, torch.optim.AdamW)]
)
def test_coupled_fraction_endpoints_are_torch_adam_and_adamw_bit_for_bit(
    fraction: float, reference: type[torch.optim.Optimizer]
) -> None:
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(7, 5, generator=gen)
    ours = torch.nn.Parameter(start.clone())
    theirs = torch.nn.Parameter(start.clone())
    kwargs = {"lr": 3e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05}
    opt_ours = AdamCoupledDecoupled([ours], coupled_fraction=fraction, **kwargs)
    opt_theirs = reference([theirs], **kwargs)
    for _ in range(20):
        grad = torch.randn(7, 5, generator=gen)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_theirs.step()
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, start)


def test_builtin_names_are_the_torch_optimizers() -> None:
    param = [torch.nn.Parameter(torch.zeros(2))]
    sgd = build_optimizer(param, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["dampening"] == 0.0 and sgd.defaults["nesterov"] is False
    assert sgd.defaults["weight_decay"] == 5e-4
    adam = build_optimizer(param, "adam", lr=1e-3, momentum=0.7, beta2=0.99, weight_decay=0.1)
    assert type(adam) is torch.optim.Adam and adam.defaults["betas"] == (0.7, 0.99)
    adamw = build_optimizer(param, "adamw", lr=1e-3, weight_decay=0.1)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.1


@pytest.mark.parametrize("name", ["sgdw", "signum", "signumw", "signgd", "lion"])
def test_param_groups_keep_their_own_lr(name: str) -> None:
    frozen = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    moving = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    opt = build_optimizer(
        [{"params": [frozen], "lr": 0.0}, {"params": [moving]}], name, lr=0.1, weight_decay=0.1
    )
    for p in (frozen, moving):
        p.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)
    opt.step()
    assert frozen.tolist() == [1.0, -1.0]
    assert moving.tolist() != [1.0, -1.0]


HAND_WRITTEN = [
    ("sgdw", {}),
    ("signum", {}),
    ("signumw", {}),
    ("signgd", {}),
    ("lion", {}),
    ("adam", {"coupled_fraction": 0.25}),
]


@pytest.mark.parametrize(("name", "extra"), HAND_WRITTEN)
def test_state_dict_round_trip_resumes_exactly(name: str, extra: dict[str, float]) -> None:
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(3, 4, generator=gen)
    grads = [torch.randn(3, 4, generator=gen) for _ in range(6)]
    kwargs = {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.01, **extra}

    straight = torch.nn.Parameter(start.clone())
    opt = build_optimizer([straight], name, **kwargs)
    for grad in grads:
        straight.grad = grad.clone()
        opt.step()

    resumed = torch.nn.Parameter(start.clone())
    first = build_optimizer([resumed], name, **kwargs)
    for grad in grads[:3]:
        resumed.grad = grad.clone()
        first.step()
    saved = first.state_dict()
    second = build_optimizer([resumed], name, **{**kwargs, "lr": 123.0})
    second.load_state_dict(saved)
    assert second.param_groups[0]["lr"] == 0.01
    for grad in grads[3:]:
        resumed.grad = grad.clone()
        second.step()
    assert torch.equal(straight, resumed)


def test_parameters_without_gradient_are_left_alone() -> None:
    for name in OPTIMIZER_NAMES:
        param = torch.nn.Parameter(torch.ones(3))
        build_optimizer([param], name, lr=0.1, weight_decay=0.1).step()
        assert param.tolist() == [1.0, 1.0, 1.0], name


def test_is_decoupled() -> None:
    assert [is_decoupled(n) for n in OPTIMIZER_NAMES] == [
        False,  # sgd
        True,  # sgdw
        False,  # adam
        True,  # adamw
        False,  # signum
        True,  # signumw
        False,  # signgd
        True,  # lion
    ]
    assert is_decoupled("adamw", 0.0) and is_decoupled("adam", 0.0)
    assert not is_decoupled("adamw", 0.5)
    assert not is_decoupled("adamw", 1.0)
    with pytest.raises(ValueError, match="Adam family"):
        is_decoupled("sgd", 0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "rmsprop", "lr": 0.1}, "optimizer must be one of sgd, sgdw.*'rmsprop'"),
        ({"name": "sgd", "lr": -1.0}, r"lr must be in \[0.0, inf\), got -1.0"),
        ({"name": "sgd", "lr": 0.1, "momentum": 1.0}, r"momentum must be in \[0.0, 1.0\)"),
        ({"name": "adam", "lr": 0.1, "beta2": 1.5}, "beta2 must be"),
        ({"name": "sgd", "lr": 0.1, "weight_decay": float("nan")}, "weight_decay must be"),
        ({"name": "adam", "lr": 0.1, "eps": 0.0}, "eps must be a positive"),
        ({"name": "adamw", "lr": 0.1, "coupled_fraction": 1.5}, r"coupled_fraction .*1.5"),
        ({"name": "signum", "lr": 0.1, "coupled_fraction": 0.5}, "Adam family"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs: dict, message: str) -> None:
    param = [torch.nn.Parameter(torch.zeros(2))]
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=message):
        build_optimizer(param, name, **kwargs)


def lrs_over(name: str, total_steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(opt, name, total_steps)
    seen = []
    for _ in range(total_steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return seen


def test_step_schedule_divides_by_ten_at_one_and_two_thirds() -> None:
    assert lrs_over("step", 9) == pytest.approx([1.0] * 3 + [0.1] * 3 + [0.01] * 3)
    assert lrs_over("constant", 5) == [1.0] * 5
    cosine = lrs_over("cosine", 4)
    assert cosine == pytest.approx([0.5 * (1 + np.cos(np.pi * t / 4)) for t in range(4)])
    with pytest.raises(ValueError, match="lr schedule must be one of constant, step, cosine"):
        lrs_over("linear", 3)
    with pytest.raises(ValueError, match="total_steps must be a positive integer, got 0"):
        lrs_over("step", 0)


# --- the theory: the data never moves the class-sum of the classifier ------------------


def train_linear_softmax(name: str, lr: float, wd: float, beta: float, steps: int) -> np.ndarray:
    """nc0 = ‖W^T 1‖ after each minibatch step, in float64."""
    gen = torch.Generator().manual_seed(0)
    num_classes, dim = 5, 7
    model = torch.nn.Linear(dim, num_classes).double()
    x = torch.randn(64, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, num_classes, (64,), generator=gen)
    opt = build_optimizer(model.parameters(), name, lr=lr, momentum=beta, weight_decay=wd)
    nc0 = [model.weight.detach().sum(0).norm().item()]
    for step in range(steps):
        batch = slice(16 * (step % 4), 16 * (step % 4 + 1))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
        nc0.append(model.weight.detach().sum(0).norm().item())
    return np.array(nc0)


def test_sgd_coupled_weight_decay_follows_momentum_recursion() -> None:
    lr, wd, beta, steps = 0.1, 0.05, 0.9, 60
    nc0 = train_linear_softmax("sgd", lr, wd, beta, steps)
    c = [1.0, 1 - lr * wd]
    while len(c) <= steps:
        c.append((1 + beta - lr * wd) * c[-1] - beta * c[-2])
    np.testing.assert_allclose(nc0, np.abs(c) * nc0[0], rtol=1e-6)
    assert nc0[-1] < 0.5 * nc0[0]


def test_sgdw_decays_geometrically_whatever_the_momentum() -> None:
    lr, wd, beta, steps = 0.1, 0.05, 0.9, 60
    nc0 = train_linear_softmax("sgdw", lr, wd, beta, steps)
    np.testing.assert_allclose(nc0, (1 - lr * wd) ** np.arange(steps + 1) * nc0[0], rtol=1e-6)


def test_sgd_without_weight_decay_keeps_nc0_constant() -> None:
    nc0 = train_linear_softmax("sgd", 0.1, 0.0, 0.9, 30)
    np.testing.assert_allclose(nc0, nc0[0], rtol=1e-6)
