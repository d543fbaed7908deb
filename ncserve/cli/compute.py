"""``ncserve compute``: every NC metric for features saved to disk."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from ncserve.errors import UserError
from ncserve.features import FeaturesFile, FeaturesFileError, load_features
from ncserve.metrics import (
    METRIC_KEYS,
    MetricInputError,
    Round1Stats,
    Round2Stats,
    finalize,
    round1_stats,
    round2_stats,
)

SUMMARY_KEYS = ("num_samples", "num_classes", "feature_dim")


def format_metrics_table(metrics: dict[str, float]) -> str:
    """Aligned two-column text: one metric a line."""
    keys = [k for k in (*METRIC_KEYS, *SUMMARY_KEYS) if k in metrics]
    width = max(len(k) for k in keys)
    lines = []
    for key in keys:
        value = metrics[key]
        text = str(value) if isinstance(value, (int, np.integer)) else f"{value:.6g}"
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)


def metrics_json(metrics: dict[str, float]) -> str:
    """Strict JSON: an undefined metric (NaN, e.g. a zero-norm W) becomes null."""
    clean = {
        k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metrics.items()
    }
    return json.dumps(clean)


def _open(path: Path) -> FeaturesFile:
    try:
        return load_features(path)
    except FeaturesFileError as exc:
        raise UserError(str(exc)) from None


def compute_from_files(paths: list[Path]) -> dict[str, float]:
    """Two passes over the files (shards of one dataset, same W): round 1, then round 2."""
    first = _open(paths[0])
    K, P = first.num_classes, first.feature_dim
    r1 = Round1Stats.zeros(K, P)
    for path in paths:
        shard = first if path == paths[0] else _open(path)
        if shard.weight_KP.shape != first.weight_KP.shape or not np.array_equal(
            shard.weight_KP, first.weight_KP
        ):
            raise UserError(
                f"{path}: 'weight' differs from {paths[0]}; shards of one dataset share W"
            )
        same_bias = (
            shard.bias_K is None
            if first.bias_K is None
            else shard.bias_K is not None and np.array_equal(shard.bias_K, first.bias_K)
        )
        if not same_bias:
            raise UserError(f"{path}: 'bias' differs from {paths[0]}")
        try:
            r1 = r1.merge(round1_stats(shard.features_NP, shard.labels_N, K))
        except MetricInputError as exc:
            raise UserError(f"{path}: {exc}") from None
    try:
        means = r1.class_means()
    except MetricInputError as exc:
        names = ", ".join(str(p) for p in paths)
        raise UserError(f"{names}: {exc}") from None
    r2 = Round2Stats.zeros(K, P)
    for path in paths:
        shard = first if path == paths[0] else _open(path)
        r2 = r2.merge(
            round2_stats(shard.features_NP, shard.labels_N, means, first.weight_KP, first.bias_K)
        )
    return finalize(r1, r2, first.weight_KP, first.bias_K)


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "table"]),
    default="table",
    show_default=True,
    help="json: one object with every metric key; table: aligned text.",
)
def compute(files: tuple[Path, ...], fmt: str) -> None:
    """All NC metrics for features saved in FILES (.npz).

    Each file holds `features` (N x P), `labels` (N), `weight` (K x P), and optionally
    `bias` (K) and `num_classes`. Several files are shards of one dataset (same weight)
    and give the same result as one file holding them all. Metric math is float64.
    """
    metrics = compute_from_files(list(files))
    if fmt == "json":
        click.echo(metrics_json(metrics))
    else:
        click.echo(format_metrics_table(metrics))
