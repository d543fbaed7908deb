"""Retry policy for calls to the ncserve service.

Only transient conditions are retried: UNAVAILABLE (the server is down, restarting or
unreachable) and DEADLINE_EXCEEDED (one attempt ran out of time, e.g. on a congested link).
Every retry loop is bounded by an absolute deadline, so a caller never waits longer than it
asked for, whatever the number of attempts.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

T = TypeVar("T")

TRANSIENT_CODES: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
)

# Below twice this much time left, another attempt cannot complete a round trip; give up.
_MIN_ATTEMPT_S = 0.005


def status_code(error: BaseException) -> grpc.StatusCode | None:
    """The gRPC status code carried by ``error``, or None if it is not an RPC error."""
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        code = error.code()
        return code if isinstance(code, grpc.StatusCode) else None
    return None


def is_transient(error: BaseException) -> bool:
    return status_code(error) in TRANSIENT_CODES


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter.

    Attempt ``n`` (0-based) waits ``min(max_backoff_s, initial_backoff_s * multiplier**n)``
    scaled by a uniform factor in ``[1 - jitter, 1]``. The jitter keeps the ranks of a job,
    which all lose the service at the same moment, from reconnecting in lockstep.
    """

    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.initial_backoff_s > 0:
            raise ValueError(f"initial_backoff_s must be > 0, got {self.initial_backoff_s!r}")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"max_backoff_s must be >= initial_backoff_s ({self.initial_backoff_s!r}), "
                f"got {self.max_backoff_s!r}"
            )
        if not self.multiplier >= 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter!r}")

    def backoff_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        # Cap the exponent before exponentiating so huge attempt counts cannot overflow.
        exponent = min(attempt, 64)
        capped = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**exponent)
        return capped * (1.0 - self.jitter * self.rng.random())

    def call(
        self,
        attempt_fn: Callable[[float], T],
        deadline: float,
        *,
        retry_if: Callable[[BaseException], bool] = is_transient,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> T:
        """Call ``attempt_fn(timeout_s)`` until it succeeds or ``deadline`` passes.

        ``deadline`` is an absolute ``clock()`` time. Each attempt gets the time left as its
        own timeout, so the loop never overruns. An error for which ``retry_if`` is false
        propagates at once; when time runs out (or ``stop`` is set) the last retryable error
        propagates.
        """
        attempt = 0
        while True:
            remaining = deadline - clock()
            try:
                return attempt_fn(max(remaining, _MIN_ATTEMPT_S))
            except Exception as error:
                if not retry_if(error):
                    raise
                remaining = deadline - clock()
                if remaining < 2 * _MIN_ATTEMPT_S or (stop is not None and stop.is_set()):
                    raise
                # Near the deadline, shorten the pause so one last attempt still fits.
                pause = min(self.backoff_s(attempt), remaining / 2)
                attempt += 1
                if stop is not None:
                    if stop.wait(pause):
                        raise
                else:
                    time.sleep(pause)
