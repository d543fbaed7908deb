"""What the client library hands back: its errors, TLS settings, delivery reports, and the
service's messages as plain dicts (the form the CLI prints and --db reads produce too)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ncserve.client.buffer import BufferKey, DroppedEntry
from ncserve.metrics import METRIC_KEYS
from ncserve.protocol import RUN_STATE_NAMES
from ncserve.v1 import ncserve_pb2 as pb


class ServiceError(Exception):
    """The service refused a call for a reason retrying cannot fix (or stayed unreachable
    for a query, which has no buffer to fall back on).

    ``code`` is the ``grpc.StatusCode``; ``details`` the server's message, verbatim.
    """

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


@dataclass(frozen=True)
class TLSConfig:
    """How to secure the channel.

    ``ca_cert``: PEM file of the CA that signed the server certificate (None: system roots).
    ``client_cert``/``client_key``: PEM files for mutual TLS (both or neither).
    ``server_name``: the name to check the server certificate against, when it differs
    from the host in ``target`` (e.g. connecting to 127.0.0.1 with a "localhost" cert).
    """

    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError(
                "client_cert and client_key go together for mutual TLS; got "
                f"client_cert={self.client_cert!r}, client_key={self.client_key!r}"
            )

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None, name: str) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as error:
                raise ValueError(f"cannot read {name} {str(path)!r}: {error.strerror}") from None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_cert, "ca_cert"),
            private_key=read(self.client_key, "client_key"),
            certificate_chain=read(self.client_cert, "client_cert"),
        )


@dataclass(frozen=True)
class TrainTally:
    """One rank's exact training tallies for a measurement (summed over ranks by the service)."""

    loss_sum: float
    num_correct: int
    num_samples: int


@dataclass(frozen=True)
class RejectedEntry:
    """A buffered call the service refused for good when it was replayed."""

    key: BufferKey
    code: str
    details: str

    def __str__(self) -> str:
        return f"{self.key}: {self.code}: {self.details}"


@dataclass(frozen=True)
class DeliveryReport:
    """What became of every call the client accepted.

    ``delivered``: calls the service acknowledged (directly or on replay; ``replayed`` of
    them from the buffer). ``buffered``: calls still waiting, oldest first, with their bytes;
    ``persisted`` says they are in the spool, so a new client on the same ``spill_dir``
    replays them. ``dropped``: calls lost to the buffer's hard limit (or a damaged spool
    file). ``rejected``: buffered calls the service refused for good on replay.
    """

    delivered: int
    replayed: int
    buffered: tuple[BufferKey, ...]
    buffered_bytes: int
    persisted: bool
    dropped: tuple[DroppedEntry, ...]
    rejected: tuple[RejectedEntry, ...]

    @property
    def complete(self) -> bool:
        """True when nothing is waiting, dropped or rejected."""
        return not (self.buffered or self.dropped or self.rejected)

    def summary(self) -> str:
        parts = [f"{self.delivered} delivered ({self.replayed} replayed)"]
        if self.buffered:
            where = "on disk" if self.persisted else "in memory"
            parts.append(f"{len(self.buffered)} still buffered {where} ({self.buffered_bytes} B)")
        if self.dropped:
            parts.append(f"{len(self.dropped)} dropped: " + "; ".join(map(str, self.dropped)))
        if self.rejected:
            parts.append(f"{len(self.rejected)} rejected: " + "; ".join(map(str, self.rejected)))
        return ", ".join(parts)


def run_to_dict(run: pb.RunInfo) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "num_classes": run.num_classes,
        "feature_dim": run.feature_dim,
        "world_size": run.world_size,
        "metadata": dict(run.metadata),
        "created_unix": run.created_unix,
        "num_measurements": run.num_measurements,
        "num_incomplete": run.num_incomplete,
        "latest_step": run.latest_step if run.HasField("latest_step") else None,
        "first_step": run.first_step if run.HasField("first_step") else None,
        "num_open_steps": run.num_open_steps,
        "state": RUN_STATE_NAMES.get(run.state, "unknown"),
        "state_reason": run.state_reason,
        "ended_unix": run.ended_unix if run.HasField("ended_unix") else None,
        "last_activity_unix": run.last_activity_unix,
    }


def measurement_to_dict(m: pb.Measurement) -> dict[str, Any]:
    """One measurement as a flat dict: ``step``, then the keys ``ncserve compute`` prints."""
    row: dict[str, Any] = {"run_id": m.run_id, "step": m.step}
    row["epoch"] = m.epoch if m.HasField("epoch") else None
    complete = m.status == pb.STEP_COMPLETE
    row["status"] = "complete" if complete else "incomplete"
    if complete:
        metrics = m.metrics
        for key in METRIC_KEYS:
            row[key] = getattr(metrics, key)
        row["num_samples"] = metrics.num_samples
        row["num_classes"] = metrics.num_classes
        row["feature_dim"] = metrics.feature_dim
        for key in ("holdout_nc4", "holdout_accuracy", "holdout_num_samples"):
            if metrics.HasField(key):
                row[key] = getattr(metrics, key)
    else:
        row["incomplete_reason"] = m.incomplete_reason
    row["scalars"] = dict(m.scalars)
    row["finalized_unix"] = m.finalized_unix
    return row
