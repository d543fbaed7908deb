"""Regenerate the Python code of the v1 API from proto/ncserve/v1/*.proto.

Usage: python scripts/gen_proto.py [OUT_DIR]   (default: the repository root)

The generated modules land in OUT_DIR/ncserve/v1/ so they import as
``from ncserve.v1 import ncserve_pb2, ncserve_pb2_grpc``. They are committed;
tests/test_proto_stale.py regenerates them into a temporary directory and fails
when the committed copies differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "ncserve" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) into ``out_dir``; return the files written."""
    # Imported here so the rest of the package never needs grpcio-tools at runtime.
    from grpc_tools import protoc

    target = out_dir / "ncserve" / "v1"
    target.mkdir(parents=True, exist_ok=True)
    # grpc_tools ships the well-known types; protoc needs them on the include path.
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    # protoc resolves the relative proto paths against the include path.
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit status {rc}: {' '.join(args)}")
    return sorted(p for p in target.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main(argv: list[str]) -> int:
    out_dir = Path(argv[1]) if len(argv) > 1 else REPO_ROOT
    for path in generate(out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
