"""Start and stop the ncserve gRPC server (in-process or from ``ncserve serve``).

handle = start_server(ServerConfig(listen="127.0.0.1:0", db_path=tmp / "nc.db"))
handle.port, handle.metrics_port   # the bound ports
handle.stop(grace_s=5)             # NOT_SERVING, drain, close the store
"""

from __future__ import annotations

import logging
import socket
import threading
from concurrent import futures
from pathlib import Path
from typing import Annotated

import click
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from ncserve.options import Cli, Duration
from ncserve.service.aggregator import Aggregator
from ncserve.service.auth import TokenAuthInterceptor
from ncserve.service.exporter import DEFAULT_SERIES_GRACE_S, ServiceMetrics, start_exporter
from ncserve.service.guard import StreamGuard, StreamLimits
from ncserve.service.runs import AggregatorLimits
from ncserve.service.servicer import NCServicer, serialize_tensor_chunk
from ncserve.service.store import Store
from ncserve.v1 import ncserve_pb2 as pb
from ncserve.v1 import ncserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NCService"].full_name
_PUSH_METHODS = (f"/{SERVICE_NAME}/PushRound1", f"/{SERVICE_NAME}/PushRound2")


def split_host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); ValueError naming the address."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"address {address!r} is not HOST:PORT with PORT in 0-65535")
    return host.strip("[]"), int(port)


_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


class ServerConfig(BaseModel):
    """Everything a server needs; validated on construction (errors name the field)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    listen: Annotated[str, Cli(("--listen",))] = Field(
        "127.0.0.1:50051",
        description="gRPC address HOST:PORT; port 0 lets the OS pick (see --port-file).",
    )
    metrics_port: Annotated[int | None, Cli(("--metrics-port",), type=click.IntRange(0, 65535))] = (
        Field(
            None,
            ge=0,
            le=65535,
            description="Serve Prometheus /metrics on this port (0 = OS-picked); no exporter "
            "when omitted.",
        )
    )
    metrics_host: Annotated[str, Cli(("--metrics-host",))] = Field(
        "127.0.0.1", description="Address the Prometheus exporter binds."
    )
    db_path: Annotated[Path, Cli(("--db",), type=click.Path(dir_okay=False, path_type=Path))] = (
        Field(
            Path("ncserve.db"),
            description="SQLite database (created if missing; WAL mode; survives restarts).",
        )
    )
    # From --token-file (a secret is never an argument).
    token: SecretStr | None = Field(None, description="bearer token required on every RPC")
    tls_cert: Annotated[Path | None, Cli(("--tls-cert",), type=_FILE)] = Field(
        None, description="PEM server certificate (with --tls-key)."
    )
    tls_key: Annotated[Path | None, Cli(("--tls-key",), type=_FILE)] = Field(
        None, description="PEM private key of --tls-cert."
    )
    client_ca: Annotated[Path | None, Cli(("--client-ca",), type=_FILE)] = Field(
        None,
        description="PEM CA bundle: require client certificates signed by it (mTLS; needs "
        "--tls-cert).",
    )
    step_deadline_s: Annotated[
        float, Cli(("--step-deadline",), type=click.FloatRange(min=0, min_open=True))
    ] = Field(
        AggregatorLimits.step_deadline_s,
        gt=0,
        description="Seconds a step may stay open before it is marked incomplete (never "
        "half-counted).",
    )
    grace_s: Annotated[float, Cli(("--grace",), type=click.FloatRange(min=0))] = Field(
        10.0, ge=0, description="Seconds to drain in-flight calls on SIGTERM before exiting."
    )
    abandon_after_s: Annotated[
        float,
        Cli(("--abandon-after",), type=Duration()),
    ] = Field(
        AggregatorLimits.abandon_after_s,
        gt=0,
        description="A running run that sends no shard, scalars or heartbeat for this long is "
        "marked abandoned (its alerts resolve); it becomes running again if it speaks.",
    )
    retention_s: Annotated[float | None, Cli(("--retention",), type=Duration())] = Field(
        AggregatorLimits.retention_s,
        gt=0,
        description="Delete runs (data and series) this long after they finished, failed or "
        "were abandoned, e.g. 30d. Default: keep every run.",
    )
    series_grace_s: Annotated[
        float,
        Cli(("--series-grace",), type=Duration()),
    ] = Field(
        DEFAULT_SERIES_GRACE_S,
        ge=0,
        description="How long an ended run's series stay on /metrics (dashboards show its "
        "last values) before they leave.",
    )
    max_workers: Annotated[int, Cli(("--max-workers",), type=click.IntRange(min=4))] = Field(
        256,
        ge=4,
        description="gRPC worker threads; a run's world_size may be at most this minus 16.",
    )
    max_streams_per_peer: Annotated[
        int | None, Cli(("--max-streams-per-peer",), type=click.IntRange(min=1))
    ] = Field(
        None,
        ge=1,
        description="Streams (pushes, class-means waits, watches) one peer address may hold "
        "open at once. Default: the server's stream limit (--max-workers less a reserve for "
        "unary calls and health). Set it when trainers and other clients reach the server "
        "from different addresses; on loopback every client shares one.",
    )
    stream_idle_timeout_s: Annotated[
        float,
        Cli(("--stream-idle-timeout",), type=Duration()),
    ] = Field(
        StreamLimits.idle_timeout_s,
        gt=0,
        description="A push stream that sends nothing for this long is cut: its worker "
        "thread and whatever in-flight budget it held come back (the client sees CANCELLED "
        "and retries).",
    )
    stream_lifetime_s: Annotated[
        float,
        Cli(("--stream-lifetime",), type=Duration()),
    ] = Field(
        StreamLimits.lifetime_s,
        gt=0,
        description="The longest a push stream may last, whatever it sends.",
    )
    max_runs: Annotated[int, Cli(("--max-runs",), type=click.IntRange(min=1))] = Field(
        AggregatorLimits.max_runs,
        ge=1,
        description="Runs the server holds; more registrations get RESOURCE_EXHAUSTED.",
    )
    max_open_steps: Annotated[int, Cli(("--max-open-steps",), type=click.IntRange(min=1))] = Field(
        AggregatorLimits.max_open_steps,
        ge=1,
        description="Steps in flight over all runs; more get RESOURCE_EXHAUSTED.",
    )
    max_open_steps_per_run: Annotated[
        int, Cli(("--max-open-steps-per-run",), type=click.IntRange(min=1))
    ] = Field(
        AggregatorLimits.max_open_steps_per_run,
        ge=1,
        description="Steps one run may have open at once (its ranks keep one or two open; "
        "more come from a replayed backlog), so one run cannot take every --max-open-steps "
        "slot.",
    )
    max_message_bytes: Annotated[
        int, Cli(("--max-message-bytes",), type=click.IntRange(min=2 << 20))
    ] = Field(
        4 << 20,
        ge=2 << 20,
        description="Largest gRPC message accepted (tensor chunks are at most 1 MiB).",
    )
    max_shard_bytes: Annotated[
        int, Cli(("--max-shard-bytes",), type=click.IntRange(min=1 << 20))
    ] = Field(
        AggregatorLimits.max_shard_bytes,
        ge=1 << 20,
        description="Largest push payload read. A run whose pushes cannot fit (round 1 carries "
        "16 x K x (P + 1) bytes from rank 0: 589 MiB for GPT-2's head) is refused when it "
        "registers.",
    )
    max_inflight_bytes: Annotated[
        int, Cli(("--max-inflight-bytes",), type=click.IntRange(min=1 << 20))
    ] = Field(
        48 << 20,
        ge=1 << 20,
        description="Shard payload bytes decoded at once over all pushes (a push is charged "
        "when its tensor bytes start to arrive, the size its header declares, else the most "
        "its round can carry); more pushes wait their turn, so memory stops growing with the "
        "number of ranks once this is full.",
    )

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        split_host_port(value)
        return value

    @field_validator("token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("token is empty")
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("client_ca (mTLS) needs tls_cert and tls_key")
        return self

    @property
    def max_streams(self) -> int:
        """Streams served at once: the workers less a reserve that always serves unary
        calls and health (a quarter of them, from 2 to 32)."""
        return max(1, self.max_workers - max(2, min(32, self.max_workers // 4)))

    @property
    def max_world_size(self) -> int:
        # Each rank waiting for class means holds a worker and a stream; keep some workers
        # for everything else.
        return max(1, min(self.max_workers - 16, self.max_streams))

    def stream_limits(self) -> StreamLimits:
        return StreamLimits(
            max_streams=self.max_streams,
            max_streams_per_peer=min(self.max_streams_per_peer or self.max_streams,
                                     self.max_streams),
            idle_timeout_s=self.stream_idle_timeout_s,
            lifetime_s=self.stream_lifetime_s,
        )  # fmt: skip


class ServerHandle:
    """A running server. ``stop`` is idempotent and safe from any thread."""

    def __init__(
        self,
        config: ServerConfig,
        server: grpc.Server,
        port: int,
        health_servicer: health.HealthServicer,
        aggregator: Aggregator,
        store: Store,
        metrics: ServiceMetrics,
        exporter: tuple[object, threading.Thread] | None,
        metrics_port: int | None,
        guard: StreamGuard,
    ) -> None:
        self.config = config
        self.guard = guard
        self.port = port
        self.metrics_port = metrics_port
        self.aggregator = aggregator
        self.store = store
        self.metrics = metrics
        self._server = server
        self._health = health_servicer
        self._exporter = exporter
        self._reaper_stop = threading.Event()
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        interval = min(1.0, max(0.05, config.step_deadline_s / 4))
        self._reaper = threading.Thread(
            target=self._reap, args=(interval,), name="ncserve-step-deadline", daemon=True
        )
        self._reaper.start()

    @property
    def address(self) -> str:
        host, _ = split_host_port(self.config.listen)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def _reap(self, interval: float) -> None:
        while not self._reaper_stop.wait(interval):
            try:
                self.aggregator.maintain()
            except Exception:  # the reaper must outlive one bad pass
                log.exception("reaper pass (step deadlines, run lifecycle) failed")

    def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, end waits and watches, drain in-flight calls for ``grace_s``, close."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace = self.config.grace_s if grace_s is None else grace_s
            log.info("stopping: draining in-flight calls for up to %gs", grace)
            self._health.enter_graceful_shutdown()
            self.aggregator.begin_shutdown()
            self._server.stop(grace).wait()
            self._reaper_stop.set()
            self._reaper.join()
            self.guard.close()
            if self._exporter is not None:
                httpd = self._exporter[0]
                httpd.shutdown()  # type: ignore[attr-defined]
                httpd.server_close()  # type: ignore[attr-defined]
            self.store.close()
            self._stopped.set()
            log.info("stopped")

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until stopped; True if it stopped within ``timeout_s``."""
        return self._stopped.wait(timeout_s)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from exc


class _HandlerCapture:
    """Stands in for a server to collect the method handlers the generated code builds."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers = dict(handlers)


def _add_servicer(servicer: NCServicer, server: grpc.Server) -> None:
    """Register the servicer as the generated code does, except that FetchClassMeans, whose
    streams the servicer serializes once per step, gets a serializer that passes bytes on."""
    capture = _HandlerCapture()
    pb_grpc.add_NCServiceServicer_to_server(servicer, capture)
    handlers = capture.handlers
    handlers["FetchClassMeans"] = handlers["FetchClassMeans"]._replace(
        response_serializer=serialize_tensor_chunk
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _bind(server: grpc.Server, config: ServerConfig, host: str, port: int) -> int:
    """Bind the gRPC port; OSError naming the address when it cannot be."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if port:
        # Asked first with a plain socket: gRPC's own failure comes with a log line of its
        # core on stderr and no reason.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise OSError(f"cannot listen on {config.listen}: {exc.strerror or exc}") from None
    try:
        if config.tls_cert is not None and config.tls_key is not None:
            ca = None if config.client_ca is None else _read(config.client_ca, "client CA")
            credentials = grpc.ssl_server_credentials(
                [(_read(config.tls_key, "TLS key"), _read(config.tls_cert, "TLS certificate"))],
                root_certificates=ca,
                require_client_auth=ca is not None,
            )
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises "Failed to bind to address ..."
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {config.listen}: the port is in use or the address is "
                      "not one of this machine's")  # fmt: skip
    return bound


def start_server(config: ServerConfig) -> ServerHandle:
    """Open the store, bind the gRPC server (and exporter), start serving; return a handle.

    Raises ValueError (bad address or TLS file), OSError (port in use) or
    ncserve.service.store.StoreError (database unusable), each naming what is wrong.
    """
    metrics = ServiceMetrics(series_grace_s=config.series_grace_s)
    interceptors: list[grpc.ServerInterceptor] = []
    if config.token is not None:

        def count_rejection(method: str) -> None:
            if method in _PUSH_METHODS:
                metrics.shard_rejected("unauthenticated")

        interceptors.append(TokenAuthInterceptor(config.token.get_secret_value(), count_rejection))
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=config.max_workers, thread_name_prefix="ncserve-rpc"
        ),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # Two servers on one port would split the ranks of a run between them.
            ("grpc.so_reuseport", 0),
            # Without BDP probing each stream's receive window stays at gRPC's default
            # instead of growing to MBs per rank: memory stays flat with the number of
            # ranks, and in-cluster round trips are short enough not to need more.
            ("grpc.http2.bdp_probe", 0),
        ],
    )
    # The ports first, then the store: a port in use fails before anything is created.
    new_database = not Path(config.db_path).exists()
    exporter = None
    store: Store | None = None
    guard: StreamGuard | None = None
    try:
        host, port = split_host_port(config.listen)
        bound = _bind(server, config, host, port)
        metrics_port = None
        if config.metrics_port is not None:
            try:
                exporter = start_exporter(
                    metrics.registry, config.metrics_host, config.metrics_port
                )
            except OSError as exc:
                raise OSError(
                    f"cannot serve /metrics on {config.metrics_host}:{config.metrics_port}: "
                    f"{exc.strerror or exc}"
                ) from None
            metrics_port = int(exporter[0].server_port)
        store = Store(config.db_path)
        limits = AggregatorLimits(
            max_runs=config.max_runs,
            max_open_steps=config.max_open_steps,
            max_open_steps_per_run=config.max_open_steps_per_run,
            max_shard_bytes=config.max_shard_bytes,
            max_world_size=config.max_world_size,
            step_deadline_s=config.step_deadline_s,
            abandon_after_s=config.abandon_after_s,
            retention_s=config.retention_s,
        )
        aggregator = Aggregator(store, metrics, limits)
        metrics.attach(aggregator.runs, store, aggregator.open_step_count)
        guard = StreamGuard(config.stream_limits())
        _add_servicer(
            NCServicer(
                aggregator, metrics, guard, config.max_shard_bytes, config.max_inflight_bytes
            ),
            server,
        )
        health_servicer = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )  # fmt: skip
        server.start()
    except BaseException:
        server.stop(None)
        if exporter is not None:
            exporter[0].shutdown()
            exporter[0].server_close()
        if guard is not None:
            guard.close()
        if store is not None:
            store.close()
        if new_database:  # a failed start leaves no file behind
            for suffix in ("", "-wal", "-shm"):
                Path(f"{config.db_path}{suffix}").unlink(missing_ok=True)
        raise
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving %s on %s:%d (tls=%s, mtls=%s, token=%s), metrics port %s, db %s",
        SERVICE_NAME,
        host,
        bound,
        config.tls_cert is not None,
        config.client_ca is not None,
        config.token is not None,
        metrics_port,
        config.db_path,
    )
    return ServerHandle(
        config,
        server,
        bound,
        health_servicer,
        aggregator,
        store,
        metrics,
        exporter,
        metrics_port,
        guard,
    )
