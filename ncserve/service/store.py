"""Durable state of the service: SQLite in WAL mode, versioned schema.

What is stored, and why it is enough to survive ``kill -9`` at any moment:

- ``runs``: every registered run with its metadata.
- ``measurements``: one row per (run, step) that is finalized or marked
  incomplete, never two (``UNIQUE``); ``incomplete_steps`` is a view of the latter.
- ``scalars``: the per-step scalar series of RecordScalars.
- ``shards``: one row per accepted (run, step, rank, round) with the digest of its
  payload, so a retry is recognised (and answered the same) even after a restart.
- ``open_steps`` + ``step_tensors``: the merged in-progress state of every open
  step (round-1 sums, W and b, round-2 sums, tallies). Accepted shards update
  them and add their ``shards`` rows in one transaction (shards that arrive
  together are committed together) before any of them is acknowledged, so after
  a crash the stored merge covers every acknowledged shard (and perhaps some
  whose acknowledgement was lost, which a retry then recognises); the others are
  retried by their clients.

Durability: WAL with ``synchronous=NORMAL``, so a commit survives the process
being killed (it is in the WAL, which the OS holds); a power loss may lose the
last commits but never corrupts the file.

Write errors map to service errors: a full disk is RESOURCE_EXHAUSTED, a
read-only or failing database UNAVAILABLE. Reads use their own connections, so
queries keep working when writes cannot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ncserve.service.errors import ResourceExhausted, ServiceError, Unavailable
from ncserve.service.migrations import MIGRATIONS, SCHEMA_VERSION
from ncserve.service.records import (
    MeasurementRecord,
    OpenStepRecord,
    RunCounts,
    RunRecord,
    ShardRecord,
)
from ncserve.service.store_reads import StoreReads

log = logging.getLogger(__name__)

_CHECKPOINT_INTERVAL_S = 0.5
_AUTOCHECKPOINT_PAGES = 4096  # 256 MiB of 64 KiB pages
_WAL_SIZE_LIMIT = 64 << 20


class StoreError(Exception):
    """The database cannot be opened or migrated (a startup problem, not a request's)."""


def _map_write_error(exc: sqlite3.Error, what: str) -> ServiceError:
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(exc)
    if primary == sqlite3.SQLITE_FULL or "full" in text:
        return ResourceExhausted(f"store is full, could not {what}: {text}")
    if primary == sqlite3.SQLITE_READONLY or "readonly" in text:
        return Unavailable(f"store is read-only, could not {what}: {text}")
    return Unavailable(f"store could not {what}: {text}")


def _json_dumps(value: Any) -> str:
    # NaN is a legitimate metric value (e.g. an undefined ratio); Python's JSON keeps it.
    return json.dumps(value, sort_keys=True, allow_nan=True)


class Store(StoreReads):
    """SQLite store: one writer connection behind a lock, pooled reader connections."""

    def __init__(self, path: Path | str, *, read_only: bool = False) -> None:
        """Open (and create or migrate) the database; ``read_only`` opens an existing one
        for queries only, safely beside a server writing it (WAL readers see committed
        transactions; nothing is created, migrated or written)."""
        self.path = Path(path)
        self.read_only = read_only
        self._write_lock = threading.Lock()
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        self._checkpoint_stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if read_only:
            self._closed = True  # no writes
            self._open_read_only()
            return
        try:
            self._writer = self._connect()
            # Shard state is written as MB-sized blobs: large pages make that several times
            # cheaper. Only takes effect on a new file (before WAL mode is set).
            self._writer.execute("PRAGMA page_size = 65536")
            self._writer.execute("PRAGMA journal_mode = WAL")
            # Checkpoints (which fsync) run in a background thread, off the request path;
            # the automatic one remains as a bound on the WAL should that thread fall behind.
            self._writer.execute(f"PRAGMA wal_autocheckpoint = {_AUTOCHECKPOINT_PAGES}")
            self._writer.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
            self._migrate()
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"cannot open database {self.path}: {exc}") from exc
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="ncserve-store-checkpoint", daemon=True
        )
        self._checkpointer.start()

    # -- connections -------------------------------------------------------------------------

    def _open_read_only(self) -> None:
        if not self.path.is_file():
            raise StoreError(f"no database at {self.path}")
        try:
            with self._reader() as conn:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"cannot read database {self.path}: {exc}") from exc
        if version != SCHEMA_VERSION:
            self.close()
            newer = version > SCHEMA_VERSION
            raise StoreError(
                f"database {self.path} has schema version {version}; this ncserve reads "
                f"{SCHEMA_VERSION}: "
                + (
                    "upgrade ncserve"
                    if newer
                    else "open it once with `ncserve serve` to upgrade it"
                )
            )

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            uri = f"file:{self.path.resolve()}?mode=ro"
            conn = sqlite3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30
            )
        else:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30
            )
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        with self._connections_lock:
            self._all_connections.append(conn)
        return conn

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = self._connect()
        try:
            yield conn
        finally:
            self._readers.put(conn)

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; any SQLite failure rolls it back and becomes a ServiceError."""
        with self._write_lock:
            if self._closed:
                state = "read-only" if self.read_only else "closed"
                raise Unavailable(f"store is {state}, could not {what}")
            conn = self._writer
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise _map_write_error(exc, what) from exc
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise

    def _migrate(self) -> None:
        conn = self._writer
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"database {self.path} has schema version {current}, newer than this ncserve "
                f"understands ({SCHEMA_VERSION}); upgrade ncserve"
            )
        for migration in MIGRATIONS:
            if migration.version <= current:
                continue
            # executescript runs the whole migration, its bookkeeping and the version bump
            # as one transaction: a crash mid-migration leaves the previous version intact.
            conn.executescript(
                "BEGIN IMMEDIATE;\n"
                + migration.sql
                + "\nINSERT INTO schema_migrations (version, description, applied_unix) "
                + f"VALUES ({migration.version}, '{migration.description}', {time.time()!r});\n"
                + f"PRAGMA user_version = {migration.version};\nCOMMIT;"
            )

    def _checkpoint_loop(self) -> None:
        conn = self._connect()
        while not self._checkpoint_stop.wait(_CHECKPOINT_INTERVAL_S):
            try:
                # PASSIVE never blocks writers or readers; it copies what it can.
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                log.warning("background checkpoint failed: %s", exc)

    def close(self) -> None:
        self._checkpoint_stop.set()
        if self._checkpointer is not None and self._checkpointer is not threading.current_thread():
            self._checkpointer.join()
        with self._write_lock:
            self._closed = True
            with self._connections_lock:
                for conn in self._all_connections:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
                self._all_connections.clear()

    def schema_version(self) -> int:
        with self._reader() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def integrity_check(self) -> str:
        with self._reader() as conn:
            return str(conn.execute("PRAGMA integrity_check").fetchone()[0])

    # -- runs --------------------------------------------------------------------------------

    def insert_run(self, run: RunRecord) -> None:
        with self._transaction(f"register run {run.run_id!r}") as conn:
            conn.execute(
                "INSERT INTO runs (run_id, num_classes, feature_dim, world_size, metadata_json,"
                " created_unix, state, state_reason, ended_unix, last_activity_unix)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run.run_id,
                    run.num_classes,
                    run.feature_dim,
                    run.world_size,
                    _json_dumps(run.metadata),
                    run.created_unix,
                    run.state,
                    run.state_reason,
                    run.ended_unix,
                    run.last_activity_unix,
                ),
            )

    def set_run_state(self, run: RunRecord) -> None:
        """Store a run's state, reason, end time and last activity."""
        with self._transaction(f"set the state of run {run.run_id!r} to {run.state}") as conn:
            conn.execute(
                "UPDATE runs SET state = ?, state_reason = ?, ended_unix = ?,"
                " last_activity_unix = ? WHERE run_id = ?",
                (run.state, run.state_reason, run.ended_unix, run.last_activity_unix, run.run_id),
            )

    def touch_run(self, run_id: str, when: float) -> None:
        """Store when a run was last heard of (a heartbeat)."""
        with self._transaction(f"record the activity of run {run_id!r}") as conn:
            self._touch(conn, run_id, when)

    @staticmethod
    def _touch(conn: sqlite3.Connection, run_id: str, when: float) -> None:
        """Inside a write transaction: the run was heard from at ``when``."""
        conn.execute(
            "UPDATE runs SET last_activity_unix = MAX(last_activity_unix, ?) WHERE run_id = ?",
            (when, run_id),
        )

    def delete_run(self, run_id: str) -> tuple[int, int]:
        """Remove a run and everything stored of it; (measurements, scalar steps) removed."""
        with self._transaction(f"delete run {run_id!r}") as conn:
            measurements = conn.execute(
                "SELECT COUNT(*) FROM measurements WHERE run_id = ?", (run_id,)
            ).fetchone()[0]
            scalar_steps = conn.execute(
                "SELECT COUNT(DISTINCT step) FROM scalars WHERE run_id = ?", (run_id,)
            ).fetchone()[0]
            for table in ("step_tensors", "open_steps", "shards", "scalars", "measurements"):
                conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
        return int(measurements), int(scalar_steps)

    def update_run_metadata(self, run_id: str, metadata: Mapping[str, str]) -> None:
        with self._transaction(f"update metadata of run {run_id!r}") as conn:
            conn.execute(
                "UPDATE runs SET metadata_json = ? WHERE run_id = ?",
                (_json_dumps(dict(metadata)), run_id),
            )

    def runs(self) -> list[RunRecord]:
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT run_id, num_classes, feature_dim, world_size, metadata_json, created_unix,"
                " state, state_reason, ended_unix, last_activity_unix"
                " FROM runs ORDER BY created_unix, run_id"
            ).fetchall()
        return [
            RunRecord(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7], r[8], r[9])
            for r in rows
        ]

    def run_counts(self, run_ids: Sequence[str]) -> dict[str, RunCounts]:
        """Measurement counts and first/latest complete step of each run (one query)."""
        counts = {run_id: RunCounts(0, 0, None) for run_id in run_ids}
        if not counts:
            return counts
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT run_id, SUM(status = 'complete'), SUM(status = 'incomplete'),"
                " MAX(CASE WHEN status = 'complete' THEN step END),"
                " MIN(CASE WHEN status = 'complete' THEN step END)"
                f" FROM measurements WHERE run_id IN ({', '.join('?' * len(counts))})"
                " GROUP BY run_id",
                list(counts),
            ).fetchall()
        for run_id, complete, incomplete, latest, first in rows:
            counts[run_id] = RunCounts(int(complete or 0), int(incomplete or 0), latest, first)
        return counts

    # -- shards and open steps ---------------------------------------------------------------

    def accept_shards(
        self,
        shards: Sequence[ShardRecord],
        epoch: int | None,
        state: Mapping[str, Any],
        tensors: Mapping[str, np.ndarray],
        opened_unix: float,
    ) -> None:
        """Record accepted shards of one step and its new merged state, atomically."""
        shard = shards[0]
        ranks = ", ".join(str(s.rank) for s in shards)
        what = f"store round-{shard.round} shards of ranks {ranks} for step {shard.step}"
        with self._transaction(what) as conn:
            conn.execute(
                "INSERT INTO open_steps (run_id, step, epoch, state_json, opened_unix)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (run_id, step) DO UPDATE SET"
                " epoch = excluded.epoch, state_json = excluded.state_json",
                (shard.run_id, shard.step, epoch, _json_dumps(dict(state)), opened_unix),
            )
            for name, array in tensors.items():
                self._write_tensor(conn, shard.run_id, shard.step, name, array)
            self._insert_shards(conn, shards)
            self._touch(conn, shard.run_id, time.time())

    @staticmethod
    def _write_tensor(
        conn: sqlite3.Connection, run_id: str, step: int, name: str, array: np.ndarray
    ) -> None:
        """Store one tensor of a step's state: overwritten in place when its stored shape
        is the same (each commit of a step rewrites the same MB-sized merged sums; in place
        that costs a third of replacing the row)."""
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8).data
        dtype, shape = array.dtype.str, json.dumps(list(array.shape))
        row = conn.execute(
            "SELECT rowid, dtype, shape_json FROM step_tensors"
            " WHERE run_id = ? AND step = ? AND name = ?",
            (run_id, step, name),
        ).fetchone()
        in_place = row is not None and (row[1], row[2]) == (dtype, shape) and len(data) > 0
        if in_place and hasattr(conn, "blobopen"):  # Python >= 3.11
            with conn.blobopen("step_tensors", "data", row[0]) as blob:
                blob.write(data)
            return
        conn.execute(
            "INSERT OR REPLACE INTO step_tensors (run_id, step, name, dtype, shape_json, data)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, step, name, dtype, shape, data),
        )

    @staticmethod
    def _insert_shards(conn: sqlite3.Connection, shards: Sequence[ShardRecord]) -> None:
        now = time.time()
        conn.executemany(
            "INSERT INTO shards (run_id, step, rank, round, payload_sha256, payload_bytes,"
            " num_samples, received_unix) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    s.run_id,
                    s.step,
                    s.rank,
                    s.round,
                    s.payload_sha256,
                    s.payload_bytes,
                    s.num_samples,
                    now,
                )
                for s in shards
            ],
        )

    @staticmethod
    def _close_step(conn: sqlite3.Connection, run_id: str, step: int) -> None:
        conn.execute("DELETE FROM step_tensors WHERE run_id = ? AND step = ?", (run_id, step))
        conn.execute("DELETE FROM open_steps WHERE run_id = ? AND step = ?", (run_id, step))

    def finalize_step(
        self,
        run_id: str,
        step: int,
        epoch: int | None,
        metrics: Mapping[str, float],
        scalars: Mapping[str, float],
        last_shards: Sequence[ShardRecord],
    ) -> MeasurementRecord:
        """Store the measurement with the shards that completed it; drop the open state."""
        now = time.time()
        with self._transaction(f"finalize step {step} of run {run_id!r}") as conn:
            cursor = conn.execute(
                "INSERT INTO measurements (run_id, step, epoch, status, metrics_json,"
                " scalars_json, finalized_unix) VALUES (?, ?, ?, 'complete', ?, ?, ?)",
                (run_id, step, epoch, _json_dumps(dict(metrics)), _json_dumps(dict(scalars)), now),
            )
            row_id = int(cursor.lastrowid or 0)
            self._insert_shards(conn, last_shards)
            self._close_step(conn, run_id, step)
            self._touch(conn, run_id, now)
        return MeasurementRecord(
            row_id, run_id, step, epoch, "complete", dict(metrics), dict(scalars), "", now
        )

    def mark_incomplete(
        self, run_id: str, step: int, epoch: int | None, reason: str
    ) -> MeasurementRecord:
        now = time.time()
        with self._transaction(f"mark step {step} of run {run_id!r} incomplete") as conn:
            cursor = conn.execute(
                "INSERT INTO measurements (run_id, step, epoch, status, reason, finalized_unix)"
                " VALUES (?, ?, ?, 'incomplete', ?, ?)",
                (run_id, step, epoch, reason, now),
            )
            row_id = int(cursor.lastrowid or 0)
            self._close_step(conn, run_id, step)
        return MeasurementRecord(row_id, run_id, step, epoch, "incomplete", None, {}, reason, now)

    def shard(self, run_id: str, step: int, rank: int, round_: int) -> ShardRecord | None:
        with self._reader() as conn:
            row = conn.execute(
                "SELECT payload_sha256, payload_bytes, num_samples FROM shards"
                " WHERE run_id = ? AND step = ? AND rank = ? AND round = ?",
                (run_id, step, rank, round_),
            ).fetchone()
        if row is None:
            return None
        return ShardRecord(run_id, step, rank, round_, row[0], row[1], row[2])

    def open_step_counts(self) -> dict[str, int]:
        """Open steps per run."""
        with self._reader() as conn:
            rows = conn.execute("SELECT run_id, COUNT(*) FROM open_steps GROUP BY run_id")
            return {run_id: int(count) for run_id, count in rows}

    def open_steps(self) -> list[OpenStepRecord]:
        """Every open step with its merged tensors and accepted shards (for restart)."""
        with self._reader() as conn:
            steps = {
                (r[0], r[1]): OpenStepRecord(r[0], r[1], r[2], json.loads(r[3]))
                for r in conn.execute(
                    "SELECT run_id, step, epoch, state_json FROM open_steps ORDER BY run_id, step"
                )
            }
            for run_id, step, name, dtype, shape_json, data in conn.execute(
                "SELECT run_id, step, name, dtype, shape_json, data FROM step_tensors"
            ):
                array = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(json.loads(shape_json))
                steps[(run_id, step)].tensors[name] = array.copy()
            for row in conn.execute(
                "SELECT s.run_id, s.step, s.rank, s.round, s.payload_sha256, s.payload_bytes,"
                " s.num_samples FROM shards s JOIN open_steps o"
                " ON s.run_id = o.run_id AND s.step = o.step ORDER BY s.received_unix"
            ):
                steps[(row[0], row[1])].shards.append(ShardRecord(*row))
        return list(steps.values())

    # -- scalars -----------------------------------------------------------------------------

    def record_scalars(
        self, run_id: str, step: int, epoch: int | None, values: Mapping[str, float]
    ) -> None:
        now = time.time()
        with self._transaction(f"record scalars of step {step} of run {run_id!r}") as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO scalars (run_id, step, key, value, epoch, recorded_unix)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(run_id, step, key, float(v), epoch, now) for key, v in values.items()],
            )
            self._touch(conn, run_id, now)
