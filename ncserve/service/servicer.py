"""The gRPC servicer: validate, translate to domain objects, call the aggregator, map errors."""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn, TypeVar, cast

import grpc

from ncserve import wire
from ncserve.metrics import ClassMeans
from ncserve.protocol import RUN_END_STATES, RUN_STATE_NAMES, RUN_STATE_VALUES
from ncserve.service.aggregator import (
    Aggregator,
    PushResult,
    RunView,
    ShardPush,
)
from ncserve.service.errors import (
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    TruncatedStream,
)
from ncserve.service.exporter import ServiceMetrics
from ncserve.service.guard import SMALL_BYTES, ByteBudget, StreamGuard
from ncserve.service.records import MeasurementRecord, RunRecord
from ncserve.service.shards import expected_payload_bytes
from ncserve.v1 import ncserve_pb2 as pb
from ncserve.v1 import ncserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_NC_INT_FIELDS = {"num_samples", "num_classes", "feature_dim", "holdout_num_samples"}
_MEANS_CACHE_ENTRIES = 4


Handler = TypeVar("Handler", bound=Callable[..., Any])


def _status_from_errors(method: Handler) -> Handler:
    """The one place where a domain error becomes its gRPC status: the handler raises
    ``ServiceError``; this aborts the call with the error's status and message (and counts
    a refused push by its reason)."""
    name = method.__name__
    counts_rejections = name.startswith("Push")

    def fail(self: NCServicer, context: grpc.ServicerContext, exc: ServiceError) -> NoReturn:
        if counts_rejections:
            self._metrics.shard_rejected(exc.reason)
        _abort(context, exc)

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self: NCServicer, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, request, context)
            except ServiceError as exc:
                fail(self, context, exc)

        return cast(Handler, streaming)

    @functools.wraps(method)
    def unary(self: NCServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except ServiceError as exc:
            fail(self, context, exc)

    return cast(Handler, unary)


def _abort(context: grpc.ServicerContext, exc: ServiceError) -> NoReturn:
    context.abort(getattr(grpc.StatusCode, exc.status), str(exc))
    raise AssertionError("context.abort returned")  # abort always raises


# A ListRuns reply stops adding runs before it passes this size (the message limit is at
# least 2 MiB; one run with the largest metadata allowed is under 80 KB).
LIST_RUNS_REPLY_BUDGET = 1 << 20


def _state_name(value: int, field: str) -> str:
    name = RUN_STATE_NAMES.get(pb.RunState.ValueType(value))
    if name is None:
        raise InvalidArgument(
            f"{field}={value} is not a run state; allowed: "
            + ", ".join(pb.RunState.Name(v) for v in RUN_STATE_VALUES.values())
        )
    return name


def run_info(view: RunView) -> pb.RunInfo:
    run = view.run
    info = pb.RunInfo(
        run_id=run.run_id,
        num_classes=run.num_classes,
        feature_dim=run.feature_dim,
        world_size=run.world_size,
        metadata=run.metadata,
        created_unix=run.created_unix,
        num_measurements=view.counts.num_measurements,
        num_incomplete=view.counts.num_incomplete,
        num_open_steps=view.num_open_steps,
        state=RUN_STATE_VALUES[run.state],
        state_reason=run.state_reason,
        last_activity_unix=run.last_activity_unix,
    )
    if view.counts.latest_step is not None:
        info.latest_step = view.counts.latest_step
    if view.counts.first_step is not None:
        info.first_step = view.counts.first_step
    if run.ended_unix is not None:
        info.ended_unix = run.ended_unix
    return info


def measurement(record: MeasurementRecord) -> pb.Measurement:
    message = pb.Measurement(
        run_id=record.run_id,
        step=record.step,
        status=pb.STEP_COMPLETE if record.status == "complete" else pb.STEP_INCOMPLETE,
        incomplete_reason=record.reason,
        finalized_unix=record.finalized_unix,
        scalars=record.scalars,
    )
    if record.epoch is not None:
        message.epoch = record.epoch
    if record.metrics is not None:
        fields = pb.NCMetrics.DESCRIPTOR.fields_by_name
        for key, value in record.metrics.items():
            if key in fields:
                setattr(message.metrics, key, int(value) if key in _NC_INT_FIELDS else float(value))
        message.metrics.SetInParent()  # present even if no key matched
    return message


def _round_name(value: int) -> str:
    # A client may send any int32 in an enum field; Round.Name raises on undefined ones.
    return pb.Round.Name(value) if value in pb.Round.values() else str(value)


def _push_reply(result: PushResult) -> pb.PushReply:
    return pb.PushReply(
        run_id=result.run_id,
        step=result.step,
        rank=result.rank,
        round=pb.Round.Name(result.round),
        payload_bytes=result.payload_bytes,
        payload_sha256=result.payload_sha256,
    )


@dataclasses.dataclass
class _EncodedMeans:
    """The class means of one step, serialized once for all ranks (``lock`` guards the
    rest): the TensorChunk messages of the stream, and the tensor bytes they carry."""

    means: ClassMeans
    messages: list[bytes] | None = None
    payload_bytes: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def serialize_tensor_chunk(message: pb.TensorChunk | bytes) -> bytes:
    """Response serializer of FetchClassMeans: its streams are serialized once per step."""
    return message if isinstance(message, bytes) else message.SerializeToString()


class NCServicer(pb_grpc.NCServiceServicer):
    """Implements ncserve.v1.NCService on top of an Aggregator."""

    def __init__(
        self,
        aggregator: Aggregator,
        metrics: ServiceMetrics,
        guard: StreamGuard,
        max_shard_bytes: int,
        max_inflight_bytes: int,
    ) -> None:
        self._agg = aggregator
        self._metrics = metrics
        self._guard = guard
        self._max_shard_bytes = max_shard_bytes
        self._budget = ByteBudget(
            max_inflight_bytes, aggregator.limits.step_deadline_s, small_bytes=SMALL_BYTES
        )
        self._means_lock = threading.Lock()
        # Encoded once per step and shared by every rank's FetchClassMeans.
        self._means_cache: collections.OrderedDict[tuple[str, int], _EncodedMeans] = (
            collections.OrderedDict()
        )

    # -- runs --------------------------------------------------------------------------------

    @_status_from_errors
    def RegisterRun(
        self, request: pb.RegisterRunRequest, context: grpc.ServicerContext
    ) -> pb.RegisterRunReply:
        created, run = self._agg.register_run(
            request.run_id,
            request.num_classes,
            request.feature_dim,
            request.world_size,
            dict(request.metadata),
        )
        view = self._agg.run_view(run.run_id)
        return pb.RegisterRunReply(created=created, run=run_info(view))

    @_status_from_errors
    def ListRuns(
        self, request: pb.ListRunsRequest, context: grpc.ServicerContext
    ) -> pb.ListRunsReply:
        states = [_state_name(v, "states") for v in request.states]
        views, more = self._agg.list_runs_page(request.page_size, request.page_token, states)
        reply = pb.ListRunsReply()
        size = 0
        for index, view in enumerate(views):
            info = run_info(view)
            size += info.ByteSize() + 8  # field tag and length of the repeated entry
            if index > 0 and size > LIST_RUNS_REPLY_BUDGET:
                more = True
                break
            reply.runs.append(info)
        if more:
            last = views[len(reply.runs) - 1].run
            reply.next_page_token = self._agg.runs.next_token(last, states)
        return reply

    @_status_from_errors
    def FinishRun(self, request: pb.FinishRunRequest, context: grpc.ServicerContext) -> pb.RunInfo:
        state = _state_name(request.state, "state")
        view = self._agg.finish_run(request.run_id, state, request.reason)
        return run_info(view)

    @_status_from_errors
    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        run = self._agg.heartbeat(request.run_id)
        return pb.HeartbeatReply(state=RUN_STATE_VALUES[run.state])

    @_status_from_errors
    def DeleteRun(
        self, request: pb.DeleteRunRequest, context: grpc.ServicerContext
    ) -> pb.DeleteRunReply:
        measurements, scalar_steps = self._agg.delete_run(request.run_id)
        with self._means_lock:
            for key in [k for k in self._means_cache if k[0] == request.run_id]:
                del self._means_cache[key]
        return pb.DeleteRunReply(num_measurements=measurements, num_scalar_steps=scalar_steps)

    @_status_from_errors
    def GetRun(self, request: pb.GetRunRequest, context: grpc.ServicerContext) -> pb.RunInfo:
        return run_info(self._agg.run_view(request.run_id))

    # -- pushes ------------------------------------------------------------------------------

    @_status_from_errors
    def PushRound1(
        self, request_iterator: Iterable[pb.ShardChunk], context: grpc.ServicerContext
    ) -> pb.PushReply:
        return self._push(request_iterator, context, pb.ROUND_1)

    @_status_from_errors
    def PushRound2(
        self, request_iterator: Iterable[pb.ShardChunk], context: grpc.ServicerContext
    ) -> pb.PushReply:
        return self._push(request_iterator, context, pb.ROUND_2)

    def _push(
        self, request_iterator: Iterable[pb.ShardChunk], context: grpc.ServicerContext, round_: int
    ) -> pb.PushReply:
        with self._guard.admit(context, timed=True) as stream:
            messages = stream.messages(iter(request_iterator), time.monotonic)
            header, run, declared = self._read_header(messages, round_)
            # A rank has a push of each round in flight at most, and perhaps a retry of
            # one whose reply was lost: three per rank is generous, and still bounded
            # by the run's own size.
            self._guard.claim_run(stream, run.run_id, 3 * run.world_size + 4)
            limit = self._payload_limit(run, round_)
            if declared is not None and declared > limit:
                raise ResourceExhausted(
                    f"header payload_bytes={declared} is over the {limit} bytes this "
                    f"service takes in a round-{round_} push for K={run.num_classes}, "
                    f"p={run.feature_dim}"
                )
            # Charged once the tensor bytes start to arrive (a header alone holds
            # nothing) and held until the shard is merged: bounds the memory of decoded
            # shards whatever the number of ranks pushing at once; the others wait in
            # gRPC flow control. A sender that declares its size is charged that, not
            # the most a push of the round can carry (W, which one rank sends, doubles
            # a round-1 push). A push that stalls while charged is cut by the idle
            # timeout, which releases the charge.
            first = next(messages, None)
            cost = expected_payload_bytes(run, round_) if declared is None else declared
            with self._budget.hold(cost, context.time_remaining()):
                body = itertools.chain([] if first is None else [first], messages)
                payload = self._read_payload(body, header, limit, declared)
                result = self._agg.push(payload)
        return _push_reply(result)

    def _read_header(
        self, messages: Iterator[pb.ShardChunk], round_: int
    ) -> tuple[ShardPush, RunRecord, int | None]:
        """The push as the header describes it, its run, and the declared payload size."""
        first = next(messages, None)
        if first is None:
            raise TruncatedStream("push stream is empty: expected a ShardHeader first")
        if first.WhichOneof("body") != "header":
            raise InvalidArgument("the first message of a push must carry the ShardHeader")
        header = first.header
        if header.round != round_:
            raise InvalidArgument(
                f"header round={_round_name(header.round)} but this RPC is "
                f"PushRound{round_} (round={_round_name(round_)})"
            )
        tally = header.train_tally if header.HasField("train_tally") else None
        push = ShardPush(
            run_id=header.run_id,
            step=header.step,
            rank=header.rank,
            round=round_,
            num_classes=header.num_classes,
            feature_dim=header.feature_dim,
            epoch=header.epoch if header.HasField("epoch") else None,
            scalars=dict(header.scalars),
            train_tally=None
            if tally is None
            else (tally.loss_sum, tally.num_correct, tally.num_samples),
            arrays={},
            payload_sha256="",
            payload_bytes=0,
        )
        declared = header.payload_bytes if header.HasField("payload_bytes") else None
        if declared == 0:
            raise InvalidArgument("header payload_bytes=0: a push carries at least one tensor")
        return push, self._agg.check_header(push), declared

    def _read_payload(
        self,
        messages: Iterator[pb.ShardChunk],
        header: ShardPush,
        limit: int,
        declared: int | None,
    ) -> ShardPush:
        where = f"push of rank {header.rank}"
        assembler = wire.ArrayAssembler(max_total_bytes=limit if declared is None else declared)
        try:
            for message in messages:
                if message.WhichOneof("body") != "chunk":
                    raise InvalidArgument("a push carries one ShardHeader, in its first message")
                assembler.feed(message.chunk)
            arrays = assembler.arrays()
        except wire.WireError as exc:
            if exc.reason == "truncated":
                raise TruncatedStream(f"{where}: {exc}") from exc
            if exc.reason == "resource_exhausted":
                if declared is not None:
                    raise InvalidArgument(
                        f"{where}: its tensors are larger than the header's "
                        f"payload_bytes={declared}: {exc}"
                    ) from exc
                raise ResourceExhausted(f"{where}: {exc}") from exc
            raise InvalidArgument(f"{where}: {exc}") from exc
        if declared is not None and assembler.payload_bytes != declared:
            raise InvalidArgument(
                f"{where}: header payload_bytes={declared} but the stream carried "
                f"{assembler.payload_bytes} bytes"
            )
        return dataclasses.replace(
            header,
            arrays=arrays,
            payload_sha256=assembler.sha256_hex,
            payload_bytes=assembler.payload_bytes,
        )

    def _payload_limit(self, run: RunRecord, round_: int) -> int:
        # Slack over the exact size lets a wrongly shaped tensor through to the validation
        # that names it; only absurd declarations are refused outright.
        expected = expected_payload_bytes(run, round_)
        return min(2 * expected + wire.MAX_PIECE_BYTES, self._max_shard_bytes)

    # -- class means -------------------------------------------------------------------------

    @_status_from_errors
    def FetchClassMeans(
        self, request: pb.ClassMeansRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Stream the step's class means as TensorChunk messages, already serialized
        (see ``serialize_tensor_chunk``, this method's response serializer)."""
        remaining = context.time_remaining()
        # However long the client is willing to wait, the step closes by its deadline.
        step_deadline = self._agg.limits.step_deadline_s
        wait_s = step_deadline if remaining is None else min(max(remaining, 0.0), step_deadline)
        with self._guard.admit(context, timed=False):
            means = self._agg.class_means(
                request.run_id, request.step, request.rank, wait_s, context.is_active
            )
            encoded = self._encoded_means(request.run_id, request.step, means)
            assert encoded.messages is not None
            # All ranks of a step are answered at once, when its round 1 completes, and
            # each answer is a copy in gRPC until its client has read it: held in the
            # in-flight budget, those copies stay bounded whatever the number of ranks.
            with self._budget.hold(encoded.payload_bytes, context.time_remaining()):
                yield from encoded.messages

    def _encoded_means(self, run_id: str, step: int, means: ClassMeans) -> _EncodedMeans:
        # Every rank of a step asks at the same moment (when its round 1 completes): one
        # of them encodes while the others wait for that, instead of each encoding again.
        key = (run_id, step)
        with self._means_lock:
            entry = self._means_cache.get(key)
            if entry is None or entry.means is not means:
                entry = _EncodedMeans(means)
                self._means_cache[key] = entry
                while len(self._means_cache) > _MEANS_CACHE_ENTRIES:
                    self._means_cache.popitem(last=False)
            else:
                self._means_cache.move_to_end(key)
        with entry.lock:
            if entry.messages is None:
                # Clients check class means by their CRC-32 (decode_arrays): no digest.
                chunks = list(wire.encode_arrays(means.to_arrays(), digest=False))
                entry.payload_bytes = chunks[-1].trailer.total_bytes
                entry.messages = [c.SerializeToString() for c in chunks]
            return entry

    # -- scalars and queries -----------------------------------------------------------------

    @_status_from_errors
    def RecordScalars(
        self, request: pb.RecordScalarsRequest, context: grpc.ServicerContext
    ) -> pb.RecordScalarsReply:
        count = self._agg.record_scalars(
            request.run_id,
            request.step,
            request.epoch if request.HasField("epoch") else None,
            dict(request.values),
        )
        return pb.RecordScalarsReply(num_values=count)

    @_status_from_errors
    def GetMetrics(
        self, request: pb.GetMetricsRequest, context: grpc.ServicerContext
    ) -> pb.GetMetricsReply:
        which = request.WhichOneof("selection")
        if which == "step":
            records = self._agg.measurements(
                request.run_id, step=request.step, include_incomplete=request.include_incomplete
            )
        elif which == "range":
            rng = request.range
            records = self._agg.measurements(
                request.run_id,
                first=rng.first if rng.HasField("first") else None,
                last=rng.last if rng.HasField("last") else None,
                include_incomplete=request.include_incomplete,
            )
        else:
            records = self._agg.measurements(request.run_id, latest=True)
        return pb.GetMetricsReply(measurements=[measurement(r) for r in records])

    @_status_from_errors
    def GetScalars(
        self, request: pb.GetScalarsRequest, context: grpc.ServicerContext
    ) -> pb.GetScalarsReply:
        rng = request.range
        records = self._agg.scalars(
            request.run_id,
            rng.first if rng.HasField("first") else None,
            rng.last if rng.HasField("last") else None,
            list(request.keys),
        )
        out = pb.GetScalarsReply()
        for record in records:
            item = out.records.add(step=record.step, values=record.values)
            if record.epoch is not None:
                item.epoch = record.epoch
        return out

    @_status_from_errors
    def WatchMetrics(
        self, request: pb.WatchMetricsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Measurement]:
        include = request.include_incomplete
        after = request.after_step if request.HasField("after_step") else None
        with self._guard.admit(context, timed=False):
            backlog, last_id = self._agg.watch_backlog(request.run_id, after, include)
            for record in backlog:
                yield measurement(record)
            while context.is_active() and not self._agg.shutting_down:
                # Read the event counter and the run's state before querying: a change in
                # between is not missed.
                seq = self._agg.event_seq
                ended = self._agg.run(request.run_id).state in RUN_END_STATES
                for record in self._agg.measurements_after(request.run_id, last_id, include):
                    last_id = max(last_id, record.id)
                    yield measurement(record)
                if ended:
                    return  # finished or failed: everything it stored has been sent
                self._agg.wait_for_change(seq, 1.0)
