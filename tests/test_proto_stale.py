"""The committed generated code in ncserve/v1/ matches proto/ncserve/v1/*.proto."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Lines that only record which protoc / grpcio-tools produced the file. A newer
# generator stamps newer versions into otherwise identical code; that is not staleness.
_VERSION_STAMP = re.compile(
    r"^(# Protobuf Python Version: .*|GRPC_GENERATED_VERSION = .*|    \d+,)$", re.MULTILINE
)


def _load_generator():
    spec = importlib.util.spec_from_file_location(
        "gen_proto", REPO_ROOT / "scripts" / "gen_proto.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _normalized(path: Path) -> str:
    return _VERSION_STAMP.sub("<version>", path.read_text())


def test_generated_code_is_current(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    gen = _load_generator()
    fresh = gen.generate(tmp_path)
    assert fresh, "protoc produced no files"
    committed_dir = REPO_ROOT / "ncserve" / "v1"
    fresh_names = {p.name for p in fresh}
    committed_names = {
        p.name for p in committed_dir.iterdir() if p.name.endswith(gen.GENERATED_SUFFIXES)
    }
    assert fresh_names == committed_names, (
        f"generated files {sorted(fresh_names)} differ from committed {sorted(committed_names)}; "
        "run `python scripts/gen_proto.py`"
    )
    stale = [p.name for p in fresh if _normalized(p) != _normalized(committed_dir / p.name)]
    assert not stale, f"stale generated code {stale}: run `python scripts/gen_proto.py`"


def test_generated_modules_import_as_package() -> None:
    from ncserve.v1 import ncserve_pb2, ncserve_pb2_grpc

    service = ncserve_pb2.DESCRIPTOR.services_by_name["NCService"]
    assert service.full_name == "ncserve.v1.NCService"
    assert {m.name for m in service.methods} == {
        "RegisterRun", "PushRound1", "FetchClassMeans", "PushRound2", "RecordScalars",
        "ListRuns", "GetRun", "GetMetrics", "GetScalars", "WatchMetrics", "FinishRun",
        "Heartbeat", "DeleteRun",
    }  # fmt: skip
    assert hasattr(ncserve_pb2_grpc, "NCServiceStub")


def test_every_proto_field_is_commented() -> None:
    """The .proto is the contract: each field and enum value carries a comment above it."""
    text = (REPO_ROOT / "proto" / "ncserve" / "v1" / "ncserve.proto").read_text()
    lines = text.splitlines()
    field = re.compile(r"^\s+((optional |repeated )?[\w.<>, ]+ )?\w+ = \d+;")
    uncommented = [
        line.strip()
        for i, line in enumerate(lines)
        if field.match(line) and not lines[i - 1].strip().startswith("//")
    ]
    assert not uncommented, f"fields without a comment: {uncommented}"
