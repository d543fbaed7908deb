"""Domain errors of the service, each naming the gRPC status it maps to.

The aggregator and the store raise these; the servicer turns them into a status
code and message (the only place that knows gRPC). ``reason`` is the label of
``ncserve_shards_rejected_total`` when the error rejects a shard.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base: ``status`` is a ``grpc.StatusCode`` name, ``reason`` a rejection label."""

    status = "INTERNAL"
    reason = "invalid_argument"


class InvalidArgument(ServiceError):
    status = "INVALID_ARGUMENT"
    reason = "invalid_argument"


class TruncatedStream(InvalidArgument):
    """A push stream that ended before its trailer (or without a header)."""

    reason = "truncated"


class NotFound(ServiceError):
    status = "NOT_FOUND"
    reason = "not_found"


class FailedPrecondition(ServiceError):
    status = "FAILED_PRECONDITION"
    reason = "failed_precondition"


class AlreadyExists(ServiceError):
    # Counted with failed_precondition: the label set of rejections is fixed.
    status = "ALREADY_EXISTS"
    reason = "failed_precondition"


class ResourceExhausted(ServiceError):
    status = "RESOURCE_EXHAUSTED"
    reason = "resource_exhausted"


class Unavailable(ServiceError):
    """The server cannot do it now (store read-only, shutting down); retry later."""

    status = "UNAVAILABLE"
    reason = "resource_exhausted"
