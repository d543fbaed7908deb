"""`ncserve runs --db` and `ncserve query --db`: a store read directly, even while a server
writes it, with the same answers as the server's."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from click.testing import CliRunner

from ncserve.cli import cli
from ncserve.options import Duration, shown_duration
from ncserve.v1 import ncserve_pb2 as pb
from tests.service_support import make_dataset, register, run_step_sequentially

DATA = make_dataset(9, 3, 4, 2, 10)


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_the_store_answers_as_the_server_does_while_it_writes(server, stub) -> None:
    register(stub, "a", DATA, metadata={"optimizer": "sgd"})
    for step in (0, 5):
        run_step_sequentially(stub, "a", step, DATA)
    register(stub, "b", DATA)
    stub.FinishRun(pb.FinishRunRequest(run_id="a", state=pb.RUN_FINISHED), timeout=5)
    db = str(server.store.path)
    target = ("--target", server.address)
    for args in (
        ("runs", "--format", "json"),
        ("runs", "--state", "finished", "--format", "json"),
        ("query", "a", "--all", "--format", "json"),
        ("query", "a", "--step", "5", "--format", "json"),
        ("query", "a", "--format", "json"),
    ):
        code_db, from_db = run(*args, "--db", db)
        code_srv, from_server = run(*args, *target)
        assert code_db == code_srv == 0, (from_db, from_server)
        assert json.loads(from_db) == json.loads(from_server), args
    # The server keeps writing while the store is read.
    run_step_sequentially(stub, "b", 1, DATA)
    code, table = run("query", "b", "--all", "--db", db)
    assert code == 0 and table.splitlines()[1].split()[:3] == ["1", "-", "complete"]


def test_store_errors_are_one_line(tmp_path: Path, server, stub) -> None:
    code, out = run("runs", "--db", str(tmp_path / "absent.db"))
    assert code == 2 and out.count("\n") == 1 and "no database at" in out
    register(stub, "a", DATA)
    code, out = run("query", "ghost", "--db", str(server.store.path))
    assert code == 2 and out.count("\n") == 1 and "no run 'ghost'" in out and "a" in out
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.execute("PRAGMA user_version = 2")
    conn.close()
    code, out = run("runs", "--db", str(old))
    assert code == 2 and "schema version 2" in out and "ncserve serve" in out


def test_an_unreachable_server_names_the_store_to_read(tmp_path: Path) -> None:
    code, out = run("runs", "--target", "127.0.0.1:1", "--deadline", "0.5")
    assert code == 2 and out.count("\n") == 1
    assert "ncserve runs --db FILE" in out and "runs/<run-id>/service/ncserve.db" in out


def _ncserve_serve(*args: str):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "ncserve", "serve", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_busy_ports_are_one_line_errors_that_leave_no_file(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        for args, needle in (
            (("--listen", f"127.0.0.1:{port}"), f"cannot listen on 127.0.0.1:{port}"),
            (("--listen", "127.0.0.1:0", "--metrics-port", str(port)),
             f"cannot serve /metrics on 127.0.0.1:{port}"),
        ):  # fmt: skip
            db = tmp_path / "new.db"
            done = _ncserve_serve(*args, "--db", str(db))
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2, done.stderr
            assert len(lines) == 1 and needle in lines[0] and "Traceback" not in done.stderr
            assert not list(tmp_path.glob("new.db*")), "a failed start left its database"


def test_every_serve_default_is_the_server_configs() -> None:
    """One definition of each setting: `ncserve serve`'s defaults are ServerConfig's."""
    from ncserve.cli.serve import serve
    from ncserve.service.server import ServerConfig

    checked = 0
    for param in serve.params:
        field = ServerConfig.model_fields.get(param.name or "")
        if field is None:
            continue
        assert param.default == field.default, param.name
        checked += 1
    assert checked >= 20
    shown = CliRunner().invoke(cli, ["serve", "--help"]).output
    assert "[default: 1000;" in shown and "[default: (1h)]" in shown
    # Every duration with a default shows it in its largest unit, derived from the field.
    flat = " ".join(shown.split())
    durations = {str(p.name): p.default for p in serve.params if isinstance(p.type, Duration)}
    assert {k for k, v in durations.items() if v is None} == {"retention_s"}
    for name, default in durations.items():
        if default is not None:
            assert f"[default: ({shown_duration(default)})]" in flat, name
