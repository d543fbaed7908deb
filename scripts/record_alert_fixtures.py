"""Record the training runs that the alert rules' unit tests replay.

    python scripts/record_alert_fixtures.py                 # record every run, regenerate the tests
    python scripts/record_alert_fixtures.py --only sgd      # one run
    python scripts/record_alert_fixtures.py --reuse DIR     # parse run directories already in DIR

Each recording is a real, short nclaunch training (1 rank, CPU, the embedded ncserve
service, MLP on mnist5k, one measurement per epoch, about 15-25 s of wall time and under
90 s of CPU on 2 cores). Measurements run in the foreground so that a row's wall_time in
metrics.jsonl is when the service had finalized it, i.e. when the exporter's gauges moved.

A fixture, deploy/prometheus/fixtures/<name>.json, holds what the exporter would have
shown, with wall-clock offsets in seconds from the step-0 measurement:

- measurements: one per row of RUN_DIR/metrics.jsonl (nc0, nc0_normalized, nc1, nc3,
  accuracy on the measurement split, the running train accuracy);
- logged_steps: nc0 of every logged step (every 10 steps), read from RUN_DIR/logs/rank0.log,
  because ncserve_nc0 is also refreshed from logged steps between measurements;
- end_s and outcome: when the trainer finished, or when this script killed it ("killed",
  a crashed run whose gauges stay frozen).

scripts/gen_alert_tests.py turns the fixtures into deploy/prometheus/ncserve.rules.test.yml;
this script runs it at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "deploy" / "prometheus" / "fixtures"

COMMON = ["--nodes", "1", "--device", "cpu", "--measure-in-foreground", "--seed", "0"]
# One intra-op thread: on a busy 2-core machine several threads spin against each other
# and an epoch can stall for seconds; one thread slows evenly (same metrics either way).
ENV = {"OMP_NUM_THREADS": "1"}
SGD = ["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--weight-decay", "5e-3"]
ADAMW = ["--optimizer", "adamw", "--lr", "1e-3"]


@dataclass(frozen=True)
class Recording:
    description: str
    args: list[str]
    # Kill the trainer (SIGKILL to its process group) once this epoch's measurement is in
    # metrics.jsonl: a crash nobody reports, its gauges frozen at their last values.
    kill_after_epoch: int | None = None
    optimizer: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "optimizer", self.args[self.args.index("--optimizer") + 1])


RECORDINGS: dict[str, Recording] = {
    "sgd": Recording(
        "SGD with coupled weight decay 5e-3: NC0 contracts at every step (~9.5% per epoch), "
        "NC3 falls to ~0.34: collapse sets in",
        [*SGD, "--epochs", "30"],
    ),
    "adamw": Recording(
        "AdamW, default decoupled weight decay 5e-4: NC0 rises slowly, NC3 stays ~0.7 "
        "(partial collapse): collapse is blocked",
        [*ADAMW, "--epochs", "30"],
    ),
    "adamw-plateau": Recording(
        "AdamW with a large decoupled weight decay (0.5): once the training set is fitted NC0 "
        "levels off around 1.7, drifting by tiny steps both ways (e9-e16 down ~0.5% per epoch)",
        [*ADAMW, "--weight-decay", "0.5", "--epochs", "30"],
    ),
    "sgd-finished": Recording(
        "SGD as in 'sgd', stopped after 12 epochs while normalized NC0 is still ~0.15",
        [*SGD, "--epochs", "12"],
    ),
    "sgd-crashed": Recording(
        "SGD as in 'sgd', killed after the epoch-12 measurement (SIGKILL, no goodbye)",
        [*SGD, "--epochs", "30"],
        kill_after_epoch=12,
    ),
}

# rank0.log lines: "2026-01-01 12:00:00,123 rank0 INFO nclaunch.trainer: step 10 epoch 1 ... nc0 1.75 ..."
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
_LOGGED_STEP = re.compile(r"\bstep (\d+) epoch (\d+)\b.*?\bnc0 ([-+0-9.eE]+|nan|inf)")
_FINISHED = re.compile(r"\bfinished: \d+ steps")


def significant(value: float | None, digits: int = 6) -> float | None:
    """A value rounded to `digits` significant digits (the precision rank0.log keeps)."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def log_time(line: str) -> float | None:
    """Unix time of a log line (logging writes local time with milliseconds)."""
    match = _LOG_TIME.match(line)
    if match is None:
        return None
    return time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + (
        int(match.group(2)) / 1000
    )


def read_run(run_dir: Path) -> dict[str, Any]:
    """Measurements, logged steps and end time of a run directory, in unix seconds."""
    rows = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    if not rows:
        raise SystemExit(f"{run_dir}: metrics.jsonl is empty")
    logged: list[dict[str, Any]] = []
    finished: float | None = None
    for line in (run_dir / "logs" / "rank0.log").read_text().splitlines():
        stamp = log_time(line)
        if stamp is None:
            continue
        if (match := _LOGGED_STEP.search(line)) is not None:
            logged.append(
                {"unix": stamp, "step": int(match.group(1)), "nc0": float(match.group(3))}
            )
        elif _FINISHED.search(line):
            finished = stamp
    return {"rows": rows, "logged": logged, "finished": finished}


def fixture(
    name: str, recording: Recording, run: dict[str, Any], killed_at: float | None
) -> dict[str, Any]:
    """The fixture of one recording: offsets from the step-0 measurement, 6 significant digits."""
    t0 = run["rows"][0]["wall_time"]

    def offset(unix: float) -> float:
        return round(unix - t0, 3)

    measurements = [
        {
            "t_s": offset(row["wall_time"]),
            "step": row["step"],
            "epoch": row["epoch"],
            **{
                key: significant(row.get(key))
                for key in ("nc0", "nc0_normalized", "nc1", "nc3", "accuracy", "train_acc")
            },
        }
        for row in run["rows"]
    ]
    logged_steps = [
        {"t_s": offset(entry["unix"]), "step": entry["step"], "nc0": significant(entry["nc0"])}
        for entry in run["logged"]
        if entry["unix"] >= t0 and significant(entry["nc0"]) is not None
    ]
    if killed_at is not None:
        outcome, end = "killed", killed_at
    elif run["finished"] is not None:
        outcome, end = "finished", run["finished"]
    else:
        raise SystemExit(f"{name}: the run neither finished nor was killed by this script")
    return {
        "name": name,
        "description": recording.description,
        "optimizer": recording.optimizer,
        "command": shlex.join(["nclaunch", *COMMON, *recording.args]),
        "env": ENV,
        "outcome": outcome,
        "end_s": offset(end),
        "measurements": measurements,
        "logged_steps": logged_steps,
    }


def dump(fix: dict[str, Any]) -> str:
    """JSON with one measurement or logged step per line."""
    fields = []
    for key, value in fix.items():
        if isinstance(value, list):
            rows = ",\n".join(f"    {json.dumps(item)}" for item in value)
            fields.append(f"  {json.dumps(key)}: [\n{rows}\n  ]")
        else:
            fields.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(fields) + "\n}\n"


def measured_epochs(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return -1
    epochs = [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]
    return max(epochs, default=-1)


def train(name: str, recording: Recording, run_dir: Path, nclaunch: list[str]) -> float | None:
    """Run one recording; return the unix time it was killed at, or None if it finished."""
    command = [*nclaunch, *COMMON, *recording.args, "--run-dir", str(run_dir), "--run-id", name]
    print(f"[{name}] {shlex.join(command)}", flush=True)
    log = run_dir.with_name(run_dir.name + ".out").open("w")
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **ENV},
    )
    killed_at: float | None = None
    try:
        if recording.kill_after_epoch is None:
            code = process.wait(timeout=600)
            if code != 0:
                raise SystemExit(f"[{name}] nclaunch exited with {code}: see {log.name}")
        else:
            while process.poll() is None:
                if measured_epochs(run_dir) >= recording.kill_after_epoch:
                    killed_at = time.time()
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=60)
                    break
                if time.monotonic() - started > 600:
                    raise SystemExit(f"[{name}] no epoch-{recording.kill_after_epoch} measurement")
                time.sleep(0.02)
            if killed_at is None:
                raise SystemExit(f"[{name}] finished before it could be killed")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
        log.close()
    print(f"[{name}] done in {time.monotonic() - started:.1f} s", flush=True)
    return killed_at


def uneven_epochs(fix: dict[str, Any], tolerance: float = 2.0) -> list[int]:
    """Epochs (from the second on) that took over `tolerance` x the median epoch: a busy
    machine stalled the run, and the replay would show a gap no real run has."""
    times = [m["t_s"] for m in fix["measurements"]]
    durations = [b - a for a, b in itertools.pairwise(times[1:])]
    if not durations:
        return []
    median = sorted(durations)[len(durations) // 2]
    return [epoch for epoch, d in enumerate(durations, start=2) if d > tolerance * median]


def check_monotone(name: str, fix: dict[str, Any]) -> None:
    """Coupled weight decay shrinks NC0 at every step: say so when a recording disagrees."""
    if fix["optimizer"] != "sgd":
        return
    events = sorted(
        [(m["step"], m["nc0"]) for m in fix["measurements"]]
        + [(s["step"], s["nc0"]) for s in fix["logged_steps"]]
    )
    rises = [(a, b) for a, b in itertools.pairwise(events) if b[1] > a[1]]
    if rises:
        print(f"[{name}] warning: NC0 rose {len(rises)} time(s) under SGD: {rises[:3]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(RECORDINGS), default=[])
    parser.add_argument(
        "--work-dir", type=Path, help="where the run directories go (default: a temp dir)"
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        help="parse the run directories already in this folder instead of training "
        "(a killed run needs its <name>.killed file holding the kill time)",
    )
    parser.add_argument(
        "--nclaunch", default="nclaunch", help="the nclaunch command (default: nclaunch)"
    )
    parser.add_argument(
        "--attempts",
        type=int,
        default=3,
        help="record a run again (up to this many times) while some epoch took over twice "
        "the median (default: 3)",
    )
    parser.add_argument("--no-tests", action="store_true", help="do not regenerate the tests")
    args = parser.parse_args(argv)
    names = args.only or list(RECORDINGS)
    work = args.reuse or args.work_dir or Path(tempfile.mkdtemp(prefix="ncserve-alerts-"))
    work.mkdir(parents=True, exist_ok=True)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name in names:
        recording = RECORDINGS[name]
        for attempt in range(1, 1 + (1 if args.reuse else max(1, args.attempts))):
            run_dir = work / (name if attempt == 1 else f"{name}.{attempt}")
            marker = run_dir.with_name(run_dir.name + ".killed")
            if args.reuse:
                killed_at = float(marker.read_text()) if marker.exists() else None
            else:
                if run_dir.exists():
                    raise SystemExit(f"{run_dir} exists: give another --work-dir")
                killed_at = train(name, recording, run_dir, shlex.split(args.nclaunch))
                if killed_at is not None:
                    marker.write_text(repr(killed_at))
            fix = fixture(name, recording, read_run(run_dir), killed_at)
            slow = uneven_epochs(fix)
            if not slow:
                break
            print(f"[{name}] epochs {slow} took over twice the median: a busy machine")
        check_monotone(name, fix)
        path = FIXTURES / f"{name}.json"
        path.write_text(dump(fix))
        last = fix["measurements"][-1]
        print(
            f"[{name}] wrote {path.relative_to(REPO)}: {len(fix['measurements'])} measurements "
            f"(last epoch {last['epoch']}), {len(fix['logged_steps'])} logged steps, "
            f"{fix['outcome']} at {fix['end_s']} s"
        )
    if not args.no_tests:
        sys.path.insert(0, str(REPO / "scripts"))
        import gen_alert_tests

        return gen_alert_tests.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
