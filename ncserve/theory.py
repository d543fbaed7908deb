"""The nc0 theory of the optimizer study, as exact float64 predictions (pure numpy, no I/O).

Legend: K classes, P feature dim, T optimizer steps. ``lrs`` holds η_1..η_T, the learning
rate each optimizer step uses; factor arrays hold c_0..c_T (c_0 = 1).

Why these predictions are exact: the cross-entropy gradient with respect to the classifier
W (K x P) has zero column sum over the classes, 1_K^T ∇_W L = 0, for every batch. So the
class-sum m_t = W_t^T 1_K is moved only by weight decay and momentum, every coordinate of
it by the same scalar recursion, and nc0_t = ‖m_t‖ = |c_t| · nc0_0 (any model, any data,
any batch size, any number of data-parallel ranks).

- SGD with coupled weight decay (``torch.optim.SGD(momentum=β, weight_decay=λ)``): the
  buffer b_t = β b_{t-1} + g_t + λW_{t-1} (b_1 = g_1 + λW_0) and W_t = W_{t-1} − η_t b_t.
  Its class-sum follows b_t = β b_{t-1} + λ c_{t-1}, c_t = c_{t-1} − η_t b_t. For a
  constant lr this is the three-term recursion c_1 = 1 − ηλ,
  c_{t+1} = (1 + β − ηλ) c_t − β c_{t-1}; with a schedule the two-state form is the exact
  one (the buffer holds unscaled gradients, so the three-term form needs the ratio
  η_{t+1}/η_t in its β terms).
- SGDW (decoupled: V ← βV + g; W ← (1 − ηλ)W − ηV): V never has a class-sum, so
  c_t = Π_{s≤t} (1 − η_s λ) and momentum does not change the rate.

The unconstrained-features model (UFM) makes the sign-based optimizers' failure explicit:
``simulate_ufm_signgd`` trains only W on features fixed at the simplex ETF. Conventions,
chosen so that the decoupled closed form holds exactly:

- P = K and h_k = γ · sqrt(K/(K−1)) · (e_k − 1_K/K): the ETF aligned with the coordinate
  axes, ‖h_k‖ = γ (``feature_norm``). One sample per class, no bias.
- L = (1/K) Σ_k CE(W h_k, k), the mean over the K samples.
- With W_0 = 0 the softmax is uniform and ∇L = −(γ'/K)(I − J/K) with γ' = γ·sqrt(K/(K−1)),
  so sign(∇L) = J − 2I. While W stays a multiple of J − 2I the logits are a multiple of
  I − J/K, the softmax puts p on the true class and q = (1 − p)/(K − 1) elsewhere, and
  ∇L = (γ' q/K)(J − K I): the sign is J − 2I at every step. Neither γ nor the loss scale
  enters the sign (both are positive factors), so the decoupled trajectory
  W_t = −(1 − (1 − ηλ)^t)/λ · (J − 2I) and nc0_t = sqrt(K)·(K − 2)·(1 − (1 − ηλ)^t)/λ do
  not depend on them; the coupled trajectory does (it compares ∇L with λW).
- What does matter: P = K with the axis-aligned ETF (a rotated ETF, R·H, changes the sign
  pattern of ∇L = (1/K)(S − I)H^T R^T), and float64 range: once the logit gap
  2γ'·a_t exceeds about 745 the off-class probabilities underflow to 0, ∇L gets exact
  zeros and sign(∇L) is no longer J − 2I. ``UFMTrajectory.saturated_step`` reports the
  first such step; keep γ/λ well below ~350 to stay clear of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The optimizers of the study, in its order: each coupled one next to its decoupled twin.
OPTIMIZER_NAMES: tuple[str, ...] = (
    "sgd",
    "sgdw",
    "adam",
    "adamw",
    "signum",
    "signumw",
    "signgd",
    "lion",
)
SCHEDULE_NAMES: tuple[str, ...] = ("constant", "step", "cosine")
NC0_OPTIMIZERS: tuple[str, ...] = ("sgd", "sgdw")
UFM_OPTIMIZERS: tuple[str, ...] = ("signgd-coupled", "signgd-decoupled")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_nonnegative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def step_milestones(total_steps: int) -> list[int]:
    """Scheduler steps after which ``step`` divides the lr by 10: 1/3 and 2/3 of training."""
    return [max(1, total_steps // 3), max(1, (2 * total_steps) // 3)]


def lr_schedule(
    base_lr: float, schedule: str, steps: int, total_steps: int | None = None
) -> np.ndarray:
    """η_1..η_steps, the lr used by each optimizer step under nclaunch's ``--lr-schedule``.

    The scheduler is stepped after every optimizer step, so step t uses the lr after t − 1
    scheduler steps. ``total_steps`` (default ``steps``) is the length of the whole run,
    which places the ``step`` milestones and the end of the ``cosine`` annealing. The
    arithmetic repeats torch's MultiStepLR(gamma=0.1) and CosineAnnealingLR(eta_min=0)
    update by update, so the values agree with a training run to round-off.
    """
    if not (math.isfinite(base_lr) and base_lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {base_lr!r}")
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(
            f"lr schedule must be one of {', '.join(SCHEDULE_NAMES)}; got {schedule!r}"
        )
    _check_positive_int("steps", steps)
    total = steps if total_steps is None else total_steps
    _check_positive_int("total_steps", total)
    lrs = np.empty(steps, dtype=np.float64)
    lr = float(base_lr)
    milestones = step_milestones(total)
    for t in range(steps):
        # ``t`` scheduler steps have been taken before optimizer step t + 1.
        if t > 0 and schedule == "step":
            count = milestones.count(t)
            if count:
                lr = lr * 0.1**count
        elif t > 0 and schedule == "cosine":
            if (t - 1 - total) % (2 * total) == 0:
                lr = lr + base_lr * (1 - math.cos(math.pi / total)) / 2
            else:
                lr = (
                    (1 + math.cos(math.pi * t / total))
                    / (1 + math.cos(math.pi * (t - 1) / total))
                    * lr
                )
        lrs[t] = lr
    return lrs


def sgd_nc0_factors(lrs: np.ndarray, momentum: float, weight_decay: float) -> np.ndarray:
    """c_0..c_T for SGD with coupled weight decay and heavy-ball momentum (dampening 0)."""
    _check_momentum(momentum)
    _check_nonnegative("weight_decay", weight_decay)
    lrs = np.asarray(lrs, dtype=np.float64)
    factors = np.empty(len(lrs) + 1, dtype=np.float64)
    factors[0] = 1.0
    c, buffer = 1.0, 0.0
    for t, lr in enumerate(lrs, start=1):
        # torch starts the buffer as a copy of the first direction: the same as β·0 + d.
        buffer = momentum * buffer + weight_decay * c
        c = c - lr * buffer
        factors[t] = c
    return factors


def sgdw_nc0_factors(lrs: np.ndarray, weight_decay: float) -> np.ndarray:
    """c_0..c_T for SGDW: Π (1 − η_s λ); momentum does not enter."""
    _check_nonnegative("weight_decay", weight_decay)
    lrs = np.asarray(lrs, dtype=np.float64)
    factors = np.empty(len(lrs) + 1, dtype=np.float64)
    factors[0] = 1.0
    c = 1.0
    for t, lr in enumerate(lrs, start=1):
        c = c * (1 - lr * weight_decay)
        factors[t] = c
    return factors


def nc0_factors(
    optimizer: str, lrs: np.ndarray, momentum: float, weight_decay: float
) -> np.ndarray:
    """c_0..c_T of ``optimizer`` (sgd or sgdw): nc0_t = |c_t| · nc0_0."""
    if optimizer == "sgd":
        return sgd_nc0_factors(lrs, momentum, weight_decay)
    if optimizer == "sgdw":
        _check_momentum(momentum)
        return sgdw_nc0_factors(lrs, weight_decay)
    raise ValueError(
        f"optimizer must be one of {', '.join(NC0_OPTIMIZERS)} (the theory predicts nc0 "
        f"exactly for these only); got {optimizer!r}"
    )


def _check_momentum(momentum: float) -> None:
    if not (math.isfinite(momentum) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")


def sgd_decays(lr: float, momentum: float, weight_decay: float) -> bool:
    """Whether constant-lr coupled SGD drives nc0 to 0: 0 < ηλ < 2(1 + β)."""
    return 0 < lr * weight_decay < 2 * (1 + momentum)


# -- the unconstrained-features model ---------------------------------------------------------


@dataclass(frozen=True)
class UFMTrajectory:
    """nc0 of a UFM run at every step, and where float64 stopped representing the model."""

    nc0: np.ndarray  # nc0_0..nc0_T (nc0_0 = 0: W_0 = 0)
    lrs: np.ndarray  # η_1..η_T
    weight_KP: np.ndarray  # W_T
    saturated_step: int | None  # first step whose ∇L had an exact zero (softmax underflow)


def simplex_etf_features(num_classes: int, feature_norm: float = 1.0) -> np.ndarray:
    """H (P x K, P = K): column k is feature_norm · sqrt(K/(K−1)) · (e_k − 1/K)."""
    _check_classes(num_classes)
    if not (math.isfinite(feature_norm) and feature_norm > 0):
        raise ValueError(f"feature_norm must be a positive finite number, got {feature_norm!r}")
    K = num_classes
    scale = feature_norm * math.sqrt(K / (K - 1))
    return scale * (np.eye(K) - np.full((K, K), 1.0 / K))


def _check_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")


def ufm_loss_gradient(weight_KP: np.ndarray, features_PK: np.ndarray) -> np.ndarray:
    """∇_W of the mean cross-entropy over the K samples (sample k = column k, label k)."""
    logits_KK = weight_KP @ features_PK  # column k: the logits of sample k
    shifted = logits_KK - logits_KK.max(axis=0, keepdims=True)
    probs_KK = np.exp(shifted)
    probs_KK /= probs_KK.sum(axis=0, keepdims=True)
    K = features_PK.shape[1]
    return (probs_KK - np.eye(K)) @ features_PK.T / K


def simulate_ufm_signgd(
    num_classes: int,
    lrs: np.ndarray,
    weight_decay: float,
    *,
    coupled: bool,
    feature_norm: float = 1.0,
) -> UFMTrajectory:
    """Train only W from 0 with SignGD on the UFM.

    decoupled (AdamW with β1 = β2 = ε = 0): W ← (1 − ηλ)W − η sign(∇L)
    coupled (Adam-like):                    W ← W − η sign(∇L + λW)
    """
    _check_nonnegative("weight_decay", weight_decay)
    features_PK = simplex_etf_features(num_classes, feature_norm)
    lrs = np.asarray(lrs, dtype=np.float64)
    K = num_classes
    weight_KP = np.zeros((K, K), dtype=np.float64)
    nc0 = np.zeros(len(lrs) + 1, dtype=np.float64)
    saturated: int | None = None
    for t, lr in enumerate(lrs, start=1):
        grad_KP = ufm_loss_gradient(weight_KP, features_PK)
        if saturated is None and not np.all(grad_KP):
            saturated = t
        if coupled:
            weight_KP = weight_KP - lr * np.sign(grad_KP + weight_decay * weight_KP)
        else:
            weight_KP = (1 - lr * weight_decay) * weight_KP - lr * np.sign(grad_KP)
        nc0[t] = np.linalg.norm(weight_KP.sum(axis=0))
    return UFMTrajectory(nc0=nc0, lrs=lrs, weight_KP=weight_KP, saturated_step=saturated)


def ufm_decoupled_closed_form(
    num_classes: int, lr: float, weight_decay: float, steps: int
) -> np.ndarray:
    """nc0_0..nc0_T = sqrt(K)·(K − 2)·(1 − (1 − ηλ)^t)/λ (constant lr; λ = 0: sqrt(K)(K−2)ηt)."""
    _check_classes(num_classes)
    _check_positive_int("steps", steps)
    _check_nonnegative("weight_decay", weight_decay)
    K = num_classes
    t = np.arange(steps + 1, dtype=np.float64)
    # λ = 0 is the limit λ -> 0 of the closed form: W grows by η per step.
    scale = lr * t if weight_decay == 0 else (1 - (1 - lr * weight_decay) ** t) / weight_decay
    return math.sqrt(K) * (K - 2) * scale


def ufm_decoupled_prediction(num_classes: int, lrs: np.ndarray, weight_decay: float) -> np.ndarray:
    """The decoupled closed form for any lr schedule: nc0_t = sqrt(K)(K − 2) a_t with
    a_t = (1 − η_t λ) a_{t−1} + η_t, a_0 = 0 (equal to the closed form for a constant lr)."""
    _check_classes(num_classes)
    _check_nonnegative("weight_decay", weight_decay)
    lrs = np.asarray(lrs, dtype=np.float64)
    scale = np.zeros(len(lrs) + 1, dtype=np.float64)
    a = 0.0
    for t, lr in enumerate(lrs, start=1):
        a = (1 - lr * weight_decay) * a + lr
        scale[t] = a
    K = num_classes
    return math.sqrt(K) * (K - 2) * scale
