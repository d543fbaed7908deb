"""Every kind of bad input gets a specific status and a message naming the field and value,
the server keeps answering, and nothing stored changes (checked on a digest of every table)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from pydantic import SecretStr

from ncserve import wire
from ncserve.v1 import ncserve_pb2 as pb
from ncserve.v1 import ncserve_pb2_grpc as pb_grpc
from tests.service_support import (
    fetch_means,
    header,
    make_dataset,
    push_messages,
    round1_arrays,
    start_test_server,
    table_digest,
)

TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
K, P, WORLD = 3, 4, 2
DATA = make_dataset(21, K, P, WORLD, 12)


def r1_arrays(rank: int = 1, classifier: bool = True, **changes: np.ndarray | None) -> dict:
    arrays = round1_arrays(DATA, rank, with_classifier=classifier)
    for name, value in changes.items():
        if value is None:
            arrays.pop(name)
        else:
            arrays[name] = value
    return arrays


def r1_header(**fields) -> pb.ShardHeader:
    base = {
        "run_id": "run",
        "step": 2,
        "rank": 1,
        "round": pb.ROUND_1,
        "num_classes": K,
        "feature_dim": P,
    }
    base.update(fields)
    return pb.ShardHeader(**base)


def chunks_of(arrays: dict) -> list[pb.ShardChunk]:
    return [pb.ShardChunk(chunk=c) for c in wire.encode_arrays(arrays)]


def push1(messages: Callable[[], list[pb.ShardChunk]], metadata=AUTH):
    def call(stub: pb_grpc.NCServiceStub) -> object:
        return stub.PushRound1(iter(messages()), metadata=metadata, timeout=10)

    return call


def push2(messages: Callable[[], list[pb.ShardChunk]]):
    def call(stub: pb_grpc.NCServiceStub) -> object:
        return stub.PushRound2(iter(messages()), metadata=AUTH, timeout=10)

    return call


def standard(hdr: pb.ShardHeader | None = None, arrays: dict | None = None):
    return lambda: [
        pb.ShardChunk(header=hdr or r1_header()),
        *chunks_of(r1_arrays() if arrays is None else arrays),
    ]


def edited(edit: Callable[[list[pb.ShardChunk]], list[pb.ShardChunk]]):
    return lambda: edit(standard()())


def _with_checksums(messages: list[pb.ShardChunk], crc: int, sha256: bytes) -> list[pb.ShardChunk]:
    last = pb.ShardChunk()
    last.CopyFrom(messages[-1])
    last.chunk.trailer.crc32 = crc
    last.chunk.trailer.sha256 = sha256
    return [*messages[:-1], last]


def _flipped(digest: bytes) -> bytes:
    return bytes([digest[0] ^ 0xFF]) + digest[1:]


def _round2_early() -> list[pb.ShardChunk]:
    arrays = {
        "num_samples": np.int64(12),
        "scatter": np.zeros((K, K)),
        "sq_resid": np.zeros(K),
        "ncc_agree": np.int64(0),
        "correct": np.int64(0),
    }
    hdr = header("run", 1, 1, pb.ROUND_2, K, P)
    return [pb.ShardChunk(header=hdr), *chunks_of(arrays)]


def register_call(**fields):
    base = {"run_id": "new-run", "num_classes": K, "feature_dim": P, "world_size": WORLD}
    base.update(fields)
    return lambda stub: stub.RegisterRun(pb.RegisterRunRequest(**base), metadata=AUTH, timeout=5)


def scalars_call(**fields):
    base = {"run_id": "run", "step": 1, "values": {"nc0": 1.0}}
    base.update(fields)
    return lambda stub: stub.RecordScalars(
        pb.RecordScalarsRequest(**base), metadata=AUTH, timeout=5
    )


def means_call(**fields):
    base = {"run_id": "run", "step": 1, "rank": 0}
    base.update(fields)
    return lambda stub: list(
        stub.FetchClassMeans(pb.ClassMeansRequest(**base), metadata=AUTH, timeout=5)
    )


@dataclass(frozen=True)
class Case:
    call: Callable[[pb_grpc.NCServiceStub], object]
    code: grpc.StatusCode
    message: str  # must appear in the status details
    reason: str | None = None  # ncserve_shards_rejected_total label it counts under


INVALID = grpc.StatusCode.INVALID_ARGUMENT
R1_BYTES = wire.payload_nbytes(r1_arrays())
bad_counts = np.array([3, -1, 4])
nan_sums = r1_arrays()["sums"].copy()
nan_sums[1, 2] = np.nan
inf_weight = DATA.weight_KP.copy()
inf_weight[0, 0] = np.inf

CASES: dict[str, Case] = {
    "unknown run": Case(
        push1(standard(r1_header(run_id="ghost"))),
        grpc.StatusCode.NOT_FOUND, "run_id='ghost'", "not_found",
    ),
    "K not matching the run": Case(
        push1(standard(r1_header(num_classes=5))), INVALID, "num_classes=5", "invalid_argument"
    ),
    "p not matching the run": Case(
        push1(standard(r1_header(feature_dim=7))), INVALID, "feature_dim=7", "invalid_argument"
    ),
    "tensor shape not matching K, p": Case(
        push1(standard(arrays=r1_arrays(sums=np.zeros((K, P + 1))))),
        INVALID, "'sums'", "invalid_argument",
    ),
    "rank below 0": Case(push1(standard(r1_header(rank=-1))), INVALID, "rank=-1", "invalid_argument"),
    "rank = world_size": Case(
        push1(standard(r1_header(rank=WORLD))), INVALID, f"rank={WORLD}", "invalid_argument"
    ),
    "negative step": Case(push1(standard(r1_header(step=-3))), INVALID, "step=-3", "invalid_argument"),
    "negative counts": Case(
        push1(standard(arrays=r1_arrays(counts=bad_counts))), INVALID, "'counts'", "invalid_argument"
    ),
    "non-integer counts": Case(
        push1(standard(arrays=r1_arrays(counts=np.array([3.5, 1.0, 4.0])))),
        INVALID, "'counts'", "invalid_argument",
    ),
    "NaN in sums": Case(
        push1(standard(arrays=r1_arrays(sums=nan_sums))), INVALID, "'sums'", "invalid_argument"
    ),
    "Inf in weight": Case(
        push1(standard(arrays=r1_arrays(weight=inf_weight))), INVALID, "'weight'", "invalid_argument"
    ),
    "weight of the wrong shape": Case(
        push1(standard(arrays=r1_arrays(weight=np.zeros((K, P + 2))))),
        INVALID, "'weight' has shape (3, 6)", "invalid_argument",
    ),
    "bias without weight": Case(
        push1(standard(arrays=r1_arrays(weight=None))), INVALID, "'bias'", "invalid_argument"
    ),
    "missing tensor": Case(
        push1(standard(arrays=r1_arrays(sums=None))), INVALID, "'sums'", "invalid_argument"
    ),
    "round-1 tensor of an older client": Case(
        push1(standard(arrays=r1_arrays(sq_dev=np.ones(K)))),
        INVALID, "'sq_dev' in a round-1 push; expected counts, sums, weight, bias (sent by an "
        "older ncserve client", "invalid_argument",
    ),
    "unknown tensor": Case(
        push1(standard(arrays=r1_arrays(extra=np.zeros(2)))), INVALID, "'extra'", "invalid_argument"
    ),
    "chunk gap": Case(push1(edited(lambda m: m[:2] + m[3:])), INVALID, "gap", "invalid_argument"),
    "duplicate chunk": Case(
        push1(edited(lambda m: m[:3] + m[2:])), INVALID, "repeated", "invalid_argument"
    ),
    "truncated stream": Case(push1(edited(lambda m: m[:-1])), INVALID, "truncated", "truncated"),
    "header only": Case(push1(edited(lambda m: m[:1])), INVALID, "truncated", "truncated"),
    "empty stream": Case(push1(lambda: []), INVALID, "empty", "truncated"),
    "no header first": Case(push1(edited(lambda m: m[1:])), INVALID, "ShardHeader", "invalid_argument"),
    "two headers": Case(push1(edited(lambda m: [m[0], *m])), INVALID, "one ShardHeader", "invalid_argument"),
    "digest mismatch": Case(
        push1(edited(lambda m: _with_checksums(
            m, m[-1].chunk.trailer.crc32, _flipped(m[-1].chunk.trailer.sha256)
        ))),
        INVALID, "sha256", "invalid_argument",
    ),
    "checksum mismatch, sender without sha256": Case(
        push1(edited(lambda m: _with_checksums(m, m[-1].chunk.trailer.crc32 ^ 0xFF, b""))),
        INVALID, "crc32", "invalid_argument",
    ),
    "payload_bytes under what the tensors hold": Case(
        push1(standard(r1_header(payload_bytes=8))),
        INVALID, "larger than the header's payload_bytes=8", "invalid_argument",
    ),
    "payload_bytes over what the stream carried": Case(
        push1(standard(r1_header(payload_bytes=R1_BYTES + 8))),
        INVALID, f"header payload_bytes={R1_BYTES + 8} but the stream carried {R1_BYTES} bytes",
        "invalid_argument",
    ),
    "payload_bytes zero": Case(
        push1(standard(r1_header(payload_bytes=0))), INVALID, "payload_bytes=0", "invalid_argument"
    ),
    "payload_bytes over the service's limit": Case(
        push1(standard(r1_header(payload_bytes=10**12))), grpc.StatusCode.RESOURCE_EXHAUSTED,
        "payload_bytes=1000000000000 is over", "resource_exhausted",
    ),
    "round in header not matching the RPC": Case(
        push1(standard(r1_header(round=pb.ROUND_2))), INVALID, "round=ROUND_2", "invalid_argument"
    ),
    "round 2 before round 1 is complete": Case(
        push2(_round2_early), grpc.StatusCode.FAILED_PRECONDITION,
        "before round 1 is complete", "failed_precondition",
    ),
    "last round-1 shard and no rank sent W": Case(
        push1(standard(r1_header(step=1), r1_arrays(classifier=False))),
        grpc.StatusCode.FAILED_PRECONDITION, "'weight'", "failed_precondition",
    ),
    "scalars in a round-1 header": Case(
        push1(standard(r1_header(scalars={"lr": 0.1}))), INVALID, "round-2 header", "invalid_argument"
    ),
    "missing token": Case(
        push1(standard(), metadata=()), grpc.StatusCode.UNAUTHENTICATED, "bearer token",
        "unauthenticated",
    ),
    "wrong token": Case(
        push1(standard(), metadata=(("authorization", "Bearer nope"),)),
        grpc.StatusCode.UNAUTHENTICATED, "bearer token", "unauthenticated",
    ),
    "register: invalid run_id": Case(register_call(run_id="bad id!"), INVALID, "run_id='bad id!'"),
    "register: one class": Case(register_call(num_classes=1), INVALID, "num_classes must be >= 2, got 1"),
    "register: zero world size": Case(register_call(world_size=0), INVALID, "world_size must be >= 1, got 0"),
    "register: K of an existing run": Case(
        register_call(run_id="run", num_classes=9), grpc.StatusCode.ALREADY_EXISTS, "num_classes=9"
    ),
    "scalars: NaN value": Case(scalars_call(values={"nc0": float("nan")}), INVALID, "values['nc0']=nan"),
    "scalars: bad key": Case(scalars_call(values={"a b": 1.0}), INVALID, "'a b'"),
    "scalars: unknown run": Case(scalars_call(run_id="ghost"), grpc.StatusCode.NOT_FOUND, "'ghost'"),
    "class means: rank out of range": Case(means_call(rank=5), INVALID, "rank=5"),
    "metrics: inverted range": Case(
        lambda stub: stub.GetMetrics(
            pb.GetMetricsRequest(run_id="run", range=pb.StepRange(first=5, last=1)),
            metadata=AUTH, timeout=5,
        ),
        INVALID, "first=5",
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[object, pb_grpc.NCServiceStub, object]]:
    db = tmp_path_factory.mktemp("bad-input") / "nc.db"
    handle = start_test_server(db, token=SecretStr(TOKEN))
    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    stub = pb_grpc.NCServiceStub(channel)
    stub.RegisterRun(
        pb.RegisterRunRequest(run_id="run", num_classes=K, feature_dim=P, world_size=WORLD),
        metadata=AUTH,
    )
    # Step 1: rank 0's round 1 is in, without W, so round 1 is incomplete.
    hdr = header("run", 1, 0, pb.ROUND_1, K, P)
    stub.PushRound1(
        push_messages(hdr, round1_arrays(DATA, 0, with_classifier=False)), metadata=AUTH
    )
    yield handle, stub, db
    channel.close()
    handle.stop(0.5)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_and_changes_nothing(served, name: str) -> None:
    handle, stub, db = served
    case = CASES[name]
    before = table_digest(db)
    scrape = handle.metrics.registry.get_sample_value
    rejected_before = scrape("ncserve_shards_rejected_total", {"reason": case.reason or ""})
    with pytest.raises(grpc.RpcError) as info:
        case.call(stub)
    assert info.value.code() == case.code, info.value.details()
    details = info.value.details()
    assert case.message in details, details
    assert "\n" not in details and TOKEN not in details
    assert table_digest(db) == before
    if case.reason is not None:
        after = scrape("ncserve_shards_rejected_total", {"reason": case.reason})
        assert rejected_before is not None and after == rejected_before + 1
    # The server still answers, and the state the cases rely on is intact.
    run = stub.GetRun(pb.GetRunRequest(run_id="run"), metadata=AUTH, timeout=5)
    assert (run.num_open_steps, run.num_measurements) == (1, 0)


def test_good_input_after_the_bad_still_works(served) -> None:
    _, stub, _ = served
    hdr = header("run", 1, 1, pb.ROUND_1, K, P)
    stub.PushRound1(
        push_messages(hdr, round1_arrays(DATA, 1, with_classifier=True)), metadata=AUTH, timeout=10
    )
    means = fetch_means(stub, "run", 1, 1, K, P, metadata=AUTH)
    assert means.num_samples == sum(len(y) for _, y in DATA.shards)
