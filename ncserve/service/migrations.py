"""The store's schema, as numbered migrations applied once each, in order (store.py runs
them in one transaction per version; a database newer than SCHEMA_VERSION is refused)."""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 3


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "runs, measurements, scalars, shards, open-step state",
        """
        CREATE TABLE schema_migrations (
            version INTEGER PRIMARY KEY,
            description TEXT NOT NULL,
            applied_unix REAL NOT NULL
        );
        CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            num_classes INTEGER NOT NULL CHECK (num_classes >= 2),
            feature_dim INTEGER NOT NULL CHECK (feature_dim >= 1),
            world_size INTEGER NOT NULL CHECK (world_size >= 1),
            metadata_json TEXT NOT NULL,
            created_unix REAL NOT NULL
        );
        CREATE TABLE measurements (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            step INTEGER NOT NULL,
            epoch INTEGER,
            status TEXT NOT NULL CHECK (status IN ('complete', 'incomplete')),
            metrics_json TEXT,
            scalars_json TEXT NOT NULL DEFAULT '{}',
            reason TEXT NOT NULL DEFAULT '',
            finalized_unix REAL NOT NULL,
            UNIQUE (run_id, step)
        );
        CREATE VIEW incomplete_steps AS
            SELECT run_id, step, epoch, reason, finalized_unix
            FROM measurements WHERE status = 'incomplete';
        CREATE TABLE scalars (
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            step INTEGER NOT NULL,
            key TEXT NOT NULL,
            value REAL NOT NULL,
            epoch INTEGER,
            recorded_unix REAL NOT NULL,
            PRIMARY KEY (run_id, step, key)
        );
        CREATE TABLE shards (
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            step INTEGER NOT NULL,
            rank INTEGER NOT NULL,
            round INTEGER NOT NULL CHECK (round IN (1, 2)),
            payload_sha256 TEXT NOT NULL,
            payload_bytes INTEGER NOT NULL,
            num_samples INTEGER NOT NULL,
            received_unix REAL NOT NULL,
            PRIMARY KEY (run_id, step, rank, round)
        );
        CREATE TABLE open_steps (
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            step INTEGER NOT NULL,
            epoch INTEGER,
            state_json TEXT NOT NULL,
            opened_unix REAL NOT NULL,
            PRIMARY KEY (run_id, step)
        );
        CREATE TABLE step_tensors (
            run_id TEXT NOT NULL,
            step INTEGER NOT NULL,
            name TEXT NOT NULL,
            dtype TEXT NOT NULL,
            shape_json TEXT NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (run_id, step, name),
            FOREIGN KEY (run_id, step) REFERENCES open_steps(run_id, step)
        );
        """,
    ),
    Migration(
        2,
        "round statistics v2: per-class sums of squares in round 2; schema-1 open steps closed",
        # Schema 1 kept each class's sum of squares in the round-1 state (r1.sq_dev) and none
        # in round 2, so a step open across the upgrade can be finished by neither old nor
        # new clients: it is closed as incomplete (visible, never half-counted). Its shards
        # rows stay, so a retry is still recognised.
        """
        INSERT INTO measurements (run_id, step, epoch, status, reason, finalized_unix)
            SELECT run_id, step, epoch, 'incomplete',
                'open when the service was upgraded to store schema 2 (per-class sums of '
                || 'squares moved from round 1 to round 2); its round state cannot be finished',
                (julianday('now') - 2440587.5) * 86400.0
            FROM open_steps;
        DELETE FROM step_tensors;
        DELETE FROM open_steps;
        """,
    ),
    Migration(
        3,
        "run lifecycle: state, reason, end time and last activity of every run",
        # Runs stored before lifecycles existed are running, last heard of at their newest
        # record; the abandon timeout then ends the ones that are long gone.
        """
        ALTER TABLE runs ADD COLUMN state TEXT NOT NULL DEFAULT 'running'
            CHECK (state IN ('running', 'finished', 'failed', 'abandoned'));
        ALTER TABLE runs ADD COLUMN state_reason TEXT NOT NULL DEFAULT '';
        ALTER TABLE runs ADD COLUMN ended_unix REAL;
        ALTER TABLE runs ADD COLUMN last_activity_unix REAL NOT NULL DEFAULT 0;
        UPDATE runs SET last_activity_unix = MAX(
            created_unix,
            COALESCE((SELECT MAX(finalized_unix) FROM measurements m
                      WHERE m.run_id = runs.run_id), 0),
            COALESCE((SELECT MAX(recorded_unix) FROM scalars s WHERE s.run_id = runs.run_id), 0),
            COALESCE((SELECT MAX(received_unix) FROM shards h WHERE h.run_id = runs.run_id), 0));
        -- The exporter reads each run's latest value of a few scalar keys at every scrape.
        CREATE INDEX scalars_latest ON scalars (run_id, key, step);
        """,
    ),
)
assert MIGRATIONS[-1].version == SCHEMA_VERSION
