"""How the ``ncserve`` client commands reach their data: the connection options every one of
them takes (target, token, TLS, deadline), the client made from them, an optional ``--db``
store read without a server, and the one-line errors an outage or a refusal becomes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc

from ncserve.cli.store_reader import StoreReader
from ncserve.client import NCClient, ServiceError, TLSConfig
from ncserve.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_TARGET = "127.0.0.1:50051"


def client_options(command: F) -> F:
    """The connection options every client command takes."""
    options = [
        click.option(
            "--target",
            default=DEFAULT_TARGET,
            show_default=True,
            envvar="NCSERVE_TARGET",
            metavar="HOST:PORT",
            help="Address of the ncserve service (env NCSERVE_TARGET).",
        ),
        click.option(
            "--token-file",
            type=click.Path(path_type=Path, dir_okay=False),
            envvar="NCSERVE_TOKEN_FILE",
            help="File holding the bearer token the service requires (env NCSERVE_TOKEN_FILE).",
        ),
        click.option(
            "--tls-ca",
            type=click.Path(path_type=Path, dir_okay=False),
            help="PEM CA certificate that signed the server's certificate; enables TLS.",
        ),
        click.option(
            "--tls-cert",
            type=click.Path(path_type=Path, dir_okay=False),
            help="PEM client certificate for mutual TLS (with --tls-key).",
        ),
        click.option(
            "--tls-key",
            type=click.Path(path_type=Path, dir_okay=False),
            help="PEM private key of --tls-cert.",
        ),
        click.option(
            "--tls-server-name",
            metavar="NAME",
            help="Name to verify the server certificate against, when it differs from the "
            "host in --target (e.g. 'localhost' when connecting to 127.0.0.1).",
        ),
        click.option(
            "--deadline",
            type=click.FloatRange(min=0, min_open=True),
            default=10.0,
            show_default=True,
            metavar="SECONDS",
            help="Deadline of each call to the service, retries included.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as error:
        raise UserError(f"--token-file {str(path)!r}: cannot read it ({error.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"--token-file {str(path)!r}: not a text file") from None
    if not token or any(c.isspace() for c in token):
        raise UserError(
            f"--token-file {str(path)!r}: expected one token (no spaces), "
            f"got {'an empty file' if not token else 'whitespace inside'}"
        )
    return token


def make_client(opts: dict[str, Any], spill_dir: Path | None = None) -> NCClient:
    """An NCClient from the connection options; UserError for every bad option.

    ``spill_dir``: a spool to replay (``ncserve replay``); commands that only query leave it
    None.
    """
    target = opts["target"]
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--target must be HOST:PORT with a port in 1-65535, got {target!r}")
    token = _read_token(opts["token_file"]) if opts.get("token_file") else None
    tls = None
    ca, cert, key = opts.get("tls_ca"), opts.get("tls_cert"), opts.get("tls_key")
    if (cert is None) != (key is None):
        raise UserError("--tls-cert and --tls-key go together (mutual TLS needs both)")
    for flag, path in (("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{flag} {str(path)!r}: no such file")
    if ca or cert or opts.get("tls_server_name"):
        tls = TLSConfig(
            ca_cert=ca, client_cert=cert, client_key=key, server_name=opts.get("tls_server_name")
        )
    try:
        # A CLI command reports an outage instead of queueing, so no replay thread.
        return NCClient(
            target,
            token=token,
            tls=tls,
            deadline_s=opts["deadline"],
            spill_dir=spill_dir,
            replay_in_background=False,
        )
    except ValueError as error:
        raise UserError(str(error)) from None


# Where nclaunch's embedded service keeps a run's store.
EMBEDDED_DB = "runs/<run-id>/service/ncserve.db"


def _user_error(error: ServiceError) -> UserError:
    if error.code == grpc.StatusCode.UNAVAILABLE:
        ctx = click.get_current_context(silent=True)
        command = f"ncserve {ctx.info_name if ctx is not None else 'runs'}"
        return UserError(
            f"{error.details}; to read a store without a server: {command} --db FILE "
            f"(an nclaunch run keeps its own in {EMBEDDED_DB})"
        )
    if error.code == grpc.StatusCode.UNAUTHENTICATED:
        return UserError(
            f"the service refused the credentials: {error.details} "
            "(check --token-file and the TLS options)"
        )
    return UserError(f"{error.code.name}: {error.details}")


@contextmanager
def connected(opts: dict[str, Any]) -> Iterator[NCClient]:
    """A client for the duration of a command; service errors become one-line user errors."""
    client = make_client(opts)
    try:
        yield client
    except ServiceError as error:
        raise _user_error(error) from None
    finally:
        client.close(timeout_s=0)


@contextmanager
def reading(opts: dict[str, Any], db: Path | None) -> Iterator[NCClient | StoreReader]:
    """The service, or with ``--db`` the store file itself (read-only, no server needed)."""
    if db is None:
        with connected(opts) as client:
            yield client
        return
    reader = StoreReader(db)
    try:
        yield reader
    finally:
        reader.close()


DB_OPTION = click.option(
    "--db",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Read this store file directly instead of asking a server (read-only; safe while "
    f"a server writes it). An nclaunch run keeps its own: {EMBEDDED_DB}.",
)


def _connection_opts(kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ("target", "token_file", "tls_ca", "tls_cert", "tls_key", "tls_server_name", "deadline")
    return {name: kwargs.pop(name) for name in names}


def connection_command(fn: F) -> F:
    """Split the connection options off into one ``opts`` dict for the command body."""

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        opts = _connection_opts(kwargs)
        return fn(opts, **kwargs)

    return wrapper  # type: ignore[return-value]
