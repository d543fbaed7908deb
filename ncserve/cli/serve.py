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
from ncserve.options import model_options
from ncserve.service.server import ServerConfig

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


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
@model_options(ServerConfig)
@click.option(
    "--token-file",
    type=_FILE,
    default=None,
    help="File holding the bearer token every RPC except health must send "
    "('authorization: Bearer <token>').",
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
    token_file: Path | None,
    blas_threads: int,
    port_file: Path | None,
    log_level: str,
    **settings: Any,
) -> None:
    """Run the ncserve metrics service (gRPC, health, reflection, Prometheus exporter).

    Training ranks push their per-shard statistics here; the service merges them per
    (run, step), hands back the class means, finalizes the NC metrics into the --db
    store and exports them for Prometheus. SIGTERM or SIGINT drains in-flight calls
    (health turns NOT_SERVING) and exits within --grace seconds.
    """
    from ncserve.service import start_server
    from ncserve.service.store import StoreError

    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        token = None if token_file is None else _read_token(token_file)
        config = ServerConfig(token=token, **settings)
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
                else f"metrics on http://{config.metrics_host}:{handle.metrics_port}/metrics"
            )
            click.echo(f"ncserve serving on {handle.address}, {metrics_at}", err=False)
            sys.stdout.flush()
            # Wake periodically: a signal handler only runs between bytecodes of this thread.
            while not stop.wait(0.5):
                pass
        finally:
            handle.stop(config.grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
