"""Client library of the ncserve service (used by training ranks and the CLI).

See docs/CONTRACTS.md ("Client") for the API and ``ncserve.client.client`` for the
delivery guarantees: deadlines on every call, retries with backoff, a durable bounded
buffer that replays in order, and a report of what could not be delivered.
"""

from ncserve.client.buffer import BufferKey, DroppedEntry, SpoolInUseError
from ncserve.client.client import NCClient
from ncserve.client.retry import RetryPolicy
from ncserve.client.types import (
    DeliveryReport,
    RejectedEntry,
    ServiceError,
    TLSConfig,
    TrainTally,
)

__all__ = [
    "BufferKey",
    "DeliveryReport",
    "DroppedEntry",
    "NCClient",
    "RejectedEntry",
    "RetryPolicy",
    "ServiceError",
    "SpoolInUseError",
    "TLSConfig",
    "TrainTally",
]
