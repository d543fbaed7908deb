"""Prometheus exporter of the service, on its own registry (never the process-global one).

Names are the contract of docs/CONTRACTS.md (deploy/ rules and dashboards use them).
Labels stay low-cardinality: run id and optimizer on per-run series, never step,
rank or class.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
from collections.abc import Mapping
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from ncserve.service.store import MeasurementRecord, RunRecord

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
    "holdout_accuracy_ratio": ("Classifier accuracy on the held-out split", "holdout_accuracy"),
}

# RecordScalars keys that also move a per-run gauge (when their step is the newest seen).
_SCALAR_GAUGES = {
    "nc0": "nc0",
    "nc0_normalized": "nc0_normalized",
    "train_loss": "train_loss",
    "train_accuracy": "train_accuracy_ratio",
    "train_acc": "train_accuracy_ratio",
}

_RUN_INFO_LABELS = (
    "run_id",
    "optimizer",
    "model",
    "dataset",
    "engine",
    "lr",
    "weight_decay",
    "momentum",
    "world_size",
)


class ServiceMetrics:
    """Every series the service exports, and the updates the aggregator makes to them."""

    SCALAR_GAUGE_KEYS = tuple(_SCALAR_GAUGES)

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        run_labels = ("run_id", "optimizer")
        self._per_run: dict[str, Gauge] = {
            suffix: Gauge(f"ncserve_{suffix}", f"{text} (latest measurement)", run_labels,
                          registry=reg)
            for suffix, (text, _) in _NC_GAUGES.items()
        }  # fmt: skip
        self._per_run["train_accuracy_ratio"] = Gauge(
            "ncserve_train_accuracy_ratio", "Training accuracy at the latest step", run_labels,
            registry=reg,
        )  # fmt: skip
        self._per_run["train_loss"] = Gauge(
            "ncserve_train_loss", "Training loss at the latest step", run_labels, registry=reg
        )
        self._per_run["latest_step"] = Gauge(
            "ncserve_latest_step", "Step of the latest finalized measurement", run_labels,
            registry=reg,
        )  # fmt: skip
        self._per_run["latest_epoch"] = Gauge(
            "ncserve_latest_epoch", "Epoch of the latest finalized measurement", run_labels,
            registry=reg,
        )  # fmt: skip
        self._run_info = Gauge(
            "ncserve_run_info", "Run metadata (value is always 1)", _RUN_INFO_LABELS, registry=reg
        )
        self._shards_received = Counter(
            "ncserve_shards_received", "Shards accepted, by round", ("round",), registry=reg
        )
        self._shards_rejected = Counter(
            "ncserve_shards_rejected", "Shard pushes rejected, by reason", ("reason",),
            registry=reg,
        )  # fmt: skip
        self._steps_finalized = Counter(
            "ncserve_steps_finalized", "Steps finalized", ("run_id",), registry=reg
        )
        self._steps_incomplete = Counter(
            "ncserve_steps_incomplete",
            "Steps marked incomplete (a shard missed the step deadline)",
            ("run_id",),
            registry=reg,
        )
        self._finalize_seconds = Histogram(
            "ncserve_finalize_duration_seconds",
            "Time to finalize a step once its last shard is merged",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=reg,
        )
        self._open_steps = Gauge("ncserve_open_steps", "Steps with shards in flight", registry=reg)
        self._runs = Gauge("ncserve_runs", "Runs held by the service", registry=reg)
        self._received_bytes = Counter(
            "ncserve_received_bytes", "Tensor bytes of accepted shards", registry=reg
        )
        for round_ in ("1", "2"):
            self._shards_received.labels(round=round_)
        for reason in REJECTION_REASONS:
            self._shards_rejected.labels(reason=reason)
        self._lock = threading.Lock()
        self._labels: dict[str, tuple[str, str]] = {}
        self._info_labels: dict[str, tuple[str, ...]] = {}
        # Per (run, gauge): the step its value comes from, so an older step never overwrites.
        self._gauge_steps: dict[tuple[str, str], int] = {}
        self._values: dict[tuple[str, str], float] = {}

    # -- runs --------------------------------------------------------------------------------

    def run_registered(self, run: RunRecord) -> None:
        meta = run.metadata
        labels = (run.run_id, meta.get("optimizer") or "unknown")
        info = (
            run.run_id,
            meta.get("optimizer", ""),
            meta.get("model", ""),
            meta.get("dataset", ""),
            meta.get("engine", ""),
            meta.get("lr", meta.get("learning_rate", "")),
            meta.get("weight_decay", ""),
            meta.get("momentum", ""),
            str(run.world_size),
        )
        with self._lock:
            old = self._labels.get(run.run_id)
            if old is not None and old != labels:
                # The optimizer became known later: move the run's series to the new labels.
                for suffix, gauge in self._per_run.items():
                    _remove(gauge, old)
                    value = self._values.get((run.run_id, suffix))
                    if value is not None:
                        gauge.labels(*labels).set(value)
            self._labels[run.run_id] = labels
            old_info = self._info_labels.get(run.run_id)
            if old_info is not None and old_info != info:
                _remove(self._run_info, old_info)
            self._info_labels[run.run_id] = info
            self._run_info.labels(*info).set(1)
            self._steps_finalized.labels(run_id=run.run_id)
            self._steps_incomplete.labels(run_id=run.run_id)

    def set_runs(self, count: int) -> None:
        self._runs.set(count)

    def set_open_steps(self, count: int) -> None:
        self._open_steps.set(count)

    # -- shards ------------------------------------------------------------------------------

    def shard_received(self, round_: int, payload_bytes: int) -> None:
        self._shards_received.labels(round=str(round_)).inc()
        self._received_bytes.inc(payload_bytes)

    def shard_rejected(self, reason: str) -> None:
        self._shards_rejected.labels(
            reason=reason if reason in REJECTION_REASONS else "invalid_argument"
        ).inc()

    def observe_finalize(self, seconds: float) -> None:
        self._finalize_seconds.observe(seconds)

    # -- measurements ------------------------------------------------------------------------

    def measurement_finalized(self, run: RunRecord, record: MeasurementRecord) -> None:
        self._steps_finalized.labels(run_id=run.run_id).inc()
        self._set_measurement(run, record)

    def measurement_restored(self, run: RunRecord, record: MeasurementRecord) -> None:
        self._set_measurement(run, record)

    def step_incomplete(self, run: RunRecord) -> None:
        self._steps_incomplete.labels(run_id=run.run_id).inc()

    def _set_measurement(self, run: RunRecord, record: MeasurementRecord) -> None:
        metrics = record.metrics or {}
        values: dict[str, float] = {}
        for suffix, (_, key) in _NC_GAUGES.items():
            if key in metrics:
                values[suffix] = float(metrics[key])
        scalars = record.scalars
        accuracy = scalars.get("train_accuracy", scalars.get("train_acc"))
        # Without reported training accuracy, the measurement split's accuracy is the
        # classifier's accuracy on (a subset of) the training set.
        values["train_accuracy_ratio"] = float(
            accuracy if accuracy is not None else metrics.get("accuracy", math.nan)
        )
        if "train_loss" in scalars:
            values["train_loss"] = float(scalars["train_loss"])
        values["latest_step"] = float(record.step)
        if record.epoch is not None:
            values["latest_epoch"] = float(record.epoch)
        self._set(run.run_id, record.step, values)

    def scalars_recorded(self, run: RunRecord, step: int, values: Mapping[str, float]) -> None:
        self._set(
            run.run_id,
            step,
            {_SCALAR_GAUGES[k]: float(v) for k, v in values.items() if k in _SCALAR_GAUGES},
        )

    def _set(self, run_id: str, step: int, values: Mapping[str, float]) -> None:
        with self._lock:
            labels = self._labels.get(run_id, (run_id, "unknown"))
            for suffix, value in values.items():
                key = (run_id, suffix)
                if self._gauge_steps.get(key, -1) > step:
                    continue
                self._gauge_steps[key] = step
                self._values[key] = value
                self._per_run[suffix].labels(*labels).set(value)


def _remove(gauge: Gauge, labels: tuple[str, ...]) -> None:
    """Drop one labelled series if it exists."""
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)


class _ExporterServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes are too frequent to log."""


def start_exporter(
    registry: CollectorRegistry, host: str, port: int
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` from ``registry`` on host:port (0 = OS-picked) in a daemon thread."""

    class Server(_ExporterServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    httpd = make_server(
        host.strip("[]"), port, make_wsgi_app(registry), Server, handler_class=_QuietHandler
    )
    # A short poll interval so shutdown() (on server stop) returns promptly.
    thread = threading.Thread(
        target=httpd.serve_forever,
        kwargs={"poll_interval": 0.05},
        name="ncserve-exporter",
        daemon=True,
    )
    thread.start()
    return httpd, thread
