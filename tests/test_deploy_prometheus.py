"""Alert rules: promtool check/test, coverage of the unit tests, names from the contract."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from tests.test_deploy_tools import (
    REPO,
    RULES,
    RULES_TESTS,
    contract_metric_names,
    exporter_series_names,
    in_contract,
    promql_metric_names,
    require_tool,
    run,
)

ALERTS = {"NeuralCollapseOnset", "NeuralCollapseBlocked", "NCServeStepsIncomplete", "NCServeDown"}


def rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def test_promtool_check_rules() -> None:
    result = run([require_tool("promtool"), "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = run([require_tool("promtool"), "test", "rules", str(RULES_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_silent() -> None:
    assert set(rules()) == ALERTS
    doc = yaml.safe_load(RULES_TESTS.read_text())
    firing: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert firing == ALERTS, f"never shown firing: {ALERTS - firing}"
    assert silent == ALERTS, f"never shown silent: {ALERTS - silent}"


def test_rules_express_the_documented_conditions() -> None:
    r = rules()
    onset = r["NeuralCollapseOnset"]["expr"]
    assert "ncserve_nc1 <" in onset and "ncserve_nc3 <" in onset
    assert "ncserve_train_accuracy_ratio >= 0.99" in onset
    assert r["NeuralCollapseOnset"]["for"]  # sustained
    blocked = r["NeuralCollapseBlocked"]["expr"]
    assert "deriv(ncserve_nc0[" in blocked and ">= 0" in blocked
    assert (
        "ncserve_nc0_normalized >" in blocked and "ncserve_train_accuracy_ratio >= 0.99" in blocked
    )
    assert "increase(ncserve_steps_incomplete_total[" in r["NCServeStepsIncomplete"]["expr"]
    down = r["NCServeDown"]["expr"]
    assert 'up{job=~".*ncserve.*"} == 0' in down and "absent(" in down
    for rule in r.values():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_rules_use_only_exported_metric_names() -> None:
    contract = contract_metric_names()
    exported = exporter_series_names()
    for name, rule in rules().items():
        for metric in promql_metric_names(rule["expr"]):
            assert in_contract(metric, contract), f"{name}: {metric} is not in docs/CONTRACTS.md"
            if exported is not None:
                assert metric in exported, f"{name}: the exporter does not register {metric}"


def test_chart_copy_is_identical() -> None:
    copy = REPO / "deploy" / "helm" / "ncserve" / "files" / "ncserve.rules.yml"
    assert copy.read_bytes() == RULES.read_bytes()


def test_compose_prometheus_config(tmp_path: Path) -> None:
    """The local stack's Prometheus config loads, with the rules mounted where it expects."""
    compose = yaml.safe_load((REPO / "deploy" / "compose" / "compose.yaml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    config_dir = tmp_path / "etc-prometheus"
    for mount in mounts:
        source, _, rest = mount.partition(":")
        target = rest.split(":")[0]
        if not source.startswith("."):
            continue  # a named volume
        host = (REPO / "deploy" / "compose" / source).resolve()
        assert host.exists(), f"compose mounts missing {host}"
        assert target.startswith("/etc/prometheus/")
        dest = config_dir / Path(target).relative_to("/etc/prometheus")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(host, dest)
    result = run([require_tool("promtool"), "check", "config", str(config_dir / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout
