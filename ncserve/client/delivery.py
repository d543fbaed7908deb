"""How an ``NCClient`` delivers its write calls: now when the service answers, else into the
durable buffer (memory, then a spool on disk) behind older calls, replayed oldest first by a
background thread; in order (a run's registration before its pushes, round 1 before
round 2), each call within its deadline plus the time to move its bytes.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

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
from ncserve.client.payload import decode_payload, encode_payload
from ncserve.client.retry import RetryPolicy, is_transient, status_code
from ncserve.client.types import RejectedEntry, ServiceError
from ncserve.protocol import RUN_STATE_VALUES
from ncserve.v1 import ncserve_pb2 as pb
from ncserve.v1 import ncserve_pb2_grpc as pb_grpc
from ncserve.wire import encode_arrays, payload_nbytes

log = logging.getLogger(__name__)

# A call that moves many bytes (a vocabulary-sized round 1, its class means) gets the time to
# move them at this floor rate on top of the deadline: 18 s more for GPT-2's head (589 MiB).
MIN_TRANSFER_BYTES_PER_S = 32 << 20


def transfer_allowance_s(nbytes: int) -> float:
    """Seconds added to a call's deadline for moving ``nbytes``."""
    return nbytes / MIN_TRANSFER_BYTES_PER_S


@dataclass
class Call:
    """One write call, in a form that can be sent now or encoded for the buffer."""

    key: BufferKey
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def payload(self) -> bytes:
        return encode_payload({"key": self.key.to_json(), **self.meta}, self.arrays)

    @classmethod
    def from_payload(cls, key: BufferKey, data: bytes) -> Call:
        meta, arrays = decode_payload(data)
        meta.pop("key", None)
        return cls(key, meta, arrays)


class RoundOneIncompleteError(Exception):
    """Round 2 arrived before every rank's round 1: wait, other ranks may be replaying."""


# The service's FAILED_PRECONDITION for a round 2 that came before every rank's round 1
# ("... before round 1 is complete (3 of 4 round-1 shards in ...); retry later"). Other
# FAILED_PRECONDITIONs, such as a step already marked incomplete, are final.
_ROUND1_PENDING = re.compile(r"before round 1 is complete|round 1 (is )?(not )?incomplete")


def is_round1_incomplete(error: BaseException) -> bool:
    if status_code(error) != grpc.StatusCode.FAILED_PRECONDITION:
        return False
    details = error_details(error).lower()
    return "marked incomplete" not in details and bool(_ROUND1_PENDING.search(details))


def error_details(error: BaseException) -> str:
    details = getattr(error, "details", None)
    text = details() if callable(details) else None
    return text or str(error)


CALL_METHODS = {
    KIND_REGISTER: "RegisterRun",
    KIND_FINISH: "FinishRun",
    KIND_ROUND1: "PushRound1",
    KIND_ROUND2: "PushRound2",
    KIND_SCALARS: "RecordScalars",
}


def shard_stream(
    header: pb.ShardHeader, arrays: Mapping[str, np.ndarray]
) -> Iterator[pb.ShardChunk]:
    yield pb.ShardChunk(header=header)
    for chunk in encode_arrays(arrays):
        yield pb.ShardChunk(chunk=chunk)


class Delivery:
    """The delivery half of NCClient (mixed into it; its state is set up there)."""

    deadline_s: float
    _buffer: DurableBuffer
    _retry: RetryPolicy
    _stub: pb_grpc.NCServiceStub
    _metadata: tuple[tuple[str, str], ...]
    _counts_lock: threading.Lock
    _delivered: int
    _replayed: int
    _rejected: list[RejectedEntry]
    _replay_lock: threading.Lock
    _refused_shards: set[tuple[str, int | None, int | None]]
    _round1_wait_since: dict[int, float]
    _round1_patience_s: float
    _down: threading.Event
    _stop: threading.Event
    _wake: threading.Event

    def _check_open(self) -> None:
        raise NotImplementedError

    def _service_error(self, method: str, error: grpc.RpcError) -> ServiceError:
        raise NotImplementedError

    def _submit(self, call: Call) -> bool:
        """Send ``call`` now, or buffer it behind older undelivered calls. Raises ServiceError
        only for a permanent refusal of this very call."""
        self._check_open()
        deadline = time.monotonic() + self.deadline_s
        # Order matters (a run's registration before its pushes, round 1 before round 2):
        # while older calls wait, a new one goes behind them. During a known outage, or
        # while the oldest call waits for other ranks, trying first would only stall.
        if len(self._buffer) and (self._down.is_set() or self._head_waits_for_round1()):
            self._enqueue(call)
            return False
        if len(self._buffer) and not self._drain(deadline):
            self._enqueue(call)
            return False
        try:
            self._send(call, deadline)
        except grpc.RpcError as error:
            if is_transient(error):
                self._down.set()
                self._enqueue(call)
                return False
            raise self._service_error(CALL_METHODS[call.key.kind], error) from None
        except RoundOneIncompleteError:
            # Another rank's round 1 is late (perhaps still in its own buffer): retry later.
            self._enqueue(call)
            return False
        self._down.clear()
        with self._counts_lock:
            self._delivered += 1
        return True

    def _head_waits_for_round1(self) -> bool:
        head = self._buffer.head_seq()
        return head is not None and head in self._round1_wait_since

    def _wait_drained(self, deadline: float) -> bool:
        """Replay with backoff until the buffer is empty (True) or ``deadline`` passes."""
        attempt = 0
        while len(self._buffer) and not self._drain(deadline):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stop.is_set():
                return False
            time.sleep(min(self._pause_after_failed_drain(attempt), remaining))
            attempt = 0 if not self._down.is_set() else attempt + 1
        return True

    def _pause_after_failed_drain(self, attempt: int) -> float:
        """How long to wait before draining again. While the service is down: the backoff.
        While it answers and the oldest call waits for other ranks' round 1 (which their own
        clients are replaying right now): a short poll, so the buffer empties as soon as
        they deliver and new calls stop queueing behind it."""
        if self._down.is_set():
            return self._retry.backoff_s(attempt)
        return self._retry.initial_backoff_s

    def _enqueue(self, call: Call) -> None:
        self._buffer.append(call.key, call.payload())
        self._wake.set()

    def _send(self, call: Call, deadline: float) -> None:
        """Deliver one call, retrying transient failures until ``deadline``."""
        kind = call.key.kind
        if kind == KIND_REGISTER:
            request = pb.RegisterRunRequest(
                run_id=call.key.run_id,
                num_classes=call.meta["num_classes"],
                feature_dim=call.meta["feature_dim"],
                world_size=call.meta["world_size"],
                metadata=call.meta["metadata"],
            )
            self._retry.call(
                lambda t: self._stub.RegisterRun(request, timeout=t, metadata=self._metadata),
                deadline,
                stop=self._stop,
            )
        elif kind == KIND_FINISH:
            finish_request = pb.FinishRunRequest(
                run_id=call.key.run_id,
                state=RUN_STATE_VALUES[call.meta["state"]],
                reason=call.meta["reason"],
            )
            self._retry.call(
                lambda t: self._stub.FinishRun(finish_request, timeout=t, metadata=self._metadata),
                deadline,
                stop=self._stop,
            )
        elif kind == KIND_SCALARS:
            scalars_request = pb.RecordScalarsRequest(
                run_id=call.key.run_id, step=call.key.step, values=call.meta["values"]
            )
            if call.meta.get("epoch") is not None:
                scalars_request.epoch = int(call.meta["epoch"])
            self._retry.call(
                lambda t: self._stub.RecordScalars(
                    scalars_request, timeout=t, metadata=self._metadata
                ),
                deadline,
                stop=self._stop,
            )
        else:
            header = self._shard_header(call)
            rpc = self._stub.PushRound1 if kind == KIND_ROUND1 else self._stub.PushRound2
            deadline += transfer_allowance_s(header.payload_bytes)

            def attempt(t: float) -> pb.PushReply:
                # A fresh generator per attempt: a retried stream starts from the header.
                return rpc(shard_stream(header, call.arrays), timeout=t, metadata=self._metadata)

            try:
                self._retry.call(attempt, deadline, stop=self._stop)
            except grpc.RpcError as error:
                if kind == KIND_ROUND2 and is_round1_incomplete(error):
                    raise RoundOneIncompleteError(error_details(error)) from error
                raise

    def _shard_header(self, call: Call) -> pb.ShardHeader:
        key = call.key
        header = pb.ShardHeader(
            run_id=key.run_id,
            step=key.step,
            rank=key.rank,
            round=pb.ROUND_1 if key.kind == KIND_ROUND1 else pb.ROUND_2,
            num_classes=call.meta["num_classes"],
            feature_dim=call.meta["feature_dim"],
            # Lets the service reserve this push's real size, not the round's largest.
            payload_bytes=payload_nbytes(call.arrays),
        )
        if call.meta.get("epoch") is not None:
            header.epoch = int(call.meta["epoch"])
        if call.meta.get("scalars"):
            header.scalars.update(call.meta["scalars"])
        tally = call.meta.get("train_tally")
        if tally is not None:
            header.train_tally.CopyFrom(
                pb.TrainTally(loss_sum=tally[0], num_correct=tally[1], num_samples=tally[2])
            )
        return header

    def _drain(self, deadline: float) -> bool:
        """Deliver buffered calls, oldest first, until empty (True) or blocked (False)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._replay_lock.acquire(timeout=remaining):
            return not len(self._buffer)
        try:
            while (entry := self._buffer.head()) is not None:
                if time.monotonic() >= deadline or self._stop.is_set():
                    return False
                key = entry.key
                shard = (key.run_id, key.step, key.rank)
                if key.kind == KIND_ROUND2 and shard in self._refused_shards:
                    self._reject(entry.seq, key, None, "round 1 of this shard was refused")
                    continue
                try:
                    call = Call.from_payload(key, entry.payload)
                    self._send(call, deadline)
                except grpc.RpcError as error:
                    if is_transient(error):
                        self._down.set()
                        return False
                    self._reject(entry.seq, key, status_code(error), error_details(error))
                    continue
                except RoundOneIncompleteError as waiting:
                    self._down.clear()  # the service answered
                    first = self._round1_wait_since.setdefault(entry.seq, time.monotonic())
                    if time.monotonic() - first < self._round1_patience_s:
                        return False
                    self._reject(
                        entry.seq,
                        key,
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"{waiting} (gave up after {self._round1_patience_s:g} s)",
                    )
                    continue
                except (ValueError, KeyError, TypeError) as error:
                    # A payload this client cannot decode will never become deliverable.
                    self._reject(entry.seq, key, None, f"undecodable buffered call: {error}")
                    continue
                self._down.clear()
                self._buffer.remove(entry.seq)
                self._round1_wait_since.pop(entry.seq, None)
                with self._counts_lock:
                    self._delivered += 1
                    self._replayed += 1
            return True
        finally:
            self._replay_lock.release()

    def _reject(self, seq: int, key: BufferKey, code: grpc.StatusCode | None, details: str) -> None:
        self._buffer.remove(seq)
        self._round1_wait_since.pop(seq, None)
        if key.kind == KIND_ROUND1:
            self._refused_shards.add((key.run_id, key.step, key.rank))
        name = code.name if code is not None else "CLIENT"
        log.error("ncserve refused buffered %s: %s: %s", key, name, details)
        with self._counts_lock:
            self._rejected.append(RejectedEntry(key, name, details))

    def _replay_loop(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            if not len(self._buffer):
                self._wake.wait()
                self._wake.clear()
                attempt = 0
                continue
            if self._drain(time.monotonic() + self.deadline_s):
                attempt = 0
                continue
            self._stop.wait(self._pause_after_failed_drain(attempt))
            attempt = 0 if not self._down.is_set() else attempt + 1
