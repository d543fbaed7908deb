"""The shared tensor codec (ncserve.wire): exact round trips, and every broken stream caught."""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ncserve import wire
from ncserve.v1 import ncserve_pb2 as pb

_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40)
_float_arrays = hnp.arrays(np.float64, _shapes, elements=st.floats(allow_nan=True))
_int_arrays = hnp.arrays(np.int64, _shapes)


@settings(max_examples=60, deadline=None)
@given(
    arrays=st.dictionaries(
        st.text("abcdefgh._", min_size=1, max_size=8),
        st.one_of(_float_arrays, _int_arrays),
        max_size=5,
    ),
    piece=st.integers(1, 700),
)
def test_round_trip_is_bit_exact(arrays: dict[str, np.ndarray], piece: int) -> None:
    chunks = list(wire.encode_arrays(arrays, max_piece_bytes=piece))
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert all(len(c.piece.data) <= piece for c in chunks[:-1])
    decoded = wire.decode_arrays(chunks)
    assert list(decoded) == list(arrays)
    # What a push header declares is what the stream carries.
    assert wire.payload_nbytes(arrays) == chunks[-1].trailer.total_bytes
    for name, array in arrays.items():
        got = decoded[name]
        assert got.shape == array.shape
        assert got.dtype == np.dtype("<f8" if array.dtype.kind == "f" else "<i8")
        assert got.tobytes() == array.astype(got.dtype).tobytes()


def test_pieces_never_exceed_one_mebibyte() -> None:
    big = np.arange(300_000, dtype=np.float64)  # 2.4 MB
    chunks = list(wire.encode_arrays({"sums": big}))
    pieces = [c.piece for c in chunks if c.WhichOneof("body") == "piece"]
    assert len(pieces) == 3
    assert max(len(p.data) for p in pieces) == wire.MAX_PIECE_BYTES
    assert chunks[-1].trailer.total_bytes == big.nbytes
    np.testing.assert_array_equal(wire.decode_arrays(chunks)["sums"], big)


def test_other_dtypes_travel_as_int64_or_float64() -> None:
    arrays = {
        "a": np.arange(4, dtype=np.int32),
        "b": np.ones(3, dtype=np.float32),
        "c": np.bool_(1),
    }
    chunks = list(wire.encode_arrays(arrays))
    assert wire.payload_nbytes(arrays) == chunks[-1].trailer.total_bytes == 8 * (4 + 3 + 1)
    decoded = wire.decode_arrays(chunks)
    assert decoded["a"].dtype == np.int64 and decoded["b"].dtype == np.float64
    assert int(decoded["c"]) == 1
    with pytest.raises(TypeError, match="complex"):
        list(wire.encode_arrays({"z": np.zeros(2, dtype=np.complex128)}))


def _stream() -> list[pb.TensorChunk]:
    arrays = {"counts": np.arange(5), "sums": np.linspace(0, 1, 600).reshape(5, 120)}
    return list(wire.encode_arrays(arrays, max_piece_bytes=1000))


def _altered(chunks: list[pb.TensorChunk], index: int, **fields: object) -> list[pb.TensorChunk]:
    out = [pb.TensorChunk() for _ in chunks]
    for o, c in zip(out, chunks, strict=True):
        o.CopyFrom(c)
    target = out[index]
    for path, value in fields.items():
        obj = target
        *parents, leaf = path.split("__")
        for p in parents:
            obj = getattr(obj, p)
        if isinstance(value, list):
            field = getattr(obj, leaf)
            del field[:]
            field.extend(value)
        else:
            setattr(obj, leaf, value)
    return out


BROKEN = {
    "gap": (lambda c: c[:2] + c[3:], "gap"),
    "repeat": (lambda c: c[:3] + c[2:], "repeated"),
    "truncated": (lambda c: c[:-1], "truncated"),
    "empty": (lambda c: [], "truncated"),
    "after trailer": (lambda c: [*c, c[-1]], "after the trailer"),
    "sha256": (
        lambda c: _altered(c, -1, trailer__sha256=bytes([c[-1].trailer.sha256[0] ^ 1]) + bytes(31)),
        "sha256",
    ),
    "crc, sender without sha256": (
        lambda c: _altered(c, -1, trailer__sha256=b"", trailer__crc32=c[-1].trailer.crc32 ^ 1),
        "crc32",
    ),
    "total": (lambda c: _altered(c, -1, trailer__total_bytes=1), "total_bytes"),
    "pieces": (lambda c: _altered(c, -1, trailer__num_pieces=99), "num_pieces"),
    "flipped byte": (
        lambda c: _altered(c, 1, piece__data=bytes([c[1].piece.data[0] ^ 1]) + c[1].piece.data[1:]),
        "sha256",
    ),
    "flipped byte, sender without sha256": (
        lambda c: _altered(
            _altered(c, -1, trailer__sha256=b""),
            1,
            piece__data=bytes([c[1].piece.data[0] ^ 1]) + c[1].piece.data[1:],
        ),
        "crc32",
    ),
    "short tensor": (lambda c: _altered(c, 0, piece__shape=[6]), "ended after"),
    "long tensor": (lambda c: _altered(c, 0, piece__shape=[2]), "more than"),
    "bad dtype": (lambda c: _altered(c, 0, piece__dtype=0), "dtype"),
    "bad offset": (lambda c: _altered(c, 2, piece__offset=0), "offset"),
    "shape change": (lambda c: _altered(c, 2, piece__shape=[600]), "changed"),
    "no name": (lambda c: _altered(c, 0, piece__name=""), "name is empty"),
    "negative shape": (lambda c: _altered(c, 0, piece__shape=[-5]), "invalid shape"),
}


def _assemble(chunks: list[pb.TensorChunk]) -> wire.ArrayAssembler:
    assembler = wire.ArrayAssembler(max_total_bytes=1 << 20)  # as the service reads pushes
    for chunk in chunks:
        assembler.feed(chunk)
    assembler.arrays()
    return assembler


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_streams_are_rejected(case: str) -> None:
    mutate, message = BROKEN[case]
    with pytest.raises(wire.WireError, match=message) as info:
        _assemble(mutate(_stream()))
    assert info.value.reason == ("truncated" if message == "truncated" else "invalid_argument")


def test_reader_without_digest_checks_the_crc() -> None:
    # decode_arrays (a client reading class means) skips the SHA-256 and checks the CRC-32.
    flipped = BROKEN["flipped byte"][0](_stream())
    with pytest.raises(wire.WireError, match="crc32"):
        wire.decode_arrays(flipped)
    wrong_digest = BROKEN["sha256"][0](_stream())
    np.testing.assert_array_equal(wire.decode_arrays(wrong_digest)["counts"], np.arange(5))
    with pytest.raises(ValueError, match="digest=False"):
        _ = wire.ArrayAssembler(1 << 20, digest=False).sha256_hex


def test_declared_size_over_limit_is_refused_before_allocating() -> None:
    chunk = pb.TensorChunk(
        seq=0, piece=pb.TensorPiece(name="sums", dtype=pb.DTYPE_FLOAT64, shape=[1 << 30, 1 << 10])
    )
    assembler = wire.ArrayAssembler(max_total_bytes=1 << 20)
    with pytest.raises(wire.WireError, match="limit") as info:
        assembler.feed(chunk)
    assert info.value.reason == "resource_exhausted"


def test_oversized_piece_is_refused() -> None:
    data = bytes(wire.MAX_PIECE_BYTES + 8)
    chunk = pb.TensorChunk(
        seq=0,
        piece=pb.TensorPiece(name="x", dtype=pb.DTYPE_FLOAT64, shape=[len(data) // 8], data=data),
    )
    with pytest.raises(wire.WireError, match="at most 1048576"):
        wire.ArrayAssembler(max_total_bytes=1 << 30).feed(chunk)


def test_digest_identifies_the_payload() -> None:
    a = wire.ArrayAssembler(1 << 20)
    b = wire.ArrayAssembler(1 << 20)
    for chunk in _stream():
        a.feed(chunk)
    for chunk in wire.encode_arrays({"counts": np.arange(5), "sums": np.zeros((5, 120))}):
        b.feed(chunk)
    assert a.complete and b.complete
    assert a.sha256_hex != b.sha256_hex and len(a.sha256_hex) == 64


def test_trailer_carries_both_checksums_of_the_bytes_in_stream_order() -> None:
    chunks = _stream()
    data = b"".join(c.piece.data for c in chunks if c.HasField("piece"))
    trailer = chunks[-1].trailer
    assert trailer.sha256 == hashlib.sha256(data).digest()
    assert trailer.crc32 == zlib.crc32(data)
    assembler = wire.ArrayAssembler(1 << 20)
    for chunk in chunks:
        assembler.feed(chunk)
    assert assembler.sha256_hex == trailer.sha256.hex()


def test_stream_of_a_sender_without_sha256_is_checked_by_its_crc() -> None:
    chunks = _altered(_stream(), -1, trailer__sha256=b"")
    arrays = _assemble(chunks).arrays()
    np.testing.assert_array_equal(arrays["sums"], np.linspace(0, 1, 600).reshape(5, 120))
    np.testing.assert_array_equal(arrays["counts"], np.arange(5))


def test_stream_encoded_without_digest_is_checked_by_its_crc() -> None:
    arrays = {"means": np.linspace(0, 1, 600).reshape(5, 120)}
    chunks = list(wire.encode_arrays(arrays, max_piece_bytes=1000, digest=False))
    assert chunks[-1].trailer.sha256 == b""
    np.testing.assert_array_equal(_assemble(chunks).arrays()["means"], arrays["means"])
    np.testing.assert_array_equal(wire.decode_arrays(chunks)["means"], arrays["means"])
