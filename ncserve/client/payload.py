"""Self-contained bytes for one buffered call: a JSON header and named float64/int64 arrays.

The buffer stores calls in this form rather than as gRPC messages so a spool written by one
client version replays through whatever chunking the current wire codec uses. Arrays are
stored little-endian with ``allow_pickle=False``, so reading a spool never executes code.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

_HEADER_LEN = struct.Struct("<I")


def encode_payload(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> bytes:
    header = json.dumps(dict(meta), sort_keys=True).encode()
    body = io.BytesIO()
    if arrays:
        little = {name: _little_endian(np.asarray(a)) for name, a in arrays.items()}
        np.savez(body, allow_pickle=False, **little)
    return _HEADER_LEN.pack(len(header)) + header + body.getvalue()


def decode_payload(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if len(data) < _HEADER_LEN.size:
        raise ValueError(f"payload of {len(data)} bytes is too short for its header")
    (header_len,) = _HEADER_LEN.unpack_from(data)
    start = _HEADER_LEN.size
    meta = json.loads(data[start : start + header_len])
    if not isinstance(meta, dict):
        raise ValueError("payload header is not a JSON object")
    rest = data[start + header_len :]
    arrays: dict[str, np.ndarray] = {}
    if rest:
        with np.load(io.BytesIO(rest), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    return meta, arrays


def _little_endian(a: np.ndarray) -> np.ndarray:
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not _NATIVE_LITTLE):
        return a.astype(a.dtype.newbyteorder("<"))
    return a


_NATIVE_LITTLE = np.little_endian
