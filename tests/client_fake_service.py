"""A scripted in-process NCService for the client tests.

It speaks the real v1 protocol (the shared wire codec, the real messages) but keeps
everything in memory and lets a test inject failures, so the client's retry, buffering and
replay order can be checked call by call. The real service is tested against the client in
test_client_service.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from ncserve.metrics import Round1Stats
from ncserve.v1 import ncserve_pb2 as pb
from ncserve.v1 import ncserve_pb2_grpc as pb_grpc
from ncserve.wire import decode_arrays, encode_arrays


@dataclass
class FakeState:
    token: str | None = None
    runs: dict[str, pb.RegisterRunRequest] = field(default_factory=dict)
    # (run, step) -> rank -> arrays
    round1: dict[tuple[str, int], dict[int, dict[str, Any]]] = field(default_factory=dict)
    round2: dict[tuple[str, int], dict[int, pb.ShardHeader]] = field(default_factory=dict)
    scalars: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)
    # Every accepted call in arrival order: (method, run, step, rank).
    log: list[tuple[str, str, int | None, int | None]] = field(default_factory=list)
    # Status codes to answer the next calls with, before looking at them.
    inject: list[grpc.StatusCode] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakeService(pb_grpc.NCServiceServicer):
    def __init__(self, state: FakeState) -> None:
        self.s = state

    def _gate(self, context: grpc.ServicerContext) -> None:
        if self.s.token is not None:
            md = dict(context.invocation_metadata())
            if md.get("authorization") != f"Bearer {self.s.token}":
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        with self.s.lock:
            code = self.s.inject.pop(0) if self.s.inject else None
        if code is not None:
            context.abort(code, f"injected {code.name}")

    def RegisterRun(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._gate(context)
        with self.s.lock:
            created = request.run_id not in self.s.runs
            self.s.runs.setdefault(request.run_id, request)
            self.s.log.append(("register", request.run_id, None, None))
        return pb.RegisterRunReply(created=created)

    def _read_push(self, it: Iterator[Any], context: grpc.ServicerContext) -> tuple[Any, Any]:
        self._gate(context)
        header = next(it).header
        arrays = decode_arrays(c.chunk for c in it)
        if header.run_id not in self.s.runs:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown run_id {header.run_id!r}")
        return header, arrays

    def PushRound1(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        h, arrays = self._read_push(request_iterator, context)
        with self.s.lock:
            self.s.round1.setdefault((h.run_id, h.step), {})[h.rank] = arrays
            self.s.log.append(("round1", h.run_id, h.step, h.rank))
        return pb.PushReply(run_id=h.run_id, step=h.step, rank=h.rank, round=pb.ROUND_1)

    def _round1_complete(self, run_id: str, step: int) -> bool:
        world = self.s.runs[run_id].world_size
        return len(self.s.round1.get((run_id, step), {})) == world

    def FetchClassMeans(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._gate(context)
        while True:
            with self.s.lock:
                if self._round1_complete(request.run_id, request.step):
                    shards = self.s.round1[(request.run_id, request.step)]
                    run = self.s.runs[request.run_id]
                    break
            if (context.time_remaining() or 0) < 0.02:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "round 1 not complete in time")
            time.sleep(0.01)
        K, P = run.num_classes, run.feature_dim
        merged = Round1Stats.zeros(K, P)
        for rank in sorted(shards):
            merged = merged.merge(Round1Stats.from_arrays(shards[rank], K, P))
        yield from encode_arrays(merged.class_means().to_arrays())

    def PushRound2(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        h, _ = self._read_push(request_iterator, context)
        with self.s.lock:
            if not self._round1_complete(h.run_id, h.step):
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"round 2 of step {h.step} before round 1 is complete; retry later",
                )
            self.s.round2.setdefault((h.run_id, h.step), {})[h.rank] = h
            self.s.log.append(("round2", h.run_id, h.step, h.rank))
        return pb.PushReply(run_id=h.run_id, step=h.step, rank=h.rank, round=pb.ROUND_2)

    def RecordScalars(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._gate(context)
        if request.run_id not in self.s.runs:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown run_id {request.run_id!r}")
        with self.s.lock:
            self.s.scalars[(request.run_id, request.step)] = dict(request.values)
            self.s.log.append(("scalars", request.run_id, request.step, None))
        return pb.RecordScalarsReply(num_values=len(request.values))

    def ListRuns(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._gate(context)
        with self.s.lock:
            runs = [
                pb.RunInfo(
                    run_id=r.run_id,
                    num_classes=r.num_classes,
                    feature_dim=r.feature_dim,
                    world_size=r.world_size,
                    metadata=dict(r.metadata),
                )
                for r in self.s.runs.values()
            ]
        return pb.ListRunsReply(runs=runs)


class FakeServer:
    """Start/stop the fake on one fixed loopback port, keeping its state across restarts."""

    def __init__(self, state: FakeState, port: int = 0) -> None:
        self.state = state
        self.port = port
        self._server: grpc.Server | None = None

    def start(self) -> FakeServer:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_NCServiceServicer_to_server(FakeService(self.state), server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"
