"""The SQLite store: versioned schema, WAL, migrations applied once, newer schemas refused."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ncserve.service.errors import ResourceExhausted, ServiceError
from ncserve.service.records import RunRecord, ShardRecord
from ncserve.service.store import MIGRATIONS, SCHEMA_VERSION, Store, StoreError


def test_new_database_is_wal_with_a_recorded_schema(tmp_path: Path) -> None:
    store = Store(tmp_path / "nc.db")
    try:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.integrity_check() == "ok"
    finally:
        store.close()
    conn = sqlite3.connect(tmp_path / "nc.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = conn.execute("SELECT version FROM schema_migrations").fetchall()
        assert rows == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    finally:
        conn.close()


def test_reopening_keeps_data_and_runs_no_migration_twice(tmp_path: Path) -> None:
    store = Store(tmp_path / "nc.db")
    store.insert_run(RunRecord("run", 3, 4, 2, {"optimizer": "sgd"}, 1.0))
    store.close()
    store = Store(tmp_path / "nc.db")
    try:
        assert [r.run_id for r in store.runs()] == ["run"]
        assert store.runs()[0].metadata == {"optimizer": "sgd"}
    finally:
        store.close()
    conn = sqlite3.connect(tmp_path / "nc.db")
    try:
        assert conn.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(
            MIGRATIONS
        )
    finally:
        conn.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "nc.db").close()
    conn = sqlite3.connect(tmp_path / "nc.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this ncserve understands"):
        Store(tmp_path / "nc.db")


def test_schema_1_open_steps_are_closed_as_incomplete_by_the_upgrade(tmp_path: Path) -> None:
    """Schema 1 kept per-class sums of squares in round 1; a step open across the upgrade to
    schema 2 cannot be finished, so it is recorded as incomplete and its state dropped; a
    finished measurement and the shards rows stay as they were."""
    path = tmp_path / "nc.db"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0].sql)
    conn.executescript(
        """
        INSERT INTO schema_migrations VALUES (1, 'v1', 0.0);
        PRAGMA user_version = 1;
        INSERT INTO runs VALUES ('run', 3, 4, 2, '{}', 1.0);
        INSERT INTO measurements (run_id, step, epoch, status, metrics_json, finalized_unix)
            VALUES ('run', 1, 0, 'complete', '{"nc0": 2.0}', 2.0);
        INSERT INTO shards VALUES ('run', 2, 0, 1, 'ab', 96, 10, 3.0);
        INSERT INTO open_steps VALUES ('run', 2, 0, '{}', 3.0);
        INSERT INTO step_tensors VALUES ('run', 2, 'r1.sq_dev', '<f8', '[3]', zeroblob(24));
        """
    )
    conn.close()
    store = Store(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.open_steps() == []
        old, closed = store.measurements("run", include_incomplete=True)
        assert (old.step, old.status, old.metrics) == (1, "complete", {"nc0": 2.0})
        assert (closed.step, closed.status, closed.epoch) == (2, "incomplete", 0)
        assert "upgraded to store schema 2" in closed.reason
        assert store.shard("run", 2, 0, 1) is not None
        assert store.integrity_check() == "ok"
    finally:
        store.close()


def test_open_step_state_round_trips_exactly(tmp_path: Path) -> None:
    store = Store(tmp_path / "nc.db")
    try:
        store.insert_run(RunRecord("run", 3, 4, 2, {}, 1.0))
        sums = np.random.default_rng(0).normal(size=(3, 4))
        shard = ShardRecord("run", 7, 1, 1, "ab" * 32, 96, 10)
        store.accept_shards(
            [shard], 2, {"tally": None}, {"r1.sums": sums, "r1.counts": np.arange(3)}, 5.0
        )
        (record,) = store.open_steps()
        assert (record.run_id, record.step, record.epoch) == ("run", 7, 2)
        assert record.tensors["r1.sums"].tobytes() == sums.tobytes()
        assert record.tensors["r1.counts"].dtype == np.int64
        assert record.shards == [shard]
        assert store.shard("run", 7, 1, 1) == shard
        # The same shard twice violates the primary key: refused, state unchanged.
        with pytest.raises(ServiceError, match="UNIQUE"):
            store.accept_shards([shard], 2, {}, {"r1.sums": sums * 2}, 5.0)
        assert store.open_steps()[0].tensors["r1.sums"].tobytes() == sums.tobytes()
        finished = store.finalize_step("run", 7, 2, {"nc0": 1.0}, {}, [replace(shard, round=2)])
        assert finished.status == "complete" and store.open_steps() == []
    finally:
        store.close()


def test_full_database_is_resource_exhausted(tmp_path: Path) -> None:
    store = Store(tmp_path / "nc.db")
    try:
        store.insert_run(RunRecord("run", 3, 4, 2, {}, 1.0))
        pages = store._writer.execute("PRAGMA page_count").fetchone()[0]
        store._writer.execute(f"PRAGMA max_page_count = {pages}")
        big = np.zeros((3, 100_000))
        with pytest.raises(ResourceExhausted, match="full"):
            store.accept_shards([ShardRecord("run", 1, 0, 1, "x", 1, 1)], None, {}, {"b": big}, 0)
        assert store.open_steps() == [] and store.shard("run", 1, 0, 1) is None
    finally:
        store.close()
