"""Generate the ncserve Grafana dashboard (deploy/grafana/ncserve.json) from code.

    python deploy/grafana/dashboard.py            # rewrite ncserve.json (and the chart's copy)
    python deploy/grafana/dashboard.py --check    # exit 1 if a committed file is stale
    python deploy/grafana/dashboard.py --stdout   # print the JSON

Every query uses only metric names from the exporter contract (docs/CONTRACTS.md);
tests/test_deploy_grafana.py parses each expression with promtool and checks the names.
The panels follow the paper's reading order: NC0 (is weight decay shrinking the row sum
of W?), then NC1..NC4, then training progress, the runs being compared (and whether each
is still running), and the health of the service that measures them. The Neural Collapse
alerts (deploy/prometheus/ncserve.rules.yml) appear as annotations on the NC panels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import prometheus as prometheus_builders
from grafana_foundation_sdk.builders import statetimeline, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dashboard_models
from grafana_foundation_sdk.models import prometheus as prometheus_models

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "ncserve.json"
CHART_COPY = HERE.parent / "helm" / "ncserve" / "files" / "ncserve.json"

DASHBOARD_UID = "ncserve-neural-collapse"
DATASOURCE = dashboard_models.DataSourceRef(type_val="prometheus", uid="${datasource}")
RUN = 'run_id=~"$run_id"'
PER_RUN_LEGEND = "{{run_id}} ({{optimizer}})"
# ncserve_run_state{state} is 1 for a run's current state: one number per state.
RUN_STATES = [
    ("running", "green"),
    ("finished", "blue"),
    ("failed", "red"),
    ("abandoned", "orange"),
]
ALERT_ANNOTATION = "Neural Collapse alerts"
ALERTS_EXPR = f'ALERTS{{alertname=~"NeuralCollapse.*",alertstate="firing",{RUN}}}'
PROMETHEUS_ANNOTATION = {
    "step": "1m",
    "titleFormat": "{{alertname}}",
    "textFormat": "{{run_id}} ({{optimizer}}), {{severity}}",
    "tagKeys": "alertname,run_id,optimizer,severity",
    "useValueForTime": False,
}
# Ids of panels added after the first release (the older panels keep theirs).
PINNED_IDS = {"run state": 101}


def prom(
    expr: str, legend: str = PER_RUN_LEGEND, ref_id: str = "A"
) -> prometheus_builders.Dataquery:
    return (
        prometheus_builders.Dataquery()
        .expr(expr)
        .legend_format(legend)
        .ref_id(ref_id)
        .datasource(DATASOURCE)
    )


def series_panel(
    title: str,
    description: str,
    queries: list[prometheus_builders.Dataquery],
    *,
    unit: str = "none",
    log_scale: bool = True,
    width: int = 12,
    height: int = 8,
    min_value: float | None = None,
    max_value: float | None = None,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(height)
        .line_width(2)
        .show_points(common.VisibilityMode.AUTO)
        .point_size(4)
        .span_nulls(True)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.RIGHT)
            .show_legend(True)
            .calcs(["lastNotNull"])
        )
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )
    if log_scale:
        panel = panel.scale_distribution(
            common_builders.ScaleDistributionConfig().type(common.ScaleDistribution.LOG).log(10)
        )
    if min_value is not None:
        panel = panel.min(min_value)
    if max_value is not None:
        panel = panel.max(max_value)
    for index, query in enumerate(queries):
        panel = panel.with_target(query.ref_id(chr(ord("A") + index)))
    return panel


def per_run(metric: str, legend: str = PER_RUN_LEGEND) -> prometheus_builders.Dataquery:
    return prom(f"{metric}{{{RUN}}}", legend)


def neural_collapse_panels() -> list[timeseries.Panel]:
    return [
        (
            series_panel(
                "NC0: norm of the sum of classifier rows",
                "‖Wᵀ1‖ (raw, as plotted in the paper) and its scale-free variant ‖Wᵀ1‖/‖W‖_F. "
                "The cross-entropy gradient never changes Wᵀ1; only weight decay shrinks it, so a "
                "flat or rising NC0 after the training set is fitted means collapse is blocked.",
                [
                    per_run("ncserve_nc0", "{{run_id}} ({{optimizer}}) nc0"),
                    per_run("ncserve_nc0_normalized", "{{run_id}} ({{optimizer}}) nc0 normalized"),
                ],
            )
        ),
        (
            series_panel(
                "NC1: within-class variability",
                "Tr(Σ_W Σ_B⁺)/K, the cheap companion Tr(Σ_W)/Tr(Σ_B), and the class-distance "
                "normalized variance (CDNV).",
                [
                    per_run("ncserve_nc1", "{{run_id}} ({{optimizer}}) nc1"),
                    per_run("ncserve_nc1_trace_ratio", "{{run_id}} ({{optimizer}}) trace ratio"),
                    per_run("ncserve_cdnv", "{{run_id}} ({{optimizer}}) cdnv"),
                ],
            )
        ),
        (
            series_panel(
                "NC2: class means approach a simplex ETF",
                "Distance of the centred class means' Gram to the simplex ETF (nc2), their "
                "equinorm (nc2_norm) and equiangularity (nc2_angle) terms.",
                [
                    per_run("ncserve_nc2", "{{run_id}} ({{optimizer}}) nc2"),
                    per_run("ncserve_nc2_norm", "{{run_id}} ({{optimizer}}) equinorm"),
                    per_run("ncserve_nc2_angle", "{{run_id}} ({{optimizer}}) equiangular"),
                ],
            )
        ),
        (
            series_panel(
                "NC2 on the classifier rows and the product form",
                "The same ETF distances on the rows of W (nc2w and its norm/angle terms) and "
                "the product form ‖WM/‖WM‖ − ETF‖ (nc2m).",
                [
                    per_run("ncserve_nc2w", "{{run_id}} ({{optimizer}}) nc2w"),
                    per_run("ncserve_nc2w_norm", "{{run_id}} ({{optimizer}}) nc2w equinorm"),
                    per_run("ncserve_nc2w_angle", "{{run_id}} ({{optimizer}}) nc2w equiangular"),
                    per_run("ncserve_nc2m", "{{run_id}} ({{optimizer}}) nc2m"),
                ],
            )
        ),
        (
            series_panel(
                "NC3: self-duality of classifier and class means",
                "‖W/‖W‖_F − Mᵀ/‖M‖_F‖_F. Decoupled weight decay (AdamW, SGDW) typically leaves "
                "it far from 0 even when NC1 is small (partial collapse).",
                [per_run("ncserve_nc3")],
            )
        ),
        (
            series_panel(
                "NC4: disagreement with the nearest class centre",
                "1 − (fraction of samples where the classifier agrees with the nearest-class-"
                "centre rule), so that, like the others, it goes to 0 under collapse.",
                [prom(f"1 - ncserve_nc4_ratio{{{RUN}}}")],
                unit="percentunit",
            )
        ),
    ]


def training_panels() -> list[timeseries.Panel]:
    return [
        (
            series_panel(
                "Accuracy",
                "Accuracy on the measurement split (a balanced subset of the training set) at "
                "each measurement: the alerts' fitted gate (0.99, the paper's cut for the "
                "terminal phase of training). Also the running train accuracy of the last "
                "logged steps (partial epochs, noisier) and held-out accuracy when the run "
                "measures a held-out split.",
                [
                    per_run(
                        "ncserve_accuracy_ratio", "{{run_id}} ({{optimizer}}) measurement split"
                    ),
                    per_run(
                        "ncserve_train_accuracy_ratio", "{{run_id}} ({{optimizer}}) train (running)"
                    ),
                    per_run(
                        "ncserve_holdout_accuracy_ratio", "{{run_id}} ({{optimizer}}) held-out"
                    ),
                ],
                unit="percentunit",
                log_scale=False,
                width=8,
                min_value=0,
                max_value=1,
            )
        ),
        (
            series_panel(
                "Train loss",
                "Mean cross-entropy on the training set at each measurement.",
                [per_run("ncserve_train_loss")],
                width=8,
            )
        ),
        (
            series_panel(
                "Progress",
                "Latest measured epoch of each run.",
                [per_run("ncserve_latest_epoch")],
                log_scale=False,
                width=8,
                min_value=0,
            )
        ),
    ]


def run_state_panel() -> statetimeline.Panel:
    """Each run's state over time (running, finished, failed, abandoned)."""
    expr = "\n+ ".join(
        f'{code} * sum by (run_id) (ncserve_run_state{{{RUN},state="{state}"}})'
        for code, (state, _) in enumerate(RUN_STATES, start=1)
    )
    mapping = dashboard_models.ValueMap(
        options={
            str(code): dashboard_models.ValueMappingResult(text=state, color=color, index=code - 1)
            for code, (state, color) in enumerate(RUN_STATES, start=1)
        }
    )
    return (
        statetimeline.Panel()
        .title("Run state")
        .description(
            "Each run's state from ncserve_run_state: running, then finished, failed or "
            "abandoned (a run that stopped reporting). Alerts only fire for running runs "
            "(ncserve_run_live == 1); an ended run's series disappear after a grace period."
        )
        .datasource(DATASOURCE)
        .span(24)
        .height(5)
        .with_target(prom(expr, "{{run_id}}"))
        .mappings([mapping])
        .show_value(common.VisibilityMode.NEVER)
        .merge_values(True)
        .row_height(0.8)
        .fill_opacity(80)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(False)
        )
    )


def runs_table() -> table.Panel:
    hidden = {
        name: True
        for name in (
            "Time",
            "Value",
            "__name__",
            "job",
            "instance",
            "namespace",
            "pod",
            "service",
            "endpoint",
            "container",
        )
    }
    order = [
        "run_id",
        "optimizer",
        "lr",
        "weight_decay",
        "momentum",
        "model",
        "dataset",
        "engine",
        "world_size",
    ]
    renames = {"run_id": "run", "weight_decay": "weight decay", "world_size": "world size"}
    return (
        table.Panel()
        .title("Runs")
        .description(
            "One row per run from ncserve_run_info: the optimizer and hyperparameters that "
            "the comparison is about."
        )
        .datasource(DATASOURCE)
        .span(24)
        .height(7)
        .with_target(
            prom(
                f"max by (run_id, optimizer, model, dataset, engine, lr, weight_decay, momentum, world_size) (ncserve_run_info{{{RUN}}})",
                "",
            )
            .format(prometheus_models.PromQueryFormat.TABLE)
            .instant()
        )
        .with_transformation(
            dashboard_models.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": hidden,
                    "indexByName": {name: index for index, name in enumerate(order)},
                    "renameByName": renames,
                },
            )
        )
        .sort_by([common_builders.TableSortByFieldState().display_name("run")])
    )


def service_panels() -> list[timeseries.Panel]:
    return [
        (
            series_panel(
                "Shards received per second",
                "Shards pushed by training ranks, by measurement round.",
                [
                    prom(
                        "sum by (round) (rate(ncserve_shards_received_total[$__rate_interval]))",
                        "round {{round}}",
                    )
                ],
                unit="reqps",
                log_scale=False,
                width=8,
                min_value=0,
            )
        ),
        (
            series_panel(
                "Finalize latency",
                "Time from the last shard of a step to its metrics being stored "
                "(quantiles of ncserve_finalize_duration_seconds).",
                [
                    prom(
                        f"histogram_quantile({q}, sum by (le) (rate(ncserve_finalize_duration_seconds_bucket[$__rate_interval])))",
                        f"p{round(q * 100)}",
                    )
                    for q in (0.5, 0.9, 0.99)
                ],
                unit="s",
                width=8,
            )
        ),
        (
            series_panel(
                "Rejected shards per second",
                "Pushes the service refused, by reason (invalid argument, unauthenticated, ...).",
                [
                    prom(
                        "sum by (reason) (rate(ncserve_shards_rejected_total[$__rate_interval]))",
                        "{{reason}}",
                    )
                ],
                unit="reqps",
                log_scale=False,
                width=8,
                min_value=0,
            )
        ),
        (
            series_panel(
                "Incomplete steps",
                "Measurement steps closed without every rank's shard, per run (the "
                "NCServeStepsIncomplete alert fires on any increase).",
                [
                    prom(
                        f"sum by (run_id) (increase(ncserve_steps_incomplete_total{{{RUN}}}[$__rate_interval]))",
                        "{{run_id}}",
                    )
                ],
                log_scale=False,
                width=6,
                min_value=0,
            )
        ),
        (
            series_panel(
                "Steps finalized per second",
                "Measurements completed and stored, per run.",
                [
                    prom(
                        f"sum by (run_id) (rate(ncserve_steps_finalized_total{{{RUN}}}[$__rate_interval]))",
                        "{{run_id}}",
                    )
                ],
                unit="reqps",
                log_scale=False,
                width=6,
                min_value=0,
            )
        ),
        (
            series_panel(
                "Open steps and runs",
                "Steps with shards in flight (not yet finalized) and runs held by the service, "
                "by state.",
                [
                    prom("sum(ncserve_open_steps)", "open steps"),
                    prom("sum by (state) (ncserve_runs)", "runs {{state}}"),
                ],
                log_scale=False,
                width=6,
                min_value=0,
            )
        ),
        (
            series_panel(
                "Bytes received per second",
                "Tensor bytes of accepted shards.",
                [prom("sum(rate(ncserve_received_bytes_total[$__rate_interval]))", "received")],
                unit="Bps",
                log_scale=False,
                width=6,
                min_value=0,
            )
        ),
    ]


def build() -> dashboard_models.Dashboard:
    board = (
        dashboard_builders.Dashboard("ncserve: Neural Collapse")
        .uid(DASHBOARD_UID)
        .description(
            "Neural Collapse metrics (NC0-NC4) of training runs measured by ncserve, the runs' "
            "optimizers and hyperparameters, and the health of the service."
        )
        .tags(["ncserve", "neural-collapse", "training"])
        .editable()
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(
            dashboard_builders.DatasourceVariable("datasource")
            .label("Data source")
            .type("prometheus")
        )
        .with_variable(
            dashboard_builders.QueryVariable("run_id")
            .label("Run")
            .description("Runs to show (from ncserve_run_info).")
            .datasource(DATASOURCE)
            .query("label_values(ncserve_run_info, run_id)")
            .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dashboard_models.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(dashboard_models.VariableOption(selected=True, text="All", value="$__all"))
        )
    )
    nc_panels = neural_collapse_panels()
    sections: list[tuple[str, list[Any]]] = [
        (
            "Neural Collapse (latest measurement per run; log scale, lower is more collapsed)",
            nc_panels,
        ),
        ("Training", training_panels()),
        ("Runs", [(run_state_panel(), PINNED_IDS["run state"]), runs_table()]),
        ("ncserve service health", service_panels()),
    ]
    # Expanded rows are separators; their panels follow them at the top level. Stable ids
    # keep links to single panels (viewPanel=N) valid across regenerations: panels added
    # later take a pinned id, so that the older ones keep theirs.
    panel_id = 0
    nc_ids: list[int] = []
    for title, panels in sections:
        panel_id += 1
        board = board.with_row(dashboard_builders.Row(title).id(panel_id))
        for entry in panels:
            if isinstance(entry, tuple):
                panel, pinned = entry
                board = board.with_panel(panel.id(pinned))
                continue
            panel_id += 1
            board = board.with_panel(entry.id(panel_id))
            if entry in nc_panels:
                nc_ids.append(panel_id)
    return board.annotations([builtin_annotation(), alert_annotation(nc_ids)]).build()


def builtin_annotation() -> dashboard_builders.AnnotationQuery:
    """Grafana's own annotations and alerts (what Grafana adds to every dashboard)."""
    return (
        dashboard_builders.AnnotationQuery()
        .name("Annotations & Alerts")
        .datasource(dashboard_models.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
        .enable(True)
        .hide(True)
        .icon_color("rgba(0, 211, 255, 1)")
        .type("dashboard")
        .built_in(1)
    )


def alert_annotation(panel_ids: list[int]) -> dashboard_builders.AnnotationQuery:
    """Firing Neural Collapse alerts (Prometheus' ALERTS series) marked on the NC panels."""
    return (
        dashboard_builders.AnnotationQuery()
        .name(ALERT_ANNOTATION)
        .datasource(DATASOURCE)
        .enable(True)
        .hide(False)
        .icon_color("orange")
        .expr(ALERTS_EXPR)
        .filter(dashboard_builders.AnnotationPanelFilter().exclude(False).ids(panel_ids))
    )


def render() -> str:
    board = json.loads(json.dumps(build(), cls=JSONEncoder))
    # The SDK's annotation model lacks the Prometheus data source's own fields.
    for annotation in board["annotations"]["list"]:
        if annotation["name"] == ALERT_ANNOTATION:
            annotation.update(PROMETHEUS_ANNOTATION)
    return json.dumps(board, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if a committed file is stale")
    mode.add_argument("--stdout", action="store_true", help="print the dashboard JSON")
    args = parser.parse_args(argv)
    text = render()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    targets = (OUTPUT, CHART_COPY)
    if args.check:
        stale = [str(p) for p in targets if not p.exists() or p.read_text(encoding="utf-8") != text]
        if stale:
            print(
                "stale, regenerate with python deploy/grafana/dashboard.py: " + ", ".join(stale),
                file=sys.stderr,
            )
            return 1
        return 0
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
