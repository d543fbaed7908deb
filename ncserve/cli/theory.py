"""``ncserve theory``: the exact nc0 predictions of the optimizer study, printed or plotted.

``nc0`` prints the factor c_t with nc0_t = |c_t| · nc0_0 for SGD (coupled weight decay) or
SGDW (decoupled); ``nc0-grid`` the final factor over momentum x weight decay; ``ufm``
simulates SignGD on the unconstrained-features model next to the decoupled closed form.
The math lives in ``ncserve.theory``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import numpy as np

from ncserve import theory
from ncserve.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])

_PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def _schedule_options(command: F) -> F:
    options = [
        click.option(
            "--lr",
            type=click.FloatRange(min=0, min_open=True),
            required=True,
            help="Learning rate η (the base lr of a schedule).",
        ),
        click.option(
            "--steps",
            type=click.IntRange(min=1),
            required=True,
            help="Optimizer steps T to predict.",
        ),
        click.option(
            "--lr-schedule",
            type=click.Choice(theory.SCHEDULE_NAMES),
            default="constant",
            show_default=True,
            help="As nclaunch's --lr-schedule: constant; step (lr / 10 after 1/3 and "
            "2/3 of --total-steps); cosine (to 0 at --total-steps).",
        ),
        click.option(
            "--total-steps",
            type=click.IntRange(min=1),
            default=None,
            show_default="--steps",
            help="Length of the whole run, which places the schedule's milestones "
            "(steps per epoch x epochs of an nclaunch run).",
        ),
        click.option(
            "--format",
            "fmt",
            type=click.Choice(["text", "json"]),
            default="text",
            show_default=True,
            help="text: aligned columns; json: one object.",
        ),
        click.option(
            "--plot",
            type=click.Path(path_type=Path, dir_okay=False),
            default=None,
            help="Also draw the result to this .png, .svg or .pdf file.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _every_option(command: F) -> F:
    return click.option(
        "--every",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Print every N-th step (the last step is always printed).",
    )(command)


def _lrs(lr: float, schedule: str, steps: int, total_steps: int | None) -> np.ndarray:
    try:
        return theory.lr_schedule(lr, schedule, steps, total_steps)
    except ValueError as err:
        raise UserError(str(err)) from None


def _printed_steps(steps: int, every: int) -> list[int]:
    shown = list(range(0, steps + 1, every))
    if shown[-1] != steps:
        shown.append(steps)
    return shown


def _check_plot(path: Path | None) -> None:
    if path is not None and path.suffix.lower() not in _PLOT_SUFFIXES:
        raise UserError(
            f"--plot: {str(path)!r} must end in {', '.join(_PLOT_SUFFIXES)} "
            f"(got {path.suffix or 'no suffix'!r})"
        )


def _save(fig: Any, path: Path) -> None:
    from ncserve.report.figures import save_figure

    try:
        save_figure(fig, str(path))
    except OSError as err:
        raise UserError(f"--plot: cannot write {str(path)!r}: {err.strerror}") from None
    click.echo(f"wrote {path}", err=True)


def _columns(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@click.group("theory")
def theory_group() -> None:
    """Exact nc0 predictions (SGD, SGDW) and the unconstrained-features model (SignGD).

    The cross-entropy gradient has zero class-sum, so only weight decay and momentum move
    W^T 1: nc0_t = |c_t| · nc0_0 exactly, for any model, data and batch size.
    """


@theory_group.command("nc0")
@click.option(
    "--optimizer",
    type=click.Choice(theory.NC0_OPTIMIZERS),
    required=True,
    help="sgd: coupled weight decay (torch.optim.SGD); sgdw: decoupled.",
)
@click.option(
    "--momentum",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.9,
    show_default=True,
    help="Heavy-ball momentum β (dampening 0, no Nesterov).",
)
@click.option(
    "--weight-decay",
    type=click.FloatRange(min=0),
    default=5e-4,
    show_default=True,
    help="Weight decay λ.",
)
@click.option(
    "--nc0-init",
    type=click.FloatRange(min=0),
    default=None,
    help="nc0 at step 0 (e.g. a run's first measurement): also print nc0_t.",
)
@_every_option
@_schedule_options
def nc0_command(
    optimizer: str,
    momentum: float,
    weight_decay: float,
    nc0_init: float | None,
    every: int,
    lr: float,
    steps: int,
    lr_schedule: str,
    total_steps: int | None,
    fmt: str,
    plot: Path | None,
) -> None:
    """Print c_t, t = 0..STEPS, with nc0_t = |c_t| · nc0_0.

    sgd: c_0 = 1, c_1 = 1 − ηλ, c_{t+1} = (1 + β − ηλ) c_t − β c_{t−1} at a constant lr
    (with a schedule, the exact two-state form: b_t = β b_{t−1} + λ c_{t−1},
    c_t = c_{t−1} − η_t b_t). sgdw: c_t = Π (1 − η_s λ).

    \b
    Example:  ncserve theory nc0 --optimizer sgd --lr 0.05 --momentum 0.9 \\
                  --weight-decay 5e-4 --steps 1000 --every 100
    """
    _check_plot(plot)
    lrs = _lrs(lr, lr_schedule, steps, total_steps)
    try:
        factors = theory.nc0_factors(optimizer, lrs, momentum, weight_decay)
    except ValueError as err:
        raise UserError(str(err)) from None
    shown = _printed_steps(steps, every)
    if fmt == "json":
        payload: dict[str, Any] = {
            "optimizer": optimizer,
            "lr": lr,
            "lr_schedule": lr_schedule,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "steps": shown,
            "step_lr": [None if t == 0 else float(lrs[t - 1]) for t in shown],
            "factor": [_json_float(factors[t]) for t in shown],
        }
        if nc0_init is not None:
            payload["nc0"] = [_json_float(abs(factors[t]) * nc0_init) for t in shown]
        click.echo(json.dumps(payload))
    else:
        decay = "coupled" if optimizer == "sgd" else "decoupled"
        click.echo(
            f"# {optimizer} ({decay} weight decay): lr {lr:g} ({lr_schedule}), momentum "
            f"{momentum:g}, weight decay {weight_decay:g}, {steps} steps"
        )
        click.echo(f"# nc0_t = |c_t| * nc0_0; |c_{steps}| = {abs(factors[steps]):.6g}")
        header = ["step", "lr", "c_t"] + (["nc0"] if nc0_init is not None else [])
        rows = []
        for t in shown:
            row = [str(t), "-" if t == 0 else f"{lrs[t - 1]:.6g}", f"{factors[t]:.10g}"]
            if nc0_init is not None:
                row.append(f"{abs(factors[t]) * nc0_init:.10g}")
            rows.append(row)
        click.echo(_columns(header, rows))
    if plot is not None:
        from ncserve.report.figures import nc0_factor_figure

        title = f"{optimizer}: lr {lr:g} ({lr_schedule}), β {momentum:g}, λ {weight_decay:g}"
        _save(nc0_factor_figure(np.arange(steps + 1), factors, title), plot)


def _float_list(ctx: click.Context, param: click.Parameter, value: str) -> list[float]:
    try:
        values = [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    if not values:
        raise click.BadParameter("give at least one value")
    return values


@theory_group.command("nc0-grid")
@click.option(
    "--optimizer",
    type=click.Choice(theory.NC0_OPTIMIZERS),
    required=True,
    help="sgd: coupled weight decay; sgdw: decoupled.",
)
@click.option(
    "--momentum",
    "momenta",
    default="0,0.5,0.7,0.9,0.95,0.98",
    show_default=True,
    callback=_float_list,
    help="Comma-separated momenta (rows).",
)
@click.option(
    "--weight-decay",
    "decays",
    default="0,5e-5,5e-4,5e-3,0.05,0.5",
    show_default=True,
    callback=_float_list,
    help="Comma-separated weight decays (columns).",
)
@click.option(
    "--nc0-init",
    type=click.FloatRange(min=0),
    default=None,
    help="nc0 at step 0: print nc0_T instead of |c_T|.",
)
@_schedule_options
def nc0_grid_command(
    optimizer: str,
    momenta: list[float],
    decays: list[float],
    nc0_init: float | None,
    lr: float,
    steps: int,
    lr_schedule: str,
    total_steps: int | None,
    fmt: str,
    plot: Path | None,
) -> None:
    """Print |c_T| (or nc0_T) after STEPS steps over momentum x weight decay.

    The defaults are the paper's momentum grid and its coupled weight-decay grid.

    \b
    Example:  ncserve theory nc0-grid --optimizer sgd --lr 0.05 --steps 780 --plot grid.png
    """
    _check_plot(plot)
    lrs = _lrs(lr, lr_schedule, steps, total_steps)
    scale = 1.0 if nc0_init is None else nc0_init
    grid = np.empty((len(momenta), len(decays)))
    try:
        for i, momentum in enumerate(momenta):
            for j, decay in enumerate(decays):
                grid[i, j] = abs(theory.nc0_factors(optimizer, lrs, momentum, decay)[-1]) * scale
    except ValueError as err:
        raise UserError(str(err)) from None
    quantity = "|c_T|" if nc0_init is None else "nc0_T"
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "optimizer": optimizer,
                    "lr": lr,
                    "lr_schedule": lr_schedule,
                    "steps": steps,
                    "momentum": momenta,
                    "weight_decay": decays,
                    "quantity": quantity,
                    "values": [[_json_float(v) for v in row] for row in grid],
                }
            )
        )
    else:
        click.echo(
            f"# {optimizer}: {quantity} after {steps} steps at lr {lr:g} ({lr_schedule}); "
            "rows momentum, columns weight decay"
        )
        header = ["momentum"] + [f"wd={d:g}" for d in decays]
        rows = [[f"{m:g}"] + [f"{v:.4g}" for v in grid[i]] for i, m in enumerate(momenta)]
        click.echo(_columns(header, rows))
    if plot is not None:
        from ncserve.report.figures import nc0_grid_figure

        title = f"{optimizer}: exact {quantity} after {steps} steps, lr {lr:g} ({lr_schedule})"
        _save(nc0_grid_figure(momenta, decays, grid, title), plot)


@theory_group.command("ufm")
@click.option(
    "--optimizer",
    type=click.Choice(theory.UFM_OPTIMIZERS),
    required=True,
    help="signgd-decoupled: W ← (1 − ηλ)W − η sign(∇L); signgd-coupled: W ← W − η sign(∇L + λW).",
)
@click.option(
    "--num-classes",
    type=click.IntRange(min=2),
    default=10,
    show_default=True,
    help="Number of classes K (features live in R^K).",
)
@click.option("--weight-decay", type=click.FloatRange(min=0), required=True, help="Weight decay λ.")
@click.option(
    "--feature-norm",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="‖h_k‖ of the fixed ETF features; enters the coupled dynamics only.",
)
@_every_option
@_schedule_options
def ufm_command(
    optimizer: str,
    num_classes: int,
    weight_decay: float,
    feature_norm: float,
    every: int,
    lr: float,
    steps: int,
    lr_schedule: str,
    total_steps: int | None,
    fmt: str,
    plot: Path | None,
) -> None:
    """Simulate SignGD on the unconstrained-features model and print nc0 per step.

    H is fixed at the simplex ETF aligned with the axes (h_k ∝ e_k − 1/K, P = K), W starts
    at 0 and only W is trained on the mean cross-entropy over the K samples. Next to the
    simulation: the decoupled closed form nc0_t = √K·(K−2)·(1 − (1−ηλ)^t)/λ, which rises
    to √K·(K−2)/λ (with a schedule, its exact generalization a_t = (1 − η_tλ)a_{t−1} + η_t).
    With coupled weight decay nc0 rises, then falls and oscillates; a decaying lr
    takes it to 0.

    \b
    Example:  ncserve theory ufm --optimizer signgd-decoupled --num-classes 10 \\
                  --lr 0.01 --weight-decay 0.05 --steps 2000 --every 200
    """
    _check_plot(plot)
    lrs = _lrs(lr, lr_schedule, steps, total_steps)
    try:
        result = theory.simulate_ufm_signgd(
            num_classes,
            lrs,
            weight_decay,
            coupled=optimizer == "signgd-coupled",
            feature_norm=feature_norm,
        )
        if lr_schedule == "constant":
            closed = theory.ufm_decoupled_closed_form(num_classes, lr, weight_decay, steps)
        else:
            closed = theory.ufm_decoupled_prediction(num_classes, lrs, weight_decay)
    except ValueError as err:
        raise UserError(str(err)) from None
    nc0 = result.nc0
    shown = _printed_steps(steps, every)
    peak = int(np.argmax(nc0))
    coupled = optimizer == "signgd-coupled"
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(closed > 0, np.abs(nc0 - closed) / closed, np.abs(nc0 - closed))
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "optimizer": optimizer,
                    "num_classes": num_classes,
                    "lr": lr,
                    "lr_schedule": lr_schedule,
                    "weight_decay": weight_decay,
                    "feature_norm": feature_norm,
                    "steps": shown,
                    "nc0": [float(nc0[t]) for t in shown],
                    "closed_form": [float(closed[t]) for t in shown],
                    "peak_step": peak,
                    "peak_nc0": float(nc0[peak]),
                    "saturated_step": result.saturated_step,
                }
            )
        )
    else:
        limit = (
            f"√K(K−2)/λ = {math.sqrt(num_classes) * (num_classes - 2) / weight_decay:.6g}"
            if weight_decay > 0
            else "none (λ = 0: grows linearly)"
        )
        click.echo(
            f"# UFM, {optimizer}: K {num_classes}, lr {lr:g} ({lr_schedule}), weight decay "
            f"{weight_decay:g}, ‖h_k‖ {feature_norm:g}, {steps} steps"
        )
        click.echo(f"# decoupled closed form: nc0_t = √K(K−2)(1−(1−ηλ)^t)/λ; limit {limit}")
        header = ["step", "lr", "nc0", "closed_form"] + ([] if coupled else ["rel_diff"])
        rows = []
        for t in shown:
            row = [
                str(t),
                "-" if t == 0 else f"{lrs[t - 1]:.6g}",
                f"{nc0[t]:.10g}",
                f"{closed[t]:.10g}",
            ]
            if not coupled:
                row.append(f"{relative[t]:.2e}")
            rows.append(row)
        click.echo(_columns(header, rows))
        if coupled:
            click.echo(
                f"# nc0 peaks at {nc0[peak]:.6g} at step {peak} and ends at {nc0[-1]:.6g} "
                f"({nc0[-1] / nc0[peak] if nc0[peak] > 0 else 0:.3g} of the peak)"
            )
        else:
            click.echo(f"# max relative difference to the closed form: {relative[1:].max():.2e}")
    if result.saturated_step is not None:
        click.echo(
            f"warning: the softmax underflowed at step {result.saturated_step} (∇L has exact "
            f"zeros in float64), so sign(∇L) is no longer J − 2I from there on; keep "
            f"--feature-norm below about 350·λ = {350 * weight_decay:.3g}",
            err=True,
        )
    if plot is not None:
        from ncserve.report.figures import ufm_figure

        title = f"UFM {optimizer}: K {num_classes}, lr {lr:g} ({lr_schedule}), λ {weight_decay:g}"
        _save(ufm_figure(np.arange(steps + 1), nc0, closed, title, log=coupled), plot)
