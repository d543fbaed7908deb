"""Durable, bounded buffer of calls the service could not take yet.

While the service is unreachable, a training rank keeps producing pushes. They wait here, in
the order they were made, until the client replays them:

- up to ``max_memory_bytes`` of payload is held in memory;
- past that, each new call is written to the spool directory (``spill_dir``) as one file,
  atomically (temp file, fsync, rename, fsync of the directory), so a crash never leaves a
  half-written entry that looks whole;
- past ``max_bytes`` in total, new calls are dropped, and every drop is recorded with its key
  (run, step, rank, round) so the caller can say exactly which measurements are missing.
  Later rounds of a dropped (run, step, rank) are dropped too: without their round 1 the
  service could never accept them.

``persist()`` (called by the client's ``close()``) writes the in-memory part to the spool as
well. A new buffer on the same ``spill_dir`` picks the spool up and replays it first, in the
original order: sequence numbers are part of the file names. One process owns a spool at a
time (an ``flock`` on ``spool.lock``), because two writers would interleave their sequences.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import threading
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KIND_REGISTER = "register_run"
KIND_ROUND1 = "round1"
KIND_ROUND2 = "round2"
KIND_SCALARS = "scalars"
KIND_FINISH = "finish_run"
KIND_UNKNOWN = "unknown"  # only for a damaged spool file whose header cannot be read
KINDS = (KIND_REGISTER, KIND_ROUND1, KIND_ROUND2, KIND_SCALARS, KIND_FINISH, KIND_UNKNOWN)
# Tiny calls that every later one (registration) or the run's life (its end) depends on:
# a full buffer never drops them.
ALWAYS_KEPT = (KIND_REGISTER, KIND_FINISH)

_MAGIC = b"NCSPOOL1"
_HEADER_LEN = struct.Struct("<I")
_SPOOL_SUFFIX = ".spool"
_LOCK_NAME = "spool.lock"


class SpoolInUseError(RuntimeError):
    """Another live process holds the spool directory."""


@dataclass(frozen=True)
class BufferKey:
    """What a buffered call is about. ``round`` is 1 or 2 for shard pushes, else None."""

    kind: str
    run_id: str
    step: int | None = None
    rank: int | None = None
    round: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    def __str__(self) -> str:
        parts = [f"{self.kind} run={self.run_id}"]
        for name in ("step", "rank", "round"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value}")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "run_id": self.run_id,
            "step": self.step,
            "rank": self.rank,
            "round": self.round,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BufferKey:
        def opt_int(name: str) -> int | None:
            value = d.get(name)
            if value is None:
                return None
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer or null, got {value!r}")
            return value

        kind, run_id = d.get("kind"), d.get("run_id")
        if not isinstance(kind, str) or not isinstance(run_id, str):
            raise ValueError(f"kind and run_id must be strings, got {kind!r}, {run_id!r}")
        return cls(kind, run_id, opt_int("step"), opt_int("rank"), opt_int("round"))


@dataclass(frozen=True)
class DroppedEntry:
    """A call the buffer could not keep, and why."""

    key: BufferKey
    nbytes: int
    reason: str

    def __str__(self) -> str:
        return f"{self.key} ({self.nbytes} bytes): {self.reason}"


@dataclass(frozen=True)
class BufferedCall:
    """The oldest buffered call, with its payload, as handed to the replayer."""

    seq: int
    key: BufferKey
    payload: bytes


@dataclass(eq=False)
class _Entry:
    seq: int
    key: BufferKey
    nbytes: int
    payload: bytes | None  # None: only on disk
    path: Path | None  # None: only in memory


class DurableBuffer:
    """FIFO of undelivered calls: memory first, then a spool on disk, then drops.

    Thread-safe. ``max_memory_bytes`` only matters with a ``spill_dir``; without one the
    whole buffer lives in memory and ``max_bytes`` bounds it.
    """

    def __init__(
        self,
        spill_dir: Path | None,
        max_bytes: int,
        max_memory_bytes: int | None = None,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes!r}")
        if max_memory_bytes is not None and max_memory_bytes < 0:
            raise ValueError(f"max_memory_bytes must be >= 0, got {max_memory_bytes!r}")
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.max_bytes = max_bytes
        self.max_memory_bytes = (
            max_bytes if max_memory_bytes is None else min(max_memory_bytes, max_bytes)
        )
        self._lock = threading.Lock()
        # Appends write spool files outside ``_lock``; this keeps their order equal to their
        # sequence numbers without blocking the replayer during a large write.
        self._append_lock = threading.Lock()
        self._entries: deque[_Entry] = deque()
        self._total_bytes = 0
        self._memory_bytes = 0
        self._next_seq = 0
        self._dropped: list[DroppedEntry] = []
        # (run, step, rank) whose earlier round was dropped: their later rounds are useless.
        self._orphaned: set[tuple[str, int | None, int | None]] = set()
        self._head_cache: tuple[int, bytes] | None = None
        self._lock_fd: int | None = None
        self.restored = 0
        if self.spill_dir is not None:
            self._open_spool(self.spill_dir)

    # -- spool on disk ------------------------------------------------------------------

    def _open_spool(self, spill_dir: Path) -> None:
        spill_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(spill_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolInUseError(
                f"spill_dir {str(spill_dir)!r} is in use by another process; "
                "give each process (each rank) its own spill_dir"
            ) from None
        self._lock_fd = fd
        for leftover in spill_dir.glob(".*.tmp"):
            # A temp file is a write that never reached its rename: not an entry.
            leftover.unlink(missing_ok=True)
        restored: list[_Entry] = []
        for path in spill_dir.glob("*" + _SPOOL_SUFFIX):
            try:
                seq, key, nbytes = _read_header(path)
            except (OSError, ValueError) as error:
                self._quarantine(path, f"unreadable spool file {path.name}: {error}")
                continue
            restored.append(_Entry(seq, key, nbytes, None, path))
        restored.sort(key=lambda e: e.seq)
        self._entries.extend(restored)
        self._total_bytes = sum(e.nbytes for e in restored)
        self._next_seq = restored[-1].seq + 1 if restored else 0
        self.restored = len(restored)

    def _quarantine(self, path: Path, reason: str) -> None:
        """Keep a damaged spool file for inspection, out of the replay path, and report it."""
        try:
            _, key, nbytes = _read_header(path)
        except (OSError, ValueError):
            key = BufferKey(KIND_UNKNOWN, run_id=f"<unknown: {path.name}>")
            nbytes = path.stat().st_size if path.exists() else 0
        try:
            path.rename(path.with_suffix(".corrupt"))
        except OSError:
            path.unlink(missing_ok=True)
        self._dropped.append(DroppedEntry(key, nbytes, reason))

    def _write_spool(self, seq: int, key: BufferKey, payload: bytes) -> Path:
        assert self.spill_dir is not None
        header = json.dumps(
            {
                "version": 1,
                "seq": seq,
                "key": key.to_json(),
                "nbytes": len(payload),
                "crc32": zlib.crc32(payload),
            }
        ).encode()
        final = self.spill_dir / f"{seq:020d}.{key.kind}{_SPOOL_SUFFIX}"
        tmp = self.spill_dir / f".{final.name}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(_MAGIC)
                f.write(_HEADER_LEN.pack(len(header)))
                f.write(header)
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._fsync_dir()
        return final

    def _fsync_dir(self) -> None:
        # The rename is only durable once the directory entry itself reaches the disk.
        assert self.spill_dir is not None
        fd = os.open(self.spill_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- public API ---------------------------------------------------------------------

    def append(self, key: BufferKey, payload: bytes) -> bool:
        """Queue ``payload`` behind everything already buffered. False: dropped (recorded)."""
        nbytes = len(payload)
        shard = (key.run_id, key.step, key.rank)
        with self._append_lock:
            with self._lock:
                reason = None
                if key.kind in (KIND_ROUND1, KIND_ROUND2) and shard in self._orphaned:
                    reason = "an earlier round of this (run, step, rank) was dropped"
                elif key.kind not in ALWAYS_KEPT and self._total_bytes + nbytes > self.max_bytes:
                    reason = (
                        f"buffer full: {self._total_bytes} of {self.max_bytes} bytes in use, "
                        f"entry needs {nbytes}"
                    )
                if reason is not None:
                    self._drop(key, nbytes, reason)
                    return False
                seq = self._next_seq
                self._next_seq += 1
                self._total_bytes += nbytes
                to_disk = (
                    self.spill_dir is not None
                    and self._memory_bytes + nbytes > self.max_memory_bytes
                )
                if not to_disk:
                    self._memory_bytes += nbytes
                    self._entries.append(_Entry(seq, key, nbytes, bytes(payload), None))
                    return True
            try:
                path = self._write_spool(seq, key, payload)
            except OSError as error:
                with self._lock:
                    self._total_bytes -= nbytes
                    self._drop(key, nbytes, f"could not write the spool: {error}")
                return False
            with self._lock:
                self._entries.append(_Entry(seq, key, nbytes, None, path))
            return True

    def _drop(self, key: BufferKey, nbytes: int, reason: str) -> None:
        self._dropped.append(DroppedEntry(key, nbytes, reason))
        if key.kind in (KIND_ROUND1, KIND_ROUND2):
            self._orphaned.add((key.run_id, key.step, key.rank))

    def head(self) -> BufferedCall | None:
        """The oldest call, payload loaded; None when empty. Damaged files are skipped."""
        while True:
            with self._lock:
                if not self._entries:
                    return None
                entry = self._entries[0]
                if entry.payload is not None:
                    return BufferedCall(entry.seq, entry.key, entry.payload)
                if self._head_cache is not None and self._head_cache[0] == entry.seq:
                    return BufferedCall(entry.seq, entry.key, self._head_cache[1])
            assert entry.path is not None
            try:
                payload = _read_payload(entry.path)
            except (OSError, ValueError) as error:
                with self._lock:
                    if self._entries and self._entries[0] is entry:
                        self._entries.popleft()
                        self._total_bytes -= entry.nbytes
                        self._quarantine(entry.path, f"damaged spool file: {error}")
                continue
            with self._lock:
                self._head_cache = (entry.seq, payload)
            return BufferedCall(entry.seq, entry.key, payload)

    def head_seq(self) -> int | None:
        """Sequence number of the oldest call, without loading its payload."""
        with self._lock:
            return self._entries[0].seq if self._entries else None

    def remove(self, seq: int) -> None:
        """Forget the head call ``seq`` (delivered, or refused for good by the service)."""
        with self._lock:
            if not self._entries or self._entries[0].seq != seq:
                raise KeyError(f"seq {seq} is not the head of the buffer")
            entry = self._entries.popleft()
            self._total_bytes -= entry.nbytes
            if entry.payload is not None:
                self._memory_bytes -= entry.nbytes
            if self._head_cache is not None and self._head_cache[0] == seq:
                self._head_cache = None
        if entry.path is not None:
            # A crash before this unlink replays the call again; the service's pushes are
            # idempotent on (run, step, rank, round), so that is harmless.
            entry.path.unlink(missing_ok=True)

    def persist(self) -> int:
        """Write every in-memory entry to the spool so a later process replays it.

        Returns how many entries were written; entries that could not be written are
        recorded as dropped. No-op without a ``spill_dir``.
        """
        if self.spill_dir is None:
            return 0
        written = 0
        with self._append_lock:
            with self._lock:
                pending = [e for e in self._entries if e.path is None]
            for entry in pending:
                assert entry.payload is not None
                try:
                    path = self._write_spool(entry.seq, entry.key, entry.payload)
                except OSError as error:
                    with self._lock:
                        if entry in self._entries:
                            self._entries.remove(entry)
                            self._total_bytes -= entry.nbytes
                            self._memory_bytes -= entry.nbytes
                            self._drop(entry.key, entry.nbytes, f"could not persist: {error}")
                    continue
                with self._lock:
                    entry.path = path
                    entry.payload = None
                    self._memory_bytes -= entry.nbytes
                written += 1
        return written

    def close(self) -> None:
        """Release the spool lock. Call ``persist()`` first to keep in-memory entries."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def keys(self) -> list[BufferKey]:
        with self._lock:
            return [e.key for e in self._entries]

    def dropped(self) -> list[DroppedEntry]:
        with self._lock:
            return list(self._dropped)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._total_bytes

    @property
    def memory_bytes(self) -> int:
        with self._lock:
            return self._memory_bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def _read_header(path: Path) -> tuple[int, BufferKey, int]:
    with open(path, "rb") as f:
        magic = f.read(len(_MAGIC))
        if magic != _MAGIC:
            raise ValueError(f"bad magic {magic!r}, expected {_MAGIC!r}")
        (header_len,) = _HEADER_LEN.unpack(f.read(_HEADER_LEN.size))
        header = json.loads(f.read(header_len))
    if not isinstance(header, dict) or header.get("version") != 1:
        raise ValueError("unsupported spool header version")
    seq, nbytes = header.get("seq"), header.get("nbytes")
    if not isinstance(seq, int) or not isinstance(nbytes, int) or seq < 0 or nbytes < 0:
        raise ValueError(f"bad seq/nbytes in header: {seq!r}, {nbytes!r}")
    return seq, BufferKey.from_json(header.get("key", {})), nbytes


def _read_payload(path: Path) -> bytes:
    with open(path, "rb") as f:
        magic = f.read(len(_MAGIC))
        if magic != _MAGIC:
            raise ValueError(f"bad magic {magic!r}")
        (header_len,) = _HEADER_LEN.unpack(f.read(_HEADER_LEN.size))
        header = json.loads(f.read(header_len))
        payload = f.read()
    if len(payload) != header["nbytes"]:
        raise ValueError(f"truncated: {len(payload)} of {header['nbytes']} payload bytes")
    if zlib.crc32(payload) != header["crc32"]:
        raise ValueError("payload checksum mismatch")
    return payload
