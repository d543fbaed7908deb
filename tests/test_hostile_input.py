"""Hostile input, generated (hypothesis): at least a thousand malformed requests straight at
the gRPC API of one in-process server, and corrupt .npz files at ``ncserve compute`` and
``ncserve push``.

Every malformed request must get a specific non-OK status (the one its defect calls for:
INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ALREADY_EXISTS, RESOURCE_EXHAUSTED or
UNAUTHENTICATED; never UNKNOWN or INTERNAL) with a one-line message, and after each one the
server is still SERVING and a digest of every table of its store is unchanged. Every corrupt
file gets one ``Error: ...`` line naming it and exit status 2, never a traceback.

Requests are built from valid ones by one to three mutations, each of which alone makes the
request invalid (so none of them could legitimately change the store): random header fields,
wrong dimensions and dtypes, NaN/Inf, negative and huge counts, missing and unknown tensors,
gaps, repeats, reordering and truncation of the chunk sequence, corrupted trailers and
pieces, oversized pieces and messages, and missing or wrong tokens.
"""

from __future__ import annotations

import collections
import io
import math
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import hypothesis.strategies as st
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from pydantic import SecretStr

from ncserve import wire
from ncserve.cli import cli
from ncserve.metrics import METRIC_KEYS, round1_stats
from ncserve.protocol import RUN_ID_PATTERN, SCALAR_KEY_PATTERN
from ncserve.v1 import ncserve_pb2 as pb
from ncserve.v1 import ncserve_pb2_grpc as pb_grpc
from tests.reliability_support import SERVING, health_status, record_figure
from tests.service_support import (
    fetch_means,
    header,
    make_dataset,
    push_messages,
    push_round1,
    push_round2,
    register,
    round1_arrays,
    round2_arrays,
    start_test_server,
    table_digest,
)

TOKEN = "hostile-input-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
K, P, WORLD = 3, 4, 2
DATA = make_dataset(41, K, P, WORLD, 12)
MAX_MESSAGE = 2 << 20  # the smallest --max-message-bytes the server accepts
MAX_WORKERS = 24  # -> at most 8 ranks per run

Code = grpc.StatusCode
INVALID, NOT_FOUND = Code.INVALID_ARGUMENT, Code.NOT_FOUND
PRECONDITION, EXISTS = Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS
EXHAUSTED, UNAUTHENTICATED = Code.RESOURCE_EXHAUSTED, Code.UNAUTHENTICATED

HYPOTHESIS = settings(
    deadline=None,
    database=None,  # nothing written into the working tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the server under attack ------------------------------------------------------------------


@dataclass
class Served:
    handle: Any
    stub: pb_grpc.NCServiceStub
    db: Path
    digest: str
    codes: collections.Counter[str] = field(default_factory=collections.Counter)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    db = tmp_path_factory.mktemp("hostile") / "nc.db"
    handle = start_test_server(
        db, token=SecretStr(TOKEN), max_message_bytes=MAX_MESSAGE, max_workers=MAX_WORKERS
    )
    channel = grpc.insecure_channel(handle.address)
    stub = pb_grpc.NCServiceStub(channel)
    # Step 0 is finalized; step 1 has rank 0's round 1 (without W), so it stays open.
    register(stub, "run", DATA, rpc_metadata=AUTH)
    for rank in range(WORLD):
        push_round1(stub, "run", 0, DATA, rank, metadata=AUTH)
    means = fetch_means(stub, "run", 0, 0, K, P, metadata=AUTH)
    for rank in range(WORLD):
        push_round2(stub, "run", 0, DATA, rank, means, metadata=AUTH)
    stub.PushRound1(
        push_messages(header("run", 1, 0, pb.ROUND_1, K, P), round1_arrays(DATA, 0, False)),
        metadata=AUTH,
        timeout=10,
    )
    served = Served(handle, stub, db, table_digest(db))
    yield served
    channel.close()
    handle.stop(0.5)
    total = sum(served.codes.values())
    if total:
        record_figure(
            "hostile gRPC requests",
            requests=total,
            codes=dict(served.codes),
            store_changed=False,
            health="SERVING",
        )
    if NPZ_OUTCOMES:
        record_figure("corrupt .npz files", outcomes=dict(NPZ_OUTCOMES), tracebacks=0)


ROUND1_BASE = round1_arrays(DATA, 1, with_classifier=True)


def round2_base() -> dict[str, np.ndarray]:
    """Rank 1's round-2 statistics against the true class means: well-formed."""
    h, y = DATA.union()
    means = round1_stats(h, y, K).class_means()
    return round2_arrays(DATA, 1, means)


ROUND2_BASE = round2_base()


# -- mutations ----------------------------------------------------------------------------------


@dataclass
class Request:
    """A request being made hostile: its parts, the mutations applied, the codes allowed."""

    rpc: str
    header_fields: dict[str, Any]
    arrays: dict[str, np.ndarray]
    metadata: tuple[tuple[str, str], ...] = AUTH
    stream_edits: list[Callable[[list[pb.ShardChunk]], list[pb.ShardChunk]]] = field(
        default_factory=list
    )
    mutations: list[str] = field(default_factory=list)
    allowed: set[grpc.StatusCode] = field(default_factory=set)
    # Tensors whose shape or dtype was changed: changing them again could undo the defect.
    reshaped: set[str] = field(default_factory=set)
    # Declare a payload size off by this many bytes from what the stream carries.
    payload_error: int | None = None

    def mutate(self, name: str, *codes: grpc.StatusCode) -> None:
        self.mutations.append(name)
        self.allowed.update(codes)

    def messages(self) -> list[pb.ShardChunk]:
        header = pb.ShardHeader(**self.header_fields)
        if self.payload_error is not None:
            header.payload_bytes = max(0, wire.payload_nbytes(self.arrays) + self.payload_error)
        messages = [pb.ShardChunk(header=header)]
        messages += [pb.ShardChunk(chunk=c) for c in wire.encode_arrays(self.arrays)]
        for edit in self.stream_edits:
            messages = edit(messages)
        return messages


finite_floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
other_ints = st.integers(min_value=-(2**31), max_value=2**31 - 1)


def _shape_other_than(shape: tuple[int, ...]) -> st.SearchStrategy[tuple[int, ...]]:
    # A one-value count may travel as shape () or (1,): both are that count, not a new shape.
    same = {(), (1,)} if shape in ((), (1,)) else {shape}
    return st.lists(st.integers(0, 6), max_size=3).map(tuple).filter(lambda s: s not in same)


@st.composite
def header_mutation(draw: st.DrawFn, req: Request, round_: int) -> None:
    kinds = [
        "run_id",
        "step",
        "rank",
        "num_classes",
        "feature_dim",
        "epoch",
        "round",
        "payload_bytes",
        "extra",
    ]
    kind = draw(st.sampled_from(kinds))
    fields = req.header_fields
    if kind == "run_id":
        fields["run_id"] = draw(st.text(max_size=30).filter(lambda s: s != "run"))
        req.mutate("header: unknown run_id", NOT_FOUND)
    elif kind == "step":
        fields["step"] = draw(st.integers(min_value=-(2**63), max_value=-1))
        req.mutate("header: negative step", INVALID)
    elif kind == "rank":
        fields["rank"] = draw(st.one_of(st.integers(-(2**31), -1), st.integers(WORLD, 2**31 - 1)))
        req.mutate("header: rank out of range", INVALID)
    elif kind in ("num_classes", "feature_dim"):
        right = K if kind == "num_classes" else P
        fields[kind] = draw(other_ints.filter(lambda v: v != right))
        req.mutate(f"header: wrong {kind}", INVALID)
    elif kind == "epoch":
        fields["epoch"] = draw(st.integers(-(2**63), -1))
        req.mutate("header: negative epoch", INVALID)
    elif kind == "round":
        fields["round"] = draw(st.integers(-5, 10).filter(lambda r: r != round_))
        req.mutate("header: round not the RPC's", INVALID)
    elif kind == "payload_bytes":
        req.payload_error = draw(st.integers(-(2**20), 2**40).filter(lambda d: d != 0))
        req.mutate("header: payload_bytes not what the stream carries", INVALID, EXHAUSTED)
    elif round_ == 1:
        if draw(st.booleans()):
            fields["scalars"] = draw(
                st.dictionaries(st.text(max_size=8), finite_floats, min_size=1)
            )
        else:
            fields["train_tally"] = pb.TrainTally(loss_sum=1.0, num_correct=1, num_samples=2)
        req.mutate("header: round-2 fields in round 1", INVALID)
    else:
        bad = draw(st.sampled_from(["nan_scalar", "bad_key", "tally"]))
        if bad == "nan_scalar":
            fields["scalars"] = {"lr": draw(non_finite)}
        elif bad == "bad_key":
            fields["scalars"] = {
                draw(st.text(max_size=80).filter(lambda s: not _scalar_key_ok(s))): 1.0
            }
        else:
            n = draw(st.integers(0, 2**40))
            fields["train_tally"] = pb.TrainTally(
                loss_sum=draw(st.one_of(non_finite, finite_floats)),
                num_correct=draw(st.integers(n + 1, 2**62)),
                num_samples=n,
            )
        req.mutate(f"header: bad round-2 {bad}", INVALID)


FLOAT_NAMES = {1: ["sums", "weight", "bias"], 2: ["scatter", "sq_resid"]}
COUNT_NAMES = {1: ["counts"], 2: ["num_samples", "ncc_agree", "correct"]}
REQUIRED = {1: ["counts", "sums", "weight"], 2: ["num_samples", "scatter", "sq_resid"]}


@st.composite
def tensor_mutation(draw: st.DrawFn, req: Request, round_: int) -> None:
    arrays = req.arrays
    # Tensors still as the base built them: a second mutation of a reshaped, retyped or
    # removed tensor could undo the first (or have nothing to act on).
    intact = set(arrays) - req.reshaped
    targets = {
        "non_finite": FLOAT_NAMES[round_],
        "negative_count": COUNT_NAMES[round_],
        "huge_count": COUNT_NAMES[round_],
        "negative_sq": ["sq_resid"] if round_ == 2 else [],
        "shape": sorted(arrays),
        "dtype": sorted(arrays),
        "missing": REQUIRED[round_],
        "empty_class": ["counts"] if round_ == 1 else [],
        "agree": ["ncc_agree", "correct"] if "num_samples" in intact else [],
    }
    choices = {k: [n for n in names if n in intact] for k, names in targets.items()}
    kind = draw(st.sampled_from([*sorted(k for k, names in choices.items() if names), "unknown"]))
    name = draw(st.sampled_from(choices[kind])) if kind != "unknown" else ""
    req.reshaped.add(name)
    if kind == "non_finite":
        value = arrays[name].astype(np.float64).copy()
        value.reshape(-1)[draw(st.integers(0, value.size - 1))] = draw(non_finite)
        arrays[name] = value
    elif kind in ("negative_count", "huge_count"):
        value = np.array(arrays[name], dtype=np.int64, copy=True)
        bad = (
            draw(st.integers(-(2**63), -1))
            if kind == "negative_count"
            else draw(st.integers(2**53 + 1, 2**63 - 1))
        )
        value.reshape(-1)[draw(st.integers(0, value.size - 1))] = bad
        arrays[name] = value
    elif kind == "negative_sq":
        value = arrays[name].copy()
        value[draw(st.integers(0, value.size - 1))] = -draw(
            st.floats(min_value=1e-300, max_value=1e300)
        )
        arrays[name] = value
    elif kind == "shape":
        shape = draw(_shape_other_than(np.shape(arrays[name])))
        arrays[name] = np.zeros(shape, dtype=np.asarray(arrays[name]).dtype)
    elif kind == "dtype":
        value = np.asarray(arrays[name])
        arrays[name] = value.astype(np.int64 if value.dtype.kind == "f" else np.float64)
    elif kind == "missing":
        del arrays[name]
    elif kind == "empty_class":
        value = arrays["counts"].copy()
        value[draw(st.integers(0, K - 1))] = 0
        arrays["counts"] = value
    elif kind == "agree":
        n = int(arrays["num_samples"])
        arrays[name] = np.asarray(draw(st.integers(n + 1, 2**53)), dtype=np.int64)
    else:
        unknown = draw(st.text(min_size=1, max_size=20))
        known = {"counts", "sums", "weight", "bias", "num_samples", "scatter", "sq_resid",
                 "ncc_agree", "correct"}  # fmt: skip
        if unknown in known or unknown.removeprefix("holdout.") in known:
            unknown = "x" + unknown
        arrays[unknown] = np.zeros(draw(st.integers(0, 3)))
    # Removing W from round 1 while no rank has sent it is refused as a precondition.
    codes = (INVALID, PRECONDITION) if kind == "missing" and round_ == 1 else (INVALID, EXHAUSTED)
    req.mutate(f"tensor: {kind}", *codes)


def _pieces(messages: list[pb.ShardChunk]) -> list[int]:
    return [
        i
        for i, m in enumerate(messages)
        if m.WhichOneof("body") == "chunk" and m.chunk.WhichOneof("body") == "piece"
    ]


def _copy(message: pb.ShardChunk) -> pb.ShardChunk:
    out = pb.ShardChunk()
    out.CopyFrom(message)
    return out


@st.composite
def stream_mutation(draw: st.DrawFn, req: Request) -> None:
    kind = draw(
        st.sampled_from(
            ["drop", "repeat", "swap", "truncate", "flip", "trailer", "offset", "piece_dtype",
             "piece_shape", "piece_name", "huge_shape", "oversized_piece", "oversized_message",
             "empty_chunk", "after_trailer", "no_header", "two_headers"]
        )
    )  # fmt: skip
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    def edit(messages: list[pb.ShardChunk]) -> list[pb.ShardChunk]:
        n = len(messages)
        pieces = _pieces(messages)
        if kind == "drop" and n > 1:
            i = int(rng.integers(1, n))
            return messages[:i] + messages[i + 1 :]
        if kind == "repeat" and n > 1:
            i = int(rng.integers(1, n))
            return [*messages[: i + 1], _copy(messages[i]), *messages[i + 1 :]]
        if kind == "swap" and n > 2:
            i, j = sorted(int(v) for v in rng.choice(np.arange(1, n), 2, replace=False))
            return [
                *messages[:i],
                messages[j],
                *messages[i + 1 : j],
                messages[i],
                *messages[j + 1 :],
            ]
        if kind == "truncate":
            return messages[: int(rng.integers(0, n))]
        if kind == "trailer" and n > 1 and messages[-1].chunk.HasField("trailer"):
            last = _copy(messages[-1])
            trailer = last.chunk.trailer
            name = ["num_pieces", "num_tensors", "total_bytes", "crc32", "sha256"][
                int(rng.integers(5))
            ]
            if name == "sha256":
                digest = bytearray(trailer.sha256)
                digest[int(rng.integers(len(digest)))] ^= 1 << int(rng.integers(8))
                trailer.sha256 = bytes(digest)
                return [*messages[:-1], last]
            if name == "crc32":
                trailer.ClearField("sha256")  # a sender without SHA-256: the CRC is checked
            limit = 2**32 if name == "crc32" else 2**64
            setattr(trailer, name, (getattr(trailer, name) + int(rng.integers(1, 2**31))) % limit)
            return [*messages[:-1], last]
        if kind in ("huge_shape", "oversized_message", "oversized_piece", "empty_chunk",
                    "after_trailer", "no_header", "two_headers") or not pieces:  # fmt: skip
            return _structural(kind, messages, rng)
        i = pieces[int(rng.integers(len(pieces)))]
        edited = _copy(messages[i])
        piece = edited.chunk.piece
        if kind == "flip":
            if not piece.data:
                return messages[:i] + messages[i + 1 :]
            data = bytearray(piece.data)
            data[int(rng.integers(len(data)))] ^= int(rng.integers(1, 256))
            piece.data = bytes(data)
        elif kind == "offset":
            piece.offset += int(rng.integers(1, 2**40))
        elif kind == "piece_dtype":
            # Undefined enum values included: any int32 is legal on the wire.
            undefined: Any = int(rng.choice([d for d in range(-3, 8) if d != piece.dtype]))
            piece.dtype = undefined
        elif kind == "piece_shape":
            old = tuple(piece.shape)
            new = old
            while new == old:
                new = tuple(int(d) for d in rng.integers(0, 7, size=int(rng.integers(0, 4))))
            del piece.shape[:]
            piece.shape.extend(new)
        else:  # piece_name: empty, or the name of another tensor of the stream
            names = sorted({messages[j].chunk.piece.name for j in pieces} - {piece.name})
            piece.name = "" if not names or rng.integers(2) else names[0]
        return [*messages[:i], edited, *messages[i + 1 :]]

    req.stream_edits.append(edit)
    codes = {"huge_shape": (EXHAUSTED,), "oversized_message": (EXHAUSTED,)}.get(kind, (INVALID,))
    req.mutate(f"stream: {kind}", *codes)


def _structural(
    kind: str, messages: list[pb.ShardChunk], rng: np.random.Generator
) -> list[pb.ShardChunk]:
    n = len(messages)
    seq_after = sum(1 for m in messages if m.WhichOneof("body") == "chunk")
    if kind == "huge_shape":
        piece = pb.TensorPiece(name="sums", dtype=pb.DTYPE_FLOAT64, shape=[2**20, 2**20], data=b"")
        return [*messages[:1], pb.ShardChunk(chunk=pb.TensorChunk(seq=0, piece=piece))]
    if kind in ("oversized_piece", "oversized_message"):
        size = wire.MAX_PIECE_BYTES + 8 if kind == "oversized_piece" else MAX_MESSAGE + 1024
        piece = pb.TensorPiece(
            name="sums", dtype=pb.DTYPE_FLOAT64, shape=[size // 8], data=bytes(size)
        )
        return [*messages[:1], pb.ShardChunk(chunk=pb.TensorChunk(seq=0, piece=piece))]
    if kind == "empty_chunk":
        i = int(rng.integers(1, n + 1))
        return [*messages[:i], pb.ShardChunk(chunk=pb.TensorChunk(seq=i - 1)), *messages[i:]]
    if kind == "after_trailer":
        piece = pb.TensorPiece(name="late", dtype=pb.DTYPE_INT64, shape=[1], data=bytes(8))
        return [*messages, pb.ShardChunk(chunk=pb.TensorChunk(seq=seq_after, piece=piece))]
    if kind == "no_header":
        return messages[1:] + messages[:1] if rng.integers(2) else messages[1:]
    i = int(rng.integers(1, n + 1))
    return [*messages[:i], _copy(messages[0]), *messages[i:]]


@st.composite
def auth_mutation(draw: st.DrawFn, req: Request) -> None:
    kind = draw(st.sampled_from(["missing", "wrong", "no_scheme", "twice"]))
    wrong = draw(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40))
    req.metadata = {
        "missing": (),
        "wrong": (("authorization", f"Bearer {wrong}x"),),
        "no_scheme": (("authorization", TOKEN),),
        "twice": (*AUTH, ("authorization", f"Bearer {wrong}")),
    }[kind]
    req.mutate(f"auth: {kind} token", UNAUTHENTICATED)


@st.composite
def hostile_push(draw: st.DrawFn, round_: int) -> Request:
    if round_ == 1:
        # Rank 1's round 1 of step 1 with W: valid, it would complete the step's round 1.
        req = Request("PushRound1", _header_fields(1, 1, pb.ROUND_1), dict(ROUND1_BASE))
    else:
        # A valid round 2 of a step whose round 1 is incomplete (1) or absent (7).
        step = draw(st.sampled_from([1, 7]))
        req = Request("PushRound2", _header_fields(step, 1, pb.ROUND_2), dict(ROUND2_BASE))
    families = ["header", "tensor", "tensor", "stream", "stream", "auth"]
    for _ in range(draw(st.integers(1 if round_ == 1 else 0, 3))):
        family = draw(st.sampled_from(families))
        if family == "stream":
            # Edits of positions can undo each other (a swap swapped back): one per request.
            families = [f for f in families if f != "stream"]
        if family == "header":
            draw(header_mutation(req, round_))
        elif family == "tensor":
            draw(tensor_mutation(req, round_))
        elif family == "stream":
            draw(stream_mutation(req))
        else:
            draw(auth_mutation(req))
    if not req.mutations:
        req.allowed.add(PRECONDITION)  # well-formed, but round 1 of its step is not complete
    return req


def _header_fields(step: int, rank: int, round_: int) -> dict[str, Any]:
    return {
        "run_id": "run", "step": step, "rank": rank, "round": round_,
        "num_classes": K, "feature_dim": P,
    }  # fmt: skip


@dataclass
class Unary:
    """A malformed unary or server-streaming call."""

    rpc: str
    request: Any
    allowed: set[grpc.StatusCode]
    mutations: list[str]
    metadata: tuple[tuple[str, str], ...] = AUTH


bad_run_ids = st.text(max_size=40).filter(lambda s: not RUN_ID_PATTERN.fullmatch(s))
valid_new_ids = st.from_regex(r"new-[a-z0-9]{1,12}", fullmatch=True)


@st.composite
def hostile_register(draw: st.DrawFn) -> Unary:
    kind = draw(st.sampled_from(["run_id", "numbers", "world", "metadata", "conflict"]))
    k, p, w = draw(st.integers(2, 10**6)), draw(st.integers(1, 10**6)), draw(st.integers(1, 8))
    metadata: dict[str, str] = {}
    run_id = draw(valid_new_ids)
    codes = {INVALID}
    if kind == "run_id":
        run_id = draw(bad_run_ids)
    elif kind == "numbers":
        which = draw(st.sampled_from(["k", "p", "w"]))
        bad = draw(st.integers(-(2**31), 1 if which == "k" else 0))
        k, p, w = (bad, p, w) if which == "k" else (k, bad, w) if which == "p" else (k, p, bad)
    elif kind == "world":
        w = draw(st.integers(MAX_WORKERS - 15, 2**31 - 1))
        codes = {EXHAUSTED}
    elif kind == "metadata":
        metadata = draw(
            st.one_of(
                st.dictionaries(
                    st.text(min_size=1, max_size=4), st.just("v"), min_size=65, max_size=70
                ),
                st.dictionaries(st.just(""), st.just("v"), min_size=1),
                st.dictionaries(
                    st.text(min_size=65, max_size=80), st.just("v"), min_size=1, max_size=2
                ),
                st.dictionaries(st.just("k"), st.text(min_size=1025, max_size=1100), min_size=1),
            )
        )
    else:
        run_id = "run"
        k, p, w = draw(
            st.tuples(st.integers(2, 50), st.integers(1, 50), st.integers(1, 8)).filter(
                lambda t: t != (K, P, WORLD)
            )
        )
        codes = {EXISTS}
    request = pb.RegisterRunRequest(
        run_id=run_id, num_classes=k, feature_dim=p, world_size=w, metadata=metadata
    )
    return Unary("RegisterRun", request, codes, [f"register: {kind}"])


@st.composite
def hostile_scalars(draw: st.DrawFn) -> Unary:
    kind = draw(st.sampled_from(["run", "step", "epoch", "empty", "key", "value", "many"]))
    fields: dict[str, Any] = {"run_id": "run", "step": 3, "values": {"nc0": 1.0}}
    codes = {INVALID}
    if kind == "run":
        fields["run_id"] = draw(st.text(max_size=20).filter(lambda s: s != "run"))
        codes = {NOT_FOUND}
    elif kind == "step":
        fields["step"] = draw(st.integers(-(2**63), -1))
    elif kind == "epoch":
        fields["epoch"] = draw(st.integers(-(2**63), -1))
    elif kind == "empty":
        fields["values"] = {}
    elif kind == "key":
        fields["values"] = {draw(st.text(max_size=80).filter(lambda s: not _scalar_key_ok(s))): 1.0}
    elif kind == "value":
        fields["values"] = {"nc0": draw(non_finite)}
    else:
        fields["values"] = {f"k{i}": 1.0 for i in range(draw(st.integers(257, 300)))}
    return Unary("RecordScalars", pb.RecordScalarsRequest(**fields), codes, [f"scalars: {kind}"])


def _scalar_key_ok(key: str) -> bool:
    return bool(SCALAR_KEY_PATTERN.fullmatch(key))


@st.composite
def hostile_query(draw: st.DrawFn) -> Unary:
    kind = draw(
        st.sampled_from(
            ["get_run", "metrics_run", "metrics_step", "metrics_range", "means_run", "means_step",
             "means_rank", "means_finalized", "scalars_run", "watch_run", "auth"]
        )
    )  # fmt: skip
    ghost = draw(st.text(max_size=30).filter(lambda s: s != "run"))
    if kind == "get_run":
        return Unary("GetRun", pb.GetRunRequest(run_id=ghost), {NOT_FOUND}, [kind])
    if kind == "metrics_run":
        return Unary("GetMetrics", pb.GetMetricsRequest(run_id=ghost), {NOT_FOUND}, [kind])
    if kind == "metrics_step":
        step = draw(st.integers(1, 2**62))
        return Unary(
            "GetMetrics", pb.GetMetricsRequest(run_id="run", step=step), {NOT_FOUND}, [kind]
        )
    if kind == "metrics_range":
        first = draw(st.integers(1, 2**62))
        last = draw(st.integers(-(2**62), first - 1))
        rng = pb.StepRange(first=first, last=last)
        return Unary("GetMetrics", pb.GetMetricsRequest(run_id="run", range=rng), {INVALID}, [kind])
    if kind.startswith("means"):
        fields: dict[str, Any] = {"run_id": "run", "step": 1, "rank": 0}
        codes = {INVALID}
        if kind == "means_run":
            fields["run_id"], codes = ghost, {NOT_FOUND}
        elif kind == "means_step":
            fields["step"] = draw(st.integers(-(2**63), -1))
        elif kind == "means_rank":
            fields["rank"] = draw(
                st.one_of(st.integers(-(2**31), -1), st.integers(WORLD, 2**31 - 1))
            )
        else:
            fields["step"], codes = 0, {PRECONDITION}
        return Unary("FetchClassMeans", pb.ClassMeansRequest(**fields), codes, [kind])
    if kind == "scalars_run":
        return Unary("GetScalars", pb.GetScalarsRequest(run_id=ghost), {NOT_FOUND}, [kind])
    if kind == "watch_run":
        return Unary("WatchMetrics", pb.WatchMetricsRequest(run_id=ghost), {NOT_FOUND}, [kind])
    rpc = draw(st.sampled_from(["ListRuns", "GetRun", "GetMetrics"]))
    request = {"ListRuns": pb.ListRunsRequest(), "GetRun": pb.GetRunRequest(run_id="run"),
               "GetMetrics": pb.GetMetricsRequest(run_id="run", step=0)}[rpc]  # fmt: skip
    wrong = (("authorization", "Bearer " + draw(st.text(alphabet="abcxyz", max_size=10))),)
    return Unary(rpc, request, {UNAUTHENTICATED}, [f"auth: {rpc}"], wrong)


hostile_requests = st.one_of(
    hostile_push(1), hostile_push(1), hostile_push(1), hostile_push(2), hostile_push(2),
    hostile_register(), hostile_scalars(), hostile_query(),
)  # fmt: skip


def send(stub: pb_grpc.NCServiceStub, request: Request | Unary) -> grpc.RpcError | None:
    method = getattr(stub, request.rpc)
    try:
        if isinstance(request, Request):
            method(iter(request.messages()), metadata=request.metadata, timeout=10)
        elif request.rpc in ("FetchClassMeans", "WatchMetrics"):
            list(method(request.request, metadata=request.metadata, timeout=10))
        else:
            method(request.request, metadata=request.metadata, timeout=10)
    except grpc.RpcError as error:
        return error
    return None


@settings(HYPOTHESIS, max_examples=1000)
@given(request=hostile_requests)
def test_malformed_requests_get_a_specific_status_and_change_nothing(
    served: Served, request: Request | Unary
) -> None:
    error = send(served.stub, request)
    assert error is not None, f"accepted: {request.mutations}"
    code, details = error.code(), error.details() or ""
    served.codes[code.name] += 1
    assert code in request.allowed, (code, details, request.mutations)
    assert details and "\n" not in details and "Traceback" not in details, details
    assert TOKEN not in details
    assert table_digest(served.db) == served.digest, request.mutations
    assert health_status(served.handle.address) == SERVING


def test_the_server_is_intact_after_the_attack(served: Served) -> None:
    # Runs after the property test in file order; also meaningful alone (the baseline).
    run = served.stub.GetRun(pb.GetRunRequest(run_id="run"), metadata=AUTH, timeout=10)
    assert (run.num_measurements, run.num_open_steps) == (1, 1)
    assert table_digest(served.db) == served.digest
    assert served.handle.store.integrity_check() == "ok"
    # The open step still completes its round 1 with the real rank 1 shard.
    served.stub.PushRound1(
        push_messages(header("run", 1, 1, pb.ROUND_1, K, P), ROUND1_BASE),
        metadata=AUTH,
        timeout=10,
    )
    means = fetch_means(served.stub, "run", 1, 1, K, P, metadata=AUTH)
    assert means.num_samples == sum(len(y) for _, y in DATA.shards)
    served.digest = table_digest(served.db)  # the new baseline for the tests below


# -- corrupt .npz files ---------------------------------------------------------------------------


def _valid_npz(**overrides: Any) -> bytes:
    rng = np.random.default_rng(5)
    y = np.arange(24) % K
    arrays: dict[str, Any] = {
        "features": rng.normal(size=(24, P)) + y[:, None],
        "labels": y,
        "weight": rng.normal(size=(K, P)),
        "bias": rng.normal(size=K),
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


VALID_NPZ = _valid_npz()


def _npy_member(header_text: str, payload: bytes) -> bytes:
    """An .npz holding one raw .npy member 'features' with a hand-written header."""
    magic = b"\x93NUMPY\x01\x00"
    head = header_text.encode("latin1")
    head += b" " * ((64 - (len(magic) + 2 + len(head) + 1) % 64) % 64) + b"\n"
    member = magic + len(head).to_bytes(2, "little") + head + payload
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("features.npy", member)
        for name in ("labels", "weight"):
            buffer = io.BytesIO()
            np.save(buffer, np.zeros(2, dtype=np.int64) if name == "labels" else np.zeros((2, 2)))
            archive.writestr(f"{name}.npy", buffer.getvalue())
    return out.getvalue()


@st.composite
def corrupt_npz(draw: st.DrawFn) -> bytes:
    kind = draw(
        st.sampled_from(["truncate", "flip", "junk", "random", "semantic", "semantic", "header"])
    )
    data = VALID_NPZ
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, len(out) - 1))] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "junk":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=64)) + data[i:]
    if kind == "random":
        return draw(st.binary(max_size=512))
    if kind == "header":
        shape = draw(st.sampled_from(["(1099511627776, 4)", "(4, -1)", "(2, 2, 2)", "()", "(2,)"]))
        descr = draw(st.sampled_from(["<f8", "|O", "<c16", "|b1", "<m8[s]", "<U3", "|V8", "<f2"]))
        header_text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
        return _npy_member(header_text, draw(st.binary(max_size=64)))
    bad = draw(
        st.sampled_from(
            ["nan_features", "labels_float", "labels_range", "labels_bool", "weight_1d",
             "weight_cols", "bias_shape", "num_classes", "one_class", "features_strings",
             "features_complex", "missing"]
        )
    )  # fmt: skip
    features = np.zeros((24, P))
    overrides: dict[str, Any] = {
        "nan_features": {"features": np.where(np.eye(24, P) > 0, np.nan, features)},
        "labels_float": {"labels": np.arange(24) % K + 0.5},
        "labels_range": {"labels": np.arange(24) % K + draw(st.sampled_from([-5, K]))},
        "labels_bool": {"labels": np.arange(24) % 2 == 0},
        "weight_1d": {"weight": np.zeros(P)},
        "weight_cols": {"weight": np.zeros((K, P + 1))},
        "bias_shape": {"bias": np.zeros(K + 1)},
        "num_classes": {"num_classes": np.array(K + 2)},
        "one_class": {"weight": np.zeros((1, P)), "bias": np.zeros(1), "labels": np.zeros(24, int)},
        "features_strings": {"features": np.full((24, P), "x")},
        "features_complex": {"features": np.zeros((24, P), dtype=complex)},
        "missing": {draw(st.sampled_from(["features", "labels", "weight"])): None},
    }[bad]
    return _valid_npz(**overrides)


def _assert_one_line_error_or_metrics(result: Any, path: Path) -> str:
    """Exit 2 with one 'Error:' line naming the file, or exit 0 with the metrics."""
    output = result.output
    assert "Traceback" not in output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}"
    )
    if result.exit_code == 0:
        return "ok"
    assert result.exit_code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    return lines[0]


NPZ_OUTCOMES: collections.Counter[str] = collections.Counter()


@settings(HYPOTHESIS, max_examples=150)
@given(content=corrupt_npz())
def test_corrupt_npz_at_compute(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.npz"
        path.write_bytes(content)
        result = CliRunner().invoke(cli, ["compute", str(path), "--format", "json"])
        line = _assert_one_line_error_or_metrics(result, path)
        if line == "ok":
            import json

            assert set(METRIC_KEYS) <= set(json.loads(result.output))
        else:
            assert str(path) in line
        NPZ_OUTCOMES["compute: " + ("metrics" if line == "ok" else "error")] += 1


@settings(HYPOTHESIS, max_examples=60)
@given(content=corrupt_npz())
def test_corrupt_npz_at_push(served: Served, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.npz"
        path.write_bytes(content)
        # A wrong token: a file that happens to load is refused by the service, so nothing
        # it holds can reach the store either way.
        token = Path(tmp) / "token"
        token.write_text("not-the-token\n")
        result = CliRunner().invoke(
            cli,
            ["push", str(path), "--run", "npz", "--step", "0", "--rank", "0", "--world-size",
             "1", "--target", served.handle.address, "--token-file", str(token),
             "--deadline", "5"],
        )  # fmt: skip
        line = _assert_one_line_error_or_metrics(result, path)
        assert line != "ok", result.output
        assert str(path) in line or "refused the credentials" in line, line
        NPZ_OUTCOMES["push: " + ("credentials" if "credentials" in line else "file")] += 1
    assert table_digest(served.db) == served.digest
