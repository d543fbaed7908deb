"""The life of a run: finish, fail, abandon, revive, delete, retention, paging, series."""

from __future__ import annotations

import sqlite3
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ncserve.client import NCClient
from ncserve.protocol import MAX_METADATA_ENTRIES, MAX_METADATA_VALUE
from ncserve.service.aggregator import Aggregator
from ncserve.service.exporter import ServiceMetrics
from ncserve.service.runs import AggregatorLimits
from ncserve.service.store import MIGRATIONS, SCHEMA_VERSION, Store
from ncserve.v1 import ncserve_pb2 as pb
from tests.service_support import (
    insecure_stub,
    make_dataset,
    register,
    run_step_sequentially,
    start_test_server,
    table_digest,
)

DATA = make_dataset(7, 3, 5, 2, 12)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def run_series(values: dict, run_id: str) -> set[str]:
    return {name for name, labels in values if ("run_id", run_id) in labels}


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


# -- the service, end to end -----------------------------------------------------------------


def test_finish_is_idempotent_and_stops_the_live_series_at_once(tmp_path: Path) -> None:
    handle = start_test_server(tmp_path / "nc.db")
    try:
        channel, stub = insecure_stub(handle.port)
        with channel:
            register(stub, "sgd-run", DATA, metadata={"optimizer": "sgd"})
            run_step_sequentially(stub, "sgd-run", 3, DATA)
            run_step_sequentially(stub, "sgd-run", 9, DATA)
            labels = (("optimizer", "sgd"), ("run_id", "sgd-run"))
            assert scrape(handle.metrics_port)[("ncserve_run_live", labels)] == 1
            info = stub.GetRun(pb.GetRunRequest(run_id="sgd-run"), timeout=5)
            assert info.state == pb.RUN_RUNNING and not info.HasField("ended_unix")
            assert (info.first_step, info.latest_step) == (3, 9)

            ended = stub.FinishRun(
                pb.FinishRunRequest(run_id="sgd-run", state=pb.RUN_FINISHED, reason="done"),
                timeout=5,
            )
            assert ended.state == pb.RUN_FINISHED and ended.state_reason == "done"
            assert ended.ended_unix >= info.created_unix
            values = scrape(handle.metrics_port)
            assert values[("ncserve_run_live", labels)] == 0
            assert values[("ncserve_run_state", (*labels, ("state", "finished")))] == 1
            assert values[("ncserve_runs", (("state", "finished"),))] == 1
            # Again in the same state: the first end stands, and a second witness's reason
            # is kept beside the first.
            again = stub.FinishRun(
                pb.FinishRunRequest(run_id="sgd-run", state=pb.RUN_FINISHED, reason="ok"),
                timeout=5,
            )
            assert again.ended_unix == ended.ended_unix
            assert again.state_reason == "done; ok"
            # Finished cannot become failed; RUNNING is no end; unknown runs are NOT_FOUND.
            assert (
                code_of(lambda: stub.FinishRun(
                    pb.FinishRunRequest(run_id="sgd-run", state=pb.RUN_FAILED), timeout=5))
                == grpc.StatusCode.FAILED_PRECONDITION
            )  # fmt: skip
            assert (
                code_of(lambda: stub.FinishRun(
                    pb.FinishRunRequest(run_id="sgd-run", state=pb.RUN_RUNNING), timeout=5))
                == grpc.StatusCode.INVALID_ARGUMENT
            )  # fmt: skip
            assert (
                code_of(lambda: stub.FinishRun(
                    pb.FinishRunRequest(run_id="ghost", state=pb.RUN_FAILED), timeout=5))
                == grpc.StatusCode.NOT_FOUND
            )  # fmt: skip
            # A spool replayed after the end still lands: nothing measured is lost.
            run_step_sequentially(stub, "sgd-run", 12, DATA)
            info = stub.GetRun(pb.GetRunRequest(run_id="sgd-run"), timeout=5)
            assert info.state == pb.RUN_FINISHED and info.latest_step == 12
    finally:
        handle.stop(0.5)


def test_restart_keeps_states_and_does_not_resurrect_series(tmp_path: Path) -> None:
    db = tmp_path / "nc.db"
    handle = start_test_server(db)
    try:
        channel, stub = insecure_stub(handle.port)
        with channel:
            for run_id in ("done", "crashed", "going"):
                register(stub, run_id, DATA)
                run_step_sequentially(stub, run_id, 1, DATA)
            stub.FinishRun(pb.FinishRunRequest(run_id="done", state=pb.RUN_FINISHED), timeout=5)
            stub.FinishRun(
                pb.FinishRunRequest(run_id="crashed", state=pb.RUN_FAILED, reason="rank 1 died"),
                timeout=5,
            )
    finally:
        handle.stop(0.5)
    handle = start_test_server(db, series_grace_s=0.001)
    try:
        channel, stub = insecure_stub(handle.port)
        with channel:
            states = {
                r.run_id: (r.state, r.state_reason)
                for r in stub.ListRuns(pb.ListRunsRequest(), timeout=5).runs
            }
        assert states == {
            "done": (pb.RUN_FINISHED, ""),
            "crashed": (pb.RUN_FAILED, "rank 1 died"),
            "going": (pb.RUN_RUNNING, ""),
        }
        values = scrape(handle.metrics_port)
        assert run_series(values, "done") == set() and run_series(values, "crashed") == set()
        assert "ncserve_nc0" in run_series(values, "going")
        assert "ncserve_steps_finalized_total" in run_series(values, "going")
    finally:
        handle.stop(0.5)


def test_delete_removes_data_and_series_and_needs_the_token(tmp_path: Path) -> None:
    db = tmp_path / "nc.db"
    handle = start_test_server(db, token="s3cret")
    auth = (("authorization", "Bearer s3cret"),)
    try:
        channel, stub = insecure_stub(handle.port)
        with channel:
            for run_id in ("keep", "drop"):
                register(stub, run_id, DATA, rpc_metadata=auth)
            client = NCClient(f"127.0.0.1:{handle.port}", token="s3cret")
            try:
                client.record_scalars("drop", 5, {"train_loss": 0.5})
                client.record_scalars("keep", 5, {"train_loss": 0.7})
                assert client.flush(timeout_s=10).complete
                before = scrape(handle.metrics_port)
                assert "ncserve_train_loss" in run_series(before, "drop")
                assert (
                    code_of(lambda: stub.DeleteRun(pb.DeleteRunRequest(run_id="drop"), timeout=5))
                    == grpc.StatusCode.UNAUTHENTICATED
                )
                removed = client.delete_run("drop")
                assert removed == {"num_measurements": 0, "num_scalar_steps": 1}
                assert [r["run_id"] for r in client.list_runs()] == ["keep"]
            finally:
                client.close()
            assert (
                code_of(lambda: stub.GetRun(pb.GetRunRequest(run_id="drop"), metadata=auth,
                                            timeout=5))
                == grpc.StatusCode.NOT_FOUND
            )  # fmt: skip
            after = scrape(handle.metrics_port)
            assert run_series(after, "drop") == set()
            assert after[("ncserve_train_loss", (("optimizer", "sgd"), ("run_id", "keep")))] == 0.7
            # The id is free again: a new run, with nothing of the old one.
            reply = register(stub, "drop", DATA, rpc_metadata=auth)
            assert reply.created and reply.run.num_measurements == 0
    finally:
        handle.stop(0.5)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT COUNT(*) FROM scalars WHERE run_id = 'drop'").fetchone() == (0,)
    finally:
        conn.close()


def test_list_runs_pages_over_a_thousand_runs(tmp_path: Path) -> None:
    handle = start_test_server(tmp_path / "nc.db", max_runs=1100)
    try:
        channel, stub = insecure_stub(handle.port)
        with channel:
            big = {f"k{i:02d}": "x" * MAX_METADATA_VALUE for i in range(MAX_METADATA_ENTRIES)}
            expected = []
            for i in range(1000):
                run_id = f"run-{i:04d}"
                register(stub, run_id, DATA, metadata=big if i % 25 == 0 else None)
                expected.append(run_id)
            for run_id in expected[::3]:
                stub.FinishRun(pb.FinishRunRequest(run_id=run_id, state=pb.RUN_FINISHED),
                               timeout=5)  # fmt: skip

            def listing(request: pb.ListRunsRequest) -> tuple[list[str], list[int]]:
                seen, sizes = [], []
                while True:
                    reply = stub.ListRuns(request, timeout=10)
                    sizes.append(reply.ByteSize())
                    seen.extend(r.run_id for r in reply.runs)
                    if not reply.next_page_token:
                        return seen, sizes
                    request.page_token = reply.next_page_token

            seen, sizes = listing(pb.ListRunsRequest(page_size=1000))
            assert seen == expected  # every run once, oldest first
            assert max(sizes) <= (1 << 20) + 100_000 and len(sizes) > 1  # size-bounded pages
            seen, sizes = listing(pb.ListRunsRequest())  # default page size
            assert seen == expected and len(sizes) >= 10
            finished, _ = listing(pb.ListRunsRequest(page_size=50, states=[pb.RUN_FINISHED]))
            assert finished == expected[::3]
            # An old client (no paging fields) gets the first page, under the limit.
            first = stub.ListRuns(pb.ListRunsRequest(), timeout=10)
            assert len(first.runs) == 100 and first.next_page_token
            # Tokens are opaque and tied to their filter.
            bad = pb.ListRunsRequest(page_token="not-a-token")
            assert code_of(lambda: stub.ListRuns(bad, timeout=5)) == (
                grpc.StatusCode.INVALID_ARGUMENT
            )
            other = pb.ListRunsRequest(page_token=first.next_page_token, states=[pb.RUN_FAILED])
            assert code_of(lambda: stub.ListRuns(other, timeout=5)) == (
                grpc.StatusCode.INVALID_ARGUMENT
            )
            negative = pb.ListRunsRequest(page_size=-1)
            assert code_of(lambda: stub.ListRuns(negative, timeout=5)) == (
                grpc.StatusCode.INVALID_ARGUMENT
            )
    finally:
        handle.stop(0.5)


def test_metadata_labels_come_from_an_allow_list_and_are_capped(tmp_path: Path) -> None:
    handle = start_test_server(tmp_path / "nc.db")
    try:
        channel, stub = insecure_stub(handle.port)
        with channel:
            meta = {"optimizer": "o" * 1000, "dataset": "mnist5k", "notes": "n" * 1000}
            register(stub, "labelled", DATA, metadata=meta)
        values = scrape(handle.metrics_port)
        (info,) = [dict(labels) for name, labels in values if name == "ncserve_run_info"]
        assert "notes" not in info and info["dataset"] == "mnist5k"
        assert len(info["optimizer"]) == 64 and info["optimizer"].endswith("…")
        for _, labels in values:
            assert all(len(v) <= 64 for k, v in labels if k != "run_id")
    finally:
        handle.stop(0.5)


# -- the registry with a hand-moved clock ----------------------------------------------------


def make_aggregator(path: Path, clock: Clock, **limits) -> Aggregator:
    metrics = ServiceMetrics(series_grace_s=60.0, wall_clock=clock)
    store = Store(path)
    aggregator = Aggregator(store, metrics, AggregatorLimits(**limits), wall_clock=clock)
    metrics.attach(aggregator.runs, store, aggregator.open_step_count)
    return aggregator


def test_silent_runs_are_abandoned_and_come_back_when_they_speak(tmp_path: Path) -> None:
    clock = Clock()
    agg = make_aggregator(tmp_path / "nc.db", clock, abandon_after_s=600.0)
    try:
        agg.register_run("quiet", 3, 5, 1, {})
        agg.register_run("chatty", 3, 5, 1, {})
        clock.now += 400
        agg.record_scalars("chatty", 1, None, {"train_loss": 1.0})
        clock.now += 300
        agg.maintain()
        assert agg.run("quiet").state == "abandoned" and agg.run("chatty").state == "running"
        assert "600" in agg.run("quiet").state_reason
        assert {r.run_id for r in agg._metrics.exported_runs()} == {"quiet", "chatty"}
        clock.now += 61  # past the series grace: only the live run is exported
        assert [r.run_id for r in agg._metrics.exported_runs()] == ["chatty"]
        agg.heartbeat("quiet")
        assert agg.run("quiet").state == "running" and agg.run("quiet").ended_unix is None
        # A failed run whose trainer resumes (registers again) is running again.
        agg.finish_run("chatty", "failed", "killed")
        agg.register_run("chatty", 3, 5, 1, {})
        assert agg.run("chatty").state == "running"
        # Activity reaches the store: a restart sees it.
        agg.maintain()
    finally:
        agg._store.close()
    store = Store(tmp_path / "nc.db")
    try:
        stored = {r.run_id: r for r in store.runs()}
        assert stored["quiet"].state == "running"
        assert stored["quiet"].last_activity_unix == clock.now
    finally:
        store.close()


def test_retention_deletes_ended_runs_only(tmp_path: Path) -> None:
    clock = Clock()
    agg = make_aggregator(tmp_path / "nc.db", clock, retention_s=3600.0, abandon_after_s=1e6)
    try:
        for run_id in ("old", "recent", "live"):
            agg.register_run(run_id, 3, 5, 1, {})
        agg.finish_run("old", "finished", "")
        clock.now += 3000
        agg.finish_run("recent", "failed", "oom")
        clock.now += 601
        agg.maintain()
        assert {r.run_id for r in agg.runs.all()} == {"recent", "live"}
    finally:
        agg._store.close()


def test_schema_2_runs_migrate_as_running_last_heard_at_their_newest_record(
    tmp_path: Path,
) -> None:
    path = tmp_path / "nc.db"
    conn = sqlite3.connect(path)
    for migration in MIGRATIONS[:2]:
        conn.executescript(migration.sql)
    conn.executescript(
        """
        INSERT INTO schema_migrations VALUES (1, 'v1', 0.0), (2, 'v2', 0.0);
        PRAGMA user_version = 2;
        INSERT INTO runs VALUES ('run', 3, 4, 1, '{}', 1.0);
        INSERT INTO runs VALUES ('idle', 3, 4, 1, '{}', 5.0);
        INSERT INTO measurements (run_id, step, status, metrics_json, finalized_unix)
            VALUES ('run', 1, 'complete', '{"nc0": 2.0}', 20.0);
        INSERT INTO scalars VALUES ('run', 2, 'train_loss', 0.5, NULL, 30.0);
        """
    )
    conn.close()
    store = Store(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        runs = {r.run_id: r for r in store.runs()}
        assert (runs["run"].state, runs["run"].last_activity_unix) == ("running", 30.0)
        assert (runs["idle"].state, runs["idle"].last_activity_unix) == ("running", 5.0)
        assert runs["run"].ended_unix is None
    finally:
        store.close()


def test_a_store_left_by_a_run_is_byte_identical_after_a_bad_finish(tmp_path: Path) -> None:
    db = tmp_path / "nc.db"
    handle = start_test_server(db)
    try:
        channel, stub = insecure_stub(handle.port)
        with channel:
            register(stub, "r", DATA)
            stub.FinishRun(pb.FinishRunRequest(run_id="r", state=pb.RUN_FAILED), timeout=5)
            digest = table_digest(db)
            for request in (
                pb.FinishRunRequest(run_id="r", state=pb.RUN_FINISHED),
                pb.FinishRunRequest(run_id="r", state=7),
                pb.FinishRunRequest(run_id="r", state=pb.RUN_FAILED, reason="x" * 5000),
                pb.FinishRunRequest(run_id="../../etc", state=pb.RUN_FAILED),
            ):
                assert code_of(lambda r=request: stub.FinishRun(r, timeout=5)) in (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.NOT_FOUND,
                )
            assert table_digest(db) == digest
    finally:
        handle.stop(0.5)


def test_client_finish_is_delivered_after_what_was_buffered(tmp_path: Path) -> None:
    handle = start_test_server(tmp_path / "nc.db")
    try:
        client = NCClient(f"127.0.0.1:{handle.port}", replay_in_background=False)
        try:
            client.register_run("ordered", 3, 5, 1, {"optimizer": "adamw"})
            client.record_scalars("ordered", 4, {"nc0": 1.5})
            client.finish_run("ordered", "failed", "Ctrl-C")
            assert client.flush(timeout_s=10).complete
            (run,) = client.list_runs(states=["failed"])
            assert (run["run_id"], run["state"], run["state_reason"]) == (
                "ordered", "failed", "Ctrl-C",
            )  # fmt: skip
            assert client.list_runs(states=["running"]) == []
            assert client.heartbeat("ordered")
            with pytest.raises(ValueError, match="state must be one of"):
                client.finish_run("ordered", "running")
        finally:
            client.close()
    finally:
        handle.stop(0.5)


def test_cli_lists_states_filters_and_deletes(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ncserve.cli import cli

    handle = start_test_server(tmp_path / "nc.db")
    target = ("--target", f"127.0.0.1:{handle.port}")
    try:
        channel, stub = insecure_stub(handle.port)
        with channel:
            register(stub, "alive", DATA, metadata={"optimizer": "adamw"})
            register(stub, "ended", DATA, metadata={"optimizer": "sgd"})
            run_step_sequentially(stub, "ended", 4, DATA)
            stub.FinishRun(pb.FinishRunRequest(run_id="ended", state=pb.RUN_FINISHED), timeout=5)
        runner = CliRunner()
        table = runner.invoke(cli, ["runs", *target])
        assert table.exit_code == 0, table.output
        header, *rows = table.output.splitlines()
        assert header.split()[:2] == ["run_id", "state"] and "last_activity" in header
        assert rows[1].split()[:3] == ["ended", "finished", "sgd"] and " ago" in rows[1]
        only = runner.invoke(cli, ["runs", "--state", "finished", "--format", "json", *target])
        (row,) = __import__("json").loads(only.output)
        assert (row["run_id"], row["first_step"], row["latest_step"]) == ("ended", 4, 4)
        none = runner.invoke(cli, ["runs", "--state", "failed", *target])
        assert none.output.strip() == "no runs in state failed"
        refused = runner.invoke(cli, ["delete", "ended", *target], input="n\n")
        assert refused.exit_code == 2 and "not deleted" in refused.output
        gone = runner.invoke(cli, ["delete", "ended", "--yes", *target])
        assert gone.exit_code == 0 and "1 measurements" in gone.output
        again = runner.invoke(cli, ["delete", "ended", "--yes", *target])
        assert again.exit_code == 2 and len(again.output.strip().splitlines()) == 1
        assert "no run with this id" in again.output
    finally:
        handle.stop(0.5)


def test_watch_waits_for_a_run_to_start_and_exits_when_it_ends(tmp_path: Path) -> None:
    import threading

    from click.testing import CliRunner

    from ncserve.cli import cli

    handle = start_test_server(tmp_path / "nc.db")
    result: dict = {}

    def watch() -> None:
        result["out"] = CliRunner().invoke(
            cli,
            ["watch", "late", "--target", handle.address, "--wait", "30", "--format", "json"],
        )

    try:
        watcher = threading.Thread(target=watch)
        watcher.start()
        channel, stub = insecure_stub(handle.port)
        with channel:
            time.sleep(1.5)  # the watch is waiting for the run to exist
            register(stub, "late", DATA)
            time.sleep(1.5)  # the watch stream is open now
            run_step_sequentially(stub, "late", 2, DATA)
            stub.FinishRun(pb.FinishRunRequest(run_id="late", state=pb.RUN_FINISHED,
                                               reason="done"), timeout=5)  # fmt: skip
        watcher.join(timeout=30)
        assert not watcher.is_alive(), "watch did not exit when the run finished"
        out = result["out"]
        assert out.exit_code == 0, out.output
        assert "waiting up to 30 s for run late to start" in out.output
        assert '"step": 2' in out.output and "run late finished: done" in out.output
        # A run that never starts: one line once --wait has passed.
        never = CliRunner().invoke(
            cli, ["watch", "never", "--target", handle.address, "--wait", "0.5"]
        )
        assert never.exit_code == 2 and "did not start within 0.5 s" in never.output
    finally:
        handle.stop(0.5)
