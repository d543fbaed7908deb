"""The shipped alerts against a real Prometheus scraping the service while real runs train.

A coupled-weight-decay SGD run and an AdamW run (nclaunch, MLP on the 5,000 MNIST digits)
report to one service; a real Prometheus (Debian's `prometheus`, on loopback with its own
data directory) scrapes it every second and evaluates the shipped rule file, with every
`for:`, range window and offset multiplied by one factor so that the longest `for:` plus
its window is 20 s: what is tested is what ships, on a faster clock.

It asserts the paper's split: Blocked fires for AdamW and never for SGD, Onset fires for
SGD and never for AdamW; no alert flaps (firing, then not, then firing) while its run is
live; and once both runs end, no NeuralCollapse alert is pending or firing within 40 s.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from ncserve.service import ServerConfig, start_server
from tests.test_deploy_tools import REPO, RULES, require_tool

pytestmark = pytest.mark.slow

# The longest `for:` plus the longest lookback of its expression, after scaling.
SCALED_SPAN_S = 20.0
SCRAPE_S = 1
RESOLVE_WITHIN_S = 40.0
EPOCHS = 16
RUNS = {
    "e2e-sgd": "--optimizer sgd --lr 0.05 --momentum 0.9 --weight-decay 5e-3",
    "e2e-adamw": "--optimizer adamw",
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_LOOKBACK = re.compile(r"\[(\w+)\](?:\s*offset\s+(\w+))?")


def seconds(text: str) -> float:
    total, pos = 0.0, 0
    for match in _DURATION.finditer(text):
        assert match.start() == pos, f"not a plain duration: {text!r}"
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    assert pos == len(text) and pos > 0, f"not a plain duration: {text!r}"
    return total


def lookback_s(expr: str) -> float:
    """The furthest back an expression reads: a range, plus the offset applied to it."""
    spans = [seconds(r) + (seconds(o) if o else 0.0) for r, o in _LOOKBACK.findall(expr)]
    return max(spans, default=0.0)


def scaled_rules(doc: dict) -> tuple[dict, float]:
    """The rule file with every `for:`, range and offset multiplied by one factor."""
    rules = [r for g in doc["groups"] for r in g["rules"]]
    span = max(seconds(str(r.get("for", "0s"))) + lookback_s(r["expr"]) for r in rules)
    factor = SCALED_SPAN_S / span

    def scale(duration: str) -> str:
        return f"{round(seconds(duration) * factor * 1000)}ms"

    for rule in rules:
        rule["expr"] = re.sub(r"\[(\w+)\]", lambda m: f"[{scale(m.group(1))}]", str(rule["expr"]))
        rule["expr"] = re.sub(
            r"\boffset\s+(\w+)", lambda m: f"offset {scale(m.group(1))}", rule["expr"]
        )
        if "for" in rule:
            rule["for"] = scale(str(rule["for"]))
    return doc, factor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_scaling_keeps_the_rules_valid(tmp_path: Path) -> None:
    doc, factor = scaled_rules(yaml.safe_load(RULES.read_text()))
    assert 0 < factor < 1
    path = tmp_path / "scaled.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = subprocess.run(
        [require_tool("promtool"), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    blocked = next(r for g in doc["groups"] for r in g["rules"]
                   if r["alert"] == "NeuralCollapseBlocked")  # fmt: skip
    assert "m]" not in blocked["expr"] and "ms]" in blocked["expr"]


def test_alerts_on_live_runs_with_a_real_prometheus(tmp_path: Path) -> None:
    prometheus = require_tool("prometheus")
    doc, _ = scaled_rules(yaml.safe_load(RULES.read_text()))
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    server = start_server(
        ServerConfig(
            listen="127.0.0.1:0", metrics_port=0, db_path=tmp_path / "nc.db", series_grace_s=5.0
        )
    )
    web_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": "1s"},
                "rule_files": ["rules.yml"],
                "scrape_configs": [
                    {
                        "job_name": "ncserve",
                        "static_configs": [{"targets": [f"127.0.0.1:{server.metrics_port}"]}],
                    }
                ],
            }
        )
    )
    prom = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "w"),  # noqa: SIM115
    )
    base = f"http://127.0.0.1:{web_port}"
    trainers: dict[str, subprocess.Popen[str]] = {}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError):
                assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()
                assert time.monotonic() < deadline, "prometheus did not become ready"
                time.sleep(0.2)
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        for run_id, flags in RUNS.items():
            # nc0 is logged every 2 steps: a dense series, so a slow epoch on a loaded
            # machine still shows NC0's decay inside a scaled half-window.
            args = (
                f"--nodes 1 --epochs {EPOCHS} --log-every 2 --sidecar 127.0.0.1:{server.port} "
                f"--run-id {run_id} --run-dir {tmp_path / run_id} {flags}"
            )
            trainers[run_id] = subprocess.Popen(
                [sys.executable, "-c", "from launcher.cli import main; main()", *args.split()],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        # (alert, run) -> [(time, state)]; state "" when the alert is not active.
        history: dict[tuple[str, str], list[tuple[float, str]]] = defaultdict(list)
        ended: dict[str, float] = {}
        start = time.monotonic()

        def poll() -> None:
            now = time.monotonic()
            active = {
                (a["labels"]["alertname"], a["labels"].get("run_id", "")): a["state"]
                for a in get_json(f"{base}/api/v1/alerts")["data"]["alerts"]
            }
            for alert in ("NeuralCollapseOnset", "NeuralCollapseBlocked"):
                for run_id in RUNS:
                    history[(alert, run_id)].append((now, active.get((alert, run_id), "")))
            for run_id, process in trainers.items():
                if run_id not in ended and process.poll() is not None:
                    ended[run_id] = now

        while len(ended) < len(RUNS):
            assert time.monotonic() - start < 240, "the runs took too long"
            poll()
            time.sleep(0.5)
        for run_id, process in trainers.items():
            output = process.stdout.read() if process.stdout else ""
            assert process.returncode == 0, f"{run_id} failed:\n{output}"
        last_end = max(ended.values())
        quiet_since = None
        while time.monotonic() - last_end < RESOLVE_WITHIN_S:
            poll()
            latest = {key: states[-1][1] for key, states in history.items()}
            if not any(latest.values()):
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 3:
                    break
            else:
                quiet_since = None
            time.sleep(0.5)

        def states(alert: str, run_id: str, live_only: bool = False) -> list[str]:
            return [s for t, s in history[(alert, run_id)] if not live_only or t <= ended[run_id]]

        summary = {f"{a} {r}": sorted(set(s for _, s in v)) for (a, r), v in history.items()}
        assert "firing" in states("NeuralCollapseBlocked", "e2e-adamw"), summary
        assert "firing" in states("NeuralCollapseOnset", "e2e-sgd"), summary
        assert set(states("NeuralCollapseBlocked", "e2e-sgd")) == {""}, summary
        assert set(states("NeuralCollapseOnset", "e2e-adamw")) == {""}, summary
        for (alert, run_id), _ in history.items():
            seen = states(alert, run_id, live_only=True)
            firing = [i for i, s in enumerate(seen) if s == "firing"]
            if firing:
                gaps = [s for s in seen[firing[0] : firing[-1] + 1] if s != "firing"]
                assert not gaps, f"{alert} flapped for {run_id}: {seen}"
        latest = {key: states[-1] for key, states in history.items()}
        assert not any(s for _, s in latest.values()), f"still active after the runs: {latest}"
        # The ended runs' series leave /metrics after the grace period.
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5
            ) as response:
                text = response.read().decode()
            if not any(f'run_id="{run_id}"' in text for run_id in RUNS):
                break
            assert time.monotonic() < deadline, "ended runs' series did not leave /metrics"
            time.sleep(0.5)
    finally:
        for process in trainers.values():
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
        prom.terminate()
        try:
            prom.wait(timeout=30)
        except subprocess.TimeoutExpired:
            prom.kill()
        server.stop(0.5)
