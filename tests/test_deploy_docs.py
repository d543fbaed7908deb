"""docs/deploy.md covers what a platform team needs, and agrees with the chart."""

from __future__ import annotations

import yaml

from tests.test_deploy_tools import CHART, REPO

DOC = REPO / "docs" / "deploy.md"


def test_deploy_doc_sections() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert text.startswith("# Deploy on Kubernetes")
    for needle in (
        "no Docker engine",
        "helm install",
        "helm test",
        "Values that matter",
        "What appears in Grafana",
        "How the alerts fire",
        "docker compose -f deploy/compose/compose.yaml up",
        ".ci/install-tools.sh",
    ):
        assert needle in text, needle
    for alert in (
        "NeuralCollapseOnset",
        "NeuralCollapseBlocked",
        "NCServeStepsIncomplete",
        "NCServeDown",
    ):
        assert alert in text, alert
    for values_file in sorted((CHART / "ci").glob("*.yaml")):
        if values_file.name != "default-values.yaml":
            assert f"ci/{values_file.name}" in text, values_file.name


def test_documented_alert_defaults_match_values() -> None:
    text = DOC.read_text(encoding="utf-8")
    alerts = yaml.safe_load((CHART / "values.yaml").read_text())["alerts"]
    onset = alerts["onset"]
    blocked = alerts["blocked"]
    rows = {
        line.split("|")[1].strip(" `"): line
        for line in text.splitlines()
        if line.startswith("| `N")
    }
    assert (
        f"{onset['nc1Below']}, {onset['nc3Below']}, {alerts['trainAccuracyAtLeast']}, {onset['for']}"
        in rows["NeuralCollapseOnset"]
    )
    assert (
        f"{blocked['nc0NormalizedAbove']}, {blocked['window']}, {blocked['for']}"
        in rows["NeuralCollapseBlocked"]
    )
    assert alerts["stepsIncomplete"]["window"] in rows["NCServeStepsIncomplete"]
    assert (
        alerts["down"]["for"] in rows["NCServeDown"]
        and alerts["down"]["jobRegex"] in rows["NCServeDown"]
    )
