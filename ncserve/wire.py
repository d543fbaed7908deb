"""Tensor transport of the v1 API: a dict of numpy arrays <-> a stream of TensorChunk.

Shared by the service and the client so both sides agree byte for byte.

A stream is the tensors in the order given, each split into pieces of at most
``MAX_PIECE_BYTES`` raw little-endian bytes (float64 or int64), numbered from 0,
then one trailer with the number of pieces and tensors, the total byte count, and
the CRC-32 and SHA-256 of all bytes. ``ArrayAssembler`` rebuilds the arrays and
rejects a stream with a gap, a repeat, a truncation, a size or checksum mismatch,
or a tensor that is not what it claims to be, raising ``WireError`` with the field
and the value at fault. Each received byte is hashed once: the service computes the
SHA-256 of a push anyway (it identifies the shard), so it checks that digest (the
CRC-32 only for a trailer without one); a client reading class means checks the
cheaper CRC-32.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from ncserve.v1 import ncserve_pb2 as pb

MAX_PIECE_BYTES = 1 << 20
"""Largest ``TensorPiece.data`` on the wire (1 MiB), far under gRPC's 4 MiB default."""
# No dimension of a measurement's tensors exceeds an int32 (K and P are int32).
_MAX_DIM = (1 << 31) - 1

_WIRE_DTYPES: dict[pb.DType, np.dtype] = {
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_INT64: np.dtype("<i8"),
}


class WireError(ValueError):
    """A tensor stream that cannot be trusted.

    ``reason`` is one of ``invalid_argument`` (a malformed field) or ``truncated``
    (the stream ended before its trailer), so callers can count rejections by kind.
    """

    def __init__(self, message: str, reason: str = "invalid_argument") -> None:
        super().__init__(message)
        self.reason = reason


def wire_dtype(array: np.ndarray) -> tuple[pb.DType, np.dtype]:
    """The wire type an array travels as: integers and booleans as int64, floats as float64."""
    kind = array.dtype.kind
    if kind in "iub":
        return pb.DTYPE_INT64, _WIRE_DTYPES[pb.DTYPE_INT64]
    if kind == "f":
        return pb.DTYPE_FLOAT64, _WIRE_DTYPES[pb.DTYPE_FLOAT64]
    raise TypeError(f"array dtype {array.dtype} cannot travel on the wire (only ints and floats)")


def payload_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of tensor data ``encode_arrays(arrays)`` carries (what a push header declares)."""
    return sum(
        np.size(value) * wire_dtype(np.asarray(value))[1].itemsize for value in arrays.values()
    )


def encode_arrays(
    arrays: Mapping[str, np.ndarray], max_piece_bytes: int = MAX_PIECE_BYTES, digest: bool = True
) -> Iterator[pb.TensorChunk]:
    """Yield the chunks of a stream carrying ``arrays`` (in insertion order), trailer last.

    ``digest=False`` leaves the trailer's SHA-256 out (a stream only ever checked by its
    CRC-32, such as the class means the service sends to every rank)."""
    if not 0 < max_piece_bytes <= MAX_PIECE_BYTES:
        raise ValueError(
            f"max_piece_bytes must be in (0, {MAX_PIECE_BYTES}], got {max_piece_bytes}"
        )
    seq = 0
    total = 0
    crc = 0
    sha256 = hashlib.sha256() if digest else None
    for name, value in arrays.items():
        array = np.asarray(value)
        code, dtype = wire_dtype(array)
        raw = np.ascontiguousarray(array, dtype=dtype).reshape(-1).view(np.uint8)
        shape = list(array.shape)
        # An empty tensor still needs one piece so the receiver learns its name and shape.
        offsets = range(0, max(len(raw), 1), max_piece_bytes)
        for offset in offsets:
            data = raw[offset : offset + max_piece_bytes].tobytes()
            crc = zlib.crc32(data, crc)
            if sha256 is not None:
                sha256.update(data)
            total += len(data)
            yield pb.TensorChunk(
                seq=seq,
                piece=pb.TensorPiece(name=name, dtype=code, shape=shape, offset=offset, data=data),
            )
            seq += 1
    yield pb.TensorChunk(
        seq=seq,
        trailer=pb.StreamTrailer(
            num_pieces=seq,
            num_tensors=len(arrays),
            total_bytes=total,
            crc32=crc,
            sha256=b"" if sha256 is None else sha256.digest(),
        ),
    )


@dataclass
class _TensorBuffer:
    """The tensor being received: its declared type and shape, and the bytes so far."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    array: np.ndarray
    buffer: np.ndarray  # the array's bytes (uint8), filled in order
    filled: int = 0


class ArrayAssembler:
    """Rebuild arrays from TensorChunk messages fed one at a time, validating as it goes.

    ``max_total_bytes`` bounds what a sender can make the receiver allocate; it is
    checked against each tensor's declared shape before any buffer is allocated.
    With ``digest`` (the service's pushes) it computes the SHA-256 of the bytes, which
    ``sha256_hex`` gives and which is checked against the trailer's; without (a client
    reading class means) it checks the cheaper CRC-32 only.
    """

    def __init__(self, max_total_bytes: int, max_tensors: int = 64, digest: bool = True) -> None:
        self._max_total_bytes = max_total_bytes
        self._max_tensors = max_tensors
        self._arrays: dict[str, np.ndarray] = {}
        self._current: _TensorBuffer | None = None
        self._declared_bytes = 0
        self._next_seq = 0
        self._received = 0
        self._sha256 = hashlib.sha256() if digest else None
        self._done = False

    @property
    def complete(self) -> bool:
        """Whether the trailer arrived and matched."""
        return self._done

    @property
    def payload_bytes(self) -> int:
        return self._received

    @property
    def sha256_hex(self) -> str:
        """SHA-256 of the tensor bytes in stream order (the identity of a shard's payload)."""
        if self._sha256 is None:
            raise ValueError("this assembler was made with digest=False")
        return self._sha256.hexdigest()

    def feed(self, chunk: pb.TensorChunk) -> None:
        if self._done:
            raise WireError(f"chunk seq={chunk.seq} arrived after the trailer")
        if chunk.seq != self._next_seq:
            kind = "repeated" if chunk.seq < self._next_seq else "out of order (gap)"
            raise WireError(f"chunk seq={chunk.seq} is {kind}: expected seq={self._next_seq}")
        self._next_seq += 1
        which = chunk.WhichOneof("body")
        if which == "piece":
            self._feed_piece(chunk.piece)
        elif which == "trailer":
            self._finish(chunk.trailer)
        else:
            raise WireError(f"chunk seq={chunk.seq} carries neither a piece nor a trailer")

    def _feed_piece(self, piece: pb.TensorPiece) -> None:
        data = piece.data  # each attribute read copies the bytes out of the message
        size = len(data)
        if size > MAX_PIECE_BYTES:
            raise WireError(
                f"piece of tensor {piece.name!r} has {size} bytes of data; "
                f"at most {MAX_PIECE_BYTES} allowed"
            )
        if self._current is not None and piece.name != self._current.name:
            self._close_current()
        if self._current is None:
            self._current = self._open(piece)
        current = self._current
        name = current.name
        if piece.dtype != _code_of(current.dtype) or tuple(piece.shape) != current.shape:
            raise WireError(
                f"tensor {name!r} changed dtype/shape between pieces: "
                f"dtype={piece.dtype} shape={list(piece.shape)}"
            )
        if piece.offset != current.filled:
            raise WireError(
                f"tensor {name!r} piece offset={piece.offset}; expected offset={current.filled}"
            )
        end = current.filled + size
        if end > len(current.buffer):
            raise WireError(
                f"tensor {name!r} has more than the {len(current.buffer)} bytes "
                f"its shape {list(current.shape)} holds"
            )
        current.buffer[current.filled : end] = np.frombuffer(data, dtype=np.uint8)
        current.filled = end
        self._received += size
        if self._sha256 is not None:
            self._sha256.update(data)

    def _open(self, piece: pb.TensorPiece) -> _TensorBuffer:
        name = piece.name
        if not name:
            raise WireError("tensor name is empty")
        if name in self._arrays:
            raise WireError(f"tensor {name!r} sent twice")
        if len(self._arrays) >= self._max_tensors:
            raise WireError(f"more than {self._max_tensors} tensors in one stream")
        dtype = _WIRE_DTYPES.get(piece.dtype)
        if dtype is None:
            raise WireError(f"tensor {name!r} has dtype={piece.dtype}; expected FLOAT64 or INT64")
        shape = tuple(int(d) for d in piece.shape)
        # No dimension of a measurement exceeds an int32 (K and P are int32 on the wire);
        # larger ones, even of an empty tensor, are refused before numpy sees them.
        if any(not 0 <= d <= _MAX_DIM for d in shape) or len(shape) > 4:
            raise WireError(
                f"tensor {name!r} has invalid shape={list(shape)} (at most 4 dimensions, "
                f"each in [0, {_MAX_DIM}])"
            )
        expected = math.prod(shape) * dtype.itemsize
        self._declared_bytes += expected
        if self._declared_bytes > self._max_total_bytes:
            raise WireError(
                f"tensor {name!r} with shape={list(shape)} takes the stream past its limit "
                f"of {self._max_total_bytes} bytes",
                reason="resource_exhausted",
            )
        # Allocated once at the declared size (already checked against the limit), then
        # filled; left uninitialized, as every byte is written before the array is used.
        try:
            array = np.empty(shape, dtype=dtype)
        except (ValueError, MemoryError) as exc:
            raise WireError(f"tensor {name!r} with shape={list(shape)}: {exc}") from None
        return _TensorBuffer(name, dtype, shape, array, array.reshape(-1).view(np.uint8))

    def _close_current(self) -> None:
        current = self._current
        assert current is not None
        if current.filled != len(current.buffer):
            raise WireError(
                f"tensor {current.name!r} ended after {current.filled} of the "
                f"{len(current.buffer)} bytes its shape {list(current.shape)} holds"
            )
        self._arrays[current.name] = current.array
        self._current = None

    def _finish(self, trailer: pb.StreamTrailer) -> None:
        if self._current is not None:
            self._close_current()
        pieces = self._next_seq - 1
        checks = (
            ("num_pieces", trailer.num_pieces, pieces),
            ("num_tensors", trailer.num_tensors, len(self._arrays)),
            ("total_bytes", trailer.total_bytes, self._received),
        )
        for field, claimed, actual in checks:
            if claimed != actual:
                raise WireError(f"trailer {field}={claimed} but the stream carried {actual}")
        if trailer.sha256 and self._sha256 is not None:
            if trailer.sha256 != self._sha256.digest():
                raise WireError(
                    f"trailer sha256={trailer.sha256.hex()} but the stream carried "
                    f"{self._sha256.hexdigest()}"
                )
        else:
            # Over the tensors' bytes, which are in stream order.
            crc = 0
            for array in self._arrays.values():
                crc = zlib.crc32(array.data, crc)
            if trailer.crc32 != crc:
                raise WireError(f"trailer crc32={trailer.crc32} but the stream carried {crc}")
        self._done = True

    def arrays(self) -> dict[str, np.ndarray]:
        """The rebuilt arrays (little-endian); the stream must be complete."""
        if not self._done:
            raise WireError(
                f"stream truncated after {self._next_seq} chunks: no trailer", reason="truncated"
            )
        return dict(self._arrays)


def _code_of(dtype: np.dtype) -> pb.DType:
    return pb.DTYPE_FLOAT64 if dtype.kind == "f" else pb.DTYPE_INT64


def decode_arrays(
    chunks: Iterable[pb.TensorChunk], max_total_bytes: int = 1 << 34
) -> dict[str, np.ndarray]:
    """Rebuild the arrays of a whole stream (see ``ArrayAssembler``; checked by CRC-32)."""
    assembler = ArrayAssembler(max_total_bytes=max_total_bytes, digest=False)
    for chunk in chunks:
        assembler.feed(chunk)
    return assembler.arrays()
