"""Flow control of the service: how many streams it serves at once, for how long, and how
many bytes of pushes it decodes at once.

No client can take the service from the others:

- ``StreamGuard`` admits push, class-means and watch streams up to a server-wide limit, a
  per-peer limit and (pushes) a per-run limit; past one, the stream is refused at once
  (UNAVAILABLE, retryable) instead of holding a worker thread. Every push stream has an idle
  timeout (the longest the server waits for its next message) and a lifetime; a watchdog
  cancels a stream past either, which frees its thread and whatever budget it held. The
  worker threads left over (``--max-workers`` minus the stream limit) always serve unary
  calls and health.
- ``ByteBudget`` bounds the payload bytes decoded at once. A push is charged when its first
  tensor bytes arrive (not at its header), and a push that then stalls is cut by the idle
  timeout, so a stalled stream holds the budget for at most that long; small pushes and
  class-means answers (at most 256 KiB) are not charged, so they never wait behind it.
  (Charging each chunk as it arrives would let every stream hold part of the budget while
  waiting for the rest: a livelock once the ranks of a step together need more than it.)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from ncserve.service.errors import TruncatedStream, Unavailable

T = TypeVar("T")

# Pushes and class-means answers of at most this many bytes are not charged to the budget.
SMALL_BYTES = 256 << 10


class ByteBudget:
    """Counting semaphore over bytes, granted in arrival order. A request larger than the
    whole budget takes all of it.

    Each waiter has its own event and a release wakes only the waiters it lets in: with
    every rank of a step asking at once, waking them all on each release (to find the one
    that fits) cost more than the work they waited for.

    Requests of at most ``small_bytes`` are not charged: the memory they can hold is bounded
    by the stream limit times that, and they never wait behind a large request that stalls.
    """

    def __init__(self, capacity: int, max_wait_s: float, small_bytes: int = 0) -> None:
        self._capacity = capacity
        self._max_wait_s = max_wait_s
        # Requests of at most this many bytes pass without being charged.
        self._small_bytes = small_bytes
        self._used = 0
        self._lock = threading.Lock()
        self._waiters: collections.deque[_BudgetWaiter] = collections.deque()

    @contextlib.contextmanager
    def hold(self, num_bytes: int, timeout_s: float | None) -> Iterator[None]:
        if num_bytes <= self._small_bytes:
            # Too small to queue for: the memory is bounded by the stream limit times this,
            # and a small push or class-means answer never waits behind a large one that
            # stalls.
            yield
            return
        need = min(num_bytes, self._capacity)
        wait_s = self._max_wait_s if timeout_s is None else max(timeout_s, 0.0)
        with self._lock:
            if not self._waiters and self._used + need <= self._capacity:
                self._used += need
                waiter = None
            else:
                waiter = _BudgetWaiter(need)
                self._waiters.append(waiter)
        if waiter is not None and not waiter.granted.wait(wait_s):
            with self._lock:
                if not waiter.granted.is_set():
                    self._waiters.remove(waiter)
                    self._grant()  # those behind it may fit now
                    raise Unavailable(
                        f"server busy: {self._used} bytes of pushes in flight (limit "
                        f"{self._capacity}, --max-inflight-bytes); retry"
                    )
        try:
            yield
        finally:
            with self._lock:
                self._used -= need
                self._grant()

    def _grant(self) -> None:
        """Let in waiters, first come first served, while they fit. Caller holds the lock."""
        while self._waiters and self._used + self._waiters[0].need <= self._capacity:
            waiter = self._waiters.popleft()
            self._used += waiter.need
            waiter.granted.set()


@dataclasses.dataclass(eq=False)
class _BudgetWaiter:
    need: int
    granted: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass(frozen=True)
class StreamLimits:
    """Bounds on the streams a server serves at once."""

    # Streams of every kind at once; the rest of the worker threads serve unary calls.
    max_streams: int = 224
    # Streams from one peer address (a node's ranks share one) at once.
    max_streams_per_peer: int = 224
    # The longest the server waits for a push stream's next message.
    idle_timeout_s: float = 10.0
    # The longest a push stream may last, whatever it sends.
    lifetime_s: float = 600.0


@dataclasses.dataclass(eq=False)
class GuardedStream:
    """One admitted stream: its peer, run, and whether (and since when) the server is
    waiting for its next message."""

    context: grpc.ServicerContext
    peer: str
    timed: bool
    started: float
    run_id: str | None = None
    waiting_since: float | None = None
    cut: str = ""

    def messages(self, iterator: Iterator[T], clock: Callable[[], float]) -> Iterator[T]:
        """The stream's messages; the watchdog cuts it while it is silent too long."""
        while True:
            self.waiting_since = clock()
            try:
                message = next(iterator)
            except StopIteration:
                return
            except grpc.RpcError:
                # The call ended under the read: cut by the watchdog, or by the client.
                why = self.cut or "the client cancelled it"
                raise TruncatedStream(f"the stream ended before its trailer: {why}") from None
            finally:
                self.waiting_since = None
            yield message


class StreamGuard:
    """Admission and timeouts of streaming RPCs (see the module docstring)."""

    def __init__(self, limits: StreamLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._streams: set[GuardedStream] = set()
        self._per_peer: collections.Counter[str] = collections.Counter()
        self._per_run: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(
            target=self._watch, name="ncserve-stream-watchdog", daemon=True
        )
        self._watchdog.start()

    def close(self) -> None:
        self._stop.set()
        self._watchdog.join()

    @contextlib.contextmanager
    def admit(self, context: grpc.ServicerContext, *, timed: bool) -> Iterator[GuardedStream]:
        """Admit a stream, or raise Unavailable naming the limit it hit. ``timed`` streams
        (pushes) get the idle timeout and the lifetime."""
        peer = _peer_host(context.peer())
        with self._lock:
            if len(self._streams) >= self.limits.max_streams:
                raise Unavailable(
                    f"server busy: {len(self._streams)} streams open, its limit "
                    "(--max-streams); retry"
                )
            if self._per_peer[peer] >= self.limits.max_streams_per_peer:
                raise Unavailable(
                    f"server busy: {self._per_peer[peer]} streams open from {peer}, the limit "
                    "per peer (--max-streams-per-peer); retry"
                )
            stream = GuardedStream(context, peer, timed, self._clock())
            self._streams.add(stream)
            self._per_peer[peer] += 1
        try:
            yield stream
        finally:
            with self._lock:
                self._streams.discard(stream)
                self._per_peer[peer] -= 1
                if not self._per_peer[peer]:
                    del self._per_peer[peer]
                if stream.run_id is not None:
                    self._per_run[stream.run_id] -= 1
                    if not self._per_run[stream.run_id]:
                        del self._per_run[stream.run_id]

    def claim_run(self, stream: GuardedStream, run_id: str, limit: int) -> None:
        """Count the stream against its run: at most ``limit`` at once."""
        with self._lock:
            if self._per_run[run_id] >= limit:
                raise Unavailable(
                    f"run {run_id!r} already has {self._per_run[run_id]} push streams open, "
                    f"the most its world size needs ({limit}); retry"
                )
            self._per_run[run_id] += 1
            stream.run_id = run_id

    def open_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    def _watch(self) -> None:
        interval = max(0.01, min(0.25, self.limits.idle_timeout_s / 4))
        while not self._stop.wait(interval):
            now = self._clock()
            with self._lock:
                streams = [s for s in self._streams if s.timed and not s.cut]
            for stream in streams:
                waiting = stream.waiting_since
                if waiting is not None and now - waiting > self.limits.idle_timeout_s:
                    stream.cut = f"no message for {self.limits.idle_timeout_s:g}s"
                elif now - stream.started > self.limits.lifetime_s:
                    stream.cut = f"open longer than {self.limits.lifetime_s:g}s"
                else:
                    continue
                # Ends the call (the client sees CANCELLED) and wakes the handler's read.
                stream.context.cancel()


def _peer_host(peer: str) -> str:
    """ "ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7" (a node's ranks share their address)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return peer
