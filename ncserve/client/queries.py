"""The read side of NCClient: runs, measurements, a watch, and deleting a run. Queries raise
ServiceError (no buffer to fall back on); mixed into NCClient, which owns the channel."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc

from ncserve.client.retry import TRANSIENT_CODES, RetryPolicy, status_code
from ncserve.client.types import ServiceError, measurement_to_dict, run_to_dict
from ncserve.protocol import RUN_STATE_VALUES
from ncserve.v1 import ncserve_pb2 as pb
from ncserve.v1 import ncserve_pb2_grpc as pb_grpc

T = TypeVar("T")


class ServiceQueries:
    """Queries of NCClient (see client.py for the channel, deadlines and retries)."""

    deadline_s: float
    _stub: pb_grpc.NCServiceStub
    _metadata: tuple[tuple[str, str], ...]
    _retry: RetryPolicy
    _stop: threading.Event
    _watches: set[Any]
    _watches_lock: threading.Lock

    def _check_open(self) -> None:
        raise NotImplementedError  # NCClient's

    def _query(self, method: str, rpc: Callable[..., T], request: Any) -> T:
        raise NotImplementedError  # NCClient's

    def _service_error(self, method: str, error: grpc.RpcError) -> ServiceError:
        raise NotImplementedError  # NCClient's

    def list_runs(self, states: Iterable[str] = (), *, page_size: int = 0) -> list[dict[str, Any]]:
        """Every run (oldest first), or those in ``states``, reading page after page."""
        wanted = [RUN_STATE_VALUES[state] for state in states]
        runs: list[dict[str, Any]] = []
        token = ""
        while True:
            request = pb.ListRunsRequest(page_size=page_size, page_token=token, states=wanted)
            reply = self._query("ListRuns", self._stub.ListRuns, request)
            runs.extend(run_to_dict(run) for run in reply.runs)
            token = reply.next_page_token
            if not token:
                return runs

    def delete_run(self, run_id: str) -> dict[str, int]:
        """Remove a run and everything the service stored of it."""
        reply = self._query("DeleteRun", self._stub.DeleteRun, pb.DeleteRunRequest(run_id=run_id))
        return {
            "num_measurements": reply.num_measurements,
            "num_scalar_steps": reply.num_scalar_steps,
        }

    def get_run(self, run_id: str) -> dict[str, Any]:
        reply = self._query("GetRun", self._stub.GetRun, pb.GetRunRequest(run_id=run_id))
        return run_to_dict(reply)

    def get_metrics(
        self,
        run_id: str,
        step: int | None = None,
        all_steps: bool = False,
        *,
        include_incomplete: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """One step (``step``), every step (``all_steps``: a list, by step) or the latest."""
        if step is not None and all_steps:
            raise ValueError("give either step or all_steps=True, not both")
        request = pb.GetMetricsRequest(run_id=run_id, include_incomplete=include_incomplete)
        if all_steps:
            request.range.SetInParent()
        elif step is not None:
            request.step = int(step)
        else:
            request.latest = True
        reply = self._query("GetMetrics", self._stub.GetMetrics, request)
        rows = [measurement_to_dict(m) for m in reply.measurements]
        if all_steps:
            return rows
        if not rows:
            what = f"step {step}" if step is not None else "a latest measurement"
            raise ServiceError(
                "GetMetrics", grpc.StatusCode.NOT_FOUND, f"run {run_id!r} has no {what}"
            )
        return rows[0]

    def watch(
        self,
        run_id: str,
        *,
        after_step: int | None = None,
        include_incomplete: bool = False,
        reconnect_s: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Measurements of ``run_id`` as they are finalized, until the caller stops iterating
        or the client is closed.

        With ``after_step`` the stored measurements after that step come first. If the
        stream breaks (server restart), it reconnects with backoff and resumes after the last
        step seen, giving up with ServiceError(UNAVAILABLE) after ``reconnect_s`` (default:
        the client's deadline) without a connection.
        """
        self._check_open()
        window = self.deadline_s if reconnect_s is None else float(reconnect_s)
        last = after_step
        down_since: float | None = None
        attempt = 0
        while not self._stop.is_set():
            request = pb.WatchMetricsRequest(run_id=run_id, include_incomplete=include_incomplete)
            if last is not None:
                request.after_step = int(last)
            call = self._stub.WatchMetrics(request, metadata=self._metadata)
            with self._watches_lock:
                self._watches.add(call)
            try:
                for measurement in call:
                    down_since, attempt = None, 0
                    last = measurement.step if last is None else max(last, measurement.step)
                    yield measurement_to_dict(measurement)
                return  # the server ended the stream (shutdown) without an error
            except grpc.RpcError as error:
                code = status_code(error)
                if code == grpc.StatusCode.CANCELLED and self._stop.is_set():
                    return
                if code not in TRANSIENT_CODES:
                    raise self._service_error("WatchMetrics", error) from None
                now = time.monotonic()
                down_since = now if down_since is None else down_since
                if now - down_since >= window:
                    raise self._service_error("WatchMetrics", error) from None
                if self._stop.wait(self._retry.backoff_s(attempt)):
                    return
                attempt += 1
            finally:
                call.cancel()
                with self._watches_lock:
                    self._watches.discard(call)
