"""Prometheus exporter of the service, on its own registry (never the process-global one).

Names are the contract of docs/CONTRACTS.md (deploy/ rules and dashboards use them).

Per-run series are built at scrape time by a custom collector from the source of truth: the
run registry (state, metadata) and the store (latest measurement, latest scalars, step
counts). Nothing per run is kept in step with it, so a run's series follow its life: they
say whether it is live (``ncserve_run_live``), and once it ended they stay for a grace
period (so dashboards show the last values) and then leave /metrics, and a restart does
not bring them back. Reads are cached until something changes (a measurement, scalars, a
state), so a scrape of an idle service touches no database.

Labels stay low-cardinality: run id and optimizer on per-run series, never step, rank or
class; run metadata becomes labels only from a short allow-list, each value capped. No
``_created`` series: every counter is built here.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ncserve.protocol import RUN_STATES
from ncserve.service.records import MeasurementRecord, RunCounts, RunRecord

if TYPE_CHECKING:
    from ncserve.service.runs import RunRegistry
    from ncserve.service.store import Store

REJECTION_REASONS = (
    "invalid_argument",
    "not_found",
    "failed_precondition",
    "unauthenticated",
    "resource_exhausted",
    "truncated",
)

# Gauge name suffix -> (help, key in the finalized metrics).
_NC_GAUGES: dict[str, tuple[str, str]] = {
    "nc0": ("NC0: norm of the sum of the classifier rows, ||W^T 1_K||_2", "nc0"),
    "nc0_normalized": ("NC0 divided by ||W||_F", "nc0_normalized"),
    "nc1": ("NC1: Tr(Sigma_W Sigma_B^+) / K", "nc1"),
    "nc1_trace_ratio": ("Tr(Sigma_W) / Tr(Sigma_B)", "nc1_trace_ratio"),
    "cdnv": ("Class-distance normalized variance", "cdnv"),
    "nc2_norm": ("Equinorm of the centered class means (std / mean of norms)", "nc2_norm"),
    "nc2_angle": ("Equiangularity of the centered class means", "nc2_angle"),
    "nc2": ("Distance of the class means' normalized Gram to the simplex ETF", "nc2"),
    "nc2w_norm": ("Equinorm of the classifier rows", "nc2w_norm"),
    "nc2w_angle": ("Equiangularity of the classifier rows", "nc2w_angle"),
    "nc2w": ("Distance of the classifier's normalized Gram to the simplex ETF", "nc2w"),
    "nc2m": ("Distance of the normalized W M to the simplex ETF", "nc2m"),
    "nc3": ("NC3: distance between normalized W and normalized M^T (self-duality)", "nc3"),
    "nc4_ratio": ("NC4: agreement of the classifier with the nearest class center", "nc4"),
    "accuracy_ratio": (
        "Classifier accuracy on the measurement split (a balanced subset of the training "
        "set) at the latest measurement",
        "accuracy",
    ),
    "holdout_accuracy_ratio": ("Classifier accuracy on the held-out split", "holdout_accuracy"),
}

# RecordScalars keys that also move a per-run gauge when their step is newer than the
# latest measurement's.
_SCALAR_GAUGES = {
    "nc0": "nc0",
    "nc0_normalized": "nc0_normalized",
    "train_loss": "train_loss",
    "train_accuracy": "train_accuracy_ratio",
    "train_acc": "train_accuracy_ratio",
}

_OTHER_RUN_GAUGES: dict[str, str] = {
    "train_accuracy_ratio": "Training accuracy at the latest step (reported by the trainer)",
    "train_loss": "Training loss at the latest step",
    "latest_step": "Step of the latest finalized measurement",
    "latest_epoch": "Epoch of the latest finalized measurement",
}

# Metadata keys that become labels of ncserve_run_info, and the longest label value.
RUN_INFO_KEYS = ("optimizer", "model", "dataset", "engine", "lr", "weight_decay", "momentum")
MAX_LABEL_CHARS = 64

_FINALIZE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

DEFAULT_SERIES_GRACE_S = 600.0


def label_value(value: str) -> str:
    """A metadata value as a label: at most MAX_LABEL_CHARS characters."""
    return value if len(value) <= MAX_LABEL_CHARS else value[: MAX_LABEL_CHARS - 1] + "…"


@dataclass(frozen=True)
class _RunSnapshot:
    run: RunRecord
    latest: MeasurementRecord | None
    scalars: Mapping[str, tuple[int, float]]
    counts: RunCounts


# What a scrape reads from the store: latest measurements, latest scalars, step counts.
_StoreReads = tuple[
    dict[str, MeasurementRecord], dict[str, dict[str, tuple[int, float]]], dict[str, RunCounts]
]


class _ServiceCounters:
    """The service-level counters and the finalize histogram (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received = {"1": 0, "2": 0}
        self.rejected = dict.fromkeys(REJECTION_REASONS, 0)
        self.received_bytes = 0
        self.finalize_buckets = [0] * (len(_FINALIZE_BUCKETS) + 1)
        self.finalize_sum = 0.0


class ServiceMetrics:
    """Every series the service exports. Service counters are updated by the servicer and
    the aggregator; per-run series are read from ``attach``-ed sources at scrape time."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        series_grace_s: float = DEFAULT_SERIES_GRACE_S,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.series_grace_s = series_grace_s
        self._wall_clock = wall_clock
        self._counters = _ServiceCounters()
        self._runs: RunRegistry | None = None
        self._store: Store | None = None
        self._open_steps: Callable[[], int] = lambda: 0
        self._cache_lock = threading.Lock()
        self._cache_key: tuple[int, tuple[str, ...]] | None = None
        self._cache: _StoreReads | None = None
        self.registry.register(_Collector(self))

    def attach(self, runs: RunRegistry, store: Store, open_steps: Callable[[], int]) -> None:
        """Read runs from ``runs`` and ``store``, and open steps from ``open_steps``."""
        self._runs, self._store, self._open_steps = runs, store, open_steps

    # -- updates -----------------------------------------------------------------------------

    def shard_received(self, round_: int, payload_bytes: int) -> None:
        with self._counters.lock:
            self._counters.received[str(round_)] += 1
            self._counters.received_bytes += payload_bytes

    def shard_rejected(self, reason: str) -> None:
        key = reason if reason in REJECTION_REASONS else "invalid_argument"
        with self._counters.lock:
            self._counters.rejected[key] += 1

    def observe_finalize(self, seconds: float) -> None:
        index = bisect.bisect_left(_FINALIZE_BUCKETS, seconds)
        with self._counters.lock:
            self._counters.finalize_buckets[index] += 1
            self._counters.finalize_sum += seconds

    # -- scrape ------------------------------------------------------------------------------

    def exported_runs(self) -> list[RunRecord]:
        """Live runs, and ended ones for ``series_grace_s`` after they ended."""
        if self._runs is None:
            return []
        now = self._wall_clock()
        return [
            r
            for r in self._runs.all()
            if r.live or (r.ended_unix is not None and now - r.ended_unix <= self.series_grace_s)
        ]

    def snapshots(self) -> list[_RunSnapshot]:
        runs = self.exported_runs()
        if self._runs is None or self._store is None or not runs:
            return []
        ids = [r.run_id for r in runs]
        key = (self._runs.version, tuple(ids))
        with self._cache_lock:
            cached = self._cache if key == self._cache_key else None
        if cached is None:
            cached = (
                self._store.latest_measurements(ids),
                self._store.latest_scalars(ids, _SCALAR_GAUGES),
                self._store.run_counts(ids),
            )
            with self._cache_lock:
                self._cache_key, self._cache = key, cached
        latest, scalars, counts = cached
        return [
            _RunSnapshot(r, latest.get(r.run_id), scalars.get(r.run_id, {}), counts[r.run_id])
            for r in runs
        ]

    def collect(self) -> Iterator[Metric]:
        yield from self._service_families()
        yield from self._run_families(self.snapshots())

    def _service_families(self) -> Iterator[Metric]:
        c = self._counters
        with c.lock:
            received = dict(c.received)
            rejected = dict(c.rejected)
            received_bytes = c.received_bytes
            buckets = list(c.finalize_buckets)
            finalize_sum = c.finalize_sum
        family = CounterMetricFamily(
            "ncserve_shards_received", "Shards accepted, by round", labels=("round",)
        )
        for round_, count in received.items():
            family.add_metric((round_,), count)
        yield family
        family = CounterMetricFamily(
            "ncserve_shards_rejected", "Shard pushes rejected, by reason", labels=("reason",)
        )
        for reason, count in rejected.items():
            family.add_metric((reason,), count)
        yield family
        yield CounterMetricFamily(
            "ncserve_received_bytes", "Tensor bytes of accepted shards", value=received_bytes
        )
        cumulative, running = [], 0
        for bound, count in zip((*_FINALIZE_BUCKETS, math.inf), buckets, strict=True):
            running += count
            cumulative.append((_bucket_label(bound), running))
        yield HistogramMetricFamily(
            "ncserve_finalize_duration_seconds",
            "Time to finalize a step once its last shard is merged",
            buckets=cumulative,
            sum_value=finalize_sum,
        )
        yield GaugeMetricFamily(
            "ncserve_open_steps", "Steps with shards in flight", value=self._open_steps()
        )
        runs = GaugeMetricFamily(
            "ncserve_runs", "Runs held by the service, by state", labels=("state",)
        )
        counts = self._runs.count_by_state() if self._runs is not None else {}
        for state in RUN_STATES:
            runs.add_metric((state,), counts.get(state, 0))
        yield runs

    def _run_families(self, snapshots: list[_RunSnapshot]) -> Iterator[Metric]:
        labels = ("run_id", "optimizer")
        gauges: dict[str, GaugeMetricFamily] = {
            suffix: GaugeMetricFamily(
                f"ncserve_{suffix}", f"{text} (latest measurement)", labels=labels
            )
            for suffix, (text, _) in _NC_GAUGES.items()
        }
        for suffix, text in _OTHER_RUN_GAUGES.items():
            gauges[suffix] = GaugeMetricFamily(f"ncserve_{suffix}", text, labels=labels)
        live = GaugeMetricFamily(
            "ncserve_run_live",
            "1 while the run is running, 0 once it finished, failed or was abandoned",
            labels=labels,
        )
        state_family = GaugeMetricFamily(
            "ncserve_run_state", "1 for the run's current state, 0 for the others",
            labels=(*labels, "state"),
        )  # fmt: skip
        activity = GaugeMetricFamily(
            "ncserve_run_last_activity_timestamp_seconds",
            "When the service last heard from the run (Unix time)",
            labels=labels,
        )
        info = GaugeMetricFamily(
            "ncserve_run_info",
            "Run metadata (value is always 1); values capped at 64 characters",
            labels=("run_id", *RUN_INFO_KEYS, "world_size"),
        )
        finalized = CounterMetricFamily(
            "ncserve_steps_finalized", "Steps finalized", labels=("run_id",)
        )
        incomplete = CounterMetricFamily(
            "ncserve_steps_incomplete",
            "Steps marked incomplete (a shard missed the step deadline)",
            labels=("run_id",),
        )
        for snap in snapshots:
            run = snap.run
            meta = run.metadata
            key = (run.run_id, label_value(meta.get("optimizer") or "unknown"))
            for suffix, value in _run_values(snap).items():
                gauges[suffix].add_metric(key, value)
            live.add_metric(key, 1.0 if run.live else 0.0)
            for state in RUN_STATES:
                state_family.add_metric((*key, state), 1.0 if run.state == state else 0.0)
            activity.add_metric(key, run.last_activity_unix)
            lr = meta.get("lr", meta.get("learning_rate", ""))
            values = [lr if k == "lr" else meta.get(k, "") for k in RUN_INFO_KEYS]
            info.add_metric(
                (run.run_id, *(label_value(v) for v in values), str(run.world_size)), 1.0
            )
            finalized.add_metric((run.run_id,), snap.counts.num_measurements)
            incomplete.add_metric((run.run_id,), snap.counts.num_incomplete)
        yield from gauges.values()
        yield from (live, state_family, activity, info, finalized, incomplete)


def _run_values(snap: _RunSnapshot) -> dict[str, float]:
    """The per-run gauge values of one run: its latest measurement, with the scalar keys
    recorded at a newer step taking over."""
    values: dict[str, float] = {}
    steps: dict[str, int] = {}
    record = snap.latest
    if record is not None:
        metrics = record.metrics or {}
        for suffix, (_, key) in _NC_GAUGES.items():
            if key in metrics:
                values[suffix] = float(metrics[key])
                steps[suffix] = record.step
        scalars = record.scalars
        accuracy = scalars.get("train_accuracy", scalars.get("train_acc"))
        # Without reported training accuracy, the measurement split's accuracy is the
        # classifier's accuracy on (a subset of) the training set.
        values["train_accuracy_ratio"] = float(
            accuracy if accuracy is not None else metrics.get("accuracy", math.nan)
        )
        steps["train_accuracy_ratio"] = record.step
        if "train_loss" in scalars:
            values["train_loss"] = float(scalars["train_loss"])
            steps["train_loss"] = record.step
        values["latest_step"] = float(record.step)
        if record.epoch is not None:
            values["latest_epoch"] = float(record.epoch)
    for key, (step, value) in snap.scalars.items():
        suffix = _SCALAR_GAUGES[key]
        if step >= steps.get(suffix, -1):
            values[suffix], steps[suffix] = float(value), step
    return values


def _bucket_label(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


class _Collector(Collector):
    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.collect()


class MetricsServer:
    """``/metrics`` over HTTP/1.x on an asyncio event loop in one daemon thread.

    Idle or slow connections cost no thread: each has a few seconds to send its request
    line and headers (at most 16 KiB). At most ``max_connections`` are open at once: a new
    one closes the oldest that has not sent its request yet, so a flood of idle sockets
    cannot keep a scraper out (its request follows its connect at once). The exposition is
    built in a small thread pool, so a scrape never waits behind another client's socket.
    """

    REQUEST_TIMEOUT_S = 5.0
    MAX_REQUEST_BYTES = 16 << 10

    def __init__(
        self, registry: CollectorRegistry, host: str, port: int, max_connections: int = 256
    ) -> None:
        self._registry = registry
        self._max_connections = max_connections
        self._open = 0
        # Connections that have not sent their request yet, oldest first (loop thread only).
        self._waiting: dict[asyncio.StreamWriter, None] = {}
        self._loop = asyncio.new_event_loop()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ncserve-exporter")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host.strip("[]"), port))
        except OSError:
            self._socket.close()
            raise
        self._socket.listen(128)
        self._socket.setblocking(False)
        self.server_port = int(self._socket.getsockname()[1])
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="ncserve-exporter", daemon=True
        )
        self._thread.start()
        started.wait()

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, sock=self._socket, limit=self.MAX_REQUEST_BYTES)
        )
        started.set()
        self._loop.run_forever()
        self._server.close()
        self._loop.run_until_complete(self._server.wait_closed())
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self._max_connections:
            if not self._waiting:
                writer.close()
                return
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            oldest.transport.abort()
        self._open += 1
        self._waiting[writer] = None
        try:
            status, body, kind = await self._answer(reader, writer)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            await asyncio.wait_for(writer.drain(), self.REQUEST_TIMEOUT_S)
        except (
            TimeoutError,
            asyncio.TimeoutError,
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass  # a slow, silent or oversized client: drop it
        finally:
            self._open -= 1
            self._waiting.pop(writer, None)
            writer.close()

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[str, bytes, str]:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.REQUEST_TIMEOUT_S)
        finally:
            self._waiting.pop(writer, None)
        line = request.split(b"\r\n", 1)[0].decode("latin-1")
        method, _, rest = line.partition(" ")
        path = rest.partition(" ")[0].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"only GET\n", "text/plain"
        if path not in ("/metrics", "/"):
            return "404 Not Found", b"see /metrics\n", "text/plain"
        body = await self._loop.run_in_executor(self._pool, generate_latest, self._registry)
        return "200 OK", b"" if method == "HEAD" else body, CONTENT_TYPE_LATEST

    def shutdown(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=False)

    def server_close(self) -> None:
        self._socket.close()


def start_exporter(
    registry: CollectorRegistry, host: str, port: int
) -> tuple[MetricsServer, threading.Thread]:
    """Serve ``/metrics`` from ``registry`` on host:port (0 = OS-picked) in a daemon thread."""
    server = MetricsServer(registry, host, port)
    return server, server._thread
