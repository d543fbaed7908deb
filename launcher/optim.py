"""Optimizers and learning-rate schedules, defined exactly as in docs/theory.md.

The optimizer is the independent variable of the study, so every update rule
here is written out rather than approximated. Notation in the docstrings:
W weights, g gradient, η learning rate, λ weight decay, β momentum (β1 for the
Adam family), β2 second-moment / Lion interpolation coefficient.

Coupled weight decay enters through the gradient (λW is added to g before any
moment is formed); decoupled weight decay shrinks the weights directly. The
difference decides whether the class-sum of the classifier, W^T 1, can decay
(nc0 in the docs), which is the paper's main claim.

The hand-written optimizers use elementwise torch ops only, keep their state in
``self.state`` and honour per-group hyperparameters, so DDP, DeepSpeed
(``deepspeed.initialize(optimizer=...)``, which rewrites ``param_groups`` to flat
fp32 partitions under ZeRO) and ``state_dict`` round-trips work unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, MultiStepLR
from torch.optim.optimizer import ParamsT

from ncserve.theory import OPTIMIZER_NAMES, SCHEDULE_NAMES

# Optimizers whose weight decay never touches the gradient.
_DECOUPLED = frozenset({"sgdw", "adamw", "signumw", "lion"})
_ADAM_FAMILY = frozenset({"adam", "adamw"})


def _check_range(field: str, value: float, low: float, high: float, *, high_open: bool) -> None:
    ok = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{field} must be in [{low}, {high}{bracket}, got {value!r}")


def _params_with_grad(group: dict[str, Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, gradient) for each parameter of the group that has a gradient."""
    for param in group["params"]:
        grad = param.grad
        if grad is None:
            continue
        if grad.is_sparse:
            raise RuntimeError("sparse gradients are not supported by this optimizer")
        yield param, grad


class SGDW(torch.optim.Optimizer):
    """SGD with heavy-ball momentum and decoupled weight decay.

    V ← βV + g;  W ← (1 − ηλ)W − ηV.  With V_0 = 0 the first step uses V = g,
    the same buffer torch's SGD starts from (dampening 0, no Nesterov).
    """

    def __init__(
        self, params: ParamsT, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
            for param, grad in _params_with_grad(group):
                if beta != 0:
                    state = self.state[param]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(
                            param, memory_format=torch.preserve_format
                        )
                    buf = state["momentum_buffer"]
                    buf.mul_(beta).add_(grad)
                    grad = buf
                if wd != 0:
                    param.mul_(1 - lr * wd)
                param.add_(grad, alpha=-lr)
        return loss


class Signum(torch.optim.Optimizer):
    """Sign of momentum, with coupled or decoupled weight decay.

    coupled (Signum):     m ← βm + (1 − β)(g + λW);  W ← W − η sign(m)
    decoupled (SignumW):  m ← βm + (1 − β)g;         W ← W − η(sign(m) + λW)
    SignGD is coupled Signum with β = 0, i.e. W ← W − η sign(g + λW); no buffer is
    kept then, so it costs no optimizer memory.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        decoupled: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "decoupled": decoupled,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
            decoupled = group["decoupled"]
            for param, direction in _params_with_grad(group):
                if wd != 0 and not decoupled:
                    direction = direction.add(param, alpha=wd)
                if beta != 0:
                    state = self.state[param]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(
                            param, memory_format=torch.preserve_format
                        )
                    buf = state["momentum_buffer"]
                    buf.mul_(beta).add_(direction, alpha=1 - beta)
                    direction = buf
                # sign(m) is computed before the decoupled shrink so both read W_t.
                update = torch.sign(direction)
                if wd != 0 and decoupled:
                    update.add_(param, alpha=wd)
                param.add_(update, alpha=-lr)
        return loss


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023) with decoupled weight decay.

    c ← β1 m + (1 − β1) g;  W ← (1 − ηλ)W − η sign(c);  m ← β2 m + (1 − β2) g.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for param, grad in _params_with_grad(group):
                state = self.state[param]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                exp_avg = state["exp_avg"]
                update = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1).sign_()
                if wd != 0:
                    param.mul_(1 - lr * wd)
                param.add_(update, alpha=-lr)
                exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
        return loss


class AdamCoupledDecoupled(torch.optim.Optimizer):
    """Adam whose total weight decay λ is split into coupled and decoupled parts.

    With F = coupled_fraction:  g' = g + FλW_t;  W ← (1 − ηλ(1 − F))W;  then the
    Adam step on g'. F = 1 is ``torch.optim.Adam(weight_decay=λ)`` and F = 0 is
    ``torch.optim.AdamW(weight_decay=λ)``, bit for bit on CPU: the arithmetic below
    performs the same floating-point operations in the same order as torch's
    single-tensor Adam, and each decay part is skipped when it is exactly zero.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        coupled_fraction: float = 1.0,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "coupled_fraction": coupled_fraction,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            fraction = group["coupled_fraction"]
            coupled_wd = wd * fraction
            decoupled_wd = wd * (1 - fraction)
            for param, grad in _params_with_grad(group):
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(
                        param, memory_format=torch.preserve_format
                    )
                state["step"] += 1
                step = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                # The coupled part reads W_t, so it is formed before the decoupled shrink.
                if coupled_wd != 0:
                    grad = grad.add(param, alpha=coupled_wd)
                if decoupled_wd != 0:
                    param.mul_(1 - lr * decoupled_wd)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1**step)
                bias_correction2_sqrt = (1 - beta2**step) ** 0.5
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                param.addcdiv_(exp_avg, denom, value=-step_size)
        return loss


def is_decoupled(name: str, coupled_fraction: float | None = None) -> bool:
    """Whether the whole weight decay of this optimizer bypasses the gradient.

    A split Adam (0 < F < 1) has a coupled part and is therefore not decoupled;
    only F = 0 is.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_NAMES)}; got {name!r}")
    if coupled_fraction is not None:
        if name not in _ADAM_FAMILY:
            raise ValueError(
                f"coupled_fraction applies to the Adam family (adam, adamw) only; got "
                f"optimizer {name!r} with coupled_fraction={coupled_fraction!r}"
            )
        return coupled_fraction == 0
    return name in _DECOUPLED


def build_optimizer(
    params: ParamsT,
    name: str,
    *,
    lr: float,
    momentum: float = 0.9,
    beta2: float = 0.999,
    weight_decay: float = 0.0,
    coupled_fraction: float | None = None,
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params`` (tensors or param-group dicts).

    ``momentum`` is β for SGD/SGDW/Signum/SignumW and β1 for Adam/AdamW/Lion;
    ``signgd`` ignores it (β = 0 by definition). ``beta2`` is used by the Adam
    family and Lion. ``coupled_fraction`` F (Adam family only) selects
    :class:`AdamCoupledDecoupled`; with it ``adam`` and ``adamw`` are the same
    optimizer. Per-group values in ``params`` override these defaults.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_NAMES)}; got {name!r}")
    _check_range("lr", lr, 0.0, math.inf, high_open=True)
    _check_range("momentum", momentum, 0.0, 1.0, high_open=True)
    _check_range("beta2", beta2, 0.0, 1.0, high_open=True)
    _check_range("weight_decay", weight_decay, 0.0, math.inf, high_open=True)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if coupled_fraction is not None:
        if name not in _ADAM_FAMILY:
            raise ValueError(
                f"coupled_fraction applies to the Adam family (adam, adamw) only; got "
                f"optimizer {name!r} with coupled_fraction={coupled_fraction!r}"
            )
        _check_range("coupled_fraction", coupled_fraction, 0.0, 1.0, high_open=False)
        return AdamCoupledDecoupled(
            params,
            lr=lr,
            betas=(momentum, beta2),
            eps=eps,
            weight_decay=weight_decay,
            coupled_fraction=coupled_fraction,
        )
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            dampening=0.0,
            nesterov=False,
        )
    if name == "sgdw":
        return SGDW(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(
            params, lr=lr, betas=(momentum, beta2), eps=eps, weight_decay=weight_decay
        )
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=(momentum, beta2), eps=eps, weight_decay=weight_decay
        )
    if name in ("signum", "signumw"):
        return Signum(
            params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            decoupled=name == "signumw",
        )
    if name == "signgd":
        return Signum(params, lr=lr, momentum=0.0, weight_decay=weight_decay, decoupled=False)
    return Lion(params, lr=lr, betas=(momentum, beta2), weight_decay=weight_decay)


def step_milestones(total_steps: int) -> list[int]:
    """Steps after which the ``step`` schedule divides the lr by 10 (1/3 and 2/3 of training)."""
    # A milestone at 0 would fire when the scheduler is constructed, before any step.
    return [max(1, total_steps // 3), max(1, (2 * total_steps) // 3)]


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int) -> LRScheduler:
    """An lr schedule stepped once per optimizer step, ``total_steps`` in all.

    ``constant`` keeps the lr; ``step`` multiplies it by 0.1 once ``step_milestones``
    steps are done (the paper's schedule); ``cosine`` anneals it to 0 at
    ``total_steps``.
    """
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"lr schedule must be one of {', '.join(SCHEDULE_NAMES)}; got {name!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    if name == "constant":
        return LambdaLR(optimizer, lr_lambda=lambda _step: 1.0)
    if name == "step":
        return MultiStepLR(optimizer, milestones=step_milestones(total_steps), gamma=0.1)
    return CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=0.0)
