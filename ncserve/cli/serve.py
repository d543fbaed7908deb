"""``ncserve serve``: run the metrics service until SIGTERM / SIGINT."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import click
from pydantic import SecretStr, ValidationError
from threadpoolctl import threadpool_limits

from ncserve.errors import UserError

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class Duration(click.ParamType):
    """Seconds, or a number with a unit: 90, 45s, 30m, 2h, 7d."""

    name = "DURATION"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, int | float):
            return float(value)
        text = str(value).strip()
        scale = _DURATION_UNITS.get(text[-1:])
        number = text[:-1] if scale is not None else text
        try:
            seconds = float(number) * (scale or 1.0)
        except ValueError:
            self.fail(f"{value!r} is not a duration (e.g. 90, 45s, 30m, 2h, 7d)", param, ctx)
        if not seconds > 0:
            self.fail(f"{value!r} must be longer than 0", param, ctx)
        return seconds


def _default(field: str) -> Any:
    """A ServerConfig field's default: the one definition of each setting."""
    from ncserve.service.server import ServerConfig

    return ServerConfig.model_fields[field].default


def _shown(seconds: float) -> str:
    """A duration as --help shows it (the largest unit that divides it)."""
    for unit, scale in sorted(_DURATION_UNITS.items(), key=lambda item: -item[1]):
        if seconds % scale == 0:
            return f"{seconds / scale:g}{unit}"
    return f"{seconds:g}s"


def _read_token(path: Path) -> SecretStr:
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read --token-file {path}: {exc}") from exc
    if not token:
        raise UserError(f"--token-file {path} is empty")
    return SecretStr(token)


def _one_line(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
    )


def _limit_malloc_arenas(arenas: int) -> None:
    """Cap glibc's heap arenas for this process (no-op elsewhere).

    glibc gives busy threads their own arenas, each keeping freed MB-sized shard buffers;
    with one RPC thread per pushing rank that made the server's memory grow with the
    number of ranks. Must run before the RPC threads start.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_arena_max = -8  # from glibc's malloc.h
    libc.mallopt(m_arena_max, arenas)


def _write_port_file(path: Path, port: int) -> None:
    # Written whole then renamed, so a parent polling for the file never reads half of it.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


@click.command("serve")
@click.option(
    "--listen",
    default=_default("listen"),
    show_default=True,
    help="gRPC address HOST:PORT; port 0 lets the OS pick (see --port-file).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus /metrics on this port (0 = OS-picked); no exporter when omitted.",
)
@click.option(
    "--metrics-host",
    default=_default("metrics_host"),
    show_default=True,
    help="Address the Prometheus exporter binds.",
)
@click.option(
    "--db",
    "db_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=_default("db_path"),
    show_default=True,
    help="SQLite database (created if missing; WAL mode; survives restarts).",
)
@click.option(
    "--token-file",
    type=_FILE,
    default=None,
    help="File holding the bearer token every RPC except health must send "
    "('authorization: Bearer <token>').",
)
@click.option(
    "--tls-cert", type=_FILE, default=None, help="PEM server certificate (with --tls-key)."
)
@click.option("--tls-key", type=_FILE, default=None, help="PEM private key of --tls-cert.")
@click.option(
    "--client-ca",
    type=_FILE,
    default=None,
    help="PEM CA bundle: require client certificates signed by it (mTLS; needs --tls-cert).",
)
@click.option(
    "--step-deadline",
    "step_deadline_s",
    type=click.FloatRange(min=0, min_open=True),
    default=_default("step_deadline_s"),
    show_default=True,
    help="Seconds a step may stay open before it is marked incomplete (never half-counted).",
)
@click.option(
    "--grace",
    "grace_s",
    type=click.FloatRange(min=0),
    default=_default("grace_s"),
    show_default=True,
    help="Seconds to drain in-flight calls on SIGTERM before exiting.",
)
@click.option(
    "--abandon-after",
    "abandon_after_s",
    type=Duration(),
    default=_default("abandon_after_s"),
    show_default=_shown(float(_default("abandon_after_s"))),
    help="A running run that sends no shard, scalars or heartbeat for this long is marked "
    "abandoned (its alerts resolve); it becomes running again if it speaks.",
)
@click.option(
    "--retention",
    "retention_s",
    type=Duration(),
    default=None,
    help="Delete runs (data and series) this long after they finished, failed or were "
    "abandoned, e.g. 30d. Default: keep every run.",
)
@click.option(
    "--series-grace",
    "series_grace_s",
    type=Duration(),
    default=_default("series_grace_s"),
    show_default=_shown(float(_default("series_grace_s"))),
    help="How long an ended run's series stay on /metrics (dashboards show its last "
    "values) before they leave.",
)
@click.option(
    "--max-workers",
    type=click.IntRange(min=4),
    default=_default("max_workers"),
    show_default=True,
    help="gRPC worker threads; a run's world_size may be at most this minus 16.",
)
@click.option(
    "--max-streams-per-peer",
    type=click.IntRange(min=1),
    default=None,
    help="Streams (pushes, class-means waits, watches) one peer address may hold open at "
    "once. Default: the server's stream limit (--max-workers less a reserve for unary "
    "calls and health). Set it when trainers and other clients reach the server from "
    "different addresses; on loopback every client shares one.",
)
@click.option(
    "--stream-idle-timeout",
    "stream_idle_timeout_s",
    type=Duration(),
    default=_default("stream_idle_timeout_s"),
    show_default=_shown(float(_default("stream_idle_timeout_s"))),
    help="A push stream that sends nothing for this long is cut: its worker thread and "
    "whatever in-flight budget it held come back (the client sees CANCELLED and retries).",
)
@click.option(
    "--stream-lifetime",
    "stream_lifetime_s",
    type=Duration(),
    default=_default("stream_lifetime_s"),
    show_default=_shown(float(_default("stream_lifetime_s"))),
    help="The longest a push stream may last, whatever it sends.",
)
@click.option(
    "--max-runs",
    type=click.IntRange(min=1),
    default=_default("max_runs"),
    show_default=True,
    help="Runs the server holds; more registrations get RESOURCE_EXHAUSTED.",
)
@click.option(
    "--max-open-steps",
    type=click.IntRange(min=1),
    default=_default("max_open_steps"),
    show_default=True,
    help="Steps in flight over all runs; more get RESOURCE_EXHAUSTED.",
)
@click.option(
    "--max-open-steps-per-run",
    type=click.IntRange(min=1),
    default=_default("max_open_steps_per_run"),
    show_default=True,
    help="Steps one run may have open at once (its ranks keep one or two open; more come "
    "from a replayed backlog), so one run cannot take every --max-open-steps slot.",
)
@click.option(
    "--max-message-bytes",
    type=click.IntRange(min=2 << 20),
    default=_default("max_message_bytes"),
    show_default=True,
    help="Largest gRPC message accepted (tensor chunks are at most 1 MiB).",
)
@click.option(
    "--max-inflight-bytes",
    type=click.IntRange(min=1 << 20),
    default=_default("max_inflight_bytes"),
    show_default=True,
    help="Shard payload bytes decoded at once over all pushes (a push is charged the size "
    "its header declares, else the most its round can carry); more pushes wait their turn, "
    "so memory stops growing with the number of ranks once this is full.",
)
@click.option(
    "--blas-threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Threads numpy's BLAS may use. Finalizing is small linear algebra next to many "
    "busy RPC threads; multi-threaded BLAS there spins against them and runs many times "
    "slower, so 1 is best unless the server has cores to spare.",
)
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the bound gRPC port to this file once serving (for --listen HOST:0).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Logging verbosity (stderr).",
)
def serve(
    listen: str,
    metrics_port: int | None,
    metrics_host: str,
    db_path: Path,
    token_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    client_ca: Path | None,
    step_deadline_s: float,
    grace_s: float,
    abandon_after_s: float,
    retention_s: float | None,
    series_grace_s: float,
    max_workers: int,
    max_streams_per_peer: int | None,
    stream_idle_timeout_s: float,
    stream_lifetime_s: float,
    max_runs: int,
    max_open_steps: int,
    max_open_steps_per_run: int,
    max_message_bytes: int,
    max_inflight_bytes: int,
    blas_threads: int,
    port_file: Path | None,
    log_level: str,
) -> None:
    """Run the ncserve metrics service (gRPC, health, reflection, Prometheus exporter).

    Training ranks push their per-shard statistics here; the service merges them per
    (run, step), hands back the class means, finalizes the NC metrics into the --db
    store and exports them for Prometheus. SIGTERM or SIGINT drains in-flight calls
    (health turns NOT_SERVING) and exits within --grace seconds.
    """
    # Imported here so `ncserve --help` and the other commands never load grpc's server side.
    from ncserve.service import ServerConfig, start_server
    from ncserve.service.store import StoreError

    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = ServerConfig(
            listen=listen,
            metrics_host=metrics_host,
            metrics_port=metrics_port,
            db_path=db_path,
            token=None if token_file is None else _read_token(token_file),
            tls_cert=tls_cert,
            tls_key=tls_key,
            client_ca=client_ca,
            step_deadline_s=step_deadline_s,
            grace_s=grace_s,
            abandon_after_s=abandon_after_s,
            retention_s=retention_s,
            series_grace_s=series_grace_s,
            max_workers=max_workers,
            max_streams_per_peer=max_streams_per_peer,
            stream_idle_timeout_s=stream_idle_timeout_s,
            stream_lifetime_s=stream_lifetime_s,
            max_runs=max_runs,
            max_open_steps=max_open_steps,
            max_open_steps_per_run=max_open_steps_per_run,
            max_message_bytes=max_message_bytes,
            max_inflight_bytes=max_inflight_bytes,
        )
    except ValidationError as exc:
        raise UserError(_one_line(exc)) from exc

    # Process-wide settings, hence here and not in start_server (an embedding process
    # decides its own).
    threadpool_limits(limits=blas_threads, user_api="blas")
    _limit_malloc_arenas(2)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            handle = start_server(config)
        except (ValueError, OSError, StoreError) as exc:
            raise UserError(str(exc)) from exc
        try:
            if port_file is not None:
                _write_port_file(port_file, handle.port)
            metrics_at = (
                "no exporter"
                if handle.metrics_port is None
                else f"metrics on http://{metrics_host}:{handle.metrics_port}/metrics"
            )
            click.echo(f"ncserve serving on {handle.address}, {metrics_at}", err=False)
            sys.stdout.flush()
            # Wake periodically: a signal handler only runs between bytecodes of this thread.
            while not stop.wait(0.5):
                pass
        finally:
            handle.stop(grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
