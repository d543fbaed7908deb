"""Regenerate the figures of docs/reliability.md: run the fault, security and hostile-input
tests and the load benchmark, and rewrite the doc's table from what they observed.

    python benchmarks/reliability_report.py [--skip-load] [--load-args "--ranks 256 ..."]

The tests record their numbers when ``NCSERVE_RELIABILITY_FIGURES`` names a file (see
tests/reliability_support.py); the load benchmark writes JSON. Only the part of the doc
between the ``reliability-figures`` markers is replaced. Exit status 1 when a test or the
benchmark failed (the table then says which rows were not measured).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- reliability-figures:begin -->", "<!-- reliability-figures:end -->"
TESTS = [
    "tests/test_reliability_faults.py",
    "tests/test_trainer_restart.py",
    "tests/test_reliability_service.py",
    "tests/test_hostile_input.py",
    "tests/test_reliability_security.py",
]

Row = tuple[str, str, str, str]  # test, injected, observed, numbers


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(
        f"{name} {count}" for name, count in sorted(codes.items(), key=lambda c: -c[1])
    )


# Each scenario a test records -> (test, injected, observed, numbers) for the table.
RENDER: dict[str, Callable[[dict[str, Any]], Row]] = {
    "service kill -9 mid-run": lambda f: (
        "`test_reliability_faults::test_service_killed_and_restarted_mid_run`",
        "SIGKILL of the external `ncserve serve` (token) once step 0 is stored, during a "
        "2-node `nclaunch --deterministic` run; restarted on the same port and database",
        "run completes; every step stored once, bit for bit the run without the fault "
        "(over mTLS); `integrity_check` ok after the crash and at the end",
        f"{f['steps_stored']}/{f['steps_expected']} steps kept, {f['steps_lost']} lost; "
        f"service down {f['down_s']} s; {f['local_fallbacks']} measurement(s) finished by "
        "the ranks meanwhile",
    ),
    "service down for a whole run": lambda f: (
        "`test_reliability_faults::test_service_down_for_the_whole_run`",
        "`--sidecar` pointing at a port nothing listens on, for the whole 2-node run",
        "training completes, metrics.jsonl equal to the run without the fault; the spools "
        "hold every call; `ncserve replay RUN_DIR` delivers them once the service is up",
        f"run {f['run_s']} s vs {f['reference_run_s']} s without the fault "
        f"(x{f['slowdown']}); {f['calls_spooled']} calls spooled, {f['calls_delivered']} "
        f"delivered; {f['steps_stored']}/{f['steps_expected']} steps kept",
    ),
    "worker kill -9, elastic restart": lambda f: (
        "`test_trainer_restart::test_killed_worker_restarts_from_checkpoint`",
        "SIGKILL of rank 1 at step 28 with `--max-restarts 1` (embedded service)",
        "workers restart from the step-16 checkpoint, the run completes with the metrics of "
        "the uninterrupted run; the service stored no step twice",
        f"{f['steps_stored']}/{f['steps_measured']} steps stored, {f['stored_twice']} twice; "
        f"integrity {f['integrity']}",
    ),
    "worker kill -9, --resume": lambda f: (
        "`test_trainer_restart::test_failed_run_continues_with_resume`",
        "the same kill without restarts; then `nclaunch --resume`",
        "the resumed run ends with the uninterrupted metrics; no step stored twice",
        f"{f['steps_stored']}/{f['steps_measured']} steps stored, {f['stored_twice']} twice; "
        f"integrity {f['integrity']}",
    ),
    "shard never arrives": lambda f: (
        "`test_reliability_service::test_shard_that_never_arrives`",
        "rank 1's shards of step 2 of 5 never sent (step deadline 2 s, client deadline 1 s)",
        "step 2 marked incomplete (never half-counted), steps 3-4 measured, both ranks end "
        "cleanly; rank 0's report names its one refused call",
        f"{f['complete']}/{f['steps']} steps complete, {f['incomplete']} incomplete; "
        f"{f['rejected_calls']} call refused; longest client call {f['longest_call_s']} s; "
        f"all done in {f['elapsed_s']} s",
    ),
    "client buffer past its bound": lambda f: (
        "`test_reliability_service::test_buffer_past_its_bound_reports_exactly_what_was_dropped`",
        f"service down for 2 ranks x {f['steps']} steps with `max_buffer_bytes="
        f"{f['buffer_limit_bytes']}`; then the service and `ncserve replay`",
        "accepted + refused + dropped = every call, each exactly once; the dropped ones are "
        "exactly those the clients reported, by (step, rank, round)",
        f"{f['calls']} calls: {f['delivered']} delivered, {f['dropped']} dropped (reported), "
        f"{f['refused_incomplete']} refused (their step incomplete); "
        f"{f['steps_complete']}/{f['steps']} steps complete",
    ),
    "disk full (8 MB tmpfs)": lambda f: (
        "`test_reliability_service::test_disk_full_then_space_returns`",
        "the database's filesystem (8 MB tmpfs) filled up during a run",
        "the push gets a clear status naming the full store; queries and health keep "
        "answering; the same push succeeds once space returns",
        f"{f['status']}; health {f['health']}; recovered; integrity {f['integrity']}",
    ),
    "read-only database at start": lambda f: (
        "`test_reliability_service::test_disk_full_then_space_returns`",
        "the database's filesystem remounted read-only, `ncserve serve` started on it",
        "refused at start with one line, exit status 2, no traceback; the file is intact",
        f"exit {f['exit_status']}: `{f['message'].split(': ', 2)[-1]}`",
    ),
    "hostile gRPC requests": lambda f: (
        "`test_hostile_input::test_malformed_requests_get_a_specific_status_and_change_nothing`",
        "generated malformed requests (hypothesis): random/invalid header fields, wrong dims "
        "and dtypes, NaN/Inf, negative and huge counts, chunk gaps/repeats/reordering/"
        "truncation, corrupt trailers and pieces, oversized pieces and messages, bad tokens",
        "each gets the status its defect calls for, one line; after each the store digest "
        "is unchanged and health is SERVING",
        f"{f['requests']} requests: {_codes(f['codes'])}; 0 UNKNOWN/INTERNAL",
    ),
    "corrupt .npz files": lambda f: (
        "`test_hostile_input::test_corrupt_npz_at_compute` / `..._at_push`",
        "truncated, bit-flipped, padded and random files, hand-written .npy headers (huge or "
        "negative shapes, object/complex/string dtypes), wrong keys, shapes and labels",
        "one `Error:` line naming the file and exit status 2, or the metrics; never a "
        "traceback; nothing stored",
        ", ".join(f"{k}: {v}" for k, v in sorted(f["outcomes"].items())) + "; 0 tracebacks",
    ),
    "token never logged or exported": lambda f: (
        "`test_reliability_security::test_token_is_never_logged_exported_or_stored`",
        "a token (and a one-letter-off wrong one) used by `ncserve push/runs/query/watch` and "
        "the client library against `ncserve serve --log-level debug`",
        "neither appears anywhere searched",
        f"searched: {', '.join(f['searched'])}; found {f['token_found']}",
    ),
    "token in a training run's files": lambda f: (
        "`test_reliability_faults::test_token_never_logged_or_exported_by_a_training_run`",
        "a 2-node nclaunch run with `--sidecar-token-file` over mTLS",
        "the token is in no file of the run directory, nor the output, service log, /metrics",
        f"{f['files_searched']} files and streams searched, found {f['found']}",
    ),
    "client under TLS + mTLS + token": lambda f: (
        "`test_reliability_security::test_client_library_under_tls_mtls_and_token`",
        "the client library against a TLS + mTLS + token service with each credential wrong",
        "valid credentials store the measurement; every wrong one stores nothing (handshake "
        "failures are buffered as an outage, a bad token raises UNAUTHENTICATED)",
        f"refused: {', '.join(f['refused'])}; stored by them {f['stored_by_refused']}",
    ),
    "limits": lambda f: (
        "`test_reliability_security::test_serve_limits_answer_resource_exhausted`",
        "`ncserve serve --max-runs 1 --max-open-steps 1 --max-message-bytes 2MiB`, exceeded",
        "RESOURCE_EXHAUSTED naming the flag; counted in `ncserve_shards_rejected_total`",
        f"{f['status']} for: {', '.join(f['refused'])}",
    ),
}


def load_rows(scenarios: list[dict[str, Any]]) -> list[Row]:
    rows = []
    for s in scenarios:
        ok = not s["errors"] and s["metrics_match"]
        rows.append(
            (
                "`benchmarks/service_load.py`",
                f"{s['ranks']} simulated ranks (threads in 4 client processes) x {s['steps']} "
                "steps, K = 100, p = 512"
                + (", TLS + token" if s["tls_token"] else "")
                + (
                    f", `--max-inflight-bytes` {s['max_inflight_mb']} MiB"
                    if s["max_inflight_mb"] is not None
                    else ""
                ),
                (
                    "0 errors; every step finalized with the metrics of the in-process merge"
                    if ok
                    else f"{len(s['errors'])} errors: {s['errors'][:2]}"
                ),
                f"push p50 {s['push_p50_ms']:.0f} ms / p99 {s['push_p99_ms']:.0f} ms; step "
                f"p50 {s['step_p50_s']:.2f} s / p99 {s['step_p99_s']:.2f} s; "
                f"{s['shards_per_s']:.0f} shards/s, {s['mb_per_s']:.0f} MB/s; server peak "
                f"RSS {s['server_peak_rss_mb']:.0f} MB",
            )
        )
    return rows


def machine() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} x {model}, Linux {platform.release()}, Python {platform.python_version()}"


def render(figures: list[dict[str, Any]], load: list[dict[str, Any]] | None, notes: str) -> str:
    seen: dict[str, dict[str, Any]] = {}
    for figure in figures:
        seen[figure["scenario"]] = figure
    rows: list[Row] = []
    for name, make in RENDER.items():
        if name in seen:
            rows.append(make(seen[name]))
        else:
            rows.append((f"({name})", "-", "**not measured** (test failed or skipped)", "-"))
    if load is not None:
        rows += load_rows(load)
    else:
        rows.append(("`benchmarks/service_load.py`", "-", "**not measured**", "-"))
    lines = [
        "| test | injected | observed | numbers |",
        "|---|---|---|---|",
        *(f"| {' | '.join(cell.replace('|', '/') for cell in row)} |" for row in rows),
    ]
    return f"{BEGIN}\n{notes}\n\n" + "\n".join(lines) + f"\n{END}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-load", action="store_true", help="keep the load rows out")
    parser.add_argument("--load-args", default="", help="extra arguments of service_load.py")
    args = parser.parse_args()
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        figures_path, load_path = Path(tmp) / "figures.jsonl", Path(tmp) / "load.json"
        env = {**os.environ, "NCSERVE_RELIABILITY_FIGURES": str(figures_path)}
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
            cwd=REPO, env=env, check=False,
        )  # fmt: skip
        status |= tests.returncode != 0
        load = None
        if not args.skip_load:
            bench = subprocess.run(
                [sys.executable, str(REPO / "benchmarks" / "service_load.py"), "--json",
                 str(load_path), *shlex.split(args.load_args)],
                cwd=REPO, check=False,
            )  # fmt: skip
            status |= bench.returncode != 0
            if load_path.exists():
                load = json.loads(load_path.read_text())
        figures = (
            [json.loads(line) for line in figures_path.read_text().splitlines()]
            if figures_path.exists()
            else []
        )
    load_after = os.getloadavg()
    notes = (
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {machine()}: a small shared VM, loaded by "
        f"other work while measured (1-minute load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after). Durations are indicative; the tests assert only loose "
        "bounds on them. Regenerate with `python benchmarks/reliability_report.py`."
    )
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC} lacks the {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(head + render(figures, load, notes) + tail)
    print(f"wrote {DOC} ({len(figures)} test figures, load {'yes' if load else 'no'})")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
