"""The Prometheus exporter: the contract's names and labels, and a clean `promtool check`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ncserve.v1 import ncserve_pb2 as pb
from ncserve.v1 import ncserve_pb2_grpc as pb_grpc
from tests.service_support import (
    make_dataset,
    push_round1,
    register,
    run_step_sequentially,
    start_test_server,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
PER_RUN = [
    "ncserve_nc0", "ncserve_nc0_normalized", "ncserve_nc1", "ncserve_nc1_trace_ratio",
    "ncserve_cdnv", "ncserve_nc2_norm", "ncserve_nc2_angle", "ncserve_nc2", "ncserve_nc2w_norm",
    "ncserve_nc2w_angle", "ncserve_nc2w", "ncserve_nc2m", "ncserve_nc3", "ncserve_nc4_ratio",
    "ncserve_train_accuracy_ratio", "ncserve_train_loss", "ncserve_holdout_accuracy_ratio",
    "ncserve_latest_step", "ncserve_latest_epoch", "ncserve_accuracy_ratio", "ncserve_run_live",
    "ncserve_run_last_activity_timestamp_seconds",
]  # fmt: skip
SERVICE = [
    "ncserve_run_info", "ncserve_shards_received_total", "ncserve_shards_rejected_total",
    "ncserve_steps_finalized_total", "ncserve_steps_incomplete_total",
    "ncserve_finalize_duration_seconds", "ncserve_open_steps", "ncserve_runs",
    "ncserve_received_bytes_total", "ncserve_run_state",
]  # fmt: skip


def _promtool() -> str | None:
    local = REPO_ROOT / ".tools" / "bin" / "promtool"
    return str(local) if local.exists() else shutil.which("promtool")


@pytest.fixture(scope="module")
def scrape(tmp_path_factory) -> str:
    """/metrics of a server that finalized a step, lost one to the deadline, refused a push."""
    handle = start_test_server(tmp_path_factory.mktemp("exporter") / "nc.db", step_deadline_s=0.3)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = pb_grpc.NCServiceStub(channel)
            data = make_dataset(41, 4, 6, 2, 20)
            meta = {"optimizer": "sgdw", "lr": "0.01", "weight_decay": "5e-4", "model": "mlp"}
            register(stub, "run-1", data, metadata=meta)
            run_step_sequentially(stub, "run-1", 10, data)
            stub.RecordScalars(
                pb.RecordScalarsRequest(run_id="run-1", step=11, values={"train_loss": 0.3}),
                timeout=5,
            )
            push_round1(stub, "run-1", 20, data, 0)
            with pytest.raises(grpc.RpcError):
                push_round1(stub, "ghost", 1, data, 0)
            deadline = time.monotonic() + 10
            while handle.metrics.registry.get_sample_value("ncserve_open_steps") != 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        url = f"http://127.0.0.1:{handle.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    finally:
        handle.stop(0.5)


def test_promtool_check_metrics_reports_nothing(scrape: str) -> None:
    promtool = _promtool()
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI (Debian package 'prometheus')")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=scrape, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout and not result.stderr, (
        result.stdout + result.stderr
    )


def test_names_are_the_contract(scrape: str) -> None:
    families = {f.name: f for f in text_string_to_metric_families(scrape)}
    expected_families = {n.removesuffix("_total") for n in PER_RUN + SERVICE}
    # Every name is declared (HELP/TYPE) even before it has a sample (e.g. no held-out split).
    assert expected_families <= set(families), expected_families - set(families)
    extra = {f for f in families if f.startswith("ncserve_")} - expected_families
    assert extra == set()
    # No `_created` series: every counter is built by the collector.
    assert "_created" not in scrape
    contracts = (REPO_ROOT / "docs" / "CONTRACTS.md").read_text()
    for name in PER_RUN + SERVICE:
        assert re.search(rf"`{name}(`|\{{)", contracts), f"{name} not in docs/CONTRACTS.md"


def test_labels_stay_low_cardinality(scrape: str) -> None:
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            assert not {"step", "rank", "class"} & set(sample.labels), sample
            if family.name in PER_RUN:
                assert set(sample.labels) == {"run_id", "optimizer"}, sample


def test_values_follow_the_run(scrape: str) -> None:
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(scrape)
        for s in f.samples
    }
    run = (("optimizer", "sgdw"), ("run_id", "run-1"))
    assert values[("ncserve_latest_step", run)] == 10
    assert values[("ncserve_train_loss", run)] == 0.3  # recorded at step 11, newer
    assert values[("ncserve_steps_finalized_total", (("run_id", "run-1"),))] == 1
    assert values[("ncserve_steps_incomplete_total", (("run_id", "run-1"),))] == 1
    assert values[("ncserve_shards_rejected_total", (("reason", "not_found"),))] == 1
    assert values[("ncserve_shards_received_total", (("round", "1"),))] == 3
    assert values[("ncserve_runs", (("state", "running"),))] == 1
    assert values[("ncserve_runs", (("state", "finished"),))] == 0
    assert values[("ncserve_run_live", run)] == 1
    assert values[("ncserve_run_state", (*run, ("state", "running")))] == 1
    assert values[("ncserve_run_state", (*run, ("state", "finished")))] == 0
    assert 0 <= values[("ncserve_accuracy_ratio", run)] <= 1
    info = [k for k in values if k[0] == "ncserve_run_info"]
    assert len(info) == 1 and ("weight_decay", "5e-4") in info[0][1]
