"""Alert rules: promtool check/test, the generated unit tests, names from the contract, chart values."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.test_deploy_tools import (
    CHART,
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
FIXTURES = REPO / "deploy" / "prometheus" / "fixtures"
GENERATOR = REPO / "scripts" / "gen_alert_tests.py"
PLAIN_DURATION = re.compile(r"[0-9]+(ms|s|m|h|d|w|y)")


def rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_alert_tests", GENERATOR)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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


def test_committed_tests_are_what_the_generator_writes() -> None:
    """Nobody hand-edits the unit tests: they come from the recorded fixtures."""
    assert load_generator().render() == RULES_TESTS.read_text(encoding="utf-8"), (
        "deploy/prometheus/ncserve.rules.test.yml is stale: python scripts/gen_alert_tests.py"
    )


def test_fixtures_are_recorded_runs() -> None:
    generator = load_generator()
    names = {s.fixture for s in generator.SCENARIOS}
    assert names == {p.stem for p in FIXTURES.glob("*.json")}
    for name in sorted(names):
        fixture = json.loads((FIXTURES / f"{name}.json").read_text())
        assert fixture["command"].startswith("nclaunch "), name
        assert fixture["outcome"] in {"finished", "killed"}
        rows = fixture["measurements"]
        times = [m["t_s"] for m in rows] + [fixture["end_s"]]
        assert times == sorted(times) and rows[0]["t_s"] == 0, name
        assert [m["epoch"] for m in rows] == list(range(len(rows))), name
        assert fixture["logged_steps"], name
        if fixture["optimizer"] == "sgd":
            # Coupled weight decay contracts NC0 at every step (the theory the Blocked
            # rule's "NC0 rose" clause relies on), in the recorded data too.
            by_step = sorted(
                [(m["step"], m["nc0"]) for m in rows]
                + [(s["step"], s["nc0"]) for s in fixture["logged_steps"]]
            )
            values = [v for _, v in by_step]
            assert all(b <= a for a, b in itertools.pairwise(values)), name


def test_rules_express_the_documented_conditions() -> None:
    r = rules()
    gates = (
        "and on (run_id) (ncserve_run_live == 1)",
        "and on (run_id) (max_over_time(ncserve_accuracy_ratio[30m]) >= 0.99)",
    )
    onset = r["NeuralCollapseOnset"]
    assert onset["expr"].startswith("ncserve_nc3 < 0.5")  # the value shown is NC3
    for clause in (
        *gates,
        "and on (run_id) (ncserve_nc1 < 0.5)",
        "and on (run_id) (avg_over_time(ncserve_nc0[15m]) < 0.95 * avg_over_time(ncserve_nc0[15m] offset 15m))",
    ):
        assert clause in onset["expr"], clause
    assert onset["for"] == "15m" and onset["labels"]["severity"] == "info"
    blocked = r["NeuralCollapseBlocked"]
    assert blocked["expr"].startswith("ncserve_nc0_normalized > 0.05")  # value: normalized NC0
    for clause in (
        *gates,
        "and on (run_id) (avg_over_time(ncserve_nc0[15m]) >= 0.99 * avg_over_time(ncserve_nc0[15m] offset 15m))",
        "and on (run_id) (resets(ncserve_nc0[30m]) < changes(ncserve_nc0[30m]))",
    ):
        assert clause in blocked["expr"], clause
    assert blocked["for"] == "30m" and blocked["labels"]["severity"] == "warning"
    assert "deriv(" not in blocked["expr"] and "train_accuracy" not in blocked["expr"]
    assert "increase(ncserve_steps_incomplete_total[" in r["NCServeStepsIncomplete"]["expr"]
    down = r["NCServeDown"]["expr"]
    assert 'up{job=~".*ncserve.*"} == 0' in down and "absent(" in down
    for rule in r.values():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def durations(rule: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, text) of every duration of a rule: for, keep_firing_for, ranges, offsets."""
    found = [(key, str(rule[key])) for key in ("for", "keep_firing_for") if key in rule]
    found += [("range", m) for m in re.findall(r"\[([^\]]*)\]", rule["expr"])]
    found += [("offset", m) for m in re.findall(r"\boffset\s+(\S+?)\)*(?:\s|$)", rule["expr"])]
    return found


def test_durations_are_plain_so_they_can_be_scaled() -> None:
    for name, rule in rules().items():
        for where, text in durations(rule):
            assert PLAIN_DURATION.fullmatch(text), (
                f"{name}: {where} {text!r} is not one plain duration"
            )
    # The NC0 trend compares the two halves of each Neural Collapse alert's window.
    for name in ("NeuralCollapseOnset", "NeuralCollapseBlocked"):
        expr = rules()[name]["expr"]
        halves = re.findall(r"avg_over_time\(ncserve_nc0\[(\w+)\]", expr)
        halves += re.findall(r"offset (\w+)", expr)
        windows = re.findall(
            r"(?:ncserve_accuracy_ratio|changes\(ncserve_nc0|resets\(ncserve_nc0)\[(\w+)\]", expr
        )
        assert set(halves) == {"15m"} and set(windows) == {"30m"}, (name, halves, windows)


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


# --- every threshold and duration is a chart value -----------------------------------------

NON_DEFAULT = {
    "alerts.trainAccuracyAtLeast": "0.97",
    "alerts.onset.nc1Below": "0.4",
    "alerts.onset.nc3Below": "0.45",
    "alerts.onset.nc0RatioBelow": "0.9",
    "alerts.onset.window": "1h",
    "alerts.onset.for": "20m",
    "alerts.onset.keepFiringFor": "5m",
    "alerts.blocked.nc0NormalizedAbove": "0.1",
    "alerts.blocked.nc0RatioAtLeast": "0.98",
    "alerts.blocked.window": "2h",
    "alerts.blocked.for": "45m",
    "alerts.blocked.keepFiringFor": "10m",
    "alerts.stepsIncomplete.window": "20m",
    "alerts.stepsIncomplete.for": "2m",
    "alerts.down.for": "7m",
    "alerts.down.jobRegex": "ml-ncserve",
}
# A literal: a number or duration not part of a name (nc0, nc1, nc3) or a regex.
LITERAL = re.compile(r'(?<![\w.])[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d|w|y)?(?![\w.])|"[^"]*"')
# Constants of the rules, not thresholds: the live gate, "increased at all", "scrape failed".
CONSTANTS = {"ncserve_run_live == 1", ") > 0", "== 0)"}


def value_leaves(tree: dict[str, Any], prefix: str) -> set[str]:
    leaves: set[str] = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            if key != "additionalRuleLabels":
                leaves |= value_leaves(value, f"{prefix}.{key}")
        else:
            leaves.add(f"{prefix}.{key}")
    return leaves


def rendered_rules(*sets: str) -> dict[str, dict[str, Any]]:
    args = [a for s in sets for a in ("--set", s)]
    result = run([require_tool("helm"), "template", "t", str(CHART), *args])
    assert result.returncode == 0, result.stderr
    (rule,) = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "PrometheusRule"]
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def literals(expr: str) -> tuple[str, list[str]]:
    """The expression with its literals blanked, and the literals in order (constants kept)."""
    for constant in CONSTANTS:
        expr = expr.replace(constant, constant.replace("1", "ONE").replace("0", "ZERO"))
    return LITERAL.sub("#", expr), LITERAL.findall(expr)


def test_every_threshold_and_window_is_a_chart_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert value_leaves(values["alerts"], "alerts") == set(NON_DEFAULT), (
        "every alerts.* value must be exercised here"
    )
    default = rules()
    changed = rendered_rules(*(f"{k}={v}" for k, v in NON_DEFAULT.items()))
    assert set(changed) == set(default)
    for name, rule in default.items():
        skeleton, old = literals(rule["expr"])
        new_skeleton, new = literals(changed[name]["expr"])
        assert new_skeleton == skeleton, f"{name}: the chart changed more than literals"
        assert old and all(a != b for a, b in zip(old, new, strict=True)), (
            f"{name}: some literal kept its default: {old} -> {new}"
        )
        for key in ("for", "keep_firing_for"):
            if key in rule:
                assert changed[name].get(key) not in (None, rule[key]), (name, key)
    onset, blocked = changed["NeuralCollapseOnset"], changed["NeuralCollapseBlocked"]
    assert (
        "avg_over_time(ncserve_nc0[30m]) < 0.9 * avg_over_time(ncserve_nc0[30m] offset 30m)"
        in onset["expr"]
    )
    assert "ncserve_accuracy_ratio[1h]) >= 0.97" in onset["expr"]
    assert "ncserve_nc3 < 0.45" in onset["expr"] and "ncserve_nc1 < 0.4" in onset["expr"]
    assert (onset["for"], onset["keep_firing_for"]) == ("20m", "5m")
    assert (
        "avg_over_time(ncserve_nc0[1h]) >= 0.98 * avg_over_time(ncserve_nc0[1h] offset 1h)"
        in blocked["expr"]
    )
    assert "resets(ncserve_nc0[2h]) < changes(ncserve_nc0[2h])" in blocked["expr"]
    assert (blocked["for"], blocked["keep_firing_for"]) == ("45m", "10m")


@pytest.mark.parametrize("missing", ["ncserve_nc1 < 0.5", "resets(ncserve_nc0[30m])"])
def test_chart_fails_when_a_replaced_text_is_missing(missing: str, tmp_path: Path) -> None:
    chart = tmp_path / "ncserve"
    shutil.copytree(CHART, chart)
    copy = chart / "files" / "ncserve.rules.yml"
    copy.write_text(copy.read_text().replace(missing, "vector(1)"))
    result = run([require_tool("helm"), "template", "t", str(chart)])
    assert result.returncode != 0 and "no longer contains" in result.stderr, result.stderr


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
