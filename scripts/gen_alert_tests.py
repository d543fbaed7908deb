"""Generate deploy/prometheus/ncserve.rules.test.yml from the recorded training runs.

    python scripts/gen_alert_tests.py            # rewrite the test file
    python scripts/gen_alert_tests.py --check    # exit 1 if the committed file is stale

The Neural Collapse cases replay real runs (deploy/prometheus/fixtures/*.json, written by
scripts/record_alert_fixtures.py) as a Prometheus scrape would have seen them:

- Time scale: 1 recorded second = MINUTES_PER_SECOND (30) promtool minutes. An epoch of the
  recorded runs took 0.3-0.45 s, i.e. 9-14 promtool minutes, so the rules' 30m window
  spans 2-3 measurements (8-12 logged steps), as it should on a real run measured every
  10-15 minutes. Durations that are not training time (the grace period, the hours a
  crashed run stays frozen) are promtool minutes, unscaled.
- Sample and hold: every gauge is scraped each promtool minute and holds the value of the
  newest event (measurement or logged step) the exporter had by then; like the exporter, a
  value only replaces one of an older or equal step.
- End of a run: ncserve_run_live is 1 while the run trains, 0 for GRACE_MINUTES after it
  ends (finished or, for a killed run, once it is marked abandoned), then every per-run
  series goes stale (the exporter drops it).

Expected alerts are claims written down per scenario (which alert fires at which epoch),
not computed here: promtool evaluates the real rules. Firing alerts' annotations are the
rules file's templates with the labels and the value at that minute filled in.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS = REPO / "deploy" / "prometheus"
FIXTURES = PROMETHEUS / "fixtures"
RULES = PROMETHEUS / "ncserve.rules.yml"
OUTPUT = PROMETHEUS / "ncserve.rules.test.yml"

MINUTES_PER_SECOND = 30
GRACE_MINUTES = 10
TARGET = {"job": "ncserve", "instance": "ncserve:9464"}
ONSET, BLOCKED = "NeuralCollapseOnset", "NeuralCollapseBlocked"
# Gauge -> fixture key of the measurement that sets it (nc0 is also set by logged steps).
GAUGES = {
    "ncserve_nc0": "nc0",
    "ncserve_nc0_normalized": "nc0_normalized",
    "ncserve_nc1": "nc1",
    "ncserve_nc3": "nc3",
    "ncserve_accuracy_ratio": "accuracy",
}
LIVE = "ncserve_run_live"
ALERT_VALUE = {ONSET: "ncserve_nc3", BLOCKED: "ncserve_nc0_normalized"}


# --- replaying a recorded run --------------------------------------------------------------


@dataclass
class Timeline:
    """Per-minute samples of one run's series; None once the series is gone."""

    run_id: str
    optimizer: str
    series: dict[str, list[float | None]]
    epoch_minute: dict[int, int]  # first minute a measurement of that epoch is scraped
    end_minute: int  # first minute after training (finished or killed)
    stale_minute: int  # the minute every series goes stale

    def at(self, metric: str, minute: int) -> float:
        value = self.series[metric][minute]
        assert value is not None, (self.run_id, metric, minute)
        return value

    def minute(self, anchor: tuple[str, int]) -> int:
        kind, n = anchor
        if kind == "epoch":
            return self.epoch_minute[n]
        if kind == "end":
            return self.end_minute + n
        raise ValueError(anchor)


def scraped_minute(t_s: float) -> int:
    """First promtool minute whose scrape sees an event at t_s recorded seconds."""
    return math.ceil(round(t_s * MINUTES_PER_SECOND, 6))


def timeline(fixture: dict[str, Any], frozen_minutes: int = 0) -> Timeline:
    """Replay a fixture; a killed run stays frozen (live = 1) for frozen_minutes first."""
    events: list[tuple[int, int, dict[str, float]]] = []
    epoch_minute: dict[int, int] = {}
    for m in fixture["measurements"]:
        minute = scraped_minute(m["t_s"])
        epoch_minute.setdefault(m["epoch"], minute)
        values = {g: m[k] for g, k in GAUGES.items() if m.get(k) is not None}
        events.append((minute, m["step"], values))
    for s in fixture["logged_steps"]:
        events.append((scraped_minute(s["t_s"]), s["step"], {"ncserve_nc0": s["nc0"]}))
    events.sort(key=lambda e: e[0])  # stable: in file order within a minute
    end = scraped_minute(fixture["end_s"])
    if fixture["outcome"] != "killed":
        frozen_minutes = 0
    live_until = end + frozen_minutes
    stale = live_until + GRACE_MINUTES
    current: dict[str, float] = {}
    steps: dict[str, int] = {}
    series: dict[str, list[float | None]] = {name: [] for name in [*GAUGES, LIVE]}
    pending = iter(events)
    event = next(pending, None)
    for minute in range(stale + 1):
        while event is not None and event[0] <= minute:
            _, step, values = event
            for gauge, value in values.items():
                if steps.get(gauge, -1) <= step:
                    steps[gauge], current[gauge] = step, value
            event = next(pending, None)
        for gauge in GAUGES:
            series[gauge].append(current.get(gauge) if minute < stale else None)
        series[LIVE].append(None if minute >= stale else 1.0 if minute < live_until else 0.0)
    return Timeline(
        run_id=fixture["name"],
        optimizer=fixture["optimizer"],
        series=series,
        epoch_minute=epoch_minute,
        end_minute=end,
        stale_minute=stale,
    )


def number(value: float) -> str:
    return format(value, ".6g")


def encode(values: list[float | None]) -> str:
    """promtool notation: runs of one value as 'vxN' (N+1 samples), 'stale' when dropped."""
    parts: list[str] = []
    index = 0
    while index < len(values):
        value = values[index]
        if value is None:
            parts.append("stale")
            break  # nothing after the series is dropped
        run = index
        while run + 1 < len(values) and values[run + 1] == value:
            run += 1
        parts.append(number(value) if run == index else f"{number(value)}x{run - index}")
        index = run + 1
    return " ".join(parts)


def input_series(line: Timeline) -> list[dict[str, str]]:
    labels = {"run_id": line.run_id, "optimizer": line.optimizer, **TARGET}
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return [
        {"series": f"{metric}{{{selector}}}", "values": encode(values)}
        for metric, values in line.series.items()
    ]


# --- expected alerts -----------------------------------------------------------------------


def humanize(value: float) -> str:
    """Prometheus' `humanize` template function (SI prefixes, 4 significant digits)."""
    if value == 0 or math.isnan(value) or math.isinf(value):
        return go_g4(value)
    prefix = ""
    if abs(value) >= 1:
        for p in ("k", "M", "G", "T", "P", "E", "Z", "Y"):
            if abs(value) < 1000:
                break
            prefix, value = p, value / 1000
        return go_g4(value) + prefix
    for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(value) >= 1:
            break
        prefix, value = p, value * 1000
    return go_g4(value) + prefix


def go_g4(value: float) -> str:
    """Go's %.4g for the values alerts show (Python's %g agrees on these)."""
    return f"{value:.4g}"


def rule_annotations() -> dict[str, dict[str, str]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return {r["alert"]: r["annotations"] for g in doc["groups"] for r in g["rules"]}


def render_annotation(template: str, labels: dict[str, str], value: float) -> str:
    """The rules' annotations use only {{ $labels.NAME }} and {{ $value | humanize }}."""
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)
    text = text.replace("{{ $value | humanize }}", humanize(value))
    if "{{" in text:
        raise ValueError(f"template form the generator does not know: {template!r}")
    return text


def alert_check(
    line: Timeline, minute: int, alert: str, firing: bool, annotations: dict[str, dict[str, str]]
) -> dict[str, Any]:
    check: dict[str, Any] = {"eval_time": f"{minute}m", "alertname": alert, "exp_alerts": []}
    if firing:
        labels = {"run_id": line.run_id, "optimizer": line.optimizer, **TARGET}
        value = line.at(ALERT_VALUE[alert], minute)
        severity = {ONSET: "info", BLOCKED: "warning"}[alert]
        check["exp_alerts"] = [
            {
                "exp_labels": {"severity": severity, **labels},
                "exp_annotations": {
                    key: render_annotation(text, labels, value)
                    for key, text in annotations[alert].items()
                },
            }
        ]
    return check


# --- the scenarios -------------------------------------------------------------------------

Anchor = tuple[str, int]


@dataclass(frozen=True)
class Scenario:
    name: str
    fixture: str
    # (anchor, alert, firing): ("epoch", e) is the minute epoch e's measurement is scraped,
    # ("end", k) k minutes after training stopped.
    checks: list[tuple[Anchor, str, bool]]
    frozen_minutes: int = 0


def epochs(alert: str, firing: bool, *numbers: int) -> list[tuple[Anchor, str, bool]]:
    return [(("epoch", n), alert, firing) for n in numbers]


def after_end(alert: str, firing: bool, *minutes: int) -> list[tuple[Anchor, str, bool]]:
    return [(("end", n), alert, firing) for n in minutes]


SCENARIOS = [
    Scenario(
        "(a) SGD, coupled weight decay: Onset fires once fitted, Blocked never",
        "sgd",
        [
            *epochs(ONSET, False, 1, 3, 5),  # not fitted yet (accuracy < 0.99)
            *epochs(ONSET, True, 12, 16, 20, 24, 28, 29),
            *epochs(BLOCKED, False, *range(2, 31, 2)),
            *after_end(ONSET, False, 0, 1, 30),  # live = 0: the run is over
        ],
    ),
    Scenario(
        "(b) AdamW, decoupled weight decay: Blocked fires once fitted, Onset never",
        "adamw",
        [
            *epochs(BLOCKED, False, 1, 3, 5),  # not fitted yet
            *epochs(BLOCKED, True, 10, 14, 18, 22, 26, 29),
            *epochs(ONSET, False, *range(2, 31, 2)),
            *after_end(BLOCKED, False, 0, 1, 30),  # live = 0: the run is over
        ],
    ),
    Scenario(
        "(c) SGD finished while normalized NC0 is still high, then 3 hours of nothing: silent",
        "sgd-finished",
        [
            *epochs(BLOCKED, False, 4, 8, 12),
            *after_end(BLOCKED, False, 1, 9, 11, 75, 150, 180),
            *after_end(ONSET, False, 1, 9, 11, 75, 150, 180),
        ],
    ),
    Scenario(
        "(d) AdamW plateau, NC0 drifting by tiny steps both ways: Blocked fires and stays",
        "adamw-plateau",
        [
            *epochs(BLOCKED, False, 1, 3, 5),
            *epochs(BLOCKED, True, *range(10, 27)),
            # Epochs 25-30 lose ~1% of NC0 each (1.762 -> 1.683): that is decay.
            *epochs(BLOCKED, False, 29),
            *epochs(ONSET, False, *range(2, 31, 2)),
        ],
    ),
    Scenario(
        "(e) SGD crashed (killed), its gauges frozen with live = 1 for 2h, then abandoned: "
        "Onset resolves, Blocked never fires",
        "sgd-crashed",
        [
            *epochs(ONSET, True, 11, 12),
            *after_end(ONSET, False, 30, 45, 60, 90, 119, 121, 135),
            *epochs(BLOCKED, False, 4, 8, 12),
            *after_end(BLOCKED, False, 10, 20, 30, 45, 60, 90, 119, 121, 135),
        ],
        frozen_minutes=120,
    ),
]


def load_fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))


def scenario_test(scenario: Scenario, annotations: dict[str, dict[str, str]]) -> dict[str, Any]:
    fixture = load_fixture(scenario.fixture)
    line = timeline(fixture, scenario.frozen_minutes)
    checks = sorted(
        ((line.minute(anchor), alert, firing) for anchor, alert, firing in scenario.checks),
        key=lambda c: (c[0], c[1]),
    )
    return {
        "name": f"{scenario.name} [fixtures/{scenario.fixture}.json]",
        "interval": "1m",
        "input_series": input_series(line),
        "alert_rule_test": [alert_check(line, *check, annotations) for check in checks],
    }


# --- cases that need no recording ----------------------------------------------------------


def synthetic_run(run_id: str, nc0: str, minutes: int) -> list[dict[str, str]]:
    """A live, fitted run with high normalized NC0 whose ncserve_nc0 follows `nc0`."""
    selector = f'run_id="{run_id}",optimizer="sgd",job="ncserve",instance="ncserve:9464"'
    return [
        {"series": f"ncserve_nc0{{{selector}}}", "values": nc0},
        {"series": f"ncserve_nc0_normalized{{{selector}}}", "values": f"0.5x{minutes}"},
        {"series": f"ncserve_nc1{{{selector}}}", "values": f"0.2x{minutes}"},
        {"series": f"ncserve_nc3{{{selector}}}", "values": f"0.6x{minutes}"},
        {"series": f"ncserve_accuracy_ratio{{{selector}}}", "values": f"0.999x{minutes}"},
        {"series": f"ncserve_run_live{{{selector}}}", "values": f"1x{minutes}"},
    ]


def blocked_cases(annotations: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """The 'NC0 rose at least once' clause, whatever the rate of change."""
    # NC0 of a recorded SGD run without weight decay: constant up to float32 rounding.
    jitter = " ".join(["1.77550922 1.77550927 1.77550928 1.77550922 1.77550915"] * 24)
    labels = {"run_id": "sgd-nowd", "optimizer": "sgd", **TARGET}
    message = {k: render_annotation(v, labels, 0.5) for k, v in annotations[BLOCKED].items()}
    return [
        {
            "name": "blocked stays silent for slow coupled decay (0.4% per 15m, every change down)",
            "interval": "1m",
            "input_series": synthetic_run("sgd-slow", "2-0.0005x120", 120),
            "alert_rule_test": [
                {"eval_time": f"{m}m", "alertname": BLOCKED, "exp_alerts": []}
                for m in (45, 90, 120)
            ],
        },
        {
            "name": "blocked fires without weight decay: NC0 constant up to rounding, both ways",
            "interval": "1m",
            "input_series": synthetic_run("sgd-nowd", jitter, 120),
            "alert_rule_test": [
                {"eval_time": "30m", "alertname": BLOCKED, "exp_alerts": []},  # pending
                *(
                    {
                        "eval_time": f"{m}m",
                        "alertname": BLOCKED,
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", **labels},
                                "exp_annotations": message,
                            }
                        ],
                    }
                    for m in (70, 119)
                ),
            ],
        },
    ]


def down_alert(instance: str | None) -> dict[str, Any]:
    labels = {"severity": "critical"}
    if instance:
        labels |= {"job": "ncserve", "instance": instance}
    suffix = f" ({instance})" if instance else ""
    return {
        "exp_labels": labels,
        "exp_annotations": {
            "summary": f"ncserve is down or not scraped{suffix}",
            "description": "Prometheus has not scraped ncserve successfully for a while. "
            "Training keeps going (ranks buffer their measurements and replay them), but "
            "nothing new is measured, stored or alerted on until it returns.",
        },
    }


SERVICE_CASES: list[dict[str, Any]] = [
    {
        "name": "steps-incomplete fires when the counter increases and clears afterwards",
        "interval": "1m",
        "input_series": [
            {
                "series": 'ncserve_steps_incomplete_total{run_id="r1",job="ncserve",instance="a"}',
                "values": "0x10 1x40",
            },
            # Old incompletes from before this window: no increase.
            {
                "series": 'ncserve_steps_incomplete_total{run_id="r2",job="ncserve",instance="a"}',
                "values": "4x50",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "NCServeStepsIncomplete", "exp_alerts": []},
            {
                "eval_time": "14m",
                "alertname": "NCServeStepsIncomplete",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "run_id": "r1",
                            "job": "ncserve",
                            "instance": "a",
                        },
                        "exp_annotations": {
                            "summary": "ncserve marked measurement steps of run r1 incomplete",
                            "description": "1 measurement step(s) of run r1 were closed recently "
                            "without all ranks' shards. Check the trainer pods' logs.",
                        },
                    }
                ],
            },
            # The 15m window no longer contains the increase.
            {"eval_time": "40m", "alertname": "NCServeStepsIncomplete", "exp_alerts": []},
        ],
    },
    {
        "name": "down fires when the scrape fails",
        "interval": "1m",
        "input_series": [
            {"series": 'up{job="ncserve",instance="10.0.0.7:9464"}', "values": "1x3 0x20"}
        ],
        "alert_rule_test": [
            {"eval_time": "6m", "alertname": "NCServeDown", "exp_alerts": []},  # 3m: pending
            {
                "eval_time": "12m",
                "alertname": "NCServeDown",
                "exp_alerts": [down_alert("10.0.0.7:9464")],
            },
        ],
    },
    {
        "name": "down fires when no ncserve target is scraped at all",
        "interval": "1m",
        "input_series": [
            {"series": 'up{job="node-exporter",instance="n1:9100"}', "values": "1x20"}
        ],
        "alert_rule_test": [
            {"eval_time": "10m", "alertname": "NCServeDown", "exp_alerts": [down_alert(None)]}
        ],
    },
    {
        "name": "down stays silent while ncserve is scraped (another job being down is not ncserve's)",
        "interval": "1m",
        "input_series": [
            {
                "series": 'up{job="demo-ncserve",instance="10.0.0.7:9464",namespace="ml"}',
                "values": "1x20",
            },
            {"series": 'up{job="node-exporter",instance="n1:9100"}', "values": "0x20"},
        ],
        "alert_rule_test": [{"eval_time": "15m", "alertname": "NCServeDown", "exp_alerts": []}],
    },
]

HEADER = """\
# GENERATED by scripts/gen_alert_tests.py from deploy/prometheus/fixtures/*.json: do not edit.
# Regenerate: python scripts/gen_alert_tests.py   (re-record: python scripts/record_alert_fixtures.py)
# Run:        promtool test rules deploy/prometheus/ncserve.rules.test.yml
#
# The Neural Collapse cases replay real nclaunch runs: 1 recorded second = {scale} promtool
# minutes (an epoch, 0.3-0.45 s, is 9-14 minutes; the 30m window spans 2-3 measurements),
# each gauge sampled and held every minute as a scrape would; at a run's end
# ncserve_run_live is 0 for {grace}m, then every per-run series goes stale.
"""


class _Dumper(yaml.SafeDumper):
    """Block style, except one line per silent check ({eval_time, alertname, exp_alerts: []})."""

    def represent_dict(self, data: dict[str, Any]) -> yaml.Node:
        if data.get("exp_alerts") == []:
            return self.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=True)
        return self.represent_mapping("tag:yaml.org,2002:map", data.items())


_Dumper.add_representer(dict, _Dumper.represent_dict)


def render() -> str:
    annotations = rule_annotations()
    doc = {
        "rule_files": ["ncserve.rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            *(scenario_test(s, annotations) for s in SCENARIOS),
            *blocked_cases(annotations),
            *SERVICE_CASES,
        ],
    }
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1_000_000, allow_unicode=True)
    return HEADER.format(scale=MINUTES_PER_SECOND, grace=GRACE_MINUTES) + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != text:
            print(
                f"stale, regenerate with python scripts/gen_alert_tests.py: {OUTPUT}",
                file=sys.stderr,
            )
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
