"""Client CLI commands: options, help, and one-line errors that need no running service."""

from __future__ import annotations

import socket
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from ncserve.cli import cli

CLIENT_COMMANDS = ("runs", "query", "watch", "push", "delete")
CONNECTION_FLAGS = (
    "--target",
    "--token-file",
    "--tls-ca",
    "--tls-cert",
    "--tls-key",
    "--deadline",
)


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, *needles: str) -> None:
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("Error: "), output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in lines[0], (needle, output)


@pytest.mark.parametrize("name", CLIENT_COMMANDS)
def test_help_documents_every_option(name: str) -> None:
    command = cli.commands[name]
    code, output = run(name, "--help")
    assert code == 0
    for flag in CONNECTION_FLAGS:
        assert flag in output
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{name} {param.opts} has no help text"
            assert param.opts[0] in output


def features_file(path: Path, n: int = 20, K: int = 3, P: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    np.savez(
        path,
        features=rng.normal(size=(n, P)) + y[:, None],
        labels=y,
        weight=rng.normal(size=(K, P)),
    )
    return path


def test_unreachable_server_is_one_line() -> None:
    target = closed_port()
    for args in (("runs",), ("query", "run"), ("query", "run", "--all"), ("watch", "run")):
        code, output = run(*args, "--target", target, "--deadline", "0.3")
        assert_one_line_error(code, output, "unreachable", target)


def test_push_unreachable_server_is_one_line(tmp_path: Path) -> None:
    path = features_file(tmp_path / "f.npz")
    target = closed_port()
    code, output = run(
        "push",
        str(path),
        "--run",
        "r",
        "--step",
        "0",
        "--rank",
        "0",
        "--world-size",
        "1",
        "--target",
        target,
        "--deadline",
        "0.3",
    )
    assert_one_line_error(code, output, "unreachable", target)


def write_bad_file(directory: Path, kind: str) -> Path:
    path = directory / f"{kind}.npz"
    if kind == "text":
        path.write_text("hello")
    elif kind == "nolabels":
        np.savez(path, features=np.zeros((2, 2)))
    return path  # "missing": not written at all


@pytest.mark.parametrize(
    ("kind", "needle"),
    [("missing", "no such file"), ("text", "not a .npz"), ("nolabels", "missing key")],
)
def test_push_bad_file(tmp_path: Path, kind: str, needle: str) -> None:
    path = write_bad_file(tmp_path, kind)
    code, output = run(
        "push",
        str(path),
        "--run",
        "r",
        "--step",
        "0",
        "--rank",
        "0",
        "--world-size",
        "1",
        "--target",
        closed_port(),
    )
    assert_one_line_error(code, output, str(path), needle)


def test_push_label_out_of_range_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, features=np.zeros((3, 2)), labels=np.array([0, 1, 7]), weight=np.zeros((3, 2)))
    code, output = run(
        "push",
        str(path),
        "--run",
        "r",
        "--step",
        "0",
        "--rank",
        "0",
        "--world-size",
        "1",
        "--target",
        closed_port(),
    )
    assert_one_line_error(code, output, "label 7")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("runs", "--target", "nohost"), "HOST:PORT"),
        (("runs", "--target", "h:99999"), "HOST:PORT"),
        (("runs", "--tls-cert", "c.pem"), "--tls-key"),
        (("runs", "--tls-ca", "/no/such/ca.pem"), "no such file"),
        (("runs", "--token-file", "/no/such/token"), "cannot read"),
        (("query", "r", "--step", "3", "--all"), "either --step"),
        (
            ("push", "f.npz", "--run", "r", "--step", "0", "--rank", "4", "--world-size", "4"),
            "outside [0, 4)",
        ),
        (
            (
                "push",
                "f.npz",
                "--run",
                "r",
                "--step",
                "0",
                "--rank",
                "0",
                "--world-size",
                "1",
                "--meta",
                "novalue",
            ),
            "KEY=VALUE",
        ),
    ],
)
def test_bad_options_are_one_line(args: tuple[str, ...], needle: str) -> None:
    code, output = run(*args)
    assert_one_line_error(code, output, needle)


def test_empty_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("\n")
    code, output = run("runs", "--token-file", str(token))
    assert_one_line_error(code, output, "empty file")
