"""``NCClient``: what a training rank (or the CLI) uses to talk to the ncserve service.

Every call carries a deadline. Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED) are
retried with capped, jittered exponential backoff until that deadline; a push that still
cannot be delivered is buffered (``DurableBuffer``: memory, then a spool on disk) and the
call returns False instead of raising, so a training loop never stops for an outage. A
background thread replays the buffer, oldest first, as soon as the service answers again;
``flush()`` and ``close()`` say exactly what was delivered, what is still waiting and what
had to be dropped. Permanent errors (bad input, unknown run, wrong token) raise
``ServiceError`` with the gRPC status code and the server's message.

Legend: K classes, P feature dim.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from ncserve.client.buffer import (
    KIND_FINISH,
    KIND_REGISTER,
    KIND_ROUND1,
    KIND_ROUND2,
    KIND_SCALARS,
    BufferKey,
    DurableBuffer,
)
from ncserve.client.delivery import (
    Call,
    Delivery,
    error_details,
    transfer_allowance_s,
)
from ncserve.client.queries import ServiceQueries
from ncserve.client.retry import RetryPolicy, is_transient, status_code
from ncserve.client.types import (
    DeliveryReport,
    RejectedEntry,
    ServiceError,
    TLSConfig,
    TrainTally,
)
from ncserve.metrics import ClassMeans, MetricInputError, Round1Stats, Round2Stats
from ncserve.protocol import (
    HOLDOUT_PREFIX,
    MAX_REASON_CHARS,
    RUN_END_STATES,
    RUN_FINISHED,
)
from ncserve.v1 import ncserve_pb2 as pb
from ncserve.v1 import ncserve_pb2_grpc as pb_grpc
from ncserve.wire import WireError, decode_arrays

log = logging.getLogger(__name__)

T = TypeVar("T")

# Responses can hold many measurements (``GetMetrics`` of a long run) and class means are
# streamed in <= 1 MiB chunks, so 64 MiB is generous without being unbounded.
_MAX_RECEIVE_BYTES = 64 << 20
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", _MAX_RECEIVE_BYTES),
    # gRPC's own reconnect backoff grows to 120 s by default; a rank would then keep failing
    # fast long after the service is back. Our RetryPolicy does the pacing instead.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.enable_retries", 0),
]


class NCClient(Delivery, ServiceQueries):
    """Client of the ncserve service; thread-safe. See the module docstring."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls: TLSConfig | None = None,
        deadline_s: float = 5.0,
        spill_dir: Path | None = None,
        max_buffer_bytes: int = 256 << 20,
        *,
        max_memory_bytes: int | None = 64 << 20,
        retry: RetryPolicy | None = None,
        replay_in_background: bool = True,
        round1_patience_s: float = 600.0,
    ) -> None:
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s!r}")
        if not target or ":" not in target:
            raise ValueError(f"target must be HOST:PORT, got {target!r}")
        self.target = target
        self.deadline_s = float(deadline_s)
        self._retry = retry or RetryPolicy()
        self._round1_patience_s = float(round1_patience_s)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        credentials = tls.credentials() if tls is not None else None
        # The spool is locked before anything else is opened, so a SpoolInUseError leaks nothing.
        self._buffer = DurableBuffer(
            Path(spill_dir) if spill_dir is not None else None,
            max_bytes=max_buffer_bytes,
            max_memory_bytes=max_memory_bytes,
        )
        options = list(_CHANNEL_OPTIONS)
        if tls is not None and credentials is not None:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            if token and not _is_loopback(target):
                log.warning("sending a bearer token to %s without TLS", target)
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.NCServiceStub(self._channel)
        self._counts_lock = threading.Lock()
        self._delivered = 0
        self._replayed = 0
        self._rejected: list[RejectedEntry] = []
        # Held while delivering from the buffer, so the background thread and a caller's
        # flush never send the same entry at once or out of order.
        self._replay_lock = threading.Lock()
        self._round1_wait_since: dict[int, float] = {}
        # Shards whose round 1 the service refused: their round 2 can never be accepted.
        self._refused_shards: set[tuple[str, int | None, int | None]] = set()
        # Set when a call found the service unreachable, cleared by the next delivery.
        # While set, new calls go straight to the buffer instead of each waiting out its
        # own deadline: a training loop keeps its pace during an outage.
        self._down = threading.Event()
        self._shapes: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._watches: set[Any] = set()
        self._watches_lock = threading.Lock()
        self._closed = False
        self._close_lock = threading.Lock()
        atexit.register(self._persist_at_exit)
        self._replayer: threading.Thread | None = None
        if replay_in_background:
            self._replayer = threading.Thread(
                target=self._replay_loop, name="ncserve-client-replay", daemon=True
            )
            self._replayer.start()
            if len(self._buffer):
                self._wake.set()

    # -- write calls (buffered on transient failure) --------------------------------------

    def register_run(
        self,
        run_id: str,
        num_classes: int,
        feature_dim: int,
        world_size: int,
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        """Create the run (or confirm it). False: the service is unreachable, buffered."""
        meta = {
            "num_classes": int(num_classes),
            "feature_dim": int(feature_dim),
            "world_size": int(world_size),
            "metadata": {str(k): str(v) for k, v in (metadata or {}).items()},
        }
        self._remember_shape(run_id, int(num_classes), int(feature_dim))
        return self._submit(Call(BufferKey(KIND_REGISTER, run_id), meta))

    def push_round1(
        self,
        run_id: str,
        step: int,
        rank: int,
        stats: Round1Stats,
        weight_KP: np.ndarray | None = None,
        bias_K: np.ndarray | None = None,
        *,
        epoch: int | None = None,
    ) -> bool:
        """Push one rank's round-1 statistics (and W, b from at least one rank).

        False: not delivered yet (service unreachable, or older pushes still waiting in the
        buffer); it is buffered and will be replayed in order.
        """
        arrays = dict(stats.to_arrays())
        if weight_KP is not None:
            arrays["weight"] = np.asarray(weight_KP, dtype=np.float64)
        if bias_K is not None:
            arrays["bias"] = np.asarray(bias_K, dtype=np.float64)
        meta = {
            "num_classes": stats.num_classes,
            "feature_dim": stats.feature_dim,
            "epoch": epoch,
        }
        key = BufferKey(KIND_ROUND1, run_id, int(step), int(rank), 1)
        self._remember_shape(run_id, stats.num_classes, stats.feature_dim)
        return self._submit(Call(key, meta, arrays))

    def push_round2(
        self,
        run_id: str,
        step: int,
        rank: int,
        stats: Round2Stats,
        holdout: Round2Stats | None = None,
        scalars: Mapping[str, float] | None = None,
        *,
        epoch: int | None = None,
        train_tally: TrainTally | None = None,
        num_classes: int | None = None,
        feature_dim: int | None = None,
    ) -> bool:
        """Push one rank's round-2 statistics (and held-out ones, and training scalars).

        ``num_classes``/``feature_dim`` default to what this client last pushed in round 1
        for the run, or what the run was registered with; pass them when neither is known.
        """
        K, P = self._shape_of(run_id, stats, num_classes, feature_dim)
        arrays = dict(stats.to_arrays())
        if holdout is not None:
            arrays.update({HOLDOUT_PREFIX + k: v for k, v in holdout.to_arrays().items()})
        meta: dict[str, Any] = {
            "num_classes": K,
            "feature_dim": P,
            "epoch": epoch,
            "scalars": {str(k): float(v) for k, v in (scalars or {}).items()},
            "train_tally": None
            if train_tally is None
            else [
                float(train_tally.loss_sum),
                int(train_tally.num_correct),
                int(train_tally.num_samples),
            ],
        }
        key = BufferKey(KIND_ROUND2, run_id, int(step), int(rank), 2)
        return self._submit(Call(key, meta, arrays))

    def record_scalars(
        self,
        run_id: str,
        step: int,
        values: Mapping[str, float],
        *,
        epoch: int | None = None,
    ) -> bool:
        """Record cheap per-step values (nc0, loss, lr). False: buffered for replay."""
        meta = {"values": {str(k): float(v) for k, v in values.items()}, "epoch": epoch}
        return self._submit(Call(BufferKey(KIND_SCALARS, run_id, int(step)), meta))

    def finish_run(self, run_id: str, state: str = RUN_FINISHED, reason: str = "") -> bool:
        """End the run (``finished`` or ``failed``), after everything queued before it.

        False: buffered, delivered (in order) when the service answers again or by
        ``ncserve replay``. A run never ended is marked abandoned by the service after its
        abandon timeout instead.
        """
        if state not in RUN_END_STATES:
            raise ValueError(f"state must be one of {RUN_END_STATES}, got {state!r}")
        meta = {"state": state, "reason": str(reason)[:MAX_REASON_CHARS]}
        return self._submit(Call(BufferKey(KIND_FINISH, run_id), meta))

    def heartbeat(self, run_id: str) -> bool:
        """Tell the service the run is alive. Not buffered (a late heartbeat says nothing);
        False when the service did not answer within the deadline."""
        self._check_open()
        try:
            self._stub.Heartbeat(
                pb.HeartbeatRequest(run_id=run_id), timeout=self.deadline_s, metadata=self._metadata
            )
        except grpc.RpcError as error:
            log.debug("heartbeat of run %r not delivered: %s", run_id, error_details(error))
            return False
        return True

    def fetch_class_means(
        self, run_id: str, step: int, timeout_s: float, *, rank: int = 0
    ) -> ClassMeans | None:
        """The global class means of ``step`` once every rank's round 1 is in.

        None when the service is unreachable or the means are not ready within
        ``timeout_s`` (the caller can compute them itself and keep going).
        """
        deadline = time.monotonic() + timeout_s
        self._check_open()
        with self._counts_lock:
            known = self._shapes.get(run_id)
        if known is not None:
            deadline += transfer_allowance_s(8 * known[0] * (known[1] + 1))
        # This rank's own round 1 may still be in the buffer; the service cannot answer
        # before it arrives.
        if len(self._buffer) and (self._down.is_set() or not self._wait_drained(deadline)):
            return None
        request = pb.ClassMeansRequest(run_id=run_id, step=int(step), rank=int(rank))

        def attempt(t: float) -> dict[str, np.ndarray]:
            stream = self._stub.FetchClassMeans(request, timeout=t, metadata=self._metadata)
            return decode_arrays(stream, max_total_bytes=_MAX_CLASS_MEANS_BYTES)

        try:
            arrays = self._retry.call(attempt, deadline, stop=self._stop)
        except grpc.RpcError as error:
            if status_code(error) == grpc.StatusCode.UNAVAILABLE:
                self._down.set()
            if is_transient(error):
                return None
            raise self._service_error("FetchClassMeans", error) from None
        except WireError as error:
            raise ServiceError("FetchClassMeans", grpc.StatusCode.DATA_LOSS, str(error)) from None
        means = arrays.get("means")
        if means is None or means.ndim != 2:
            raise ServiceError(
                "FetchClassMeans",
                grpc.StatusCode.DATA_LOSS,
                f"reply lacks a 2-D 'means' tensor (got {sorted(arrays)})",
            )
        try:
            return ClassMeans.from_arrays(
                arrays, num_classes=int(means.shape[0]), feature_dim=int(means.shape[1])
            )
        except MetricInputError as error:
            raise ServiceError("FetchClassMeans", grpc.StatusCode.DATA_LOSS, str(error)) from None

    # -- delivery ---------------------------------------------------------------------------

    def flush(self, timeout_s: float | None = None) -> DeliveryReport:
        """Replay the buffer until it is empty or ``timeout_s`` (default: the deadline) passes."""
        self._check_open()
        self._wait_drained(time.monotonic() + (self.deadline_s if timeout_s is None else timeout_s))
        return self.report()

    def report(self) -> DeliveryReport:
        with self._counts_lock:
            delivered, replayed, rejected = self._delivered, self._replayed, tuple(self._rejected)
        return DeliveryReport(
            delivered=delivered,
            replayed=replayed,
            buffered=tuple(self._buffer.keys()),
            buffered_bytes=self._buffer.nbytes,
            persisted=self._buffer.memory_bytes == 0 and self._buffer.spill_dir is not None,
            dropped=tuple(self._buffer.dropped()),
            rejected=rejected,
        )

    def close(self, timeout_s: float | None = None) -> DeliveryReport:
        """Flush (bounded by ``timeout_s``), stop the replay thread, keep what is left in the
        spool for the next client on the same ``spill_dir``, and report. Idempotent."""
        with self._close_lock:
            if self._closed:
                return self.report()
            self.flush(timeout_s)
            self._closed = True
        atexit.unregister(self._persist_at_exit)
        self._stop.set()
        self._wake.set()
        with self._watches_lock:
            for call in list(self._watches):
                call.cancel()
        if self._replayer is not None:
            self._replayer.join()
        self._buffer.persist()
        report = self.report()
        self._buffer.close()
        self._channel.close()
        if not report.complete:
            log.warning("ncserve client closed with undelivered calls: %s", report.summary())
        return report

    def _persist_at_exit(self) -> None:
        # A process that ends without close() still keeps its undelivered calls on disk.
        if not self._closed and self._buffer.spill_dir is not None:
            self._buffer.persist()

    def __enter__(self) -> NCClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("NCClient is closed")

    def _remember_shape(self, run_id: str, num_classes: int, feature_dim: int) -> None:
        with self._counts_lock:
            self._shapes[run_id] = (int(num_classes), int(feature_dim))

    def _shape_of(
        self, run_id: str, stats: Round2Stats, num_classes: int | None, feature_dim: int | None
    ) -> tuple[int, int]:
        if num_classes is not None and feature_dim is not None:
            return int(num_classes), int(feature_dim)
        with self._counts_lock:
            known = self._shapes.get(run_id)
        if known is not None and num_classes in (None, known[0]):
            return known[0], (known[1] if feature_dim is None else int(feature_dim))
        # The scatter is K x K when K <= P, else P x P: its size gives P only when K > P.
        d = int(stats.scatter.shape[0])
        if num_classes is not None and d < int(num_classes):
            return int(num_classes), d
        raise ValueError(
            f"the shape of run {run_id!r} is unknown to this client (no round 1 or "
            "registration through it); pass num_classes= and feature_dim= to push_round2"
        )

    def _query(self, method: str, rpc: Callable[..., T], request: Any) -> T:
        self._check_open()
        deadline = time.monotonic() + self.deadline_s
        try:
            return self._retry.call(
                lambda t: rpc(request, timeout=t, metadata=self._metadata),
                deadline,
                stop=self._stop,
            )
        except grpc.RpcError as error:
            raise self._service_error(method, error) from None

    def _service_error(self, method: str, error: grpc.RpcError) -> ServiceError:
        code = status_code(error) or grpc.StatusCode.UNKNOWN
        details = error_details(error)
        if code == grpc.StatusCode.UNAVAILABLE:
            details = f"ncserve at {self.target} is unreachable ({details})"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            details = f"ncserve at {self.target} did not answer within the deadline ({details})"
        return ServiceError(method, code, details)


# K = 20,000 classes and P = 8192 features of float64 means: 1.3 GB. Above that is no
# measurement this service makes, so a reply claiming more is refused before allocation.
_MAX_CLASS_MEANS_BYTES = 2 << 30


def _is_loopback(target: str) -> bool:
    host = target.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")
