"""The client's durable bounded buffer: memory bound, spill, order, restart replay, drops."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ncserve.client.buffer import (
    KIND_REGISTER,
    KIND_ROUND1,
    KIND_ROUND2,
    KIND_SCALARS,
    BufferKey,
    DurableBuffer,
    SpoolInUseError,
)
from ncserve.client.payload import decode_payload, encode_payload


def r1(step: int, rank: int = 0) -> BufferKey:
    return BufferKey(KIND_ROUND1, "run", step, rank, 1)


def r2(step: int, rank: int = 0) -> BufferKey:
    return BufferKey(KIND_ROUND2, "run", step, rank, 2)


def drain(buf: DurableBuffer) -> list[tuple[BufferKey, bytes]]:
    out = []
    while (call := buf.head()) is not None:
        out.append((call.key, call.payload))
        buf.remove(call.seq)
    return out


def spool_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.spool"))


def test_memory_bound_spills_to_disk_in_order(tmp_path: Path) -> None:
    buf = DurableBuffer(tmp_path, max_bytes=10_000, max_memory_bytes=250)
    items = [(r1(s), bytes([s]) * 100) for s in range(5)]
    for key, payload in items:
        assert buf.append(key, payload)
    # Two 100-byte entries fit under the 250-byte memory bound; the other three spill.
    assert buf.memory_bytes == 200
    assert len(spool_files(tmp_path)) == 3
    assert buf.nbytes == 500 and len(buf) == 5
    assert drain(buf) == items
    assert spool_files(tmp_path) == []
    assert buf.nbytes == 0 and buf.memory_bytes == 0
    buf.close()


def test_without_spill_dir_memory_is_the_hard_limit() -> None:
    buf = DurableBuffer(None, max_bytes=300)
    assert buf.append(r1(0), b"a" * 200)
    assert not buf.append(r1(1), b"b" * 200)
    assert buf.append(r1(2), b"c" * 100)
    assert [k for k, _ in drain(buf)] == [r1(0), r1(2)]


def test_restart_replays_spool_in_original_order(tmp_path: Path) -> None:
    buf = DurableBuffer(tmp_path, max_bytes=10_000, max_memory_bytes=150)
    first = [
        (BufferKey(KIND_REGISTER, "run"), b"reg"),
        (r1(10, 3), b"x" * 100),
        (r2(10, 3), b"y" * 100),
        (BufferKey(KIND_SCALARS, "run", 11), b"z" * 10),
    ]
    for key, payload in first:
        buf.append(key, payload)
    assert 0 < len(spool_files(tmp_path)) < len(first)
    assert buf.persist() > 0
    assert len(spool_files(tmp_path)) == len(first)
    buf.close()

    again = DurableBuffer(tmp_path, max_bytes=10_000, max_memory_bytes=150)
    assert again.restored == len(first)
    assert again.keys() == [k for k, _ in first]
    # New calls queue behind the restored ones.
    again.append(r1(20, 3), b"new")
    assert drain(again) == [*first, (r1(20, 3), b"new")]
    again.close()


def test_restart_after_kill_keeps_every_spilled_entry(tmp_path: Path) -> None:
    # max_memory_bytes=0 writes every call straight to the spool; a SIGKILL right after the
    # appends, with no persist() or close(), must not lose any of them.
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from ncserve.client.buffer import DurableBuffer, BufferKey
        buf = DurableBuffer(Path({str(tmp_path)!r}), max_bytes=1 << 20, max_memory_bytes=0)
        for step in range(6):
            buf.append(BufferKey("round1", "run", step, 0, 1), bytes([step]) * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    buf = DurableBuffer(tmp_path, max_bytes=1 << 20)
    assert drain(buf) == [(r1(s), bytes([s]) * 1000) for s in range(6)]
    buf.close()


def test_hard_limit_drops_are_reported_with_keys(tmp_path: Path) -> None:
    buf = DurableBuffer(tmp_path, max_bytes=250, max_memory_bytes=100)
    assert buf.append(r1(0), b"a" * 100)
    assert buf.append(r2(0), b"b" * 100)
    assert not buf.append(r1(1), b"c" * 100)  # 300 > 250
    # Round 2 of the dropped step/rank goes too, even though it would fit.
    assert not buf.append(r2(1), b"d" * 10)
    # Registrations are always kept: every later push needs them.
    assert buf.append(BufferKey(KIND_REGISTER, "run2"), b"r" * 100)
    dropped = buf.dropped()
    assert [(d.key, d.nbytes) for d in dropped] == [(r1(1), 100), (r2(1), 10)]
    assert "buffer full" in dropped[0].reason and "250" in dropped[0].reason
    assert "earlier round" in dropped[1].reason
    # Another rank of the same step is unaffected.
    drain(buf)
    assert buf.append(r1(1, rank=1), b"e" * 10)
    buf.close()


def test_entry_larger_than_the_limit_is_dropped(tmp_path: Path) -> None:
    buf = DurableBuffer(tmp_path, max_bytes=50)
    assert not buf.append(r1(0), b"a" * 51)
    assert len(buf) == 0
    assert buf.dropped()[0].key == r1(0)
    buf.close()


def test_one_process_per_spool(tmp_path: Path) -> None:
    buf = DurableBuffer(tmp_path, max_bytes=100)
    script = (
        "import sys; from pathlib import Path\n"
        "from ncserve.client.buffer import DurableBuffer, SpoolInUseError\n"
        "try:\n"
        f"    DurableBuffer(Path({str(tmp_path)!r}), max_bytes=100)\n"
        "except SpoolInUseError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 3, proc.stderr.decode()
    assert b"in use by another process" in proc.stdout
    buf.close()
    DurableBuffer(tmp_path, max_bytes=100).close()


def test_same_process_second_buffer_is_refused(tmp_path: Path) -> None:
    buf = DurableBuffer(tmp_path, max_bytes=100)
    with pytest.raises(SpoolInUseError, match="own spill_dir"):
        DurableBuffer(tmp_path, max_bytes=100)
    buf.close()


def test_damaged_spool_file_is_quarantined_and_reported(tmp_path: Path) -> None:
    buf = DurableBuffer(tmp_path, max_bytes=10_000, max_memory_bytes=0)
    for step in range(3):
        buf.append(r1(step), bytes([step]) * 100)
    buf.close()
    victim = spool_files(tmp_path)[1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    (tmp_path / ".00000000000000000099.round1.spool.tmp").write_bytes(b"half a write")

    buf = DurableBuffer(tmp_path, max_bytes=10_000)
    assert [k for k, _ in drain(buf)] == [r1(0), r1(2)]
    (dropped,) = buf.dropped()
    assert dropped.key == r1(1) and "checksum" in dropped.reason
    assert list(tmp_path.glob("*.tmp")) == []
    assert len(list(tmp_path.glob("*.corrupt"))) == 1
    buf.close()


def test_remove_only_the_head(tmp_path: Path) -> None:
    buf = DurableBuffer(None, max_bytes=100)
    buf.append(r1(0), b"a")
    buf.append(r1(1), b"b")
    head = buf.head()
    assert head is not None
    with pytest.raises(KeyError):
        buf.remove(head.seq + 1)


def test_payload_round_trip() -> None:
    arrays = {
        "counts": np.arange(4, dtype=np.int64),
        "sums": np.linspace(0, 1, 12).reshape(4, 3).astype(">f8"),
        "scalar": np.asarray(7, dtype=np.int64),
    }
    meta = {"run_id": "r", "step": 3, "scalars": {"lr": 0.1}}
    got_meta, got = decode_payload(encode_payload(meta, arrays))
    assert got_meta == meta
    assert set(got) == set(arrays)
    for name, a in arrays.items():
        np.testing.assert_array_equal(got[name], a)
        assert got[name].dtype.byteorder in ("<", "=", "|")
    assert decode_payload(encode_payload({"x": 1}, {})) == ({"x": 1}, {})
