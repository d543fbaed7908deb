"""The report's figures and the theory plots, drawn with matplotlib's Agg canvas.

Figures are built on ``matplotlib.figure.Figure`` (no pyplot): nothing global changes in
the calling process, and the PNG bytes carry no software URL in their metadata, so an HTML
report that embeds them references nothing outside itself.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter
from matplotlib.transforms import Bbox
from PIL import Image

from ncserve.metrics import METRIC_KEYS
from ncserve.report.runs import NC0Prediction, RunRecord
from ncserve.report.settings import REPORT_SETTINGS
from ncserve.report.tables import (
    TABLE_METRICS,
    FinalRow,
    HeatmapGrid,
    SummaryRow,
    format_ratio,
    format_value,
    label_sort_key,
    spearman,
)

DPI = 80
# Log-scale panels (they go to 0 under collapse), then linear ones (they go to 1).
LOG_CURVES: tuple[str, ...] = (
    *(key for key in METRIC_KEYS if key not in ("nc4", "accuracy")),
    "train_loss",
)
LINEAR_CURVES: tuple[str, ...] = ("nc4", "accuracy")
_FIXED_COLORS: dict[str, str] = {
    "sgd": "#1f77b4",
    "sgdw": "#ff7f0e",
    "adam": "#2ca02c",
    "adamw": "#d62728",
    "signum": "#9467bd",
    "signumw": "#8c564b",
    "signgd": "#e377c2",
    "lion": "#7f7f7f",
}
_SPARE_COLORS: tuple[str, ...] = ("#bcbd22", "#17becf", "#393b79", "#637939", "#843c39")
THEORY_STYLE: dict[str, Any] = {"color": "black", "linestyle": "--", "linewidth": 1.0}
# A matplotlib colour: a name or hex string, or an RGB triple.
Color = str | tuple[float, float, float]


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (no metadata that names a URL)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(
        buffer,
        format="png",
        dpi=DPI,
        metadata={"Software": None},
        bbox_inches="tight",
        pad_inches=0.15,
    )
    return compact_png(buffer.getvalue())


def compact_png(data: bytes) -> bytes:
    """The same image with a 256-colour palette: a third of the bytes for line plots, so
    reports committed to a repository or mailed as HTML stay small. Dithering against the
    adaptive palette keeps colour bars and heatmaps free of bands."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    palette = rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    dithered = rgb.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
    buffer = io.BytesIO()
    dithered.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def save_figure(fig: Figure, path: str) -> None:
    """Write ``fig`` to ``path`` (PNG, SVG or PDF by its suffix)."""
    FigureCanvasAgg(fig)
    metadata = {"Software": None} if path.lower().endswith(".png") else None
    fig.savefig(path, dpi=DPI * 1.25, metadata=metadata, bbox_inches="tight", pad_inches=0.15)


def log_ticks(ax: Axes, axis: str = "y") -> None:
    """Plain numbers on a log axis (matplotlib's default reads 1.8x10^0 on a narrow one);
    minor ticks labelled when it spans under two decades (only 2 and 5 above one)."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    target.set_major_formatter(FuncFormatter(_tick_text))
    decades = math.log10(high / low) if low > 0 and high > low else math.inf
    if decades < 1:
        target.set_minor_formatter(FuncFormatter(_tick_text))
    elif decades < 2:
        target.set_minor_formatter(FuncFormatter(_sparse_tick_text))
    else:
        target.set_minor_formatter(NullFormatter())


def _sparse_tick_text(value: float, _position: int | None = None) -> str:
    mantissa = value / 10 ** math.floor(math.log10(value)) if value > 0 else 0
    return _tick_text(value) if round(mantissa) in (2, 5) else ""


def _tick_text(value: float, _position: int | None = None) -> str:
    return f"{value:g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.0e}"


def label_colors(labels: Sequence[str]) -> dict[str, Color]:
    """One colour per optimizer; Adam split by coupled fraction F runs from AdamW's colour
    (F = 0) to Adam's (F = 1)."""
    colors: dict[str, Color] = {}
    spare = iter(_SPARE_COLORS * (1 + len(labels) // len(_SPARE_COLORS)))
    for label in sorted(set(labels), key=label_sort_key):
        base, _, fraction = label.partition(" F=")
        if not fraction and base in _FIXED_COLORS:
            colors[label] = _FIXED_COLORS[base]
        elif fraction:
            colors[label] = _blend(_FIXED_COLORS["adamw"], _FIXED_COLORS["adam"], float(fraction))
        else:
            colors[label] = next(spare)
    return colors


# Settings a sweep may vary besides the optimizer, and their short names in a legend.
VARIED_SETTINGS: tuple[tuple[str, str], ...] = tuple(
    (s.path, s.legend) for s in REPORT_SETTINGS if s.legend is not None
)


def curve_labels(records: Sequence[RunRecord]) -> dict[str, str]:
    """Per run name, its legend label: the optimizer, and every setting that varies among
    the runs (so three SGD runs of different momentum are three entries, not one)."""
    varying = [
        (path, short)
        for path, short in VARIED_SETTINGS
        if len({repr(r.setting(path)) for r in records}) > 1
    ]

    def text(value: Any) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    return {
        r.name: " ".join(
            [r.label, *(f"{short}={text(r.setting(path))}" for path, short in varying)]
        )
        for r in records
    }


def curve_colors(records: Sequence[RunRecord], labels: Mapping[str, str]) -> dict[str, Color]:
    """Per legend label a colour: the optimizer's, in shades from dark to light when several
    settings of one optimizer are drawn."""
    base = label_colors([r.label for r in records])
    variants: dict[str, list[str]] = {}
    for record in records:
        group = variants.setdefault(record.label, [])
        if labels[record.name] not in group:
            group.append(labels[record.name])
    colors: dict[str, Color] = {}
    for optimizer, group in variants.items():
        start = base[optimizer]
        for i, label in enumerate(group):
            t = 0.0 if len(group) == 1 else 0.65 * i / (len(group) - 1)
            colors[label] = _towards_white(start, t)
    return colors


def _towards_white(color: Color, t: float) -> tuple[float, float, float]:
    red, green, blue = to_rgb(color)
    return (red + (1 - red) * t, green + (1 - green) * t, blue + (1 - blue) * t)


def _blend(start: str, end: str, t: float) -> tuple[float, float, float]:
    a = np.array([int(start[i : i + 2], 16) for i in (1, 3, 5)]) / 255
    b = np.array([int(end[i : i + 2], 16) for i in (1, 3, 5)]) / 255
    red, green, blue = ((1 - t) * a + t * b).tolist()
    return red, green, blue


def curves_figure(records: list[RunRecord], predictions: dict[str, NC0Prediction]) -> Figure | None:
    """Every NC metric against epoch, one line per run, one colour per optimizer (in shades
    when other settings vary; the legend names them); the exact nc0 of sgd/sgdw runs dashed
    on the nc0 panel."""
    panels = [
        key
        for key in (*LOG_CURVES, *LINEAR_CURVES)
        if any(len(r.values(_curve_key(r, key))[0]) for r in records)
    ]
    if not panels:
        return None
    cols = 4
    lines = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.7 * lines + 0.6))
    axes = fig.subplots(lines, cols, squeeze=False)
    labels = curve_labels(records)
    colors = curve_colors(records, labels)
    alpha = 0.9 if len(records) <= 12 else 0.4
    for ax, key in zip(axes.flat, panels, strict=False):
        log = key in LOG_CURVES
        for record in records:
            epochs, values = record.values(_curve_key(record, key))
            if log:
                keep = values > 0
                epochs, values = epochs[keep], values[keep]
            if len(values):
                ax.plot(
                    epochs,
                    values,
                    color=colors[labels[record.name]],
                    alpha=alpha,
                    linewidth=1.2,
                    marker="o" if len(values) <= 30 else None,
                    markersize=2.5,
                )
            if key == "nc0" and record.name in predictions:
                prediction = predictions[record.name]
                keep = prediction.nc0 > 0
                ax.plot(prediction.epochs[keep], prediction.nc0[keep], **THEORY_STYLE)
        if log:
            ax.set_yscale("log")
            log_ticks(ax)
        else:
            ax.set_ylim(-0.02, 1.02)
        ax.set_title("train accuracy (measured)" if key == "accuracy" else key, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", alpha=0.25)
    for extra in axes.flat[len(panels) :]:
        extra.set_visible(False)
    handles = [_line(colors[label], label) for label in sorted(colors, key=label_sort_key)]
    if predictions:
        handles.append(_line("black", "exact nc0 theory (sgd/sgdw)", dashed=True))
    fig.legend(
        handles=handles, loc="upper center", ncol=min(len(handles), 8), fontsize=9, frameon=False
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return fig


def _curve_key(record: RunRecord, key: str) -> str:
    # Runs without tracking have no measured accuracy; their running train_acc stands in.
    if key == "accuracy" and not any("accuracy" in row for row in record.rows):
        return "train_acc"
    return key


def _line(color: Color, label: str, dashed: bool = False) -> Line2D:
    return Line2D([], [], color=color, linestyle="--" if dashed else "-", label=label)


VERDICTS_MAX_RUNS = 40


def verdicts_figure(records: Sequence[RunRecord]) -> Figure | None:
    """One line per run: its legend label and what its NC0 says (ncserve.report.verdict)."""
    from ncserve.report.verdict import verdict

    if not records:
        return None
    labels = curve_labels(records)
    shown = list(records)[:VERDICTS_MAX_RUNS]
    lines = [f"{labels[r.name]}  ({r.name}):  {verdict(r.rows)}" for r in shown]
    if len(records) > len(shown):
        lines.append(f"... and {len(records) - len(shown)} more runs")
    fig = Figure(figsize=(12, 0.25 * len(lines) + 0.3))
    for i, line in enumerate(lines):
        fig.text(0.01, 1 - (i + 0.8) / (len(lines) + 0.2), line, fontsize=9, va="center",
                 family="monospace")  # fmt: skip
    return fig


def title_figure(title: str, note: str) -> Figure:
    """The heading band of a PNG report."""
    fig = Figure(figsize=(10, 0.6))
    fig.text(0.0, 0.95, title, fontsize=14, fontweight="bold", va="top", ha="left")
    fig.text(0.0, 0.2, note, fontsize=9, color="#555555", va="bottom", ha="left")
    return fig


def table_figure(rows: list[FinalRow] | list[SummaryRow], title: str) -> Figure:
    """The final-metrics table (per run, or per optimizer) as an image."""
    header, body = table_cells(rows)
    # The table fills the axes; the figure is sized to the text so no page is left blank.
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    width = min(22.0, 0.3 + 0.085 * sum(widths) + 0.12 * len(header))
    fig = Figure(figsize=(width, 0.45 + 0.24 * (len(body) + 1)))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1 - 0.4 / fig.get_figheight()))
    ax.axis("off")
    table = ax.table(
        cellText=body, colLabels=header, cellLoc="right", bbox=Bbox.from_bounds(0, 0, 1, 1)
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for (line, _col), cell in table.get_celld().items():
        if line == 0:
            cell.set_facecolor("#eeeeee")
    total = sum(widths)
    for (_line, col), cell in table.get_celld().items():
        cell.set_width(widths[col] / total)
    fig.text(0.0, 1.0, title, fontsize=11, va="top", ha="left")
    return fig


def table_cells(rows: list[FinalRow] | list[SummaryRow]) -> tuple[list[str], list[list[str]]]:
    """Header and text cells of the final-metrics table (shared by PNG and HTML)."""
    metric_headers = [f"{key} (×init)" for key in TABLE_METRICS]
    body: list[list[str]] = []
    if rows and isinstance(rows[0], SummaryRow):
        header = ["optimizer", "runs", "train acc", *metric_headers]
        for summary in rows:
            assert isinstance(summary, SummaryRow)
            body.append(
                [summary.label, str(summary.runs), format_value(summary.train_acc)]
                + [
                    _metric_text(summary.cells[k].final, summary.cells[k].ratio)
                    for k in TABLE_METRICS
                ]
            )
        return header, body
    final_rows = [row for row in rows if isinstance(row, FinalRow)]
    with_fraction = any(r.coupled_fraction is not None for r in final_rows)
    with_holdout = any(r.holdout_acc is not None for r in final_rows)
    with_theory = any(r.predicted_nc0 is not None for r in final_rows)
    header = ["run", "optimizer", "lr", "momentum", "wd"]
    header += ["coupled F"] if with_fraction else []
    header += ["epoch", "train acc"] + (["held-out acc"] if with_holdout else [])
    header += metric_headers + (["nc0 exact"] if with_theory else [])
    for row in final_rows:
        cells = [
            row.name,
            row.label,
            format_value(row.lr),
            format_value(row.momentum),
            format_value(row.weight_decay),
        ]
        if with_fraction:
            cells.append(format_value(row.coupled_fraction))
        cells += [str(row.epoch), format_value(row.train_acc)]
        if with_holdout:
            cells.append(format_value(row.holdout_acc))
        cells += [_metric_text(row.cells[k].final, row.cells[k].ratio) for k in TABLE_METRICS]
        if with_theory:
            cells.append(format_value(row.predicted_nc0))
        body.append(cells)
    return header, body


def _metric_text(final: float | None, ratio: float | None) -> str:
    change = format_ratio(ratio)
    return f"{format_value(final)} ({change})" if change else format_value(final)


def correlation_figure(rows: list[FinalRow]) -> Figure | None:
    """Final nc0 against final nc3, one point per run (the paper's correlation plot)."""
    points = [
        (row.label, row.cells["nc0"].final, row.cells["nc3"].final)
        for row in rows
        if row.cells["nc0"].final and row.cells["nc3"].final
    ]
    points = [(label, x, y) for label, x, y in points if x and y and x > 0 and y > 0]
    if not points:
        return None
    colors = label_colors([p[0] for p in points])
    fig = Figure(figsize=(5.6, 4.4))
    ax = fig.add_subplot()
    for label in sorted(colors, key=label_sort_key):
        xs = [x for lab, x, _ in points if lab == label]
        ys = [y for lab, _, y in points if lab == label]
        ax.scatter(xs, ys, color=colors[label], label=label, s=28, alpha=0.85)
    ax.set_xscale("log")
    ax.set_yscale("log")
    log_ticks(ax, "x")
    log_ticks(ax, "y")
    ax.set_xlabel("final nc0 = ‖Wᵀ1‖")
    ax.set_ylabel("final nc3 (self-duality)")
    rho = spearman(np.array([p[1] for p in points]), np.array([p[2] for p in points]))
    title = "nc0 against nc3 at the end of training"
    if rho is not None:
        title += f"  (Spearman ρ = {rho:.2f}, {len(points)} runs)"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def heatmap_figure(grids: list[HeatmapGrid]) -> Figure | None:
    """Final nc0 over momentum x weight decay, one panel per optimizer; sgd/sgdw cells also
    show the exact prediction in parentheses."""
    if not grids:
        return None
    fig = Figure(figsize=(5.4 * len(grids), 4.6))
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    for ax, grid in zip(axes, grids, strict=True):
        _heatmap(ax, grid.measured, grid.momenta, grid.weight_decays, grid.predicted)
        ax.set_title(
            f"{grid.label}: final nc0 (measured"
            + (", exact in parentheses)" if grid.predicted is not None else ")"),
            fontsize=10,
        )
    fig.tight_layout()
    return fig


def _heatmap(
    ax: Axes,
    values: np.ndarray,
    momenta: Sequence[float],
    decays: Sequence[float],
    second: np.ndarray | None = None,
) -> None:
    positive = values[np.isfinite(values) & (values > 0)]
    norm = LogNorm(positive.min(), positive.max()) if positive.size and np.ptp(positive) else None
    shown = np.where(np.isfinite(values) & (values > 0), values, np.nan)
    image = ax.imshow(shown, cmap="viridis", norm=norm, aspect="auto", origin="lower")
    colorbar = ax.figure.colorbar(image, ax=ax, fraction=0.046)
    if norm is not None:
        log_ticks(colorbar.ax)
    ax.set_xticks(range(len(decays)), [f"{d:g}" for d in decays], fontsize=8)
    ax.set_yticks(range(len(momenta)), [f"{m:g}" for m in momenta], fontsize=8)
    ax.set_xlabel("weight decay λ")
    ax.set_ylabel("momentum β")
    for i in range(len(momenta)):
        for j in range(len(decays)):
            if not math.isfinite(values[i, j]):
                continue
            text = format_value(float(values[i, j]))
            if second is not None and math.isfinite(second[i, j]):
                text += f"\n({format_value(float(second[i, j]))})"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=7,
                color="white",
                bbox={"facecolor": "black", "alpha": 0.35, "linewidth": 0, "pad": 1},
            )


# -- theory plots ---------------------------------------------------------------------------


def nc0_factor_figure(steps: np.ndarray, factors: np.ndarray, title: str) -> Figure:
    """|c_t| against step on a log scale (nc0_t / nc0_0)."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    magnitude = np.abs(factors)
    keep = magnitude > 0
    ax.plot(steps[keep], magnitude[keep], color=_FIXED_COLORS["sgd"])
    ax.set_yscale("log")
    log_ticks(ax)
    ax.set_xlabel("optimizer step t")
    ax.set_ylabel("|c_t| = nc0_t / nc0_0")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    return fig


def nc0_grid_figure(
    momenta: Sequence[float], decays: Sequence[float], values: np.ndarray, title: str
) -> Figure:
    """The exact |c_T| (or nc0_T) over momentum x weight decay."""
    fig = Figure(figsize=(1.2 + 0.95 * len(decays), 1.4 + 0.55 * len(momenta)))
    ax = fig.add_subplot()
    _heatmap(ax, values, momenta, decays)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def ufm_figure(
    steps: np.ndarray,
    simulated: np.ndarray,
    closed_form: np.ndarray,
    title: str,
    *,
    log: bool = False,
) -> Figure:
    """Simulated UFM nc0 against the decoupled closed form (log scale: the coupled case,
    orders of magnitude below it)."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    styles: tuple[tuple[np.ndarray, dict[str, Any]], ...] = (
        (simulated, {"color": _FIXED_COLORS["signum"], "label": "simulated nc0"}),
        (closed_form, {"label": "decoupled closed form", **THEORY_STYLE}),
    )
    for values, style in styles:
        keep = values > 0 if log else np.ones(len(values), dtype=bool)
        ax.plot(steps[keep], values[keep], **style)
    if log:
        ax.set_yscale("log")
        log_ticks(ax)
    ax.set_xlabel("step t")
    ax.set_ylabel("nc0 = ‖Wᵀ1‖")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
