"""Assemble the comparison report and write it as one PNG or one self-contained HTML file."""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from PIL import Image

from ncserve.report.figures import (
    compact_png,
    correlation_figure,
    curves_figure,
    heatmap_figure,
    png_bytes,
    table_cells,
    table_figure,
    title_figure,
    verdicts_figure,
)
from ncserve.report.runs import NC0Prediction, RunRecord, nc0_prediction
from ncserve.report.tables import (
    FinalRow,
    HeatmapGrid,
    SummaryRow,
    final_rows,
    momentum_wd_grids,
    optimizer_summary,
)

# Above this many runs the PNG shows the per-optimizer table only; the HTML has both.
PNG_TABLE_MAX_RUNS = 30
REPORT_SUFFIXES: tuple[str, ...] = (".png", ".html", ".htm")


@dataclass
class Section:
    title: str
    note: str
    figure: Figure | None = None
    png: bytes = b""


@dataclass
class Report:
    title: str
    records: list[RunRecord]
    excluded: list[RunRecord]
    rows: list[FinalRow]
    summary: list[SummaryRow]
    grids: list[HeatmapGrid]
    predictions: dict[str, NC0Prediction]
    sections: list[Section] = field(default_factory=list)


def build_report(
    records: list[RunRecord], *, title: str = "", min_train_acc: float = 0.0
) -> Report:
    """Tables and figures for ``records``; runs whose final train accuracy is below
    ``min_train_acc`` are left out (the paper keeps runs at >= 99% only)."""
    kept, excluded = [], []
    for record in records:
        acc = record.last.get("train_acc", record.last.get("accuracy"))
        if min_train_acc > 0 and not (isinstance(acc, int | float) and acc >= min_train_acc):
            excluded.append(record)
        else:
            kept.append(record)
    predictions = {r.name: p for r in kept if (p := nc0_prediction(r)) is not None}
    rows = final_rows(kept)
    report = Report(
        title=title or f"Neural Collapse comparison of {len(kept)} run(s)",
        records=kept,
        excluded=excluded,
        rows=rows,
        summary=optimizer_summary(rows),
        grids=momentum_wd_grids(kept),
        predictions=predictions,
    )
    if not kept:
        return report
    several = len(report.summary) < len(rows)
    if several:
        report.sections.append(
            Section(
                "Final metrics per optimizer",
                "Medians over each optimizer's runs: the final value and, in parentheses, its "
                "change relative to initialization (final / value at step 0).",
                table_figure(report.summary, "Final metrics per optimizer (medians)"),
            )
        )
    if len(rows) <= PNG_TABLE_MAX_RUNS or not several:
        report.sections.append(
            Section(
                "Final metrics per run",
                "As the paper's Table 2: the value at the last measurement and, in parentheses, "
                "its change relative to initialization. 'nc0 exact' is the theory's value for "
                "sgd/sgdw, from the run's lr schedule, momentum, weight decay and step count.",
                table_figure(rows, "Final metrics per run"),
            )
        )
    report.sections.append(
        Section(
            "What each run's NC0 says",
            "Fitted when the measurement split reached 99% accuracy; then NC0 decaying (at least "
            "5% smaller at the end than at the fit, as coupled weight decay makes it) or not "
            "(collapse blocked): the reading the NeuralCollapseOnset / Blocked alerts use.",
            verdicts_figure(kept),
        )
    )
    report.sections.append(
        Section(
            "NC metrics against epoch",
            "One line per run, one colour per optimizer (in shades, named in the legend, when "
            "other settings vary), log scale for the metrics that go to 0. Dashed black on the "
            "nc0 panel: the exact nc0 of each sgd/sgdw run.",
            curves_figure(kept, predictions),
        )
    )
    report.sections.append(
        Section(
            "nc0 against nc3",
            "Final nc0 against final nc3, one point per run.",
            correlation_figure(rows),
        )
    )
    report.sections.append(
        Section(
            "Momentum x weight decay",
            "Final nc0 per cell (median over the runs in it); for sgd/sgdw the exact prediction "
            "in parentheses.",
            heatmap_figure(report.grids),
        )
    )
    report.sections = [s for s in report.sections if s.figure is not None]
    for section in report.sections:
        assert section.figure is not None
        section.png = png_bytes(section.figure)
    return report


def write_png(report: Report, path: Path) -> None:
    """Every section's image stacked top to bottom on a white page."""
    note = f"{len(report.records)} run(s)" + (
        f"; {len(report.excluded)} left out below the train-accuracy threshold"
        if report.excluded
        else ""
    )
    heading = png_bytes(title_figure(report.title, note))
    images = [
        Image.open(io.BytesIO(data)).convert("RGB")
        for data in (heading, *(s.png for s in report.sections))
    ]
    width = max(image.width for image in images)
    height = sum(image.height for image in images)
    page = Image.new("RGB", (width, height), "white")
    top = 0
    for image in images:
        page.paste(image, (0, top))
        top += image.height
    buffer = io.BytesIO()
    page.save(buffer, format="PNG")
    path.write_bytes(compact_png(buffer.getvalue()))


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em;
       color: #222; max-width: 1500px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: right; }
th { background: #f2f2f2; } td:first-child, td:nth-child(2) { text-align: left; }
p.note { color: #555; font-size: 0.9em; max-width: 60em; }
img { max-width: 100%; }
"""


def _html_table(rows: list[FinalRow] | list[SummaryRow]) -> str:
    header, body = table_cells(rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    lines = [
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>"
        for cells in body
    ]
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def write_html(report: Report, path: Path) -> None:
    """One file: tables as HTML, figures as base64 PNGs, inline CSS, no external reference."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(report.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(report.title)}</h1>",
        f'<p class="note">{len(report.records)} run(s); written '
        f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by ncserve report.</p>",
    ]
    if report.excluded:
        names = ", ".join(r.name for r in report.excluded)
        parts.append(
            f'<p class="note">Left out below the train-accuracy threshold: '
            f"{html.escape(names)}.</p>"
        )
    if len(report.summary) < len(report.rows):
        parts += ["<h2>Final metrics per optimizer (medians)</h2>", _html_table(report.summary)]
    parts += [
        "<h2>Final metrics per run</h2>",
        '<p class="note">The value at the last measurement and, in parentheses, its change '
        "relative to initialization (final / value at step 0). nc0 exact: the theory's "
        "prediction for sgd/sgdw runs.</p>",
        _html_table(report.rows),
    ]
    for section in report.sections:
        if section.title.startswith("Final metrics"):
            continue
        encoded = base64.b64encode(section.png).decode("ascii")
        parts += [
            f"<h2>{html.escape(section.title)}</h2>",
            f'<p class="note">{html.escape(section.note)}</p>',
            f'<img alt="{html.escape(section.title)}" src="data:image/png;base64,{encoded}">',
        ]
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


def write_report(report: Report, path: Path) -> None:
    """PNG or HTML by the file's suffix."""
    suffix = path.suffix.lower()
    if suffix not in REPORT_SUFFIXES:
        raise ValueError(
            f"--out: {str(path)!r} must end in .png or .html (got {suffix or 'no suffix'!r})"
        )
    if not report.sections:
        raise ValueError("no run is left to report (all below the train-accuracy threshold)")
    if suffix == ".png":
        write_png(report, path)
    else:
        write_html(report, path)
